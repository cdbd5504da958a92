"""The server's engine in its own process (r1kit/serving/engine_process.py): the same outputs as the engine
thread, a bad model folder named by the parent, and a killed engine process reported instead of hanging."""
from __future__ import annotations

import asyncio
import os
import signal
import time

import openai
import pytest
import torch

from r1kit.engine import SamplingParams
from r1kit.serving.engine_loop import EngineClosed, EngineLoop
from r1kit.serving.engine_process import EngineProcess
from r1kit.serving.server import ServeOptions, build_engine
from r1kit.types import R1KitError
from serve_support import API_KEY, MODEL_NAME, start_server, stop_server
from test_serve import model_dir  # noqa: F401  (the trained test model, a session fixture)

REQUESTS = [  # (prompt ids, params): sampled with seeds, greedy, n > 1, a stop id: each one's outputs are fixed
    ([5, 9, 14, 3, 22, 7], SamplingParams(n=2, temperature=1.0, max_tokens=24, seed=11)),
    ([5, 9, 14, 3], SamplingParams(temperature=0.0, max_tokens=20)),
    ([8, 8, 2, 30, 31, 4, 6], SamplingParams(n=3, temperature=0.8, top_p=0.9, max_tokens=16, seed=4)),
    ([5, 9, 14, 3, 22, 7, 40], SamplingParams(temperature=1.0, max_tokens=30, seed=2, stop_token_ids=(12,))),
]


def _run(engine) -> dict:
    """Submit REQUESTS through an EngineLoop over `engine`; -> {(request, sample): (tokens, logprobs, finish)}."""
    async def main():
        loop = EngineLoop(engine, max_pending=64)
        loop.start()
        try:
            streams = [loop.submit(ids, params, f"r{i}") for i, (ids, params) in enumerate(REQUESTS)]
            got = {}
            for i, s in enumerate(streams):
                done = 0
                while done < s.n:
                    for out in await asyncio.wait_for(s.next(), 60):
                        toks, lps, _ = got.get((i, out.index), ([], [], None))
                        got[(i, out.index)] = (toks + out.token_ids, lps + out.logprobs, out.finish_reason)
                        done += out.finished
            assert loop.stats()["pending_samples"] == 0
            return got
        finally:
            loop.stop()
    return asyncio.run(main())


def test_the_engine_process_streams_exactly_what_the_engine_thread_streams(model_dir):  # noqa: F811
    opts = ServeOptions(model=str(model_dir), threads=torch.get_num_threads(), max_num_seqs=8, cache_mb=16)
    in_thread = _run(build_engine(opts)[0])
    proc = EngineProcess(opts)
    assert proc.info["context"] == 1024 and proc.info["per_sample_abort"]
    assert proc.info["tokenizer"].eos_token_id is not None  # the parent's tokenizer comes from the child
    in_process = _run(proc)
    assert not proc.proc.is_alive()  # stop() ended it
    assert sorted(in_process) == sorted(in_thread) and len(in_thread) == 7
    for key, (toks, lps, finish) in in_thread.items():
        assert in_process[key][0] == toks and in_process[key][2] == finish
        assert in_process[key][1] == lps  # bit for bit: the same engine, the same ops, the same thread count


def test_a_bad_model_folder_is_named_by_the_engine_process(tmp_path):
    (tmp_path / "weights.txt").write_text("not a model")
    with pytest.raises(R1KitError, match="has no config.json"):
        EngineProcess(ServeOptions(model=str(tmp_path)))


def test_a_killed_engine_process_fails_open_requests_and_the_health_check(model_dir, tmp_path):  # noqa: F811
    server = start_server(model_dir, tmp_path / "server.log", "--api-key", API_KEY, "--shutdown-grace", "0")
    try:
        health = server.health()
        assert health["status"] == "ok" and health["engine"] == "process"
        client = openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)
        stream = client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "go on"}],
                                                max_tokens=900, extra_body={"ignore_eos": True}, stream=True)
        it = iter(stream)
        next(it)
        os.kill(health["engine_pid"], signal.SIGKILL)  # as the OOM killer would
        with pytest.raises(openai.APIError) as e:  # the open stream ends with an error event, not a hang
            for _ in it:
                pass
        assert "engine process ended unexpectedly" in str(e.value)
        deadline = time.monotonic() + 10
        while server.get("/health")[0] != 503 and time.monotonic() < deadline:
            time.sleep(0.05)
        status, body = server.get("/health")
        assert status == 503 and body["status"] == "error" and "exit status -9" in body["error"]
        with pytest.raises(openai.APIStatusError) as e:  # new requests: 503 naming the cause, not a hang or a 500
            client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "hi"}], max_tokens=4)
        assert e.value.status_code == 503 and "engine process ended" in str(e.value)
        client.close()
    finally:
        code = stop_server(server)
    assert code == 0, server.log_text()


def test_engine_closed_is_raised_after_the_engine_process_died(model_dir):  # noqa: F811
    """The loop's own view (no HTTP): submit after the death raises EngineClosed with the reason."""
    async def main():
        proc = EngineProcess(ServeOptions(model=str(model_dir), threads=1, max_num_seqs=4, cache_mb=4))
        loop = EngineLoop(proc, max_pending=8)
        loop.start()
        try:
            proc.proc.kill()
            deadline = time.monotonic() + 10
            while loop.failure is None and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            with pytest.raises(EngineClosed, match="exit status -9"):
                loop.submit([5, 9, 14], SamplingParams(max_tokens=4), "late")
        finally:
            loop.stop()
    asyncio.run(main())


def test_engine_dtype_bf16_samples_with_bf16_copies_of_the_float32_weights(model_dir):  # noqa: F811
    """`r1kit serve --engine-dtype bf16`: the engine computes in bf16 while the weights stay float32; the same
    requests finish, and the greedy request's first token and its logprob agree with the float32 engine's."""
    from dataclasses import replace

    fp32 = ServeOptions(model=str(model_dir), threads=torch.get_num_threads(), max_num_seqs=8, cache_mb=16)
    engine = build_engine(replace(fp32, engine_dtype="bf16"))[0]
    assert engine.dtype == torch.bfloat16 and {p.dtype for p in engine.model.parameters()} == {torch.float32}
    got, ref = _run(engine), _run(build_engine(fp32)[0])
    assert sorted(got) == sorted(ref)
    (toks, lps, _), (ref_toks, ref_lps, _) = got[(1, 0)], ref[(1, 0)]  # request 1 is greedy
    assert toks[0] == ref_toks[0] and abs(lps[0] - ref_lps[0]) < 0.1
    with pytest.raises(R1KitError, match="engine.dtype='fp16' is unknown"):
        build_engine(replace(fp32, engine_dtype="fp16"))
