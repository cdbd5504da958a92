"""The engine's request interface: add_request / step / abort, continuous batching, per-request sampling.

Requests join a running batch mid-flight, carry their own temperature/top-p/max_tokens/stop ids/seed/n,
stream one token per sample per step, and can be aborted. Checked against a full no-cache forward
(float64 reference), against themselves run alone (batch invariance), and against `generate`.
"""
from __future__ import annotations

import pytest
import torch

from r1kit.engine import Engine, GenerationEngine, SamplingParams
from r1kit.types import R1KitError
from tests.test_engine import EOS, PAD, PROMPTS, _gpt2, _llama, _qwen2

LONG = [40 + i for i in range(20)]  # a prompt longer than every running one: the prompt cache grows


def _run(engine: Engine, schedule: dict[int, list[tuple[str, list[int], SamplingParams]]], max_steps: int = 200):
    """Step the engine, adding schedule[s] before step s; -> ({(id, index): (tokens, logprobs, reason)}, outputs)."""
    got, outputs = {}, []
    for s in range(max_steps):
        for rid, prompt, params in schedule.get(s, []):
            engine.add_request(prompt, params, request_id=rid)
        if not engine.has_unfinished() and s > max(schedule):
            break
        for o in engine.step():
            outputs.append(o)
            toks, lps, _ = got.get((o.request_id, o.index), ([], [], None))
            got[(o.request_id, o.index)] = (toks + o.token_ids, lps + o.logprobs, o.finish_reason)
    assert not engine.has_unfinished()
    return got, outputs


def _reference(model, prompt: list[int], completion: list[int], temperature: float) -> torch.Tensor:
    """log p of each completion token from one full forward, in float64 (greedy: raw log_softmax)."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + completion])).logits[0, len(prompt) - 1 : -1].double()
    logits = logits / temperature if temperature > 0 else logits
    return torch.log_softmax(logits, -1).gather(1, torch.tensor(completion)[:, None]).squeeze(1)


@pytest.mark.parametrize("fast_path", [None, False])
def test_requests_joining_mid_flight_match_a_full_forward(fast_path):
    model = _llama()
    engine = Engine(model, eos_token_ids=EOS, pad_token_id=PAD, fast_path=fast_path, cache_mb=0)
    schedule = {
        0: [("a", PROMPTS[0], SamplingParams(n=3, temperature=1.0, max_tokens=12, seed=1))],
        2: [("b", PROMPTS[1], SamplingParams(n=2, temperature=0.7, top_p=0.9, max_tokens=9, seed=2)),
            ("c", PROMPTS[2], SamplingParams(n=1, temperature=0.0, max_tokens=14))],
        5: [("d", LONG, SamplingParams(n=2, temperature=1.3, max_tokens=10, seed=3))],
    }
    got, _ = _run(engine, schedule)
    params = {rid: (prompt, p) for step in schedule.values() for rid, prompt, p in step}
    assert len(got) == 8
    reasons = set()
    for (rid, k), (toks, lps, reason) in got.items():
        prompt, p = params[rid]
        assert 1 <= len(toks) <= p.max_tokens
        assert reason == ("stop" if toks[-1] in EOS else "length")
        assert reason == "stop" or len(toks) == p.max_tokens
        assert not any(t in EOS for t in toks[:-1])
        ref = _reference(model, prompt, toks, p.temperature)
        assert (torch.tensor(lps, dtype=torch.float64) - ref).abs().max() <= 1e-5, (rid, k)
        reasons.add(reason)
    assert reasons == {"stop", "length"}


def test_stream_delivers_one_token_per_sample_per_step_and_finishes_once():
    engine = Engine(_llama(), eos_token_ids=EOS, pad_token_id=PAD, cache_mb=0)
    _, outputs = _run(engine, {0: [("a", PROMPTS[0], SamplingParams(n=2, max_tokens=6, seed=0)),
                                   ("b", PROMPTS[1], SamplingParams(n=1, max_tokens=4, seed=1))]})
    for rid, k, n_prompt in (("a", 0, 7), ("a", 1, 7), ("b", 0, 2)):
        mine = [o for o in outputs if (o.request_id, o.index) == (rid, k)]
        assert all(len(o.token_ids) == 1 == len(o.logprobs) for o in mine)
        assert [o.finished for o in mine] == [False] * (len(mine) - 1) + [True]
        assert all(o.prompt_tokens == n_prompt and o.cached_prompt_tokens == 0 for o in mine)


def test_greedy_output_does_not_depend_on_the_rest_of_the_batch():
    model = _qwen2()
    alone = {}
    for i, prompt in enumerate(PROMPTS + [LONG]):
        engine = Engine(model, eos_token_ids=[7], pad_token_id=PAD, cache_mb=0)
        got, _ = _run(engine, {0: [(f"r{i}", prompt, SamplingParams(temperature=0.0, max_tokens=12))]})
        alone[f"r{i}"] = got[(f"r{i}", 0)]
    engine = Engine(model, eos_token_ids=[7], pad_token_id=PAD, cache_mb=0)
    busy = {0: [("x", PROMPTS[1], SamplingParams(n=4, max_tokens=20, seed=5))]}
    for i, prompt in enumerate(PROMPTS + [LONG]):  # each joins at a different step of the busy batch
        busy.setdefault(1 + 2 * i, []).append((f"r{i}", prompt, SamplingParams(temperature=0.0, max_tokens=12)))
    got, _ = _run(engine, busy)
    for rid, (toks, lps, reason) in alone.items():
        toks2, lps2, reason2 = got[(rid, 0)]
        assert toks2 == toks and reason2 == reason
        assert max(abs(a - b) for a, b in zip(lps, lps2)) <= 1e-5


def test_seeded_request_gives_the_same_tokens_whatever_else_runs():
    model = _llama()
    params = SamplingParams(n=3, temperature=0.9, top_p=0.95, max_tokens=15, seed=1234)
    engine = Engine(model, eos_token_ids=EOS, pad_token_id=PAD, cache_mb=0)
    alone, _ = _run(engine, {0: [("s", PROMPTS[0], params)]})
    engine = Engine(model, eos_token_ids=EOS, pad_token_id=PAD, cache_mb=0, compact_fraction=0.0)
    crowd = {0: [("u", PROMPTS[1], SamplingParams(n=2, max_tokens=20))],  # unseeded: torch's global RNG
             2: [("s", PROMPTS[0], params), ("v", LONG, SamplingParams(n=3, temperature=0.5, max_tokens=8, seed=9))],
             4: [("w", PROMPTS[2], SamplingParams(n=2, max_tokens=30, seed=1234))]}
    crowded, _ = _run(engine, crowd)
    for k in range(3):
        assert crowded[("s", k)][0] == alone[("s", k)][0]
        assert max(abs(a - b) for a, b in zip(alone[("s", k)][1], crowded[("s", k)][1])) <= 1e-5
    assert len({tuple(alone[("s", k)][0]) for k in range(3)}) > 1  # the n samples are not copies
    other = Engine(model, eos_token_ids=EOS, pad_token_id=PAD, cache_mb=0)
    reseeded, _ = _run(other, {0: [("s", PROMPTS[0], SamplingParams(**{**vars(params), "seed": 99}))]})
    assert [reseeded[("s", k)][0] for k in range(3)] != [alone[("s", k)][0] for k in range(3)]


def test_abort_frees_slots_at_once_and_reports_the_samples():
    engine = Engine(_llama(), eos_token_ids=[], pad_token_id=PAD, max_num_seqs=4, cache_mb=0)
    a = engine.add_request(PROMPTS[0], SamplingParams(n=2, max_tokens=30, seed=0))
    b = engine.add_request(PROMPTS[1], SamplingParams(n=2, max_tokens=30, seed=1))
    c = engine.add_request(PROMPTS[2], SamplingParams(n=2, max_tokens=5, seed=2))  # waits: 4 slots in use
    for _ in range(3):
        assert {o.request_id for o in engine.step()} == {a, b}
    engine.abort(a)
    engine.abort(a)  # twice: ignored
    engine.abort("no-such-request")
    decoded = engine.stats.decode_tokens
    outs = engine.step()
    aborted = [o for o in outs if o.request_id == a]
    assert sorted(o.index for o in aborted) == [0, 1]
    assert all(o.finished and o.finish_reason == "abort" and o.token_ids == [] for o in aborted)
    assert {o.request_id for o in outs} == {a, b, c}  # c joined in the step right after the abort
    assert engine.stats.decode_tokens - decoded == 2  # only b's rows were decoded: a's slots are gone
    engine.abort(b)
    got, _ = _run(engine, {0: []})
    assert {rid for rid, _ in got} == {b, c}
    assert got[(c, 0)][2] == "length" and len(got[(c, 0)][0]) == 4  # + its first token, in `outs`
    assert got[(b, 1)][2] == "abort"
    engine.abort(c)  # already finished: ignored
    assert not engine.has_unfinished() and engine.step() == []


def test_abort_one_sample_frees_its_slot_and_leaves_its_siblings_unchanged():
    model = _llama()
    params = SamplingParams(n=3, max_tokens=12, temperature=1.0, seed=5)
    alone, _ = _run(Engine(model, eos_token_ids=[], pad_token_id=PAD, cache_mb=0), {0: [("s", PROMPTS[0], params)]})
    engine = Engine(model, eos_token_ids=[], pad_token_id=PAD, max_num_seqs=3, cache_mb=0)
    engine.add_request(PROMPTS[0], params, request_id="s")
    engine.add_request(PROMPTS[1], SamplingParams(n=1, max_tokens=4, seed=1), request_id="w")  # no free slot
    engine.add_request(PROMPTS[2], SamplingParams(n=2, max_tokens=3, seed=2), request_id="q")  # aborted waiting
    got = {}
    for _ in range(3):
        for o in engine.step():
            got.setdefault((o.request_id, o.index), []).extend(o.token_ids)
    engine.abort("s", 1)
    engine.abort("s", 1)  # twice, out of range, not an int, unknown id: ignored
    engine.abort("s", 7)
    engine.abort("s", "0")
    engine.abort("nope", 0)
    engine.abort("q", 0)  # one sample of a request that is still waiting: it is never decoded
    decoded = engine.stats.decode_tokens
    outs = engine.step()
    assert engine.stats.decode_tokens - decoded == 2  # s's samples 0 and 2 only: sample 1's row is gone
    assert [(o.index, o.finish_reason, o.token_ids) for o in outs if o.request_id == "s" and o.finished] == \
        [(1, "abort", [])]
    assert {(o.request_id, o.index) for o in outs} == {("s", 0), ("s", 1), ("s", 2), ("w", 0), ("q", 0)}
    rest, _ = _run(engine, {0: []})
    for k in (0, 2):  # the siblings: the same tokens and logprobs as without the abort
        assert got[("s", k)] + [t for o in outs if (o.request_id, o.index) == ("s", k) for t in o.token_ids] + \
            rest[("s", k)][0] == alone[("s", k)][0]
        assert rest[("s", k)][2] == "length"
    assert len(got[("s", 1)]) == 3 and ("s", 1) not in rest  # no output after its abort
    assert ("q", 0) not in rest and rest[("q", 1)][2] == "length" and len(rest[("q", 1)][0]) == 3
    assert rest[("w", 0)][2] == "length"
    engine.abort("s", 0)  # finished: ignored
    assert not engine.has_unfinished() and engine.step() == []


def test_waiting_request_can_be_aborted_before_it_runs():
    engine = Engine(_llama(), eos_token_ids=[], pad_token_id=PAD, max_num_seqs=1, cache_mb=0)
    a = engine.add_request(PROMPTS[0], SamplingParams(max_tokens=3))
    b = engine.add_request(PROMPTS[1], SamplingParams(max_tokens=3))
    assert [o.request_id for o in engine.step()] == [a]
    engine.abort(b)
    got, _ = _run(engine, {0: []})
    assert got[(b, 0)] == ([], [], "abort") and len(got[(a, 0)][0]) == 2 and got[(a, 0)][2] == "length"


def test_max_num_seqs_bounds_the_running_rows_and_results_do_not_change():
    model = _llama(initializer_range=0.3)
    prompts = PROMPTS + [LONG, [9, 8, 7]]
    params = SamplingParams(n=2, temperature=0.0, max_tokens=8)
    free = Engine(model, eos_token_ids=EOS, pad_token_id=PAD, cache_mb=0)
    expected, _ = _run(free, {0: [(str(i), p, params) for i, p in enumerate(prompts)]})
    engine = Engine(model, eos_token_ids=EOS, pad_token_id=PAD, max_num_seqs=3, cache_mb=0)
    for i, p in enumerate(prompts):
        engine.add_request(p, params, request_id=str(i))
    got = {}
    while engine.has_unfinished():
        outs = engine.step()
        assert engine.batch.n_live <= 3 and len({(o.request_id, o.index) for o in outs}) <= 3
        for o in outs:
            got.setdefault((o.request_id, o.index), []).extend(o.token_ids)
    assert {k: v[0] for k, v in expected.items()} == got


def test_generate_beyond_max_num_seqs_joins_as_rows_finish():
    model = _llama()
    engine = Engine(model, eos_token_ids=EOS, pad_token_id=PAD, max_num_seqs=5)
    r = engine.generate(PROMPTS, group_size=2, max_new_tokens=10, generator=torch.Generator().manual_seed(0))
    assert engine.stats.prefill_calls >= 2  # the third prompt waited for free slots
    for row in range(r.num_rows):
        n = int(r.lengths[row])
        ref = _reference(model, PROMPTS[row // 2], r.completion_ids[row, :n].tolist(), 1.0)
        assert (r.logprobs[row, :n].double() - ref).abs().max() <= 1e-5
    with pytest.raises(R1KitError, match="group_size=6 exceeds max_num_seqs=5"):
        engine.generate(PROMPTS, group_size=6, max_new_tokens=4)


def test_stop_token_ids_ignore_eos_and_max_tokens():
    engine = Engine(_llama(), eos_token_ids=EOS, pad_token_id=PAD, cache_mb=0)
    every = list(range(100))
    got, _ = _run(engine, {0: [
        ("stop", PROMPTS[0], SamplingParams(n=2, max_tokens=10, stop_token_ids=tuple(every), seed=0)),
        ("noeos", PROMPTS[1], SamplingParams(n=2, max_tokens=12, ignore_eos=True, seed=1)),
        ("one", PROMPTS[2], SamplingParams(max_tokens=1, ignore_eos=True, seed=2)),
    ]})
    assert all(len(got[("stop", k)][0]) == 1 and got[("stop", k)][2] == "stop" for k in range(2))
    assert all(len(got[("noeos", k)][0]) == 12 and got[("noeos", k)][2] == "length" for k in range(2))
    assert len(got[("one", 0)][0]) == 1 and got[("one", 0)][2] == "length"


def test_other_architectures_serve_requests_in_whole_batches():
    model = _gpt2()
    engine = Engine(model, eos_token_ids=EOS, pad_token_id=PAD)
    got, _ = _run(engine, {0: [("a", PROMPTS[0], SamplingParams(n=2, max_tokens=8, seed=0))],
                           1: [("b", PROMPTS[1], SamplingParams(temperature=0.5, max_tokens=6, seed=1))]})
    assert engine.last_backend == "hf"
    for (rid, k), (toks, lps, _) in got.items():
        prompt, t = (PROMPTS[0], 1.0) if rid == "a" else (PROMPTS[1], 0.5)
        assert (torch.tensor(lps, dtype=torch.float64) - _reference(model, prompt, toks, t)).abs().max() <= 1e-5


def test_step_restores_train_mode_and_an_idle_step_is_empty():
    model = _llama()
    model.train()
    engine = Engine(model, eos_token_ids=EOS, pad_token_id=PAD)
    assert isinstance(engine, GenerationEngine)
    assert engine.step() == [] and not engine.has_unfinished()
    engine.add_request(PROMPTS[0], SamplingParams(max_tokens=2))
    engine.step()
    assert model.training


@pytest.mark.parametrize(
    "prompt, params, match",
    [
        ([], SamplingParams(), "prompt is empty"),
        ([1, 200], SamplingParams(), "outside"),
        (["a"], SamplingParams(), "integer token ids"),
        ([1] * 60, SamplingParams(max_tokens=5), "max_position_embeddings"),
        ([1], SamplingParams(n=0), "SamplingParams.n"),
        ([1], SamplingParams(top_p=1.5), "top_p"),
        ([1], SamplingParams(temperature=-1), "temperature"),
        ([1], SamplingParams(max_tokens=0), "max_tokens"),
        ([1], SamplingParams(stop_token_ids=(100,)), "stop_token_ids"),
        ([1], SamplingParams(n=9), "max_num_seqs=8"),
        ([1], {"n": 1}, "SamplingParams"),
    ],
)
def test_bad_requests_raise_clear_errors(prompt, params, match):
    engine = Engine(_llama(), eos_token_ids=EOS, pad_token_id=PAD, max_num_seqs=8)
    with pytest.raises(R1KitError, match=match):
        engine.add_request(prompt, params)
    assert not engine.has_unfinished()


def test_duplicate_ids_and_generate_during_requests_are_refused():
    engine = Engine(_llama(), eos_token_ids=EOS, pad_token_id=PAD)
    engine.add_request(PROMPTS[0], SamplingParams(), request_id="x")
    with pytest.raises(R1KitError, match="'x' is already in flight"):
        engine.add_request(PROMPTS[1], SamplingParams(), request_id="x")
    with pytest.raises(R1KitError, match="in flight"):
        engine.generate(PROMPTS, max_new_tokens=3)
    with pytest.raises(R1KitError, match="max_num_seqs"):
        Engine(_llama(), eos_token_ids=EOS, pad_token_id=PAD, max_num_seqs=0)


def test_caches_grow_and_shrink_mid_flight_without_changing_results():
    """Generation columns grow by doubling, and prompt columns only a finished long prompt used are
    trimmed, while other rows are mid-decode."""
    model = _llama(max_position_embeddings=128)
    engine = Engine(model, eos_token_ids=[], pad_token_id=PAD, cache_mb=0, compact_fraction=0.0)
    engine._fast.initial_gen_cols = 2
    long_prompt = [11 + i % 80 for i in range(60)]
    schedule = {0: [("short", PROMPTS[1], SamplingParams(n=2, max_tokens=30, seed=0))],
                3: [("long", long_prompt, SamplingParams(max_tokens=4, seed=1))],
                4: [("mid", PROMPTS[0], SamplingParams(temperature=0.0, max_tokens=20))]}
    widths = []
    got = {}
    for s in range(40):
        for rid, prompt, params in schedule.get(s, []):
            engine.add_request(prompt, params, request_id=rid)
        for o in engine.step():
            toks, lps = got.get((o.request_id, o.index), ([], []))
            got[(o.request_id, o.index)] = (toks + o.token_ids, lps + o.logprobs)
        if engine._backend is not None:
            widths.append(engine._fast.pbias.shape[1])
    assert max(widths) >= 60 and widths[-1] < 16  # grew for the long prompt, trimmed once it left
    assert engine._fast.gkv is None and engine.stats.compactions > 0
    prompts = {"short": (PROMPTS[1], 1.0), "long": (long_prompt, 1.0), "mid": (PROMPTS[0], 0.0)}
    for (rid, k), (toks, lps) in got.items():
        prompt, t = prompts[rid]
        assert len(toks) == {"short": 30, "long": 4, "mid": 20}[rid]
        assert (torch.tensor(lps, dtype=torch.float64) - _reference(model, prompt, toks, t)).abs().max() <= 1e-5


def test_sample_rows_is_sample_tokens_row_by_row():
    """The one-pass sampler for mixed requests draws what sample_tokens would, per row, from the same uniform."""
    from r1kit.engine.sampling import sample_rows, sample_tokens

    torch.manual_seed(0)
    logits = torch.randn(400, 50) * 3
    settings = [(1.0, 1.0), (0.0, 1.0), (0.7, 0.9), (1.5, 0.5), (0.3, 1e-6)] * 80
    temps = torch.tensor([t for t, _ in settings])
    top_ps = torch.tensor([p for _, p in settings])
    u = torch.stack([torch.rand((1, 1), generator=torch.Generator().manual_seed(i))[0, 0] for i in range(400)])
    tokens, logprobs = sample_rows(logits, temps, top_ps, u)
    for i, (t, p) in enumerate(settings):
        want_tok, want_lp = sample_tokens(logits[i : i + 1], t, p, torch.Generator().manual_seed(i))
        assert int(tokens[i]) == int(want_tok) and abs(float(logprobs[i]) - float(want_lp)) <= 1e-6, i


def test_seeded_request_draws_its_generator_stream_in_order():
    """A seeded request's uniforms are drawn ahead in blocks (Request.uniforms), yet each step takes exactly
    the next ones of its generator's stream: alone, n = 1, it samples what generate() samples with a generator
    seeded the same way (one uniform per step), and the blocks split the stream without skipping any."""
    from r1kit.engine.scheduler import UNIFORM_BLOCK, Request

    req = Request("r", [1], SamplingParams(seed=11), torch.Generator().manual_seed(11), "fast")
    got = [x for k in (1, 2, UNIFORM_BLOCK - 1, 1, 3 * UNIFORM_BLOCK, 5) for x in req.uniforms(k)]
    want = torch.rand((len(got), 1), generator=torch.Generator().manual_seed(11)).squeeze(1).tolist()
    assert got == want
    model = _llama()
    engine = Engine(model, eos_token_ids=[], pad_token_id=PAD, cache_mb=0)
    got, _ = _run(engine, {0: [("a", PROMPTS[2], SamplingParams(max_tokens=UNIFORM_BLOCK + 20, seed=5))]})
    ref = engine.generate([PROMPTS[2]], max_new_tokens=UNIFORM_BLOCK + 20, generator=torch.Generator().manual_seed(5))
    assert got[("a", 0)][0] == ref.completion_ids[0].tolist()
