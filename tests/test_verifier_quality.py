"""Verifier quality on the real benchmark files (issue 4 acceptance); skipped without $R1KIT_DATA_DIR.

The checks live in benchmarks/verifier_quality.py, which also records the figures for the README.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from r1kit.tasks import make_task

pytestmark = pytest.mark.data

_SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "verifier_quality.py"


@pytest.fixture(scope="module")
def vq():
    spec = importlib.util.spec_from_file_location("verifier_quality", _SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_math500_boxed_solution_matches_the_answer_field(vq, data_dir):
    problems = make_task("math500").test_problems()
    result = vq.boxed_vs_answer(problems)
    assert result["total"] == 500
    assert result["agree_rate"] >= 0.99, result["misses"]
    # the slow path agrees too: math-verify alone, without the equal-text shortcut
    assert result["math_verify_alone_agree"] >= 0.99 * result["math_verify_alone_total"]


def test_gsm8k_hash_answer_matches_the_answer_field_everywhere(vq, data_dir):
    result = vq.gsm8k_hash_vs_answer(make_task("gsm8k").test_problems())
    assert (result["total"], result["agree"]) == (1319, 1319), result["misses"]


@pytest.mark.parametrize("name", ["math500", "gsm8k"])
def test_shuffled_answers_are_rarely_judged_equivalent(vq, data_dir, name):
    result = vq.shuffled_pairs(make_task(name).test_problems(), rounds=1, seed=1)
    assert result["pairs"] == len(make_task(name).test_problems())
    assert result["rate"] < 0.01, result["accepted"]
    assert result["reasons"].get("timeout", 0) == 0  # real answers never hit the time limit
