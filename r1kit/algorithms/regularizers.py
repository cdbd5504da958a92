"""KL estimators, entropy, and the sampler/trainer mismatch correction (truncated importance sampling).

KL estimators (Schulman 2020, "Approximating KL Divergence"), with samples drawn from pi_theta and
log r = ref_logprobs - logprobs, all estimating KL(pi_theta || pi_ref) per token:

  k1          -log r = logp - ref                    unbiased, high variance, can be negative
  k2          0.5 * (log r)^2                        biased, low variance, >= 0
  k3          r - log r - 1 = exp(ref - logp) - (ref - logp) - 1
                                                     unbiased, low variance, >= 0: R1 paper eq. 2
  low_var_kl  k3 with log r clamped to [-20, 20] and the result to [-10, 10] (verl's guard against
              exp overflow when the policy has drifted far from the reference)
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from r1kit.algorithms.aggregation import masked_mean

KLEstimator = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def kl_k1(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k1 = logp - ref (Schulman 2020). [N, T], [N, T] -> [N, T]"""
    return logprobs - ref_logprobs


def kl_k2(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k2 = 0.5 * (logp - ref)^2 (Schulman 2020). [N, T], [N, T] -> [N, T]"""
    return 0.5 * (logprobs - ref_logprobs) ** 2


def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k3 = exp(ref - logp) - (ref - logp) - 1 (Schulman 2020; R1 paper eq. 2). [N, T] x2 -> [N, T]"""
    log_r = ref_logprobs - logprobs  # [N, T]
    return torch.exp(log_r) - log_r - 1.0


def kl_low_var(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k3, clamped: log r to [-20, 20] so exp cannot overflow, the estimate to [-10, 10] so one
    far-off token cannot dominate the batch (as verl's `low_var_kl`). [N, T] x2 -> [N, T]"""
    log_r = (ref_logprobs - logprobs).clamp(-20.0, 20.0)  # [N, T]
    return (torch.exp(log_r) - log_r - 1.0).clamp(-10.0, 10.0)


KL_ESTIMATORS: dict[str, KLEstimator] = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3, "low_var_kl": kl_low_var}


def kl_reward_penalty(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    beta: float,
    estimator: str = "k1",
) -> torch.Tensor:
    """KL as a reward penalty (PPO-RLHF, Ouyang et al. 2022; REINFORCE++): beta * sum_t kl_t per sequence,
    to be SUBTRACTED from each sequence's reward before advantages. No gradient flows (it is a reward).

    logprobs, ref_logprobs, response_mask: [N, T]. Returns [N] (>= 0 for k2/k3; k1 may be negative).
    k1 is the default because its sum over a sequence is the sequence-level log-ratio.
    """
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"kl estimator {estimator!r} is unknown; allowed: {list(KL_ESTIMATORS)}")
    if beta < 0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    with torch.no_grad():
        mask = response_mask.to(logprobs.dtype) > 0  # [N, T]
        kl = KL_ESTIMATORS[estimator](logprobs, ref_logprobs)  # [N, T]
        return beta * torch.where(mask, kl, torch.zeros_like(kl)).sum(-1)  # [N]


def entropy_from_logits(logits: torch.Tensor, chunk_size: int = 1024) -> torch.Tensor:
    """Entropy of each position's next-token distribution: H = logsumexp(z) - sum_v softmax(z)_v z_v.

    logits: [N, T, V] (any float dtype). Returns [N, T] float32 (float64 if the logits are).
    Memory: rows are processed `chunk_size` positions at a time and only that chunk is upcast, so the
    float32 temporaries are [chunk, V] instead of a full [N, T, V] copy (under no_grad; with grad,
    autograd keeps each chunk's softmax for the backward pass, as an unchunked version would).
    """
    if logits.dim() != 3:
        raise ValueError(f"logits must be [N, T, V], got shape {tuple(logits.shape)}")
    n, t, v = logits.shape
    out_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    flat = logits.reshape(n * t, v)  # [N*T, V] a view, no copy
    parts = []
    for start in range(0, n * t, chunk_size):
        z = flat[start : start + chunk_size].to(out_dtype)  # [c, V]
        lse = torch.logsumexp(z, dim=-1)  # [c]
        parts.append(lse - (torch.softmax(z, dim=-1) * z).sum(-1))  # [c]
    if not parts:
        return logits.new_zeros((n, t), dtype=out_dtype)
    return torch.cat(parts).reshape(n, t)  # [N, T]


def high_entropy_mask(entropy: torch.Tensor, response_mask: torch.Tensor, top_fraction: float = 0.2) -> torch.Tensor:
    """Keep only the "forking" tokens: those whose entropy is at or above the top-`top_fraction`
    quantile among valid tokens (Wang et al. 2025, "Beyond the 80/20 Rule"; they train on the top 20%).

    entropy, response_mask: [N, T]. Returns a bool mask [N, T] (a subset of response_mask; ties at the
    threshold are all kept). Compute it on the full batch, before splitting into micro-batches.
    """
    if not 0.0 < top_fraction <= 1.0:
        raise ValueError(f"top_fraction must be in (0, 1], got {top_fraction}")
    valid = response_mask.to(entropy.dtype) > 0  # [N, T]
    values = entropy.detach()[valid]  # [M]
    if values.numel() == 0:
        return valid
    # ceil(q * M) tokens; the 1e-9 keeps 0.2 * 10 = 2.0000000000000004 from becoming 3
    k = max(1, math.ceil(top_fraction * values.numel() - 1e-9))
    threshold = torch.topk(values, k).values[-1]  # the k-th largest entropy
    return valid & (entropy.detach() >= threshold)  # [N, T]


def tis_weights(old_logprobs: torch.Tensor, sampler_logprobs: torch.Tensor, cap: float) -> torch.Tensor:
    """Truncated importance sampling (Yao et al. 2025, "Your Efficient RL Framework Secretly Brings You
    Off-Policy RL Training"): the rollout engine sampled from pi_sampler, not from the trainer's
    pi_old, so each token's policy-gradient term is weighted by w = min(pi_old / pi_sampler, cap).
    No gradient flows through w. [N, T], [N, T] -> [N, T]"""
    log_w = (old_logprobs - sampler_logprobs).detach().clamp(max=20.0)  # [N, T] clamp: no exp overflow
    return torch.exp(log_w).clamp(max=cap)


def logprob_mismatch(
    old_logprobs: torch.Tensor, sampler_logprobs: torch.Tensor, response_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and max of |old_logprobs - sampler_logprobs| over valid tokens (detached scalars)."""
    with torch.no_grad():
        valid = response_mask.to(old_logprobs.dtype) > 0  # [N, T]
        gap = (old_logprobs - sampler_logprobs).abs()  # [N, T]
        gap = torch.where(valid, gap, torch.zeros_like(gap))
        return masked_mean(gap, valid), gap.max() if gap.numel() else gap.sum()
