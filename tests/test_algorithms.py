"""r1kit.algorithms against float64 references written the slow, obvious way (Python loops).

Properties: vectorised == loop (values, gradients, metrics) on random shapes/masks/options; masked
tokens get zero gradient even when the padding holds garbage; equal policies give KL 0 and ratio 1;
gradient accumulation with `denominator` equals
the full batch (and, documented, where it does not without it).
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from r1kit.algorithms import (
    AGG_MODES,
    KL_ESTIMATORS,
    POLICY_LOSSES,
    AlgorithmOptionError,
    agg_denominator,
    agg_loss,
    entropy_from_logits,
    high_entropy_mask,
    kl_reward_penalty,
    mask_truncated_rows,
    overlong_penalty,
    policy_objective,
    validate_algorithm_options,
)
from r1kit.types import R1KitError

SETTINGS = settings(max_examples=50, deadline=None)
F64 = torch.float64
NORM_CONST = 8.0  # Dr. GRPO's constant, for the 'seq-mean-token-sum-norm' mode


# ----------------------------------------------------------------------------- loop references
def ref_agg(values, mask, mode, norm_const=NORM_CONST, denominator=None):
    """values: nested lists of scalars (or tensors), mask [N, T] bool tensor."""
    n, t = mask.shape
    if mode == "token-mean":
        total, count = 0.0, 0
        for i in range(n):
            for j in range(t):
                if mask[i, j]:
                    total, count = total + values[i][j], count + 1
        denom = count if denominator is None else denominator
        return total / denom if denom else total * 0.0
    total, rows = 0.0, 0
    for i in range(n):
        cols = [j for j in range(t) if mask[i, j]]
        if not cols:
            continue
        rows += 1
        row_sum = sum(values[i][j] for j in cols)
        if mode == "seq-mean-token-mean":
            total = total + row_sum / len(cols)
        elif mode == "seq-mean-token-sum":
            total = total + row_sum
        else:
            total = total + row_sum / norm_const
    denom = rows if denominator is None else denominator
    return total / denom if denom else total * 0.0


def ref_kl(lp, ref, name):
    """lp, ref: 0-d tensors (lp may carry grad)."""
    if name == "k1":
        return lp - ref
    if name == "k2":
        return 0.5 * (lp - ref) ** 2
    log_r = ref - lp
    if name == "low_var_kl":
        log_r = torch.clamp(log_r, -20, 20)
        return torch.clamp(torch.exp(log_r) - log_r - 1, -10, 10)
    return torch.exp(log_r) - log_r - 1


def ref_token_loss(lp, old, a, loss_type, cl, ch, c, seq_ratio=None):
    """Per-token loss (0-d tensor with grad) and its clip flags (low, high, dual)."""
    if loss_type == "reinforce":
        # -A log pi, shifted by a constant so that its value is -A (the stop-gradient form)
        return -a * lp + a * lp.detach() - a, (False, False, False)
    if loss_type == "gspo":
        # value s_i, gradient s_i * grad log pi_t (GSPO-token)
        r = seq_ratio * (1 + lp - lp.detach())
    else:
        r = torch.exp(lp - old)
    rv = r.item()
    unclipped, clipped = r * a, torch.clamp(r, 1 - cl, 1 + ch) * a
    obj = unclipped if unclipped.item() <= clipped.item() else clipped
    low, high, dual = rv < 1 - cl and a < 0, rv > 1 + ch and a > 0, False
    if loss_type == "dual_clip" and a < 0 and obj.item() < c * a:
        obj, dual = obj * 0 + c * a, True
    return -obj, (low, high, dual)


def ref_objective(b, o):
    """The full loss and metrics, token by token. b: batch dict, o: option dict."""
    lp, old, adv, mask = b["logprobs"], b["old"], b["adv"], b["mask"]
    n, t = mask.shape
    pg = [[0.0] * t for _ in range(n)]
    kl = [[0.0] * t for _ in range(n)]
    flags = {"low": 0, "high": 0, "dual": 0, "any": 0}
    ratios, approx, gaps, count, capped = 0.0, 0.0, [], 0, 0
    for i in range(n):
        cols = [j for j in range(t) if mask[i, j]]
        seq_ratio = None
        if cols:
            seq_ratio = math.exp(sum(lp[i, j].item() - old[i, j].item() for j in cols) / len(cols))
        for j in cols:
            a = adv[i].item()
            term, (low, high, dual) = ref_token_loss(lp[i, j], old[i, j].item(), a, o["loss_type"],
                                                     o["clip_low"], o["clip_high"], o["clip_ratio_c"], seq_ratio)
            gap = old[i, j].item() - b["sampler"][i, j].item()
            if o["tis_cap"] is not None:
                term = term * min(math.exp(gap), o["tis_cap"])
                capped += math.exp(gap) > o["tis_cap"]
            pg[i][j] = term
            kl[i][j] = ref_kl(lp[i, j], b["ref"][i, j], o["kl_estimator"])
            for key, flag in (("low", low), ("high", high), ("dual", dual), ("any", low or high or dual)):
                flags[key] += flag
            r_tok = seq_ratio if o["loss_type"] == "gspo" else math.exp(lp[i, j].item() - old[i, j].item())
            ratios += r_tok
            d = lp[i, j].item() - old[i, j].item()  # approx_kl: KL(old || new) by k3 with r = pi / pi_old
            approx += math.exp(d) - d - 1
            gaps.append(abs(gap))
            count += 1
    agg = lambda v: ref_agg(v, mask, o["agg_mode"])  # noqa: E731
    loss = agg(pg) + o["beta"] * agg(kl) - o["entropy_coef"] * agg(
        [[b["entropy"][i, j] for j in range(t)] for i in range(n)])
    c = max(count, 1)
    metrics = {
        "pg_loss": _f(agg(pg)), "clip_frac_low": flags["low"] / c, "clip_frac_high": flags["high"] / c,
        "clip_frac_dual": flags["dual"] / c, "clip_frac": flags["any"] / c, "ratio_mean": ratios / c,
        "approx_kl": approx / c, "kl": sum(_f(kl[i][j]) for i in range(n) for j in range(t)) / c,
        "entropy": sum(b["entropy"][i, j].item() for i in range(n) for j in range(t) if mask[i, j]) / c,
        "logprob_mismatch_mean": sum(gaps) / c, "logprob_mismatch_max": max(gaps, default=0.0),
    }
    if o["tis_cap"] is not None:
        metrics["tis_capped_frac"] = capped / c
    return loss, metrics


def _f(x):
    return float(x.detach()) if torch.is_tensor(x) else float(x)


# ----------------------------------------------------------------------------- data
def make_batch(seed, n, t, p_valid=0.7, spread=0.3):
    g = torch.Generator().manual_seed(seed)
    logprobs = -3 * torch.rand(n, t, generator=g, dtype=F64)
    mask = torch.rand(n, t, generator=g, dtype=F64) < p_valid
    return {
        "logprobs": logprobs.requires_grad_(),
        "old": logprobs.detach() + spread * torch.randn(n, t, generator=g, dtype=F64),
        "ref": logprobs.detach() + 0.5 * torch.randn(n, t, generator=g, dtype=F64),
        "sampler": logprobs.detach() + 0.2 * torch.randn(n, t, generator=g, dtype=F64),
        "entropy": (2 * torch.rand(n, t, generator=g, dtype=F64)).requires_grad_(),
        "adv": torch.randn(n, generator=g, dtype=F64),
        "mask": mask,
    }


def run_objective(b, o, **overrides):
    kw = dict(ref_logprobs=b["ref"], loss_type=o["loss_type"], agg_mode=o["agg_mode"], clip_low=o["clip_low"],
              clip_high=o["clip_high"], clip_ratio_c=o["clip_ratio_c"], beta=o["beta"],
              kl_estimator=o["kl_estimator"], entropy=b["entropy"], entropy_coef=o["entropy_coef"],
              sampler_logprobs=b["sampler"], tis_cap=o["tis_cap"], norm_const=NORM_CONST)
    kw.update(overrides)
    return policy_objective(b["logprobs"], b["old"], b["adv"], b["mask"], **kw)


options = st.fixed_dictionaries({
    "loss_type": st.sampled_from(sorted(POLICY_LOSSES)),
    "agg_mode": st.sampled_from(AGG_MODES),
    "kl_estimator": st.sampled_from(sorted(KL_ESTIMATORS)),
    "clip_low": st.sampled_from([0.1, 0.2]),
    "clip_high": st.sampled_from([0.2, 0.28]),
    "beta": st.sampled_from([0.0, 0.04]),
    "entropy_coef": st.sampled_from([0.0, 0.01]),
    "tis_cap": st.sampled_from([None, 1.5]),
})


def with_c(o):
    return {**o, "clip_ratio_c": 3.0 if o["loss_type"] == "dual_clip" else None}


def grads(loss, *leaves):
    """d loss / d leaf for each leaf, zeros where the loss does not depend on it."""
    if not (torch.is_tensor(loss) and loss.requires_grad):
        return tuple(torch.zeros_like(x) for x in leaves)
    got = torch.autograd.grad(loss, leaves, allow_unused=True)
    return tuple(torch.zeros_like(x) if g is None else g for g, x in zip(got, leaves))


# ----------------------------------------------------------------------------- policy objective
@SETTINGS
@given(seed=st.integers(0, 10**6), n=st.integers(1, 6), t=st.integers(1, 8), o=options)
def test_objective_matches_loop_reference(seed, n, t, o):
    o = with_c(o)
    b = make_batch(seed, n, t)
    loss, metrics = run_objective(b, o)
    ref_loss, ref_metrics = ref_objective(b, o)
    assert torch.isfinite(loss)
    assert loss.item() == pytest.approx(_f(ref_loss), abs=1e-10)
    for got, want in zip(grads(loss, b["logprobs"], b["entropy"]), grads(ref_loss, b["logprobs"], b["entropy"])):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-9)
    for key, value in metrics.items():
        assert not value.requires_grad
        assert value.item() == pytest.approx(ref_metrics[key], abs=1e-10), key


@SETTINGS
@given(seed=st.integers(0, 10**6), n=st.integers(1, 5), t=st.integers(1, 7), o=options,
       junk=st.sampled_from([float("-inf"), float("nan"), 1e6, -1e6]))
def test_masked_tokens_get_zero_gradient_whatever_the_padding_holds(seed, n, t, o, junk):
    o = with_c(o)
    b = make_batch(seed, n, t)
    pad = ~b["mask"]
    for key in ("old", "ref", "sampler"):
        b[key] = b[key].masked_fill(pad, junk)
    b["logprobs"] = b["logprobs"].detach().masked_fill(pad, junk).requires_grad_()
    b["entropy"] = b["entropy"].detach().masked_fill(pad, junk).requires_grad_()
    loss, metrics = run_objective(b, o)
    assert torch.isfinite(loss)
    assert all(torch.isfinite(v) for v in metrics.values())
    for g in grads(loss, b["logprobs"], b["entropy"]):
        assert torch.isfinite(g).all() and (g[pad] == 0).all()


@SETTINGS
@given(seed=st.integers(0, 10**6), n=st.integers(1, 5), t=st.integers(1, 7), o=options)
def test_equal_policies_give_zero_kl_and_unit_ratio(seed, n, t, o):
    o = with_c(o)
    b = make_batch(seed, n, t)
    same = b["logprobs"].detach()
    b.update(old=same, ref=same, sampler=same)
    loss, m = run_objective(b, o)
    assert m["kl"].item() == 0.0 and m["approx_kl"].item() == 0.0 and m["logprob_mismatch_max"].item() == 0.0
    if b["mask"].any():
        assert m["ratio_mean"].item() == pytest.approx(1.0, abs=1e-12)
    assert m["clip_frac"].item() == 0.0
    # on-policy, ratio 1: every variant's surrogate is -A per token (TIS weight is 1 too)
    per_token = (-b["adv"][:, None]).expand(n, t)
    assert m["pg_loss"].item() == pytest.approx(agg_loss(per_token, b["mask"], o["agg_mode"],
                                                         norm_const=NORM_CONST).item(), abs=1e-12)


@pytest.mark.parametrize("seed", range(5))
def test_gspo_equals_the_sequence_level_objective(seed):
    """GSPO-token + seq-mean-token-mean == (1/S) sum_i -min(s_i A_i, clip(s_i) A_i), value and gradient."""
    b = make_batch(seed, 6, 7, spread=0.05)
    lp, old, mask, adv = b["logprobs"], b["old"], b["mask"], b["adv"]
    loss, _ = policy_objective(lp, old, adv, mask, loss_type="gspo", clip_low=0.02, clip_high=0.03)
    terms = []
    for i in range(6):
        cols = [j for j in range(7) if mask[i, j]]
        if cols:
            s = torch.exp(sum(lp[i, j] - old[i, j] for j in cols) / len(cols))
            terms.append(-torch.minimum(s * adv[i], torch.clamp(s, 0.98, 1.03) * adv[i]))
    want = sum(terms) / max(len(terms), 1)
    assert loss.item() == pytest.approx(_f(want), abs=1e-12)
    torch.testing.assert_close(grads(loss, lp)[0], grads(want, lp)[0], atol=1e-12, rtol=0)


def test_dual_clip_bounds_negative_advantage_loss_and_stops_its_gradient():
    lp = torch.tensor([[math.log(5.0), math.log(1.1)]], dtype=F64, requires_grad=True)
    old = torch.zeros(1, 2, dtype=F64)
    adv = torch.tensor([-2.0], dtype=F64)
    mask = torch.ones(1, 2, dtype=torch.bool)
    loss, m = policy_objective(lp, old, adv, mask, loss_type="dual_clip", clip_ratio_c=3.0, agg_mode="token-mean")
    plain, _ = policy_objective(lp, old, adv, mask, loss_type="grpo", agg_mode="token-mean")
    # token 0: ratio 5 > c = 3, so its loss is capped at c*|A|, where plain GRPO gives 5*|A|
    assert loss.item() == pytest.approx((3.0 * 2.0 + 1.1 * 2.0) / 2)
    assert plain.item() == pytest.approx((5.0 * 2.0 + 1.1 * 2.0) / 2)
    assert grads(loss, lp)[0][0, 0].item() == 0.0 and grads(plain, lp)[0][0, 0].item() != 0.0
    assert m["clip_frac_dual"].item() == 0.5 and m["clip_frac"].item() == 0.5


def test_reinforce_gradient_is_advantage_times_score():
    b = make_batch(3, 4, 5)
    loss, _ = policy_objective(b["logprobs"], b["old"], b["adv"], b["mask"], loss_type="reinforce",
                               agg_mode="token-mean")
    manual = -(b["adv"][:, None] * b["logprobs"])[b["mask"]].sum() / b["mask"].sum()
    torch.testing.assert_close(grads(loss, b["logprobs"])[0], grads(manual, b["logprobs"])[0])


def test_beta_zero_needs_no_reference_and_beta_positive_does():
    b = make_batch(0, 3, 4)
    loss, m = policy_objective(b["logprobs"], b["old"], b["adv"], b["mask"])
    assert torch.isfinite(loss) and "kl" not in m and "entropy" not in m and "logprob_mismatch_mean" not in m
    with pytest.raises(ValueError, match="ref_logprobs"):
        policy_objective(b["logprobs"], b["old"], b["adv"], b["mask"], beta=0.1)
    with pytest.raises(ValueError, match="entropy"):
        policy_objective(b["logprobs"], b["old"], b["adv"], b["mask"], entropy_coef=0.1)
    with pytest.raises(ValueError, match="sampler_logprobs"):
        policy_objective(b["logprobs"], b["old"], b["adv"], b["mask"], tis_cap=2.0)
    with pytest.raises(ValueError, match="advantages"):
        policy_objective(b["logprobs"], b["old"], b["adv"][:2], b["mask"])
    with pytest.raises(ValueError, match="old_logprobs"):
        policy_objective(b["logprobs"], b["old"][:, :2], b["adv"], b["mask"])


def test_tis_weights_are_capped_and_carry_no_gradient():
    b = make_batch(1, 4, 6)
    b["sampler"] = b["old"] - 2.0  # pi_old / pi_sampler = e^2 > cap everywhere
    common = dict(agg_mode="token-mean", loss_type="reinforce")
    plain, _ = policy_objective(b["logprobs"], b["old"], b["adv"], b["mask"], **common)
    capped, m = policy_objective(b["logprobs"], b["old"], b["adv"], b["mask"], sampler_logprobs=b["sampler"],
                                 tis_cap=1.5, **common)
    assert capped.item() == pytest.approx(1.5 * plain.item())
    torch.testing.assert_close(grads(capped, b["logprobs"])[0], 1.5 * grads(plain, b["logprobs"])[0])
    assert m["logprob_mismatch_mean"].item() == pytest.approx(2.0)
    assert m["logprob_mismatch_max"].item() == pytest.approx(2.0)


# ----------------------------------------------------------------------------- aggregation
@SETTINGS
@given(seed=st.integers(0, 10**6), n=st.integers(1, 6), t=st.integers(1, 8), mode=st.sampled_from(AGG_MODES))
def test_agg_loss_matches_loop(seed, n, t, mode):
    b = make_batch(seed, n, t, p_valid=0.6)
    b["mask"][0] = False  # always one empty row: it must count in no denominator
    values = b["old"]
    got = agg_loss(values, b["mask"], mode, norm_const=NORM_CONST)
    want = ref_agg([[values[i, j].item() for j in range(t)] for i in range(n)], b["mask"], mode)
    assert got.item() == pytest.approx(want, abs=1e-12)


def _accumulate(b, o, micro_rows, denominator_from_full: bool):
    """Sum of the micro-batch losses (each trimmed to its own longest row) and the accumulated grads."""
    lp, ent, mask = b["logprobs"], b["entropy"], b["mask"]
    full_den = agg_denominator(mask, o["agg_mode"]) if denominator_from_full else None
    total, g_lp, g_ent = 0.0, torch.zeros_like(lp), torch.zeros_like(ent)
    for rows in micro_rows:
        lengths = mask[rows].nonzero()[:, 1]
        width = int(lengths.max()) + 1 if lengths.numel() else 1  # trimmed padding differs per micro-batch
        sub = {k: (v[rows, :width] if v.dim() == 2 else v[rows]) for k, v in b.items()}
        loss, _ = run_objective(sub, o, denominator=full_den)
        if not denominator_from_full:
            loss = loss / len(micro_rows)  # the naive recipe: average the micro-batch means
        d_lp, d_ent = grads(loss, lp, ent)
        total += loss.item()
        g_lp, g_ent = g_lp + d_lp, g_ent + d_ent
    return total, g_lp, g_ent


@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize("loss_type", sorted(POLICY_LOSSES))
def test_gradient_accumulation_1x8_equals_8x1_with_denominator(mode, loss_type):
    o = with_c(dict(loss_type=loss_type, agg_mode=mode, kl_estimator="k3", clip_low=0.2, clip_high=0.28,
                    beta=0.04, entropy_coef=0.01, tis_cap=1.5))
    b = make_batch(7, 8, 6, p_valid=0.6)
    b["mask"][2] = False  # an empty row (e.g. filtered as truncated) must not count
    full, _ = run_objective(b, o)
    g_lp, g_ent = grads(full, b["logprobs"], b["entropy"])
    total, acc_lp, acc_ent = _accumulate(b, o, [[i] for i in range(8)], denominator_from_full=True)
    assert total == pytest.approx(full.item(), abs=1e-6)
    torch.testing.assert_close(acc_lp, g_lp, atol=1e-6, rtol=0)
    torch.testing.assert_close(acc_ent, g_ent, atol=1e-6, rtol=0)


def test_gradient_accumulation_without_denominator_where_it_breaks_and_where_it_holds():
    """Without `denominator`, averaging micro-batch losses re-weights tokens under token-mean (a short
    sequence alone in a micro-batch gets its own full weight), so it differs from the full batch;
    seq-mean-token-mean survives only because every micro-batch has the same number of non-empty rows."""
    base = dict(loss_type="grpo", kl_estimator="k3", clip_low=0.2, clip_high=0.2, beta=0.0, entropy_coef=0.0,
                tis_cap=None, clip_ratio_c=None)
    b = make_batch(11, 8, 6, p_valid=1.0)
    b["mask"] = torch.arange(6)[None, :] < torch.tensor([1, 6, 2, 5, 3, 6, 1, 4])[:, None]  # unequal lengths
    micro = [[i] for i in range(8)]
    token = {**base, "agg_mode": "token-mean"}
    full_grad = grads(run_objective(b, token)[0], b["logprobs"])[0]
    assert not torch.allclose(_accumulate(b, token, micro, denominator_from_full=False)[1], full_grad, atol=1e-6)
    assert torch.allclose(_accumulate(b, token, micro, denominator_from_full=True)[1], full_grad, atol=1e-6)
    seq = {**base, "agg_mode": "seq-mean-token-mean"}
    full_grad = grads(run_objective(b, seq)[0], b["logprobs"])[0]
    assert torch.allclose(_accumulate(b, seq, micro, denominator_from_full=False)[1], full_grad, atol=1e-6)


def test_agg_loss_errors_and_empty_mask():
    v = torch.randn(2, 3, dtype=F64, requires_grad=True)
    empty = torch.zeros(2, 3, dtype=torch.bool)
    for mode in AGG_MODES:
        out = agg_loss(v, empty, mode, norm_const=NORM_CONST)
        assert out.item() == 0.0 and torch.isfinite(grads(out, v)[0]).all()
    with pytest.raises(ValueError, match="norm_const"):
        agg_loss(v, ~empty, "seq-mean-token-sum-norm")
    with pytest.raises(ValueError, match="allowed"):
        agg_loss(v, ~empty, "token-sum")
    with pytest.raises(ValueError, match="same shape"):
        agg_loss(v, ~empty[:, :2], "token-mean")


# ----------------------------------------------------------------------------- KL, entropy, overlong
@SETTINGS
@given(seed=st.integers(0, 10**6), n=st.integers(1, 4), t=st.integers(1, 6), est=st.sampled_from(sorted(KL_ESTIMATORS)))
def test_kl_estimators_and_reward_penalty_match_loop(seed, n, t, est):
    b = make_batch(seed, n, t)
    lp, ref, mask = b["logprobs"].detach(), b["ref"], b["mask"]
    got = KL_ESTIMATORS[est](lp, ref)
    for i in range(n):
        for j in range(t):
            assert got[i, j].item() == pytest.approx(ref_kl(lp[i, j], ref[i, j], est).item(), abs=1e-12)
    pen = kl_reward_penalty(b["logprobs"], ref, mask, beta=0.1, estimator=est)
    assert not pen.requires_grad
    want = [0.1 * sum(ref_kl(lp[i, j], ref[i, j], est).item() for j in range(t) if mask[i, j]) for i in range(n)]
    torch.testing.assert_close(pen, torch.tensor(want, dtype=F64), atol=1e-12, rtol=0)
    if est != "k1":
        assert (got >= 0).all()


def test_low_var_kl_stays_finite_where_k3_overflows():
    lp, ref = torch.tensor([[-200.0]]), torch.tensor([[0.0]])
    assert not torch.isfinite(KL_ESTIMATORS["k3"](lp, ref)).all()
    assert KL_ESTIMATORS["low_var_kl"](lp, ref).item() == 10.0


@SETTINGS
@given(seed=st.integers(0, 10**6), n=st.integers(1, 3), t=st.integers(1, 5), v=st.integers(1, 9),
       chunk=st.integers(1, 7))
def test_entropy_from_logits_matches_loop(seed, n, t, v, chunk):
    logits = 3 * torch.randn(n, t, v, generator=torch.Generator().manual_seed(seed), dtype=F64)
    got = entropy_from_logits(logits, chunk_size=chunk)
    for i in range(n):
        for j in range(t):
            z = logits[i, j].tolist()
            m = max(z)
            lse = m + math.log(sum(math.exp(x - m) for x in z))
            want = -sum(math.exp(x - lse) * (x - lse) for x in z)
            assert got[i, j].item() == pytest.approx(want, abs=1e-10)
    assert (got >= -1e-12).all() and (got <= math.log(v) + 1e-9).all()


def test_entropy_from_bf16_logits_is_float32_and_close():
    logits = torch.randn(2, 3, 50, generator=torch.Generator().manual_seed(0))
    got = entropy_from_logits(logits.bfloat16(), chunk_size=4)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, entropy_from_logits(logits.double()).float(), atol=0.05, rtol=0)


@SETTINGS
@given(seed=st.integers(0, 10**6), n=st.integers(1, 4), t=st.integers(1, 6), q=st.sampled_from([0.1, 0.2, 0.5, 1.0]))
def test_high_entropy_mask_keeps_the_top_fraction(seed, n, t, q):
    b = make_batch(seed, n, t)
    ent, mask = b["entropy"], b["mask"]
    got = high_entropy_mask(ent, mask, q)
    valid = sorted((ent[i, j].item() for i in range(n) for j in range(t) if mask[i, j]), reverse=True)
    if not valid:
        assert not got.any()
        return
    k = max(1, math.ceil(round(q * len(valid), 9)))
    threshold = valid[k - 1]
    for i in range(n):
        for j in range(t):
            assert bool(got[i, j]) == bool(mask[i, j] and ent[i, j].item() >= threshold)
    assert int(got.sum()) >= k


@pytest.mark.parametrize("max_len,cache_len", [(10, 4), (10, 0), (10, 10), (1, 1)])
def test_overlong_penalty_matches_piecewise_definition(max_len, cache_len):
    lengths = list(range(0, max_len + 4))
    got = overlong_penalty(torch.tensor(lengths), max_len, cache_len)
    for length, value in zip(lengths, got.tolist()):
        if length <= max_len - cache_len:
            want = 0.0
        elif length <= max_len:
            want = ((max_len - cache_len) - length) / cache_len
        else:
            want = -1.0
        assert value == pytest.approx(want)
    assert got.min() >= -1 and got.max() <= 0
    with pytest.raises(ValueError, match="cache_len"):
        overlong_penalty(torch.tensor(lengths), 5, 6)


def test_mask_truncated_rows():
    mask = torch.ones(3, 4)
    out = mask_truncated_rows(mask, torch.tensor([False, True, False]))
    assert out.tolist() == [[1] * 4, [0] * 4, [1] * 4] and out.dtype == mask.dtype
    assert mask_truncated_rows(mask.bool(), torch.tensor([True, False, False])).sum() == 8
    with pytest.raises(ValueError, match="truncated"):
        mask_truncated_rows(mask, torch.tensor([True]))


# ----------------------------------------------------------------------------- validation
@pytest.mark.parametrize("kwargs,field", [
    ({"loss_type": "ppo2"}, "loss_type"),
    ({"agg_mode": "mean"}, "agg_mode"),
    ({"advantage_estimator": "gae"}, "advantage_estimator"),
    ({"kl_estimator": "k4"}, "kl_estimator"),
    ({"clip_low": -0.1}, "clip_low"),
    ({"clip_low": 1.0, "clip_high": 2.0}, "clip_low"),
    ({"clip_high": -0.2}, "clip_high"),
    ({"clip_low": 0.3, "clip_high": 0.2}, "clip_high"),
    ({"beta": -0.01}, "beta"),
    ({"beta": float("nan")}, "beta"),
    ({"loss_type": "dual_clip"}, "clip_ratio_c"),
    ({"loss_type": "dual_clip", "clip_ratio_c": 0.5}, "clip_ratio_c"),
    ({"clip_ratio_c": 3.0}, "clip_ratio_c"),
    ({"entropy_coef": -1.0}, "entropy_coef"),
    ({"tis_cap": 0.0}, "tis_cap"),
    ({"agg_mode": "seq-mean-token-sum-norm"}, "norm_const"),
])
def test_validation_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field) as info:
        validate_algorithm_options(**kwargs)
    assert isinstance(info.value, R1KitError) and isinstance(info.value, AlgorithmOptionError)
    if field in ("loss_type", "agg_mode", "advantage_estimator", "kl_estimator"):
        assert "allowed" in str(info.value)


def test_validation_accepts_the_r1_default_and_every_registered_name():
    validate_algorithm_options()  # R1 paper: grpo / seq-mean-token-mean / grpo / k3
    for loss in POLICY_LOSSES:
        for mode in AGG_MODES:
            validate_algorithm_options(loss, mode, clip_ratio_c=3.0 if loss == "dual_clip" else None,
                                       norm_const=100.0, clip_high=0.28)
    b = make_batch(0, 2, 3)
    with pytest.raises(ValueError, match="loss_type"):
        policy_objective(b["logprobs"], b["old"], b["adv"], b["mask"], loss_type="dapo")
