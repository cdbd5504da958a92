"""Answer extraction, the four graders, cons@k equivalence, and the time-limited math-verify pool."""
from __future__ import annotations

import os
import threading
import time
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from r1kit.rewards import mathverify
from r1kit.rewards.graders import (
    GRADERS,
    answers_equivalent,
    clean_answer,
    extract_answer,
    grade,
    grade_many,
    grade_math,
    parse_number,
)
from r1kit.types import Problem, R1KitError


def prob(answer: str, style: str, **meta) -> Problem:
    return Problem(id=f"t-{style}", question="q", answer=answer, answer_style=style, meta=meta)


@pytest.fixture(scope="module")
def pool():
    """A warm two-worker pool (parallelism tests need two), restored to the default afterwards."""
    old = os.environ.get("R1KIT_VERIFY_WORKERS")
    os.environ["R1KIT_VERIFY_WORKERS"] = "2"
    mathverify.shutdown_pool()
    mathverify.warm_up()
    yield mathverify.get_pool()
    mathverify.shutdown_pool()
    if old is None:
        os.environ.pop("R1KIT_VERIFY_WORKERS", None)
    else:
        os.environ["R1KIT_VERIFY_WORKERS"] = old


# ----------------------------------------------------------------------------- extraction


@pytest.mark.parametrize(
    "text, expected",
    [
        ("<think>add</think> <answer>85</answer>", "85"),
        ("the sum is<answer>85</answer>.", "85"),  # glued to tags: math-verify alone misses this one
        ("<answer>1</answer> no, <answer>2</answer>", "2"),  # the last complete answer wins
        ("<answer>$\\boxed{\\frac{1}{2}}$</answer>", "\\frac{1}{2}"),
        ("so \\boxed{\\frac{1}{\\sqrt{2}}} and done", "\\frac{1}{\\sqrt{2}}"),  # nested braces
        ("first \\boxed{3}, finally \\boxed{\\{1, 2\\}}.", "\\{1, 2\\}"),  # escaped braces are not groups
        ("\\boxed 5", "5"),
        ("\\fbox{7}", "7"),
        ("first \\boxed{3} then \\boxed{4", "3"),  # an unclosed box is skipped
        ("He paid 5 + 7 = 12 dollars.\n#### 1,234", "1,234"),
        ("x = -5", "-5"),
        ("5-3 leaves 2 and then 5-3", "3"),  # a minus after a digit is subtraction, not a sign
        ("it is 3/4.", "3/4"),
        ("total: $-1,234.5$.", "-1,234.5"),
        ("The answer is $\\boxed{12}$.", "12"),
        ("<answer>85", "85"),  # unclosed tag: falls back to the last number
        ("no numbers here", None),
        ("", None),
        ("<answer>   </answer>", None),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_clean_answer_peels_nested_wrappers_and_is_idempotent():
    assert clean_answer("  $\\boxed{42}$. ") == "42"
    assert clean_answer("\\(x^2\\)") == "x^2"
    assert clean_answer(clean_answer("$$\\boxed{\\frac{1}{2}}$$")) == "\\frac{1}{2}"
    assert clean_answer("\\boxed{1} + \\boxed{2}") == "\\boxed{1} + \\boxed{2}"  # not one box around all


@given(st.text(max_size=300))
@settings(max_examples=150, deadline=None)
def test_extract_never_raises_and_returns_clean_text(text):
    out = extract_answer(text)
    assert out is None or (out and out == out.strip())


@pytest.mark.parametrize(
    "text, value",
    [("1,234", 1234), ("+5", 5), ("5.", 5), ("0.75", Fraction(3, 4)), ("-3/4", Fraction(-3, 4)),
     ("\\frac{3}{4}", Fraction(3, 4)), ("-\\dfrac{1}{2}", Fraction(-1, 2)), ("10,\\!000", 10000),
     ("$18", 18), (".5", Fraction(1, 2)), ("1,2", None), ("1/0", None), ("1e5", None), ("abc", None)],
)
def test_parse_number(text, value):
    assert parse_number(text) == value


# ----------------------------------------------------------------------------- exact / numeric


def test_exact_strips_but_compares_text():
    p = prob("B", "exact")
    assert GRADERS["exact"](" B \n", p).correct
    assert GRADERS["exact"]("b", p).reason == "wrong value"
    assert GRADERS["exact"](None, p).reason == "no answer"


@pytest.mark.parametrize("pred", ["1,234", "1234", "+1234", "1234.0", "$1,234$", "\\boxed{1234}", "1234."])
def test_numeric_equal_forms(pred):
    assert GRADERS["numeric"](pred, prob("1234", "numeric")).correct
    assert GRADERS["numeric"]("1234", prob(pred, "numeric")).correct  # and as the reference


def test_numeric_wrong_unparseable_and_bad_gold():
    assert GRADERS["numeric"]("1235", prob("1,234", "numeric")).reason == "wrong value"
    assert GRADERS["numeric"]("twelve", prob("12", "numeric")).reason == "unparseable"
    assert GRADERS["numeric"]("", prob("12", "numeric")).reason == "no answer"
    with pytest.raises(R1KitError, match="not a number"):
        GRADERS["numeric"]("12", prob("twelve", "numeric"))


def test_numeric_huge_input_is_fast():
    huge = "9" * 10_000
    start = time.perf_counter()
    wrong = GRADERS["numeric"](huge, prob("12", "numeric"))
    same = GRADERS["numeric"](huge, prob(huge, "numeric"))  # identical text settles without int()
    assert time.perf_counter() - start < 0.1
    assert (wrong.correct, wrong.reason, same.correct) == (False, "too long", True)


@given(st.integers(-10**12, 10**12))
@settings(max_examples=200, deadline=None)
def test_numeric_accepts_thousands_commas_and_plus(n):
    formatted = f"{n:,}" if n < 0 else f"+{n:,}"
    assert GRADERS["numeric"](formatted, prob(str(n), "numeric")).correct
    assert not GRADERS["numeric"](str(n + 1), prob(str(n), "numeric")).correct


# ----------------------------------------------------------------------------- countdown


@pytest.mark.parametrize(
    "pred, nums, target, reason",
    [
        ("(1 + 2) * 3", [1, 2, 3], 9, "correct"),
        ("3 * (2 + 1) = 9", [1, 2, 3], 9, "correct"),  # "= 9" side dropped
        ("6 / (3 - 1)", [6, 3, 1], 3, "correct"),
        ("(1/3 + 1) * 3", [1, 3, 1, 3], 4, "correct"),  # exact through a fractional intermediate
        ("7 × 8 ÷ 2", [7, 8, 2], 28, "correct"),
        ("-3 + 5", [3, 5], 2, "correct"),
        ("3 + 3 + 3", [1, 2, 3], 9, "numbers not used exactly once"),  # reused
        ("(1 + 2) * 2", [1, 2, 3], 6, "numbers not used exactly once"),  # 3 missing
        ("1 + 2 + 3", [1, 2, 3], 7, "wrong value"),
        ("1 / (2 - 2)", [1, 2, 2], 1, "division by zero"),
        ("__import__('os').system('true')", [1], 1, "disallowed syntax"),
        ("2**99999", [2, 99999], 4, "disallowed syntax"),
        ("1.0 + 2", [1, 2], 3, "disallowed syntax"),
        ("abs(-3)", [3], 3, "disallowed syntax"),
        ("(1 + 2", [1, 2], 3, "unparseable"),
        ("(" * 5000 + "1" + ")" * 5000, [1], 1, "too long"),
        ("", [1], 1, "no answer"),
    ],
)
def test_countdown(pred, nums, target, reason):
    v = GRADERS["countdown"](pred, prob(str(target), "countdown", nums=nums))
    assert v.reason == reason
    assert v.correct == (reason == "correct")


def test_countdown_bad_problem_is_a_user_error():
    with pytest.raises(R1KitError, match="nums"):
        GRADERS["countdown"]("1+2", prob("3", "countdown"))


# ----------------------------------------------------------------------------- math, pool


def test_math_fast_path_needs_no_pool(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("the fast path should not call math-verify")

    monkeypatch.setattr("r1kit.rewards.graders.verify_math", boom)
    assert GRADERS["math"]("$12$", prob("12", "math")).correct
    assert GRADERS["math"]("0.5", prob("\\frac{1}{2}", "math")).correct
    assert GRADERS["math"]("13", prob("12", "math")).reason == "wrong value"
    assert GRADERS["math"]("x" * 5000, prob("12", "math")).reason == "too long"


def test_math_equivalences_via_math_verify(pool):
    assert GRADERS["math"]("\\frac{\\sqrt{2}}{2}", prob("\\sqrt{2}/2", "math")).correct
    assert GRADERS["math"]("[1, 2)", prob("[1,2)", "math")).correct
    assert GRADERS["math"]("\\frac{1}{3}", prob("\\frac{1}{2}", "math")).reason == "wrong value"
    # the whole path: extraction from a glued tag, then verification
    assert grade("so<answer>\\dfrac{14}{3}</answer>", prob("14/3", "math")).correct


def test_cons_at_k_equivalence(pool):
    halves = ["1/2", "0.5", "\\frac{1}{2}"]
    for style in ("math", "numeric"):
        assert all(answers_equivalent(a, b, style) for a in halves for b in halves)
        assert not answers_equivalent("1/2", "1/3", style)
    assert answers_equivalent("\\sqrt{2}/2", "\\frac{\\sqrt{2}}{2}", "math")
    assert not answers_equivalent("B", "b", "exact")
    assert answers_equivalent("(1+2)*3", "3*(2+1)", "countdown")  # same numbers, same value
    assert not answers_equivalent("3*3", "(1+2)*3", "countdown")  # same value, other numbers
    with pytest.raises(R1KitError, match="known styles"):
        answers_equivalent("1", "1", "fuzzy")


def _worker_pids(pool) -> set[int]:
    return {w.proc.pid for w in list(pool._idle.queue)}


def test_math_timeout_kills_and_replaces_the_worker(pool):
    mathverify.warm_up()
    before = _worker_pids(pool)
    start = time.perf_counter()
    # precheck=False: the static check would refuse it at once; this tests the time limit behind it
    v = mathverify.verify_math("9^{9^{9^{9}}}", "5", timeout_s=1.0, precheck=False)  # stalls math-verify
    elapsed = time.perf_counter() - start
    assert (v.correct, v.reason) == (False, "timeout")
    assert elapsed < 1.0 + 1.0
    after = _worker_pids(pool)
    assert len(after) == pool.num_workers and len(before - after) == 1
    (dead,) = before - after
    with pytest.raises(ProcessLookupError):  # killed and reaped
        os.kill(dead, 0)
    assert mathverify.verify_math("2/4", "\\frac{1}{2}").correct  # the pool still serves


def test_math_timeout_from_a_non_main_thread(pool):
    mathverify.warm_up()
    out = {}

    def work():
        t0 = time.perf_counter()
        out["result"] = mathverify.verify_math("(" * 5000, "5", timeout_s=1.0, precheck=False)
        out["elapsed"] = time.perf_counter() - t0

    thread = threading.Thread(target=work)
    thread.start()
    thread.join(10)
    assert out["result"] == mathverify.VerifyResult(False, "timeout")
    assert out["elapsed"] < 1.0 + 1.0


def test_a_worker_killed_while_idle_is_replaced_before_use(pool):
    mathverify.warm_up()
    for pid in _worker_pids(pool):
        os.kill(pid, 9)
    time.sleep(0.1)
    mathverify.clear_cache()
    assert mathverify.verify_math("3/6", "\\frac{1}{2}") == (True, "correct")  # not a false "worker error"


def test_verify_many_runs_in_parallel_and_keeps_order(pool):
    mathverify.warm_up()
    start = time.perf_counter()
    slow = mathverify.verify_math_many([("9^{9^{9^{9}}}", "1"), ("10^{10^{10^{10}}}", "2")], timeout_s=1.0,
                                       precheck=False)
    elapsed = time.perf_counter() - start
    assert [r.reason for r in slow] == ["timeout", "timeout"]
    assert elapsed < 1.8  # two workers at once; one after the other would take >= 2 s
    mathverify.warm_up()
    pairs = [("0.5", "\\frac{1}{2}"), ("\\frac{1}{3}", "\\frac{1}{2}"), ("0.5", "\\frac{1}{2}"), ("x=2", "2")]
    assert mathverify.verify_math_many(pairs) == [mathverify.verify_math(p, g) for p, g in pairs]


def test_cache_skips_the_pool_but_not_for_timeouts(pool, monkeypatch):
    mathverify.clear_cache()
    first = mathverify.verify_math("\\frac{6}{4}", "1.5")
    monkeypatch.setattr(pool, "run", lambda *a: pytest.fail("a cached pair must not reach the pool"))
    assert mathverify.verify_math("\\frac{6}{4}", "1.5") == first == (True, "correct")
    monkeypatch.undo()
    mathverify.warm_up()
    assert mathverify.verify_math("9^{9^{9^{9}}}", "3", timeout_s=0.5, precheck=False).reason == "timeout"
    assert mathverify._CACHE.get(("9^{9^{9^{9}}}", "3")) is None


def test_grade_many_equals_one_by_one(pool):
    problems = [prob("\\frac{1}{2}", "math"), prob("1234", "numeric"), prob("B", "exact"),
                prob("9", "countdown", nums=[1, 2, 3]), prob("\\sqrt{2}/2", "math"), prob("7", "math")]
    preds = ["0.5", "1,234", "C", "(1+2)*3", "\\frac{\\sqrt{2}}{2}", None]
    batch = grade_many(preds, problems)
    assert batch == [GRADERS[p.answer_style](a, p) for a, p in zip(preds, problems)]
    assert [v.correct for v in batch] == [True, True, False, True, True, False]


def test_bad_arguments():
    with pytest.raises(R1KitError, match="known styles"):
        grade("1", prob("1", "fuzzy"))
    with pytest.raises(ValueError, match="timeout_s"):
        mathverify.verify_math("1", "1", timeout_s=0)
    with pytest.raises(TypeError):
        mathverify.verify_math(1, "1")  # type: ignore[arg-type]
