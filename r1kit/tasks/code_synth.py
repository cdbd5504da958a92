"""A synthetic code task for R1-Zero on a CPU: write the Python function that fits input -> output examples.

Each problem shows three examples of a linear function, `f(1)=24, f(2)=31, f(3)=38.`, and asks for `f`.
The answer is a program, `def f(x): return 7*x+17`, run in the sandbox against hidden asserts at other
inputs (0, 4, 7, 10, -2), so only the right slope *and* intercept pass: the `code` reward.

Like the arithmetic default, the task writes the three solution *styles* of its base corpus (see r1kit.corpus):
- `direct`: a guess that fits the first example only (`return x+23`): always wrong, since the slope is >= 2;
- `worked`: checks the examples: the slope from two of them, then the intercept, then the program;
- `reflect`: starts with the direct guess, then "wait, check f(2):" and the worked solution.
R1-Zero then has to select the worked style by the code reward alone.

    make_task("code_synth").test_problems()      # 120 held-out (slope, intercept) pairs
    r1kit zero zero-code-tiny                    # pretrain + GRPO with the code reward in the sandbox
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from r1kit.tasks.base import register_task
from r1kit.types import CodeTests, Problem, R1KitError

TEST_INPUTS = (0, 4, 7, 10, -2)


@dataclass
class CodeSynthTask:
    """Linear functions f(x) = a*x + b, a in [min_a, max_a], b in [min_b, max_b]; a fixed held-out split."""

    min_a: int = 2
    max_a: int = 9
    min_b: int = 10
    max_b: int = 99
    num_test: int = 120
    test_seed: int = 4321
    name: str = "code_synth"

    def __post_init__(self) -> None:
        if not 2 <= self.min_a <= self.max_a <= 99 or not 0 <= self.min_b <= self.max_b <= 999:
            raise R1KitError(f"code_synth task: need 2 <= min_a <= max_a <= 99 and 0 <= min_b <= max_b <= 999, got "
                             f"a in [{self.min_a}, {self.max_a}], b in [{self.min_b}, {self.max_b}]")
        keys = [(a, b) for a in range(self.min_a, self.max_a + 1) for b in range(self.min_b, self.max_b + 1)]
        if not 0 < self.num_test < len(keys):
            raise R1KitError(f"code_synth task: num_test must be in [1, {len(keys) - 1}] (there are {len(keys)} "
                             f"functions), got {self.num_test}")
        held = random.Random(self.test_seed).sample(keys, self.num_test)
        self._test_keys = set(held)
        self._train_keys = [k for k in keys if k not in self._test_keys]
        self._test = [self._problem(k) for k in held]

    def _problem(self, key: tuple[int, int]) -> Problem:
        a, b = key
        examples = ", ".join(f"f({x})={a * x + b}" for x in (1, 2, 3))
        tests = CodeTests("assert", entry_point="f", timeout_s=2.0,
                          asserts=tuple(f"assert candidate({x}) == {a * x + b}" for x in TEST_INPUTS))
        return Problem(id=f"code-{a}-{b}", question=f"{examples}. Write f.", answer=f"def f(x): return {a}*x+{b}",
                       answer_style="code", task=self.name, meta={"a": a, "b": b}, tests=tests)

    def train_problems(self, n: int, rng: random.Random) -> list[Problem]:
        return [self._problem(rng.choice(self._train_keys)) for _ in range(n)]

    def test_problems(self) -> list[Problem]:
        return list(self._test)

    # --- the solution styles of the base corpus ---------------------------------------------------
    @staticmethod
    def direct(a: int, b: int) -> str:
        """The guess that fits f(1) only: x + f(1) - 1."""
        return f"def f(x): return x+{a + b - 1}"

    @staticmethod
    def worked(a: int, b: int) -> str:
        f1, f2 = a + b, 2 * a + b
        return f"f(2)-f(1)={f2}-{f1}={a}. {f1}-{a}={b}."

    def completion(self, problem: Problem, style: str) -> str:
        a, b = problem.meta["a"], problem.meta["b"]
        if style == "direct":
            return f" <think> easy. </think> <answer> {self.direct(a, b)} </answer>"
        if style == "worked":
            return f" <think> {self.worked(a, b)} </think> <answer> {problem.answer} </answer>"
        if style == "reflect":
            return (f" <think> maybe x+{a + b - 1}. wait, check f(2): {self.worked(a, b)} </think> "
                    f"<answer> {problem.answer} </answer>")
        raise ValueError(f"unknown style {style!r}")


@register_task("code_synth")
def make_code_synth(**kwargs) -> CodeSynthTask:
    return CodeSynthTask(**kwargs)
