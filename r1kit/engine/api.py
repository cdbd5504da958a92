"""The engine's request-level interface: what every generation backend (local, vLLM) offers.

Two ways in, one engine:
- batch: `generate(prompts, group_size=G, ...) -> Rollout`, what RL rollouts, evaluation, rejection
  sampling and `r1kit generate` call (P prompts x G samples = P requests with n = G);
- requests: `add_request(prompt_ids, SamplingParams) -> request id`, then `step()` repeatedly; each step
  returns the `RequestOutput`s of the tokens sampled in it (streaming), `abort(id)` frees a request's slots
  at once (`abort(id, index)`: one sample's). This is what the server drives (from one engine thread; see
  r1kit/serving).

Stop *strings* are text, and the engine works on token ids: the caller that detokenizes (the server)
matches them and calls `abort(id, index)` for the sample that hit one. Stop token ids are the engine's
(they end a sample with finish "stop").
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch

from r1kit.types import R1KitError, Rollout

FINISH_REASONS = ("stop", "length", "abort")


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling settings (OpenAI's names where they exist)."""

    n: int = 1  # samples of this prompt; they share one prefill (and its prefix-cache blocks)
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    max_tokens: int = 16  # new tokens per sample, EOS included
    stop_token_ids: tuple[int, ...] = ()  # besides the engine's eos_token_ids
    seed: int | None = None  # same seed, same prompt, same params -> same tokens, whatever else runs
    ignore_eos: bool = False

    def validate(self) -> None:
        """Raise R1KitError naming the field at fault."""
        if not isinstance(self.n, int) or self.n < 1:
            raise R1KitError(f"SamplingParams.n must be an int >= 1, got {self.n!r}")
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise R1KitError(f"SamplingParams.max_tokens must be an int >= 1, got {self.max_tokens!r}")
        if not self.temperature >= 0:
            raise R1KitError(f"SamplingParams.temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise R1KitError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p}")


@dataclass
class RequestOutput:
    """What one `step()` produced for one sample of one request (tokens since the previous output)."""

    request_id: str
    index: int  # which of the request's n samples
    token_ids: list[int]  # new tokens sampled in this step (usually 1; 0 when only finishing)
    logprobs: list[float]  # sampler's log p of each, log_softmax(logits / T) over the full vocabulary
    finished: bool = False
    finish_reason: str | None = None  # one of FINISH_REASONS once finished
    prompt_tokens: int = 0  # length of the prompt
    cached_prompt_tokens: int = 0  # of them, served from the prefix cache (no prefill compute)


@runtime_checkable
class GenerationEngine(Protocol):
    """The interface trainers, evaluation and the server rely on (r1kit.engine.local.Engine implements it)."""

    eos_token_ids: list[int]
    pad_token_id: int

    def generate(self, prompts: list[list[int]], *, group_size: int = 1, max_new_tokens: int,
                 temperature: float = 1.0, top_p: float = 1.0,
                 generator: torch.Generator | None = None) -> Rollout: ...

    def add_request(self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None) -> str: ...

    def abort(self, request_id: str, index: int | None = None) -> None:
        """Stop request `request_id` (every sample), or only its sample `index`; unknown ids are ignored."""
        ...

    def step(self) -> list[RequestOutput]: ...

    def has_unfinished(self) -> bool: ...

    def load_weights(self, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """Make the engine sample from the policy's current weights (a no-op where it reads them in place)."""
        ...


@dataclass
class CacheStats:
    """Prefix-cache counters (prompt tokens served from cache vs computed)."""

    hit_tokens: int = 0
    miss_tokens: int = 0
    evicted_blocks: int = 0
    blocks_in_use: int = 0
    bytes_in_use: int = 0
    extra: dict = field(default_factory=dict)
