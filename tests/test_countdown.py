"""The Countdown task (r1kit.tasks.countdown): generator, held-out split, reference solver."""
from __future__ import annotations

import ast
import random
import re
from collections import Counter
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from r1kit.tasks import make_task
from r1kit.tasks.countdown import CountdownTask, evaluate_expression, problem_key, solve
from r1kit.types import R1KitError

# The wording of the real file's `problem` field (countdown/countdown_test.jsonl).
QUESTION_RE = re.compile(r"Using the numbers \[(\d+(?:, \d+)*)\], create an equation that equals (\d+)\.")


def assert_solves(expr: str, nums: list[int], target: int) -> None:
    value, used = evaluate_expression(expr)
    assert value == target, expr
    assert Counter(used) == Counter(nums), expr  # every number exactly once


def parse_question(question: str) -> tuple[list[int], int]:
    m = QUESTION_RE.fullmatch(question)
    assert m, question
    return [int(x) for x in m.group(1).split(", ")], int(m.group(2))


# ----------------------------------------------------------------------------- generator


def test_generated_problems_are_well_formed_and_solvable():
    task = make_task("countdown")
    problems = task.train_problems(60, random.Random(0))
    assert {len(p.meta["nums"]) for p in problems} == {3, 4}
    for p in problems:
        nums, target = parse_question(p.question)
        assert nums == p.meta["nums"] and str(target) == p.answer
        assert (p.answer_style, p.task) == ("countdown", "countdown")
        assert all(1 <= n <= 99 for n in nums) and 1 <= target <= 999
        assert_solves(p.solution, nums, target)  # the generating expression is a worked solution
        found = solve(nums, target)
        assert found is not None
        assert_solves(found, nums, target)


def test_generator_respects_its_options():
    task = make_task("countdown", num_count=(4, 4), num_range=(2, 9), target_range=(10, 100), num_test=5)
    for p in task.train_problems(50, random.Random(1)) + task.test_problems():
        assert len(p.meta["nums"]) == 4 and all(2 <= n <= 9 for n in p.meta["nums"])
        assert 10 <= int(p.answer) <= 100


def test_generator_intermediates_are_positive_integers():
    """Every step of the generating expression (a - b with a > b, exact a / b) stays a positive integer."""
    task = CountdownTask(num_test=0)
    for p in task.train_problems(100, random.Random(2)):
        steps = [n for n in ast.walk(ast.parse(p.solution, mode="eval")) if isinstance(n, ast.BinOp)]
        assert len(steps) == len(p.meta["nums"]) - 1
        for step in steps:
            value, _ = evaluate_expression(ast.unparse(step))
            assert value.denominator == 1 and value > 0, (p.solution, ast.unparse(step))


def test_deterministic_under_a_seed():
    task = make_task("countdown")
    a = task.train_problems(30, random.Random(5))
    assert a == task.train_problems(30, random.Random(5))
    assert a != task.train_problems(30, random.Random(6))
    assert [p.meta for p in a] == [p.meta for p in make_task("countdown").train_problems(30, random.Random(5))]


# ----------------------------------------------------------------------------- held-out split


def test_synthetic_heldout_is_fixed_and_distinct():
    a, b = make_task("countdown").test_problems(), make_task("countdown").test_problems()
    assert a == b and len(a) == 200
    assert len({p.id for p in a}) == len({problem_key(p.meta["nums"], p.answer) for p in a}) == 200
    assert make_task("countdown", heldout_seed=99).test_problems() != a


def test_training_never_yields_a_heldout_problem():
    # A small problem space, so that unfiltered draws hit the held-out set often.
    opts = dict(num_count=(3, 3), num_range=(1, 5), target_range=(1, 30), num_test=60)
    task = make_task("countdown", **opts)
    held = {problem_key(p.meta["nums"], p.answer) for p in task.test_problems()}
    rng = random.Random(0)  # the generator itself does not filter: count how often it hits the held-out set
    raw_hits = sum(problem_key(n, t) in held for n, t, _ in (task._generate(rng) for _ in range(2000)))
    assert raw_hits > 100  # so the check below is not vacuous
    train = task.train_problems(2000, random.Random(0))
    assert len(train) == 2000
    assert not any(problem_key(p.meta["nums"], p.answer) in held for p in train)


def test_bad_options():
    for opts, msg in [
        ({"heldout": "bogus"}, "heldout must be 'synthetic' or 'file'"),
        ({"num_range": (0, 5)}, "num_range must satisfy 1 <= low <= high"),
        ({"num_count": (4, 3)}, "num_count must satisfy"),
        ({"target_range": 7}, "target_range must be a pair"),
        ({"num_count": (3, 3), "num_range": (1, 1), "target_range": (500, 999)}, "widen target_range"),
        ({"num_count": (2, 2), "num_range": (1, 1), "target_range": (1, 9), "num_test": 5}, "distinct problems"),
    ]:
        with pytest.raises(R1KitError, match=re.escape(msg)):
            make_task("countdown", **opts)


# ----------------------------------------------------------------------------- solver


def test_solver_known_cases():
    assert solve([1, 1, 1], 100) is None
    # 24 from 1, 3, 4, 6 needs a fraction: 6 / (1 - 3 / 4).
    assert solve([1, 3, 4, 6], 24, allow_fractions=False) is None
    expr = solve([1, 3, 4, 6], 24)
    assert expr is not None and "/" in expr
    assert_solves(expr, [1, 3, 4, 6], 24)
    with pytest.raises(ValueError, match="non-empty list of ints"):
        solve([], 3)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 30), min_size=2, max_size=4), st.integers(-50, 200))
def test_solver_answers_are_correct(nums, target):
    """Whatever the solver returns uses each number once and hits the target, parentheses included."""
    expr = solve(nums, target)
    if expr is not None:
        assert_solves(expr, nums, target)


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10**6))
def test_solver_finds_every_generated_target(seed):
    nums, target, _ = CountdownTask(num_test=0)._generate(random.Random(seed))
    expr = solve(nums, target, allow_fractions=False)
    assert expr is not None
    assert_solves(expr, nums, target)


def test_evaluate_expression_rejects_non_arithmetic():
    assert evaluate_expression("(7 - 3) / 8 * 2") == (Fraction(1), [7, 3, 8, 2])
    for expr in ["2 ** 3", "__import__('os')", "x + 1", "1.5 + 2", "-3 + 4", "1 +", "2 / (1 - 1)", "1" * 1001]:
        with pytest.raises(ValueError):
            evaluate_expression(expr)


# ----------------------------------------------------------------------------- the real rows


@pytest.mark.data
def test_file_heldout_is_the_real_rows(data_dir):
    task = make_task("countdown", heldout="file", target_range=(10, 100))
    rows = task.test_problems()
    assert len(rows) == 2001 and rows[0].id == "countdown-test-0000"
    assert all(p.answer_style == "countdown" and p.task == "countdown" for p in rows)
    for p in rows:
        assert parse_question(p.question) == (p.meta["nums"], int(p.answer))  # our wording is theirs
    held = {problem_key(p.meta["nums"], p.answer) for p in rows}
    train = task.train_problems(1000, random.Random(0))
    assert not any(problem_key(p.meta["nums"], p.answer) in held for p in train)


@pytest.mark.data
def test_solver_on_real_rows(data_dir):
    rows = make_task("countdown", heldout="file").test_problems()
    for p in random.Random(0).sample(rows, 50):
        expr = solve(p.meta["nums"], int(p.answer))
        assert expr is not None, p.question
        assert_solves(expr, p.meta["nums"], int(p.answer))
