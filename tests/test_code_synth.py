"""R1-Zero on code: the synthetic function-from-examples task, its corpus styles, and the zero-code-tiny config."""
from __future__ import annotations

import random
from pathlib import Path

import pytest

from r1kit.config import RunConfig, load_config
from r1kit.corpus import build_corpus
from r1kit.rewards import score_completions
from r1kit.sandbox import get_pool
from r1kit.tasks import make_task
from r1kit.types import R1KitError

CONFIG = Path(__file__).resolve().parents[1] / "r1kit" / "configs" / "zero-code-tiny.yaml"


def test_splits_are_fixed_and_disjoint():
    task = make_task("code_synth")
    test = task.test_problems()
    assert len(test) == 120 and test == make_task("code_synth").test_problems()
    train = task.train_problems(2000, random.Random(0))
    assert not {p.id for p in train} & {p.id for p in test}
    p = test[0]
    a, b = p.meta["a"], p.meta["b"]
    assert p.question == f"f(1)={a + b}, f(2)={2 * a + b}, f(3)={3 * a + b}. Write f."
    assert p.tests.kind == "assert" and len(p.tests.asserts) == 5 and p.answer_style == "code"


def test_the_styles_score_as_designed_in_the_sandbox():
    """direct (fits f(1) only) always fails the hidden asserts; worked and reflect always pass."""
    task = make_task("code_synth")
    problems = task.train_problems(12, random.Random(1))
    styles = ("direct", "worked", "reflect")
    completions = [task.completion(p, s) for p in problems for s in styles]
    owners = [p for p in problems for _ in styles]
    scores = score_completions(completions, owners, {"code": 1.0, "format": 0.1})
    assert scores.per_fn["code"].tolist() == [0.0, 1.0, 1.0] * len(problems)
    assert scores.per_fn["format"].tolist() == [1.0] * len(completions)


def test_the_corpus_has_the_elicitation_mixture():
    task = make_task("code_synth")
    docs = build_corpus(task, 1000, 0.6, 0.1, "r1_zero", random.Random(0))
    counts = {s: sum(d.style == s for d in docs) for s in ("direct", "worked", "reflect")}
    assert 540 <= counts["direct"] <= 660 and 60 <= counts["reflect"] <= 140
    assert all("Write f." in d.prompt for d in docs)
    held = {p.question for p in task.test_problems()}
    assert not any(q in d.prompt for d in docs for q in held)


def test_bad_options_name_the_field():
    with pytest.raises(R1KitError, match="min_a"):
        make_task("code_synth", min_a=1)
    with pytest.raises(R1KitError, match="num_test"):
        make_task("code_synth", max_a=2, min_b=0, max_b=1, num_test=5)


def test_zero_code_tiny_uses_the_code_reward():
    cfg = load_config(RunConfig, CONFIG)
    assert cfg.task.name == "code_synth" and cfg.grpo.reward_weights == {"code": 1.0, "format": 0.1}
    make_task(cfg.task.name, **cfg.task.options)


@pytest.mark.slow
def test_r1kit_zero_code_tiny_runs_end_to_end(tmp_path, monkeypatch):
    """The whole recipe at toy size: pretrain, GRPO with the code reward in the sandbox, evaluations."""
    from r1kit.recipes.zero import run_zero

    assert get_pool().workers >= 1
    monkeypatch.chdir(tmp_path)
    cfg = load_config(RunConfig, CONFIG, ["pretrain.steps=20", "pretrain.corpus_docs=500", "pretrain.gate_pass1=0",
                                          "grpo.steps=2", "grpo.prompts_per_step=2", "grpo.group_size=4",
                                          "eval.num_problems=4", "eval.k=1", "model.hidden_size=32",
                                          "model.num_layers=1", "model.intermediate_size=64", "threads=1",
                                          "log.progress=false", "name=toy"])
    summary = run_zero(cfg)
    assert summary["steps"] == 2 and 0.0 <= summary["final"]["pass1"] <= 1.0
    assert (tmp_path / "runs" / "toy" / "metrics.jsonl").exists()


def test_distinct_train_problems_drops_repeats_and_keeps_a_clean_draw():
    """The readiness gate scores each problem once: seed 1's gate draw on code_synth repeats problems (a
    600-function train split), which made `r1kit zero zero-code-tiny seed=1` stop with "problem ids must be
    unique" after stage 0. The distinct draw tops up from the same rng; a draw without repeats is unchanged."""
    import random

    from r1kit.tasks import make_task
    from r1kit.tasks.base import distinct_train_problems

    task = make_task("code_synth")
    plain = task.train_problems(64, random.Random(1 + 104729))
    assert len({p.id for p in plain}) < 64  # the draw that failed
    got = distinct_train_problems(task, 64, random.Random(1 + 104729))
    assert len(got) == 64 and len({p.id for p in got}) == 64
    first = list(dict.fromkeys(p.id for p in plain))
    assert [p.id for p in got[: len(first)]] == first  # the repeats dropped, order kept, then the top-up
    clean = task.train_problems(64, random.Random(0 + 104729))
    assert len({p.id for p in clean}) == 64
    assert [p.id for p in distinct_train_problems(task, 64, random.Random(0 + 104729))] == [p.id for p in clean]
    tiny = make_task("code_synth", min_a=2, max_a=2, min_b=10, max_b=14, num_test=1)  # 4 train functions
    assert sorted(p.id for p in distinct_train_problems(tiny, 10, random.Random(0))) == \
        sorted(f"code-2-{b}" for b in range(10, 15) if f"code-2-{b}" not in {p.id for p in tiny.test_problems()})
