"""The command line, end to end on micro settings: zero (pretrain -> GRPO -> eval), generate, errors."""
import json

import pytest

from r1kit.cli import main

MICRO = ["model.hidden_size=32", "model.num_layers=1", "model.num_heads=2", "model.num_kv_heads=2",
         "model.intermediate_size=64", "model.vocab_size=300", "task.options={min_digits: 1, max_digits: 2, num_test: 20}",
         "pretrain.corpus_docs=300", "pretrain.steps=5", "pretrain.batch_size=8",
         "pretrain.max_steps=7", "pretrain.gate_problems=4", "grpo.steps=3",
         "grpo.prompts_per_step=4", "grpo.group_size=4", "grpo.max_new_tokens=12", "eval.num_problems=6", "eval.k=2",
         "eval.max_new_tokens=12", "eval.every=2", "log.save_every=2", "log.progress=false", "log.tensorboard=false"]


def test_zero_end_to_end_then_resume_and_generate(tmp_path, capsys):
    args = ["zero", f"output_dir={tmp_path}", "name=micro", *MICRO]
    assert main(args) == 0
    run = tmp_path / "micro"
    for f in ("config.yaml", "metrics.jsonl", "samples.jsonl", "curves.png", "summary.json",
              "base/config.json", "base/pretrain.json", "final/model.safetensors", "eval_final/samples.jsonl",
              "eval_base/summary.json"):
        assert (run / f).exists(), f
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 3 and 0 <= summary["final"]["pass1"] <= 1
    gate = summary["pretrain"]["gate"]  # zero-tiny's readiness gate ran once: a second 5-step attempt exceeds 7
    assert gate["threshold"] == 0.15 and [(c["attempt"], c["step"]) for c in gate["checks"]] == [(0, 5)]
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2, 3]  # step 0 = the base model's held-out evaluation
    assert "eval/pass1" in json.loads((run / "metrics.jsonl").read_text().splitlines()[2])
    # a finished run resumed does no more steps and keeps its metrics
    assert main(args + ["--resume"]) == 0
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 4
    capsys.readouterr()
    assert main(["generate", "--model", str(run / "final"), "--prompt", "1+2", "--n", "2", "--json",
                 "--max-new-tokens", "8"]) == 0
    rows = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert len(rows) == 2 and all(r["prompt"] == "1+2" and r["tokens"] <= 8 for r in rows)


@pytest.mark.parametrize("args, fragment", [
    (["zero", "grpo.nope=1"], "unknown config key 'grpo.nope'"),
    (["zero", "grpo.steps=ten"], "'grpo.steps': expected int"),
    (["zero", "missing.yaml"], "not found"),
    (["pretrain", "a.yaml", "b.yaml"], "unexpected argument"),
    (["generate", "--model", "/nonexistent/model", "--prompt", "x"], "/nonexistent/model"),
])
def test_errors_are_one_clear_message(args, fragment, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert fragment in err and "Traceback" not in err


def test_unknown_verb(capsys):
    assert main(["frobnicate"]) == 2
    assert "unknown command" in capsys.readouterr().err


def test_empty_heldout_is_an_error(tmp_path, capsys):
    assert main(["zero", f"output_dir={tmp_path}", *MICRO, "task.options={min_digits: 1, max_digits: 1, num_test: 0}"]) == 2
    assert "no held-out problems" in capsys.readouterr().err
