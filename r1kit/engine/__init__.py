"""r1kit's one generation engine: token ids in, sampled completions out (see r1kit/engine/api.py).

local.py: the engine; scheduler.py: its requests, waiting queue and running batch (continuous batching);
prefix_cache.py: hash-chained, reference-counted KV blocks under a memory budget; sampling.py: the sampler;
fast_llama.py: the fast pure-torch Llama-family forward; hf_backend.py: the HF-forward fallback; vllm.py: the
vLLM backend; api.py: the request-level interface every backend implements.
"""
from r1kit.engine.api import CacheStats, GenerationEngine, RequestOutput, SamplingParams
from r1kit.engine.fast_llama import FastLlama, fast_path_problem
from r1kit.engine.local import Engine, EngineStats, sample_tokens

__all__ = ["ENGINE_BACKENDS", "CacheStats", "Engine", "EngineStats", "FastLlama", "GenerationEngine", "RequestOutput",
           "SamplingParams", "fast_path_problem", "make_engine", "sample_tokens"]

ENGINE_BACKENDS = ("local", "vllm")


def make_engine(model, tokenizer, backend: str = "local", **options) -> GenerationEngine:
    """The one place an engine is built: `backend` is `engine.backend` from the config.

    model: the policy's (unwrapped) HF module; tokenizer: its tokenizer (EOS/pad ids come from it, or from
    `eos_token_ids=`/`pad_token_id=` in options). `dtype=` in options is `engine.dtype` (r1kit.engine.inputs
    ENGINE_DTYPES; "auto" = the model's own), checked here whatever the backend: the local engine samples
    with copies of the weights in that dtype, vLLM computes in it.
    """
    from r1kit.engine.inputs import engine_dtype
    from r1kit.types import R1KitError

    eos = options.pop("eos_token_ids", None) or [tokenizer.eos_token_id]
    pad = options.pop("pad_token_id", None)
    pad = tokenizer.pad_token_id if pad is None else pad
    dtype = options.pop("dtype", "auto")
    resolved = engine_dtype(dtype, next(model.parameters()).dtype)  # a bad value fails here, whatever the backend
    if backend == "local":
        return Engine(model, eos_token_ids=eos, pad_token_id=pad, dtype=dtype, **options)
    if backend == "vllm":
        from r1kit.engine.vllm import VLLMEngine  # the optional `vllm` extra; it raises a clear error when absent

        return VLLMEngine(model, tokenizer, eos_token_ids=eos, pad_token_id=pad,
                          dtype=str(resolved).removeprefix("torch."), **options)
    raise R1KitError(f"engine.backend={backend!r} is unknown; expected one of {list(ENGINE_BACKENDS)}")
