"""The GRPO family wired into the trainer: presets, dynamic sampling, overlong masking and shaping,
KL as a loss or a reward, no reference model at beta = 0, recomputed old logprobs, config errors."""
import copy
import math

import pytest
import torch

from r1kit.algorithms import compute_advantages, high_entropy_mask, kl_reward_penalty, overlong_penalty
from r1kit.config import GRPOConfig, RunConfig, from_dict, load_config, to_dict
from r1kit.policy import Policy
from r1kit.rewards import REWARD_FUNCS, register_reward
from r1kit.rewards.functions import RewardScores
from r1kit.rewards.shaping import overlong_reward, with_completion_lengths
from r1kit.tasks import make_task
from r1kit.trainers.grpo import PRESETS, GRPOTrainer, StepBatch
from r1kit.trainers.grpo_batch import Sampled, collect_groups
from r1kit.types import Problem, R1KitError, Rollout
from tests.helpers import tiny_pair

if "test_sevens" not in REWARD_FUNCS:
    @register_reward("test_sevens")
    def sevens(completion: str, problem) -> float:
        """A trivial dense reward: the share of characters that are '7'."""
        return completion.count("7") / max(1, len(completion))

if "test_odd_only" not in REWARD_FUNCS:
    @register_reward("test_odd_only")
    def odd_only(completion: str, problem) -> float:
        """Constant (0) for prompts with an even answer; varies with the completion for odd ones."""
        return 0.0 if int(problem.answer) % 2 == 0 else float(len(completion) % 5)

if "test_length_mod3" not in REWARD_FUNCS:
    @register_reward("test_length_mod3")
    def length_mod3(completion: str, problem) -> float:
        """Spread within a group even on an untrained model (completions of varied lengths)."""
        return len(completion) % 3 / 2

if "test_constant" not in REWARD_FUNCS:
    @register_reward("test_constant")
    def constant(completion: str, problem) -> float:
        return 0.5


@pytest.fixture(scope="module")
def pair():
    torch.set_num_threads(1)
    return tiny_pair()


def _task():
    return make_task("arithmetic", min_digits=1, max_digits=2, num_test=5)


def _cfg(tmp_path, *overrides):
    base = ["log.progress=false", "log.tensorboard=false", "grpo.prompts_per_step=4", "grpo.group_size=4",
            "grpo.max_new_tokens=8", f"output_dir={tmp_path}", "name=t", "eval.every=0", "log.sample_every=0",
            "log.save_every=0", "grpo.reward_weights={test_sevens: 1.0}", "grpo.grad_clip=1e9"]
    return load_config(RunConfig, None, base + list(overrides))


def _trainer(tmp_path, pair, *overrides, ref_model=None):
    model, tok = pair
    cfg = _cfg(tmp_path, *overrides)
    return GRPOTrainer(cfg, Policy(copy.deepcopy(model), tok), _task(), cfg.run_dir, ref_model=ref_model)


def _perturbed(model, scale=0.05, seed=1):
    ref = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))
    return ref


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_each_preset_runs_two_steps_with_finite_metrics(tmp_path, pair, preset):
    tr = _trainer(tmp_path, pair, f"grpo.preset={preset}", "grpo.steps=2", ref_model=_perturbed(pair[0]))
    for key, value in PRESETS[preset].items():  # the preset reached the trainer (reward weights merged)
        got = getattr(tr.cfg.grpo, key)
        assert got == ({**value, "test_sevens": 1.0} if key == "reward_weights" else value), key
    records = tr.train()
    assert [r["step"] for r in records] == [1, 2]
    for r in records:
        for key in ("loss", "pg_loss", "clip_frac_low", "clip_frac_high", "approx_kl", "entropy", "adv_mean",
                    "adv_std", "adv_abs_mean", "zero_adv_group_frac", "dropped_groups", "sampling_tries", "grad_norm"):
            assert key in r, (preset, key)
        bad = {k: v for k, v in r.items() if isinstance(v, float) and not math.isfinite(v)}
        assert not bad, (preset, bad)
    if PRESETS[preset].get("beta", 0) > 0:
        assert "kl" in records[-1]


def test_preset_precedence_explicit_keys_win(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("grpo:\n  preset: dapo\n  clip_high: 0.3\n  reward_weights: {accuracy: 1.0}\n")
    g = load_config(RunConfig, f, ["grpo.agg_mode=seq-mean-token-mean"]).grpo
    assert g.clip_high == 0.3 and g.agg_mode == "seq-mean-token-mean"  # file and override beat the preset
    assert g.dynamic_sampling and g.overlong_mask  # the rest comes from the preset...
    assert g.reward_weights == {"overlong": 1.0, "accuracy": 1.0}  # ...and mappings merge key by key
    # an explicit value equal to the default still wins over the preset
    assert load_config(RunConfig, None, ["grpo.preset=grpo_paper", "grpo.beta=0.0"]).grpo.beta == 0.0
    assert load_config(RunConfig, None, ["grpo.preset=grpo_paper"]).grpo.beta == PRESETS["grpo_paper"]["beta"]
    # the saved, resolved config loads back to itself
    assert from_dict(GRPOConfig, to_dict(g)) == g


@pytest.mark.parametrize("override, fragment", [
    ("grpo.kl_mode=banana", "grpo.kl_mode"),
    ("grpo.entropy_top_fraction=0", "grpo.entropy_top_fraction"),
    ("grpo.entropy_top_fraction=1.5", "grpo.entropy_top_fraction"),
    ("grpo.max_sampling_tries=0", "grpo.max_sampling_tries"),
    ("grpo.overlong_buffer=9", "grpo.overlong_buffer"),
    ("grpo.tis_cap=2", "grpo.tis_cap"),
    ("grpo.clip_ratio_c=3", "clip_ratio_c"),
    ("grpo.agg_mode=mean", "agg_mode"),
    ("grpo.prompts_per_step=0", "grpo.prompts_per_step"),
])
def test_config_errors_name_the_field(tmp_path, pair, override, fragment):
    with pytest.raises(R1KitError, match=fragment):
        _trainer(tmp_path, pair, override)


@pytest.mark.parametrize("override, fragment", [("grpo.preset=nope", "'grpo.preset'.*known presets"),
                                                ("grpo.dynamic_sampling=3", "'grpo.dynamic_sampling'")])
def test_config_load_errors_name_the_field(override, fragment):
    with pytest.raises(R1KitError, match=fragment):
        load_config(RunConfig, None, [override])


# ---- dynamic sampling ----------------------------------------------------------------------------

def test_dynamic_sampling_drops_constant_groups_and_fills_the_batch(tmp_path, pair):
    tr = _trainer(tmp_path, pair, "grpo.dynamic_sampling=true", "grpo.max_sampling_tries=30",
                  "grpo.reward_weights={test_odd_only: 1.0}")
    for _ in range(2):
        record, batch = tr.step()
        P, G = tr.cfg.grpo.prompts_per_step, tr.cfg.grpo.group_size
        assert record["kept_groups"] == len(batch.problems) == P and batch.rollout.num_rows == P * G
        assert all(int(p.answer) % 2 == 1 for p in batch.problems)  # even answers: constant, dropped
        grouped = batch.scores.total.view(P, G)
        assert (grouped.amax(1) > grouped.amin(1)).all()
        assert record["dropped_groups"] > 0 and record["sampling_tries"] >= 2 and record["skipped_update"] == 0.0
        assert len(batch.texts) == P * G and batch.scores.per_fn["test_odd_only"].shape == (P * G,)


def test_dynamic_sampling_respects_the_try_cap_and_skips_an_empty_update(tmp_path, pair):
    tr = _trainer(tmp_path, pair, "grpo.dynamic_sampling=true", "grpo.max_sampling_tries=3",
                  "grpo.reward_weights={test_constant: 1.0}")
    before = [p.detach().clone() for p in tr.model.parameters()]
    record, batch = tr.step()
    assert record["sampling_tries"] == 3 and record["dropped_groups"] == 3 * tr.cfg.grpo.prompts_per_step
    assert record["skipped_update"] == 1.0 and "loss" not in record
    assert all(torch.equal(a, b) for a, b in zip(before, tr.model.parameters()))


def _fake_round(rewards_per_group: list[list[float]], tc: int, tp: int = 3) -> Sampled:
    """A hand-made sampling round with prompt width tp and completion width tc (to test re-padding)."""
    P, G = len(rewards_per_group), len(rewards_per_group[0])
    N = P * G
    mask = torch.ones(N, tc)
    ro = Rollout(torch.arange(N * tp).view(N, tp) % 50, torch.ones(N, tp, dtype=torch.long),
                 torch.arange(N * tc).view(N, tc) % 50, mask, -torch.rand(N, tc), torch.zeros(N, dtype=torch.bool), G)
    total = torch.tensor(rewards_per_group, dtype=torch.float32).view(-1)
    probs = [Problem(id=f"{tc}-{p}", question="q", answer="1") for p in range(P)]
    return Sampled(probs, ro, [f"t{tc}-{i}" for i in range(N)], RewardScores(total, {"r": total.clone()}))


def test_collect_groups_keeps_informative_groups_across_rounds_and_trims_the_surplus():
    rounds = iter([_fake_round([[1, 1], [0, 1], [2, 2]], tc=2), _fake_round([[3, 4], [5, 6], [7, 7]], tc=4, tp=5)])
    batch, stats = collect_groups(lambda: next(rounds), 2, dynamic=True, max_tries=5, pad_id=0)
    assert stats.tries == 2 and stats.dropped_groups == 3 and stats.sampled_groups == 6 and stats.informative
    assert [p.id for p in batch.problems] == ["2-1", "4-0"]  # one from each round; the surplus [5, 6] cut
    assert batch.scores.total.tolist() == [0, 1, 3, 4] and batch.texts == ["t2-2", "t2-3", "t4-0", "t4-1"]
    ro = batch.rollout
    assert ro.completion_ids.shape == (4, 4) and ro.prompt_ids.shape == (4, 5)
    assert ro.completion_mask[:2].sum(1).tolist() == [2, 2] and ro.completion_mask[2:].sum(1).tolist() == [4, 4]
    assert ro.prompt_mask[:2, :2].sum() == 0 and ro.prompt_mask[2:].sum() == 10  # prompts re-padded on the left
    # a cap with something informative: train on fewer groups than asked
    rounds = iter([_fake_round([[1, 1], [0, 1]], tc=2), _fake_round([[1, 1], [2, 2]], tc=2)])
    batch, stats = collect_groups(lambda: next(rounds), 2, dynamic=True, max_tries=2, pad_id=0)
    assert batch.num_groups == 1 and stats.informative and stats.tries == 2 and stats.dropped_groups == 3


# ---- overlong: masking and shaping ---------------------------------------------------------------

def _rows(batch: StepBatch, rows: torch.Tensor, loss_mask: torch.Tensor) -> StepBatch:
    ro = batch.rollout
    sub = Rollout(ro.prompt_ids[rows], ro.prompt_mask[rows], ro.completion_ids[rows], ro.completion_mask[rows],
                  ro.logprobs[rows], ro.truncated[rows], ro.group_size)
    return StepBatch(batch.problems, sub, [batch.texts[i] for i in rows.tolist()], batch.scores, batch.rewards[rows],
                     batch.advantages[rows], batch.old_logprobs[rows], loss_mask[rows], sampling=batch.sampling)


def _grads(tr: GRPOTrainer, batch: StepBatch) -> list[torch.Tensor]:
    tr.update(batch)  # lr = 0: the weights stay, the gradients of the last update remain in .grad
    return [p.grad.clone() for p in tr.model.parameters()]


def test_overlong_mask_removes_truncated_rows_from_the_gradient(tmp_path, pair):
    opts = ["grpo.lr=0", "grpo.micro_batch_size=5"]
    masked = _trainer(tmp_path, pair, "grpo.overlong_mask=true", *opts)
    plain = _trainer(tmp_path, pair, *opts)
    _, batch = masked.step()
    N = batch.rollout.num_rows
    batch.rollout.truncated = torch.arange(N) % 3 == 0  # mark a known set of rows as truncated
    batch.advantages = torch.randn(N, generator=torch.Generator().manual_seed(0))  # every row pushes
    full = StepBatch(**{**batch.__dict__, "loss_mask": masked.loss_mask(batch.rollout, None)})
    assert full.loss_mask[batch.rollout.truncated].sum() == 0
    kept = (~batch.rollout.truncated).nonzero().squeeze(1)
    g_masked = _grads(masked, full)
    g_subset = _grads(plain, _rows(batch, kept, batch.rollout.completion_mask))
    for a, b in zip(g_masked, g_subset):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    g_all = _grads(plain, StepBatch(**{**batch.__dict__, "loss_mask": batch.rollout.completion_mask}))
    assert max((a - b).abs().max().item() for a, b in zip(g_all, g_subset)) > 1e-4  # the rows did matter


def test_overlong_reward_matches_the_dapo_formula():
    p = Problem(id="1", question="q", answer="2")
    lengths, truncated = torch.tensor([3, 12, 16, 20, 20]), torch.tensor([False, False, False, False, True])
    rows = with_completion_lengths([p] * 5, lengths, truncated, max_len=20, buffer=8)
    got = [overlong_reward("", r) for r in rows]
    want = overlong_penalty(torch.tensor([3, 12, 16, 20, 21]), 20, 8).tolist()
    assert got == pytest.approx(want) and got[0] == 0.0 and got[2] == pytest.approx(-0.5) and got[-1] == -1.0
    assert p.meta == {}  # the original problem is untouched
    with pytest.raises(R1KitError, match="completion_tokens"):
        overlong_reward("text", p)


def test_overlong_reward_in_the_trainer_uses_token_lengths(tmp_path, pair):
    tr = _trainer(tmp_path, pair, "grpo.reward_weights={overlong: 1.0, test_sevens: 1.0}", "grpo.overlong_buffer=4")
    record, batch = tr.step()
    ro = batch.rollout
    lengths = torch.where(ro.truncated, ro.lengths + 1, ro.lengths)  # a truncated row is longer than max
    want = overlong_penalty(lengths, 8, 4)
    torch.testing.assert_close(batch.scores.per_fn["overlong"], want)
    assert record["reward/overlong"] == pytest.approx(want.mean().item())


# ---- KL: as a loss, as a reward, or not at all ----------------------------------------------------

def test_kl_mode_reward_changes_rewards_not_the_loss(tmp_path, pair):
    ref = _perturbed(pair[0], scale=0.2)
    opts = ["grpo.beta=0.5", "grpo.kl_estimator=k1", "grpo.micro_batch_size=64"]
    tr = _trainer(tmp_path, pair, "grpo.kl_mode=reward", *opts, ref_model=ref)
    record, batch = tr.step()
    penalty = kl_reward_penalty(batch.old_logprobs, batch.ref_logprobs, batch.rollout.completion_mask,
                                beta=0.5, estimator="k1")
    assert penalty.abs().max() > 1e-3
    torch.testing.assert_close(batch.rewards, batch.scores.total - penalty)
    torch.testing.assert_close(batch.advantages, compute_advantages(batch.rewards, 4, "grpo"))
    assert record["kl_penalty_mean"] == pytest.approx(penalty.mean().item(), rel=1e-5)
    assert record["kl"] != 0 and record["loss"] == pytest.approx(record["pg_loss"], abs=1e-6)  # no KL in the loss

    tr_loss = _trainer(tmp_path, pair, "grpo.kl_mode=loss", *opts, ref_model=ref)
    record, batch = tr_loss.step()
    assert torch.equal(batch.rewards, batch.scores.total) and "kl_penalty_mean" not in record
    assert abs(record["loss"] - record["pg_loss"]) > 1e-4  # the KL term went into the loss instead


class _Exploding(torch.nn.Module):
    def forward(self, *args, **kwargs):
        raise AssertionError("the reference model was called although beta = 0")


@pytest.mark.parametrize("kl_mode", ["loss", "reward"])
def test_beta_zero_never_calls_the_reference_model(tmp_path, pair, kl_mode):
    tr = _trainer(tmp_path, pair, "grpo.beta=0", f"grpo.kl_mode={kl_mode}", "grpo.steps=2", ref_model=_Exploding())
    records = tr.train()
    assert len(records) == 2 and "kl" not in records[-1]


# ---- old logprobs: recomputed, mismatch, TIS, entropy mask ------------------------------------------

@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_recompute_old_logprobs_is_ratio_one_on_policy(tmp_path, pair, temperature):
    tr = _trainer(tmp_path, pair, "grpo.recompute_old_logprobs=true", "grpo.tis_cap=2",
                  f"grpo.temperature={temperature}", "grpo.micro_batch_size=5")
    record, batch = tr.step()
    assert tr.engine.last_backend == "fast"  # the engine's own forward vs the HF forward of the trainer
    assert batch.sampler_logprobs is batch.rollout.logprobs and batch.old_logprobs is not batch.rollout.logprobs
    assert record["logprob_mismatch_mean"] < 1e-5 and record["logprob_mismatch_max"] < 1e-4
    assert record["ratio_mean"] == pytest.approx(1.0, abs=1e-5) and abs(record["approx_kl"]) < 1e-6
    assert record["clip_frac"] == 0.0


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("tis_cap", [None, 1.0])
def test_fused_old_logprobs_equal_the_separate_recomputation_in_float64(tmp_path, pair, packed, tis_cap):
    """mu = 1: pi_old is the update forward's own logprobs, detached, and no separate forward runs. In float64
    the step's weights, metrics and old logprobs equal those of the separate no-grad recomputation. The engine
    samples in bf16 (engine.dtype), so the sampler's logprobs really differ from pi_old: the mismatch metric
    and TIS (cap 1 cuts about half of the tokens) see the fused logprobs, as they saw the recomputed ones."""
    model, tok = pair
    overrides = ["engine.dtype=bf16", "grpo.recompute_old_logprobs=true", "grpo.micro_batch_size=5", "grpo.lr=1e-3",
                 "grpo.max_new_tokens=12", "grpo.reward_weights={test_length_mod3: 1.0}",
                 f"grpo.packed_update={str(packed).lower()}"] + ([f"grpo.tis_cap={tis_cap}"] if tis_cap else [])
    out = {}
    for fused in (True, False):
        cfg = _cfg(tmp_path, *overrides)
        tr = GRPOTrainer(cfg, Policy(copy.deepcopy(model).double(), tok), _task(), cfg.run_dir)
        assert tr.fuse_old_logprobs and tr.engine.dtype == torch.bfloat16
        if fused:
            tr._forward = None  # the fused step runs no logprob forward outside the update (beta = 0: no reference)
        else:
            tr.fuse_old_logprobs = False
        record, batch = tr.step()
        out[fused] = record, batch, {n: p.detach().clone() for n, p in tr.model.named_parameters()}
    (ra, ba, wa), (rb, bb, wb) = out[True], out[False]
    assert torch.equal(ba.rollout.completion_ids, bb.rollout.completion_ids)  # the same samples
    assert ba.advantages.abs().max() > 0 and ra["logprob_mismatch_mean"] > 1e-4  # something to learn; bf16 sampler
    valid = ba.rollout.completion_mask > 0
    assert (ba.old_logprobs - bb.old_logprobs)[valid].abs().max() <= 1e-12
    keys = ["loss", "pg_loss", "grad_norm", "ratio_mean", "approx_kl", "logprob_mismatch_mean", "logprob_mismatch_max"]
    if tis_cap:
        keys.append("tis_capped_frac")
        assert 0.2 < ra["tis_capped_frac"] < 0.8
    for key in keys:
        assert abs(ra[key] - rb[key]) <= 1e-12 * max(1.0, abs(rb[key])), key
    start = dict(model.named_parameters())
    assert max(float((wa[n] - start[n].double()).abs().max()) for n in wa) > 1e-4  # the step moved the weights
    for n in wa:
        assert (wa[n] - wb[n]).abs().max() <= 1e-12, n


def test_old_logprobs_fuse_only_where_exact(tmp_path, pair):
    """pi_old must exist before the update for mu > 1 (a later update's denominator), the entropy mask, and a
    KL penalty in the reward: those keep the separate forward."""
    on = "grpo.recompute_old_logprobs=true"
    assert _trainer(tmp_path, pair, on).fuse_old_logprobs
    assert _trainer(tmp_path, pair, on, "grpo.beta=0.04").fuse_old_logprobs  # KL in the loss: pi_theta vs ref
    assert not _trainer(tmp_path, pair).fuse_old_logprobs  # the sampler's logprobs: nothing to fuse
    for other in ("grpo.updates_per_batch=2", "grpo.entropy_top_fraction=0.5", "grpo.kl_mode=reward"):
        assert not _trainer(tmp_path, pair, on, "grpo.beta=0.04", other).fuse_old_logprobs, other


def test_a_sampler_dtype_other_than_training_needs_recomputed_old_logprobs(tmp_path, pair):
    with pytest.raises(R1KitError, match=r"engine.dtype='bf16'.*grpo.recompute_old_logprobs=true"):
        _trainer(tmp_path, pair, "engine.dtype=bf16")
    with pytest.raises(R1KitError, match="engine.dtype='half' is unknown"):
        _trainer(tmp_path, pair, "engine.dtype=half", "grpo.recompute_old_logprobs=true")
    assert _trainer(tmp_path, pair, "engine.dtype=fp32").engine.dtype == torch.float32  # fp32 on both sides
    model, tok = pair  # bf16 autocast in training and a bf16 sampler: the same precision, no recomputation needed
    cfg = _cfg(tmp_path, "engine.dtype=bfloat16")
    tr = GRPOTrainer(cfg, Policy(copy.deepcopy(model), tok, mixed_precision="bf16"), _task(), cfg.run_dir)
    assert tr.engine.dtype == torch.bfloat16 and not tr.fuse_old_logprobs


def test_entropy_mask_is_chosen_over_the_full_batch(tmp_path, pair):
    tr = _trainer(tmp_path, pair, "grpo.entropy_top_fraction=0.25", "grpo.micro_batch_size=3")
    record, batch = tr.step()
    _, entropy = tr._forward(tr.model, batch.rollout, with_entropy=True)
    want = high_entropy_mask(entropy, batch.rollout.completion_mask, 0.25).float()
    assert torch.equal(batch.loss_mask, want)
    assert record["loss_token_frac"] == pytest.approx(0.25, abs=0.05)
