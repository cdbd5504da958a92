"""Per-token policy-gradient losses, one shared signature, looked up by name in `POLICY_LOSSES`.

Each function takes
    logprobs [N, T] (with grad), old_logprobs [N, T], advantages [N], response_mask [N, T] float,
    *, clip_low, clip_high, clip_ratio_c
and returns a `PolicyLossOutput`: the per-token loss to MINIMISE [N, T] (aggregate it with
`agg_loss`), the importance ratio it used and bool clip indicators [N, T] for metrics. Values at
masked positions are meaningless; `agg_loss` ignores them.

The log-ratio is clamped to [-20, 20] before exp: beyond that the token is clipped (or, for a
negative advantage, would blow up the loss) and an inf would turn the whole batch into NaN.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch

_MAX_LOG_RATIO = 20.0


class PolicyLossOutput(NamedTuple):
    loss: torch.Tensor  # [N, T] per-token loss (negated surrogate objective)
    ratio: torch.Tensor  # [N, T] detached importance ratio used (sequence-level, broadcast, for GSPO)
    clipped_low: torch.Tensor  # [N, T] bool: ratio < 1 - clip_low with A < 0 (zero gradient)
    clipped_high: torch.Tensor  # [N, T] bool: ratio > 1 + clip_high with A > 0 (zero gradient)
    clipped_dual: torch.Tensor  # [N, T] bool: ratio > clip_ratio_c with A < 0 (dual-clip bound active)


PolicyLoss = Callable[..., PolicyLossOutput]


def _clipped_surrogate(
    ratio: torch.Tensor, adv: torch.Tensor, clip_low: float, clip_high: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate, negated: max(-r A, -clip(r, 1 - clip_low, 1 + clip_high) A).

    ratio [N, T] (with grad), adv [N, 1] -> loss [N, T], clipped_low [N, T], clipped_high [N, T].
    """
    clipped = ratio.clamp(1.0 - clip_low, 1.0 + clip_high)  # [N, T]
    loss = torch.maximum(-ratio * adv, -clipped * adv)  # [N, T]
    r = ratio.detach()
    return loss, (r < 1.0 - clip_low) & (adv < 0), (r > 1.0 + clip_high) & (adv > 0)


def _token_ratio(logprobs: torch.Tensor, old_logprobs: torch.Tensor) -> torch.Tensor:
    return torch.exp((logprobs - old_logprobs).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO))  # [N, T]


def grpo_loss(logprobs, old_logprobs, advantages, response_mask, *, clip_low, clip_high, clip_ratio_c=None):
    """PPO/GRPO clipped surrogate per token (Schulman et al. 2017; DeepSeekMath eq. 3; R1 paper eq. 1):

        L_it = -min(r_it A_i, clip(r_it, 1 - clip_low, 1 + clip_high) A_i),  r_it = pi(o_it) / pi_old(o_it)

    clip_high > clip_low is DAPO's clip-higher (Yu et al. 2025). Shapes: see module doc.
    """
    adv = advantages[:, None]  # [N, 1]
    ratio = _token_ratio(logprobs, old_logprobs)  # [N, T]
    loss, low, high = _clipped_surrogate(ratio, adv, clip_low, clip_high)
    return PolicyLossOutput(loss, ratio.detach(), low, high, torch.zeros_like(low))


def dual_clip_loss(logprobs, old_logprobs, advantages, response_mask, *, clip_low, clip_high, clip_ratio_c=None):
    """Dual-clip PPO (Ye et al. 2020, "Mastering Complex Control in MOBA Games"): for A < 0 the
    clipped surrogate is unbounded as r grows, so it is bounded below by c * A (c = clip_ratio_c > 1):

        L_it = -max(min(r A, clip(r, 1 - clip_low, 1 + clip_high) A), c A)   if A < 0, else as `grpo_loss`
    """
    if clip_ratio_c is None or not clip_ratio_c > 1.0:
        raise ValueError(f"loss_type 'dual_clip' needs clip_ratio_c > 1, got {clip_ratio_c!r}")
    adv = advantages[:, None]  # [N, 1]
    ratio = _token_ratio(logprobs, old_logprobs)  # [N, T]
    loss, low, high = _clipped_surrogate(ratio, adv, clip_low, clip_high)
    bound = -clip_ratio_c * adv  # [N, 1] loss ceiling for negative advantages
    dual = (adv < 0) & (loss.detach() > bound)  # [N, T]
    loss = torch.where(adv < 0, torch.minimum(loss, bound), loss)  # [N, T]
    return PolicyLossOutput(loss, ratio.detach(), low, high, dual)


def gspo_loss(logprobs, old_logprobs, advantages, response_mask, *, clip_low, clip_high, clip_ratio_c=None):
    """GSPO (Zheng et al. 2025, "Group Sequence Policy Optimization"): one length-normalised
    importance ratio per sequence, clipped per sequence:

        s_i = exp( (1/|o_i|) sum_t (log pi(o_it) - log pi_old(o_it)) )
        J   = (1/G) sum_i min(s_i A_i, clip(s_i, 1 - clip_low, 1 + clip_high) A_i)

    Written in the paper's GSPO-token form, s_it = sg[s_i] * pi(o_it) / sg[pi(o_it)]: equal to
    s_i in value and with gradient s_i * grad log pi(o_it), so aggregating the per-token loss with
    'seq-mean-token-mean' gives exactly the gradient of J. The paper's clip ranges are ~1e-4, not 0.2.
    """
    adv = advantages[:, None]  # [N, 1]
    mask = response_mask.to(logprobs.dtype)  # [N, T]
    log_ratio = torch.where(mask > 0, logprobs - old_logprobs, torch.zeros_like(logprobs))  # [N, T]
    seq_log_ratio = log_ratio.sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1.0)  # [N, 1]
    seq_log_ratio = seq_log_ratio.clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
    ratio = torch.exp(logprobs - logprobs.detach() + seq_log_ratio.detach())  # [N, T] value s_i everywhere
    loss, low, high = _clipped_surrogate(ratio, adv, clip_low, clip_high)
    return PolicyLossOutput(loss, ratio.detach(), low, high, torch.zeros_like(low))


def reinforce_loss(logprobs, old_logprobs, advantages, response_mask, *, clip_low, clip_high, clip_ratio_c=None):
    """Plain on-policy REINFORCE (Williams 1992): L_it = -A_i * log pi(o_it), in the equivalent
    stop-gradient form -A_i * exp(logp - sg[logp]) (value -A_i, gradient -A_i grad log pi), so the
    loss value does not depend on how unlikely the sample was. No clipping: use it with one update per
    batch (mu = 1). The reported ratio is pi / pi_old, a diagnostic of how off-policy the data is.
    """
    adv = advantages[:, None]  # [N, 1]
    loss = -adv * torch.exp(logprobs - logprobs.detach())  # [N, T]
    no_clip = torch.zeros(logprobs.shape, dtype=torch.bool, device=logprobs.device)  # [N, T]
    return PolicyLossOutput(loss, _token_ratio(logprobs, old_logprobs).detach(), no_clip, no_clip, no_clip)


POLICY_LOSSES: dict[str, PolicyLoss] = {
    "grpo": grpo_loss,
    "dual_clip": dual_clip_loss,
    "gspo": gspo_loss,
    "reinforce": reinforce_loss,
}
