"""math-verify under a hard time limit, in a small pool of persistent worker processes.

math-verify (HuggingFace) decides whether two LaTeX/plain answers are mathematically equal. Its own
timeouts use `signal.alarm`, which works only in a process's main thread, and adversarial answers
(`\\boxed{9^{9^{9^{9}}}}`, 5,000 open parentheses) stall it for seconds. A reward function must never
hang a trainer, so here every verification runs in a worker process with math-verify's timeouts off;
the caller waits on a pipe for at most `timeout_s`, and a worker that overruns is killed (SIGKILL) and
replaced. The caller gets `VerifyResult(False, "timeout")`, from any thread.

Workers are fresh interpreters that run *this file* as a script (the "spawn" model, never a fork of
the trainer: torch + fork is unsafe). Running the file by path, rather than multiprocessing's spawn,
means a worker imports only the standard library and math_verify: not torch, not r1kit, and not the
user's `__main__` script (spawn would re-import it, with all its top-level code). They talk over
stdin/stdout with `multiprocessing.connection` framing; the worker's own prints go to stderr.

    verify_math("0.5", "\\frac{1}{2}")               # VerifyResult(correct=True, reason='correct')
    verify_math_many([(pred, gold), ...], 2.0)      # the pool's workers verify in parallel

Pool size: $R1KIT_VERIFY_WORKERS, else min(4, CPUs). The pool starts on first use (or `warm_up()`),
and is shut down at interpreter exit. POSIX only (file-descriptor pipes).
"""
from __future__ import annotations

import atexit
import importlib.util
import math
import os
import re
import queue
import subprocess
import sys
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import Connection
from typing import NamedTuple, Sequence

DEFAULT_TIMEOUT_S = 2.0
STARTUP_TIMEOUT_S = 60.0  # a fresh worker imports sympy; generous for a loaded 2-core machine
CACHE_SIZE = 8192
WORKER_MEMORY_BYTES = 4 << 30  # address-space cap: a runaway power tower fails with MemoryError, not OOM
_WORKERS_ENV = "R1KIT_VERIFY_WORKERS"


class VerifyResult(NamedTuple):
    correct: bool
    reason: str  # "correct" | "wrong value" | "unparseable" | "timeout" | "worker error" | "too costly: ..."


# ----------------------------------------------------------------------------- static pre-check
# Answers whose verification would cost seconds (sympy evaluates numbers exactly) are refused before any worker
# sees them, in well under a millisecond: power towers and huge exponents (9^{9^{9^{9}}}), huge factorials
# (10^{10^{10^{10}}}!, 100000!), deep nesting (3,000 braces). No real answer is like that; a reward hacker's is.
MAX_NESTING = 30
MAX_EXPONENT = 10_000  # 2^{10000} has 3,011 digits: instant; 9^{99999999} is not
MAX_FACTORIAL = 1_000
_NUMBER_TEXT = re.compile(r"[+-]?\d+(?:\.\d+)?")


def _nesting(s: str) -> int:
    depth = best = 0
    for i, ch in enumerate(s):
        if ch in "({[" and not (ch == "{" and i and s[i - 1] == "\\"):
            depth += 1
            best = max(best, depth)
        elif ch in ")}]" and depth:
            depth -= 1
    return best


def _group_end(s: str, i: int) -> int:
    """Index just past the balanced group that opens at s[i] ("{", "(" or "[")."""
    close = {"{": "}", "(": ")", "[": "]"}[s[i]]
    depth = 0
    for j in range(i, len(s)):
        if s[j] == s[i]:
            depth += 1
        elif s[j] == close:
            depth -= 1
            if depth == 0:
                return j + 1
    return len(s)


def _operand_after(s: str, i: int, depth: int = 0) -> str:
    """The exponent that starts at s[i]: a {group}, a (group), a number or one character, with any further
    `^...` of a chain (a^b^c is a^(b^c))."""
    while i < len(s) and s[i] == " ":
        i += 1
    if i >= len(s) or depth > MAX_NESTING:
        return ""
    if s[i] in "{([":
        end = _group_end(s, i)
        token, inner = s[i:end], s[i + 1 : end - 1]
    else:
        m = _NUMBER_TEXT.match(s, i)
        token = inner = m.group(0) if m else s[i]
        end = i + len(token)
    rest = s[end:].lstrip()
    if rest.startswith("^"):
        return token + "^" + _operand_after(rest, 1, depth + 1)
    return inner


def _unwrap(text: str) -> str:
    text = text.strip()
    while text[:1] in ("{", "(") and _group_end(text, 0) == len(text):
        text = text[1:-1].strip()
    return text


def _value(text: str, depth: int = 0) -> float | None:
    """The size of a purely numeric exponent expression (a number, or number^exponent), inf when huge;
    None when it is not numeric (then sympy keeps it symbolic, which is cheap)."""
    text = _unwrap(text)
    if depth > MAX_NESTING or not text:
        return None
    if _NUMBER_TEXT.fullmatch(text):
        return abs(float(text))
    m = _NUMBER_TEXT.match(text)
    if m and text[m.end():].lstrip().startswith("^"):
        base = abs(float(m.group(0)))
        exponent = _value(_operand_after(text, text.index("^", m.end()) + 1), depth + 1)
        if exponent is None or base <= 1:
            return None if exponent is None else base
        return math.inf if exponent * math.log10(base) > 300 else base**exponent
    return None


def too_costly(answer: str) -> str | None:
    """Why verifying `answer` could take seconds (a power tower, a huge exponent or factorial, deep nesting),
    or None when it is cheap. Static: looks at the text only, in linear time."""
    if _nesting(answer) > MAX_NESTING:
        return f"nested more than {MAX_NESTING} deep"
    s = answer.replace("**", "^")
    for i, ch in enumerate(s):
        if ch == "^":
            exponent = _value(_operand_after(s, i + 1))
            if exponent is not None and exponent > MAX_EXPONENT:
                return f"an exponent above {MAX_EXPONENT}"
        elif ch == "!" and i and s[i - 1] != "\\" and not s.startswith("!=", i):
            before = s[:i].rstrip()
            m = re.search(r"(\d+)$", before)
            if m and int(m.group(1)[-6:]) > MAX_FACTORIAL or (m and len(m.group(1)) > 6):
                return f"a factorial above {MAX_FACTORIAL}!"
            if before.endswith(("}", ")", "]")) and ("^" in before or "!" in before[:-1]):
                return "a factorial of a power or factorial"
    return None


def _braces_balanced(s: str) -> bool:
    depth = 0
    for i, ch in enumerate(s):
        if ch in "{}" and i > 0 and s[i - 1] == "\\":
            continue  # \{ and \} are literal set braces, not groups
        depth += 1 if ch == "{" else -1 if ch == "}" else 0
        if depth < 0:
            return False
    return depth == 0


def wrap_latex(s: str) -> str:
    """Put an already-extracted answer where math-verify's LaTeX extractor looks for one.

    `\\boxed{}` has the extractor's highest priority and survives stray `$` inside the answer; an answer
    with unbalanced braces would break out of the box, so it is wrapped in `$...$` instead.
    """
    return f"\\boxed{{{s}}}" if _braces_balanced(s) else f"${s}$"


# ----------------------------------------------------------------------------- worker side


def _worker_verify(parse, verify, gold_cache: dict, pred: str, gold: str) -> tuple[bool, str]:
    """One verification inside a worker; math-verify's own signal timeouts are off (None)."""
    try:
        g = gold_cache.get(gold)
        if g is None:  # the same gold meets G completions in a row: parse it once
            g = parse(wrap_latex(gold), parsing_timeout=None)
            if len(gold_cache) > 1024:
                gold_cache.clear()
            gold_cache[gold] = g
        p = parse(wrap_latex(pred), parsing_timeout=None)
        if not p:
            return False, "unparseable"
        # order matters: math-verify treats its first argument as the reference
        ok = verify(g, p, timeout_seconds=None)
    except Exception:  # a parser/sympy failure on a malformed answer is a wrong answer, not a crash
        return False, "unparseable"
    return (True, "correct") if ok else (False, "wrong value")


def _die_with_parent(parent: int) -> None:
    """The sandbox's process management (r1kit/sandbox/server.py, standard library only, loaded by path so
    that the worker imports neither r1kit nor torch): SIGKILL this worker when its parent dies, even by
    kill -9, so a worker busy on an adversarial answer is never left spinning, re-parented to PID 1."""
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "sandbox", "server.py")
    spec = importlib.util.spec_from_file_location("_r1kit_sandbox_server", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.die_with_parent(parent)


def _worker_main() -> None:
    """Serve (pred, gold) requests from stdin until EOF (the parent closed the pipe or died)."""
    import logging
    import signal

    if len(sys.argv) > 1:
        _die_with_parent(int(sys.argv[1]))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it kills us
    try:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (WORKER_MEMORY_BYTES, WORKER_MEMORY_BYTES))
    except (ImportError, ValueError, OSError):
        pass
    # The protocol owns the original stdout; anything printed by libraries goes to stderr instead.
    rx = Connection(os.dup(0), writable=False)
    tx = Connection(os.dup(1), readable=False)
    os.dup2(2, 1)
    logging.disable(logging.WARNING)  # math-verify warns once that its timeouts are off: we know
    from math_verify import parse, verify

    gold_cache: dict = {}
    # The first parse loads the LaTeX grammar (tens of ms): pay it now, not inside a caller's time limit.
    _worker_verify(parse, verify, gold_cache, "\\frac{1}{2}", "0.5")
    gold_cache.clear()
    tx.send("ready")
    while True:
        try:
            msg = rx.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        tx.send(_worker_verify(parse, verify, gold_cache, *msg))


# ----------------------------------------------------------------------------- parent side


class _Worker:
    """One worker process and its two pipe ends."""

    def __init__(self) -> None:
        env = dict(os.environ)
        # The worker must find math_verify exactly where this process found it.
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
        # -P: do not put this file's directory (r1kit/rewards) first on sys.path, where graders.py and
        # friends could shadow a library module of the same name.
        from r1kit.sandbox.pool import spawn  # the parent side only: a worker never builds a _Worker

        # Spawned from one long-lived thread: the worker's parent-death signal fires when that thread ends.
        self.proc = spawn(
            [sys.executable, "-P", os.path.abspath(__file__), str(os.getpid())],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, close_fds=True,
        )
        self.tx = Connection(os.dup(self.proc.stdin.fileno()), readable=False)
        self.rx = Connection(os.dup(self.proc.stdout.fileno()), writable=False)
        self.proc.stdin.close()
        self.proc.stdout.close()
        self.ready = False

    def wait_ready(self, timeout_s: float) -> bool:
        if not self.ready and self.rx.poll(timeout_s):
            self.ready = self.rx.recv() == "ready"
        return self.ready

    def ask(self, pred: str, gold: str, timeout_s: float) -> VerifyResult | None:
        """The worker's answer, or None if it did not come within `timeout_s` (after start-up)."""
        if not self.wait_ready(STARTUP_TIMEOUT_S):
            return None
        self.tx.send((pred, gold))
        if not self.rx.poll(timeout_s):
            return None
        return VerifyResult(*self.rx.recv())

    def kill(self) -> None:
        for close in (self.proc.kill, self.tx.close, self.rx.close):
            try:
                close()
            except OSError:
                pass
        try:
            self.proc.wait(timeout=1.0)  # reap it: no zombie per timeout
        except subprocess.TimeoutExpired:
            pass


def _replace_if_dead(worker: _Worker) -> _Worker:
    """A worker that died while idle (killed from outside) is replaced: that is no input's fault."""
    if worker.proc.poll() is None:
        return worker
    worker.kill()
    return _Worker()


class _Pool:
    """A fixed number of workers; each request borrows one idle worker and returns it (or its replacement)."""

    def __init__(self, num_workers: int) -> None:
        if importlib.util.find_spec("math_verify") is None:  # else every worker would die at start, forever
            from r1kit.types import R1KitError  # here, not at the top: workers run this file without r1kit

            raise R1KitError("'math' answers need math-verify: pip install 'math-verify>=0.8'")
        self.num_workers = num_workers
        self.pid = os.getpid()
        self.closed = False
        self._idle: queue.Queue[_Worker] = queue.Queue()
        for _ in range(num_workers):
            self._idle.put(_Worker())
        # Threads that wait on pipes for verify_math_many (they sleep in poll; the work is in the workers).
        self.executor = ThreadPoolExecutor(max_workers=num_workers, thread_name_prefix="r1kit-verify")

    def _borrow(self) -> _Worker | None:
        while True:  # every request is time-limited, so a worker always comes back unless we shut down
            try:
                return self._idle.get(timeout=1.0)
            except queue.Empty:
                if self.closed:
                    return None

    def _give_back(self, worker: _Worker) -> None:
        if self.closed:
            worker.kill()
        else:
            self._idle.put(worker)

    def run(self, pred: str, gold: str, timeout_s: float) -> VerifyResult:
        worker = self._borrow()
        if worker is None:
            return VerifyResult(False, "worker error")
        try:
            worker = _replace_if_dead(worker)
            try:
                result = worker.ask(pred, gold, timeout_s)
                reason = "timeout"
            except (EOFError, OSError, ValueError):  # the worker died (crash, OOM kill) or its pipe broke
                result, reason = None, "worker error"
            if result is None:
                # Kill now so the caller returns at once; the replacement starts while others work.
                worker.kill()
                worker = _Worker()
                result = VerifyResult(False, reason)
            return result
        finally:
            self._give_back(worker)

    def warm_up(self) -> None:
        borrowed = [_replace_if_dead(w) for w in (self._borrow() for _ in range(self.num_workers)) if w is not None]
        try:
            for w in borrowed:
                w.wait_ready(STARTUP_TIMEOUT_S)
        finally:
            for w in borrowed:
                self._give_back(w)

    def shutdown(self) -> None:
        self.closed = True
        self.executor.shutdown(wait=False, cancel_futures=True)
        while True:
            try:
                w = self._idle.get_nowait()
            except queue.Empty:
                return
            try:
                w.tx.send(None)  # polite exit; kill() below makes sure
            except OSError:
                pass
            w.kill()


_POOL: _Pool | None = None
_POOL_LOCK = threading.Lock()


def _default_num_workers() -> int:
    raw = os.environ.get(_WORKERS_ENV)
    if raw is not None:
        try:
            n = int(raw)
        except ValueError:
            n = 0
        if n < 1:
            raise ValueError(f"${_WORKERS_ENV} must be a positive integer, got {raw!r}")
        return n
    return max(1, min(4, os.cpu_count() or 1))


def get_pool() -> _Pool:
    """The process's pool, started on first use (and afresh in a forked child, which must not share pipes)."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None or _POOL.closed or _POOL.pid != os.getpid():
            _POOL = _Pool(_default_num_workers())
        return _POOL


def warm_up() -> None:
    """Start the pool now and wait until every worker has imported math-verify (about 1 s)."""
    get_pool().warm_up()


def shutdown_pool() -> None:
    """Stop the workers (also run at interpreter exit); the next call starts a new pool."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is not None and _POOL.pid == os.getpid():
            _POOL.shutdown()
        _POOL = None


atexit.register(shutdown_pool)


class _LRUCache:
    """Thread-safe (pred, gold) -> VerifyResult memo. Timeouts and worker errors are not stored: they
    may come from a loaded machine rather than from the input."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._data: OrderedDict[tuple[str, str], VerifyResult] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple[str, str]) -> VerifyResult | None:
        with self._lock:
            hit = self._data.get(key)
            if hit is not None:
                self._data.move_to_end(key)
            return hit

    def put(self, key: tuple[str, str], value: VerifyResult) -> None:
        if value.reason in ("timeout", "worker error"):
            return
        with self._lock:
            self._data[key] = value
            self._data.move_to_end(key)
            if len(self._data) > self.size:
                self._data.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._data.clear()


_CACHE = _LRUCache(CACHE_SIZE)


def _check(pred: object, gold: object, timeout_s: float) -> None:
    if not isinstance(pred, str) or not isinstance(gold, str):
        raise TypeError(f"verify_math takes strings, got pred={type(pred).__name__}, gold={type(gold).__name__}")
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s}")


def _verify_uncached(pred: str, gold: str, timeout_s: float) -> VerifyResult:
    result = get_pool().run(pred, gold, timeout_s)
    _CACHE.put((pred, gold), result)
    return result


def verify_math(pred: str, gold: str, timeout_s: float = DEFAULT_TIMEOUT_S, *, precheck: bool = True) -> VerifyResult:
    """Is the extracted answer `pred` mathematically equal to the reference `gold`?

    Both are bare answers (no `$`, no `\\boxed`): they are wrapped for math-verify here. Blocks for at
    most `timeout_s` once a worker is free (plus its start-up, the first time); safe from any thread.
    An answer that `too_costly` refuses is wrong at once ("too costly: ..."); precheck=False skips that check.
    """
    _check(pred, gold, timeout_s)
    costly = too_costly(pred) if precheck else None
    if costly is not None:
        return VerifyResult(False, f"too costly: {costly}")
    hit = _CACHE.get((pred, gold))
    return hit if hit is not None else _verify_uncached(pred, gold, timeout_s)


def verify_math_many(pairs: Sequence[tuple[str, str]], timeout_s: float = DEFAULT_TIMEOUT_S, *,
                     precheck: bool = True) -> list[VerifyResult]:
    """`verify_math` over (pred, gold) pairs, the distinct uncached ones spread over the pool's workers.

    Wall time is about ceil(distinct / workers) verifications; each one is still capped at `timeout_s`.
    """
    for pred, gold in pairs:
        _check(pred, gold, timeout_s)
    results: list[VerifyResult | None] = []
    for p, g in pairs:
        costly = too_costly(p) if precheck else None
        results.append(VerifyResult(False, f"too costly: {costly}") if costly is not None else _CACHE.get((p, g)))
    todo = list(dict.fromkeys(pair for pair, r in zip(pairs, results) if r is None))  # distinct, in order
    if len(todo) == 1:
        done = {todo[0]: _verify_uncached(*todo[0], timeout_s)}
    elif todo:
        pool = get_pool()
        futures = {pair: pool.executor.submit(_verify_uncached, *pair, timeout_s) for pair in todo}
        done = {pair: f.result() for pair, f in futures.items()}
    else:
        done = {}
    return [r if r is not None else done[pair] for pair, r in zip(pairs, results)]



def clear_cache() -> None:
    _CACHE.clear()


if __name__ == "__main__":
    _worker_main()
