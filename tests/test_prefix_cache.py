"""The engine's prefix cache: a hit gives the same tokens and logprobs as no cache, prompts sharing a
prefix (a system prompt, a multi-turn history, the n samples of one prompt) share its K/V blocks, memory
stays within the budget, referenced blocks survive eviction, and a weight change empties the cache."""
from __future__ import annotations

import torch

from r1kit.engine import Engine, SamplingParams
from r1kit.engine.prefix_cache import PrefixCache, chain_keys
from tests.test_engine import EOS, PAD, _llama as _llama64, _mistral as _mistral64, _qwen2 as _qwen2_64
from tests.test_engine_requests import _reference, _run

def _llama(**kw):
    return _llama64(max_position_embeddings=160, **kw)


def _qwen2():
    return _qwen2_64(max_position_embeddings=160)


def _mistral():
    return _mistral64(max_position_embeddings=160)


SYSTEM = [10 + (i * 7) % 80 for i in range(37)]  # 2 full blocks of 16 and 5 tokens
QUESTIONS = [[50 + i, 60 + i, 70 + i, 80 + i] for i in range(4)]


def _engines(model, **kw):
    return (Engine(model, eos_token_ids=EOS, pad_token_id=PAD, cache_mb=0, **kw),
            Engine(model, eos_token_ids=EOS, pad_token_id=PAD, cache_mb=4, **kw))


def test_a_cache_hit_gives_the_same_tokens_and_logprobs_as_no_cache():
    for make in (_llama, _qwen2, _mistral):  # GQA, biases + tied head, one KV head
        model = make()
        plain, cached = _engines(model)
        _run(cached, {0: [("warm", SYSTEM + [90], SamplingParams(max_tokens=2, seed=0))]})
        assert cached.cache_stats().blocks_in_use == 2
        params = [SamplingParams(n=2, temperature=t, top_p=tp, max_tokens=10, seed=i)
                  for i, (t, tp) in enumerate([(1.0, 1.0), (0.0, 1.0), (0.7, 0.9), (1.2, 1.0)])]
        schedule = {0: [(str(i), SYSTEM + q, p) for i, (q, p) in enumerate(zip(QUESTIONS[:2], params))],
                    3: [(str(i + 2), SYSTEM + q, p) for i, (q, p) in enumerate(zip(QUESTIONS[2:], params[2:]))]}
        want, _ = _run(plain, schedule)
        got, outputs = _run(cached, schedule)
        assert {o.cached_prompt_tokens for o in outputs} == {32}  # 2 blocks of the system prompt
        assert all(o.prompt_tokens == len(SYSTEM) + 4 for o in outputs)
        for key, (toks, lps, reason) in want.items():
            assert got[key][0] == toks and got[key][2] == reason, (make.__name__, key)
            assert max(abs(a - b) for a, b in zip(got[key][1], lps)) <= 1e-5
            i = int(key[0])
            ref = _reference(model, SYSTEM + QUESTIONS[i], toks, params[i].temperature)
            assert (torch.tensor(got[key][1], dtype=torch.float64) - ref).abs().max() <= 1e-5
        stats = cached.cache_stats()
        assert stats.hit_tokens == 4 * 32 and stats.extra["referenced_blocks"] == 0


def test_a_multi_turn_follow_up_reuses_the_first_turns_completion():
    model = _llama(initializer_range=0.3)
    plain, cached = _engines(model)
    first = SYSTEM + QUESTIONS[0]
    turn1, _ = _run(cached, {0: [("t1", first, SamplingParams(temperature=0.0, max_tokens=30))]})
    history = first + turn1[("t1", 0)][0] + [11, 12, 13]
    got, outputs = _run(cached, {0: [("t2", history, SamplingParams(temperature=0.0, max_tokens=8))]})
    fed = len(first) + len(turn1[("t1", 0)][0]) - 1  # the last sampled token was never fed: no K/V
    assert outputs[0].cached_prompt_tokens == fed // 16 * 16 > 32
    want, _ = _run(plain, {0: [("t2", history, SamplingParams(temperature=0.0, max_tokens=8))]})
    assert got[("t2", 0)][0] == want[("t2", 0)][0]
    assert max(abs(a - b) for a, b in zip(got[("t2", 0)][1], want[("t2", 0)][1])) <= 1e-5


def test_the_n_samples_share_one_prefill_and_a_repeat_prefills_only_the_tail():
    _, cached = _engines(_llama())
    _run(cached, {0: [("a", SYSTEM, SamplingParams(n=6, max_tokens=4, seed=0))]})
    assert cached.stats.prefill_tokens == len(SYSTEM)  # one prompt row for the 6 samples
    _run(cached, {0: [("b", SYSTEM, SamplingParams(n=3, max_tokens=4, seed=1))]})
    assert cached.stats.prefill_tokens == len(SYSTEM) + len(SYSTEM) - 32


def test_memory_stays_within_the_budget_under_a_long_run_of_distinct_prompts():
    model = _llama()
    engine = Engine(model, eos_token_ids=EOS, pad_token_id=PAD, cache_mb=0.05, max_num_seqs=6)
    budget = engine.cache_stats().extra["budget_bytes"]
    g = torch.Generator().manual_seed(0)
    for i in range(60):
        prompt = torch.randint(10, 100, (int(torch.randint(17, 50, (1,), generator=g)),), generator=g).tolist()
        engine.add_request(prompt, SamplingParams(n=1 + i % 3, max_tokens=int(4 + i % 9), seed=i))
    rows, steps = 0, 0
    while engine.has_unfinished():
        engine.step()
        steps += 1
        stats = engine.cache_stats()
        resident = sum(b.kv.numel() * b.kv.element_size() for b in engine.prefix_cache._blocks.values())
        assert stats.bytes_in_use == resident <= budget
        if engine._backend is not None:  # the running batch is bounded by max_num_seqs too
            rows = max(rows, engine._fast.gkv.shape[2])
    stats = engine.cache_stats()
    assert stats.evicted_blocks > 0 and stats.blocks_in_use * stats.extra["block_bytes"] <= budget
    assert rows <= 12 and stats.extra["referenced_blocks"] == 0


def _kv(n: int, value: float = 0.0) -> torch.Tensor:
    return torch.full((1, 2, 1, n, 2), value)  # [L, 2, Hkv, n, D]


def test_lru_eviction_spares_referenced_blocks_and_takes_leaves_first():
    cache = PrefixCache(_llama(), block_size=2, budget_bytes=4 * 64, bytes_per_token=32)  # 4 blocks of 64 bytes
    a, b, c = [1, 2, 3, 4, 5, 6], [7, 8], [11, 12, 13, 14]
    assert len(cache.insert(a, _kv(6, 1.0))) == 3 and len(cache.insert(b, _kv(2, 2.0))) == 1  # full
    held = cache.lookup(a, 2)  # a's first 2 blocks are referenced
    assert [blk.tokens for blk in held] == [(1, 2), (3, 4)] and cache.hit_tokens == 4
    assert torch.equal(torch.cat([blk.kv for blk in held], 3), _kv(4, 1.0))
    assert len(cache.insert(c, _kv(4, 3.0))) == 2  # evicts a's leaf (5, 6) first (older than b), then b
    assert cache.evicted_blocks == 2 and cache.lookup(b, 1) == []
    again = cache.lookup(a, 3)
    assert len(again) == 2  # the referenced prefix survived; its leaf did not
    cache.release(held)
    assert cache.stats().extra["referenced_blocks"] == 2  # `again` still holds them
    held_d = cache.insert([21, 22, 23, 24, 25, 26], _kv(6), hold=True)  # only c's 2 blocks are evictable
    assert [blk.tokens for blk in held_d] == [(21, 22), (23, 24)]
    assert cache.lookup(c, 2) == [] and cache.stats().bytes_in_use == cache.budget_bytes
    assert cache.insert([31, 32], _kv(2)) == []  # everything is referenced: not stored, no overflow
    cache.release(again)
    cache.release(held_d)
    assert cache.stats().extra["referenced_blocks"] == 0


def test_a_hash_collision_is_a_miss_not_wrong_kv():
    cache = PrefixCache(_llama(), block_size=2, budget_bytes=10**6, bytes_per_token=32)
    cache.insert([1, 2, 3, 4], _kv(4))
    (key, _, _), _ = chain_keys([1, 2, 3, 4], 2, 2)
    cache._blocks[key].tokens = (9, 9)  # as if another prefix had hashed to the same key
    assert cache.lookup([1, 2, 3, 4], 2) == []
    assert cache.insert([1, 2, 3, 4], _kv(4)) == []  # the resident block stays; the chain stops there


def test_a_weight_update_empties_the_cache():
    model = _llama()
    plain, cached = _engines(model)
    prompt = SYSTEM + QUESTIONS[0]
    _run(cached, {0: [("a", prompt, SamplingParams(max_tokens=3, seed=0))]})
    with torch.no_grad():
        model.model.layers[0].self_attn.k_proj.weight.mul_(1.5)  # as an optimizer step would, in place
    got, outputs = _run(cached, {0: [("b", prompt, SamplingParams(temperature=0.0, max_tokens=8))]})
    assert outputs[0].cached_prompt_tokens == 0
    want, _ = _run(plain, {0: [("b", prompt, SamplingParams(temperature=0.0, max_tokens=8))]})
    assert got[("b", 0)][0] == want[("b", 0)][0]
    _run(cached, {0: [("c", prompt, SamplingParams(max_tokens=3, seed=0))]})
    assert cached.cache_stats().hit_tokens == 32  # unchanged weights: a hit
    cached.load_weights()
    assert cached.cache_stats().blocks_in_use == 0


def test_generate_bypasses_the_cache_and_abort_releases_references():
    _, cached = _engines(_llama())
    cached.generate([SYSTEM, SYSTEM + [5]], group_size=2, max_new_tokens=4)
    assert cached.cache_stats().blocks_in_use == 0 and cached.cache_stats().hit_tokens == 0
    _run(cached, {0: [("a", SYSTEM, SamplingParams(max_tokens=2, seed=0))]})
    rid = cached.add_request(SYSTEM + [1, 2], SamplingParams(n=2, max_tokens=50, seed=1))
    cached.step()
    assert cached.cache_stats().extra["referenced_blocks"] == 2
    fresh = cached.add_request(list(range(1, 40)), SamplingParams(max_tokens=50, seed=2))  # a cold prompt
    cached.step()
    assert cached.cache_stats().extra["referenced_blocks"] == 4  # + the 2 blocks it stored, held while it runs
    cached.abort(fresh)
    cached.abort(rid)
    assert cached.cache_stats().extra["referenced_blocks"] == 0
    _run(cached, {0: []})


def test_kv_computed_before_a_weight_change_is_never_stored():
    model = _llama()
    _, cached = _engines(model)
    rid = cached.add_request(SYSTEM + QUESTIONS[1], SamplingParams(max_tokens=30, ignore_eos=True, seed=0))
    for _ in range(3):
        cached.step()
    assert cached.cache_stats().blocks_in_use == 2  # the prompt's blocks, stored at admission
    with torch.no_grad():
        model.lm_head.weight.add_(0.01)  # an optimizer step while the request runs
    _run(cached, {0: []})
    assert cached.cache_stats().blocks_in_use == 0  # old prompt blocks dropped, old completion not stored
    assert rid not in cached.scheduler.requests


def test_requests_arriving_together_with_a_shared_prefix_prefill_it_once():
    model = _llama()
    plain, cached = _engines(model)
    params = SamplingParams(temperature=0.0, max_tokens=6)
    schedule = {0: [(str(i), SYSTEM + q, params) for i, q in enumerate(QUESTIONS)]}
    want, _ = _run(plain, schedule)
    got, outputs = _run(cached, schedule)
    first = {}
    for o in outputs:
        first.setdefault(o.request_id, o.cached_prompt_tokens)
    assert first == {"0": 0, "1": 32, "2": 32, "3": 32}  # the others waited one step, then hit its blocks
    assert cached.stats.prefill_tokens < plain.stats.prefill_tokens - 2 * 32
    assert {k: v[0] for k, v in got.items()} == {k: v[0] for k, v in want.items()}
