"""Stage 0: length-bucketed batches and their loss weighting, the cosine schedule, the readiness gate's two
actions (warm-restart cycles on the same model, fresh attempts) and its errors."""
from __future__ import annotations

import json
import random

import pytest
import torch
from safetensors.torch import load_file

from r1kit.config import PretrainConfig, RunConfig, load_config
from r1kit.corpus import build_corpus
from r1kit.policy import Policy
from r1kit.recipes.zero import ensure_base_model
from r1kit.tasks import make_task
from r1kit.trainers.pretrain import Schedule, batch_loss, batches, lr_at, pretrain
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
        seen.append(m.module.training)
        return next(scores)

    cfg = PretrainConfig(steps=8, batch_size=4, warmup_steps=2, gate_pass1=0.5, extend_steps=4, max_steps=100)
    log = pretrain(Policy(model, tok), _docs(), cfg, seed=0, show_progress=False, check=check)
    gates = [(r["step"], r["gate_pass1"], r["passed"]) for r in log if "gate_pass1" in r]
    assert gates == [(8, 0.1, False), (12, 0.2, False), (16, 0.9, True)]
    assert max(r["step"] for r in log if "loss" in r) == 15
    assert seen == [True, True, True]  # the check gets the model as it trains; it may switch it to eval itself
    assert not model.training


def test_pretrain_that_never_passes_stops_at_the_cap():
    model, tok = tiny_pair()
    cfg = PretrainConfig(steps=6, batch_size=4, warmup_steps=2, gate_pass1=0.5, extend_steps=4, max_steps=15)
    log = pretrain(Policy(model, tok), _docs(), cfg, seed=0, show_progress=False, check=lambda m: 0.0)
    assert [r["step"] for r in log if "gate_pass1" in r] == [6, 10, 14]  # a fourth cycle would end at 18 > 15
    assert max(r["step"] for r in log if "loss" in r) == 13


def test_without_the_gate_the_model_is_never_checked():
    model, tok = tiny_pair()

    def check(m):
        raise AssertionError("called")

    log = pretrain(Policy(model, tok), _docs(), PretrainConfig(steps=5, batch_size=4, warmup_steps=2), seed=0,
                   show_progress=False, check=check)
    assert max(r["step"] for r in log) == 4 and not any("gate_pass1" in r for r in log)


@pytest.mark.parametrize("field, value, words", [
    ("gate_pass1", 1.5, "pretrain.gate_pass1"), ("restart_lr_scale", 0.0, "pretrain.restart_lr_scale"),
    ("extend_steps", 0, "pretrain.extend_steps"), ("steps", 0, "pretrain.steps"),
    ("gate_action", "retry", "pretrain.gate_action = 'retry': expected 'restart' or 'extend'"),
    ("bucket_pool", 0, "pretrain.bucket_pool = 0: expected at least 1"),
    ("max_steps", 4, r"pretrain.max_steps = 4: expected at least pretrain.steps \(5\)"),
])
def test_bad_pretrain_settings_name_the_field(field, value, words):
    model, tok = tiny_pair()
    cfg = PretrainConfig(**{"steps": 5, "batch_size": 4, field: value})
    with pytest.raises(R1KitError, match=words):
        pretrain(Policy(model, tok), _docs(), cfg, seed=0, show_progress=False, check=lambda m: 1.0)


def test_gate_without_a_check_is_an_error():
    model, tok = tiny_pair()
    with pytest.raises(R1KitError, match="readiness check"):
        pretrain(Policy(model, tok), _docs(), PretrainConfig(steps=5, batch_size=4, gate_pass1=0.5), seed=0, show_progress=False)


def test_stage0_with_the_gate_records_every_check(tmp_path):
    cfg = load_config(RunConfig, None, [
        f"output_dir={tmp_path}", "name=g", "threads=1", "task.options={min_digits: 1, max_digits: 1, num_test: 10}",
        "model.hidden_size=32", "model.num_layers=1", "model.num_heads=2", "model.num_kv_heads=2",
        "model.intermediate_size=64", "model.vocab_size=300", "pretrain.corpus_docs=200", "pretrain.steps=6",
        "pretrain.batch_size=8", "pretrain.warmup_steps=2", "pretrain.gate_pass1=1.0", "pretrain.extend_steps=3",
        "pretrain.gate_action=extend",
        "pretrain.max_steps=12", "pretrain.gate_problems=4", "grpo.max_new_tokens=16"])
    with pytest.warns(UserWarning, match="did not reach pass@1 1.0 within pretrain.max_steps=12"):
        out = ensure_base_model(cfg, show_progress=False)
    info = json.loads((out / "pretrain.json").read_text())
    assert info["gate"]["threshold"] == 1.0 and info["gate"]["passed"] is False
    assert [c["step"] for c in info["gate"]["checks"]] == [6, 9, 12]
    assert all(0.0 <= c["gate_pass1"] <= 1.0 for c in info["gate"]["checks"])
    assert info["steps"] == 12 and (out / "model.safetensors").exists()


def test_bucketed_batches_partition_each_draw_by_length():
    encoded = [[1] * n for n in random.Random(3).choices(range(2, 40), k=50)]
    draws = batches(encoded, 3, 4, random.Random(0))
    group = [next(draws) for _ in range(4)]  # one draw: 12 documents, no document twice
    ids = [id(d) for b in group for d in b]
    assert len(set(ids)) == 12 and all(len(b) == 3 for b in group)
    spans = sorted((min(map(len, b)), max(map(len, b))) for b in group)
    assert all(hi <= lo_next for (_, hi), (lo_next, _) in zip(spans, spans[1:]))  # batches do not interleave
    plain, rng = batches(encoded, 3, 1, random.Random(0)), random.Random(0)
    assert [next(plain) for _ in range(5)] == [rng.sample(encoded, 3) for _ in range(5)]  # pool 1: plain batches


def test_bucketed_objective_weighs_every_token_as_one_mixed_batch_does():
    """Over a draw that covers the corpus, the bucketed batches' objectives (sum / expected tokens) add up to
    the per-token mean of one batch holding every document: float64 gradients agree."""
    model, tok = tiny_pair()
    model = model.double()
    encoded = [tok(d.prompt + d.completion + tok.eos_token).input_ids for d in _docs(8)]
    assert len({len(e) for e in encoded}) > 2
    per = 2 * sum(len(e) - 1 for e in encoded) / len(encoded)
    draws = batches(encoded, 2, 4, random.Random(1))
    model.zero_grad()
    for _ in range(4):
        (batch_loss(model, next(draws), tok.pad_token_id, per)[0] / 4).backward()
    bucketed = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    objective, mean = batch_loss(model, encoded, tok.pad_token_id)
    assert torch.equal(objective.detach(), mean)
    objective.backward()
    for g, ref in zip(bucketed, (p.grad for p in model.parameters())):
        torch.testing.assert_close(g, ref, rtol=1e-10, atol=1e-12)


def _gated(tmp_path, name, *extra):
    return load_config(RunConfig, None, [
        f"output_dir={tmp_path}", f"name={name}", "threads=1",
        "task.options={min_digits: 1, max_digits: 1, num_test: 10}", "model.hidden_size=32", "model.num_layers=1",
        "model.num_heads=2", "model.num_kv_heads=2", "model.intermediate_size=64", "model.vocab_size=300",
        "pretrain.corpus_docs=200", "pretrain.steps=6", "pretrain.batch_size=8", "pretrain.warmup_steps=2",
        "pretrain.gate_problems=4", "grpo.max_new_tokens=16", *extra])


def _scripted_gate(monkeypatch, scores):
    from r1kit.recipes import zero

    it = iter(scores)
    monkeypatch.setattr(zero, "readiness_check", lambda cfg, tok, task: lambda model: next(it))


def test_a_failed_attempt_restarts_on_a_new_corpus_init_and_batch_order(tmp_path, monkeypatch, capsys):
    _scripted_gate(monkeypatch, [0.1, 0.6])
    cfg = _gated(tmp_path, "r", "pretrain.gate_pass1=0.5", "pretrain.max_steps=100")
    info = json.loads((ensure_base_model(cfg, show_progress=False) / "pretrain.json").read_text())
    assert "attempt 0: sampled pass@1 0.100 is below the readiness gate 0.5; starting attempt 1" in capsys.readouterr().err
    gate = info["gate"]
    assert [(c["attempt"], c["step"], c["gate_pass1"]) for c in gate["checks"]] == [(0, 6, 0.1), (1, 6, 0.6)]
    assert gate["passed"] and gate["kept_attempt"] == 1 and info["steps"] == 6 and info["total_steps"] == 12
    plain = ensure_base_model(_gated(tmp_path, "plain"), show_progress=False)
    kept, first = load_file(tmp_path / "r" / "base" / "model.safetensors"), load_file(plain / "model.safetensors")
    assert any(not torch.equal(kept[k], first[k]) for k in first)  # attempt 1 is another model


def test_when_every_attempt_fails_the_best_one_is_kept_and_it_is_the_plain_run(tmp_path, monkeypatch):
    _scripted_gate(monkeypatch, [0.3, 0.1, 0.2])
    cfg = _gated(tmp_path, "r", "pretrain.gate_pass1=0.5", "pretrain.max_steps=20")  # room for 3 attempts, not 4
    with pytest.warns(UserWarning, match="did not reach pass@1 0.5 within pretrain.max_steps=20 \\(best 0.300, kept\\)"):
        out = ensure_base_model(cfg, show_progress=False)
    info = json.loads((out / "pretrain.json").read_text())
    assert info["gate"]["kept_attempt"] == 0 and info["total_steps"] == 18 and not info["gate"]["passed"]
    plain = ensure_base_model(_gated(tmp_path, "plain"), show_progress=False)  # no gate: attempt 0 alone
    kept, first = load_file(out / "model.safetensors"), load_file(plain / "model.safetensors")
    assert kept.keys() == first.keys() and all(torch.equal(kept[k], first[k]) for k in first)


def test_a_chain_of_thought_reasons_when_it_has_at_least_16_characters():
    from r1kit.evaluation.metrics import SampleRecord
    from r1kit.recipes.zero import reasoned_accuracy, reasons

    worked = " <think> 123+456: 3+6=9, so 9. 2+5=7, so 7. </think> <answer> 579 </answer>"
    assert reasons(worked) and reasons(" <think> 123+456: 3+6=9, so 9. 2+5=7")  # never closed: to the end
    assert not reasons(" <think> easy. </think> <answer> 579 </answer>") and not reasons("<think></think> 5")
    assert not reasons("no think tag at all, however long this text runs on")
    rec = lambda text, ok: SampleRecord("p", 0, text, "579", ok, "", 10, False, True, False)  # noqa: E731
    records = [rec(worked, True), rec(worked, False), rec(worked, True), rec(" <think> easy. </think>", True)]
    assert reasoned_accuracy(records) == (3, 2 / 3)
    assert reasoned_accuracy(records[3:]) == (0, 0.0)


def test_a_base_right_only_on_its_direct_answers_is_pretrained_again(tmp_path, monkeypatch, capsys):
    """r1-tiny's seed-1 base passed pass@1 on direct answers while its worked solutions miscopied the question:
    with pretrain.gate_reasoned_pass1 the attempt whose reasoning is right is kept, though its pass@1 is lower."""
    _scripted_gate(monkeypatch, [{"gate_pass1": 0.3, "reasoned_pass1": 0.2, "reasoned": 40},
                                 {"gate_pass1": 0.1, "reasoned_pass1": 0.7, "reasoned": 30}])
    cfg = _gated(tmp_path, "r", "pretrain.gate_pass1=0.05", "pretrain.gate_reasoned_pass1=0.5", "pretrain.max_steps=100")
    info = json.loads((ensure_base_model(cfg, show_progress=False) / "pretrain.json").read_text())
    err = capsys.readouterr().err
    assert "attempt 0: pass@1 0.200 of the samples that reason is below the readiness gate 0.5; starting attempt 1" in err
    gate = info["gate"]
    assert [(c["attempt"], c["reasoned_pass1"], c["passed"]) for c in gate["checks"]] == [(0, 0.2, False), (1, 0.7, True)]
    assert gate["kept_attempt"] == 1 and gate["passed"] and gate["reasoned_threshold"] == 0.5


def test_when_no_attempt_passes_the_one_closest_to_the_gate_is_kept(tmp_path, monkeypatch):
    # ratios to (0.05, 0.5): attempt 0 (2.0, 0.4) -> 0.4; attempt 1 (6.0, 0.2) -> 0.2, despite its pass@1
    _scripted_gate(monkeypatch, [{"gate_pass1": 0.1, "reasoned_pass1": 0.2, "reasoned": 4},
                                 {"gate_pass1": 0.3, "reasoned_pass1": 0.1, "reasoned": 4}])
    cfg = _gated(tmp_path, "r", "pretrain.gate_pass1=0.05", "pretrain.gate_reasoned_pass1=0.5", "pretrain.max_steps=12")
    with pytest.warns(UserWarning, match=r"did not reach pass@1 0.05 \(and 0.5 on the samples that reason\)"):
        out = ensure_base_model(cfg, show_progress=False)
    assert json.loads((out / "pretrain.json").read_text())["gate"]["kept_attempt"] == 0


def test_the_real_readiness_check_reports_the_samples_that_reason(tmp_path):
    cfg = _gated(tmp_path, "r", "pretrain.gate_pass1=0.01", "pretrain.gate_reasoned_pass1=1.0", "pretrain.max_steps=6")
    with pytest.warns(UserWarning, match="did not reach"):  # an untrained model's reasoning is not right every time
        out = ensure_base_model(cfg, show_progress=False)
    (check,) = json.loads((out / "pretrain.json").read_text())["gate"]["checks"]
    assert 0 <= check["reasoned"] <= 4 * 8 and 0.0 <= check["reasoned_pass1"] <= 1.0 and check["passed"] is False


def test_bad_reasoned_gate_and_a_check_without_it_are_named():
    model, tok = tiny_pair()
    with pytest.raises(R1KitError, match=r"pretrain.gate_reasoned_pass1 = 2.0: expected in \[0, 1\]"):
        pretrain(Policy(model, tok), _docs(), PretrainConfig(steps=5, batch_size=4, gate_reasoned_pass1=2.0), seed=0,
                 show_progress=False)
    cfg = PretrainConfig(steps=5, batch_size=4, warmup_steps=2, gate_pass1=0.5, gate_reasoned_pass1=0.5)
    with pytest.raises(R1KitError, match="needs a readiness check that reports reasoned_pass1"):
        pretrain(Policy(model, tok), _docs(), cfg, seed=0, show_progress=False, check=lambda m: 1.0)
