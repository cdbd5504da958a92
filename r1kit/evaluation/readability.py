"""Readability of reasoning completions: the property R1's cold start is for (paper section 2.3.1).

R1-Zero's outputs "mix languages" and lack "markdown formatting to highlight answers"; the cold-start data
fixes one readable pattern, reasoning then a summary (|special_token|<reasoning_process>|special_token|
<summary>). Here a completion is readable when all three hold:

    fixed format     well formed (<think> ... </think> <answer> ... </answer>, non-empty answer) and its
                     chain of thought is reasoning, then a summary marker ("summary:" / "总结："), then a
                     non-empty summary
    not repetitive   at most `max_repetition` of its word 4-grams repeat an earlier one
    one language     every language word of the chain of thought is in the target language's script

    readability(["<think> 3+4=7, so 7. summary: 3+4=7. </think> <answer> 7 </answer>"], "en")
    # {"readability": 1.0, "fixed_format_rate": 1.0, "repetition_rate": 0.0, "mixing_rate": 0.0, ...}

Each rate is a share of the completions; `readability` is the share meeting all three.
"""
from __future__ import annotations

from typing import Sequence

from r1kit.rewards.language import is_mixed, language_consistency
from r1kit.templates import parse_completion

SUMMARY_MARKERS = ("summary:", "总结：")
MAX_REPETITION = 0.3  # the rejection-sampling filter's default threshold (sample.max_repetition)


def repetition_ratio(text: str, n: int = 4) -> float:
    """Share of word n-grams that repeat an earlier one: 0 for all-distinct text, near 1 for a loop."""
    words = text.split()
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    return 1 - len(set(grams)) / len(grams) if grams else 0.0


def has_fixed_format(completion: str) -> bool:
    """Well formed, and the chain of thought is reasoning, then a summary marker, then a summary."""
    parsed = parse_completion(completion)
    if not parsed.well_formed or not parsed.answer or not parsed.think:
        return False
    for marker in SUMMARY_MARKERS:
        i = parsed.think.rfind(marker)
        if i >= 0 and parsed.think[:i].strip() and parsed.think[i + len(marker):].strip(" ."):
            return True
    return False


def is_readable(completion: str, lang: str = "en", max_repetition: float = MAX_REPETITION) -> bool:
    return (has_fixed_format(completion) and repetition_ratio(completion) <= max_repetition
            and language_consistency(completion, lang) == 1.0)


def readability(completions: Sequence[str], lang: str = "en", max_repetition: float = MAX_REPETITION) -> dict[str, float]:
    """Shares of `completions`: readable (all three), fixed format, repetitive, mixing two scripts,
    with any word outside the target language; NaN for every rate when there are none."""
    n = len(completions)
    if n == 0:
        return dict.fromkeys(("readability", "fixed_format_rate", "repetition_rate", "mixing_rate", "off_target_rate"),
                             float("nan"))
    fixed = [has_fixed_format(c) for c in completions]
    repetitive = [repetition_ratio(c) > max_repetition for c in completions]
    on_target = [language_consistency(c, lang) == 1.0 for c in completions]
    return {"readability": sum(f and not r and o for f, r, o in zip(fixed, repetitive, on_target)) / n,
            "fixed_format_rate": sum(fixed) / n, "repetition_rate": sum(repetitive) / n,
            "mixing_rate": sum(is_mixed(c) for c in completions) / n, "off_target_rate": 1 - sum(on_target) / n}
