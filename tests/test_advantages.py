"""r1kit.algorithms' advantage estimators against float64 loop references: every estimator on random
groups (hypothesis), constant groups give exactly zero (no float dust, never NaN), input errors."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from r1kit.algorithms import ADVANTAGE_ESTIMATORS, compute_advantages, nonconstant_groups

SETTINGS = settings(max_examples=50, deadline=None)
F64 = torch.float64


# ----------------------------------------------------------------------------- loop references
def ref_group_std(xs):
    if len(xs) < 2:
        return 0.0
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def ref_advantages(rewards, g, estimator, eps=1e-6):
    groups = [rewards[k : k + g] for k in range(0, len(rewards), g)]
    centred_all = [r - sum(gr) / g for gr in groups for r in gr]
    out = []
    for gr in groups:
        mean = sum(gr) / g
        for idx, r in enumerate(gr):
            if max(gr) == min(gr):
                out.append(0.0)
            elif estimator == "grpo":
                out.append((r - mean) / (ref_group_std(gr) + eps))
            elif estimator == "dr_grpo":
                out.append(r - mean)
            elif estimator == "batch_std":
                out.append((r - mean) / (ref_group_std(rewards) + eps))
            elif estimator == "rloo":
                out.append(r - (sum(gr) - r) / (g - 1))
            else:  # reinforce_pp_baseline
                bm = sum(centred_all) / len(centred_all)
                out.append(((r - mean) - bm) / (ref_group_std(centred_all) + eps))
    return out


# ----------------------------------------------------------------------------- tests
REWARD_VALUES = [0.0, 0.1, 0.7, 1.0, 1.1, -1.0, 1 / 3]  # 0.1 and 0.7 leave float dust in r - mean(r)


def _group(g):
    """A constant group half of the time (the case GRPO must map to exactly 0), else any rewards."""
    constant = st.sampled_from(REWARD_VALUES).map(lambda v: [v] * g)
    return st.one_of(constant, st.lists(st.sampled_from(REWARD_VALUES), min_size=g, max_size=g))


rewards_strategy = st.integers(1, 6).flatmap(lambda g: st.tuples(
    st.just(g), st.lists(_group(g), min_size=1, max_size=4).map(lambda gs: [r for gr in gs for r in gr])))


@SETTINGS
@given(gr=rewards_strategy, estimator=st.sampled_from(sorted(ADVANTAGE_ESTIMATORS)))
def test_advantages_match_loop_and_constant_groups_are_zero(gr, estimator):
    g, rewards = gr
    adv = compute_advantages(torch.tensor(rewards, dtype=F64), g, estimator)
    assert torch.isfinite(adv).all()
    want = ref_advantages(rewards, g, estimator)
    torch.testing.assert_close(adv, torch.tensor(want, dtype=F64), atol=1e-9, rtol=1e-9)
    for k in range(0, len(rewards), g):
        if len(set(rewards[k : k + g])) == 1:
            assert (adv[k : k + g] == 0).all()
    assert nonconstant_groups(torch.tensor(rewards), g).tolist() == [
        len(set(rewards[k : k + g])) > 1 for k in range(0, len(rewards), g)]


@pytest.mark.parametrize("estimator", sorted(ADVANTAGE_ESTIMATORS))
def test_constant_groups_give_exact_zero_not_float_dust(estimator):
    for g in range(1, 9):
        for v in REWARD_VALUES:
            rewards = torch.tensor([v] * g + [0.0, 1.0] * (g // 2) + [0.5] * (g % 2), dtype=F64)
            adv = compute_advantages(rewards, g, estimator)
            assert (adv[:g] == 0).all(), (g, v)
            assert torch.isfinite(adv).all()


def test_advantage_estimators_differ_where_they_should():
    r = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0])
    grpo, dr = compute_advantages(r, 4, "grpo"), compute_advantages(r, 4, "dr_grpo")
    assert (grpo.sign() == dr.sign()).all() and not torch.allclose(grpo, dr)
    torch.testing.assert_close(compute_advantages(r, 4, "rloo"), dr * 4 / 3)  # RLOO = G/(G-1) * centred
    # each group's advantages sum to zero for every estimator (a baseline, not a bias)
    for name in ADVANTAGE_ESTIMATORS:
        assert compute_advantages(r, 4, name).reshape(2, 4).sum(-1).abs().max() < 1e-6
    assert compute_advantages(torch.tensor([1, 0, 1, 1]), 2).dtype == torch.float32  # ints promoted


def test_advantage_input_errors():
    with pytest.raises(ValueError, match="groups of 3"):
        compute_advantages(torch.ones(4), 3)
    with pytest.raises(ValueError, match="non-finite"):
        compute_advantages(torch.tensor([1.0, float("nan")]), 2)
    with pytest.raises(ValueError, match="allowed"):
        compute_advantages(torch.ones(4), 2, "ppo")
    with pytest.raises(ValueError, match="1-D"):
        compute_advantages(torch.ones(2, 2), 2)
