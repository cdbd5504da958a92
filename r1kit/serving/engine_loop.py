"""The bridge between asyncio request handlers and the (synchronous, single-threaded) engine.

The engine runs in one of two places, with the same bookkeeping here:
- its own process (r1kit.serving.engine_process.EngineProcess, the default for the local engine): handlers
  send commands down its pipe, and a reader thread takes each step's outputs off it;
- a thread of the server process (an engine object; the vllm backend, `--engine-in-server`, and tests): the
  thread takes new requests and aborts from a thread-safe command list and calls `engine.step()` while
  anything is unfinished.
Either way each step's `RequestOutput`s reach the requests' asyncio queues through one
`loop.call_soon_threadsafe` per step. Handlers never touch the engine.

Back-pressure: at most `max_pending` samples (a request with n = 4 counts 4) may be admitted and
unfinished at once: running ones (the engine's `max_num_seqs`) plus those waiting for a slot. Past that,
`submit` raises `QueueFull` (answered 429) instead of queueing without bound.

Cancellation: `abort(request_id)` (a client disconnected, or every sample hit a stop string) reaches the
engine before its next step, which frees the request's slots and cache blocks; the request's queue gets
no more outputs. `abort(request_id, index)` stops one sample (it hit a stop string while its siblings run
on): its slot is free at the next step and it no longer counts against `max_pending`. (An engine whose
`abort` takes no `index` lets that sample run to its end; the server ignores its further output.)

Shutdown: `stop()` ends the thread after its current step; every open request's queue receives an
`EngineClosed` error so that handlers finish their responses instead of waiting forever.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass, field

from r1kit.engine.api import RequestOutput, SamplingParams
from r1kit.serving.engine_process import EngineProcess, cache_stats_dict, outputs_from_wire, takes_sample_index

log = logging.getLogger("r1kit.serve")


class QueueFull(Exception):
    """The server holds as many unfinished samples as it may: the client should retry later (429)."""


class EngineClosed(Exception):
    """The server is shutting down, or the engine failed: the request cannot complete."""


@dataclass
class RequestStream:
    """What a handler holds for one engine request: its id, its queue of output lists, its sample count."""

    request_id: str
    n: int
    queue: asyncio.Queue
    prompt_tokens: int
    finished: set = field(default_factory=set)  # sample indices finished (by the engine, or aborted)

    async def next(self) -> list[RequestOutput]:
        item = await self.queue.get()
        if isinstance(item, BaseException):
            raise item
        return item


def _deliver(deliveries: list[tuple[asyncio.Queue, list[RequestOutput]]]) -> None:
    for queue, outs in deliveries:
        queue.put_nowait(outs)


class EngineLoop:
    """Owns the engine thread. Create inside a running event loop (the app's lifespan), then `start()`."""

    def __init__(self, engine, max_pending: int, idle_wait_s: float = 0.05):
        self.engine = engine
        self.max_pending = max_pending
        self.idle_wait_s = idle_wait_s
        self.loop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._commands: list[tuple] = []
        self._streams: dict[str, RequestStream] = {}  # engine-side registry (engine thread + lock)
        self._pending = 0  # admitted, unfinished samples
        self._stop = False
        self._thread: threading.Thread | None = None
        self.steps = 0
        self.draining = False  # set on SIGTERM: no new requests, open ones may finish
        self.remote = isinstance(engine, EngineProcess)
        self._send_lock = threading.Lock()
        self._remote_cache: dict | None = None  # the engine process's latest cache statistics
        self.failure: str | None = None  # why the engine process ended, if it did on its own
        self._per_sample_abort = engine.info["per_sample_abort"] if self.remote else takes_sample_index(engine)

    # ---- called from the event loop ----
    def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._read if self.remote else self._run, name="r1kit-engine",
                                        daemon=True)
        self._thread.start()

    def submit(self, prompt_ids: list[int], params: SamplingParams, request_id: str,
               queue: asyncio.Queue | None = None) -> RequestStream:
        """Admit one request (raises QueueFull or EngineClosed); its outputs arrive, as lists of
        RequestOutput (or an EngineClosed error), on `queue` (a new one by default: several requests of one
        HTTP call may share one)."""
        stream = RequestStream(request_id, params.n, queue if queue is not None else asyncio.Queue(), len(prompt_ids))
        with self._lock:
            if self.failure is not None:
                raise EngineClosed(self.failure)
            if self._stop or self.draining:
                raise EngineClosed("the server is shutting down")
            if self._pending + params.n > self.max_pending:
                raise QueueFull(f"the server is at its limit of {self.max_pending} unfinished samples "
                                f"({self._pending} admitted); retry later")
            self._pending += params.n
            self._streams[request_id] = stream
        self._command(("add", request_id, list(prompt_ids), params))
        return stream

    def _command(self, cmd: tuple) -> None:
        """Pass a command to the engine: down the engine process's pipe, or onto the engine thread's list."""
        if self.remote:
            try:
                with self._send_lock:
                    self.engine.send(cmd)
            except (OSError, ValueError):  # the process is gone: the reader thread fails the open requests
                pass
            return
        with self._lock:
            self._commands.append(cmd)
        self._wake.set()

    def abort(self, request_id: str, index: int | None = None) -> None:
        """Cancel a request, or only its sample `index` (idempotent; a finished one is left alone)."""
        with self._lock:
            stream = self._streams.get(request_id)
            if stream is None or (index is not None and index in stream.finished):
                return
            if index is not None:
                if not self._per_sample_abort:
                    return
                self._finished(request_id, stream, [index])
                if request_id not in self._streams:  # that was its last sample: abort the request
                    index = None
            if index is None and request_id in self._streams:
                self._finished(request_id, stream, range(stream.n))
        self._command(("abort", request_id, index))

    def _finished(self, rid: str, stream: RequestStream, indices) -> None:
        """Samples `indices` of `rid` are done (call with the lock held): they stop counting as pending."""
        new = set(indices) - stream.finished
        stream.finished |= new
        self._pending -= len(new)
        if len(stream.finished) >= stream.n:
            del self._streams[rid]

    def open_samples(self) -> int:
        """Samples admitted and unfinished (running or waiting for a slot): how loaded the server is."""
        return self._pending

    def stats(self) -> dict:
        with self._lock:
            running = len(self._streams)
            pending = self._pending
        out = {"requests": running, "pending_samples": pending, "max_pending_samples": self.max_pending,
               "steps": self.steps, "engine": "process" if self.remote else "thread"}
        if self.remote:
            out["engine_pid"] = self.engine.pid
            if self._remote_cache is not None:
                out["cache"] = dict(self._remote_cache)
            return out
        cache = cache_stats_dict(self.engine)
        if cache is not None:
            out["cache"] = cache
        return out

    def stop(self, timeout: float = 10.0) -> None:
        with self._lock:
            self._stop = True
        self._wake.set()
        if self.remote:
            self.engine.close(timeout)  # the reader thread then sees the pipe end
        if self._thread is not None:
            self._thread.join(timeout)
        if self.remote:
            self.engine.conn.close()
        self._fail_all(EngineClosed("the server is shutting down"))

    # ---- the reader thread (engine process) ----
    def _read(self) -> None:
        conn = self.engine.conn
        while True:
            try:
                msg = conn.recv()
            except (EOFError, OSError):
                with self._lock:
                    stopping = self._stop
                if not stopping:  # the engine process died (killed, out of memory, crashed)
                    self.engine.proc.join(1.0)
                    self.failure = (f"the engine process ended unexpectedly (exit status {self.engine.proc.exitcode}); "
                                    "restart the server")
                    log.error(self.failure)
                    self._fail_all(EngineClosed(self.failure))
                return
            kind = msg[0]
            if kind == "out":
                self._remote_cache = msg[2]
                self.steps += 1
                self._dispatch(outputs_from_wire(msg[1]))
            elif kind == "stats":
                self._remote_cache = msg[1]
            elif kind == "refused":
                self._fail(msg[1], EngineClosed(f"the engine could not take the request: {msg[2]}"))
            elif kind == "failed":  # an engine bug: fail every open request with a 5xx, keep serving
                with self._lock:
                    rids = list(self._streams)
                for rid in rids:
                    self._command(("abort", rid, None))
                self._fail_all(EngineClosed(f"the engine failed: {msg[1]}"))

    # ---- the engine thread ----
    def _run(self) -> None:
        while True:
            with self._lock:
                if self._stop:
                    return
                commands, self._commands = self._commands, []
                self._wake.clear()
            try:
                self._apply(commands)
                if not self.engine.has_unfinished():
                    self._wake.wait(self.idle_wait_s)
                    continue
                outputs = self.engine.step()
                self.steps += 1
            except Exception as e:  # an engine bug: fail every open request with a 5xx, keep serving
                log.exception("engine step failed")
                self._recover(e)
                continue
            self._dispatch(outputs)

    def _apply(self, commands: list[tuple]) -> None:
        for cmd in commands:
            if cmd[0] == "add":
                _, rid, ids, params = cmd
                with self._lock:
                    live = rid in self._streams
                if live:
                    try:
                        self.engine.add_request(ids, params, rid)
                    except Exception as e:  # the HTTP layer validates first: this is a server-side problem
                        log.exception("engine refused request %s", rid)
                        self._fail(rid, EngineClosed(f"the engine could not take the request: {e}"))
            elif cmd[2] is not None:  # one sample: its stream stays open for its siblings
                self.engine.abort(cmd[1], cmd[2])
            else:
                self.engine.abort(cmd[1])  # (unknown or finished ids are ignored)

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        """Hand a step's outputs to their requests' queues: one event-loop wake-up per step, not per request."""
        by_request: dict[str, list[RequestOutput]] = {}
        for out in outputs:
            by_request.setdefault(out.request_id, []).append(out)
        deliveries = []
        with self._lock:
            for rid, outs in by_request.items():
                stream = self._streams.get(rid)
                if stream is None:
                    continue  # aborted meanwhile
                self._finished(rid, stream, [o.index for o in outs if o.finished])
                deliveries.append((stream.queue, outs))
        if deliveries:
            self.loop.call_soon_threadsafe(_deliver, deliveries)

    def _fail(self, rid: str, error: Exception) -> None:
        with self._lock:
            stream = self._streams.get(rid)
            if stream is not None:
                self._finished(rid, stream, range(stream.n))
        if stream is not None:
            self.loop.call_soon_threadsafe(stream.queue.put_nowait, error)

    def _recover(self, error: Exception) -> None:
        with self._lock:
            rids = list(self._streams)
        for rid in rids:
            try:
                self.engine.abort(rid)
            except Exception:
                pass
        self._fail_all(EngineClosed(f"the engine failed: {type(error).__name__}: {error}"))
        time.sleep(0.01)

    def _fail_all(self, error: Exception) -> None:
        with self._lock:
            streams, self._streams = list(self._streams.values()), {}
            self._pending = 0
        if self.loop is None or self.loop.is_closed():
            return
        for s in streams:
            try:
                self.loop.call_soon_threadsafe(s.queue.put_nowait, error)
            except RuntimeError:  # the loop closed meanwhile
                return
