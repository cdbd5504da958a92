"""r1kit's one generation engine: token ids in, sampled completions out (see r1kit/engine/api.py).

local.py: the engine (fast pure-torch Llama-family path, HF fallback); fast_llama.py: its fast forward;
api.py: the request-level interface every backend implements.
"""
from r1kit.engine.api import GenerationEngine, RequestOutput, SamplingParams
from r1kit.engine.fast_llama import FastLlama, fast_path_problem
from r1kit.engine.local import Engine, EngineStats, sample_tokens

__all__ = ["Engine", "EngineStats", "FastLlama", "GenerationEngine", "RequestOutput", "SamplingParams",
           "fast_path_problem", "sample_tokens"]
