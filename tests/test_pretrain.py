"""Stage 0: the fixed cosine schedule, the readiness-gated warm-up/stable/decay schedule, and its errors."""
from __future__ import annotations

import json
import random

import pytest

from r1kit.config import PretrainConfig, RunConfig, load_config
from r1kit.corpus import build_corpus
from r1kit.recipes.zero import ensure_base_model
from r1kit.tasks import make_task
from r1kit.trainers.pretrain import Schedule, lr_at, pretrain
from r1kit.types import R1KitError
from tests.helpers import tiny_pair


def test_without_the_gate_the_schedule_is_one_cosine_cycle():
    cfg = PretrainConfig(steps=100, warmup_steps=10, lr=1.0)
    s = Schedule(cfg)
    assert s.total == 100
    assert [s.lr(i) for i in range(100)] == [lr_at(i, 100, 10, 1.0) for i in range(100)]
    assert s.lr(9) == pytest.approx(1.0) and s.lr(99) == pytest.approx(0.1, abs=1e-3)


def test_a_restart_is_a_new_cosine_cycle_at_a_lower_peak_within_the_cap():
    cfg = PretrainConfig(steps=100, warmup_steps=10, lr=2.0, extend_steps=50, max_steps=200, restart_lr_scale=0.5)
    s = Schedule(cfg)
    assert s.can_extend()
    s.extend()
    assert s.total == 150 and s.lr(99) == pytest.approx(0.2, rel=0.01)
    assert [s.lr(100 + i) for i in range(50)] == [lr_at(i, 50, 10, 1.0) for i in range(50)]  # warm-up again, peak 1.0
    s.extend()
    assert s.total == 200 and s.lr(159) == pytest.approx(0.5)  # the third cycle peaks at 2.0 * 0.5 ** 2
    assert not s.can_extend()


def _docs(n=200):
    task = make_task("arithmetic", min_digits=1, max_digits=2, num_test=20)
    return build_corpus(task, n, 0.5, 0.2, "r1_zero", random.Random(0))


def test_pretrain_trains_another_cycle_until_the_check_passes():
    model, tok = tiny_pair()
    scores = iter([0.1, 0.2, 0.9])
    seen = []

    def check(m):
        seen.append(m.training)
        return next(scores)

    cfg = PretrainConfig(steps=8, batch_size=4, warmup_steps=2, gate_pass1=0.5, extend_steps=4, max_steps=100)
    log = pretrain(model, tok, _docs(), cfg, seed=0, show_progress=False, check=check)
    gates = [(r["step"], r["gate_pass1"], r["passed"]) for r in log if "gate_pass1" in r]
    assert gates == [(8, 0.1, False), (12, 0.2, False), (16, 0.9, True)]
    assert max(r["step"] for r in log if "loss" in r) == 15
    assert seen == [True, True, True]  # the check gets the model as it trains; it may switch it to eval itself
    assert not model.training


def test_pretrain_that_never_passes_stops_at_the_cap():
    model, tok = tiny_pair()
    cfg = PretrainConfig(steps=6, batch_size=4, warmup_steps=2, gate_pass1=0.5, extend_steps=4, max_steps=15)
    log = pretrain(model, tok, _docs(), cfg, seed=0, show_progress=False, check=lambda m: 0.0)
    assert [r["step"] for r in log if "gate_pass1" in r] == [6, 10, 14]  # a fourth cycle would end at 18 > 15
    assert max(r["step"] for r in log if "loss" in r) == 13


def test_without_the_gate_the_model_is_never_checked():
    model, tok = tiny_pair()

    def check(m):
        raise AssertionError("called")

    log = pretrain(model, tok, _docs(), PretrainConfig(steps=5, batch_size=4, warmup_steps=2), seed=0,
                   show_progress=False, check=check)
    assert max(r["step"] for r in log) == 4 and not any("gate_pass1" in r for r in log)


@pytest.mark.parametrize("field, value, words", [
    ("gate_pass1", 1.5, "pretrain.gate_pass1"), ("restart_lr_scale", 0.0, "pretrain.restart_lr_scale"),
    ("extend_steps", 0, "pretrain.extend_steps"), ("steps", 0, "pretrain.steps"),
    ("max_steps", 4, r"pretrain.max_steps = 4: expected at least pretrain.steps \(5\)"),
])
def test_bad_pretrain_settings_name_the_field(field, value, words):
    model, tok = tiny_pair()
    cfg = PretrainConfig(**{"steps": 5, "batch_size": 4, field: value})
    with pytest.raises(R1KitError, match=words):
        pretrain(model, tok, _docs(), cfg, seed=0, show_progress=False, check=lambda m: 1.0)


def test_gate_without_a_check_is_an_error():
    model, tok = tiny_pair()
    with pytest.raises(R1KitError, match="readiness check"):
        pretrain(model, tok, _docs(), PretrainConfig(steps=5, batch_size=4, gate_pass1=0.5), seed=0, show_progress=False)


def test_stage0_with_the_gate_records_every_check(tmp_path):
    cfg = load_config(RunConfig, None, [
        f"output_dir={tmp_path}", "name=g", "threads=1", "task.options={min_digits: 1, max_digits: 1, num_test: 10}",
        "model.hidden_size=32", "model.num_layers=1", "model.num_heads=2", "model.num_kv_heads=2",
        "model.intermediate_size=64", "model.vocab_size=300", "pretrain.corpus_docs=200", "pretrain.steps=6",
        "pretrain.batch_size=8", "pretrain.warmup_steps=2", "pretrain.gate_pass1=1.0", "pretrain.extend_steps=3",
        "pretrain.max_steps=12", "pretrain.gate_problems=4", "grpo.max_new_tokens=16"])
    with pytest.warns(UserWarning, match="did not reach pass@1 1.0 within pretrain.max_steps=12"):
        out = ensure_base_model(cfg, show_progress=False)
    info = json.loads((out / "pretrain.json").read_text())
    assert info["gate"]["threshold"] == 1.0 and info["gate"]["passed"] is False
    assert [c["step"] for c in info["gate"]["checks"]] == [6, 9, 12]
    assert all(0.0 <= c["gate_pass1"] <= 1.0 for c in info["gate"]["checks"])
    assert info["steps"] == 12 and (out / "model.safetensors").exists()
