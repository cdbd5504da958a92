"""Rule-based rewards: pure functions `(completion, problem) -> float`, found by name.

    REWARD_FUNCS["accuracy"](completion, problem)          # 1.0 if the <answer> is right, else 0.0
    score_completions(completions, problems, {"accuracy": 1.0, "format": 0.1})  # -> RewardScores

A reward registers itself with `@register_reward(name)`; the trainer looks rewards up by the names in its
config, so adding one ("language", "overlong", "reward_model") never touches the trainer. A reward that
is cheaper over a whole batch (math verification in a worker pool, a reward model's forward pass) also
passes `batch=fn(completions, problems) -> list[float]`; `score_completions` always calls the batch form,
which defaults to a loop over the single form.

Graders (the answer checkers shared with evaluation) live in r1kit.rewards.graders; math-verify under a
hard time limit in r1kit.rewards.mathverify.
"""
from __future__ import annotations

from typing import Callable, Sequence

from r1kit.types import Problem

RewardFn = Callable[[str, Problem], float]
BatchRewardFn = Callable[[Sequence[str], Sequence[Problem]], list[float]]

REWARD_FUNCS: dict[str, RewardFn] = {}
BATCH_REWARD_FUNCS: dict[str, BatchRewardFn] = {}


def _per_item(fn: RewardFn) -> BatchRewardFn:
    def batch(completions: Sequence[str], problems: Sequence[Problem]) -> list[float]:
        return [float(fn(c, p)) for c, p in zip(completions, problems)]

    return batch


def register_reward(name: str, *, batch: BatchRewardFn | None = None) -> Callable[[RewardFn], RewardFn]:
    """Decorator: make `fn(completion, problem) -> float` available as REWARD_FUNCS[name].

    `batch`, if given, must return exactly what `[fn(c, p) for c, p in zip(completions, problems)]` would.
    """

    def deco(fn: RewardFn) -> RewardFn:
        REWARD_FUNCS[name] = fn
        BATCH_REWARD_FUNCS[name] = batch if batch is not None else _per_item(fn)
        return fn

    return deco


# Imported after the registry exists: functions.py registers the built-in rewards through it.
from r1kit.rewards.functions import (  # noqa: E402
    RewardScores,
    accuracy_reward,
    format_reward,
    has_reflection,
    reflection_rate,
    score_completions,
)
from r1kit.rewards.graders import (  # noqa: E402
    GRADERS,
    Verdict,
    answers_equivalent,
    extract_answer,
    grade,
    grade_many,
)
from r1kit.rewards import language, shaping  # noqa: E402,F401  register "language", "overlong"
from r1kit.rewards import code  # noqa: E402,F401  register "code", "code_fraction" (the sandbox starts on first use)

__all__ = [
    "BATCH_REWARD_FUNCS", "GRADERS", "REWARD_FUNCS", "BatchRewardFn", "RewardFn", "RewardScores", "Verdict",
    "accuracy_reward", "answers_equivalent", "extract_answer", "format_reward", "grade", "grade_many",
    "has_reflection", "reflection_rate", "register_reward", "score_completions",
]
