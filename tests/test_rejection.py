"""Rejection sampling: each filter on crafted completions; cold-start, general and preference data."""
from __future__ import annotations

import random

import pytest
import torch

from r1kit.config import SampleConfig
from r1kit.rewards import grade
from r1kit.rewards.functions import accuracy_reward
from r1kit.rewards.language import language_consistency
from r1kit.recipes.sampling import (
    Candidate, GeneralTask, cold_start_records, countdown_steps, filter_candidates, general_completion, hide_answer,
    policy_preference_records, preference_records, rejection_sample, repetition_ratio, stats_markdown,
)
from r1kit.tasks import make_task
from r1kit.types import Problem, R1KitError, Rollout
from tests.helpers import tiny_pair

P = Problem("p1", "12+34", "46", "numeric")
Q = Problem("p2", "20+5", "25", "numeric")
GOOD = " <think> 12+34: 2+4+0=6, so 6. 1+3: 1+3+0=4, so 46. </think> <answer> 46 </answer>"
CFG = SampleConfig(min_tokens=5, max_tokens=60, max_repetition=0.3, max_per_prompt=2)


def cand(text, problem=P, n_tokens=20, truncated=False):
    return Candidate(problem, text, n_tokens, truncated)


@pytest.mark.parametrize("candidate, reason", [
    (cand(GOOD, truncated=True), "truncated"),
    (cand(GOOD, n_tokens=3), "too short"),
    (cand(GOOD, n_tokens=61), "too long"),
    (cand(GOOD.replace("</think>", "")), "malformed"),
    (cand(" <think> so 6. </think> <answer> 47 </answer>"), "wrong"),
    (cand(GOOD.replace("so 46", "得 46")), "language"),  # mixed
    (cand(GOOD.replace("so", "得")), "language"),  # wholly off-target
    (cand(" <think> so 46 so 46 so 46 so 46 so 46 so 46 </think> <answer> 46 </answer>"), "repetitive"),
])
def test_each_filter_rejects_its_case(candidate, reason):
    kept, rejected = filter_candidates([candidate], CFG, "en")
    assert kept == [] and rejected == {reason: 1}
    # ... and the same completion without the defect is kept
    kept, rejected = filter_candidates([cand(GOOD)], CFG, "en")
    assert len(kept) == 1 and not rejected


def test_dedup_and_per_prompt_cap():
    other = GOOD.replace("so 6.", "so  6.  ok.")  # differs in words, not only in spaces
    spaced = GOOD.replace(" so ", "   so ")  # same words as GOOD: a duplicate
    kept, rejected = filter_candidates([cand(GOOD), cand(spaced), cand(other), cand(GOOD.replace("so 6.", "so 6 ok 6."))],
                                       CFG, "en")
    assert [c.text for c in kept] == [GOOD, other]
    assert rejected == {"duplicate": 1, "per-prompt cap": 1}
    # The cap is per prompt: another prompt keeps its own.
    kept, _ = filter_candidates([cand(GOOD), cand(" <think> so 25. </think> <answer> 25 </answer>", Q)], CFG, "en")
    assert len(kept) == 2


def test_zh_target_keeps_chinese_and_rejects_english():
    zh = GOOD.replace("so", "得")
    kept, rejected = filter_candidates([cand(zh), cand(GOOD)], CFG, "zh")
    assert [c.text for c in kept] == [zh] and rejected == {"language": 1}


def test_repetition_ratio():
    assert repetition_ratio("a b c d e f g") == 0.0
    assert repetition_ratio("x y " * 20) > 0.8
    assert repetition_ratio("too short") == 0.0


class ScriptedEngine:
    """Stands in for the Engine: returns the given completion texts for each prompt, in order."""

    def __init__(self, tok, texts_by_question, truncate=()):
        self.tok, self.texts, self.truncate = tok, texts_by_question, set(truncate)

    def generate(self, prompts, *, group_size, max_new_tokens, temperature, top_p, generator):
        rows, questions = [], [self.tok.decode(p).split("User: ")[1].split("\n")[0] for p in prompts]
        for q in questions:
            rows += [self.tok(t).input_ids + ([] if t in self.truncate else [self.tok.eos_token_id]) for t in self.texts[q]]
        width = max(map(len, rows))
        ids = torch.full((len(rows), width), self.tok.pad_token_id)
        mask = torch.zeros(len(rows), width)
        for i, r in enumerate(rows):
            ids[i, : len(r)], mask[i, : len(r)] = torch.tensor(r), 1
        n = len(rows)
        return Rollout(torch.zeros(n, 1, dtype=torch.long), torch.ones(n, 1, dtype=torch.long), ids, mask,
                       torch.zeros(n, width), torch.tensor([t in self.truncate for q in questions for t in self.texts[q]]),
                       group_size)


def test_rejection_sample_end_to_end_mixes_general_data():
    _, tok = tiny_pair()
    wrong = " <think> so 6. </think> <answer> 47 </answer>"
    texts = {"12+34": [GOOD, GOOD, wrong, GOOD.replace("so", "得")], "20+5": [wrong, wrong, wrong, " <think> so"]}
    engine = ScriptedEngine(tok, texts, truncate=[" <think> so"])
    general = GeneralTask(num_test=5).test_problems()
    cfg = SampleConfig(samples_per_prompt=4, min_tokens=1, max_tokens=200, general_frac=0.5)
    records, stats = rejection_sample(engine, tok, [P, Q], cfg, lang="en", template="r1_zero", seed=0, general=general)
    assert stats["kept"] == 1 and stats["rejected"]["wrong"] == 4 and stats["rejected"]["duplicate"] == 1
    assert stats["rejected"]["language"] == 1 and stats["rejected"]["truncated"] == 1
    assert stats["general_added"] == 1 and len(records) == 2
    kinds = {r["kind"]: r for r in records}
    assert kinds["reasoning"]["completion"] == GOOD and kinds["reasoning"]["prompt"].endswith("User: 12+34\nAssistant:")
    assert kinds["general"]["completion"].startswith(" <think></think> <answer>")
    md = stats_markdown(stats)
    assert "| rejected: wrong | 4 |" in md and "| kept | 1 |" in md


def test_cold_start_data_is_correct_readable_and_in_the_target_language():
    task = make_task("arithmetic", min_digits=3, max_digits=3, num_test=10)
    recs = cold_start_records(task, 30, random.Random(0), lang="en", template="r1_zero")
    probs = {p.id: p for p in task.train_problems(30, random.Random(0))}
    for r in recs:
        p = probs[r["problem_id"]]
        assert accuracy_reward(r["completion"], p) == 1.0
        assert language_consistency(r["completion"], "en") == 1.0
        assert "summary:" in r["completion"].split("</think>")[0]
    zh = cold_start_records(task, 5, random.Random(0), lang="zh", template="r1_zero")
    assert all(language_consistency(r["completion"], "zh") == 1.0 for r in zh)
    cd = make_task("countdown", num_test=5)
    cds = cold_start_records(cd, 20, random.Random(0), lang="en", template="r1_zero")
    cprobs = {p.id: p for p in cd.train_problems(20, random.Random(0))}
    assert all(accuracy_reward(r["completion"], cprobs[r["problem_id"]]) == 1.0 for r in cds)
    with pytest.raises(R1KitError, match="no cold-start writer"):
        cold_start_records(GeneralTask(num_test=1), 3, random.Random(0), lang="en", template="r1_zero")


def test_countdown_steps_follow_evaluation_order():
    assert countdown_steps("(37*2)-19") == ["37*2=74", "74-19=55"]
    assert countdown_steps("96/(8-2)") == ["8-2=6", "96/6=16"]


def test_general_data_and_preferences():
    task = GeneralTask(num_test=10)
    train = task.train_problems(30, random.Random(0))
    assert not {p.question for p in train} & {p.question for p in task.test_problems()}
    assert all(grade(general_completion(p), p).correct for p in train)
    prefs = preference_records(train, "r1_zero", random.Random(0))
    assert [r["kind"] for r in prefs[:4]] == ["wrong_value", "malformed", "repeated", "wrong_value"]
    for p, r in zip(train, prefs):
        assert r["chosen"] != r["rejected"] and r["prompt"].endswith(f"User: {p.question}\nAssistant:")
        assert accuracy_reward(r["chosen"], p) == 1.0 and accuracy_reward(r["rejected"], p) == 0.0
    # kind_weights: the kinds cycle in those proportions; the default is the same stream as no weights.
    same = preference_records(train, "r1_zero", random.Random(0), {"wrong_value": 1, "malformed": 1, "repeated": 1})
    assert same == prefs
    mostly = preference_records(train, "r1_zero", random.Random(0), {"wrong_value": 4, "repeated": 1})
    assert [r["kind"] for r in mostly[:10]] == (["wrong_value"] * 4 + ["repeated"]) * 2
    for p, r in zip(train, mostly):
        assert accuracy_reward(r["rejected"], p) == 0.0
        if r["kind"] == "wrong_value":  # one digit changed, same length
            got = r["rejected"].split("<answer> ")[1].split(" </answer>")[0]
            assert len(got) == len(p.answer) and sum(x != y for x, y in zip(got, p.answer)) == 1
    for bad in ({"wrong_value": 0}, {"typo": 1}, {"malformed": -1}, {"malformed": 1.5}):
        with pytest.raises(R1KitError, match="rm.kind_weights"):
            preference_records(train, "r1_zero", random.Random(0), bad)
    hidden = hide_answer(train[0])
    assert accuracy_reward(general_completion(train[0]), hidden) == 0.0 and hidden.meta["reference"] == train[0].answer


def test_policy_pairs_reject_each_distinct_wrong_answer_against_the_right_one():
    p, q = GeneralTask(num_test=5).train_problems(2, random.Random(1))
    wrong = f" <think></think> <answer> {int(p.answer) + 1} </answer>"
    cands = [Candidate(p, general_completion(p), 8, False), Candidate(p, wrong, 8, False),
             Candidate(p, wrong.replace(" <answer>", "  <answer>"), 8, False),  # the same words: one pair
             Candidate(q, wrong, 8, False),  # the same text on another prompt: its own pair
             Candidate(q, " <answer> " + q.answer, 3, True)]  # malformed and truncated: wrong
    recs, stats = policy_preference_records(cands, "r1_zero")
    assert stats == {"samples": 5, "right": 1, "pairs": 3}
    assert [(r["rejected"], r["kind"]) for r in recs] == [(wrong, "policy_wrong"), (wrong, "policy_wrong"),
                                                          (" <answer> " + q.answer, "policy_wrong")]
    for r, prob in zip(recs, (p, q, q)):
        assert r["chosen"] == general_completion(prob) and r["prompt"].endswith(f"User: {prob.question}\nAssistant:")
        assert accuracy_reward(r["chosen"], prob) == 1.0 and accuracy_reward(r["rejected"], prob) == 0.0
