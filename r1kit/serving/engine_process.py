"""The server's engine in a process of its own (the default for `r1kit serve --backend local`).

Why: the engine is one Python thread issuing hundreds of small torch ops per decode step, and every op
releases and re-takes the GIL. In the server's own process the asyncio thread (HTTP, SSE, detokenising)
holds the GIL for a fifth of the time at 64 streams, and each time it does the engine waits: a wave of 64 × 64
tokens took 1.43 s of engine steps in the server against 1.05 s for the same engine alone
(`benchmarks/profile_serve.py`). In its own process the engine steps at its own speed, as vLLM's engine core does.

The engine is the same object (`Policy.make_engine`, the one engine); only where it runs changes. The child
loads the model itself (the server process holds only the tokenizer the child sends back) and speaks a small
protocol over a duplex pipe, driven on the server side by r1kit.serving.engine_loop.EngineLoop:

    server -> engine: ("add", request_id, prompt_ids, SamplingParams) | ("abort", request_id, index | None) | ("stop",)
    engine -> server: ("ready", info) | ("error", message)          once, at start
                      ("out", [output tuples], cache_stats)         after every step
                      ("stats", cache_stats)                        after commands that left it idle
                      ("refused", request_id, message)              add_request raised
                      ("failed", message)                           step() raised (the server aborts every request)

The child ignores SIGINT (a Ctrl-C reaches the whole process group: the server drains, then stops the engine)
and exits when told to stop or when its pipe closes (the server is gone).
"""
from __future__ import annotations

import inspect
import logging
import multiprocessing
import signal
from dataclasses import fields

from r1kit.engine.api import RequestOutput
from r1kit.types import R1KitError

log = logging.getLogger("r1kit.serve")

IDLE_WAIT_S = 0.05
_OUTPUT_FIELDS = [f.name for f in fields(RequestOutput)]


def cache_stats_dict(engine) -> dict | None:
    """The engine's prefix-cache statistics as a plain dict (None when it has no cache_stats)."""
    cache_stats = getattr(engine, "cache_stats", None)
    if cache_stats is None:
        return None
    try:
        cs = cache_stats()
        return dict(vars(cs)) if hasattr(cs, "__dict__") else dict(cs)
    except Exception as e:  # statistics must never take the engine or the health check down
        return {"error": str(e)}


def takes_sample_index(engine) -> bool:
    """Whether `engine.abort` can stop one sample (`abort(request_id, index)`; vLLM's stops whole requests)."""
    try:
        return "index" in inspect.signature(engine.abort).parameters
    except (TypeError, ValueError, AttributeError):
        return False


def _child_main(conn, opts) -> None:
    """The engine process: build the engine as the in-process server would, then serve the pipe."""
    from r1kit.serving.server import build_engine

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        engine, tokenizer, context = build_engine(opts)
        per_sample_abort = takes_sample_index(engine)
    except BaseException as e:  # an R1KitError names the bad folder; anything else, its type
        message = str(e) if isinstance(e, R1KitError) else f"{type(e).__name__}: {e}"
        try:
            conn.send(("error", message))
        except OSError:  # the server is gone (killed while the model loaded)
            pass
        return
    try:
        conn.send(("ready", {"tokenizer": tokenizer, "context": context, "per_sample_abort": per_sample_abort}))
        _serve_pipe(conn, engine)
    except (EOFError, OSError):
        return  # the server is gone


def _serve_pipe(conn, engine) -> None:
    while True:
        busy = engine.has_unfinished()
        if conn.poll(0 if busy else IDLE_WAIT_S):
            while conn.poll(0):
                cmd = conn.recv()
                if cmd[0] == "stop":
                    return
                if cmd[0] == "add":
                    _, rid, ids, params = cmd
                    try:
                        engine.add_request(ids, params, rid)
                    except Exception as e:  # the HTTP layer validates first: a server-side problem
                        log.exception("engine refused request %s", rid)
                        conn.send(("refused", rid, f"{type(e).__name__}: {e}"))
                elif cmd[2] is None:
                    engine.abort(cmd[1])
                else:
                    engine.abort(cmd[1], cmd[2])
            if not engine.has_unfinished():
                conn.send(("stats", cache_stats_dict(engine)))  # aborts may have freed cache blocks
        if not engine.has_unfinished():
            continue
        try:
            outputs = engine.step()
        except Exception as e:
            log.exception("engine step failed")
            conn.send(("failed", f"{type(e).__name__}: {e}"))
            conn.poll(1.0)  # the server answers with an abort of every open request: take them before stepping again
            continue
        conn.send(("out", [tuple(getattr(o, n) for n in _OUTPUT_FIELDS) for o in outputs], cache_stats_dict(engine)))


def outputs_from_wire(rows: list[tuple]) -> list[RequestOutput]:
    return [RequestOutput(*row) for row in rows]


class EngineProcess:
    """A started engine process: `conn` (the server's end of the pipe), `info` (its "ready" message: tokenizer,
    context, per_sample_abort). Construction blocks until the engine is ready, or raises R1KitError with the
    child's own message (a bad model folder reads as it does in one process)."""

    def __init__(self, opts):
        ctx = multiprocessing.get_context("spawn")  # no fork of a threaded process, and safe with CUDA
        self.conn, child_conn = ctx.Pipe(duplex=True)
        self.proc = ctx.Process(target=_child_main, args=(child_conn, opts), name="r1kit-engine", daemon=True)
        self.proc.start()
        child_conn.close()
        while not self.conn.poll(1.0):
            if not self.proc.is_alive():
                raise R1KitError(f"the engine process exited with status {self.proc.exitcode} before it was ready "
                                 "(see its messages above)")
        try:
            kind, payload = self.conn.recv()
        except EOFError:
            self.proc.join(5)
            raise R1KitError(f"the engine process exited with status {self.proc.exitcode} before it was ready") from None
        if kind == "error":
            self.proc.join(5)
            raise R1KitError(payload)
        self.info = payload

    @property
    def pid(self) -> int:
        return self.proc.pid

    def send(self, cmd: tuple) -> None:
        self.conn.send(cmd)

    def close(self, timeout: float = 10.0) -> None:
        """Ask the engine to stop, then make sure it has (terminate after `timeout`). The pipe stays open: the
        server's reader thread sees its end, then the caller closes `conn`."""
        try:
            self.conn.send(("stop",))
        except (OSError, ValueError):
            pass
        self.proc.join(timeout)
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(5)
