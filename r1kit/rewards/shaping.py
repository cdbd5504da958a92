"""Length-aware reward shaping: DAPO's soft overlong punishment, as the reward "overlong".

    grpo.reward_weights: {accuracy: 1.0, format: 0.1, overlong: 1.0}    # grpo.overlong_buffer: 16

DAPO (Yu et al. 2025, section 3.4) adds R_length(L) to the task reward: 0 up to max_len - buffer tokens,
then a linear ramp down to -1 at max_len, and -1 beyond (the maths is `algorithms.overlong_penalty`).

How the reward learns the length. A reward is a pure function (completion, problem) -> float, and the
completion's length in *tokens* is in neither (re-tokenizing the decoded text would not give back the
sampled ids). So the trainer hands each row its own copy of the problem with the length facts in
`meta` (`with_completion_lengths`), and the reward reads them there: it stays pure, needs no hidden
per-batch state, and can be called and tested like any other reward. A truncated completion (no EOS
within max_len) counts as longer than max_len: it was cut, not finished, so it gets the full -1.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import torch

from r1kit.algorithms import overlong_penalty
from r1kit.rewards import register_reward
from r1kit.types import Problem, R1KitError

# problem.meta keys the trainer sets per completion (rows of one prompt get separate Problem copies)
COMPLETION_TOKENS = "completion_tokens"  # int: generated tokens, EOS included
COMPLETION_TRUNCATED = "completion_truncated"  # bool: max_len reached without EOS
MAX_COMPLETION_TOKENS = "max_completion_tokens"  # int: the sampler's max_new_tokens
OVERLONG_BUFFER = "overlong_buffer"  # int: length of DAPO's ramp, in tokens
LENGTH_KEYS = (COMPLETION_TOKENS, COMPLETION_TRUNCATED, MAX_COMPLETION_TOKENS, OVERLONG_BUFFER)


def default_overlong_buffer(max_new_tokens: int) -> int:
    """DAPO's ratio: a 4,096-token ramp under a 20,480-token limit, i.e. the last fifth."""
    return max_new_tokens // 5


def with_completion_lengths(
    problems: Sequence[Problem], lengths: torch.Tensor, truncated: torch.Tensor, max_len: int, buffer: int
) -> list[Problem]:
    """One copy of problems[i] per completion i, with its length facts in `meta` (see LENGTH_KEYS).

    problems: N problems (prompt-major, repeated G times); lengths [N] tokens; truncated [N] bool.
    The originals are not modified (a Problem is frozen and its meta is shared by the G copies).
    """
    if not (len(problems) == lengths.numel() == truncated.numel()):
        raise ValueError(f"{len(problems)} problems, {lengths.numel()} lengths and {truncated.numel()} "
                         f"truncated flags: they must pair up")
    return [
        dataclasses.replace(p, meta={**p.meta, COMPLETION_TOKENS: int(n), COMPLETION_TRUNCATED: bool(t),
                                     MAX_COMPLETION_TOKENS: max_len, OVERLONG_BUFFER: buffer})
        for p, n, t in zip(problems, lengths.tolist(), truncated.tolist())
    ]


@register_reward("overlong")
def overlong_reward(completion: str, problem: Problem) -> float:
    """DAPO soft overlong punishment in [-1, 0] for this completion's token length (see module doc).

    Reads problem.meta[COMPLETION_TOKENS, COMPLETION_TRUNCATED, MAX_COMPLETION_TOKENS, OVERLONG_BUFFER],
    which the GRPO trainer sets; `completion` itself is not needed.
    """
    missing = [k for k in LENGTH_KEYS if k not in problem.meta]
    if missing:
        raise R1KitError(f"reward 'overlong' needs the completion's token length in problem.meta {missing} "
                         f"(the GRPO trainer sets them; elsewhere use with_completion_lengths)")
    m = problem.meta
    max_len = m[MAX_COMPLETION_TOKENS]
    length = max_len + 1 if m[COMPLETION_TRUNCATED] else m[COMPLETION_TOKENS]
    return float(overlong_penalty(torch.tensor([length]), max_len, m[OVERLONG_BUFFER])[0])
