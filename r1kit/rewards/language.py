"""Language consistency: the reward of DeepSeek-R1's reasoning RL stage, and the language-mixing metric.

The paper (section 2.3.2) adds to the accuracy reward "the proportion of target language words in the
CoT", so that the model stops switching languages mid-reasoning. We judge a word's language by its
*script* (Latin, CJK, Cyrillic, ...), which needs no dictionary and is exact for the distinction the
paper cares about (English vs Chinese): words are maximal runs of letters of one script, except that
every CJK ideograph counts as one word (Chinese writes no spaces). Digits, punctuation and maths carry no
language and are ignored, so "1+2=3" is neither consistent nor mixed.

    language_consistency("<think> 3+4=7, so 7. </think> ...", "en")    # 1.0
    language_consistency("<think> 3+4=7, 得 7. so </think>", "en")     # 0.5 (one Latin, one CJK word)
    is_mixed("<think> 得 7, so </think>")                              # True: two scripts in the CoT

The reward "language" is registered with `register_reward`. Its target travels with the problem, like
its grader does: `problem.meta["lang"]` (a language code such as "en", "zh", "ru", or a script name such
as "latin"); problems without one use `$R1KIT_LANG` or else "en". The R1 recipe stamps the configured
`pipeline.lang` into every RL problem, so configs, not globals, choose the target.
Departure from the paper: a CoT with no language words at all (pure digits) scores 1.0: it mixes nothing.
"""
from __future__ import annotations

import functools
import os
import re
import unicodedata
from collections import Counter
from typing import Sequence

from r1kit.rewards import register_reward
from r1kit.templates import SPECIAL_TAGS, parse_completion
from r1kit.types import Problem, R1KitError

LANG_ENV = "R1KIT_LANG"
DEFAULT_LANG = "en"

# Unicode blocks of each script (inclusive code point ranges). CJK groups Han with the Japanese kana,
# since a Chinese and a Japanese CoT are told apart by neither reward nor metric here.
SCRIPT_RANGES: dict[str, tuple[tuple[int, int], ...]] = {
    "latin": ((0x41, 0x5A), (0x61, 0x7A), (0xC0, 0x24F), (0x1E00, 0x1EFF)),
    "cjk": ((0x3040, 0x30FF), (0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xF900, 0xFAFF), (0x20000, 0x2FA1F)),
    "hangul": ((0x1100, 0x11FF), (0x3130, 0x318F), (0xAC00, 0xD7AF)),
    "cyrillic": ((0x400, 0x52F),),
    "greek": ((0x370, 0x3FF),),
    "arabic": ((0x600, 0x6FF), (0x750, 0x77F)),
    "hebrew": ((0x590, 0x5FF),),
    "devanagari": ((0x900, 0x97F),),
    "thai": ((0xE00, 0xE7F),),
}
# Language code -> script. Script names are accepted as targets too.
LANG_SCRIPTS: dict[str, str] = {
    **{code: "latin" for code in ("en", "fr", "de", "es", "it", "pt", "nl", "pl", "tr", "vi", "id", "sv")},
    "zh": "cjk", "ja": "cjk", "ko": "hangul", "ru": "cyrillic", "uk": "cyrillic", "bg": "cyrillic",
    "el": "greek", "ar": "arabic", "fa": "arabic", "he": "hebrew", "hi": "devanagari", "th": "thai",
}
_SPLIT_EVERY_CHAR = {"cjk"}  # scripts written without spaces: each character is a word


def script_of(ch: str) -> str | None:
    """The script of one character, or None for digits, punctuation, spaces, symbols and unknown scripts."""
    if not ch.isalpha():
        return None
    cp = ord(ch)
    for script, ranges in SCRIPT_RANGES.items():
        if any(lo <= cp <= hi for lo, hi in ranges):
            return script
    return None


def target_script(lang: str) -> str:
    """"en" -> "latin", "zh" -> "cjk", "latin" -> "latin"; an unknown name is an R1KitError."""
    key = lang.strip().lower()
    if key in SCRIPT_RANGES:
        return key
    if key in LANG_SCRIPTS:
        return LANG_SCRIPTS[key]
    raise R1KitError(f"unknown target language {lang!r}; use a code {sorted(LANG_SCRIPTS)} "
                     f"or a script {sorted(SCRIPT_RANGES)}")


@functools.lru_cache(maxsize=1)
def _word_scanner() -> tuple[dict[int, str], re.Pattern, dict[str, str]]:
    """(translation table, run regex, code -> script). The table maps every letter of a known script to a
    one-character code of its script (and the codes themselves to spaces), so that a small regex over the
    translated text finds the words in C. Built once, on first use (~100k letters, ~30 ms)."""
    codes = {script: chr(1 + i) for i, script in enumerate(SCRIPT_RANGES)}
    table = {ord(code): " " for code in codes.values()}
    for script, ranges in SCRIPT_RANGES.items():
        for lo, hi in ranges:
            table.update((cp, codes[script]) for cp in range(lo, hi + 1) if chr(cp).isalpha())
    runs = re.compile("|".join(re.escape(code) + ("" if script in _SPLIT_EVERY_CHAR else "+")
                               for script, code in codes.items()))
    return table, runs, {code: script for script, code in codes.items()}


def word_scripts(text: str) -> list[str]:
    """The script of every word of `text`, in order. A word is a maximal run of letters of one script
    (a CJK ideograph is a word on its own); characters of no script end a word and are dropped.
    (Same result as calling `script_of` on each character, ~3x faster: it is a reward on 100k-char texts.)"""
    table, runs, names = _word_scanner()
    return [names[w[0]] for w in runs.findall(unicodedata.normalize("NFC", text).translate(table))]


def reasoning_text(completion: str) -> str:
    """The chain of thought of a completion: inside <think></think> when present, else the whole text
    without its tags (a model that never opens <think> still reasons somewhere)."""
    think = parse_completion(completion).think
    if think is not None:
        return think
    for tag in SPECIAL_TAGS:
        completion = completion.replace(tag, " ")
    return completion


def language_consistency(completion: str, lang: str = DEFAULT_LANG) -> float:
    """Share of the chain of thought's words written in the script of `lang`; 1.0 when it has no words.

    The paper's language-consistency reward: Reward_language = Num(Words_target) / Num(Words).
    """
    target = target_script(lang)
    scripts = word_scripts(reasoning_text(completion))
    if not scripts:
        return 1.0
    return sum(s == target for s in scripts) / len(scripts)


def script_counts(completion: str) -> Counter:
    """How many chain-of-thought words each script has."""
    return Counter(word_scripts(reasoning_text(completion)))


def is_mixed(completion: str) -> bool:
    """Whether the chain of thought uses words of two or more scripts (language mixing)."""
    return len(script_counts(completion)) >= 2


def mixing_rate(completions: Sequence[str]) -> float:
    """Share of completions whose reasoning mixes scripts; 0.0 for none."""
    return sum(map(is_mixed, completions)) / len(completions) if completions else 0.0


def off_target_rate(completions: Sequence[str], lang: str = DEFAULT_LANG) -> float:
    """Share of completions with at least one chain-of-thought word outside the target script."""
    if not completions:
        return 0.0
    return sum(language_consistency(c, lang) < 1.0 for c in completions) / len(completions)


def problem_lang(problem: Problem) -> str:
    """The target language of a problem: meta["lang"], else $R1KIT_LANG, else "en"."""
    return str(problem.meta.get("lang") or os.environ.get(LANG_ENV) or DEFAULT_LANG)


@register_reward("language")
def language_reward(completion: str, problem: Problem) -> float:
    """Language consistency of the reasoning in the problem's target language (see `problem_lang`)."""
    return language_consistency(completion, problem_lang(problem))
