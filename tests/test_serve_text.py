"""The server's text pipeline: incremental detokenizing, stop strings, the reasoning/answer split."""
from __future__ import annotations

import random

import pytest

from r1kit.serving.reasoning import IncrementalDetokenizer, ReasoningSplitter, SampleText, StopMatcher


def split_whole(text: str, starts_in_reasoning: bool = False) -> tuple[str, str]:
    d = ReasoningSplitter(starts_in_reasoning).push(text, final=True)
    return d.reasoning, d.content


def split_streamed(pieces: list[str], starts_in_reasoning: bool = False) -> tuple[str, str]:
    sp = ReasoningSplitter(starts_in_reasoning)
    r, c = [], []
    for i, piece in enumerate(pieces):
        d = sp.push(piece, final=i == len(pieces) - 1)
        r.append(d.reasoning)
        c.append(d.content)
        if any(c):  # reasoning deltas all come before the first content delta
            assert not d.reasoning or not "".join(c[:-1])
    return "".join(r), "".join(c)


CASES = [
    ("<think> 2 plus 3 is 5 </think> <answer> 5 </answer>", False, ("2 plus 3 is 5", "5")),
    ("  <think>a\nb</think>\n<answer>x y</answer>\n", False, ("a\nb", "x y")),
    ("<think> unclosed reasoning", False, ("unclosed reasoning", "")),
    ("<think> skipped close <answer> 7 </answer>", False, ("skipped close", "7")),
    ("no tags at all ", False, ("", "no tags at all")),
    ("<answer> 4 </answer>", False, ("", "4")),
    ("reasoning first\n</think>\n\nThe answer is 3.", True, ("reasoning first", "The answer is 3.")),
    ("<thin", False, ("", "<thin")),  # a prefix of <think> that never completes is content
    ("", False, ("", "")),
    ("<think></think><answer></answer>", False, ("", "")),
    ("<think> a </think> text <answer> b </answer> tail", False, ("a", "text  b  tail")),
]


@pytest.mark.parametrize("text,starts,expected", CASES)
def test_split_whole_and_streamed_agree(text, starts, expected):
    assert split_whole(text, starts) == expected
    rng = random.Random(len(text))
    for _ in range(20):  # every way of cutting the text into stream pieces gives the same parts
        cuts = sorted(rng.sample(range(len(text) + 1), min(len(text), rng.randint(0, 6))))
        pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
        assert split_streamed(pieces, starts) == expected, pieces
    assert split_streamed(list(text) or [""], starts) == expected


def test_boundary_positions():
    sp = ReasoningSplitter()
    text = "<think> r </think> <answer> a </answer>"
    sp.push(text, final=True)
    assert sp.had_reasoning and text[:sp.boundary].endswith("</think>")
    sp = ReasoningSplitter()
    sp.push("<think> r <answer> a", final=True)
    assert "<think> r <answer> a"[sp.boundary:].startswith("<answer>")


def test_stop_strings_cut_before_the_match_even_across_pieces():
    sm = StopMatcher(["STOP", "\n\n"])
    out = [sm.push(p) for p in ["abc S", "TO", "P more"]]
    assert "".join(out) == "abc " and sm.stopped and sm.push("later") == "" and sm.flush() == ""
    sm = StopMatcher(["STOP"])
    assert sm.push("xS") == "x"  # "S" is held back: it may start STOP
    assert sm.push("Ty") == "STy"  # no longer a prefix: released
    assert sm.flush() == "" and not sm.stopped
    sm = StopMatcher([])
    assert sm.push("abc") == "abc"
    sm = StopMatcher(["ab"])
    assert sm.push("xa") == "x" and sm.flush() == "a"  # held text comes out when the sample ends


def test_detokenizer_streams_exactly_the_full_decode(tiny_tokenizer):
    tok = tiny_tokenizer
    text = "User: 12+7?\nAssistant:<think> 12 plus 7 is 19, café ünïcode 你好 </think> <answer> 19 </answer>"
    ids = tok(text).input_ids + [tok.eos_token_id]
    det = IncrementalDetokenizer(tok, prompt_ids=ids[:3])
    pieces = [det.push([t]) for t in ids[3:]]
    assert "".join(pieces) == tok.decode(ids[3:-1])
    assert all("\ufffd" not in p for p in pieces)  # multi-byte characters are never split
    assert det.offsets[-1] == len(det.text) and len(det.offsets) == len(ids) - 3


def test_sample_text_counts_reasoning_tokens(tiny_tokenizer):
    tok = tiny_tokenizer
    reasoning_ids = tok("<think> 3 plus 4 is 7 </think>").input_ids
    answer_ids = tok(" <answer> 7 </answer>").input_ids
    st = SampleText(IncrementalDetokenizer(tok), StopMatcher([]), ReasoningSplitter())
    ids = reasoning_ids + answer_ids
    for i, t in enumerate(ids):
        st.push([t], finished=i == len(ids) - 1)
    assert "".join(st.reasoning) == "3 plus 4 is 7" and "".join(st.content) == "7"
    assert st.reasoning_tokens() == len(reasoning_ids)
    st = SampleText(IncrementalDetokenizer(tok), StopMatcher([" is"]), ReasoningSplitter())
    for t in ids:
        st.push([t], finished=False)
        if st.stopped:
            break
    assert st.stopped and "".join(st.reasoning) == "3 plus 4" and st.reasoning_tokens() == st.num_tokens


@pytest.fixture(scope="module")
def tiny_tokenizer():
    from helpers import tiny_pair

    return tiny_pair()[1]


def test_detokenizer_holds_incomplete_characters_only_briefly(tiny_tokenizer):
    tok = tiny_tokenizer
    euro = tok("€", add_special_tokens=False).input_ids  # 3 byte-level tokens
    assert len(euro) == 3
    det = IncrementalDetokenizer(tok)
    assert [det.push([t]) for t in euro] == ["", "", "€"]  # held until the character is complete
    lone = euro[1]  # a continuation byte alone is invalid: it must not hold the stream up for long
    det = IncrementalDetokenizer(tok)
    out = [det.push([lone]) for _ in range(6)]
    assert out[:3] == ["", "", ""] and "".join(out) + det.flush() == tok.decode([lone] * 6)
    det = IncrementalDetokenizer(tok)
    assert det.push(euro[:2]) == "" and det.flush() == tok.decode(euro[:2])  # the end releases what is held
    st = SampleText(IncrementalDetokenizer(tok), StopMatcher([]), None)
    st.push(euro[:1], finished=False)
    assert st.push(euro[1:2], finished=True).content == tok.decode(euro[:2])
