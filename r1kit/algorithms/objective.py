"""The one call the trainer makes per micro-batch: `policy_objective` (loss to minimise + metrics),
and `validate_algorithm_options`, the config-time check of every algorithm knob.

    loss = agg( w_tis * L_policy )  +  beta * agg( KL_est(pi_theta || pi_ref) )  -  entropy_coef * agg( H )

with `agg` the same `agg_loss` mode and denominator for all three terms, `L_policy` from POLICY_LOSSES,
`KL_est` from KL_ESTIMATORS and w_tis the truncated importance weights (1 when TIS is off).
mu > 1 updates per batch are correct because the ratio uses the stored `old_logprobs`.
"""
from __future__ import annotations

import math
from functools import partial

import torch

from r1kit.algorithms.advantages import ADVANTAGE_ESTIMATORS
from r1kit.algorithms.aggregation import AGG_MODES, agg_loss, masked_mean
from r1kit.algorithms.policy_losses import POLICY_LOSSES
from r1kit.algorithms.regularizers import KL_ESTIMATORS, kl_k3, logprob_mismatch, tis_weights
from r1kit.types import R1KitError


class AlgorithmOptionError(R1KitError, ValueError):
    """A bad algorithm option: a ValueError for the maths, an R1KitError for the CLI (names the field)."""


def _choice(field: str, value: str, allowed) -> None:
    if value not in allowed:
        raise AlgorithmOptionError(f"{field}={value!r} is unknown; allowed values: {list(allowed)}")


def _number(field: str, value, *, low: float, low_inclusive: bool = True, high: float = math.inf) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value >= low if low_inclusive else value > low) and value < high
    if not ok:
        bound = f"{'>=' if low_inclusive else '>'} {low}" + (f" and < {high}" if high < math.inf else "")
        raise AlgorithmOptionError(f"{field} must be a finite number {bound}, got {value!r}")


def validate_algorithm_options(
    loss_type: str = "grpo",
    agg_mode: str = "seq-mean-token-mean",
    advantage_estimator: str = "grpo",
    kl_estimator: str = "k3",
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    beta: float = 0.0,
    *,
    clip_ratio_c: float | None = None,
    entropy_coef: float = 0.0,
    tis_cap: float | None = None,
    norm_const: float | None = None,
) -> None:
    """Raise AlgorithmOptionError (a ValueError) naming the field and what is allowed; else return None.

    Knobs a variant would silently ignore are errors (clip_ratio_c without 'dual_clip'), except
    norm_const, which only 'seq-mean-token-sum-norm' reads, so a trainer can always pass its max length.
    """
    _choice("loss_type", loss_type, POLICY_LOSSES)
    _choice("agg_mode", agg_mode, AGG_MODES)
    _choice("advantage_estimator", advantage_estimator, ADVANTAGE_ESTIMATORS)
    _choice("kl_estimator", kl_estimator, KL_ESTIMATORS)
    _number("clip_low", clip_low, low=0.0, high=1.0)  # 1 - clip_low must stay a positive ratio
    _number("clip_high", clip_high, low=0.0)
    if clip_high < clip_low:
        raise AlgorithmOptionError(f"clip_high ({clip_high}) must be >= clip_low ({clip_low}) "
                                   f"(DAPO clip-higher raises the upper bound, never lowers it)")
    _number("beta", beta, low=0.0)
    _number("entropy_coef", entropy_coef, low=0.0)
    if loss_type == "dual_clip":
        _number("clip_ratio_c", clip_ratio_c, low=1.0, low_inclusive=False)
    elif clip_ratio_c is not None:
        raise AlgorithmOptionError(f"clip_ratio_c={clip_ratio_c} is only used by loss_type='dual_clip', "
                                   f"not {loss_type!r}; leave it unset")
    if tis_cap is not None:
        _number("tis_cap", tis_cap, low=0.0, low_inclusive=False)
    if agg_mode == "seq-mean-token-sum-norm":
        _number("norm_const", norm_const, low=0.0, low_inclusive=False)


def _check_shapes(logprobs: torch.Tensor, advantages: torch.Tensor, response_mask: torch.Tensor, **others) -> None:
    if logprobs.dim() != 2:
        raise ValueError(f"logprobs must be [N, T], got shape {tuple(logprobs.shape)}")
    if advantages.shape != logprobs.shape[:1]:
        raise ValueError(f"advantages must be [N] = [{logprobs.shape[0]}], got {tuple(advantages.shape)}")
    for name, t in {"response_mask": response_mask, **others}.items():
        if t is not None and t.shape != logprobs.shape:
            raise ValueError(f"{name} must have logprobs' shape {tuple(logprobs.shape)}, got {tuple(t.shape)}")


def _zero_pad(x: torch.Tensor | None, valid: torch.Tensor) -> torch.Tensor | None:
    """Zero the padding: it may hold anything (-inf from a masked log-softmax) and an exp of it would
    put NaN into the loss and the gradient even where the mask drops it."""
    return None if x is None else torch.where(valid, x, torch.zeros_like(x))


def policy_objective(
    logprobs, old_logprobs, advantages, response_mask, *, ref_logprobs=None,
    loss_type="grpo", agg_mode="seq-mean-token-mean", clip_low=0.2, clip_high=0.2,
    clip_ratio_c=None, beta=0.0, kl_estimator="k3", entropy=None, entropy_coef=0.0,
    sampler_logprobs=None, tis_cap=None, norm_const=None, denominator=None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The GRPO-family loss to MINIMISE for one (micro-)batch, and its metrics (see module doc).

    logprobs [N, T] (with grad), old_logprobs / ref_logprobs / sampler_logprobs [N, T] (constants),
    entropy [N, T] (with grad if entropy_coef > 0), advantages [N], response_mask [N, T] bool/float.
    ref_logprobs may be None only when beta == 0 (the caller then skips the reference model).
    denominator: `agg_denominator(full_batch_mask, agg_mode)` when accumulating gradients.
    Returns (scalar loss, metrics of detached scalars): pg_loss, approx_kl (k3 of old vs new),
    clip_frac_low / _high / _dual / clip_frac, ratio_mean; kl if ref_logprobs is given; entropy if
    given; logprob_mismatch_mean / _max if sampler_logprobs is given, tis_capped_frac with TIS. Token metrics are means over
    this micro-batch's valid tokens.
    """
    validate_algorithm_options(loss_type, agg_mode, "grpo", kl_estimator, clip_low, clip_high, beta,
                               clip_ratio_c=clip_ratio_c, entropy_coef=entropy_coef, tis_cap=tis_cap,
                               norm_const=norm_const)
    _check_shapes(logprobs, advantages, response_mask, old_logprobs=old_logprobs, ref_logprobs=ref_logprobs,
                  sampler_logprobs=sampler_logprobs, entropy=entropy)
    if beta > 0 and ref_logprobs is None:
        raise ValueError(f"beta={beta} > 0 needs ref_logprobs (the reference model's log-probs); got None")
    if entropy_coef > 0 and entropy is None:
        raise ValueError(f"entropy_coef={entropy_coef} > 0 needs the per-token entropy; got None")
    if tis_cap is not None and sampler_logprobs is None:
        raise ValueError(f"tis_cap={tis_cap} needs sampler_logprobs (the rollout engine's log-probs); got None")

    valid = response_mask > 0  # [N, T] bool
    mask = valid.to(logprobs.dtype)  # [N, T]
    logprobs, entropy = _zero_pad(logprobs, valid), _zero_pad(entropy, valid)
    old, ref, sampler = (_zero_pad(x if x is None else x.detach(), valid)
                         for x in (old_logprobs, ref_logprobs, sampler_logprobs))
    agg = partial(agg_loss, mask=mask, mode=agg_mode, denominator=denominator, norm_const=norm_const)

    out = POLICY_LOSSES[loss_type](logprobs, old, advantages.detach().to(logprobs.dtype), mask,
                                   clip_low=clip_low, clip_high=clip_high, clip_ratio_c=clip_ratio_c)
    pg_per_token = out.loss  # [N, T]
    metrics: dict[str, torch.Tensor] = {}
    if sampler is not None:
        metrics["logprob_mismatch_mean"], metrics["logprob_mismatch_max"] = logprob_mismatch(old, sampler, valid)
        if tis_cap is not None:
            pg_per_token = pg_per_token * tis_weights(old, sampler, tis_cap)  # [N, T]
            # share of tokens whose weight pi_old / pi_sampler was cut at the cap
            metrics["tis_capped_frac"] = masked_mean(((old - sampler) > math.log(tis_cap)).to(old.dtype), valid)
    pg_loss = agg(pg_per_token)
    loss = pg_loss

    if ref is not None:
        kl_per_token = KL_ESTIMATORS[kl_estimator](logprobs if beta > 0 else logprobs.detach(), ref)  # [N, T]
        if beta > 0:
            loss = loss + beta * agg(kl_per_token)
        metrics["kl"] = masked_mean(kl_per_token.detach(), valid)
    if entropy is not None:
        if entropy_coef > 0:
            loss = loss - entropy_coef * agg(entropy)
        metrics["entropy"] = masked_mean(entropy.detach(), valid)

    metrics.update(_ratio_metrics(out, logprobs.detach(), old, valid))
    metrics["pg_loss"] = pg_loss.detach()
    return loss, metrics


def _ratio_metrics(out, logprobs: torch.Tensor, old: torch.Tensor, valid: torch.Tensor) -> dict[str, torch.Tensor]:
    """Clip fractions, mean ratio and approx_kl = k3 estimate of KL(pi_old || pi_theta), all over valid tokens."""
    with torch.no_grad():
        frac = lambda flags: masked_mean(flags.to(logprobs.dtype), valid)  # noqa: E731
        return {
            "clip_frac_low": frac(out.clipped_low),
            "clip_frac_high": frac(out.clipped_high),
            "clip_frac_dual": frac(out.clipped_dual),
            "clip_frac": frac(out.clipped_low | out.clipped_high | out.clipped_dual),
            "ratio_mean": masked_mean(out.ratio, valid),
            # samples come from pi_old, so KL(pi_old || pi_theta) is k3 with the roles swapped
            "approx_kl": masked_mean(kl_k3(old, logprobs), valid),
        }
