"""`grpo.skip_zero_advantage`: rows whose advantage is exactly 0 (or that have no loss token) skip the update's
forward/backward. Their gradient in the full computation is exactly 0, so the update must be the same: checked
in float64 against the unskipped update (padded and packed forwards, micro-batches cutting groups, two
updates per batch, clipped ratios), an update where every row is skipped (AdamW must still step), and the
option's error paths.
"""
from __future__ import annotations

import pytest
import torch

from r1kit.config import RunConfig, load_config
from r1kit.policy import Policy
from r1kit.rewards.functions import RewardScores
from r1kit.tasks import make_task
from r1kit.trainers.grpo import GRPOTrainer, StepBatch
from r1kit.types import R1KitError, Rollout
from tests.helpers import tiny_pair
from tests.test_packed_forward import float64_rms_norm  # noqa: F401  autouse: RMSNorm in float64 too

P, G = 3, 4


def make_trainer(tmp_path, skip: bool, packed: bool, extra=()):
    model, tok = tiny_pair(layers=2)
    model = model.double()
    cfg = load_config(RunConfig, None, [
        "log.progress=false", "log.tensorboard=false", "log.save_every=0", "log.sample_every=0", "eval.every=0",
        f"grpo.prompts_per_step={P}", f"grpo.group_size={G}", "grpo.max_new_tokens=9", "grpo.steps=2",
        "grpo.updates_per_batch=2", "grpo.micro_batch_size=5", "grpo.lr=1e-2", "model.dtype=float64",
        f"grpo.skip_zero_advantage={str(skip).lower()}", f"grpo.packed_update={str(packed).lower()}",
        f"output_dir={tmp_path}", f"name=s{int(skip)}p{int(packed)}", *extra])
    return GRPOTrainer(cfg, Policy(model, tok, device="cpu"), make_task("arithmetic", min_digits=1, max_digits=2),
                       cfg.run_dir), tok


def make_batch(tok, advantages: torch.Tensor, seed: int = 0) -> StepBatch:
    """P prompts x G completions of random tokens (ragged, one empty), old logprobs off the policy's."""
    g = torch.Generator().manual_seed(seed)
    N, Tp, Tc = P * G, 7, 9
    vocab = len(tok)
    pids, pmask = torch.full((N, Tp), tok.pad_token_id), torch.zeros(N, Tp, dtype=torch.long)
    for p, n in enumerate((7, 4, 6)):
        pids[p * G:(p + 1) * G, Tp - n:] = torch.randint(3, vocab, (n,), generator=g)
        pmask[p * G:(p + 1) * G, Tp - n:] = 1
    lengths = torch.randint(1, Tc + 1, (N,), generator=g)
    lengths[5] = 0  # an empty completion: no loss token
    cids, cmask = torch.full((N, Tc), tok.pad_token_id), torch.zeros(N, Tc, dtype=torch.float64)
    for r, n in enumerate(lengths.tolist()):
        cids[r, :n], cmask[r, :n] = torch.randint(3, vocab, (n,), generator=g), 1
    old = (-3.0 + 0.5 * torch.randn(N, Tc, generator=g, dtype=torch.float64)) * cmask  # ratios far from 1: clipping
    ro = Rollout(pids, pmask, cids, cmask, old, torch.zeros(N, dtype=torch.bool), G)
    scores = RewardScores(torch.zeros(N, dtype=torch.float64), {})
    return StepBatch([None] * P, ro, [""] * N, scores, torch.zeros(N, dtype=torch.float64), advantages, old, cmask)


def weights(trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters()}


@pytest.mark.parametrize("packed", [False, True])
def test_skipping_zero_advantage_rows_gives_the_same_update_in_float64(tmp_path, packed):
    torch.set_num_threads(1)
    adv = torch.randn(P * G, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    adv[:G] = 0.0  # group 0: all rewards equal
    adv[2 * G + 1] = 0.0  # one row of group 2
    adv[5] = 0.7  # the empty row has an advantage but no loss token
    out = {}
    for skip in (False, True):
        trainer, tok = make_trainer(tmp_path, skip, packed)
        metrics = trainer.update(make_batch(tok, adv))
        out[skip] = metrics, weights(trainer), trainer.optimizer
    (ma, wa, oa), (mb, wb, ob) = out[False], out[True]
    assert mb["update_rows_frac"] == (P * G - G - 2) / (P * G)  # group 0, one zero row and the empty row skipped
    moved = max(float((wa[n] - w).abs().max()) for n, w in weights(make_trainer(tmp_path, False, packed)[0]).items())
    assert moved > 1e-3  # the update did something
    for n in wa:
        assert (wa[n] - wb[n]).abs().max() <= 1e-12, n
    for key in ("loss", "pg_loss", "grad_norm"):
        assert abs(ma[key] - mb[key]) <= 1e-12 * max(1.0, abs(ma[key])), key
    assert ma["clip_frac"] > 0  # the clip is active in the trained rows
    for pa, pb in zip(oa.state.values(), ob.state.values()):
        assert float(pa["step"]) == float(pb["step"]) == 2


@pytest.mark.parametrize("packed", [False, True])
def test_an_update_with_every_row_skipped_still_steps_adamw(tmp_path, packed):
    """After a first update with non-zero advantages, an all-zero batch: the full computation's gradient is 0
    and AdamW's moments still move the weights; the skipped update must move them identically."""
    torch.set_num_threads(1)
    adv = torch.randn(P * G, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    out = {}
    for skip in (False, True):
        trainer, tok = make_trainer(tmp_path, skip, packed)
        trainer.update(make_batch(tok, adv))
        before = weights(trainer)
        metrics = trainer.update(make_batch(tok, torch.zeros(P * G, dtype=torch.float64), seed=1))
        out[skip] = metrics, before, weights(trainer)
    (ma, _, wa), (mb, before, wb) = out[False], out[True]
    assert mb["update_rows_frac"] == 0.0 and mb["grad_norm"] == 0.0 == ma["grad_norm"]
    assert ma["loss"] == mb["loss"] == 0.0
    assert max(float((wb[n] - before[n]).abs().max()) for n in wb) > 1e-4  # momentum moved them
    for n in wa:
        assert (wa[n] - wb[n]).abs().max() <= 1e-12, n


def test_skip_zero_advantage_refuses_terms_a_zero_advantage_row_still_has(tmp_path):
    for extra, needle in ((["grpo.beta=0.04"], "KL"), (["grpo.entropy_coef=0.01"], "entropy")):
        with pytest.raises(R1KitError, match="skip_zero_advantage") as e:
            make_trainer(tmp_path, True, False, extra)
        assert needle in str(e.value)
    ref, _ = tiny_pair(layers=2)
    # the KL subtracted from the reward (not in the loss) is fine: a zero advantage still means a zero gradient
    cfg_ok = ["grpo.beta=0.04", "grpo.kl_mode=reward"]
    model, tok = tiny_pair(layers=2)
    cfg = load_config(RunConfig, None, ["grpo.skip_zero_advantage=true", *cfg_ok, f"output_dir={tmp_path}"])
    GRPOTrainer(cfg, Policy(model, tok, device="cpu"), make_task("arithmetic"), cfg.run_dir, ref_model=ref)
