"""The built-in rule-based rewards of DeepSeek-R1-Zero, and the batch scorer the trainer calls.

R1-Zero (paper, section 2.2.2) is trained on two rule-based rewards: *accuracy* (is the final answer
right, checked by a rule) and *format* (is the reasoning inside <think> </think> and the answer inside
<answer> </answer>). The paper gives no weights; configs pass them to `score_completions`.

Departure from a lenient evaluation: the RL accuracy reward grades only the answer inside the last
<answer></answer> of the completion, with no fallback to a \\boxed{} or the last number elsewhere:
R1-Zero rewards the answer *in the specified format*. Evaluation uses graders.grade(), which does fall back.

`has_reflection` is a metric, not a reward: the share of completions that re-check their work (the
"aha moment" of the paper's section 2.2.4).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Sequence

import torch

from r1kit.rewards import BATCH_REWARD_FUNCS, REWARD_FUNCS, register_reward
from r1kit.rewards.graders import grade_many, grader_for
from r1kit.templates import parse_completion
from r1kit.types import Problem, R1KitError


def accuracy_rewards(completions: Sequence[str], problems: Sequence[Problem]) -> list[float]:
    """Batch form of `accuracy_reward`: "math" answers are verified in parallel over the worker pool."""
    answers = [parse_completion(c).answer for c in completions]
    return [float(v.correct) for v in grade_many(answers, problems)]


@register_reward("accuracy", batch=accuracy_rewards)
def accuracy_reward(completion: str, problem: Problem) -> float:
    """1.0 if the answer in the last complete <answer></answer> is correct for `problem`, else 0.0."""
    answer = parse_completion(completion).answer
    return float(grader_for(problem.answer_style)(answer, problem).correct)


@register_reward("format")
def format_reward(completion: str, problem: Problem) -> float:
    """1.0 for exactly "<think> ... </think> <answer> ... </answer>" with nothing around, else 0.0."""
    return float(parse_completion(completion).well_formed)


# Self-check phrases of the "aha moment", as whole words ("awaited" and "checkout" do not count);
# "let me re" may go on ("let me recompute").
_REFLECTION = re.compile(
    r"\b(?:wait|(?:re-?|double-)?check(?:s|ed|ing)?|verif(?:y|ies|ied|ying|ication))\b|\blet\s+me\s+re",
    re.IGNORECASE,
)


def has_reflection(text: str) -> bool:
    """Whether the reasoning re-checks itself ("wait", "check", "verify", "let me re...", "recheck",
    "double-check"; case-insensitive). Looks inside <think> when there is one, else at the whole text."""
    think = parse_completion(text).think
    return _REFLECTION.search(think if think is not None else text) is not None


def reflection_rate(completions: Sequence[str]) -> float:
    """Share of completions with a self-check phrase (0.0 for none)."""
    return sum(has_reflection(c) for c in completions) / len(completions) if completions else 0.0


@dataclass
class RewardScores:
    total: torch.Tensor  # [N] float32, sum over reward functions of weight * value
    per_fn: dict[str, torch.Tensor]  # name -> [N] float32, each function's raw (unweighted) values

    def means(self) -> dict[str, float]:
        """{"reward": mean total, "reward/<name>": mean raw value}: one flat record for the step's metrics."""
        out = {"reward": self.total.mean().item() if self.total.numel() else 0.0}
        out.update({f"reward/{k}": v.mean().item() if v.numel() else 0.0 for k, v in self.per_fn.items()})
        return out


def _check_weights(weights: dict[str, float]) -> None:
    if not weights:
        raise R1KitError(f"no reward functions given; known rewards: {sorted(REWARD_FUNCS)}")
    for name, w in weights.items():
        if name not in REWARD_FUNCS:
            raise R1KitError(f"unknown reward {name!r}; known rewards: {sorted(REWARD_FUNCS)}")
        if not isinstance(w, (int, float)) or not math.isfinite(w):
            raise R1KitError(f"reward {name!r}: weight must be a finite number, got {w!r}")


def score_completions(
    completions: Sequence[str], problems: Sequence[Problem], weights: dict[str, float]
) -> RewardScores:
    """Score N completions with every reward named in `weights`.

    completions[i] answers problems[i] (N of each, prompt-major as in a Rollout). Returns the weighted
    sum `total` [N] and each function's raw values `per_fn[name]` [N], so the trainer can log each mean.
    """
    _check_weights(weights)
    if len(completions) != len(problems):
        raise R1KitError(f"{len(completions)} completions but {len(problems)} problems: they must pair up")
    total = torch.zeros(len(completions), dtype=torch.float32)  # [N]
    per_fn: dict[str, torch.Tensor] = {}
    for name, weight in weights.items():
        values = BATCH_REWARD_FUNCS[name](completions, problems)
        scores = torch.tensor(values, dtype=torch.float32).reshape(-1)  # [N]
        if scores.numel() != len(completions):
            raise R1KitError(f"reward {name!r} returned {scores.numel()} values for {len(completions)} completions")
        if not torch.isfinite(scores).all():
            raise R1KitError(f"reward {name!r} returned a NaN or infinite value")
        per_fn[name] = scores
        total += weight * scores
    return RewardScores(total, per_fn)
