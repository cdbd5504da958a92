"""SFT trainer: loss on completion tokens only, exact packing, accumulation invariance, resume."""
from __future__ import annotations

import json
import random

import pytest
import torch

from r1kit.config import SFTConfig
from r1kit.policy import Policy
from r1kit.trainers import sft as sft_mod
from r1kit.trainers.sft import (
    collate, completion_loss_sum, encode_record, load_sft_data, pack_examples, sft_step, train_sft,
)
from r1kit.types import R1KitError
from tests.helpers import tiny_pair


@pytest.fixture(scope="module")
def pair():
    return tiny_pair()


def _records(n=12):
    rng = random.Random(0)
    out = []
    for _ in range(n):
        a, b = rng.randint(1, 99), rng.randint(1, 99)
        out.append({"prompt": f"User: {a}+{b}\nAssistant:", "completion": f" <think> ok </think> <answer> {a + b} </answer>"})
    return out


def _grads(model):
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]).clone()


def test_encode_marks_only_completion_and_eos(pair):
    _, tok = pair
    ex = encode_record({"prompt": "User: 1+2\nAssistant:", "completion": " <answer> 3 </answer>"}, tok)
    n_prompt = len(tok("User: 1+2\nAssistant:").input_ids)
    assert ex.trained[:n_prompt] == [False] * n_prompt
    assert all(ex.trained[n_prompt:]) and ex.ids[-1] == tok.eos_token_id
    assert tok.decode(ex.ids[n_prompt:-1]) == " <answer> 3 </answer>"


def test_gradient_ignores_prompt_side_targets(pair):
    model, tok = pair
    rows = pack_examples([encode_record(r, tok) for r in _records(4)], 128, random.Random(0))
    batch = collate(rows, tok.pad_token_id)
    model.zero_grad()
    completion_loss_sum(model, batch).backward()
    g0 = _grads(model)
    # Change every target the loss must ignore (prompt side, padding): the gradient is bit-identical.
    prompt_side = batch.loss_mask == 0
    batch.targets[prompt_side] = (batch.targets[prompt_side] + 7) % len(tok)
    model.zero_grad()
    completion_loss_sum(model, batch).backward()
    assert torch.equal(g0, _grads(model))
    # ... while changing one completion target does change it (the test can see a difference).
    pos = batch.loss_mask.nonzero()[0]
    batch.targets[pos[0], pos[1]] = (batch.targets[pos[0], pos[1]] + 1) % len(tok)
    model.zero_grad()
    completion_loss_sum(model, batch).backward()
    assert not torch.allclose(g0, _grads(model))


def test_packed_rows_compute_what_examples_compute_alone(pair):
    model, tok = pair
    examples = [encode_record(r, tok) for r in _records(5)]
    rows = pack_examples(examples, 200, random.Random(1))
    assert len(rows) < len(examples)  # several examples share a row
    packed = completion_loss_sum(model, collate(rows, tok.pad_token_id))
    alone = sum(completion_loss_sum(model, collate([[e]], tok.pad_token_id)) for e in examples)
    assert torch.allclose(packed, alone, rtol=1e-5)


def test_accumulation_invariance(pair):
    """One step as 4 micro-batches of 1 row equals one micro-batch of 4 rows."""
    model, tok = pair
    examples = [encode_record(r, tok) for r in _records(8)]
    rows = pack_examples(examples, 40, random.Random(0))[:4]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    results = []
    for micro in ([collate(rows, tok.pad_token_id)], [collate([r], tok.pad_token_id) for r in rows]):
        model.load_state_dict(state)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        sft_step(Policy(model, tok), opt, micro, SFTConfig(grad_clip=1e9), 0.1)
        results.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    model.load_state_dict(state)
    assert torch.allclose(results[0], results[1], atol=1e-6)


def test_messages_train_assistant_turns_only(pair):
    _, tok = pair
    rec = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "1+2"},
                        {"role": "assistant", "content": "<answer> 3 </answer>"}, {"role": "user", "content": "2+2"},
                        {"role": "assistant", "content": "<answer> 4 </answer>"}]}
    ex = encode_record(rec, tok)
    trained_text = tok.decode([i for i, t in zip(ex.ids, ex.trained) if t and i != tok.eos_token_id])
    assert trained_text == "<answer> 3 </answer><answer> 4 </answer>"
    assert sum(i == tok.eos_token_id for i, t in zip(ex.ids, ex.trained) if t) == 2
    context = tok.decode([i for i, t in zip(ex.ids, ex.trained) if not t])
    assert "Be brief." in context and "User: 2+2" in context and "<answer>" not in context


def test_bad_data_names_the_problem(tmp_path, pair):
    _, tok = pair
    with pytest.raises(R1KitError, match="not found"):
        load_sft_data(tmp_path / "nope.jsonl", tok)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(_records(1)[0]) + "\n{oops\n")
    with pytest.raises(R1KitError, match="line 2"):
        load_sft_data(bad, tok)
    bad.write_text(json.dumps({"question": "x"}) + "\n")
    with pytest.raises(R1KitError, match=r"bad.jsonl:1.*'messages' or 'prompt'\+'completion'"):
        load_sft_data(bad, tok)
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(R1KitError, match="last message must be the assistant"):
        load_sft_data(bad, tok)


def test_training_lowers_loss_and_resume_matches(tmp_path, pair, monkeypatch):
    _, tok = pair
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _records(24)))
    examples, stats = load_sft_data(data, tok, seq_len=64)
    assert stats["examples"] == 24 and stats["truncated"] == 0
    cfg = SFTConfig(epochs=3, seq_len=64, micro_batch_size=2, grad_accum=2, lr=3e-3, warmup_steps=2, save_every=2)

    def fresh():
        return tiny_pair(seed=3)[0]

    full_model = fresh()
    full = train_sft(Policy(full_model, tok), examples, cfg, tmp_path / "full", seed=5)
    assert full["last_loss"] < full["first_loss"]
    assert (tmp_path / "full" / "model" / "config.json").exists()

    real_step, calls = sft_mod.sft_step, {"n": 0}

    def crashing_step(*a, **k):
        calls["n"] += 1
        if calls["n"] == full["steps"] - 1:
            raise KeyboardInterrupt("simulated kill")
        return real_step(*a, **k)

    monkeypatch.setattr(sft_mod, "sft_step", crashing_step)
    with pytest.raises(KeyboardInterrupt):
        train_sft(Policy(fresh(), tok), examples, cfg, tmp_path / "cut", seed=5)
    monkeypatch.setattr(sft_mod, "sft_step", real_step)
    resumed_model = fresh()
    resumed = train_sft(Policy(resumed_model, tok), examples, cfg, tmp_path / "cut", seed=5)
    assert resumed["resumed_from"] > 0
    for a, b in zip(full_model.state_dict().values(), resumed_model.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6)
    lines = (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == list(range(1, full["steps"] + 1))


def test_cli_sft_verb_on_explicit_data_and_model(tmp_path, pair, capsys):
    """`r1kit sft CONFIG sft.data=F sft.init=M`: the pipeline's SFT stage on inputs given by the user."""
    from r1kit.cli import main
    from r1kit.model import save_model

    model, tok = pair
    save_model(model, tok, tmp_path / "init")
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _records(16)))
    args = ["sft", "r1-tiny", f"sft.data={data}", f"sft.init={tmp_path / 'init'}", f"output_dir={tmp_path}", "name=cli",
            "sft.epochs=1", "sft.micro_batch_size=4", "eval.num_problems=2", "eval.k=1", "eval.max_new_tokens=8",
            "pipeline.general_test=0", "log.progress=false", "threads=0"]
    assert main(args) == 0
    done = json.loads((tmp_path / "cli" / "sft" / "done.json").read_text())
    assert done["inputs"][0]["sha256"] and done["sft"]["examples"] == 16 and "pass1" in done["eval"]
    assert "sft" in capsys.readouterr().out
    assert main(args) == 0  # finished: skipped
    assert "skipped" in capsys.readouterr().out
    assert main(["sft", "r1-tiny", f"output_dir={tmp_path}", "name=empty"]) == 2  # no parent, no data: named error
    assert "stage 'sft': its input stage 'base' is not finished" in capsys.readouterr().err
