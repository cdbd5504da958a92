"""The typed values that travel between r1kit's stages (see DESIGN.md: every arrow is typed).

Task --Problem--> Template --prompt ids--> Engine --Rollout--> Rewards --> advantages --> loss.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


class R1KitError(Exception):
    """A user-facing error: bad config, data file, model path or input. Its message names the culprit."""


@dataclass(frozen=True)
class Problem:
    """One verifiable problem.

    `answer_style` picks the grader (see r1kit.rewards.graders.GRADERS):
    "exact" (string equality after strip), "numeric" (integer/decimal equality),
    "math" (math-verify equivalence), "countdown" (expression uses `meta["nums"]` once each
    and equals int(answer)).
    """

    id: str
    question: str  # the problem text shown to the model, without any template
    answer: str  # the reference final answer
    answer_style: str = "exact"
    task: str = ""  # name of the task that produced it
    solution: str = ""  # a reference worked solution, if the source has one
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)


@dataclass
class Rollout:
    """G sampled completions for each of P prompts, flattened prompt-major (row = p * G + g).

    Right-padded with `pad_id`; masks are 1 on real tokens.
    """

    prompt_ids: torch.Tensor  # [N, Tp] long, left-padded prompts (N = P*G)
    prompt_mask: torch.Tensor  # [N, Tp] long, 1 on real prompt tokens
    completion_ids: torch.Tensor  # [N, Tc] long, right-padded completions (EOS included if emitted)
    completion_mask: torch.Tensor  # [N, Tc] float, 1 on generated tokens (incl. EOS)
    logprobs: torch.Tensor  # [N, Tc] float32, sampler's log p of each generated token (0 on padding)
    truncated: torch.Tensor  # [N] bool, True where max_new_tokens was reached without EOS
    group_size: int  # G

    @property
    def num_rows(self) -> int:
        return self.completion_ids.shape[0]

    @property
    def lengths(self) -> torch.Tensor:  # [N] long
        return self.completion_mask.sum(-1).long()
