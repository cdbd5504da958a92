"""Run untrusted Python programs (model completions) offline, without harm to the machine, never hanging.

    from r1kit.sandbox import run_program, check_asserts, check_stdio, Limits
    run_program("print(input()[::-1])", stdin="abc")                      # RunResult(status="ok", stdout="cba\\n", ...)
    check_asserts(code, "add", ["assert candidate(1, 2) == 3"])            # TestVerdict(status="passed", ...)
    check_stdio(code, [("1 2\\n", "3\\n"), ("5 5\\n", "10\\n")])           # stdin/stdout cases, whitespace-normalised

Each job runs in a *box* forked by a small fork server (r1kit/sandbox/server.py, which documents the process
tree): new network, mount and pid namespaces (no network at all; the host's files read-only to the program,
which runs as a random uid; a fresh work dir mounted on /tmp and removed after; when the job ends every process
in it dies, `setsid` or not), rlimits on address space, CPU, file size, processes and open files, a wall
deadline, capped stdout/stderr, and parent-death signals on every link, so nothing outlives the caller.
Without root the boxes keep the rlimits, deadlines and parent-death but lose the namespaces (a warning says
so): then they are NOT a security boundary.

Assert tests are run by trusted code in a separate process that calls the program's function over a pipe with
plain data: a program cannot pass by exiting early, by returning objects that compare equal to anything, by
patching the tests or builtins, or by printing what success looks like (see server.py).

The process-wide pool (`get_pool()`) has $R1KIT_SANDBOX_WORKERS workers (default: the CPU count). Verdicts
with status "sandbox_error" are the sandbox's own failures: they are logged and counted in `stats()`.
"""
from __future__ import annotations

import atexit
import logging
import os
import signal
import threading
from collections import Counter
from typing import Sequence

from r1kit.sandbox.types import (
    ERROR, FAILED, MEMORY, OUTPUT_LIMIT, PASSED, SANDBOX_ERROR, STATUSES, TIMEOUT, Limits, RunResult, TestVerdict,
)
from r1kit.types import R1KitError

log = logging.getLogger("r1kit.sandbox")
_WORKERS_ENV = "R1KIT_SANDBOX_WORKERS"
_POOL = None
_POOL_LOCK = threading.Lock()
_STATS: Counter = Counter()
_STATS_LOCK = threading.Lock()


def get_pool():
    """The process's sandbox pool, started on first use (afresh in a forked child)."""
    from r1kit.sandbox.pool import SandboxPool

    global _POOL
    with _POOL_LOCK:
        if _POOL is None or _POOL.closed or _POOL.pid != os.getpid():
            raw = os.environ.get(_WORKERS_ENV)
            try:
                workers = int(raw) if raw else None
            except ValueError:
                raise R1KitError(f"${_WORKERS_ENV} must be a positive integer, got {raw!r}") from None
            _POOL = SandboxPool(workers)
        return _POOL


def shutdown_pool() -> None:
    global _POOL
    with _POOL_LOCK:
        if _POOL is not None and _POOL.pid == os.getpid():
            _POOL.close()
        _POOL = None


atexit.register(shutdown_pool)


def stats() -> dict[str, int]:
    """How many verdicts of each status this process produced (sandbox errors included)."""
    with _STATS_LOCK:
        return dict(_STATS)


def _count(status: str, detail: str) -> None:
    with _STATS_LOCK:
        _STATS[status] += 1
    if status == SANDBOX_ERROR:
        log.warning("sandbox failure (not the program's fault, scored as a failure): %s", detail)


# ----------------------------------------------------------------------------- interpreting reports


def _case_result(case: dict, out: str, err: str, limits: Limits) -> RunResult:
    """A stdio case's RunResult from the box's report of it and its (capped) outputs."""
    code, sig = case.get("exit"), case.get("signal")
    seconds = float(case.get("seconds", 0.0))

    def result(status: str, detail: str) -> RunResult:
        return RunResult(status, out, err, code, sig, seconds, detail)

    if case.get("timeout") or sig in (signal.SIGXCPU, signal.SIGKILL):
        return result(TIMEOUT, f"over the {limits.timeout_s:g} s wall / {limits.cpu_s:g} s CPU limit")
    if sig == signal.SIGXFSZ or "File too large" in err[-2000:] or len(out.encode()) >= limits.output_bytes or len(err.encode()) >= limits.output_bytes:
        return result(OUTPUT_LIMIT, f"wrote more than the {limits.output_bytes}-byte output limit")
    if "MemoryError" in err[-2000:] or sig == signal.SIGSEGV:
        return result(MEMORY, f"over the {limits.memory_mb} MB memory limit")
    if sig is not None:
        return result(ERROR, f"killed by signal {signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else sig}")
    if code != 0:
        tail = err.strip().splitlines()[-1] if err.strip() else f"exit status {code}"
        return result(ERROR, tail[:500])
    return result("ok", "")


def _sandbox_failure(report: dict, total: int) -> TestVerdict:
    detail = str(report.get("sandbox_error") or report.get("harness_error") or "the box reported nothing")
    _count(SANDBOX_ERROR, detail)
    return TestVerdict(SANDBOX_ERROR, 0, total, None, detail)


def run_cases(code: str, stdins: Sequence[str], limits: Limits = Limits(), *, pool=None) -> list[RunResult]:
    """Run `code` once per stdin (each a fresh process, in one box); one RunResult per case, in order.
    After a case times out the rest are not run (their status is "timeout" too)."""
    if not isinstance(code, str):
        raise TypeError(f"code must be a string, got {type(code).__name__}")
    stdins = [str(s) for s in stdins]
    pool = pool or get_pool()
    job = {"mode": "stdio", "code": code, "cases": stdins, "limits": limits.to_job()}
    report = pool.run_job(job, None, limits.timeout_s * max(1, len(stdins)) + 1.0)
    cases = report.get("cases")
    if not isinstance(cases, list):
        why = report.get("sandbox_error") or ("time limit" if report.get("timeout") else f"box report {report}")
        status = TIMEOUT if report.get("timeout") else SANDBOX_ERROR
        if status == SANDBOX_ERROR:
            _count(SANDBOX_ERROR, str(why))
        return [RunResult(status, "", "", None, None, 0.0, str(why)) for _ in stdins]
    results = []
    for i in range(len(stdins)):
        if i < len(cases):
            results.append(_case_result(cases[i], str(cases[i].get("stdout", "")), str(cases[i].get("stderr", "")), limits))
        else:
            results.append(RunResult(TIMEOUT, "", "", None, None, 0.0, "not run: an earlier case timed out"))
    return results


def run_program(code: str, stdin: str = "", limits: Limits = Limits(), *, pool=None) -> RunResult:
    """Run `code` as a script with `stdin`; its RunResult (stdout, stderr, exit status, status)."""
    return run_cases(code, [stdin], limits, pool=pool)[0]


def normalize_output(text: str) -> list[str]:
    """Output lines compared whitespace-insensitively: runs of spaces/tabs collapse, line ends and trailing
    blank lines are ignored; every other line counts (nothing is truncated)."""
    lines = [" ".join(line.split()) for line in text.replace("\r\n", "\n").split("\n")]
    while lines and not lines[-1]:
        lines.pop()
    return lines


def check_stdio(code: str, cases: Sequence[tuple[str, str]], limits: Limits = Limits(), *, pool=None) -> TestVerdict:
    """Run `code` on each (stdin, expected stdout) case; passed = cases whose whole output matches."""
    if not cases:
        raise R1KitError("check_stdio: no test cases")
    runs = run_cases(code, [c[0] for c in cases], limits, pool=pool)
    passed, first, detail = 0, None, ""
    for i, (run, (_, expected)) in enumerate(zip(runs, cases)):
        if run.status == "ok" and normalize_output(run.stdout) == normalize_output(expected):
            passed += 1
        elif first is None:
            first = i
            detail = run.detail if run.status != "ok" else f"case {i}: output differs from the expected output"
    bad = runs[first] if first is not None else runs[0]
    status = PASSED if passed == len(cases) else (FAILED if bad.status == "ok" else bad.status)
    _count(status, detail)
    return TestVerdict(status, passed, len(cases), first, detail, bad.stdout[:4000], bad.stderr[:4000],
                       sum(r.seconds for r in runs))


def _assert_status(report: dict, limits: Limits) -> tuple[str, str]:
    """(status, detail) of a failed assert job from the harness's report."""
    gone = report.get("gone")
    if report.get("timeout") or (gone or {}).get("timeout"):
        return TIMEOUT, f"over the {limits.timeout_s:g} s wall / {limits.cpu_s:g} s CPU limit"
    if report.get("load_error") is not None:
        text = str(report["load_error"])
        return (MEMORY if text.startswith("MemoryError") else ERROR), f"loading the program: {text}"
    if gone is not None:
        sig = gone.get("signal")
        if sig in (signal.SIGXCPU, signal.SIGKILL):
            return TIMEOUT, "the program was killed for CPU time"
        if sig == signal.SIGXFSZ:
            return OUTPUT_LIMIT, f"wrote more than the {limits.output_bytes}-byte output limit"
        return ERROR, f"the program exited before the tests ended ({gone})"
    if "error" in report:
        text = str(report["error"])
        return (MEMORY if text.startswith("MemoryError") else ERROR), text
    return FAILED, f"test {report.get('failed')}: {report.get('line') or 'assert'} {report.get('message') or ''}".strip()


def check_asserts(code: str, entry_point: str, tests: Sequence[str], setup: str = "",
                  limits: Limits = Limits(), *, pool=None) -> TestVerdict:
    """Run `code`, then each test (Python source that calls `candidate(...)`, e.g. "assert candidate(2) == 4"
    or HumanEval's "def check(candidate): ...\\ncheck(candidate)") against its function `entry_point`.
    `setup` (trusted: the problem's helper code) runs before the tests in the tests' namespace."""
    if not isinstance(code, str) or not entry_point or not tests:
        raise R1KitError("check_asserts needs code (a string), an entry_point and at least one test")
    pool = pool or get_pool()
    job = {"mode": "assert", "code": code, "entry_point": entry_point, "cases": [], "limits": limits.to_job()}
    report = pool.run_job(job, {"setup": setup, "tests": list(tests)}, limits.timeout_s + 1.0)
    total = len(tests)
    if "sandbox_error" in report or "harness_error" in report or ("done" not in report and "passed" not in report
                                                                  and not report.get("timeout")):
        return _sandbox_failure(report, total)
    out, err = str(report.get("stdout", "")), str(report.get("stderr", ""))
    passed = int(report.get("passed", 0))
    if report.get("done") and passed == total:
        _count(PASSED, "")
        return TestVerdict(PASSED, passed, total, None, "", out[:4000], err[:4000])
    status, detail = _assert_status(report, limits)
    if len(out.encode()) >= limits.output_bytes or len(err.encode()) >= limits.output_bytes:
        status, detail = OUTPUT_LIMIT, f"wrote more than the {limits.output_bytes}-byte output limit"
    _count(status, detail)
    return TestVerdict(status, passed, total, report.get("failed", 0), detail[:2000], out[:4000], err[:4000])


__all__ = [
    "ERROR", "FAILED", "Limits", "MEMORY", "OUTPUT_LIMIT", "PASSED", "RunResult", "SANDBOX_ERROR", "STATUSES",
    "TIMEOUT", "TestVerdict", "check_asserts", "check_stdio", "get_pool", "normalize_output", "run_cases",
    "run_program", "shutdown_pool", "stats",
]
