"""The GRPO algorithm family as pure tensor maths: advantages, policy losses, KL, aggregation.

No config object enters here; every knob is an explicit scalar, and every variant is a lookup-table
entry with one shared signature, so the trainer never branches on a variant's name.

Variant                  Equation (per token i,t unless said)                       Paper
-----------------------  ---------------------------------------------------------  ---------------------------
ADVANTAGE_ESTIMATORS
  grpo                   (r_i - mean_g r) / (std_g r + eps)                          DeepSeekMath; R1 eq. 3
  dr_grpo                r_i - mean_g r                                              Dr. GRPO (Liu et al. 2025)
  batch_std              (r_i - mean_g r) / (std_batch r + eps)                      Tricks or Traps (Liu et al. 2025)
  rloo                   r_i - mean_{j != i} r_j                                     RLOO (Kool 2019; Ahmadian 2024)
  reinforce_pp_baseline  whiten_batch(r_i - mean_g r)                                REINFORCE++ (Hu et al. 2025)
POLICY_LOSSES
  grpo                   -min(r A, clip(r, 1-clip_low, 1+clip_high) A)               PPO; GRPO; DAPO clip-higher
  dual_clip              as grpo, but -max(min(r A, clip(r) A), c A) when A < 0     Dual-clip PPO (Ye et al. 2020)
  gspo                   as grpo with r := exp(mean_t log(pi/pi_old)) per sequence   GSPO (Zheng et al. 2025)
  reinforce              -A log pi (stop-gradient ratio form, no clip)               REINFORCE (Williams 1992)
KL_ESTIMATORS            (log r = ref - logp; estimate KL(pi_theta || pi_ref))
  k1 / k2 / k3           -log r / (log r)^2 / 2 / r - log r - 1                       Schulman 2020; k3 = R1 eq. 2
  low_var_kl             k3, log r clamped to [-20, 20], result to [-10, 10]         verl
AGG_MODES                seq-mean-token-mean (GRPO), token-mean (DAPO), seq-mean-token-sum,
                         seq-mean-token-sum-norm (Dr. GRPO, / norm_const)
Also: entropy bonus and the high-entropy "forking token" mask (Wang et al. 2025, 80/20), truncated
importance sampling for sampler/trainer mismatch (Yao et al. 2025), DAPO overlong penalty, overlong
filtering and the dynamic-sampling test.

The R1 paper default is loss "grpo", agg "seq-mean-token-mean", advantage "grpo", kl "k3". Where our
defaults depart from the paper, and why:
  * The R1 paper (eq. 1) writes the ratio per sequence for brevity; like GRPO's origin (DeepSeekMath
    eq. 3) and every public implementation, we apply ratio and clip per token with 1/|o_i|.
  * std in the GRPO advantage is unbiased (Bessel), as torch.std in TRL; the paper does not say.
    eps = 1e-6 is added to it, and a constant group gets exactly 0 (the paper leaves 0/0 open).
  * beta defaults to 0 in `policy_objective` (no reference model, as Dr. GRPO and DAPO do); the
    paper trains with a KL term: pass beta > 0 and ref_logprobs to get it.
  * log-ratios are clamped to [-20, 20] before exp, to keep one wild token from making NaN.

Run the tests: python -m pytest -q tests/test_algorithms.py
"""
from r1kit.algorithms.advantages import (
    ADVANTAGE_ESTIMATORS,
    compute_advantages,
    mask_truncated_rows,
    nonconstant_groups,
    overlong_penalty,
)
from r1kit.algorithms.aggregation import AGG_MODES, agg_denominator, agg_loss, masked_mean
from r1kit.algorithms.objective import AlgorithmOptionError, policy_objective, validate_algorithm_options
from r1kit.algorithms.policy_losses import POLICY_LOSSES, PolicyLossOutput
from r1kit.algorithms.regularizers import (
    KL_ESTIMATORS,
    entropy_from_logits,
    high_entropy_mask,
    kl_reward_penalty,
    logprob_mismatch,
    tis_weights,
)

__all__ = [
    "ADVANTAGE_ESTIMATORS", "AGG_MODES", "KL_ESTIMATORS", "POLICY_LOSSES",
    "AlgorithmOptionError", "PolicyLossOutput",
    "agg_denominator", "agg_loss", "compute_advantages", "entropy_from_logits", "high_entropy_mask",
    "kl_reward_penalty", "logprob_mismatch", "mask_truncated_rows", "masked_mean", "nonconstant_groups",
    "overlong_penalty", "policy_objective", "tis_weights", "validate_algorithm_options",
]
