"""The cheap disproof in front of math-verify: it may only ever say "different" where math-verify does too."""
from __future__ import annotations

import random

import pytest

from r1kit.rewards import graders
from r1kit.rewards.mathverify import verify_math
from r1kit.rewards.quick_math import compile_expression, plainly_different
from r1kit.types import Problem


@pytest.mark.parametrize("pred, gold", [
    ("17", "2\\sqrt{3}"), ("x^{2} + 3x + 7", "x^{2}+1"), ("\\frac{63}{98}", "\\frac{1}{2}"), ("7^{35}", "42"),
    ("-3", "3"), ("2x", "x^2"), ("\\left(1+x\\right)^{3}", "1+x^{3}"), ("\\dfrac{1}{3}", "\\frac{1}{4}"),
    ("2^{-2}", "\\frac{1}{2}"), ("10^{30}", "10^{29}"),
    ("(-8, -9)", "42"), ("(2, 3)", "(2, 4)"), ("(1, 2, 3)", "(1, 2)"), ("2^{37}", "x^{2}+1"), ("5x", "5"),
])
def test_different_values_are_different(pred, gold):
    assert plainly_different(pred, gold)
    assert plainly_different(gold, pred)


@pytest.mark.parametrize("pred, gold", [
    ("\\sqrt{12}", "2\\sqrt{3}"), ("(x+1)^{2}", "x^{2}+2x+1"), ("\\frac{2}{4}", "\\frac{1}{2}"), ("1/2", "\\frac{1}{2}"),
    ("2^{-1}", "\\frac{1}{2}"), ("x \\cdot x", "x^2"), ("3 \\times 4", "12"), ("42", "42"),
    ("123456789012345678901", "123456789012345678902"),  # closer than float precision: left to math-verify
    ("(2, 3)", "(3, 2)"),  # as a set of solutions they are equal
    ("x - x + 3", "3"), ("(1)+(2)", "3"), ("\\left(1, 2\\right)", "(1, 2)"),
])
def test_equal_or_too_close_values_are_not_called_different(pred, gold):
    assert not plainly_different(pred, gold)


@pytest.mark.parametrize("text", [
    "0.5", "2\\pi", "e", "2i", "(x, 3)", "(1, 000)", "\\{1, 2\\}", "x = 3", "[0, 1)", "50\\%", "\\sqrt[3]{8}", "2^{x}",
    "1/2x", "2x/3y", "3\\frac{1}{2}", "\\frac{1}{0}", "\\sqrt{-4}", "9^{99}", "1" * 31, "x" + "+x" * 150, "(" * 500 + "1" + ")" * 500, "", "   ", "{}",
    "2 3", "\\frac{1}", "x^{", "\\sin x", "\\infty", "\\text{yes}",
])
def test_outside_the_subset_is_unknown(text):
    """Decimals (rounding), constants, tuples, sets, equations, intervals, fractional or huge powers, division
    by zero, negative roots, and anything malformed or too long: never decided here."""
    assert not plainly_different(text, "7")
    assert not plainly_different("7", text)


def test_variables_must_match():
    assert compile_expression("x^{2}+1")[1] == frozenset("x")
    assert not plainly_different("y^{2}+1", "x^{2}+1")  # another letter: math-verify's question
    assert not plainly_different("(x, 1)", "(1, 2)")  # tuples with variables are not decided


def _random_expression(rng: random.Random, depth: int = 0) -> str:
    leaf = [lambda: str(rng.randint(0, 12)), lambda: "x"]
    node = [
        lambda: f"{_random_expression(rng, depth + 1)} + {_random_expression(rng, depth + 1)}",
        lambda: f"{_random_expression(rng, depth + 1)} - {_random_expression(rng, depth + 1)}",
        lambda: f"\\frac{{{_random_expression(rng, depth + 1)}}}{{{rng.randint(1, 9)}}}",
        lambda: f"(x + {rng.randint(1, 9)})^{{2}}",
        lambda: f"{rng.randint(2, 9)}\\sqrt{{{rng.randint(2, 30)}}}",
        lambda: f"{rng.randint(2, 9)}{_random_expression(rng, depth + 1)}" if rng.random() < 0.5 else f"{rng.randint(2, 9)}x",
    ]
    return rng.choice(leaf if depth >= 2 or rng.random() < 0.3 else node)()


def test_agrees_with_math_verify_wherever_it_decides():
    """On random pairs from the subset (many of them equal in value, written differently), every pair called
    different is wrong for math-verify too; and the check decides most of the wrong ones."""
    rng = random.Random(0)
    pairs = []
    for _ in range(30):
        a = _random_expression(rng)
        pairs.append((a, _random_expression(rng)))
        pairs.append((a, f"{a} + 0"))  # equal value, different text
        pairs.append((f"2({a})", f"{a} + {a}"))
        pairs.append((str(rng.randint(-9, 99)), a))  # a constant against an expression, maybe in x
        b, c = rng.randint(-9, 9), rng.randint(-9, 9)
        pairs.append((f"({b}, {c})", rng.choice([f"({c}, {b})", f"({b}, {c + 1})", str(b), f"({b}, {c}, 1)"])))
    decided = [(pred, gold) for pred, gold in pairs if plainly_different(pred, gold)]
    assert len(decided) >= 0.4 * len(pairs)
    for pred, gold in decided[::3]:  # every third: math-verify costs up to seconds a pair on a loaded machine
        assert not verify_math(pred, gold, timeout_s=3.0).correct, (pred, gold)


def test_grade_settles_plainly_wrong_answers_without_math_verify(monkeypatch):
    def no_math_verify(*args, **kwargs):
        raise AssertionError("math-verify called")

    monkeypatch.setattr(graders, "verify_math", no_math_verify)
    problem = Problem("p", "q", "2\\sqrt{3}", "math")
    v = graders.grade("<think> x </think> <answer> 17 </answer>", problem)
    assert (v.correct, v.reason, v.pred) == (False, "wrong value", "17")
    with pytest.raises(AssertionError, match="math-verify called"):  # an equal value still goes to math-verify
        graders.grade("<think> x </think> <answer> \\sqrt{12} </answer>", problem)
