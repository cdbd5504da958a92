"""The evaluation runner and `r1kit eval`: records, grading under a time limit, resume, outputs, CLI."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from r1kit.config import ModelConfig
from r1kit.engine import Engine
from r1kit.evaluation import evaluate_problems, summarize
from r1kit.evaluation.cli import main as eval_main
from r1kit.evaluation.runner import chunk_generator
from r1kit.model import build_tiny_model, save_model, train_tokenizer
from r1kit.rewards import mathverify
from r1kit.tasks import make_task
from r1kit.templates import render_prompt
from r1kit.types import Problem, R1KitError, Rollout

OUTPUTS = ("samples.jsonl", "summary.json", "summary.md", "pass_at_k.png", "eval_config.json")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(model, tokenizer, saved folder) of a randomly initialised 1-layer Llama."""
    texts = ["User: 1234+5678\nAssistant: <think> 4+8+0=12, carry 1 </think> <answer> 6912 </answer>",
             "Find x: \\boxed{\\frac{1}{2}} so the answer is $x^2 + 3$.", "wait, let me verify the sum"] * 4
    tok = train_tokenizer(texts, vocab_size=300)
    torch.manual_seed(0)
    cfg = ModelConfig(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=2, intermediate_size=64,
                      max_position_embeddings=2048)
    model = build_tiny_model(cfg, tok).eval()
    path = tmp_path_factory.mktemp("tiny") / "model"
    save_model(model, tok, path)
    return model, tok, path


def engine_for(model, tok) -> Engine:
    return Engine(model, eos_token_ids=[tok.eos_token_id], pad_token_id=tok.pad_token_id)


class ScriptedEngine:
    """Stands in for the Engine: returns given completion texts (encoded, EOS appended) per question."""

    def __init__(self, tok, template: str, script: dict[str, list[str]]):
        self.tok, self.eos_token_ids = tok, [tok.eos_token_id]
        self.by_prompt = {tuple(tok(render_prompt(q, template)).input_ids): texts for q, texts in script.items()}

    def generate(self, prompts, *, group_size, max_new_tokens, temperature=1.0, top_p=1.0, generator=None):
        rows = [self.tok(t).input_ids + [self.tok.eos_token_id] for p in prompts for t in self.by_prompt[tuple(p)]]
        assert len(rows) == len(prompts) * group_size
        rows = [r[:max_new_tokens] for r in rows]
        width = max(map(len, rows))
        ids = torch.full((len(rows), width), self.tok.pad_token_id)
        mask = torch.zeros(len(rows), width)
        for i, r in enumerate(rows):
            ids[i, : len(r)], mask[i, : len(r)] = torch.tensor(r), 1.0
        truncated = torch.tensor([r[-1] != self.tok.eos_token_id for r in rows])
        n = len(rows)
        return Rollout(torch.zeros(n, 1, dtype=torch.long), torch.ones(n, 1, dtype=torch.long), ids, mask,
                       torch.zeros(n, width), truncated, group_size)


# ----------------------------------------------------------------------------- records and metrics


def test_records_carry_text_answer_verdict_and_length(tiny):
    _, tok, _ = tiny
    problems = [Problem("p0", "1234+5678", "6912", "numeric", meta={"digits": 4}),
                Problem("p1", "12+34", "46", "numeric", meta={"digits": 2})]
    script = {
        "1234+5678": ["<think> wait, check </think> <answer> 6,912 </answer>", "so it is 6912", "no idea at all"],
        "12+34": ["<think> 2+4 </think> <answer> 47 </answer>", "<answer>46</answer>", "x " * 60],
    }
    s = evaluate_problems(ScriptedEngine(tok, "r1_zero", script), tok, problems, k=3, max_new_tokens=40,
                          pass_k=(1, 2, 3), by=("digits",))
    got = {(r.problem_id, r.sample): r for r in s.records}
    r = got["p0", 0]
    assert (r.completion, r.answer, r.correct, r.reason) == (script["1234+5678"][0], "6,912", True, "correct")
    assert (r.well_formed, r.reflection, r.truncated) == (True, True, False)
    assert r.length == len(tok(r.completion).input_ids) + 1  # the EOS token counts, its text is stripped
    assert (got["p0", 1].answer, got["p0", 1].correct) == ("6912", True)  # lenient extraction: last number
    assert (got["p0", 2].answer, got["p0", 2].reason) == (None, "no answer")
    assert (got["p1", 0].correct, got["p1", 0].reason) == (False, "wrong value")
    assert got["p1", 2].truncated and got["p1", 2].length == 40
    assert s.pass1 == pytest.approx((2 / 3 + 1 / 3) / 2)
    # cons@3: p0's "6,912" and "6912" are one group of two (right); p1's 47 / 46 / none tie, 47 came first
    assert s.cons == 0.5
    assert s.by["digits"] == {"2": {"num_problems": 1, "pass1": pytest.approx(1 / 3), "cons": 0.0},
                              "4": {"num_problems": 1, "pass1": pytest.approx(2 / 3), "cons": 1.0}}
    assert s.pass_at_k[3] == 1.0 and s.no_answer_rate == pytest.approx(2 / 6) and s.truncated_rate == pytest.approx(1 / 6)
    again = summarize(s.records, problems, k=3, pass_k=(1, 2, 3), by=("digits",), settings=s.settings)
    assert again.to_dict() == s.to_dict()  # the summary is a function of the records alone


def test_an_adversarial_completion_cannot_hang_the_evaluation(tiny):
    _, tok, _ = tiny
    mathverify.warm_up()  # worker start-up is not part of the time limit being tested
    problems = [Problem("m0", "Compute 2+3.", "5", "math"), Problem("m1", "Compute 1/2.", "\\frac{1}{2}", "math")]
    script = {"Compute 2+3.": ["<answer>9^{9^{9^{9}}}</answer>", "<answer>8^{8^{8^{8}}}</answer>"],
              "Compute 1/2.": ["<answer>0.5</answer>", "<answer>\\frac{2}{4}</answer>"]}
    start = time.perf_counter()
    s = evaluate_problems(ScriptedEngine(tok, "r1_zero", script), tok, problems, k=2, grade_timeout_s=1.0)
    elapsed = time.perf_counter() - start
    # math-verify would stall ~5 s each; the static pre-check refuses both at once
    assert [r.reason.split(":")[0] for r in s.records[:2]] == ["too costly", "too costly"]
    assert s.pass1 == 0.5 and s.cons == 0.5
    assert elapsed < 8.0  # two 1 s limits in parallel + worker restarts, with room for a loaded machine


# ----------------------------------------------------------------------------- determinism and resume


def arithmetic_problems(n=5):
    return make_task("arithmetic", num_test=n).test_problems()


def run_kwargs(**kw):
    return dict(k=2, max_new_tokens=8, temperature=1.0, top_p=0.9, batch_prompts=2, seed=3, pass_k=(1, 2)) | kw


def test_sampling_is_deterministic_per_seed(tiny):
    model, tok, _ = tiny
    problems = arithmetic_problems(3)
    a = evaluate_problems(engine_for(model, tok), tok, problems, **run_kwargs())
    b = evaluate_problems(engine_for(model, tok), tok, problems, **run_kwargs())
    c = evaluate_problems(engine_for(model, tok), tok, problems, **run_kwargs(seed=4))
    assert a.records == b.records
    assert [r.completion for r in a.records] != [r.completion for r in c.records]
    assert torch.equal(torch.rand(4, generator=chunk_generator(0, 1)), torch.rand(4, generator=chunk_generator(0, 1)))
    assert not torch.equal(torch.rand(4, generator=chunk_generator(0, 1)), torch.rand(4, generator=chunk_generator(0, 2)))


class Interrupt(Exception):
    pass


class FailingEngine:
    """The real engine until its `fail_at`-th generate call, which raises (a crash mid-evaluation)."""

    def __init__(self, engine, fail_at):
        self.engine, self.fail_at, self.calls = engine, fail_at, 0
        self.eos_token_ids = engine.eos_token_ids

    def generate(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.fail_at:
            raise Interrupt
        return self.engine.generate(*args, **kwargs)


def read_outputs(out: Path) -> dict[str, bytes]:
    return {name: (out / name).read_bytes() for name in OUTPUTS}


def test_an_interrupted_evaluation_resumes_to_the_same_outputs(tiny, tmp_path):
    model, tok, _ = tiny
    problems = arithmetic_problems(5)  # 3 chunks of 2, 2, 1 prompts
    full = evaluate_problems(engine_for(model, tok), tok, problems, out_dir=tmp_path / "full", **run_kwargs())

    out = tmp_path / "resumed"
    with pytest.raises(Interrupt):
        evaluate_problems(FailingEngine(engine_for(model, tok), 2), tok, problems, out_dir=out, **run_kwargs())
    assert len((out / "samples.jsonl").read_text().splitlines()) == 2 * 2  # only the first chunk landed
    # A crash while writing the second chunk: a whole problem, half a problem and a torn line.
    lines = (tmp_path / "full" / "samples.jsonl").read_text().splitlines(keepends=True)
    with open(out / "samples.jsonl", "a") as f:
        f.write("".join(lines[4:7]) + lines[7][:25])

    counting = FailingEngine(engine_for(model, tok), fail_at=0)
    resumed = evaluate_problems(counting, tok, problems, out_dir=out, **run_kwargs())
    assert counting.calls == 2  # the first chunk was reused, not sampled again
    assert resumed.records == full.records
    assert read_outputs(out) == read_outputs(tmp_path / "full")  # samples, summary, markdown, plots

    # Finished: a third run samples nothing and reports the same.
    again = FailingEngine(engine_for(model, tok), fail_at=1)
    assert evaluate_problems(again, tok, problems, out_dir=out, **run_kwargs()).to_dict() == full.to_dict()


def test_resume_refuses_samples_drawn_with_other_settings(tiny, tmp_path):
    model, tok, _ = tiny
    problems = arithmetic_problems(2)
    evaluate_problems(engine_for(model, tok), tok, problems, out_dir=tmp_path, **run_kwargs())
    with pytest.raises(R1KitError, match="temperature: 1.0 there, 0.5 now"):
        evaluate_problems(engine_for(model, tok), tok, problems, out_dir=tmp_path, **run_kwargs(temperature=0.5))


def test_bad_arguments_are_named(tiny):
    model, tok, _ = tiny
    engine, problems = engine_for(model, tok), arithmetic_problems(2)
    with pytest.raises(R1KitError, match="pass@k"):
        evaluate_problems(engine, tok, problems, k=2, pass_k=(4,))
    with pytest.raises(R1KitError, match="unique"):
        evaluate_problems(engine, tok, problems + problems[:1], k=2)
    with pytest.raises(R1KitError, match="no problems"):
        evaluate_problems(engine, tok, [], k=2)
    with pytest.raises(R1KitError, match="do not fit the model's context"):
        evaluate_problems(engine, tok, problems, k=1, max_new_tokens=2040)


# ----------------------------------------------------------------------------- r1kit eval


def check_outputs(out: Path, num_problems: int, k: int) -> dict:
    for name in OUTPUTS:
        assert (out / name).stat().st_size > 0, name
    lines = (out / "samples.jsonl").read_text().splitlines()
    assert len(lines) == num_problems * k
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_problems"] == num_problems and summary["k"] == k
    assert "| pass@1" in (out / "summary.md").read_text()
    return summary


def test_cli_on_the_synthetic_arithmetic_task(tiny, tmp_path, capsys):
    _, _, path = tiny
    argv = ["--model", str(path), "--benchmark", "arithmetic", "--limit", "5", "--k", "2", "--max-new-tokens", "16",
            "--pass-k", "1,2", "--out", str(tmp_path), "--quiet", "--device", "cpu"]
    assert eval_main(argv) == 0
    summary = check_outputs(tmp_path, 5, 2)
    assert set(summary["pass_at_k"]) == {"1", "2"}
    assert "pass@1" in capsys.readouterr().out


def test_cli_on_math500(tiny, tmp_path, data_dir):
    _, _, path = tiny
    argv = ["--model", str(path), "--benchmark", "math500", "--limit", "5", "--k", "2", "--max-new-tokens", "16",
            "--by", "subject,level", "--out", str(tmp_path), "--quiet", "--device", "cpu"]
    assert eval_main(argv) == 0
    summary = check_outputs(tmp_path, 5, 2)
    assert set(summary["by"]) == {"subject", "level"}
    assert set(summary["pass_at_k"]) == {"1", "2"}  # the default: powers of two up to --k
    assert sum(c["num_problems"] for c in summary["by"]["level"].values()) == 5
    assert (tmp_path / "accuracy_by_level.png").exists() and (tmp_path / "accuracy_by_subject.png").exists()


def test_cli_on_a_users_file_and_user_errors(tiny, tmp_path, capsys):
    _, _, path = tiny
    data = tmp_path / "mine.jsonl"
    data.write_text("\n".join(json.dumps({"q": f"{i}+{i}", "a": str(2 * i), "kind": "even" if i % 2 == 0 else "odd"})
                              for i in range(4)) + "\n")
    base = ["--model", str(path), "--k", "1", "--max-new-tokens", "4", "--quiet", "--device", "cpu"]
    argv = base + ["--data", str(data), "--problem-field", "q", "--answer-field", "a", "--answer-style", "numeric",
                   "--by", "kind", "--out", str(tmp_path / "out")]
    assert eval_main(argv) == 0
    assert set(check_outputs(tmp_path / "out", 4, 1)["by"]["kind"]) == {"even", "odd"}
    assert eval_main(base + ["--benchmark", "no_such_task"]) == 2
    assert "unknown task 'no_such_task'" in capsys.readouterr().err
    assert eval_main(base + ["--data", str(data), "--problem-field", "question"]) == 2
    assert "no field 'question'" in capsys.readouterr().err
