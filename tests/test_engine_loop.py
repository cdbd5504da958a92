"""The server's engine thread (r1kit/serving/engine_loop.py) against the real local engine: per-sample abort
and its back-pressure accounting, and an engine whose `abort` takes no sample index (vLLM's signature)."""
from __future__ import annotations

import asyncio

from r1kit.engine import Engine, SamplingParams
from r1kit.serving.engine_loop import EngineLoop
from tests.test_engine import PAD, PROMPTS, _llama


class _WholeRequestAbort:
    """An engine whose abort stops whole requests only (as r1kit/engine/vllm.py's does)."""

    def __init__(self, engine):
        self.engine = engine

    def abort(self, request_id: str) -> None:
        self.engine.abort(request_id)

    def __getattr__(self, name):
        return getattr(self.engine, name)


def _serve(engine, abort_index: int) -> tuple[dict, list, dict]:
    """Submit one n=2 request and abort its sample `abort_index` at once (the abort reaches the engine thread
    at most one step after the request: no race with its 50 steps); -> (per-sample finish reason, pending
    samples right after the abort, the tokens each sample streamed)."""
    async def main():
        loop = EngineLoop(engine, max_pending=4)
        loop.start()
        try:
            stream = loop.submit(PROMPTS[0], SamplingParams(n=2, max_tokens=50, seed=3), "r")
            loop.abort("r", abort_index)
            loop.abort("r", abort_index)  # twice: ignored
            pending = loop.stats()["pending_samples"]
            finish, tokens = {}, {0: [], 1: []}
            while len(finish) < 2:
                for out in await asyncio.wait_for(stream.next(), 60):
                    tokens[out.index] += out.token_ids
                    if out.finished:
                        finish[out.index] = out.finish_reason
            return finish, pending, tokens, loop.stats()["pending_samples"]
        finally:
            loop.stop()
    finish, pending, tokens, after = asyncio.run(main())
    assert after == 0
    return finish, pending, tokens


def test_abort_one_sample_through_the_engine_loop():
    model = _llama()
    finish, pending, tokens = _serve(Engine(model, eos_token_ids=[], pad_token_id=PAD, cache_mb=0), 0)
    assert finish == {0: "abort", 1: "length"} and pending == 1  # its slot no longer counts
    assert len(tokens[1]) == 50 and len(tokens[0]) <= 1


def test_an_engine_without_per_sample_abort_runs_the_sample_to_its_end():
    engine = _WholeRequestAbort(Engine(_llama(), eos_token_ids=[], pad_token_id=PAD, cache_mb=0))
    finish, pending, tokens = _serve(engine, 0)
    assert finish == {0: "length", 1: "length"} and pending == 2
    assert len(tokens[0]) == len(tokens[1]) == 50
