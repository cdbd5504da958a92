"""Evaluation metrics: pass@k against the closed form and brute force, cons@k by equivalence, summaries."""
from __future__ import annotations

import itertools
import math
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from r1kit.evaluation.metrics import (
    SampleRecord,
    auto_by_fields,
    length_stats,
    majority_vote,
    mean_ci,
    pass_at_k,
    summarize,
)
from r1kit.types import Problem, R1KitError


# ----------------------------------------------------------------------------- pass@k


def brute_pass_at_k(n: int, c: int, k: int) -> float:
    """Share of the k-subsets of n samples (c of them correct) that hold at least one correct sample."""
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(samples[i] for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", range(1, 8))
def test_pass_at_k_equals_brute_force_enumeration(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(brute_pass_at_k(n, c, k), abs=1e-12)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 400).flatmap(lambda n: st.tuples(st.just(n), st.integers(0, n), st.integers(1, n))))
def test_pass_at_k_equals_the_exact_closed_form(nck):
    n, c, k = nck
    exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))  # 1 - C(n-c, k) / C(n, k), in exact rationals
    assert pass_at_k(n, c, k) == pytest.approx(float(exact), abs=1e-9)


def test_pass_at_k_special_cases_and_errors():
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)  # pass@1 is the plain success rate
    assert pass_at_k(10, 0, 5) == 0.0 and pass_at_k(10, 10, 1) == 1.0
    assert pass_at_k(5, 2, 4) == 1.0  # only 3 wrong samples: every 4-subset holds a correct one
    assert pass_at_k(np.int64(4), np.int64(1), 2) == pytest.approx(0.5)  # numpy integers are fine
    assert 0.0 < pass_at_k(100_000, 1, 50_000) < 1.0  # huge n: no overflow, no NaN
    for bad in ((4, 5, 1), (4, 1, 0), (4, 1, 5), (4, -1, 1)):
        with pytest.raises(ValueError):
            pass_at_k(*bad)
    with pytest.raises(ValueError, match="integers"):
        pass_at_k(4.0, 1, 1)


# ----------------------------------------------------------------------------- CI, lengths


def test_mean_ci_is_the_normal_approximation():
    values = [0.0, 0.25, 0.5, 1.0, 1.0, 0.75]
    lo, hi = mean_ci(values)
    mean = sum(values) / len(values)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    assert (lo, hi) == pytest.approx((mean - 1.96 * sd / math.sqrt(6), mean + 1.96 * sd / math.sqrt(6)))
    assert mean_ci([0.0, 0.0, 1.0])[0] == 0.0  # clipped at 0
    assert mean_ci([0.5]) == (0.5, 0.5)
    with pytest.raises(ValueError):
        mean_ci([])


def test_length_stats():
    mean, p50, p90 = length_stats(list(range(1, 11)))
    assert (mean, p50, p90) == pytest.approx((5.5, 5.5, 9.1))
    assert length_stats([]) == (0.0, 0.0, 0.0)


# ----------------------------------------------------------------------------- cons@k


def vote(answers, gold, style="math", equivalent=None):
    """majority_vote with each answer graded against `gold` the way the runner would have."""
    from r1kit.rewards.graders import grade_many

    prob = Problem("p", "q", gold, style)
    verdicts = grade_many(answers, [prob] * len(answers))
    kw = {"equivalent": equivalent} if equivalent else {}
    return majority_vote(answers, [v.correct for v in verdicts], [v.reason for v in verdicts], style, **kw)


@pytest.mark.parametrize("style", ["math", "numeric"])
def test_cons_groups_equivalent_strings_not_equal_strings(style):
    # By string, "3" (2 votes) would win; by value, one half has 3 votes.
    v = vote(["3", "1/2", "0.5", "\\frac{1}{2}", "3"], "0.5", style)
    assert (v.correct, v.votes, v.groups, v.answer) == (True, 3, 2, "1/2")
    v = vote(["0.5", "3", "3.0", "\\frac{6}{2}", "1/2"], "1/2", style)
    assert (v.correct, v.votes, v.answer) == (False, 3, "3")


def test_cons_uses_math_verify_for_latex_forms():
    v = vote(["\\sqrt{2}/2", "7", "\\frac{\\sqrt{2}}{2}", "\\frac{1}{\\sqrt{2}}"], "\\frac{\\sqrt{2}}{2}")
    assert (v.correct, v.votes) == (True, 3)


def test_cons_ties_go_to_the_first_group():
    assert vote(["4", "1/2", "0.5", "4"], "1/2").answer == "4"
    assert vote(["0.5", "4", "4", "1/2"], "1/2").answer == "0.5"


def test_cons_majority_without_an_answer_counts_wrong():
    v = vote([None, "1/2", None], "1/2")
    assert (v.answer, v.correct, v.votes) == (None, False, 2)
    v = vote([None, "1/2", "0.5"], "1/2")
    assert (v.correct, v.votes) == (True, 2)


def test_cons_never_compares_answers_with_different_verdicts_or_unverifiable_ones():
    calls = []

    def spy(a, b, style):
        calls.append((a, b))
        return True  # would merge everything if asked

    answers, correct = ["1", "2", "1.0", "x"], [True, False, True, False]
    reasons = ["correct", "wrong value", "correct", "timeout"]
    v = majority_vote(answers, correct, reasons, "math", equivalent=spy)
    assert calls == [("1", "1.0")]  # only the two correct ones: (representative, newcomer)
    assert (v.votes, v.groups, v.correct) == (2, 3, True)
    # an unverifiable answer joins only identical text
    v = majority_vote(["x", "x", "y"], [False] * 3, ["timeout"] * 3, "math", equivalent=spy)
    assert (v.votes, v.groups) == (2, 2)


def test_majority_vote_rejects_bad_input():
    with pytest.raises(ValueError):
        majority_vote([], [], [], "math")
    with pytest.raises(ValueError):
        majority_vote(["1"], [True, False], ["correct"], "math")


# ----------------------------------------------------------------------------- summarize


def record(pid, i, answer, correct, length=10, **kw):
    base = dict(completion=f"<answer>{answer}</answer>", reason="correct" if correct else ("no answer" if answer is None else "wrong value"),
                truncated=False, well_formed=answer is not None, reflection=False)
    base.update(kw)
    return SampleRecord(pid, i, answer=answer, correct=correct, length=length, **base)


def test_summarize_computes_every_metric_from_records():
    problems = [
        Problem("a", "q", "2", "numeric", meta={"level": 1, "subject": "x"}),
        Problem("b", "q", "3", "numeric", meta={"level": 2, "subject": "x"}),
        Problem("c", "q", "4", "numeric", meta={"level": 2, "subject": "y"}),
    ]
    recs = [
        record("a", 0, "2", True, 4), record("a", 1, "2.0", True, 6), record("a", 2, "5", False, 8), record("a", 3, None, False, 20, truncated=True),
        record("b", 0, "1", False), record("b", 1, "3", True, reflection=True), record("b", 2, "1", False), record("b", 3, None, False),
        record("c", 3, None, False), record("c", 2, None, False), record("c", 1, "4", True), record("c", 0, None, False),
    ]
    s = summarize(recs, problems, k=4, pass_k=(1, 2, 4), by=("level",))
    rates = [2 / 4, 1 / 4, 1 / 4]
    assert s.pass1 == pytest.approx(np.mean(rates))
    assert s.pass1_ci == pytest.approx(mean_ci(rates))
    assert s.cons == pytest.approx(1 / 3)  # a: "2"/"2.0" win; b: "1" wins (wrong); c: no answer wins
    assert s.pass_at_k[1] == pytest.approx(s.pass1)
    assert s.pass_at_k[2] == pytest.approx(np.mean([pass_at_k(4, c, 2) for c in (2, 1, 1)]))
    assert s.pass_at_k[4] == 1.0
    assert s.no_answer_rate == pytest.approx(5 / 12)
    assert s.format_rate == pytest.approx(7 / 12) and s.reflection_rate == pytest.approx(1 / 12)
    assert s.truncated_rate == pytest.approx(1 / 12)
    assert s.mean_length == pytest.approx((4 + 6 + 8 + 20 + 80) / 12)
    assert s.by == {"level": {"1": {"num_problems": 1, "pass1": 0.5, "cons": 1.0},
                              "2": {"num_problems": 2, "pass1": 0.25, "cons": 0.0}}}
    assert [(r.problem_id, r.sample) for r in s.records][-4:] == [("c", 0), ("c", 1), ("c", 2), ("c", 3)]
    d = s.to_dict()
    assert "records" not in d and d["pass_at_k"] == {"1": s.pass1, "2": s.pass_at_k[2], "4": 1.0}
    with pytest.raises(R1KitError, match="pass@k"):
        summarize(recs, problems, k=4, pass_k=(8,))
    with pytest.raises(R1KitError, match="breakdown by 'topic'.*no such metadata field"):
        summarize(recs, problems, k=4, by=("topic",))
    with pytest.raises(ValueError, match="expected samples 0..3"):
        summarize(recs[1:], problems, k=4)


def test_auto_by_fields_picks_repeating_scalar_fields():
    problems = [Problem(str(i), "q", "1", meta={"level": i % 3, "id2": i, "nums": [i], "same": 1}) for i in range(12)]
    assert auto_by_fields(problems) == ["level"]  # "id2" never repeats, "nums" is a list, "same" has 1 value
    assert auto_by_fields([]) == []
