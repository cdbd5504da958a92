"""The GRPO trainer: it learns, it logs, it checkpoints, and resume is exact."""
import json
import time

import pytest
import torch

from r1kit.config import RunConfig, load_config
from r1kit.policy import Policy
from r1kit.rewards import REWARD_FUNCS, register_reward
from r1kit.tasks import make_task
from r1kit.trainers.grpo import GRPOTrainer
from r1kit.types import R1KitError
from tests.helpers import tiny_pair

if "test_sevens" not in REWARD_FUNCS:
    @register_reward("test_sevens")
    def sevens(completion: str, problem) -> float:
        """A trivial dense reward: the share of characters that are '7'."""
        return completion.count("7") / max(1, len(completion))


def _cfg(tmp_path, *overrides):
    base = ["log.progress=false", "log.tensorboard=false", "grpo.prompts_per_step=8", "grpo.group_size=8",
            "grpo.max_new_tokens=8", f"output_dir={tmp_path}", "name=t", "eval.every=0", "log.sample_every=1"]
    return load_config(RunConfig, None, base + list(overrides))


def test_grpo_raises_reward_on_a_trivial_task(tmp_path):
    torch.set_num_threads(1)
    cfg = _cfg(tmp_path, "grpo.steps=25", "grpo.lr=1e-2", "grpo.reward_weights={test_sevens: 1.0}", "log.save_every=0")
    model, tok = tiny_pair()
    t0 = time.time()
    recs = GRPOTrainer(cfg, Policy(model, tok), make_task("arithmetic", min_digits=1, max_digits=1, num_test=5), cfg.run_dir).train()
    assert time.time() - t0 < 60
    first = sum(r["reward"] for r in recs[:3]) / 3
    last = sum(r["reward"] for r in recs[-3:]) / 3
    assert last > first + 0.15, (first, last)
    # every step wrote one JSONL record with the advertised metrics, and the run wrote its plot
    lines = [json.loads(x) for x in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(1, 26))
    for key in ("reward", "reward/test_sevens", "reward_std", "completion_len_mean", "completion_len_max",
                "truncated_frac", "reflection_rate", "clip_frac", "entropy", "grad_norm", "time/generate",
                "time/score", "time/update", "tokens_per_s", "approx_kl"):
        assert key in lines[-1], key
    assert (cfg.run_dir / "curves.png").stat().st_size > 1000
    assert (cfg.run_dir / "samples.jsonl").exists()


def _strip_times(recs):
    return [{k: v for k, v in r.items() if not k.startswith(("time", "params/")) and k not in ("tokens_per_s", "peak_memory_mb")}
            for r in recs]


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    torch.set_num_threads(1)
    task = lambda: make_task("arithmetic", min_digits=1, max_digits=2, num_test=5)  # noqa: E731
    opts = ["grpo.steps=4", "log.save_every=2", "grpo.micro_batch_size=16", "grpo.updates_per_batch=2"]
    cfg_a = _cfg(tmp_path / "a", *opts)
    model_a, tok = tiny_pair(seed=0)
    full = GRPOTrainer(cfg_a, Policy(model_a, tok), task(), cfg_a.run_dir).train()

    cfg_b = _cfg(tmp_path / "b", *opts[1:], "grpo.steps=2")
    model_b, _ = tiny_pair(seed=0)
    GRPOTrainer(cfg_b, Policy(model_b, tok), task(), cfg_b.run_dir).train()
    assert (cfg_b.run_dir / "checkpoints" / "step-000002" / "model" / "config.json").exists()
    cfg_c = _cfg(tmp_path / "b", *opts)
    model_c, _ = tiny_pair(seed=123)  # different initial weights: the checkpoint must override them
    resumed = GRPOTrainer(cfg_c, Policy(model_c, tok), task(), cfg_c.run_dir).train(resume=True)

    assert _strip_times(resumed) == _strip_times(full[2:])
    for p, q in zip(model_a.parameters(), model_c.parameters()):
        assert torch.equal(p, q)
    steps = [json.loads(x)["step"] for x in (cfg_c.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_bad_algorithm_options_are_errors(tmp_path):
    model, tok = tiny_pair()
    task = make_task("arithmetic", min_digits=1, max_digits=1, num_test=5)
    for override, fragment in [("grpo.loss_type=ppo2", "loss_type"), ("grpo.clip_high=0.1", "clip_high"),
                               ("grpo.beta=-1", "beta"), ("grpo.group_size=1", "group_size")]:
        with pytest.raises(R1KitError, match=fragment):
            GRPOTrainer(_cfg(tmp_path, override), Policy(model, tok), task, tmp_path)
