"""The R1 pipeline's report pieces: gate attempts from done.json records, readability from stored eval
samples, and the per-run table."""
from __future__ import annotations

import json

import pytest

from r1kit.config import RunConfig
from r1kit.recipes.r1_report import attempts, general_rm_score, readability_of, results_table

R1 = " <think> 1+2: 1+2+0=3, so 3. summary: 1+2=3. </think> <answer> 3 </answer>"
ZERO = " <think> 1+2+0=3, 得 3, so 3. </think> <answer> 3 </answer>"


def test_attempts_counts_stage0_draws_and_sft_rounds():
    assert attempts({"eval": {}}) == 1  # no gate
    assert attempts({"gate": {"attempts": 3}}) == 3  # an SFT stage's gate (r1_gate)
    checks = [{"attempt": 0, "gate_pass1": 0.0}, {"attempt": 1, "gate_pass1": 0.2}]  # pretrain_base's records
    assert attempts({"pretrain": {"gate": {"checks": checks}}}) == 2
    assert attempts({"pretrain": {"gate": {"checks": checks[:1]}}}) == 1


def test_readability_of_reads_a_stage_eval_samples(tmp_path):
    assert readability_of(tmp_path, "en") == {}
    (tmp_path / "eval").mkdir()
    lines = [json.dumps({"completion": t, "problem_id": str(i)}, ensure_ascii=False) for i, t in enumerate([R1, ZERO, R1, R1])]
    (tmp_path / "eval" / "samples.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    r = readability_of(tmp_path, "en")
    assert r["readability"] == pytest.approx(0.75) and r["mixing_rate"] == pytest.approx(0.25)
    assert r["fixed_format_rate"] == pytest.approx(0.75)


def test_results_table_has_readability_and_attempts_columns():
    ev = {"pass1": 0.5, "cons": 0.6, "format_rate": 1.0, "mixing_rate": 0.25, "off_target_rate": 0.25, "mean_length": 40.0,
          "readability": 0.75, "repetition_rate": 0.0, "general_pass1": 0.1}
    table = results_table({"cold_sft": {"eval": ev, "gate": {"attempts": 2}}, "zero": {"eval": {**ev, "readability": 0.0}}},
                          RunConfig())
    header = next(line for line in table.splitlines() if line.startswith("| model"))
    cols = [c.strip() for c in header.strip("|").split("|")]
    row = next(line for line in table.splitlines() if "cold-start" in line)
    cells = dict(zip(cols, (c.strip() for c in row.strip("|").split("|"))))
    assert cells["readable"] == "0.750" and cells["attempts"] == "2" and cells["pass@1"] == "0.500"
    zero = dict(zip(cols, (c.strip() for c in next(line for line in table.splitlines() if "R1-Zero" in line).strip("|").split("|"))))
    assert zero["readable"] == "0.000" and zero["attempts"] == "1"


def test_general_rm_score_scores_stored_general_samples(tmp_path):
    """Mean reward-model score of a stage's held-out general samples, split by exact correctness; the same
    numbers as scoring those prompts and completions directly."""
    import torch

    from r1kit.config import ModelConfig
    from r1kit.model import save_model
    from r1kit.config import PipelineConfig, RunConfig
    from r1kit.recipes.sampling import general_task
    from r1kit.rewards.reward_model import RewardModelScorer
    from r1kit.templates import render_prompt
    from r1kit.trainers.reward_model import build_reward_model
    from tests.helpers import tiny_pair

    tok = tiny_pair()[1]
    torch.manual_seed(0)
    rm = build_reward_model(None, tok, ModelConfig(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=2, intermediate_size=64))
    save_model(rm, tok, tmp_path / "rm")
    cfg = RunConfig(pipeline=PipelineConfig(general_test=4, general_digits=[3, 3]))
    assert general_rm_score(tmp_path / "stage", tmp_path / "rm", cfg) == {}
    probs = general_task(cfg).test_problems()  # the run's general prompts: its digits
    comps = [f" <think></think> <answer> {probs[0].answer} </answer>", " 12", f" <answer> {probs[2].answer} </answer>"]
    recs = [{"problem_id": probs[i].id, "completion": c, "correct": i == 0} for i, c in enumerate(comps)]
    (tmp_path / "stage" / "eval_general").mkdir(parents=True)
    (tmp_path / "stage" / "eval_general" / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    got = general_rm_score(tmp_path / "stage", tmp_path / "rm", cfg)
    direct = RewardModelScorer(tmp_path / "rm", template="r1_zero").score([render_prompt(probs[i].question, "r1_zero") for i in range(3)], comps)
    assert all(0 < s < 1 for s in direct) and got["samples"] == 3
    assert got["rm_score"] == pytest.approx(sum(direct) / 3, abs=1e-6)
    assert got["rm_score_right"] == pytest.approx(direct[0], abs=1e-6)
    assert got["rm_score_wrong"] == pytest.approx((direct[1] + direct[2]) / 2, abs=1e-6)
