"""Group-relative advantages and the reward-side helpers around them (DAPO overlong, dynamic sampling).

Rows are prompt-major: row p*G + g is the g-th completion of prompt p (see r1kit.types.Rollout).
Every estimator maps rewards [P, G] -> advantages [P, G]; `compute_advantages` does the reshaping and
the checks, so an estimator is a few lines of maths. Standard deviations are unbiased (Bessel, as
`torch.std` in TRL and DeepSeekMath's reference code); a single sample's std is taken as 0.

A group whose rewards are all equal carries no learning signal: every estimator below gives it an
advantage of exactly 0 (we overwrite the float dust `r - mean(r)` can leave), never NaN.
"""
from __future__ import annotations

from typing import Callable

import torch

AdvantageEstimator = Callable[[torch.Tensor, float], torch.Tensor]


def _std(x: torch.Tensor, dim: int | None = None, keepdim: bool = False) -> torch.Tensor:
    """Unbiased std, but 0 (not NaN) when there is a single element along `dim`."""
    n = x.numel() if dim is None else x.shape[dim]
    if dim is None:
        return torch.std(x, correction=1 if n > 1 else 0)
    return torch.std(x, dim=dim, keepdim=keepdim, correction=1 if n > 1 else 0)


def grpo_advantages(rewards: torch.Tensor, eps: float) -> torch.Tensor:
    """GRPO (DeepSeekMath, Shao et al. 2024, §4.1.2 outcome supervision; R1 paper eq. 3):
    A_i = (r_i - mean(r_group)) / (std(r_group) + eps).   rewards [P, G] -> [P, G]"""
    mean = rewards.mean(-1, keepdim=True)  # [P, 1]
    return (rewards - mean) / (_std(rewards, -1, keepdim=True) + eps)  # [P, G]


def dr_grpo_advantages(rewards: torch.Tensor, eps: float) -> torch.Tensor:
    """Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-Like Training"): A_i = r_i - mean(r_group).
    Dropping the std removes GRPO's bias towards too-easy and too-hard questions. [P, G] -> [P, G]"""
    return rewards - rewards.mean(-1, keepdim=True)  # [P, G]


def batch_std_advantages(rewards: torch.Tensor, eps: float) -> torch.Tensor:
    """Group mean, batch std (Liu et al. 2025, "Part I: Tricks or Traps?"):
    A_i = (r_i - mean(r_group)) / (std(r over the whole batch) + eps).   [P, G] -> [P, G]"""
    return (rewards - rewards.mean(-1, keepdim=True)) / (_std(rewards) + eps)  # [P, G]


def rloo_advantages(rewards: torch.Tensor, eps: float) -> torch.Tensor:
    """RLOO (Kool et al. 2019; Ahmadian et al. 2024): leave-one-out baseline
    A_i = r_i - (sum_j r_j - r_i) / (G - 1)  ( = G/(G-1) * (r_i - mean) ). G = 1 gives 0. [P, G] -> [P, G]"""
    g = rewards.shape[-1]
    if g == 1:
        return torch.zeros_like(rewards)
    others = (rewards.sum(-1, keepdim=True) - rewards) / (g - 1)  # [P, G] mean of the other G-1
    return rewards - others  # [P, G]


def reinforce_pp_baseline_advantages(rewards: torch.Tensor, eps: float) -> torch.Tensor:
    """REINFORCE++-baseline (Hu et al. 2025, "REINFORCE++"): A = r - mean(r_group), then whitened over
    the batch: (A - mean_batch(A)) / (std_batch(A) + eps). Unlike `batch_std`, the std is that of the
    group-centred rewards, so it ignores between-prompt difficulty. [P, G] -> [P, G]"""
    centred = rewards - rewards.mean(-1, keepdim=True)  # [P, G]
    return (centred - centred.mean()) / (_std(centred) + eps)  # [P, G]


ADVANTAGE_ESTIMATORS: dict[str, AdvantageEstimator] = {
    "grpo": grpo_advantages,
    "dr_grpo": dr_grpo_advantages,
    "batch_std": batch_std_advantages,
    "rloo": rloo_advantages,
    "reinforce_pp_baseline": reinforce_pp_baseline_advantages,
}


def _grouped(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """[P*G] -> [P, G], with the checks every group helper needs."""
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [P*G] (prompt-major), got shape {tuple(rewards.shape)}")
    if not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    if not torch.isfinite(rewards).all():
        raise ValueError("rewards contain NaN or inf; a reward function returned a non-finite score")
    return rewards.reshape(-1, group_size)  # [P, G]


def compute_advantages(
    rewards: torch.Tensor, group_size: int, estimator: str = "grpo", eps: float = 1e-6
) -> torch.Tensor:
    """Advantages for rewards [P*G] (row p*G + g), with the estimator named in ADVANTAGE_ESTIMATORS.

    Integer/bool rewards are promoted to float32. Constant groups (including G = 1) get exactly 0.
    Returns [P*G], same dtype as the (float) rewards.
    """
    if estimator not in ADVANTAGE_ESTIMATORS:
        raise ValueError(f"advantage estimator {estimator!r} is unknown; allowed: {list(ADVANTAGE_ESTIMATORS)}")
    if not rewards.is_floating_point():
        rewards = rewards.float()
    grouped = _grouped(rewards, group_size)  # [P, G]
    adv = ADVANTAGE_ESTIMATORS[estimator](grouped, eps)  # [P, G]
    constant = ~_spread(grouped)  # [P]
    adv = torch.where(constant[:, None], torch.zeros_like(adv), adv)  # [P, G]
    return adv.reshape(-1)  # [P*G]


def _spread(grouped: torch.Tensor) -> torch.Tensor:
    """[P, G] -> [P] bool: the group's rewards are not all equal."""
    return grouped.amax(-1) > grouped.amin(-1)


def nonconstant_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """DAPO dynamic sampling (Yu et al. 2025: keep groups with 0 < #correct < G), generalised to
    any reward: True for the prompts whose G rewards are not all equal. rewards [P*G] -> bool [P].

    The trainer keeps these groups and resamples until the batch is full; this is only the test.
    """
    return _spread(_grouped(rewards, group_size))  # [P]


def overlong_penalty(lengths: torch.Tensor, max_len: int, cache_len: int) -> torch.Tensor:
    """DAPO soft overlong punishment (Yu et al. 2025, overlong reward shaping), added to the task reward:

        R(L) = 0                                   if L <= max_len - cache_len
               ((max_len - cache_len) - L) / cache_len   if max_len - cache_len < L <= max_len
               -1                                  if L > max_len

    lengths: [N] int/float completion lengths in tokens. Returns [N] float32 in [-1, 0].
    cache_len = 0 makes it a hard step: 0 up to max_len, -1 beyond.
    """
    if not (isinstance(max_len, int) and max_len > 0):
        raise ValueError(f"overlong_penalty: max_len must be a positive int, got {max_len!r}")
    if not (isinstance(cache_len, int) and 0 <= cache_len <= max_len):
        raise ValueError(f"overlong_penalty: cache_len must be an int in [0, max_len={max_len}], got {cache_len!r}")
    lengths = lengths.to(torch.float32)  # [N]
    start = max_len - cache_len
    ramp = (start - lengths) / max(cache_len, 1)  # [N] linear part, only used inside (start, max_len]
    penalty = torch.where(lengths <= start, torch.zeros_like(lengths), ramp.clamp(min=-1.0))  # [N]
    return torch.where(lengths > max_len, torch.full_like(lengths, -1.0), penalty)  # [N]


def mask_truncated_rows(response_mask: torch.Tensor, truncated: torch.Tensor) -> torch.Tensor:
    """DAPO overlong filtering: drop truncated completions from the loss (their reward is noise about
    length, not quality). response_mask [N, T], truncated [N] bool -> mask [N, T], same dtype."""
    if truncated.shape != response_mask.shape[:1]:
        raise ValueError(f"truncated must be [N] = [{response_mask.shape[0]}], got {tuple(truncated.shape)}")
    keep = (~truncated.bool())[:, None]  # [N, 1]
    return response_mask * keep.to(response_mask.dtype) if response_mask.dtype != torch.bool else response_mask & keep
