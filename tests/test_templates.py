from r1kit.templates import parse_completion, render_prompt
import pytest


def test_render_r1_zero_ends_at_assistant():
    p = render_prompt("12+34")
    assert p.endswith("User: 12+34\nAssistant:") and "<think> </think>" in p and "<answer> </answer>" in p
    assert render_prompt("q", "Q: {question} A:") == "Q: q A:"
    with pytest.raises(ValueError, match="template"):
        render_prompt("q", "no placeholder")


@pytest.mark.parametrize("text, think, answer, ok", [
    (" <think> a b </think> <answer> 5 </answer>", "a b", "5", True),
    ("<think>a</think><answer>5</answer>", "a", "5", True),
    ("<think>a</think><answer>5</answer> trailing", "a", "5", False),
    ("", None, None, False),
    ("just 42", None, None, False),
    ("<think> x <answer> 4 </answer>", None, "4", False),  # unclosed think
    ("<think>a</think><answer>1</answer><answer>2</answer>", "a", "2", False),  # last answer counts
    ("<think>a</think><answer>1 <think> 2</answer>", "a", None, False),  # nested tag in answer
    ("<think>a</think><answer>7", "a", None, False),  # unclosed answer
    ("<think><think>a</think></think><answer>3</answer>", "<think>a", "3", False),
])
def test_parse_completion(text, think, answer, ok):
    p = parse_completion(text)
    assert (p.think, p.answer, p.well_formed) == (think, answer, ok)
    assert ok == (not p.problems)


def test_parse_is_fast_on_long_junk():
    import time

    t = time.time()
    parse_completion("<think>" + "x<" * 5000 + "</answer>" * 100)
    assert time.time() - t < 0.5
