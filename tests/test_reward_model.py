"""Reward model: Bradley-Terry training lowers the loss; a saved checkpoint works as a reward function."""
from __future__ import annotations

import json
import math
import random

import pytest
import torch

from r1kit.config import ModelConfig, RewardModelConfig
from r1kit.model import save_model
from r1kit.policy import Policy
from r1kit.rewards import REWARD_FUNCS, score_completions
from r1kit.rewards.reward_model import RewardModelScorer, register_reward_model
from r1kit.trainers.reward_model import (
    PreferencePair, bradley_terry_loss, build_reward_model, evaluate_pairs, read_preference_pairs, train_reward_model,
)
from r1kit.types import Problem, R1KitError
from tests.helpers import tiny_pair

TINY = ModelConfig(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=2, intermediate_size=64)


@pytest.fixture(scope="module")
def tok():
    return tiny_pair()[1]


def _pairs(n: int, seed: int = 0) -> list[PreferencePair]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        x = rng.randint(10, 99)
        out.append(PreferencePair(f"User: repeat {x}\nAssistant:", f" <think> </think> <answer> {x} </answer>",
                                  f" {x} {x} {x}" if rng.random() < 0.5 else f" <answer> {x}"))
    return out


def test_bradley_terry_matches_reference():
    rc, rr = torch.tensor([0.3, -1.0, 2.0]), torch.tensor([0.1, 0.5, -2.0])
    ref = sum(-math.log(1 / (1 + math.exp(-(a - b)))) for a, b in zip(rc.tolist(), rr.tolist())) / 3
    assert bradley_terry_loss(rc, rr).item() == pytest.approx(ref, rel=1e-6)


def test_training_lowers_loss_and_checkpoint_scores_as_reward(tmp_path, tok):
    torch.manual_seed(0)
    model = build_reward_model(None, tok, TINY)
    pairs = _pairs(48)
    before = evaluate_pairs(model, tok, pairs)
    summary = train_reward_model(Policy(model, tok, task_type="SEQ_CLS"), pairs, RewardModelConfig(epochs=4, batch_size=8, lr=3e-3, warmup_steps=2,
                                                                       val_frac=0.25), tmp_path, seed=0)
    after = evaluate_pairs(model, tok, pairs)
    assert after["loss"] < before["loss"] - 0.1
    assert after["accuracy"] >= 0.9 and summary["val_after"]["accuracy"] >= 0.9

    # The saved folder is a reward function that agrees with the in-memory model.
    scorer = RewardModelScorer(tmp_path / "model", normalize="none", template="{question}")
    p = pairs[0]
    direct = evaluate_pairs(model, tok, [p])["margin"]
    got = scorer.score([p.prompt, p.prompt], [p.chosen, p.rejected])
    assert got[0] - got[1] == pytest.approx(direct, abs=1e-4)

    # Registered with a scenario filter: general problems get the model's score, the others 0.
    register_reward_model(tmp_path / "model", name="rm_test", scenarios=("general",), template="{question}")
    probs = [Problem("g", p.prompt, "", meta={"scenario": "general"}), Problem("r", p.prompt, "")]
    scores = score_completions([p.chosen, p.chosen], probs, {"rm_test": 1.0}).per_fn["rm_test"]
    assert 0 < scores[0].item() < 1 and scores[1].item() == 0.0
    assert REWARD_FUNCS["rm_test"](p.chosen, probs[0]) == pytest.approx(scores[0].item(), abs=1e-6)


def test_validation_accuracy_per_kind(tmp_path, tok):
    """Labelled pairs get an accuracy per kind; the kinds' accuracies weighted by their counts give the total."""
    torch.manual_seed(0)
    model = build_reward_model(None, tok, TINY)
    pairs = [PreferencePair(p.prompt, p.chosen, p.rejected, "malformed" if p.rejected.startswith(" <answer>") else "repeated")
             for p in _pairs(40)]
    res = evaluate_pairs(model, tok, pairs, batch_size=7)
    by = res["by_kind"]
    assert set(by) == {"repeated", "malformed"} and sum(v["pairs"] for v in by.values()) == 40
    scored = [(evaluate_pairs(model, tok, [p])["accuracy"], p.kind) for p in pairs]  # one pair at a time
    for kind, v in by.items():
        wins = [a for a, k in scored if k == kind]
        assert v["accuracy"] == pytest.approx(sum(wins) / len(wins))
    assert res["accuracy"] == pytest.approx(sum(v["accuracy"] * v["pairs"] for v in by.values()) / 40)
    assert "by_kind" not in evaluate_pairs(model, tok, _pairs(5))  # unlabelled pairs: no split

    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"prompt": "a", "chosen": "b", "rejected": "c", "kind": "malformed"}) + "\n")
    assert read_preference_pairs(f)[0].kind == "malformed"
    f.write_text(json.dumps({"prompt": "a", "chosen": "b", "rejected": "c", "kind": 3}) + "\n")
    with pytest.raises(R1KitError, match="'kind' must be a string"):
        read_preference_pairs(f)


def test_init_from_causal_lm_keeps_backbone(tmp_path):
    lm, tok = tiny_pair()
    save_model(lm, tok, tmp_path / "lm")
    rm = build_reward_model(tmp_path / "lm", tok)
    assert torch.equal(rm.get_input_embeddings().weight, lm.get_input_embeddings().weight)
    assert rm.config.num_labels == 1 and rm.config.pad_token_id == tok.pad_token_id
    with pytest.raises(R1KitError, match="not a sequence classifier"):
        RewardModelScorer(tmp_path / "lm")


def test_bad_preference_file(tmp_path):
    f = tmp_path / "p.jsonl"
    with pytest.raises(R1KitError, match="not found"):
        read_preference_pairs(f)
    f.write_text(json.dumps({"prompt": "a", "chosen": "b", "rejected": "c"}) + "\n" + json.dumps({"prompt": "a"}) + "\n")
    with pytest.raises(R1KitError, match="line 2.*'chosen'"):
        read_preference_pairs(f)
    f.write_text(json.dumps({"prompt": "a", "chosen": "b", "rejected": "b"}) + "\n")
    with pytest.raises(R1KitError, match="same text"):
        read_preference_pairs(f)
