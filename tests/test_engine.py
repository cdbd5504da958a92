"""Tests for r1kit.engine: parity with a full HF forward, greedy parity with HF generate, EOS and
masks, determinism, top-p, prefill sharing, compaction and input errors. Tiny models, all fast."""
from __future__ import annotations

import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from r1kit.engine import Engine, fast_path_problem, sample_tokens
from r1kit.types import R1KitError

VOCAB, PAD = 100, 0
EOS = [2, 3, 4, 5, 6]  # several ids so that rows end at varied lengths on a random model
PROMPTS = [[10, 11, 12, 13, 14, 15, 16], [20, 21], [30, 31, 32, 33, 34]]  # different lengths: left padding
SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=VOCAB)


def _llama(**kw) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = dict(SMALL, num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.1)
    return LlamaForCausalLM(LlamaConfig(**{**cfg, **kw})).eval()


def _qwen2(**kw) -> Qwen2ForCausalLM:  # q/k/v biases, tied embeddings, MHA
    torch.manual_seed(1)
    cfg = dict(SMALL, num_key_value_heads=4, max_position_embeddings=64, initializer_range=0.1,
               tie_word_embeddings=True)
    model = Qwen2ForCausalLM(Qwen2Config(**{**cfg, **kw})).eval()
    with torch.no_grad():  # HF initialises biases to 0: make them matter
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.1)
    return model


def _mistral(**kw) -> MistralForCausalLM:
    torch.manual_seed(2)
    cfg = dict(SMALL, num_key_value_heads=1, max_position_embeddings=64, initializer_range=0.1, sliding_window=None)
    return MistralForCausalLM(MistralConfig(**{**cfg, **kw})).eval()


def _gpt2() -> GPT2LMHeadModel:  # a non-Llama architecture: always the HF-forward backend
    torch.manual_seed(3)
    cfg = GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64)
    return GPT2LMHeadModel(cfg).eval()


def _reference_logprobs(model, prompts, rollout, temperature: float) -> list[torch.Tensor]:
    """The slow, obvious way: a full no-cache forward of each unpadded prompt + completion, one at a time."""
    out = []
    with torch.no_grad():
        for row in range(rollout.num_rows):
            prompt = prompts[row // rollout.group_size]
            n = int(rollout.lengths[row])
            completion = rollout.completion_ids[row, :n]
            ids = torch.tensor(prompt + completion.tolist())[None]
            logits = model(ids).logits[0, len(prompt) - 1 : -1].double()  # predicts each completion token
            logits = logits / temperature if temperature > 0 else logits
            out.append(torch.log_softmax(logits, -1).gather(1, completion[:, None]).squeeze(1))
    return out


def _check_layout(rollout, max_new: int, eos=EOS) -> None:
    """Masks, padding, truncation and EOS placement are consistent row by row."""
    N, Tc = rollout.completion_ids.shape
    assert rollout.completion_mask.dtype == torch.float32 and rollout.logprobs.dtype == torch.float32
    assert Tc == int(rollout.lengths.max())
    for row in range(N):
        n = int(rollout.lengths[row])
        ids = rollout.completion_ids[row]
        assert rollout.completion_mask[row, :n].eq(1).all() and rollout.completion_mask[row, n:].eq(0).all()
        assert ids[n:].eq(PAD).all() and rollout.logprobs[row, n:].eq(0).all()
        assert (rollout.logprobs[row, :n] <= 0).all()
        eos_at = [i for i in range(n) if int(ids[i]) in eos]
        if rollout.truncated[row]:
            assert n == max_new and eos_at == []
        else:
            assert eos_at == [n - 1]  # stops at its first EOS, which is kept


ARCHS = {"llama": _llama, "qwen2": _qwen2, "mistral": _mistral}


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
@pytest.mark.parametrize("fast_path", [None, False])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_match_full_forward(arch, fast_path, temperature):
    model = ARCHS[arch]()
    engine = Engine(model, eos_token_ids=EOS, pad_token_id=PAD, fast_path=fast_path)
    assert engine.fallback_reason is None or fast_path is False
    gen = torch.Generator().manual_seed(0)
    r = engine.generate(PROMPTS, group_size=3, max_new_tokens=12, temperature=temperature, generator=gen)
    assert engine.last_backend == ("fast" if fast_path is None else "hf")
    assert r.num_rows == 9 and r.group_size == 3
    _check_layout(r, 12)
    assert not r.truncated.all() and r.truncated.any(), "the test should cover both EOS and truncation"
    for row, ref in enumerate(_reference_logprobs(model, PROMPTS, r, temperature)):
        got = r.logprobs[row, : len(ref)].double()
        assert (got - ref).abs().max() <= 1e-5, f"row {row}: {got} vs {ref}"


def test_other_architecture_uses_hf_forward_and_matches():
    model = _gpt2()
    engine = Engine(model, eos_token_ids=EOS, pad_token_id=PAD)
    assert "gpt2" in engine.fallback_reason
    r = engine.generate(PROMPTS, group_size=2, max_new_tokens=8, generator=torch.Generator().manual_seed(0))
    assert engine.last_backend == "hf"
    _check_layout(r, 8)
    for row, ref in enumerate(_reference_logprobs(model, PROMPTS, r, 1.0)):
        assert (r.logprobs[row, : len(ref)].double() - ref).abs().max() <= 1e-5


def test_prompt_layout_is_left_padded_and_prompt_major():
    r = Engine(_llama(), eos_token_ids=EOS, pad_token_id=PAD).generate(PROMPTS, group_size=2, max_new_tokens=4)
    assert r.prompt_ids.shape == (6, 7) and r.prompt_mask.dtype == torch.long
    for row in range(6):
        p = PROMPTS[row // 2]
        assert r.prompt_ids[row, 7 - len(p) :].tolist() == p
        assert r.prompt_mask[row].tolist() == [0] * (7 - len(p)) + [1] * len(p)
        assert r.prompt_ids[row, : 7 - len(p)].eq(PAD).all()


@pytest.mark.parametrize("fast_path", [None, False])
def test_greedy_equals_hf_generate(fast_path):
    model = _llama(initializer_range=0.3)  # peaked logits: no near-ties for float noise to flip
    engine = Engine(model, eos_token_ids=[7], pad_token_id=PAD, fast_path=fast_path)
    r = engine.generate(PROMPTS, max_new_tokens=10, temperature=0.0)
    Tp = max(map(len, PROMPTS))
    ids = torch.tensor([[PAD] * (Tp - len(p)) + p for p in PROMPTS])
    mask = (ids != PAD).long()
    hf = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=10,
                        eos_token_id=7, pad_token_id=PAD)[:, Tp:]
    for row in range(len(PROMPTS)):
        n = int(r.lengths[row])
        assert r.completion_ids[row, :n].tolist() == hf[row, :n].tolist()
        assert hf[row, n:].eq(PAD).all()  # HF stopped at the same place
    # greedy logprobs are the raw (temperature 1) log-probabilities
    for row, ref in enumerate(_reference_logprobs(model, PROMPTS, r, 0.0)):
        assert (r.logprobs[row, : len(ref)].double() - ref).abs().max() <= 1e-5


def test_eos_stops_rows_and_every_token_eos_gives_length_one():
    model = _llama()
    every = Engine(model, eos_token_ids=list(range(VOCAB)), pad_token_id=PAD)
    r = every.generate(PROMPTS, group_size=2, max_new_tokens=5)
    assert r.completion_ids.shape == (6, 1) and r.lengths.eq(1).all() and not r.truncated.any()
    r = Engine(model, eos_token_ids=[], pad_token_id=PAD).generate(PROMPTS, group_size=2, max_new_tokens=5)
    assert r.completion_ids.shape == (6, 5) and r.truncated.all() and r.completion_mask.eq(1).all()


def test_deterministic_under_a_seed_and_seeds_differ():
    engine = Engine(_llama(), eos_token_ids=EOS, pad_token_id=PAD)

    def run(seed: int):
        return engine.generate(PROMPTS, group_size=4, max_new_tokens=10, temperature=0.9, top_p=0.95,
                               generator=torch.Generator().manual_seed(seed))

    a, b, c = run(7), run(7), run(8)
    assert torch.equal(a.completion_ids, b.completion_ids) and torch.equal(a.logprobs, b.logprobs)
    assert not torch.equal(a.completion_ids, c.completion_ids)
    # the G samples of one prompt are not copies of each other
    assert len({tuple(a.completion_ids[g].tolist()) for g in range(4)}) > 1


def test_tiny_top_p_equals_greedy():
    engine = Engine(_llama(), eos_token_ids=EOS, pad_token_id=PAD)
    greedy = engine.generate(PROMPTS, max_new_tokens=8, temperature=0.0)
    nucleus = engine.generate(PROMPTS, max_new_tokens=8, temperature=1.0, top_p=1e-6,
                              generator=torch.Generator().manual_seed(3))
    assert torch.equal(greedy.completion_ids, nucleus.completion_ids)
    assert torch.allclose(greedy.logprobs, nucleus.logprobs, atol=1e-6)  # T=1: the same distribution


def test_sample_tokens_top_p_draws_only_from_the_nucleus_in_proportion():
    torch.manual_seed(0)
    logits = torch.randn(3, 12) * 2
    top_p, n = 0.7, 20000
    gen = torch.Generator().manual_seed(0)
    tokens, logprobs = sample_tokens(logits.repeat_interleave(n, 0), 1.0, top_p, gen)
    for row in range(3):
        probs = torch.softmax(logits[row].double(), -1)
        order = probs.argsort(descending=True)
        before = torch.cumsum(probs[order], 0) - probs[order]
        nucleus = order[before < top_p]  # the slow, obvious definition
        drawn = tokens[row * n : (row + 1) * n]
        assert set(drawn.tolist()) <= set(nucleus.tolist())
        expected = probs[nucleus] / probs[nucleus].sum()
        freq = torch.bincount(drawn, minlength=12)[nucleus].double() / n
        assert (freq - expected).abs().max() < 0.02
        # logprobs are of the full distribution, not the renormalised nucleus
        assert torch.allclose(logprobs[row * n : (row + 1) * n].double(), probs.log()[drawn], atol=1e-6)


def test_sample_tokens_temperature_distribution():
    logits = torch.tensor([[1.0, 0.0, -1.0, 0.5]]).repeat(40000, 1)
    tokens, logprobs = sample_tokens(logits, 0.5, 1.0, torch.Generator().manual_seed(1))
    expected = torch.softmax(logits[0] / 0.5, -1)
    assert (torch.bincount(tokens, minlength=4) / 40000 - expected).abs().max() < 0.01
    assert torch.allclose(logprobs, expected.log()[tokens])


@pytest.mark.parametrize("fast_path", [None, False])
def test_group_shares_one_prefill(fast_path):
    model = _llama()
    rows_seen = []
    hook = model.register_forward_pre_hook(
        lambda module, args, kwargs: rows_seen.append(kwargs["input_ids"].shape), with_kwargs=True
    )
    try:
        engine = Engine(model, eos_token_ids=EOS, pad_token_id=PAD, fast_path=fast_path)
        r = engine.generate(PROMPTS, group_size=8, max_new_tokens=3)
    finally:
        hook.remove()
    assert r.num_rows == 24
    assert engine.stats.prefill_calls == 1 and engine.stats.prefill_tokens == 3 * 7  # P * Tp, not P * G * Tp
    if fast_path is None:
        assert rows_seen == []  # the fast path never calls the HF forward
    else:
        assert rows_seen[0] == (3, 7) and all(s[1] == 1 for s in rows_seen[1:])  # one prefill of P rows


@pytest.mark.parametrize("fast_path", [None, False])
def test_finished_rows_stop_costing_compute(fast_path):
    engine = Engine(_llama(), eos_token_ids=EOS, pad_token_id=PAD, fast_path=fast_path, compact_fraction=0.0)
    r = engine.generate(PROMPTS, group_size=4, max_new_tokens=16, generator=torch.Generator().manual_seed(0))
    # with compaction at every finish, a row costs exactly (its length - 1) decode forwards
    assert engine.stats.decode_tokens == int(r.lengths.sum()) - r.num_rows
    assert engine.stats.compactions > 0 and engine.stats.generated_tokens == int(r.lengths.sum())


def test_compaction_does_not_change_samples():
    model = _llama()
    outs = []
    for fraction in (0.0, 0.5, 1.0):
        engine = Engine(model, eos_token_ids=EOS, pad_token_id=PAD, compact_fraction=fraction)
        outs.append(engine.generate(PROMPTS, group_size=4, max_new_tokens=12, temperature=0.0))
    for other in outs[1:]:
        assert torch.equal(outs[0].completion_ids, other.completion_ids)
        assert torch.allclose(outs[0].logprobs, other.logprobs, atol=1e-6)


def test_unsupported_configs_fall_back():
    scaled = _llama(rope_scaling={"rope_type": "linear", "factor": 2.0})
    assert "rope" in fast_path_problem(scaled)
    engine = Engine(scaled, eos_token_ids=EOS, pad_token_id=PAD)
    r = engine.generate(PROMPTS, max_new_tokens=6)
    assert engine.last_backend == "hf"
    for row, ref in enumerate(_reference_logprobs(scaled, PROMPTS, r, 1.0)):
        assert (r.logprobs[row, : len(ref)].double() - ref).abs().max() <= 1e-5
    with pytest.raises(R1KitError, match="fast_path=True"):
        Engine(scaled, eos_token_ids=EOS, pad_token_id=PAD, fast_path=True)
    # a sliding window only matters once the sequence outgrows it: fast below, HF forward above
    windowed = _mistral(sliding_window=12)
    engine = Engine(windowed, eos_token_ids=[], pad_token_id=PAD)
    r = engine.generate(PROMPTS, max_new_tokens=5)
    assert engine.last_backend == "fast"
    for row, ref in enumerate(_reference_logprobs(windowed, PROMPTS, r, 1.0)):
        assert (r.logprobs[row, : len(ref)].double() - ref).abs().max() <= 1e-5
    r = engine.generate(PROMPTS, max_new_tokens=10)
    assert engine.last_backend == "hf"
    assert r.completion_ids.shape == (3, 10)


def test_train_mode_is_restored_and_dropout_is_off():
    model = _llama(attention_dropout=0.5)
    model.train()
    engine = Engine(model, eos_token_ids=EOS, pad_token_id=PAD, fast_path=False)
    r = engine.generate(PROMPTS, max_new_tokens=6, generator=torch.Generator().manual_seed(0))
    assert model.training
    model.eval()
    for row, ref in enumerate(_reference_logprobs(model, PROMPTS, r, 1.0)):
        assert (r.logprobs[row, : len(ref)].double() - ref).abs().max() <= 1e-5


def test_outputs_can_enter_autograd():
    model = _llama()
    r = Engine(model, eos_token_ids=EOS, pad_token_id=PAD).generate(PROMPTS, max_new_tokens=4)
    ids = torch.cat([r.prompt_ids, r.completion_ids], 1)
    model(ids).logits.sum().backward()  # inference-mode tensors would refuse this


@pytest.mark.parametrize(
    "prompts, kwargs, match",
    [
        ([], {}, "empty"),
        ([[1, 2], []], {}, "prompt 1 is empty"),
        ([[1, 2, 300]], {}, "prompt 0 has token ids outside"),
        ([[1] * 60], {"max_new_tokens": 5}, r"60.*5.*65.*64"),
        ([[1]], {"temperature": -1.0}, "temperature"),
        ([[1]], {"top_p": 0.0}, "top_p"),
        ([[1]], {"group_size": 0}, "group_size"),
        ([[1]], {"max_new_tokens": 0}, "max_new_tokens"),
    ],
)
def test_bad_inputs_raise_clear_errors(prompts, kwargs, match):
    engine = Engine(_llama(), eos_token_ids=EOS, pad_token_id=PAD)
    kwargs = {"max_new_tokens": 4, **kwargs}
    with pytest.raises(R1KitError, match=match):
        engine.generate(prompts, **kwargs)


def test_bad_special_tokens_raise():
    with pytest.raises(R1KitError, match="eos_token_ids"):
        Engine(_llama(), eos_token_ids=[VOCAB], pad_token_id=PAD)
    with pytest.raises(R1KitError, match="pad_token_id"):
        Engine(_llama(), eos_token_ids=EOS, pad_token_id=-1)


# ---- engine.dtype: bf16 sampling with copies of float32 master weights ------------------------------------

def _gaps(model, prompts, rollout, temperature: float = 1.0) -> torch.Tensor:
    """|engine logprob - full float32 forward logprob| of every sampled token."""
    refs = _reference_logprobs(model, prompts, rollout, temperature)
    return torch.cat([(rollout.logprobs[row, : len(ref)].double() - ref).abs() for row, ref in enumerate(refs)])


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_bf16_engine_samples_close_to_the_float32_forward(arch):
    """Measured here: mean gap 0.007 nats, max 0.03 (bf16 rounds to ~3 digits); the master weights stay float32.
    A float64 engine over the same float32 weights reads every parameter through its copy: it matches to 1e-5."""
    model = ARCHS[arch]()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    engine = Engine(model, eos_token_ids=EOS, pad_token_id=PAD, dtype="bf16")
    r = engine.generate(PROMPTS, group_size=3, max_new_tokens=12, generator=torch.Generator().manual_seed(0))
    assert engine.last_backend == "fast" and engine.dtype == torch.bfloat16
    copies = engine._fast._copies  # one bf16 copy of every parameter (tied ones share it)
    assert {id(p) for p in model.parameters()} == set(copies) and all(c[3].dtype == torch.bfloat16 for c in copies.values())
    assert r.logprobs.dtype == torch.float32
    _check_layout(r, 12)
    gaps = _gaps(model, PROMPTS, r)
    assert 0 < gaps.mean() < 0.02 and gaps.max() < 0.1
    assert all(p.dtype == torch.float32 and torch.equal(p, before[n]) for n, p in model.named_parameters())
    wide = Engine(model, eos_token_ids=EOS, pad_token_id=PAD, dtype=torch.float64)
    r = wide.generate(PROMPTS, group_size=3, max_new_tokens=12, generator=torch.Generator().manual_seed(0))
    assert wide._fast.embed.dtype == torch.float64 and _gaps(model, PROMPTS, r).max() <= 1e-5


def test_bf16_engine_prefix_cache_and_requests():
    """The request path (prefix-cache hits prefill on top of stored K/V) samples in bf16 too."""
    from r1kit.engine import SamplingParams

    model = _llama()
    engine = Engine(model, eos_token_ids=EOS, pad_token_id=PAD, dtype="bf16", block_size=4)
    prompt = list(range(10, 30))
    for _ in range(2):
        rid = engine.add_request(prompt, SamplingParams(n=2, max_tokens=8, seed=3))
        tokens = {0: [], 1: []}
        logprobs = {0: [], 1: []}
        while engine.has_unfinished():
            for out in engine.step():
                assert out.request_id == rid
                tokens[out.index] += out.token_ids
                logprobs[out.index] += out.logprobs
    assert engine.cache_stats().hit_tokens >= 16  # the second request read the first one's blocks
    for k in (0, 1):
        with torch.no_grad():
            ids = torch.tensor(prompt + tokens[k])[None]
            ref = torch.log_softmax(model(ids).logits[0, len(prompt) - 1 : -1].double(), -1)
        ref = ref.gather(1, torch.tensor(tokens[k])[:, None]).squeeze(1)
        assert (torch.tensor(logprobs[k]).double() - ref).abs().max() < 0.1


def test_bf16_copies_follow_in_place_optimizer_steps():
    """The copies are cast once and reused while the weights are unchanged; an optimizer step (in place) is
    seen by the next generate() with no call: it samples exactly as a fresh bf16 engine over the new weights."""
    model = _llama()
    engine = Engine(model, eos_token_ids=EOS, pad_token_id=PAD, dtype="bf16")
    gen = lambda e: e.generate(PROMPTS, group_size=2, max_new_tokens=8, generator=torch.Generator().manual_seed(1))  # noqa: E731
    first = gen(engine)
    copy = engine._fast._copies[id(model.model.embed_tokens.weight)][3]
    again = gen(engine)
    assert engine._fast._copies[id(model.model.embed_tokens.weight)][3] is copy  # not cast again
    assert torch.equal(first.logprobs, again.logprobs)
    opt = torch.optim.SGD(model.parameters(), lr=5.0)
    model(torch.tensor([PROMPTS[0]])).logits[0, -1, 7].backward()  # push token 7 up, in place
    opt.step()
    after = gen(engine)
    assert engine._fast._copies[id(model.model.embed_tokens.weight)][3] is not copy
    fresh = gen(Engine(model, eos_token_ids=EOS, pad_token_id=PAD, dtype="bf16"))
    assert torch.equal(after.completion_ids, fresh.completion_ids) and torch.equal(after.logprobs, fresh.logprobs)
    assert not torch.equal(after.logprobs, first.logprobs)
    assert _gaps(model, PROMPTS, after).max() < 0.1  # the new weights' distribution


def test_engine_dtype_errors_name_the_option():
    from r1kit.engine import make_engine

    for bad in ("fp16", "half", 16, torch.int8):
        with pytest.raises(R1KitError, match="engine.dtype"):
            Engine(_llama(), eos_token_ids=EOS, pad_token_id=PAD, dtype=bad)
        with pytest.raises(R1KitError, match="engine.dtype"):
            make_engine(_llama(), None, eos_token_ids=EOS, pad_token_id=PAD, dtype=bad)
    # another dtype than the model's needs the fast path (the HF forward computes in the model's dtype)
    with pytest.raises(R1KitError, match="engine.dtype='bf16'.*fast_path=False"):
        Engine(_llama(), eos_token_ids=EOS, pad_token_id=PAD, fast_path=False, dtype="bf16")
    with pytest.raises(R1KitError, match="engine.dtype='bfloat16'.*model_type 'gpt2'"):
        make_engine(_gpt2(), None, eos_token_ids=EOS, pad_token_id=PAD, dtype="bfloat16")
    assert Engine(_gpt2(), eos_token_ids=EOS, pad_token_id=PAD, dtype="fp32").fallback_reason  # its own dtype: fine
    # a sequence past the sliding window would need the HF forward: refused at the request, not sampled in fp32
    engine = Engine(_mistral(sliding_window=12), eos_token_ids=[], pad_token_id=PAD, dtype="bf16")
    assert engine.generate(PROMPTS, max_new_tokens=5).completion_ids.shape == (3, 5)
    with pytest.raises(R1KitError, match="sliding window 12.*engine.dtype"):
        engine.generate(PROMPTS, max_new_tokens=10)
