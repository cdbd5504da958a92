"""The parent side of the sandbox: a fork server per pool, jobs run concurrently by a thread pool.

Each job travels to the fork server (r1kit/sandbox/server.py) as two pipe ends passed over a Unix socket:
the job pipe (public part first, then, for assert tests, the tests themselves) and the result pipe. The
calling thread writes the job, then waits on the result pipe with a hard deadline; if the box does not
answer in time (it always should: it has its own watchdog), its watchdog process is killed and the job
reports "sandbox_error". A dead server is restarted on the next job.
"""
from __future__ import annotations

import json
import logging
import os
import queue
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

from r1kit.sandbox.wire import read_frame
from r1kit.types import R1KitError

log = logging.getLogger("r1kit.sandbox")
SERVER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "server.py")
STARTUP_TIMEOUT_S = 30.0
GRACE_S = 10.0  # beyond the job's own deadline, before the parent gives up on a box


class _Spawner:
    """Starts child processes from one long-lived daemon thread.

    PR_SET_PDEATHSIG fires when the *thread* that forked the child exits, not the process: a fork server or
    verifier worker started from a short-lived thread (a request handler, a user's worker thread) would be
    killed when that thread ends. Spawning from this thread ties their lives to the process instead."""

    def __init__(self) -> None:
        self._requests: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._pid = -1
        self._lock = threading.Lock()

    def _serve(self) -> None:
        while True:
            args, kwargs, done = self._requests.get()
            try:
                done.set_result(subprocess.Popen(*args, **kwargs))
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                done.set_exception(e)

    def popen(self, *args, **kwargs) -> subprocess.Popen:
        with self._lock:
            if self._thread is None or not self._thread.is_alive() or self._pid != os.getpid():
                self._pid = os.getpid()
                self._thread = threading.Thread(target=self._serve, name="r1kit-spawner", daemon=True)
                self._thread.start()
        done: Future = Future()
        self._requests.put((args, kwargs, done))
        return done.result()


spawn = _Spawner().popen


class _Server:
    """One fork-server process and the parent's end of its socket."""

    def __init__(self) -> None:
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.sock = mine
        # -I -S: no user site, no PYTHONPATH, no site-packages: the boxes are forks of this interpreter.
        self.proc = spawn(
            [sys.executable, "-I", "-S", SERVER, str(theirs.fileno()), str(os.getpid())],
            pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, close_fds=True,
        )
        theirs.close()
        self.sock.settimeout(STARTUP_TIMEOUT_S)
        try:
            hello = json.loads(self.sock.recv(4096))
        except (OSError, ValueError) as e:
            self.close()
            raise R1KitError(f"the sandbox server did not start ({type(e).__name__}: {e})") from None
        self.sock.settimeout(None)
        self.isolated = bool(hello["isolated"])

    def alive(self) -> bool:
        return self.proc.poll() is None

    def close(self) -> None:
        try:
            self.sock.close()  # the server sees EOF and exits; running boxes finish their jobs
        finally:
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _write_all(fd: int, data: bytes, deadline: float) -> None:
    view = memoryview(data)
    os.set_blocking(fd, False)
    while view:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([], [fd], [], left)[1]:
            raise TimeoutError("the box did not read its job")
        try:
            view = view[os.write(fd, view):]
        except BlockingIOError:
            continue


def _frame(obj) -> bytes:
    data = json.dumps(obj).encode()
    return struct.pack("<Q", len(data)) + data


class SandboxPool:
    """Runs jobs in sandboxes, up to `workers` at once (default: the CPU count).

    `run_job(job, secret)` is the low-level call used by r1kit.sandbox's functions; it returns the box's raw
    report (a dict). Thread-safe. Close it (or use it as a context manager) to stop the server.
    """

    def __init__(self, workers: int | None = None, tmp_root: str | None = None, isolate: bool | None = None) -> None:
        workers = workers if workers is not None else (os.cpu_count() or 1)
        if not isinstance(workers, int) or workers < 1:
            raise R1KitError(f"sandbox workers must be a positive integer, got {workers!r}")
        self.workers = workers
        self.tmp_root = tmp_root
        self.pid = os.getpid()
        self._lock = threading.Lock()
        self._server: _Server | None = None
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="r1kit-sandbox")
        self.closed = False
        available = self._ensure_server().isolated
        if isolate and not available:
            raise R1KitError("sandbox: isolate=True, but namespaces cannot be created here (needs root or user namespaces)")
        self.isolated = available if isolate is None else bool(isolate)
        if not available:
            log.warning("sandbox: cannot create network/mount/pid namespaces here (needs root or user "
                        "namespaces); programs run with rlimits and process groups only: they CAN use the "
                        "network and write files the current user may write")

    def _ensure_server(self) -> _Server:
        with self._lock:
            if self.closed:
                raise R1KitError("the sandbox pool is closed")
            if self._server is None or not self._server.alive():
                if self._server is not None:
                    log.warning("sandbox: the fork server died; starting a new one")
                    self._server.close()
                self._server = _Server()
            return self._server

    def _dispatch(self) -> tuple[int, int]:
        """Ask the server for a box; returns (job write end, result read end)."""
        job_r, job_w = os.pipe()
        res_r, res_w = os.pipe()
        try:
            for attempt in range(2):
                server = self._ensure_server()
                try:
                    with self._lock:
                        socket.send_fds(server.sock, [b"j"], [job_r, res_w])
                    break
                except OSError:
                    if attempt == 1:
                        raise
                    with self._lock:
                        if self._server is server:
                            server.close()
                            self._server = None
        except BaseException:
            for fd in (job_w, res_r):
                os.close(fd)
            raise
        finally:
            os.close(job_r)
            os.close(res_w)
        return job_w, res_r

    def run_job(self, job: dict, secret: dict | None, budget_s: float) -> dict:
        """Run one job; `budget_s` is the box's own deadline (the parent waits GRACE_S longer)."""
        job = dict(job, isolated=self.isolated, tmp_root=self.tmp_root)
        deadline = time.monotonic() + budget_s + GRACE_S
        try:
            job_w, res_r = self._dispatch()
        except (OSError, R1KitError) as e:
            return {"sandbox_error": f"could not start a box: {e}"}
        box_pid = None
        try:
            box_pid = read_frame(res_r, time.monotonic() + STARTUP_TIMEOUT_S)["pid"]
            payload = _frame(job) + (_frame(secret) if secret is not None else b"")
            try:
                _write_all(job_w, payload, deadline)
            except BrokenPipeError:
                pass  # the box stopped reading (it failed early): its report says why
            os.close(job_w)
            job_w = -1
            return read_frame(res_r, deadline)
        except (TimeoutError, EOFError, OSError, ValueError, KeyError) as e:
            if box_pid is not None:
                try:
                    os.kill(box_pid, signal.SIGKILL)  # parent-death signals take the rest of the box down
                except ProcessLookupError:
                    pass
            return {"sandbox_error": f"no answer from the box ({type(e).__name__}: {e})"}
        finally:
            for fd in (job_w, res_r):
                if fd >= 0:
                    os.close(fd)

    def submit(self, fn, *args) -> Future:
        return self._executor.submit(fn, *args)

    def close(self) -> None:
        with self._lock:
            if self.closed:
                return
            self.closed = True
            server, self._server = self._server, None
        self._executor.shutdown(wait=True)
        if server is not None:
            server.close()

    def __enter__(self) -> "SandboxPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
