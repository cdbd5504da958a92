"""`r1kit serve` end to end: the real openai client (max_retries=0) against the server in a subprocess.

One server per module (a tiny model trained to answer in r1kit's format: tests/serve_support.py); the
SIGTERM test starts its own. The browser test drives the chat page in headless Chromium.
"""
from __future__ import annotations

import asyncio
import http.client
import json
import os
import random
import shutil
import signal
import time
from pathlib import Path

import openai
import pytest

from serve_support import (API_KEY, MODEL_NAME, QA, SECOND_TURN, Browser, cached_format_model, start_server, stop_server,
                           train_format_model)



@pytest.fixture(scope="session")
def model_dir(request, tmp_path_factory) -> Path:
    """The trained test model, kept in pytest's cache between runs (keyed by the code and library versions
    that make it: training is seeded, so a cached folder is the folder a fresh run would write)."""
    cache = getattr(request.config, "cache", None)  # None under -p no:cacheprovider
    if cache is None:
        return train_format_model(tmp_path_factory.mktemp("serve") / "model")
    return cached_format_model(cache)


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve_log") / "server.log"
    srv = start_server(model_dir, log, "--api-key", API_KEY, "--max-num-seqs", "32", "--max-waiting", "32",
                       "--max-body-mb", "1", "--shutdown-grace", "0")
    yield srv
    code = stop_server(srv)
    assert code == 0, f"the server did not exit cleanly on SIGTERM ({code}):\n{srv.log_text()}"
    assert "Traceback" not in srv.log.read_text(), srv.log_text()


@pytest.fixture(scope="module")
def client(server):
    c = openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)
    yield c
    c.close()


def ask(q: str) -> list[dict]:
    return [{"role": "user", "content": q}]


@pytest.fixture(scope="module")
def reply_tokens(model_dir):
    """question -> (token ids of the trained reply, how many of them are reasoning: through </think>)."""
    from r1kit.model import load_tokenizer

    tok = load_tokenizer(model_dir)
    out = {}
    for q, (r, a) in QA.items():
        ids = tok(f"<think> {r} </think> <answer> {a} </answer>", add_special_tokens=False).input_ids
        out[q] = (ids + [tok.eos_token_id], ids.index(tok.convert_tokens_to_ids("</think>")) + 1, tok)
    return out


def test_chat_reply_splits_reasoning_and_answer(client, reply_tokens):
    r = client.chat.completions.create(model=MODEL_NAME, messages=ask("What is 2+3?"), temperature=0, max_tokens=60)
    msg, u = r.choices[0].message, r.usage
    assert (msg.reasoning_content, msg.content) == QA["What is 2+3?"]
    assert r.choices[0].finish_reason == "stop" and r.object == "chat.completion" and r.model == MODEL_NAME
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens
    assert u.prompt_cache_hit_tokens + u.prompt_cache_miss_tokens == u.prompt_tokens
    assert u.prompt_tokens_details.cached_tokens == u.prompt_cache_hit_tokens
    ids, n_reasoning, _ = reply_tokens["What is 2+3?"]
    assert u.completion_tokens == len(ids) and u.completion_tokens_details.reasoning_tokens == n_reasoning


def test_stream_sends_reasoning_first_then_content_then_usage(client, reply_tokens):
    chunks = list(client.chat.completions.create(model=MODEL_NAME, messages=ask("What is 9+9?"), temperature=0,
                                                 max_tokens=60, stream=True, stream_options={"include_usage": True}))
    kinds = []
    for c in chunks[:-1]:
        d = c.choices[0].delta
        kinds += ["r"] * bool(getattr(d, "reasoning_content", None)) + ["c"] * bool(d.content)
    assert kinds and "".join(kinds).rstrip("c").count("c") == 0 and "r" in kinds  # all r, then all c
    reasoning = "".join(getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in chunks[:-1])
    content = "".join(c.choices[0].delta.content or "" for c in chunks[:-1])
    assert (reasoning, content) == QA["What is 9+9?"]
    assert chunks[-2].choices[0].finish_reason == "stop"
    ids, n_reasoning, _ = reply_tokens["What is 9+9?"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(ids)
    assert chunks[-1].usage.completion_tokens_details.reasoning_tokens == n_reasoning


def test_repeated_prompt_hits_the_prefix_cache(client):
    messages = [{"role": "system", "content": "You are a careful assistant. " * 12}, *ask("What is 6+1?")]
    first = client.chat.completions.create(model=MODEL_NAME, messages=messages, temperature=0, max_tokens=8).usage
    second = client.chat.completions.create(model=MODEL_NAME, messages=messages, temperature=0, max_tokens=8).usage
    assert first.prompt_tokens == second.prompt_tokens > 64
    assert second.prompt_cache_hit_tokens >= first.prompt_tokens - 16  # all full blocks of the prompt
    assert second.prompt_cache_hit_tokens > first.prompt_cache_hit_tokens
    assert second.prompt_cache_hit_tokens + second.prompt_cache_miss_tokens == second.prompt_tokens
    assert second.prompt_tokens_details.cached_tokens == second.prompt_cache_hit_tokens


def test_n_samples_and_seeds(client):
    def sample(seed):
        r = client.chat.completions.create(model=MODEL_NAME, messages=ask("Tell me something"), n=3, seed=seed,
                                           temperature=1.0, max_tokens=12)
        assert [c.index for c in r.choices] == [0, 1, 2]
        return [(c.message.reasoning_content, c.message.content, c.finish_reason) for c in r.choices], r.usage

    a, usage = sample(7)
    assert sample(7)[0] == a  # same seed, same output
    assert sample(8)[0] != a
    assert len(set(a)) > 1  # the three samples differ
    assert usage.completion_tokens <= 36 and usage.prompt_tokens > 0


def test_stop_strings_and_max_tokens(client, reply_tokens):
    r = client.chat.completions.create(model=MODEL_NAME, messages=ask("What is 2+3?"), temperature=0,
                                       max_tokens=60, stop=[" is"])
    assert r.choices[0].message.reasoning_content == "2 plus 3" and r.choices[0].message.content == ""
    assert r.choices[0].finish_reason == "stop"
    ids, _, tok = reply_tokens["What is 2+3?"]
    k = 6
    r = client.chat.completions.create(model=MODEL_NAME, messages=ask("What is 2+3?"), temperature=0, max_tokens=k)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == k
    assert r.choices[0].message.reasoning_content == tok.decode(ids[:k]).removeprefix("<think>").strip()
    assert r.usage.completion_tokens_details.reasoning_tokens == k  # the reasoning had not ended


def test_a_stop_string_stops_one_sample_and_frees_its_slot(server, client):
    """n=2, a stop string only sample 0 hits: sample 0 ends at once (its slot freed while sample 1 runs on),
    and sample 1's text is exactly that of the same seeded request without the stop string."""
    kw = dict(model=MODEL_NAME, prompt="User: tell me a story\nAssistant:", n=2, max_tokens=400, temperature=1.0,
              seed=11, extra_body={"ignore_eos": True})
    free = {c.index: c.text for c in client.completions.create(**kw).choices}
    first, other = free[0], free[1]
    stop = next(first[i:i + 8] for i in range(4, len(first) - 8)
                if first[i:i + 8] not in other and first[i:i + 8].strip() and first.find(first[i:i + 8]) == i)
    text, finish, pending_after_stop = {0: "", 1: ""}, {}, None
    for chunk in client.completions.create(**kw, stop=[stop], stream=True):
        for c in chunk.choices:
            text[c.index] += c.text
            if c.finish_reason:
                finish[c.index] = c.finish_reason
        if 0 in finish and 1 not in finish and pending_after_stop is None:
            deadline = time.monotonic() + 10  # the abort reaches the engine thread before its next step
            while server.health()["pending_samples"] != 1 and time.monotonic() < deadline:
                time.sleep(0.01)
            pending_after_stop = server.health()["pending_samples"]
    assert finish == {0: "stop", 1: "length"}
    assert text[0] == first[: first.index(stop)]
    assert text[1] == other  # its sibling's stop changed nothing in it (seeded draws included)
    assert pending_after_stop == 1  # sample 0 no longer holds a slot while sample 1 runs on
    _wait_idle(server)


def test_multi_turn_leaves_reasoning_content_out_of_the_context(client):
    turn = SECOND_TURN
    with_reasoning = [*turn[:1], {**turn[1], "reasoning_content": "a long chain of thought " * 20}, *turn[2:]]
    a = client.chat.completions.create(model=MODEL_NAME, messages=turn, temperature=0, max_tokens=30)
    b = client.chat.completions.create(model=MODEL_NAME, messages=with_reasoning, temperature=0, max_tokens=30)
    assert a.usage.prompt_tokens == b.usage.prompt_tokens > 48
    assert (a.choices[0].message.reasoning_content, a.choices[0].message.content) == QA["What is 4+4?"]
    assert a.choices[0].message == b.choices[0].message


def test_completions_endpoint(client):
    r = client.completions.create(model=MODEL_NAME, prompt=["User: hi\nAssistant:", "1+1="], n=2, max_tokens=5,
                                  temperature=1.0, seed=3)
    assert sorted(c.index for c in r.choices) == [0, 1, 2, 3]
    assert 4 <= r.usage.completion_tokens <= 20 and all(c.finish_reason in ("stop", "length") for c in r.choices)
    assert r.usage.prompt_cache_hit_tokens + r.usage.prompt_cache_miss_tokens == r.usage.prompt_tokens
    streamed = list(client.completions.create(model=MODEL_NAME, prompt="1+1=", max_tokens=5, temperature=1.0,
                                              seed=3, stream=True))
    whole = client.completions.create(model=MODEL_NAME, prompt="1+1=", max_tokens=5, temperature=1.0, seed=3)
    assert "".join(c.choices[0].text for c in streamed) == whole.choices[0].text
    assert streamed[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_models_health_and_auth(server, client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL_NAME]
    assert client.models.retrieve(MODEL_NAME).id == MODEL_NAME
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4", messages=ask("hi"))
    assert e.value.body["param"] == "model" and "does not exist" in e.value.body["message"]
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model=MODEL_NAME, messages=ask("hi"))
    assert server.get("/v1/models")[0] == 401 and server.get("/v1/models", API_KEY)[0] == 200
    assert server.health()["status"] == "ok"


def test_64_concurrent_streams(server):
    async def one(c, i):
        text, finish = [], None
        stream = await c.chat.completions.create(model=MODEL_NAME, messages=ask(f"question {i}"), max_tokens=6,
                                                 temperature=1.0, seed=i, stream=True)
        async for chunk in stream:
            for ch in chunk.choices:
                text.append(ch.delta.content or getattr(ch.delta, "reasoning_content", None) or "")
                finish = ch.finish_reason or finish
        return finish

    async def main():
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120) as c:
            return await asyncio.gather(*(one(c, i) for i in range(64)), return_exceptions=True)

    results = asyncio.run(main())
    errors = [r for r in results if isinstance(r, BaseException)]
    assert not errors, errors[:3]
    assert all(r in ("stop", "length") for r in results)
    assert server.health()["requests"] == 0


def _raw(server, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    conn = http.client.HTTPConnection(server.url.removeprefix("http://"), timeout=30)
    try:
        h = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json", **(headers or {})}
        conn.request(method, path, body=body, headers=h)
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


VALID = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "What is 2+3?"}], "max_tokens": 4}
BAD_VALUES = [None, -1, 0, 1.5, "x", "", True, [], {}, [1, "a"], 10**30, -10**30, {"a": {"b": []}}, "NaN"]
MALFORMED = [
    b"", b"{", b"[]", b"null", b"42", b'"str"', b"\xff\xfe garbage", b"{'model': 1}", b'{"model": "x",}',
    b"[" * 10000, b'{"a":' * 5000, b'{"model": NaN}', b'{"model": "' + MODEL_NAME.encode() + b'", "messages": Infinity}',
]


def _fuzz_bodies(rng: random.Random) -> list[tuple[str, bytes]]:
    """Malformed JSON, wrong types, out-of-range values and broken messages: every one must be a 4xx."""
    out = [("/v1/chat/completions", b) for b in MALFORMED]
    fields = {"model": [None, 1, "", "other-model"], "messages": [None, [], "hi", [1], [{"role": "user"}],
                                                                  [{"role": "robot", "content": "x"}],
                                                                  [{"content": "x"}], [{"role": "user", "content": 5}],
                                                                  [{"role": "user", "content": [{"type": "image_url"}]}],
                                                                  [{"role": "user", "content": "x"}] * 600],
              "max_tokens": [0, -5, 1.5, "10", True, 10**6], "n": [0, -1, 17, "2", 2.5, False],
              "temperature": [-0.1, 2.5, "hot", None, [1]], "top_p": [0, 1.5, -1, "1"],
              "stop": [5, [1, 2], ["a"] * 5, ["x" * 300]], "seed": ["s", 1.5, 2**70],
              "stream": ["yes", 1], "stream_options": ["x", {"include_usage": "yes"}],
              "logprobs": [True], "tools": [[{"type": "function"}]], "presence_penalty": [1.0],
              "response_format": [{"type": "json_object"}], "logit_bias": [{"5": 10}]}
    for name, values in fields.items():
        for v in values:
            body = dict(VALID, **{name: v})
            if v is None and name in ("model", "messages"):
                body.pop(name)
            out.append(("/v1/chat/completions", json.dumps(body).encode()))
    invalid = {"model": [None, 5, [], {}, True], "max_tokens": [-1, 0, "5", 1.5, True, [], 10**30],
               "n": [0, "1", 1.0, None, {}, 10**30], "temperature": [-1, 3, "0", [], {}],
               "top_p": [0, 2, "1", True], "seed": ["1", 1.5, [], 10**30], "stream": ["no", 0, []]}
    for _ in range(40):  # random combinations of 1-3 invalid values
        body = dict(VALID)
        for name in rng.sample(sorted(invalid), rng.randint(1, 3)):
            body[name] = rng.choice(invalid[name])
        if rng.random() < 0.3:
            body["messages"] = [{"role": rng.choice(["user", "bot", 7]), "content": rng.choice([None, 3, [{}], {}])}]
        out.append(("/v1/chat/completions", json.dumps(body).encode()))
    completions = [{"model": MODEL_NAME, "prompt": p} for p in ([], [[]], [10**9], [-1], [[1, 2], "a"], 5, None)]
    completions += [{"model": MODEL_NAME, "prompt": "x", "echo": True}, {"model": MODEL_NAME, "prompt": "x", "suffix": "y"},
                    {"model": MODEL_NAME, "prompt": ["x"] * 100}, {"model": MODEL_NAME, "prompt": "x " * 4000}]
    out += [("/v1/completions", json.dumps(b).encode()) for b in completions]
    return out


def test_fuzzed_malformed_requests_are_all_4xx_and_the_server_stays_up(server, client):
    rng = random.Random(0)
    cases = _fuzz_bodies(rng)
    assert len(cases) >= 100
    for path, body in cases:
        status, raw = _raw(server, "POST", path, body)
        assert 400 <= status < 500, (status, body[:200], raw[:300])
        assert raw.startswith(b"{"), (status, body[:200], raw[:300])
        err = json.loads(raw)["error"]
        assert err["message"] and err["type"] and set(err) == {"message", "type", "param", "code"}, err
    checks = [("GET", "/v1/chat/completions", None, {}, 405), ("PUT", "/v1/models", b"{}", {}, 405),
              ("GET", "/v1/nothing", None, {}, 404),
              ("POST", "/v1/chat/completions", b"x" * (1024 * 1024 + 10), {}, 413),
              ("POST", "/v1/chat/completions", json.dumps(VALID).encode(), {"Authorization": "Bearer nope"}, 401),
              ("POST", "/v1/chat/completions", json.dumps(VALID).encode(), {"Authorization": "Basic " + API_KEY}, 401)]
    for method, path, body, headers, expected in checks:
        status, raw = _raw(server, method, path, body, headers)
        assert status == expected and "error" in json.loads(raw), (method, path, status, raw[:200])
    assert _raw(server, "POST", "/v1/chat/completions", json.dumps(dict(VALID, max_tokens=2000)).encode())[0] == 400
    status, raw = _raw(server, "POST", "/v1/chat/completions", b"{}", {"Content-Length": "x1"})
    assert status == 400  # bad framing: uvicorn itself answers (plain text) before the app sees it
    with __import__("socket").create_connection(server.url.removeprefix("http://").split(":")) as s:
        s.sendall(b"GARBAGE / HTTP/9.9\r\n\r\n")  # not HTTP at all: the connection is refused, the server lives on
        s.recv(1000)
    assert server.health()["status"] == "ok" and server.health()["requests"] == 0
    r = client.chat.completions.create(model=MODEL_NAME, messages=ask("What is 2+3?"), temperature=0, max_tokens=60)
    assert r.choices[0].message.content == "5"


def _wait_idle(server, timeout: float = 10.0) -> dict:
    """Health once no request is open and the engine (its own process: it reports after the abort reached it)
    holds no cache block for one."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        h = server.health()
        held = h.get("cache", {}).get("extra", {}).get("referenced_blocks", 0)
        if h["requests"] == 0 and h["pending_samples"] == 0 and held == 0:
            return h
        time.sleep(0.05)
    raise AssertionError(f"requests still open: {server.health()}")


def test_disconnect_cancels_the_request(server, client):
    before = server.health()["steps"]
    stream = client.chat.completions.create(model=MODEL_NAME, messages=ask("write at length"), max_tokens=900,
                                            extra_body={"ignore_eos": True}, stream=True)
    got = 0
    for _ in stream:
        got += 1
        if got == 5:
            break
    h = server.health()
    assert h["requests"] == 1 and h["cache"]["extra"]["referenced_blocks"] >= 1  # its prompt's cached blocks
    stream.close()  # the client goes away mid-stream
    h = _wait_idle(server)
    assert h["steps"] - before < 600, "the engine kept decoding a request whose client had left"
    assert h["cache"]["extra"]["referenced_blocks"] == 0  # released (kept, unreferenced, for later hits)
    before = h["steps"]  # a non-streamed request whose client leaves is aborted too
    conn = http.client.HTTPConnection(server.url.removeprefix("http://"), timeout=30)
    body = json.dumps({**VALID, "max_tokens": 900, "ignore_eos": True, "messages": ask("and again")})
    conn.request("POST", "/v1/chat/completions", body, {"Authorization": f"Bearer {API_KEY}"})
    deadline = time.monotonic() + 10
    while server.health()["requests"] == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    conn.close()
    h = _wait_idle(server)
    assert h["steps"] - before < 600, "the engine kept decoding a non-streamed request whose client had left"


def test_queue_full_is_429_not_unbounded(server, client):
    streams = [client.chat.completions.create(model=MODEL_NAME, messages=ask(f"long {i}"), n=16, max_tokens=900,
                                              extra_body={"ignore_eos": True}, stream=True) for i in range(4)]
    try:
        for s in streams:
            next(iter(s))  # all 64 samples admitted (32 running + 32 waiting)
        with pytest.raises(openai.RateLimitError) as e:
            client.chat.completions.create(model=MODEL_NAME, messages=ask("one more"), max_tokens=4)
        assert e.value.body["code"] == "queue_full" and "64" in e.value.body["message"]
    finally:
        for s in streams:
            s.close()
    _wait_idle(server)
    assert client.chat.completions.create(model=MODEL_NAME, messages=ask("What is 2+3?"), temperature=0,
                                          max_tokens=60).choices[0].message.content == "5"


def test_chat_page_in_a_real_browser(server, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        if os.environ.get("R1KIT_REQUIRE_BROWSER") == "1":
            pytest.fail("R1KIT_REQUIRE_BROWSER=1 but chromium is not installed (.ci/run installs it)")
        pytest.skip("chromium is not installed (apt-get install chromium; .ci/run does it)")
    browser = Browser(chromium, server.url + "/", tmp_path / "profile")
    try:
        browser.wait_for("document.readyState === 'complete' && typeof loadModel === 'function'")
        browser.js(f"$('api_key').value = {json.dumps(API_KEY)}; $('temperature').value = '0'; loadModel()")
        browser.wait_for(f"$('model').textContent.startsWith({json.dumps(MODEL_NAME)})")
        for i, q in enumerate(["What is 2+3?", "What is 4+4?"]):  # two turns: the history goes back to the server
            browser.js(f"$('input').value = {json.dumps(q)}; $('form').requestSubmit()")
            browser.wait_for(f"document.querySelectorAll('.msg.assistant[data-done]').length === {i + 1}")
            reply = browser.js(f"""(() => {{ const m = document.querySelectorAll('.msg.assistant')[{i}];
                return {{answer: m.querySelector('.answer').textContent, thought: m.querySelector('.thought').textContent,
                         shown: !m.querySelector('details').hidden, error: !!m.querySelector('.error'),
                         meta: m.querySelector('.meta').textContent}}; }})()""")
            assert reply == {"answer": QA[q][1], "thought": QA[q][0], "shown": True, "error": False,
                             "meta": reply["meta"]}, reply
            assert "reasoning" in reply["meta"]
        browser.js("document.querySelectorAll('details.reasoning').forEach(d => d.open = true)")
        shot = Path(os.environ.get("R1KIT_SCREENSHOT", tmp_path / "page.png"))
        browser.screenshot(shot)
        assert shot.stat().st_size > 10_000
    finally:
        browser.close()


def test_sigterm_ends_open_streams_and_exits_cleanly(server, client):
    """Runs last: it stops the module's server (started with --shutdown-grace 0)."""
    stream = client.chat.completions.create(model=MODEL_NAME, messages=ask("go on"), max_tokens=900,
                                            extra_body={"ignore_eos": True}, stream=True)
    it = iter(stream)
    next(it)
    t0 = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    with pytest.raises(openai.APIError) as e:  # the server ends the open stream with an error event
        for _ in it:
            pass
    assert "shutting down" in str(e.value)
    assert server.proc.wait(30) == 0
    assert time.monotonic() - t0 < 30
    assert "Traceback" not in server.log.read_text(), server.log_text()
