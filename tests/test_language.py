"""Language-consistency reward and mixing metric on mixed-script strings; the bilingual corpus."""
from __future__ import annotations

import random

import pytest

from r1kit.corpus import build_corpus
from r1kit.rewards import REWARD_FUNCS, score_completions
from r1kit.rewards.language import (
    is_mixed, language_consistency, mixing_rate, off_target_rate, script_counts, target_script, word_scripts,
)
from r1kit.tasks import make_task
from r1kit.types import Problem, R1KitError


def wrap(think: str, answer: str = "7") -> str:
    return f"<think> {think} </think> <answer> {answer} </answer>"


@pytest.mark.parametrize("text, scripts", [
    ("3+4=7, so 7.", ["latin"]),
    ("3+4=7, 得 7.", ["cjk"]),
    ("进位得", ["cjk", "cjk", "cjk"]),  # each ideograph is a word
    ("carry进位", ["latin", "cjk", "cjk"]),  # a script change ends a word
    ("Привет world", ["cyrillic", "latin"]),
    ("café ĳ", ["latin", "latin"]),
    ("12+34=46. ，。！", []),  # digits and punctuation carry no language
    ("γεια σου 안녕 مرحبا", ["greek", "greek", "hangul", "arabic"]),
])
def test_word_scripts(text, scripts):
    assert word_scripts(text) == scripts


def test_consistency_is_share_of_target_words():
    assert language_consistency(wrap("so 4. so 64. 得 764."), "en") == pytest.approx(2 / 3)
    assert language_consistency(wrap("so 4. so 64. 得 764."), "zh") == pytest.approx(1 / 3)
    assert language_consistency(wrap("Это да so"), "ru") == pytest.approx(2 / 3)
    assert language_consistency(wrap("12+34=46"), "en") == 1.0  # nothing to mix
    # The answer is not reasoning: only the chain of thought counts.
    assert language_consistency(wrap("so 4.", answer="得"), "en") == 1.0
    # Without <think>, the whole text (tags removed) is the reasoning.
    assert language_consistency("so 得 <answer> 3 </answer>", "en") == 0.5


def test_mixing_metrics():
    texts = [wrap("so 4. 得 64."), wrap("so 4."), wrap("得 4."), wrap("1+1=2")]
    assert [is_mixed(t) for t in texts] == [True, False, False, False]
    assert mixing_rate(texts) == 0.25
    assert off_target_rate(texts, "en") == 0.5
    assert script_counts(texts[0]) == {"latin": 1, "cjk": 1}


def test_registered_reward_reads_target_from_problem(monkeypatch):
    c = wrap("so 4. so 64. 得 764.")
    en, zh = Problem("a", "1+2", "3", meta={"lang": "en"}), Problem("b", "1+2", "3", meta={"lang": "zh"})
    s = score_completions([c, c], [en, zh], {"language": 1.0}).per_fn["language"]
    assert s.tolist() == pytest.approx([2 / 3, 1 / 3])
    bare = Problem("c", "1+2", "3")
    assert REWARD_FUNCS["language"](c, bare) == pytest.approx(2 / 3)  # default "en"
    monkeypatch.setenv("R1KIT_LANG", "zh")
    assert REWARD_FUNCS["language"](c, bare) == pytest.approx(1 / 3)


def test_unknown_language_is_an_error():
    assert target_script("EN") == "latin" and target_script("cjk") == "cjk"
    with pytest.raises(R1KitError, match="unknown target language 'klingon'"):
        language_consistency(wrap("so"), "klingon")


def test_bilingual_corpus_mixes_languages_and_default_is_unchanged():
    task = make_task("arithmetic", min_digits=3, max_digits=3, num_test=10)
    plain = build_corpus(task, 300, 0.3, 0.1, "r1_zero", random.Random(1))
    assert not any(is_mixed(d.completion) or script_counts(d.completion).get("cjk") for d in plain)
    bi = build_corpus(task, 300, 0.3, 0.1, "r1_zero", random.Random(1), zh_frac=0.3, mix_frac=0.2)
    assert [(d.prompt, d.style) for d in bi] == [(d.prompt, d.style) for d in plain]
    worked = [d.completion for d in bi if d.style != "direct"]
    zh_only = sum(script_counts(c).keys() == {"cjk"} for c in worked) / len(worked)
    mixed = mixing_rate(worked)
    assert 0.15 < zh_only < 0.45 and 0.08 < mixed < 0.35
    # Step words never touch the maths: the answer and the digits of the steps are those of the plain text.
    for a, b in zip(plain, bi):
        assert a.completion.split("<answer>")[1] == b.completion.split("<answer>")[1]
    with pytest.raises(R1KitError, match="zh_frac"):
        build_corpus(task, 10, 0.3, 0.1, "r1_zero", random.Random(1), zh_frac=0.8, mix_frac=0.5)
