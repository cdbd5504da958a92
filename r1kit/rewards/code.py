"""The code half of R1's accuracy reward: extract the program, run it against the problem's tests in the sandbox.

    extract_program(completion)                      # the last <answer>'s code, else the last ``` fenced block
    code_verdicts(programs, problems)                # TestVerdicts, run concurrently in the sandbox pool
    REWARD_FUNCS["code"](completion, problem)        # 1.0 if every test passes, else 0.0
    REWARD_FUNCS["code_fraction"](completion, problem)  # the share of tests passed

Problems carry typed tests (`Problem.tests`, a CodeTests): assert-style (HumanEval's `check(candidate)`) or
stdin/stdout cases. The "accuracy" reward and evaluation grade `answer_style == "code"` the same way (all-pass),
through GRADERS["code"]. A verdict of "sandbox_error" (the sandbox's own failure, never the program's) scores 0
but is logged and counted apart: r1kit.sandbox.stats(). Verdicts are memoised on (program, tests), since a
group of G samples often holds the same program several times.
"""
from __future__ import annotations

import re
import textwrap
import threading
from collections import OrderedDict
from typing import Sequence

from r1kit.rewards import register_reward
from r1kit.rewards.graders import Verdict
from r1kit.sandbox import Limits, TestVerdict, check_asserts, check_stdio, get_pool
from r1kit.templates import parse_completion
from r1kit.types import CodeTests, Problem, R1KitError

MAX_PROGRAM_CHARS = 100_000
_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[ \t]*\n(.*?)```", re.DOTALL)
_CACHE_SIZE = 4096


def program_in(answer: str | None) -> str | None:
    """The program inside an answer: its last complete ```-fenced block if it has one, else the whole answer."""
    if answer is None:
        return None
    blocks = _FENCE.findall(answer)
    code = (blocks[-1][1] if blocks else answer).strip("\n")
    return code if code.strip() else None


def extract_program(text: str) -> str | None:
    """The program in a completion: the last complete <answer>...</answer> (see `program_in`), else the last
    complete ```-fenced block anywhere; None if there is neither."""
    if not isinstance(text, str):
        raise TypeError(f"extract_program takes a string, got {type(text).__name__}")
    answer = parse_completion(text).answer
    if answer is not None:
        return program_in(answer)
    blocks = _FENCE.findall(text)
    return program_in(f"```\n{blocks[-1][1]}```") if blocks else None


def _tests_of(problem: Problem) -> CodeTests:
    if problem.tests is None:
        raise R1KitError(f"problem {problem.id!r}: answer_style 'code' needs tests (Problem.tests), and it has none")
    return problem.tests


def full_program(program: str, tests: CodeTests) -> str:
    """The program as run: HumanEval's prompt is put first when the program does not define the function. A
    body whose first line lost its indentation (answers are stripped) is re-indented when that makes it compile."""
    if tests.kind != "assert" or not tests.prompt or re.search(
            rf"^\s*def\s+{re.escape(tests.entry_point)}\s*\(", program, re.MULTILINE):
        return program
    options = [program, "    " + program, textwrap.indent(program, "    ")]
    for body in options:
        try:
            compile(tests.prompt + body, "solution.py", "exec")  # compiling runs nothing
            return tests.prompt + body
        except (SyntaxError, ValueError, RecursionError, MemoryError):
            continue
    return tests.prompt + program  # it does not compile: the sandbox reports the SyntaxError


def run_code_tests(program: str | None, tests: CodeTests, limits: Limits | None = None) -> TestVerdict:
    """One program against one problem's tests, in the sandbox."""
    if program is None or not program.strip():
        return TestVerdict("error", 0, tests.count, 0, "no program")
    if len(program) > MAX_PROGRAM_CHARS:
        return TestVerdict("error", 0, tests.count, 0, f"program longer than {MAX_PROGRAM_CHARS} characters")
    limits = limits or Limits(timeout_s=tests.timeout_s, cpu_s=tests.timeout_s)
    if tests.kind == "stdio":
        return check_stdio(program, [(c.stdin, c.stdout) for c in tests.cases], limits)
    return check_asserts(full_program(program, tests), tests.entry_point, tests.asserts, tests.setup, limits)


class _Memo:
    """(program, tests) -> TestVerdict, bounded; sandbox errors are not kept (they are not the input's fault)."""

    def __init__(self, size: int) -> None:
        self.size, self._data, self._lock = size, OrderedDict(), threading.Lock()

    def get(self, key):
        with self._lock:
            hit = self._data.get(key)
            if hit is not None:
                self._data.move_to_end(key)
            return hit

    def put(self, key, verdict: TestVerdict) -> None:
        if verdict.status == "sandbox_error":
            return
        with self._lock:
            self._data[key] = verdict
            if len(self._data) > self.size:
                self._data.popitem(last=False)


_MEMO = _Memo(_CACHE_SIZE)


def _verdict(program: str | None, tests: CodeTests) -> TestVerdict:
    key = (program, tests)
    hit = _MEMO.get(key)
    if hit is None:
        hit = run_code_tests(program, tests)
        _MEMO.put(key, hit)
    return hit


def code_verdicts(programs: Sequence[str | None], problems: Sequence[Problem]) -> list[TestVerdict]:
    """`run_code_tests` for each (program, problem) pair; distinct pairs run concurrently over the pool."""
    if len(programs) != len(problems):
        raise R1KitError(f"{len(programs)} programs for {len(problems)} problems: they must pair up")
    keys = [(prog, _tests_of(p)) for prog, p in zip(programs, problems)]
    todo = [k for k in dict.fromkeys(keys) if _MEMO.get(k) is None and k[0] is not None]
    if len(todo) > 1:
        pool = get_pool()
        for future in [pool.submit(_verdict, *k) for k in todo]:
            future.result()
    return [_verdict(*k) for k in keys]


# ----------------------------------------------------------------------------- grader and rewards


def _as_verdict(v: TestVerdict, program: str | None) -> Verdict:
    reason = "correct" if v.ok else "no answer" if program is None else v.status
    return Verdict(v.ok, reason, program)


def grade_code(pred: str | None, problem: Problem) -> Verdict:
    """GRADERS["code"]: `pred` is an extracted answer (see `program_in`); correct iff every test passes."""
    program = program_in(pred)
    return _as_verdict(_verdict(program, _tests_of(problem)), program)


def grade_code_many(preds: Sequence[str | None], problems: Sequence[Problem]) -> list[Verdict]:
    programs = [program_in(p) for p in preds]
    return [_as_verdict(v, p) for v, p in zip(code_verdicts(programs, problems), programs)]


def _programs(completions: Sequence[str]) -> list[str | None]:
    return [extract_program(c) for c in completions]


def code_rewards(completions: Sequence[str], problems: Sequence[Problem]) -> list[float]:
    return [float(v.ok) for v in code_verdicts(_programs(completions), problems)]


def code_fraction_rewards(completions: Sequence[str], problems: Sequence[Problem]) -> list[float]:
    return [v.fraction for v in code_verdicts(_programs(completions), problems)]


@register_reward("code", batch=code_rewards)
def code_reward(completion: str, problem: Problem) -> float:
    """1.0 if the completion's program passes every test of `problem`, else 0.0."""
    return code_rewards([completion], [problem])[0]


@register_reward("code_fraction", batch=code_fraction_rewards)
def code_fraction_reward(completion: str, problem: Problem) -> float:
    """The share of `problem`'s tests the completion's program passes (stdio cases, or asserts)."""
    return code_fraction_rewards([completion], [problem])[0]
