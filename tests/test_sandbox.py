"""The sandbox's contract: typed verdicts, stdin/stdout, limits, the pool, and no leaks over many runs."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from r1kit.sandbox import (
    Limits, check_asserts, check_stdio, get_pool, normalize_output, run_cases, run_program, stats,
)
from r1kit.sandbox.pool import SandboxPool
from r1kit.sandbox.wire import decode, encode
from r1kit.types import R1KitError
from tests.sandbox_helpers import assert_clean

QUICK = Limits(timeout_s=1.0, cpu_s=1.0)


def test_run_program_returns_stdout_stderr_and_exit_status():
    r = run_program("import sys\nprint(input()[::-1])\nprint('warn', file=sys.stderr)\nsys.exit(3)", stdin="abc\n")
    assert (r.status, r.stdout, r.stderr, r.exit_code, r.signal) == ("error", "cba\n", "warn\n", 3, None)
    ok = run_program("print(sum(map(int, input().split())))", stdin="1 2 3")
    assert (ok.status, ok.stdout, ok.exit_code) == ("ok", "6\n", 0)


def test_exceptions_are_errors_with_their_text():
    r = run_program("raise ValueError('bad input')")
    assert r.status == "error" and r.detail == "ValueError: bad input" and "Traceback" in r.stderr


def test_each_case_is_a_fresh_process():
    rs = run_cases("import os\nprint(os.path.exists('state'))\nopen('state', 'w')", ["", ""])
    assert [r.stdout for r in rs] == ["False\n", "True\n"]  # same work dir, new process
    rs = run_cases("x = globals().setdefault('n', 0)\nprint(x)", ["", ""])
    assert [r.stdout for r in rs] == ["0\n", "0\n"]


def test_a_timeout_stops_the_remaining_cases():
    rs = run_cases("import sys\nif sys.stdin.read() == 'hang':\n    while True: pass\nprint('ok')",
                   ["a", "hang", "b"], QUICK)
    assert [r.status for r in rs] == ["ok", "timeout", "timeout"]


def test_normalize_output_ignores_spacing_not_content():
    assert normalize_output("1  2\t3 \r\n4\n\n") == ["1 2 3", "4"]
    assert normalize_output("1 2") != normalize_output("1 2\n3")
    assert normalize_output("") == []


def test_check_stdio_counts_passing_cases_and_names_the_first_failure():
    code = "a, b = map(int, input().split())\nprint(a + b if a < 100 else a - b)"
    v = check_stdio(code, [("1 2\n", "3\n"), ("5 5", "10"), ("200 1", "201"), ("7 1", "8 ")])
    assert (v.status, v.passed, v.total, v.failed_test) == ("failed", 3, 4, 2)
    assert v.fraction == 0.75 and "case 2" in v.detail


def test_stdio_needs_every_line_no_truncation_passes():
    cases = [("", "1\n2\n3\n")]
    assert check_stdio("print(1)\nprint(2)", cases).status == "failed"
    assert check_stdio("print(1)\nprint(2)\nprint(3)\nprint(4)", cases).status == "failed"
    assert check_stdio("print('1\\n2 \\n3')", cases).status == "passed"


def test_check_asserts_passed_failed_and_error():
    add = "def add(a, b):\n    return a + b"
    v = check_asserts(add, "add", ["assert candidate(1, 2) == 3", "assert candidate('a', 'b') == 'ab'"])
    assert (v.status, v.passed, v.total) == ("passed", 2, 2)
    v = check_asserts(add, "add", ["assert candidate(1, 2) == 3", "assert candidate(2, 2) == 5", "assert candidate(0, 0) == 0"])
    assert (v.status, v.passed, v.failed_test) == ("failed", 2, 1) and "candidate(2, 2) == 5" in v.detail
    v = check_asserts("def add(a, b):\n    raise KeyError('boom')", "add", ["assert candidate(1, 2) == 3"])
    assert v.status == "error" and "KeyError" in v.detail
    v = check_asserts("def other(): pass", "add", ["assert candidate(1, 2) == 3"])
    assert v.status == "error" and "no function 'add'" in v.detail
    v = check_asserts("def add(a, b) return", "add", ["assert candidate(1, 2) == 3"])
    assert v.status == "error" and "SyntaxError" in v.detail


def test_asserts_get_plain_data_of_every_kind_back():
    code = "def f(x):\n    return x"
    values = [None, True, 0, -(10**30), 1.5, float("inf"), 2j, "é\x00", b"\xff", [1, (2, 3)], {1: {"a"}},
              frozenset({1}), {"k": [None]}]
    tests = [f"assert candidate({v!r}) == {v!r} and type(candidate({v!r})) is type({v!r})" for v in values]
    v = check_asserts(code, "f", tests, setup="inf = float('inf')")
    assert v.status == "passed", v
    for value in values:
        assert decode(encode(value)) == value


def test_asserts_time_out_and_memory():
    assert check_asserts("def f():\n    while True: pass", "f", ["candidate()"], limits=QUICK).status == "timeout"
    mem = check_asserts("def f():\n    return bytearray(1 << 33)", "f", ["candidate()"], limits=QUICK)
    assert mem.status == "memory"


def test_a_broken_test_is_a_sandbox_error_not_a_wrong_answer():
    before = stats().get("sandbox_error", 0)
    v = check_asserts("def f(x): return x", "f", ["assert candidate(1) == 1"], setup="raise RuntimeError('bad setup')")
    assert v.status == "sandbox_error" and "setup" in v.detail
    v = check_asserts("def f(x): return x", "f", ["candidate(object())"])
    assert v.status == "sandbox_error" and "not plain data" in v.detail
    assert stats()["sandbox_error"] == before + 2


def test_a_dead_server_is_restarted():
    pool = get_pool()
    os.kill(pool._server.proc.pid, signal.SIGKILL)
    pool._server.proc.wait()
    assert run_program("print(7)").stdout == "7\n"


SENTINEL_SCRIPT = """
import subprocess, sys
from r1kit.sandbox import Limits, check_asserts, run_cases
from r1kit.sandbox.pool import SandboxPool
sentinel = subprocess.Popen(["sleep", "60"])
with SandboxPool(2, isolate=False) as pool:
    run_cases("import os\\nos.fork()\\nwhile True: pass", ["", ""], Limits(timeout_s=0.3), pool=pool)
    check_asserts("def f(x): return x", "f", ["assert candidate(1) == 1"], pool=pool)
print("sentinel alive" if sentinel.poll() is None else "sentinel killed")
sentinel.kill()
"""


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"), reason="needs root and unshare(1)")
def test_without_namespaces_cleanup_never_signals_other_processes(tmp_path):
    """Regression: the non-isolated path once cleaned up with kill(-1), which as root kills every process on
    the machine. This runs it inside a pid namespace of its own (so a regression is contained) next to a
    sentinel process, which must survive."""
    script = tmp_path / "sentinel.py"
    script.write_text(SENTINEL_SCRIPT)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    out = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", sys.executable, str(script)],
                         capture_output=True, text=True, env=env, timeout=120)
    assert "sentinel alive" in out.stdout, out.stdout + out.stderr


def test_limits_are_validated():
    with pytest.raises(R1KitError, match="timeout_s"):
        Limits(timeout_s=0)
    with pytest.raises(R1KitError, match="memory_mb"):
        Limits(memory_mb=1)
    with pytest.raises(R1KitError, match="workers"):
        SandboxPool(workers=0)


def test_the_pool_runs_jobs_concurrently():
    with SandboxPool(workers=4) as pool:
        start = time.monotonic()
        futures = [pool.submit(lambda: run_program("import time; time.sleep(0.5); print(1)", pool=pool))
                   for _ in range(4)]
        results = [f.result() for f in futures]
        elapsed = time.monotonic() - start
    assert all(r.stdout == "1\n" for r in results)
    assert elapsed < 1.6, f"4 sleeps of 0.5 s took {elapsed:.2f} s on 4 workers"


def test_no_process_or_temp_file_leaks_over_many_runs():
    """200 mixed runs (the 10,000-run version is marked slow): nothing left, no fd growth in the parent."""
    programs = ["print(1)", "import os\nos.fork()\nprint(2)", "raise SystemExit(4)", "while True: pass",
                "import os\nif os.fork() == 0:\n    os.setsid()\n    while True: pass"]
    fds_before = len(os.listdir("/proc/self/fd"))
    with ThreadPoolExecutor(4) as ex:
        results = list(ex.map(lambda i: run_program(programs[i % len(programs)], limits=Limits(timeout_s=0.3, cpu_s=1.0)),
                              range(200)))
    assert {r.status for r in results} <= {"ok", "error", "timeout"}
    assert sum(r.status == "sandbox_error" for r in results) == 0
    assert_clean()
    assert len(os.listdir("/proc/self/fd")) <= fds_before + 2


@pytest.mark.slow
def test_no_leaks_over_ten_thousand_runs():
    fds_before = len(os.listdir("/proc/self/fd"))
    with ThreadPoolExecutor(8) as ex:
        results = list(ex.map(lambda i: run_program("import os\nif os.fork() == 0:\n    os.setsid()\nprint(1)"),
                              range(10_000)))
    assert all(r.status == "ok" for r in results)
    assert_clean()
    assert len(os.listdir("/proc/self/fd")) <= fds_before + 2


def test_a_pool_started_from_a_short_lived_thread_survives_it():
    """The parent-death signal fires when the *thread* that forked a child exits; servers and verifier workers
    are spawned from one long-lived thread, so a pool created in a finished thread keeps working."""
    import threading

    from r1kit.rewards import mathverify

    made = {}
    mathverify.shutdown_pool()

    def start():
        made["pool"] = SandboxPool(workers=1)
        mathverify.warm_up()

    t = threading.Thread(target=start)
    t.start()
    t.join()
    time.sleep(0.3)
    with made["pool"] as pool:
        assert pool._server.alive() and run_program("print(5)", pool=pool).stdout == "5\n"
    assert all(w.proc.poll() is None for w in list(mathverify.get_pool()._idle.queue))
    assert mathverify.verify_math("\\frac{2}{4}", "0.5").correct
