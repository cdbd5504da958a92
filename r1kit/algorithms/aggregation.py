"""How a per-token loss [N, T] becomes one scalar: every normalisation has a name (`AGG_MODES`).

The choice matters more than it looks: it decides how much each token and each sequence weighs in
the gradient, and whether gradient accumulation reproduces the full-batch gradient.

  seq-mean-token-mean       (1/S) sum_i (1/|o_i|) sum_t l_it      GRPO as in DeepSeekMath eq. 3 / R1
  token-mean                (1/sum_i |o_i|) sum_i sum_t l_it      DAPO token-level loss (Yu et al. 2025)
  seq-mean-token-sum        (1/S) sum_i sum_t l_it                plain sum per sequence
  seq-mean-token-sum-norm   (1/S) sum_i sum_t l_it / C            Dr. GRPO (Liu et al. 2025), C = max tokens

S counts the sequences with at least one valid token: a row masked out entirely (e.g. a truncated
completion dropped by DAPO's overlong filter) must not dilute the others' gradient.

Gradient accumulation: pass `denominator=agg_denominator(full_batch_mask, mode)` to every micro-batch
and the *sum* of the micro-batch losses equals the full-batch loss, exactly, whatever the padding.
"""
from __future__ import annotations

import torch

AGG_MODES = ("seq-mean-token-mean", "token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `values` over the positions where `mask` is set; 0 (not NaN) when none is.

    values, mask: same shape (mask bool or float 0/1). Returns a scalar.
    """
    mask = mask.to(values.dtype)
    picked = torch.where(mask > 0, values, torch.zeros_like(values))  # where, not *, so NaN padding stays out
    return picked.sum() / mask.sum().clamp(min=1.0)


def agg_denominator(mask: torch.Tensor, mode: str) -> torch.Tensor:
    """The normaliser `agg_loss` divides by for this batch: valid tokens (token-mean) or non-empty rows.

    Compute it once on the FULL batch's mask [N, T] and pass it to each micro-batch's `agg_loss`
    so that gradient accumulation is exact. Returns a float scalar tensor (not clamped).
    """
    _check_mode(mode)
    mask = mask.to(torch.float64) if not mask.is_floating_point() else mask
    if mode == "token-mean":
        return mask.sum()
    return (mask.sum(-1) > 0).to(mask.dtype).sum()


def _seq_token_mean(values: torch.Tensor, mask: torch.Tensor, norm_const: float | None) -> torch.Tensor:
    return (values * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)  # [N]


def _seq_token_sum(values: torch.Tensor, mask: torch.Tensor, norm_const: float | None) -> torch.Tensor:
    return (values * mask).sum(-1)  # [N]


def _seq_token_sum_norm(values: torch.Tensor, mask: torch.Tensor, norm_const: float | None) -> torch.Tensor:
    if norm_const is None or not norm_const > 0:
        raise ValueError(f"agg mode 'seq-mean-token-sum-norm' needs norm_const > 0 (Dr. GRPO: the max "
                         f"completion length), got {norm_const!r}")
    return (values * mask).sum(-1) / norm_const  # [N]


def _token_sum(values: torch.Tensor, mask: torch.Tensor, norm_const: float | None) -> torch.Tensor:
    return (values * mask).sum().reshape(1)  # [1]: summed over every valid token, normalised below


# mode -> per-row (or whole-batch) numerator; `agg_loss` divides the sum of it by the denominator.
_NUMERATORS = {
    "seq-mean-token-mean": _seq_token_mean,
    "token-mean": _token_sum,
    "seq-mean-token-sum": _seq_token_sum,
    "seq-mean-token-sum-norm": _seq_token_sum_norm,
}


def _check_mode(mode: str) -> None:
    if mode not in _NUMERATORS:
        raise ValueError(f"agg_mode {mode!r} is unknown; allowed: {list(AGG_MODES)}")


def agg_loss(
    values: torch.Tensor,
    mask: torch.Tensor,
    mode: str,
    *,
    denominator: float | torch.Tensor | None = None,
    norm_const: float | None = None,
) -> torch.Tensor:
    """Reduce a per-token quantity to a scalar with the normalisation named by `mode` (see module doc).

    values: [N, T] float per-token losses; mask: [N, T] bool/float, 1 on tokens that count.
    denominator: the global normaliser, a count (`agg_denominator` of the full batch), for gradient
        accumulation; default: this batch's own. A zero denominator gives a loss of 0, not NaN.
    norm_const: Dr. GRPO's constant C, required by (and only read by) 'seq-mean-token-sum-norm'.
    Returns a scalar tensor.
    """
    _check_mode(mode)
    if values.shape != mask.shape or values.dim() != 2:
        raise ValueError(f"agg_loss needs values and mask of the same shape [N, T], got "
                         f"{tuple(values.shape)} and {tuple(mask.shape)}")
    mask = mask.to(values.dtype)  # [N, T]
    values = torch.where(mask > 0, values, torch.zeros_like(values))  # padding may hold inf/NaN
    numer = _NUMERATORS[mode](values, mask, norm_const).sum()  # scalar
    if denominator is None:
        denominator = agg_denominator(mask, mode)
    denominator = torch.as_tensor(denominator, dtype=values.dtype, device=values.device)
    # The denominator is a count, so clamping at 1 only changes the empty case (0 / 1 = 0, not NaN),
    # and does so without a host sync on GPU.
    return numer / denominator.clamp(min=1.0)
