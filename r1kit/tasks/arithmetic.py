"""Synthetic multi-digit arithmetic, the embedded default R1-Zero task.

Problems: `a + b` (and `a * d`, a multi-digit number times one digit) with `min_digits..max_digits`
digits per operand. Step-by-step work helps: each column's carry depends on the previous column.

The task also writes the three *styles* of solution the base corpus is made of (see
r1kit/recipes/corpus.py and ../shared/NOTES.md: R1-Zero needs something to elicit):
- `direct`: a short answer with the carries dropped — systematically wrong whenever a carry occurs,
  so the model cannot average it out into the right answer;
- `worked`: right-to-left column work with explicit carries, then the (correct) answer;
- `reflect`: starts like `direct`, then "wait, check the carries" and the worked solution.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass

from r1kit.tasks.base import register_task
from r1kit.types import Problem, R1KitError


def _digits(n: int) -> list[int]:
    """Least-significant digit first."""
    return [int(c) for c in reversed(str(n))]


def carry_free_add(a: int, b: int) -> int:
    """a + b with every carry dropped: the base corpus's systematic error."""
    da, db = _digits(a), _digits(b)
    width = max(len(da), len(db))
    out = [((da[i] if i < len(da) else 0) + (db[i] if i < len(db) else 0)) % 10 for i in range(width)]
    return int("".join(str(d) for d in reversed(out)))


def carry_free_mul(a: int, d: int) -> int:
    """a * d (d one digit) with every carry dropped."""
    out = [(x * d) % 10 for x in _digits(a)]
    return int("".join(str(x) for x in reversed(out)))


def _worked(a: int, b: int, op: str) -> str:
    """Right-to-left column work: "a+b: x+y+c=s, partial." per column, then the operands lose their
    last digit and the next column starts.

    Why this shape: a tiny model finds the *last* digit of a number (next to a delimiter) easily but
    not a digit in the middle, so every step restates what is left of the operands; and the running
    `partial` result makes the final answer a copy, not a reversal of scattered digits.
    """
    steps, partial, carry = [], "", 0
    while True:
        x = a % 10
        y = (b % 10) if op == "+" else b
        s = x + y + carry if op == "+" else x * y + carry
        head = f"{a}{op}{b}: {x}{op}{y}+{carry}={s}"
        a = a // 10
        if op == "+":
            b = b // 10
        last = a == 0 and (op == "*" or b == 0)
        partial = (str(s) if last else str(s % 10)) + partial
        steps.append(f"{head}, {partial}.")
        carry = s // 10
        if last:
            return " ".join(steps)


def worked_add(a: int, b: int) -> str:
    return _worked(a, b, "+")


def worked_mul(a: int, d: int) -> str:
    return _worked(a, d, "*")


@dataclass
class ArithmeticTask:
    """Multi-digit addition/multiplication with a fixed held-out set disjoint from training."""

    min_digits: int = 4
    max_digits: int = 4
    ops: tuple[str, ...] = ("+",)
    num_test: int = 500
    test_seed: int = 1234
    name: str = "arithmetic"

    def __post_init__(self) -> None:
        self.ops = tuple(self.ops)
        if not 1 <= self.min_digits <= self.max_digits <= 12:
            raise R1KitError(f"arithmetic task: need 1 <= min_digits <= max_digits <= 12, got {self.min_digits}, {self.max_digits}")
        bad = [o for o in self.ops if o not in ("+", "*")]
        if bad or not self.ops:
            raise R1KitError(f"arithmetic task: ops must be a non-empty subset of ['+', '*'], got {list(self.ops)}")
        rng = random.Random(self.test_seed)
        seen: dict[tuple[int, str, int], Problem] = {}
        while len(seen) < self.num_test:
            key = self._draw(rng)
            seen.setdefault(key, self._problem(key, f"arith-test-{len(seen):04d}"))
        self._test = list(seen.values())
        self._test_keys = set(seen)

    def _draw(self, rng: random.Random) -> tuple[int, str, int]:
        op = rng.choice(self.ops)
        nd = rng.randint(self.min_digits, self.max_digits)
        a = rng.randint(10 ** (nd - 1), 10**nd - 1)
        if op == "*":
            return a, op, rng.randint(2, 9)
        nb = rng.randint(self.min_digits, self.max_digits)
        return a, op, rng.randint(10 ** (nb - 1), 10**nb - 1)

    def _problem(self, key: tuple[int, str, int], pid: str) -> Problem:
        a, op, b = key
        value = a + b if op == "+" else a * b
        return Problem(
            id=pid, question=f"{a}{op}{b}", answer=str(value), answer_style="numeric", task=self.name,
            solution=self.worked(key), meta={"a": a, "b": b, "op": op, "digits": len(str(a))},
        )

    def train_problems(self, n: int, rng: random.Random) -> list[Problem]:
        out = []
        while len(out) < n:
            key = self._draw(rng)
            if key not in self._test_keys:
                out.append(self._problem(key, f"arith-{key[0]}{key[1]}{key[2]}"))
        return out

    def test_problems(self) -> list[Problem]:
        return list(self._test)

    # --- the solution styles of the base corpus ---------------------------------------------------
    @staticmethod
    def direct(key: tuple[int, str, int]) -> int:
        a, op, b = key
        return carry_free_add(a, b) if op == "+" else carry_free_mul(a, b)

    @staticmethod
    def worked(key: tuple[int, str, int]) -> str:
        a, op, b = key
        return worked_add(a, b) if op == "+" else worked_mul(a, b)

    def completion(self, problem: Problem, style: str, lang: str = "") -> str:
        """A completion in one of the corpus styles: 'direct', 'worked' or 'reflect'.

        lang "" keeps the original wording; "en"/"zh" (or code-switched "en-zh"/"zh-en") writes a step
        word in each step of the worked solution: see `completion_in`."""
        if lang:
            return completion_in(self, problem, style, lang)
        key = (problem.meta["a"], problem.meta["op"], problem.meta["b"])
        quick = self.direct(key)
        if style == "direct":
            return f" <think> easy. </think> <answer> {quick} </answer>"
        if style == "worked":
            return f" <think> {self.worked(key)} </think> <answer> {problem.answer} </answer>"
        if style == "reflect":
            return f" <think> maybe {quick}. wait, check the carries: {self.worked(key)} </think> <answer> {problem.answer} </answer>"
        raise ValueError(f"unknown style {style!r}")


@register_task("arithmetic")
def make_arithmetic(**kwargs) -> ArithmeticTask:
    return ArithmeticTask(**kwargs)


# --- worked solutions with step words in a language (the R1 recipe's language-mixing material) --------
# Why: R1-Zero's reasoning mixes languages; at tiny scale mixing only exists if the base corpus writes
# some chains of thought in another language (and a few switch mid-way). English and Chinese step words
# are told apart by script (r1kit.rewards.language), digits carry no language.
STEP_WORDS = {"en": "so", "zh": "得"}
REFLECT_WORDS = {"en": ("maybe", "wait, check the carries:"), "zh": ("也许", "等等，检查进位：")}
_STEP = re.compile(r"([0-9+*]+: [0-9+*=]+), (\d+)\.")


def step_languages(lang: str, n_steps: int) -> list[str]:
    """The language of each of `n_steps` steps: "en" or "zh" throughout, or "en-zh"/"zh-en" switching
    after the first half (rounded up)."""
    parts = lang.split("-")
    if not 1 <= len(parts) <= 2 or any(p not in STEP_WORDS for p in parts):
        raise R1KitError(f"arithmetic: lang must be '', one of {sorted(STEP_WORDS)} or 'a-b' of them, got {lang!r}")
    first = (n_steps + 1) // 2 if len(parts) == 2 else n_steps
    return [parts[0]] * first + [parts[-1]] * (n_steps - first)


def worked_in(key: tuple[int, str, int], lang: str) -> str:
    """The worked solution with a step word per step: "123+45: 3+5+0=8, so 8." / "..., 得 8." """
    steps = _STEP.findall(ArithmeticTask.worked(key))
    langs = step_languages(lang, len(steps))
    return " ".join(f"{head}, {STEP_WORDS[w]} {partial}." for (head, partial), w in zip(steps, langs))


def completion_in(task: ArithmeticTask, problem: Problem, style: str, lang: str) -> str:
    """`task.completion(problem, style)` with the worked part written in `lang` (the direct answer and
    its "easy." stay as they are: only worked solutions come in two languages)."""
    key = (problem.meta["a"], problem.meta["op"], problem.meta["b"])
    if style == "direct":
        return task.completion(problem, style)
    worked = worked_in(key, lang)
    if style == "worked":
        return f" <think> {worked} </think> <answer> {problem.answer} </answer>"
    if style == "reflect":
        maybe, wait = REFLECT_WORDS[lang.split("-")[0]]
        return f" <think> {maybe} {task.direct(key)}. {wait} {worked} </think> <answer> {problem.answer} </answer>"
    raise ValueError(f"unknown style {style!r}")
