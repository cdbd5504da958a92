"""The server's streaming chunker (r1kit/serving/app.py, `Generation.updates`): how many tokens each streamed
chunk carries (--stream-interval, auto by load), with a stand-in engine loop and a one-character-per-token
tokenizer, so that chunk boundaries are exact."""
from __future__ import annotations

import asyncio
from types import SimpleNamespace

from r1kit.engine.api import RequestOutput, SamplingParams
from r1kit.serving.app import Generation, ServerState


class _Tokenizer:
    all_special_ids = [0]

    def decode(self, ids, **_):
        return "".join(chr(ord("a") + (i - 1) % 26) for i in ids if i)


class _Loop:
    """Records submissions; `open` is what open_samples() reports (the server's load)."""

    def __init__(self, open_samples: int):
        self.open, self.submitted, self.aborted = open_samples, [], []

    def submit(self, ids, params, rid, queue):
        self.submitted.append(rid)

    def abort(self, rid, index=None):
        self.aborted.append((rid, index))

    def open_samples(self) -> int:
        return self.open


def _chunks(interval: int, open_samples: int, n_tokens: int, per_step: int = 1, stops=()) -> list:
    """Stream n_tokens through a Generation, per_step tokens per engine step, one step per wake-up;
    -> [(text, finish)] per yielded update of choice 0."""
    state = ServerState(loop=_Loop(open_samples), tokenizer=_Tokenizer(), model_name="m", context=100,
                        stream_interval=interval)
    gen = Generation(state, [[1, 2]], SamplingParams(max_tokens=n_tokens), list(stops), None)
    rid = state.loop.submitted[0]

    async def main():
        out, fed, updates = [], 0, gen.updates()
        pending = asyncio.ensure_future(updates.__anext__())
        while fed < n_tokens and not pending.done():
            ids = list(range(fed + 1, min(fed + per_step, n_tokens) + 1))
            fed += len(ids)
            done = fed >= n_tokens
            gen.queue.put_nowait([RequestOutput(rid, 0, ids, [0.0] * len(ids), done, "length" if done else None)])
            for _ in range(5):  # let the generator take the step (it yields, or holds the text back)
                await asyncio.sleep(0)
            if pending.done():
                d, finish = pending.result()[0]
                out.append((d.content, finish))
                if finish:
                    break
                pending = asyncio.ensure_future(updates.__anext__())
        pending.cancel()
        return out

    return asyncio.run(main())


def test_fixed_interval_sends_first_token_at_once_then_every_k_tokens_then_the_end():
    chunks = _chunks(interval=3, open_samples=1, n_tokens=11)
    assert [len(t) for t, _ in chunks] == [1, 3, 3, 3, 1]  # 1 + 3 + 3 + 3 + the last one with the finish
    assert [f for _, f in chunks] == [None] * 4 + ["length"]
    assert "".join(t for t, _ in chunks) == _Tokenizer().decode(range(1, 12))


def test_interval_one_sends_every_token_and_merged_steps_stay_merged():
    assert [len(t) for t, _ in _chunks(interval=1, open_samples=64, n_tokens=5)] == [1, 1, 1, 1, 1]
    # several tokens already there at one wake-up (the server lagged): one chunk, whatever the interval
    assert [len(t) for t, _ in _chunks(interval=1, open_samples=1, n_tokens=9, per_step=3)] == [3, 3, 3]


def test_auto_interval_follows_the_number_of_open_samples():
    assert [len(t) for t, _ in _chunks(interval=0, open_samples=8, n_tokens=6)] == [1] * 6
    assert [len(t) for t, _ in _chunks(interval=0, open_samples=64, n_tokens=10)] == [1, 4, 4, 1]
    assert [len(t) for t, _ in _chunks(interval=0, open_samples=10_000, n_tokens=20)] == [1, 8, 8, 3]


def test_a_stop_string_ends_a_held_chunk_at_once():
    # tokens 1..8 spell "abcdefgh"; the stop string "ef" ends the text at "abcd", with finish "stop",
    # at the step that completes it, although fewer than `interval` tokens are pending
    state_chunks = _chunks(interval=8, open_samples=1, n_tokens=8, stops=["ef"])
    assert "".join(t for t, _ in state_chunks) == "abcd"
    assert state_chunks == [("a", None), ("bcd", "stop")]
