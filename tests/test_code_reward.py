"""The code reward: extraction, all-pass vs fraction, file tasks with tests, and programs that try to game it.

Every program in the "gaming" tests tries to make the harness report success without solving the problem
(the holes RL policies find in test harnesses); each must score 0.
"""
from __future__ import annotations

import json
import textwrap

import pytest

from r1kit.rewards import REWARD_FUNCS, grade, score_completions
from r1kit.rewards.code import code_verdicts, extract_program, program_in
from r1kit.tasks import make_task
from r1kit.types import CodeTests, IOCase, Problem, R1KitError

SQUARE = Problem("sq", "square x", "", answer_style="code", tests=CodeTests(
    "assert", entry_point="square", asserts=("assert candidate(3) == 9", "assert candidate(-2) == 4",
                                             "assert candidate(0) == 0")))
SUM = Problem("sum", "sum of a line", "", answer_style="code", tests=CodeTests(
    "stdio", cases=(IOCase("1 2 3\n", "6\n"), IOCase("10\n", "10\n"), IOCase("-1 1\n", "0\n"))))
SOLVES_SQUARE = "def square(x):\n    return x * x"


def wrap(code: str) -> str:
    return f"<think> let me write it </think> <answer>\n```python\n{code}\n```\n</answer>"


def code_score(code: str, problem: Problem = SQUARE) -> float:
    return REWARD_FUNCS["code"](wrap(textwrap.dedent(code)), problem)


# ----------------------------------------------------------------------------- extraction


def test_extract_program_prefers_the_answer_then_the_last_fence():
    assert extract_program(wrap("x = 1")) == "x = 1"
    assert extract_program("<answer> print(2) </answer>") == "print(2)"
    two = "```python\nfirst()\n```\ntext\n```\nsecond()\n```"
    assert extract_program(two) == "second()"
    assert extract_program("<think> ```python\nthink()\n``` </think> <answer>\n```py\nanswer()\n```\n</answer>") == "answer()"
    assert extract_program("no code here") is None
    assert extract_program("```python\nunclosed()") is None
    assert program_in("  ") is None


# ----------------------------------------------------------------------------- reward values


def test_code_reward_all_pass_and_fraction():
    half = "def square(x):\n    return x * x if x > 0 else 1"
    completions = [wrap(SOLVES_SQUARE), wrap(half), "no program"]
    scores = score_completions(completions, [SQUARE] * 3, {"code": 1.0, "code_fraction": 1.0, "accuracy": 1.0})
    assert scores.per_fn["code"].tolist() == [1.0, 0.0, 0.0]
    assert scores.per_fn["code_fraction"].tolist() == pytest.approx([1.0, 1 / 3, 0.0])
    assert scores.per_fn["accuracy"].tolist() == [1.0, 0.0, 0.0]


def test_stdio_problems_are_graded_on_every_case():
    good = "print(sum(map(int, input().split())))"
    assert REWARD_FUNCS["code"](wrap(good), SUM) == 1.0
    assert REWARD_FUNCS["code_fraction"](wrap("print(6)"), SUM) == pytest.approx(1 / 3)
    assert grade(wrap(good), SUM).correct and not grade(wrap("print(6)"), SUM).correct


def test_a_body_only_completion_is_put_after_the_prompt():
    problem = Problem("p", "q", "", answer_style="code", tests=CodeTests(
        "assert", entry_point="inc", asserts=("assert candidate(1) == 2",), prompt="def inc(x):\n"))
    assert REWARD_FUNCS["code"](wrap("    return x + 1"), problem) == 1.0
    assert REWARD_FUNCS["code"]("<answer>\n    y = x + 1\n    return y\n</answer>", problem) == 1.0  # stripped
    assert REWARD_FUNCS["code"]("<answer>\ny = x + 1\nreturn y\n</answer>", problem) == 1.0


def test_identical_programs_run_once():
    v = code_verdicts([SOLVES_SQUARE] * 8, [SQUARE] * 8)
    assert all(x is v[0] for x in v)


def test_a_problem_without_tests_is_an_error():
    with pytest.raises(R1KitError, match="needs tests"):
        REWARD_FUNCS["code"](wrap("x"), Problem("n", "q", "", answer_style="code"))


# ----------------------------------------------------------------------------- gaming attempts: all score 0


GAMING = {
    "exit 0 before the tests": "import sys\nsys.exit(0)",
    "os._exit(0) inside the call": "import os\ndef square(x):\n    os._exit(0)",
    "object equal to anything": """
        class Any:
            def __eq__(self, other): return True
            def __ne__(self, other): return False
        def square(x): return Any()
    """,
    "int subclass equal to anything": """
        class Int(int):
            def __eq__(self, other): return True
            __hash__ = int.__hash__
        def square(x): return Int(0)
    """,
    "patched builtins and AssertionError": """
        import builtins
        class Never(Exception): pass
        builtins.AssertionError = Never
        builtins.isinstance = lambda *a: True
        builtins.__dict__['abs'] = lambda x: 0
        def square(x): return 0
    """,
    "tampering with the test functions": """
        import gc, sys
        for obj in gc.get_objects():
            if callable(obj) and getattr(obj, '__name__', '') in ('check', 'run_assert_tests', '_one_test'):
                try: obj.__code__ = (lambda *a, **k: None).__code__
                except Exception: pass
        for frame in sys._current_frames().values():
            while frame is not None:
                frame.f_globals.pop('AssertionError', None)
                frame = frame.f_back
        def square(x): return 0
    """,
    "printing success": """
        import json, struct, os
        print('PASSED', json.dumps({'done': True, 'passed': 3}))
        for fd in range(3, 20):
            data = json.dumps({'load': None}).encode()
            try: os.write(fd, struct.pack('<Q', len(data)) + data)
            except OSError: pass
        def square(x): return 0
    """,
    "forged replies on the result pipe": """
        import json, struct, os
        def square(x):
            data = json.dumps({'ok': 9}).encode()
            os.write(4, struct.pack('<Q', len(data)) + data)   # a reply for the first call...
            return 9                                           # ... and the same for every other
    """,
    "patched encoder in the candidate process": """
        import sys
        def square(x):
            f = sys._getframe(1)
            f.f_globals['encode'] = lambda v, d=0: {'__class__': 'Any'}
            return 0
    """,
    "raising SystemExit inside the call": "def square(x):\n    raise SystemExit(0)",
    "killing the harness": "import os, signal\ndef square(x):\n    os.kill(1, signal.SIGKILL)\n    os.kill(os.getppid(), signal.SIGKILL)\n    return 0",
    "returning a lazy object": "def square(x):\n    return (v for v in [x * x])",
    "reading the expected values from a file": """
        import glob
        leaked = [open(p).read() for p in glob.glob('/tmp/*') + glob.glob('/tmp/.*') if 'candidate' in open(p, errors='ignore').read()]
        def square(x): return 9 if not leaked else 0
    """,
}


@pytest.mark.parametrize("name", sorted(GAMING))
def test_gaming_the_assert_harness_scores_zero(name):
    assert code_score(GAMING[name]) == 0.0


STDIO_GAMING = {
    "exit 0 silently": "import os\nos._exit(0)",
    "a truncated answer": "print(6)",
    "extra lines after the answer": "print(sum(map(int, input().split())))\nprint('extra')",
    "expected outputs guessed from a file": "import glob\nprint(len(glob.glob('/tmp/*')))",
}


@pytest.mark.parametrize("name", sorted(STDIO_GAMING))
def test_gaming_stdio_tests_scores_zero(name):
    assert code_score(STDIO_GAMING[name], SUM) == 0.0


# ----------------------------------------------------------------------------- file tasks with tests


def test_a_jsonl_of_code_problems_works_through_the_file_task(tmp_path):
    rows = [
        {"id": "a", "q": "square", "tests": {"entry_point": "square", "asserts": ["assert candidate(3) == 9"]}},
        {"id": "b", "q": "sum", "tests": {"cases": [{"stdin": "1 2", "stdout": "3"}], "timeout_s": 2}},
    ]
    path = tmp_path / "code.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    task = make_task("file", path=path, problem_field="q", id_field="id", answer_style="code", tests_field="tests",
                     test_fraction=1.0)
    a, b = task.test_problems()
    assert a.tests.kind == "assert" and b.tests == CodeTests("stdio", cases=(IOCase("1 2", "3"),), timeout_s=2)
    assert REWARD_FUNCS["code"](wrap(SOLVES_SQUARE), a) == 1.0
    assert REWARD_FUNCS["code"](wrap("print(sum(map(int, input().split())))"), b) == 1.0


@pytest.mark.parametrize("tests, match", [
    ({"asserts": ["assert candidate(1)"]}, "entry_point"),
    ({"entry_point": "f", "asserts": "assert candidate(1)"}, "list of strings"),
    ({"cases": [{"input": "1"}]}, "stdin"),
    ({"entry_point": "f", "asserts": ["x"], "cases": []}, "exactly one"),
    ({"cases": [{"stdin": "", "stdout": ""}], "timeout_s": "5"}, "timeout_s"),
])
def test_bad_tests_in_a_file_name_the_record_and_field(tmp_path, tests, match):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"q": "x", "t": tests}) + "\n")
    with pytest.raises(R1KitError, match=match) as err:
        make_task("file", path=path, problem_field="q", answer_style="code", tests_field="t")
    assert "line 1" in str(err.value) or "tests" in str(err.value)


def test_code_style_without_tests_field_is_refused(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text(json.dumps({"problem": "x", "answer": "y"}) + "\n")
    with pytest.raises(R1KitError, match="tests_field"):
        make_task("file", path=path, answer_style="code")


def test_r1kit_eval_reads_code_problems_from_a_file(tmp_path):
    from r1kit.evaluation.cli import build_parser, load_problems

    path = tmp_path / "code.jsonl"
    path.write_text(json.dumps({"problem": "square", "t": {"entry_point": "square", "asserts": ["assert candidate(2) == 4"]}}))
    args = build_parser().parse_args(["--model", "m", "--data", str(path), "--answer-style", "code", "--tests-field", "t"])
    (problem,), _ = load_problems(args)
    assert problem.tests.entry_point == "square" and REWARD_FUNCS["code"](wrap(SOLVES_SQUARE), problem) == 1.0
