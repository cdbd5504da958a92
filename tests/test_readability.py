"""The readability metric (r1kit.evaluation.readability) on hand-made completions."""
from __future__ import annotations

import math

import pytest

from r1kit.evaluation.readability import has_fixed_format, is_readable, readability, repetition_ratio

R1 = " <think> 17+25: 7+5+0=12, so 2 carry 1. 1+2+1=4, so 4. summary: 17+25=42. </think> <answer> 42 </answer>"
ZERO = " <think> 7+5+0=12, so 2 carry 1. 1+2+1=4, so 4. </think> <answer> 42 </answer>"  # no summary
MIXED = " <think> 17+25: 7+5+0=12, 得 2 carry 1. 1+2+1=4, so 4. summary: 17+25=42. </think> <answer> 42 </answer>"
ZH = " <think> 7+5+0=12, 得 2. 总结： 17+25=42. </think> <answer> 42 </answer>"
LOOP = " <think> 7+5=12 so 2 " + "carry one then add " * 8 + "summary: 42. </think> <answer> 42 </answer>"


@pytest.mark.parametrize("text, fixed", [
    (R1, True), (ZERO, False), (ZH, True),
    (" <think> summary: 42. </think> <answer> 42 </answer>", False),  # a summary with no reasoning before it
    (" <think> 7+5=12. summary: </think> <answer> 42 </answer>", False),  # an empty summary
    (" <think> 7+5=12. summary: 42. </think> <answer>  </answer>", False),  # no answer
    (" <think> 7+5=12. summary: 42. </think> 42", False),  # not well formed
    (" 7+5=12. summary: 42. <answer> 42 </answer>", False),  # no chain of thought
])
def test_fixed_format_is_reasoning_then_summary_then_answer(text, fixed):
    assert has_fixed_format(text) is fixed


def test_repetition_ratio_counts_repeated_word_4grams():
    assert repetition_ratio("a b c d e f g") == 0.0
    assert repetition_ratio("a b c d a b c d") == pytest.approx(1 - 4 / 5)  # grams abcd bcda cdab dabc abcd
    assert repetition_ratio("too short") == 0.0
    assert repetition_ratio(LOOP) > 0.3 >= repetition_ratio(R1)


def test_readable_needs_format_no_repetition_and_the_target_language():
    assert is_readable(R1, "en")
    assert not is_readable(ZERO, "en") and not is_readable(MIXED, "en") and not is_readable(LOOP, "en")
    assert is_readable(ZH, "zh") and not is_readable(ZH, "en")


def test_readability_rates_over_a_set():
    r = readability([R1, ZERO, MIXED, LOOP, ZH], "en")
    assert r["fixed_format_rate"] == pytest.approx(4 / 5)  # all but ZERO
    assert r["repetition_rate"] == pytest.approx(1 / 5)  # LOOP
    assert r["mixing_rate"] == pytest.approx(1 / 5)  # MIXED (ZH is Chinese words only, plus digits)
    assert r["off_target_rate"] == pytest.approx(2 / 5)  # MIXED and ZH have non-Latin words
    assert r["readability"] == pytest.approx(1 / 5)  # R1 only
    assert readability([R1] * 3, "en")["readability"] == 1.0
    assert all(math.isnan(v) for v in readability([], "en").values())
