"""The SFT stages' readiness gate (r1kit.recipes.r1_gate): retry below the threshold, keep the best attempt,
extend from the last attempt or restart from the stage's init, resume a killed gated stage, record attempts."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from r1kit.config import RunConfig, from_dict
from r1kit.recipes import r1, r1_gate
from r1kit.types import R1KitError

MICRO = {
    "name": "micro", "seed": 0, "threads": 1,
    "model": {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "num_kv_heads": 2, "intermediate_size": 48,
              "vocab_size": 300, "max_position_embeddings": 160},
    "task": {"name": "arithmetic", "options": {"min_digits": 1, "max_digits": 1, "num_test": 6}},
    "pretrain": {"corpus_docs": 300, "steps": 30, "batch_size": 16, "lr": 3e-3, "warmup_steps": 5},
    "eval": {"num_problems": 4, "k": 2, "max_new_tokens": 48},
    "log": {"progress": False, "tensorboard": False},
    "sft": {"epochs": 1, "lr": 3e-3, "seq_len": 128, "micro_batch_size": 8, "cold_start_examples": 24, "save_every": 2},
    "pipeline": {"general_test": 0, "sft_gate_problems": 4, "stages": ["base", "cold_sft"]},
}


@pytest.fixture(autouse=True, scope="module")
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def base_model(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("base")
    cfg = from_dict(RunConfig, {**MICRO, "output_dir": str(root)})
    rec = r1.run_stage(cfg, "base", log=lambda s: None)
    return root / "micro" / rec["model"]


def gated(root: Path, base: Path, **pipeline) -> RunConfig:
    cfg = from_dict(RunConfig, {**MICRO, "output_dir": str(root), "model": {**MICRO["model"], "path": str(base)}})
    return replace(cfg, pipeline=replace(cfg.pipeline, **pipeline))


def scripted(monkeypatch, scores):
    """Replace the readiness check by scripted scores; returns the model folders it was asked about."""
    asked: list[Path] = []

    def check(ctx, model_dir):
        asked.append(Path(model_dir))
        return scores[len(asked) - 1]

    monkeypatch.setattr(r1_gate, "sft_readiness", check)
    return asked


def first_loss(stage_dir: Path) -> float:
    return json.loads((stage_dir / "metrics.jsonl").read_text().splitlines()[0])["loss"]


def test_below_the_gate_extends_until_max_attempts_and_keeps_the_best(tmp_path, base_model, monkeypatch):
    asked = scripted(monkeypatch, [0.2, 0.6, 0.4])
    cfg = gated(tmp_path, base_model, sft_gate_pass1=0.9, sft_max_attempts=3)
    rec = r1.run_pipeline(cfg, log=lambda s: None)["cold_sft"]
    sdir = tmp_path / "micro" / "cold_sft"
    assert asked == [sdir / "model", sdir / "attempt1" / "model", sdir / "attempt2" / "model"]
    g = rec["gate"]
    assert g["attempts"] == 3 and g["kept_attempt"] == 1 and not g["passed"]
    assert [c["gate_pass1"] for c in g["checks"]] == [0.2, 0.6, 0.4]
    assert rec["model"] == "cold_sft/attempt1/model"
    # "extend": each attempt starts from the last one's model, so its first loss is below attempt 0's
    assert first_loss(sdir / "attempt1") < first_loss(sdir) and first_loss(sdir / "attempt2") < first_loss(sdir)
    # a rerun skips the finished stage; the same stage resumed after a kill reuses every stored check
    (sdir / "done.json").unlink()
    scripted(monkeypatch, [])  # any check now would fail: all three are stored
    again = r1.run_stage(cfg, "cold_sft", log=lambda s: None)
    assert again["gate"] == g and again["model"] == rec["model"]


def test_a_passing_attempt_stops_the_retries_and_restart_starts_from_init(tmp_path, base_model, monkeypatch):
    asked = scripted(monkeypatch, [0.5, 0.95])
    cfg = gated(tmp_path, base_model, sft_gate_pass1=0.9, sft_max_attempts=4, sft_gate_action="restart")
    rec = r1.run_pipeline(cfg, log=lambda s: None)["cold_sft"]
    sdir = tmp_path / "micro" / "cold_sft"
    assert len(asked) == 2 and rec["gate"]["passed"] and rec["gate"]["kept_attempt"] == 1
    assert not (sdir / "attempt2").exists()
    # "restart": attempt 1 starts from the base again (same init, another batch order): no head start
    assert first_loss(sdir / "attempt1") == pytest.approx(first_loss(sdir), rel=0.25)


def test_gate_off_or_ungated_stage_trains_once_and_the_real_check_measures_pass1(tmp_path, base_model, monkeypatch):
    cfg = gated(tmp_path, base_model)  # sft_gate_pass1 = 0: one attempt, no check, no gate record
    rec = r1.run_pipeline(cfg, log=lambda s: None)["cold_sft"]
    assert "gate" not in rec and not (tmp_path / "micro" / "cold_sft" / "attempt1").exists()
    ctx = r1.StageContext("cold_sft", cfg, tmp_path / "micro", tmp_path / "micro" / "cold_sft", {}, {}, 0)
    score = r1_gate.sft_readiness(ctx, tmp_path / "micro" / "cold_sft" / "model")
    assert 0.0 <= score <= 1.0 and (score * 4 * 4) == pytest.approx(round(score * 16))  # 4 problems x 4 samples
    # the settings enter the SFT stages' identities (the gate changes what the stage produces)
    on = replace(cfg, pipeline=replace(cfg.pipeline, sft_gate_pass1=0.9))
    parents = {"base": {"identity": "x"}}
    assert r1.stage_identity(on, r1.STAGES["sft"], parents, {}) != r1.stage_identity(cfg, r1.STAGES["sft"], parents, {})
    with pytest.raises(R1KitError, match="pipeline.sft_gate_action"):
        r1_gate.validate_gate(replace(cfg.pipeline, sft_gate_action="again"))
    with pytest.raises(R1KitError, match="pipeline.sft_max_attempts"):
        r1_gate.validate_gate(replace(cfg.pipeline, sft_max_attempts=0))
