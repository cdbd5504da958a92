"""`r1kit serve`: an OpenAI/DeepSeek-compatible HTTP server over r1kit's engine, and a chat page.

    r1kit serve --model runs/zero-tiny/final [--host 127.0.0.1] [--port 8000] [--api-key KEY]
                [--max-num-seqs N] [--cache-mb M]

Endpoints: GET /health, GET /v1/models, POST /v1/chat/completions (streamed or not), POST /v1/completions,
GET / (the chat page). Replies split the model's output at the template's reasoning/answer boundary into
`reasoning_content` and `content` (r1kit/serving/reasoning.py), as DeepSeek's API does; a `reasoning_content`
sent back in an assistant message is left out of the context, as DeepSeek-R1's API does. Usage carries
DeepSeek's prompt-cache fields, fed by the engine's prefix cache.

Robustness: every client error is an OpenAI-shaped 4xx (protocol.py); bodies are size-limited before they
are parsed (413); the number of unfinished samples is bounded (429); a client that disconnects has its
request aborted (its cache blocks freed); SIGTERM stops accepting requests, lets open ones finish for
`shutdown_grace_s`, then ends them and exits.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
from dataclasses import dataclass, field
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from r1kit.engine.api import SamplingParams
from r1kit.serving.engine_loop import EngineClosed, EngineLoop, QueueFull
from r1kit.serving.protocol import (APIError, ChatCompletionRequest, CompletionRequest, Limits,
                                    check_token_budget, new_id, now, parse_request, usage)
from r1kit.serving.reasoning import IncrementalDetokenizer, ReasoningSplitter, SampleText, SplitDelta, StopMatcher

log = logging.getLogger("r1kit.serve")
FINGERPRINT = "r1kit-0.1.0"


@dataclass
class ServerState:
    """Everything a handler needs, built once by `build_app`."""

    loop: EngineLoop
    tokenizer: object
    model_name: str
    context: int  # the model's maximum positions (prompt + completion)
    limits: Limits = field(default_factory=Limits)
    api_key: str | None = None
    default_system: str | None = None  # prepended when a chat has no system message
    stream_interval: int = 0  # tokens per streamed chunk and choice; 0 = auto (see `Generation.interval`)
    created: int = field(default_factory=now)


# ---- prompts ----

def render_chat(state: ServerState, req: ChatCompletionRequest) -> tuple[list[int], bool]:
    """Messages -> prompt ids through the model's chat template, and whether the reply starts inside the
    reasoning (the template's generation prompt opens <think>). `reasoning_content` is never rendered."""
    msgs = []
    for i, m in enumerate(req.messages):
        msgs.append({"role": "system" if m.role == "developer" else m.role, "content": m.text(f"messages[{i}]")})
    if state.default_system and not any(m["role"] == "system" for m in msgs):
        msgs.insert(0, {"role": "system", "content": state.default_system})
    tok = state.tokenizer
    try:
        text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    except Exception as e:  # jinja's raise_exception (e.g. roles must alternate), a missing template
        raise APIError(400, f"messages: the model's chat template rejects them: {e}", "messages",
                       "invalid_messages") from None
    return tok(text, add_special_tokens=False).input_ids, text.rstrip().endswith("<think>")


def completion_prompts(state: ServerState, req: CompletionRequest) -> list[list[int]]:
    p = req.prompt
    if isinstance(p, str):
        prompts = [state.tokenizer(p).input_ids]
    elif isinstance(p[0], int):
        prompts = [list(p)]
    elif isinstance(p[0], str):
        prompts = [state.tokenizer(x).input_ids for x in p]
    else:
        prompts = [list(x) for x in p]
    vocab = len(state.tokenizer)
    for i, ids in enumerate(prompts):
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise APIError(400, f"prompt[{i}]: token id {bad[0]} is outside the vocabulary [0, {vocab})",
                           "prompt", "invalid_value")
    return prompts


# ---- one HTTP call's generation: one engine request per prompt, all feeding one queue ----

@dataclass
class _Group:
    base: int  # choice index of its sample 0
    samples: list[SampleText]
    prompt_tokens: int
    cached: int = 0


AUTO_INTERVAL_SAMPLES = 16  # auto stream interval: open samples // 16 tokens per chunk (at least 1)
MAX_AUTO_INTERVAL = 8


class Generation:
    """The engine requests of one HTTP call; `updates()` yields (choice index, SplitDelta, finish) lists."""

    def __init__(self, state: ServerState, prompts: list[list[int]], params: SamplingParams,
                 stops: list[str], split: list[bool] | None):
        self.state, self.queue = state, asyncio.Queue()
        self.groups: dict[str, _Group] = {}
        self.finish: dict[int, str] = {}
        self._held: dict[int, list] = {}  # choice -> [SplitDelta, finish, tokens] not yet sent
        self._sent: set[int] = set()  # choices whose first text went out
        self.n_choices = len(prompts) * params.n
        try:
            for p, ids in enumerate(prompts):
                rid = new_id("req")
                samples = [SampleText(IncrementalDetokenizer(state.tokenizer, ids), StopMatcher(stops),
                                      ReasoningSplitter(split[p]) if split is not None else None)
                           for _ in range(params.n)]
                self.groups[rid] = _Group(p * params.n, samples, len(ids))
                state.loop.submit(ids, params, rid, self.queue)
        except QueueFull as e:
            self.close()
            raise APIError(429, str(e), code="queue_full") from None
        except EngineClosed as e:
            self.close()
            code = "engine_unavailable" if state.loop.failure is not None else "shutting_down"
            raise APIError(503, str(e), code=code) from None

    def interval(self) -> int:
        """Tokens per chunk of a streamed choice. --stream-interval k > 0 fixes it; auto (0) is open
        samples on the server // 16, at least 1 and at most 8 (1 below 32 open samples, 4 at 64). Each chunk
        costs the server one JSON event and one write, and the client one parse; under load fewer, larger
        chunks leave more CPU to decoding (vLLM's --stream-interval makes the same trade)."""
        k = self.state.stream_interval
        if k > 0:
            return k
        return max(1, min(MAX_AUTO_INTERVAL, self.state.loop.open_samples() // AUTO_INTERVAL_SAMPLES))

    async def updates(self):
        """Yield, per wake-up, {choice index: (SplitDelta, finish_reason or None)} in first-seen order.

        Everything queued since the last wake-up is merged (one engine step when the server keeps up,
        several when it is loaded): fewer, larger chunks instead of falling further behind. A choice's text
        is also held back until `interval()` tokens of it are pending, except its first text (time to first
        token) and its end, which go out at once."""
        try:
            while len(self.finish) < self.n_choices:
                items = [await self.queue.get()]
                while not self.queue.empty():
                    items.append(self.queue.get_nowait())
                held = self._held
                for item in items:
                    if isinstance(item, BaseException):
                        raise item
                    for out in item:
                        u = self._apply(out)
                        if u is not None:
                            idx, d, finish = u
                            prev = held.get(idx)
                            if prev is None:
                                held[idx] = [d, finish, len(out.token_ids)]
                            else:
                                prev[0] = SplitDelta(prev[0].reasoning + d.reasoning, prev[0].content + d.content)
                                prev[1] = finish or prev[1]
                                prev[2] += len(out.token_ids)
                k = self.interval() if held else 1
                ready: dict[int, tuple[SplitDelta, str | None]] = {}
                for idx in list(held):
                    d, finish, n = held[idx]
                    first = idx not in self._sent and (d.reasoning or d.content)
                    if finish or n >= k or first:
                        ready[idx] = (d, finish)
                        del held[idx]
                        if first:
                            self._sent.add(idx)
                if ready:
                    yield ready
        finally:
            self.close()

    def _apply(self, out):
        g = self.groups.get(out.request_id)
        if g is None:
            return None
        g.cached = max(g.cached, out.cached_prompt_tokens)
        idx = g.base + out.index
        if idx in self.finish:
            return None  # this sample already stopped on a stop string
        sample = g.samples[out.index]
        delta = sample.push(out.token_ids, out.finished)
        reason = None
        if sample.stopped:
            reason = "stop"
        elif out.finished:
            reason = "length" if out.finish_reason == "length" else "stop"
        if reason:
            self.finish[idx] = reason
            if sample.stopped and not out.finished:  # a stop string: free its slot, its siblings run on
                self.state.loop.abort(out.request_id, out.index)  # (no-op if the engine finished it already)
        return idx, delta, reason

    def close(self) -> None:
        """Abort whatever is unfinished (a disconnect, an error, stop strings): frees engine slots and cache."""
        for rid in self.groups:
            self.state.loop.abort(rid)

    def choice_samples(self):
        for g in self.groups.values():
            for i, s in enumerate(g.samples):
                yield g.base + i, s

    def usage(self, chat: bool) -> dict:
        prompt = sum(g.prompt_tokens for g in self.groups.values())
        cached = sum(min(g.cached, g.prompt_tokens) for g in self.groups.values())
        completion = sum(s.num_tokens for _, s in self.choice_samples())
        reasoning = sum(s.reasoning_tokens() for _, s in self.choice_samples()) if chat else None
        return usage(prompt, completion, cached, reasoning)


# ---- handlers ----

def _check_auth(state: ServerState, request: Request) -> None:
    if state.api_key is None:
        return
    got = request.headers.get("authorization", "")
    scheme, _, token = got.partition(" ")
    ok = hmac.compare_digest(token.strip().encode(), state.api_key.encode()) and scheme.lower() == "bearer"
    if not ok:
        raise APIError(401, "invalid or missing API key: send 'Authorization: Bearer <key>'", code="invalid_api_key")


def _check_model(state: ServerState, model: str) -> None:
    if model != state.model_name:
        raise APIError(404, f"the model {model!r} does not exist; this server serves {state.model_name!r}",
                       "model", "model_not_found")


def _params(req, max_tokens: int) -> SamplingParams:
    return SamplingParams(n=req.n, temperature=req.temperature, top_p=req.top_p, max_tokens=max_tokens,
                          seed=req.seed, ignore_eos=req.ignore_eos)


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


async def _collect(gen: Generation, request: Request) -> bool:
    """Run a non-streamed generation to its end (True); abort it if the client goes away meanwhile (False;
    the ASGI server reports that as an http.disconnect message, which a watcher task waits for)."""
    async def consume():
        async for _ in gen.updates():
            pass

    async def disconnected():
        while (await request.receive())["type"] != "http.disconnect":
            pass

    task, watcher = asyncio.ensure_future(consume()), asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if not task.done():
            task.cancel()
            await asyncio.wait({task})
            return False
        task.result()  # re-raises what the generation raised (EngineClosed)
        return True
    finally:
        watcher.cancel()
        gen.close()


async def chat_completions(request: Request) -> Response:
    state: ServerState = request.app.state.r1kit
    _check_auth(state, request)
    req = parse_request(ChatCompletionRequest, await request.body(), state.limits)
    _check_model(state, req.model)
    ids, starts_in_reasoning = render_chat(state, req)
    param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    max_tokens = check_token_budget(len(ids), req.max_completion_tokens or req.max_tokens, state.context,
                                    state.limits.max_tokens, param)
    gen = Generation(state, [ids], _params(req, max_tokens), req.stop or [], [starts_in_reasoning])
    rid, created = new_id("chatcmpl"), now()
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return _EventStream(_chat_events(state, gen, rid, created, include_usage), gen)
    try:
        if not await _collect(gen, request):
            return Response(status_code=499)  # the client left; nobody reads this
    except EngineClosed as e:
        raise APIError(503, str(e), code="engine_unavailable") from None
    choices = []
    for idx, s in gen.choice_samples():
        reasoning = "".join(s.reasoning) if s.splitter is not None and s.splitter.had_reasoning else None
        choices.append({"index": idx, "message": {"role": "assistant", "content": "".join(s.content),
                                                  "reasoning_content": reasoning},
                        "logprobs": None, "finish_reason": gen.finish.get(idx, "stop")})
    return JSONResponse({"id": rid, "object": "chat.completion", "created": created, "model": state.model_name,
                         "system_fingerprint": FINGERPRINT, "choices": choices, "usage": gen.usage(chat=True)})


class _EventStream(StreamingResponse):
    """An SSE response that aborts its generation however the response ends, even when the client left
    before the first event (then the event generator never ran, and its own `finally` never will)."""

    def __init__(self, events, gen: Generation):
        super().__init__(events, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.gen = gen

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.gen.close()


async def _chat_events(state: ServerState, gen: Generation, rid: str, created: int, include_usage: bool):
    head = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": state.model_name,
            "system_fingerprint": FINGERPRINT}

    def chunk(idx, delta, finish=None):
        c = {**head, "choices": [{"index": idx, "delta": delta, "logprobs": None, "finish_reason": finish}]}
        if include_usage:
            c["usage"] = None
        return _sse(c)

    try:
        for idx in range(gen.n_choices):
            yield chunk(idx, {"role": "assistant", "content": ""})
        async for updates in gen.updates():
            events = []  # one write per wake-up
            for idx, (d, finish) in updates.items():
                if d.reasoning:
                    events.append(chunk(idx, {"reasoning_content": d.reasoning}, None if d.content else finish))
                if d.content:
                    events.append(chunk(idx, {"content": d.content}, finish))
                if finish and not (d.reasoning or d.content):
                    events.append(chunk(idx, {}, finish))
            if events:
                yield "".join(events)
        if include_usage:
            yield _sse({**head, "choices": [], "usage": gen.usage(chat=True)})
        yield "data: [DONE]\n\n"
    except EngineClosed as e:
        yield _sse(APIError(503, str(e), code="engine_unavailable").body())


async def completions(request: Request) -> Response:
    state: ServerState = request.app.state.r1kit
    _check_auth(state, request)
    req = parse_request(CompletionRequest, await request.body(), state.limits)
    _check_model(state, req.model)
    prompts = completion_prompts(state, req)
    max_tokens = min(check_token_budget(len(p), req.max_tokens, state.context, state.limits.max_tokens,
                                        prompt_param="prompt") for p in prompts)
    if req.max_tokens is None:
        max_tokens = min(max_tokens, 16)  # OpenAI's default for /v1/completions
    gen = Generation(state, prompts, _params(req, max_tokens), req.stop or [], None)
    rid, created = new_id("cmpl"), now()
    head = {"id": rid, "object": "text_completion", "created": created, "model": state.model_name,
            "system_fingerprint": FINGERPRINT}
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return _EventStream(_completion_events(gen, head, include_usage), gen)
    try:
        if not await _collect(gen, request):
            return Response(status_code=499)  # the client left; nobody reads this
    except EngineClosed as e:
        raise APIError(503, str(e), code="engine_unavailable") from None
    choices = [{"index": idx, "text": "".join(s.content), "logprobs": None, "finish_reason": gen.finish.get(idx, "stop")}
               for idx, s in gen.choice_samples()]
    return JSONResponse({**head, "choices": choices, "usage": gen.usage(chat=False)})


async def _completion_events(gen: Generation, head: dict, include_usage: bool):
    try:
        async for updates in gen.updates():
            events = []
            for idx, (d, finish) in updates.items():
                if d.content or finish:
                    c = {**head, "choices": [{"index": idx, "text": d.content, "logprobs": None,
                                              "finish_reason": finish}]}
                    if include_usage:
                        c["usage"] = None
                    events.append(_sse(c))
            if events:
                yield "".join(events)
        if include_usage:
            yield _sse({**head, "choices": [], "usage": gen.usage(chat=False)})
        yield "data: [DONE]\n\n"
    except EngineClosed as e:
        yield _sse(APIError(503, str(e), code="engine_unavailable").body())


def _model_card(state: ServerState) -> dict:
    return {"id": state.model_name, "object": "model", "created": state.created, "owned_by": "r1kit",
            "max_model_len": state.context}


async def list_models(request: Request) -> Response:
    state: ServerState = request.app.state.r1kit
    _check_auth(state, request)
    return JSONResponse({"object": "list", "data": [_model_card(state)]})


async def get_model(request: Request) -> Response:
    state: ServerState = request.app.state.r1kit
    _check_auth(state, request)
    _check_model(state, request.path_params["model"])
    return JSONResponse(_model_card(state))


async def health(request: Request) -> Response:
    state: ServerState = request.app.state.r1kit
    if state.loop.failure is not None:  # the engine process is gone: the server cannot answer, say so
        return JSONResponse({"status": "error", "error": state.loop.failure, "model": state.model_name,
                             **state.loop.stats()}, status_code=503)
    status = "draining" if state.loop.draining else "ok"
    return JSONResponse({"status": status, "model": state.model_name, **state.loop.stats()})


async def page(request: Request) -> Response:
    return HTMLResponse((resources.files("r1kit") / "serving" / "page.html").read_text(encoding="utf-8"))


# ---- errors, body limit, the app ----

async def _api_error(request: Request, exc: APIError) -> Response:
    headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
    return JSONResponse(exc.body(), status_code=exc.status, headers=headers)


async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
    msg = {404: f"no such endpoint: {request.method} {request.url.path}",
           405: f"method {request.method} is not allowed on {request.url.path}"}.get(exc.status_code, str(exc.detail))
    return JSONResponse(APIError(exc.status_code, msg).body(), status_code=exc.status_code,
                        headers=getattr(exc, "headers", None))


async def _validation(request: Request, exc: RequestValidationError) -> Response:
    return JSONResponse(APIError(400, f"invalid request: {exc.errors()[:1]}").body(), status_code=400)


async def _internal(request: Request, exc: Exception) -> Response:
    log.exception("internal error on %s %s", request.method, request.url.path, exc_info=exc)
    return JSONResponse(APIError(500, f"internal server error ({type(exc).__name__}); the server is still up").body(),
                        status_code=500)


class BodyLimit:
    """ASGI middleware: refuse bodies over `max_bytes` (413) before anything parses them.

    The body is read here (by Content-Length when declared, else counted chunk by chunk) and replayed to the
    app; later receive() calls go to the server, so disconnects are still seen."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None:
            if not declared.isdigit():
                return await _send_error(send, APIError(400, "invalid Content-Length header"))
            if int(declared) > self.max_bytes:
                return await _send_error(send, self._too_large(int(declared)))
        chunks, size = [], 0
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            size += len(msg.get("body", b""))
            if size > self.max_bytes:
                return await _send_error(send, self._too_large(size))
            chunks.append(msg.get("body", b""))
            if not msg.get("more_body"):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    def _too_large(self, size: int) -> APIError:
        return APIError(413, f"the request body ({size} bytes or more) is over this server's limit of "
                             f"{self.max_bytes} bytes", code="request_too_large")


async def _send_error(send, err: APIError) -> None:
    body = json.dumps(err.body()).encode()
    await send({"type": "http.response.start", "status": err.status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


def build_app(state: ServerState) -> FastAPI:
    """The FastAPI app over a ServerState; the engine thread runs for the app's lifespan."""
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app):
        state.loop.start()
        try:
            yield
        finally:
            await asyncio.get_running_loop().run_in_executor(None, state.loop.stop)

    app = FastAPI(title="r1kit serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.r1kit = state
    app.add_api_route("/health", health, methods=["GET"])
    app.add_api_route("/v1/models", list_models, methods=["GET"])
    app.add_api_route("/v1/models/{model:path}", get_model, methods=["GET"])
    app.add_api_route("/v1/chat/completions", chat_completions, methods=["POST"])
    app.add_api_route("/v1/completions", completions, methods=["POST"])
    app.add_api_route("/", page, methods=["GET"])
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation)
    app.add_exception_handler(Exception, _internal)
    app.add_middleware(BodyLimit, max_bytes=state.limits.max_body_bytes)
    return app
