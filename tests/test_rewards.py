"""Reward functions, the reward registry and score_completions; malformed completions must stay cheap."""
from __future__ import annotations

import random
import time

import pytest
import torch

from r1kit.rewards import (
    BATCH_REWARD_FUNCS,
    REWARD_FUNCS,
    accuracy_reward,
    format_reward,
    has_reflection,
    reflection_rate,
    register_reward,
    score_completions,
)
from r1kit.rewards.functions import accuracy_rewards
from r1kit.types import Problem, R1KitError

PROBLEMS = {
    "numeric": Problem("n", "2+2?", "1234", "numeric"),
    "exact": Problem("e", "letter?", "B", "exact"),
    "countdown": Problem("c", "make 9", "9", "countdown", meta={"nums": [1, 2, 3]}),
    "math": Problem("m", "half?", "\\frac{1}{2}", "math"),
}
RIGHT = {"numeric": "1,234", "exact": "B", "countdown": "(1 + 2) * 3", "math": "0.5"}


def well(think: str, answer: str) -> str:
    return f"<think>{think}</think>\n<answer>{answer}</answer>"


@pytest.mark.parametrize("style", sorted(PROBLEMS))
def test_accuracy_and_format_on_a_good_completion(style):
    completion = well("work it out", RIGHT[style])
    assert accuracy_reward(completion, PROBLEMS[style]) == 1.0
    assert format_reward(completion, PROBLEMS[style]) == 1.0
    assert accuracy_reward(well("work", "77"), PROBLEMS[style]) == 0.0


def test_accuracy_reads_only_the_last_answer_tag():
    p = PROBLEMS["numeric"]
    assert accuracy_reward("<answer>0</answer> hmm <answer>1234</answer>", p) == 1.0
    assert accuracy_reward("<answer>1234</answer> no wait <answer>0</answer>", p) == 0.0
    # right answer, but not inside <answer>: R1-Zero rewards the specified format, no fallback
    assert accuracy_reward("<think>so</think> the answer is \\boxed{1234}", p) == 0.0
    assert accuracy_reward("1234", p) == 0.0


def test_format_reward_needs_the_exact_layout():
    p = PROBLEMS["exact"]
    assert format_reward("  <think>a</think> <answer>B</answer>\n", p) == 1.0
    for bad in ["<answer>B</answer>", "<think>a</think>", "hi <think>a</think><answer>B</answer>",
                "<think>a</think><answer>B</answer> bye", "<think>a<think>b</think></think><answer>B</answer>",
                "<think>a</think><answer>B</answer><answer>B</answer>", "<think>a</think><answer>B", ""]:
        assert format_reward(bad, p) == 0.0, bad


def _junk(n: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    pieces = ["<think>", "</think>", "<answer>", "</answer>", "\\boxed{", "}", "{", "(", "9", "-", "/", ",", " ", "$"]
    return "".join(rng.choice(pieces) if rng.random() < 0.3 else chr(rng.randrange(32, 127)) for _ in range(n))


# name -> (completion, its format reward): each must be graded quickly and sanely in every style.
MALFORMED = {
    "empty": ("", 0.0),
    "no tags": ("the answer is 1234", 0.0),
    "nested": ("<think>x</think><answer><answer>1234</answer></answer>", 0.0),
    "repeated think": ("<think>a</think><think>b</think><answer>1234</answer>", 0.0),
    "unclosed answer": ("<think>a</think><answer>1234", 0.0),
    "unclosed think": ("<think>a <answer>1234</answer>", 0.0),
    "junk": (_junk(10_000), 0.0),
    "unclosed boxes": ("\\boxed{" * 5_000 + "1234", 0.0),  # quadratic if each box were scanned to the end
    "nested boxes": (well("b", "\\boxed{" * 3_000 + "1234" + "}" * 3_000), 1.0),
    "huge number": (well("big", "9" * 100_000), 1.0),
    "huge negative": (well("big", "-1" + "0" * 5_000), 1.0),
    "deep parentheses": (well("deep", "(" * 5_000 + "1"), 1.0),
    "power tower": (well("t", "9^{9^{9^{9}}}"), 1.0),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
@pytest.mark.parametrize("style", sorted(PROBLEMS))
def test_malformed_completions_are_cheap_and_sane(case, style):
    text, expected_format = MALFORMED[case]
    start, cpu_start = time.perf_counter(), time.process_time()
    acc = accuracy_reward(text, PROBLEMS[style])
    fmt = format_reward(text, PROBLEMS[style])
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    assert acc in (0.0, 1.0) and fmt == expected_format
    if "1234" not in text:  # only the tag cases hold the right numeric answer at all
        assert acc == 0.0
    if style == "math":  # may go to math-verify in a worker process, which is killed after 2 s of wall time
        assert elapsed < 2.0 + 1.0, (case, style, elapsed)
    else:  # in-process graders answer at once; CPU time, so that a loaded machine cannot fail the test
        assert cpu < 0.25, (case, style, cpu)


def test_accuracy_on_malformed_tags():
    p = PROBLEMS["numeric"]
    assert accuracy_reward(MALFORMED["unclosed answer"][0], p) == 0.0  # no complete answer: nothing to grade
    assert accuracy_reward(MALFORMED["no tags"][0], p) == 0.0
    # a complete <answer> pair is graded even when the rest of the layout is wrong (format reward is 0)
    assert accuracy_reward(MALFORMED["repeated think"][0], p) == 1.0
    assert accuracy_reward(MALFORMED["unclosed think"][0], p) == 1.0


@pytest.mark.parametrize(
    "text, expected",
    [("<think>12. Wait, that is wrong.</think><answer>1</answer>", True),
     ("<think>Let me recompute: 3.</think><answer>3</answer>", True),
     ("I should double-check this", True), ("recheck: fine", True), ("We VERIFY it", True),
     ("checking again", True), ("<think>awaited checkout</think><answer>wait</answer>", False),
     ("plain answer 5", False), ("", False)],
)
def test_has_reflection(text, expected):
    assert has_reflection(text) is expected


def test_reflection_rate():
    assert reflection_rate(["wait", "no", "check it", "x"]) == 0.5
    assert reflection_rate([]) == 0.0


def test_score_completions_weighted_sum_and_raw_values():
    problems = [PROBLEMS["numeric"]] * 3 + [PROBLEMS["countdown"]]
    completions = [well("a", "1234"), "<answer>1234</answer>", well("a", "5"), well("b", "3*(2+1)")]
    scores = score_completions(completions, problems, {"accuracy": 1.0, "format": 0.1})
    acc, fmt = [1.0, 1.0, 0.0, 1.0], [1.0, 0.0, 1.0, 1.0]
    assert scores.per_fn["accuracy"].tolist() == acc
    assert scores.per_fn["format"].tolist() == fmt
    assert scores.total.dtype == torch.float32 and scores.total.shape == (4,)
    assert torch.allclose(scores.total, torch.tensor([a + 0.1 * f for a, f in zip(acc, fmt)]))
    means = scores.means()
    assert means["reward/accuracy"] == pytest.approx(0.75)
    assert means["reward"] == pytest.approx(scores.total.mean().item())


def test_batch_accuracy_equals_one_by_one():
    rng = random.Random(0)
    styles = sorted(PROBLEMS)
    problems = [PROBLEMS[rng.choice(styles)] for _ in range(24)]
    answers = ["1,234", "B", "(1+2)*3", "0.5", "\\frac{2}{4}", "7", "", "b", "1/2"]
    completions = [well("t", rng.choice(answers)) if rng.random() < 0.8 else rng.choice(answers) for _ in problems]
    assert accuracy_rewards(completions, problems) == [accuracy_reward(c, p) for c, p in zip(completions, problems)]
    assert BATCH_REWARD_FUNCS["accuracy"] is accuracy_rewards


@pytest.fixture
def registry():
    """Rewards registered by a test are removed afterwards."""
    saved = dict(REWARD_FUNCS), dict(BATCH_REWARD_FUNCS)
    yield
    for live, old in zip((REWARD_FUNCS, BATCH_REWARD_FUNCS), saved):
        live.clear()
        live.update(old)


def test_registry_lookup_and_errors(registry):
    @register_reward("length")
    def length_reward(completion: str, problem: Problem) -> float:
        return len(completion) / 10

    problems = [PROBLEMS["exact"]] * 2
    scores = score_completions(["abcde", "a"], problems, {"length": 2.0, "format": 1.0})
    assert scores.total.tolist() == pytest.approx([1.0, 0.2])
    with pytest.raises(R1KitError, match=r"'languag'.*known rewards.*accuracy.*format.*length"):
        score_completions(["a"], problems[:1], {"languag": 1.0})
    with pytest.raises(R1KitError, match="pair up"):
        score_completions(["a", "b"], problems[:1], {"format": 1.0})
    with pytest.raises(R1KitError, match="no reward functions"):
        score_completions(["a"], problems[:1], {})

    @register_reward("broken")
    def broken(completion: str, problem: Problem) -> float:
        return float("nan")

    with pytest.raises(R1KitError, match="'broken'.*NaN"):
        score_completions(["a"], problems[:1], {"broken": 1.0})


def test_unknown_answer_style_is_named():
    with pytest.raises(R1KitError, match="'fuzzy'.*known styles"):
        accuracy_reward(well("a", "1"), Problem("x", "q", "1", "fuzzy"))
