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


def test_fixed_schedule_is_the_cosine_one():
    cfg = PretrainConfig(steps=100, warmup_steps=10, lr=1.0)
    s = Schedule(cfg, gated=False)
    assert s.total == 100
    assert [s.lr(i) for i in range(100)] == [lr_at(i, 100, 10, 1.0) for i in range(100)]
    assert s.lr(9) == pytest.approx(1.0) and s.lr(99) == pytest.approx(0.1, abs=1e-3)


def test_gated_schedule_holds_the_peak_then_decays_from_the_pass():
    cfg = PretrainConfig(steps=1000, warmup_steps=10, lr=2.0, gate_pass1=0.5, gate_every=50, gate_min_steps=100,
                         decay_frac=0.25)
    s = Schedule(cfg, gated=True)
    assert s.lr(0) == pytest.approx(0.2) and s.lr(10) == 2.0 and s.lr(700) == 2.0
    assert not s.wants_check(50) and not s.wants_check(120) and s.wants_check(100) and s.wants_check(300)
    s.pass_gate(300)
    assert s.total == 375  # 300 + 25% of 300
    assert not s.wants_check(350)
    assert s.lr(300) == pytest.approx(2.0)
    assert s.lr(375) == pytest.approx(0.2) and s.lr(374) == pytest.approx(0.2, rel=1e-2)  # decays to 10% of the peak
    lrs = [s.lr(i) for i in range(300, 375)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_gated_schedule_without_a_pass_decays_to_end_on_the_cap():
    cfg = PretrainConfig(steps=1000, warmup_steps=10, lr=1.0, gate_pass1=0.5, gate_every=100, gate_min_steps=0,
                         decay_frac=0.25)
    s = Schedule(cfg, gated=True)
    assert s.decay_start == 800 and s.total == 1000
    assert s.wants_check(700) and not s.wants_check(800)
    assert s.lr(799) == 1.0 and s.lr(999) == pytest.approx(0.1, rel=2e-3)


def _docs(n=200):
    task = make_task("arithmetic", min_digits=1, max_digits=2, num_test=20)
    return build_corpus(task, n, 0.5, 0.2, "r1_zero", random.Random(0))


def test_pretrain_stops_after_the_decay_that_follows_a_passing_check():
    model, tok = tiny_pair()
    scores = iter([0.1, 0.2, 0.9, 1.0])
    seen = []

    def check(m):
        seen.append(m.training)
        return next(scores)

    cfg = PretrainConfig(steps=200, batch_size=4, warmup_steps=2, gate_pass1=0.5, gate_every=4, gate_min_steps=4,
                         decay_frac=0.5)
    log = pretrain(model, tok, _docs(), cfg, seed=0, show_progress=False, check=check)
    gates = [r for r in log if "gate_pass1" in r]
    assert [(r["step"], r["gate_pass1"], r["passed"]) for r in gates] == [(4, 0.1, False), (8, 0.2, False), (12, 0.9, True)]
    assert max(r["step"] for r in log if "loss" in r) == 12 + 6 - 1  # 50% of the 12 steps done, then stop
    assert seen == [True, True, True]  # the check gets the model as it trains; it may switch it to eval itself


def test_pretrain_that_never_passes_stops_at_the_cap():
    model, tok = tiny_pair()
    cfg = PretrainConfig(steps=20, batch_size=4, warmup_steps=2, gate_pass1=0.5, gate_every=5, gate_min_steps=0,
                         decay_frac=0.25)
    log = pretrain(model, tok, _docs(), cfg, seed=0, show_progress=False, check=lambda m: 0.0)
    assert [r["step"] for r in log if "gate_pass1" in r] == [0, 5, 10, 15]
    assert max(r["step"] for r in log if "loss" in r) == 19


@pytest.mark.parametrize("field, value, words", [
    ("gate_pass1", 1.5, "pretrain.gate_pass1"), ("decay_frac", 0.0, "pretrain.decay_frac"),
    ("gate_every", 0, "pretrain.gate_every"), ("steps", 0, "pretrain.steps"),
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
        "model.intermediate_size=64", "model.vocab_size=300", "pretrain.corpus_docs=200", "pretrain.steps=12",
        "pretrain.batch_size=8", "pretrain.warmup_steps=2", "pretrain.gate_pass1=1.0", "pretrain.gate_every=4",
        "pretrain.gate_min_steps=4", "pretrain.gate_problems=4", "grpo.max_new_tokens=16"])
    with pytest.warns(UserWarning, match="did not reach pass@1 1.0"):
        out = ensure_base_model(cfg, show_progress=False)
    info = json.loads((out / "pretrain.json").read_text())
    assert info["gate"]["threshold"] == 1.0 and info["gate"]["passed"] is False
    assert [c["step"] for c in info["gate"]["checks"]] == [4, 8]  # decay starts at round(12 / 1.25) = 10
    assert all(0.0 <= c["gate_pass1"] <= 1.0 for c in info["gate"]["checks"])
    assert info["steps"] == 12 and (out / "model.safetensors").exists()
