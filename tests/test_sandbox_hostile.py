"""Hostile programs, each contained: the host is unaffected and nothing is left running or on disk.

Needs the namespaces (root, or a kernel that lets this user create them); skips with the reason otherwise.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from r1kit.sandbox import Limits, check_asserts, get_pool, run_program
from tests.sandbox_helpers import assert_clean, sandbox_processes

REPO = Path(__file__).resolve().parents[1]  # the checkout: host files the programs try to write or delete
FAST = Limits(timeout_s=1.0, cpu_s=1.0, memory_mb=256, output_bytes=1 << 20, processes=16)


@pytest.fixture(scope="module", autouse=True)
def isolated():
    if not get_pool().isolated:
        pytest.skip("the sandbox cannot create namespaces here (needs root or user namespaces)")


@pytest.fixture(autouse=True)
def clean_after():
    yield
    assert_clean()


def run(code: str, **kw):
    return run_program(textwrap.dedent(code), limits=kw.pop("limits", FAST), **kw)


def test_fork_bomb_is_stopped_and_leaves_nothing():
    r = run("""
        import os
        while True:
            try:
                os.fork()
            except OSError:
                pass
    """)
    assert r.status in ("timeout", "error")


def test_infinite_loop_times_out():
    t = time.monotonic()
    r = run("while True: pass")
    assert r.status == "timeout" and time.monotonic() - t < 6


def test_sleep_forever_is_cut_by_the_wall_clock():
    r = run("import time; time.sleep(1000)", limits=Limits(timeout_s=1.0, cpu_s=5.0))
    assert r.status == "timeout"


def test_busy_threads_are_cut_by_cpu_time():
    r = run("""
        import threading
        def spin():
            while True:
                pass
        threads = [threading.Thread(target=spin) for _ in range(8)]
        for t in threads:
            t.start()
        threads[0].join()
    """, limits=Limits(timeout_s=5.0, cpu_s=1.0, processes=16))
    assert r.status == "timeout"


def test_memory_bomb_gets_memory_verdict():
    r = run("x = []\nwhile True: x.append(bytearray(1 << 24))", limits=Limits(timeout_s=10, cpu_s=10, memory_mb=256))
    assert r.status == "memory"


def test_a_gigabyte_print_is_capped():
    t = time.monotonic()
    r = run("import sys\nfor _ in range(1 << 14): sys.stdout.write('x' * (1 << 16))")
    assert r.status == "output_limit" and len(r.stdout) <= FAST.output_bytes
    assert time.monotonic() - t < 5


def test_a_huge_file_in_the_work_dir_is_capped():
    r = run("open('big', 'wb').write(b'x' * (64 << 20))", limits=Limits(output_bytes=1 << 20))
    assert r.status == "output_limit"


def test_writing_outside_the_work_dir_fails(tmp_path):
    os.chmod(tmp_path, 0o777)  # even a world-writable host dir is out of reach
    target = tmp_path / "pwned"
    r = run(f"""
        import os
        for path in [{str(target)!r}, {str(REPO / 'pwned')!r}, '/etc/pwned', '/root/pwned', '/var/tmp/pwned', '/dev/shm/pwned']:
            try:
                open(path, 'w').write('x')
                print('wrote', path)
            except OSError:
                pass
        open('/tmp/inside', 'w').write('ok')  # its own work dir is /tmp
        print('done')
    """)
    assert r.stdout.strip() == "done", r.stdout
    assert not target.exists() and not (REPO / "pwned").exists() and not os.path.exists("/etc/pwned")
    assert not os.path.exists("/var/tmp/pwned") and not os.path.exists("/dev/shm/pwned")


def test_deleting_host_files_fails(tmp_path):
    victim = tmp_path / "precious.txt"
    victim.write_text("keep me")
    os.chmod(tmp_path, 0o777)
    r = run(f"""
        import os, shutil
        for f in [{str(victim)!r}]:
            try: os.remove(f)
            except OSError as e: print(type(e).__name__, flush=True)
        shutil.rmtree({str(REPO / 'r1kit')!r}, ignore_errors=True)
    """, limits=Limits(timeout_s=10.0, cpu_s=10.0))
    assert victim.read_text() == "keep me" and (REPO / "r1kit" / "sandbox" / "server.py").is_file()
    assert "Error" in r.stdout


def test_a_secret_file_outside_the_work_dir_cannot_be_read(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("hunter2")
    os.chmod(secret, 0o600)
    r = run(f"print(open({str(secret)!r}).read())")
    assert r.status == "error" and "hunter2" not in r.stdout + r.stderr


def test_no_network_not_even_loopback():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.settimeout(0.2)
    port = listener.getsockname()[1]
    try:
        r = run(f"""
            import socket
            s = socket.socket()
            s.settimeout(1)
            s.connect(('127.0.0.1', {port}))
            print('connected')
        """)
        assert r.status == "error" and "connected" not in r.stdout
        with pytest.raises(socket.timeout):
            listener.accept()
    finally:
        listener.close()


def test_killing_the_parent_and_everyone_else_fails():
    me = os.getpid()
    r = run(f"""
        import os, signal
        for pid in (os.getppid(), {me}, 1, -1):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError as e:
                print(type(e).__name__)
        print('alive')
    """)
    assert get_pool()._server.alive()  # the fork server survived too
    assert r.status in ("ok", "error")


def test_setsid_escape_and_double_fork_die_with_the_job():
    r = run("""
        import os, time
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                while True:
                    time.sleep(0.01)
            os._exit(0)
        print('parent done')
    """)
    assert r.status == "ok" and "parent done" in r.stdout
    # assert_clean (autouse) checks that the daemonised grandchild is gone


def test_ctypes_tricks_are_contained():
    r = run("""
        import ctypes, os
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, 0, 0, 0, 0)                       # clear our parent-death signal
        print('unshare', libc.unshare(0x10000000))      # a user namespace: refused (no_new_privs / limits)
        print('setuid', libc.setuid(0))
        print('mount', libc.mount(b'none', b'/', None, 0x20, None))  # remount / read-write: refused
        if os.fork() == 0:
            while True: pass
        ctypes.string_at(0)                             # segfault
    """)
    assert r.status in ("error", "memory")
    assert "setuid 0" not in r.stdout and "mount 0" not in r.stdout


def test_signal_tricks_do_not_stop_the_deadline():
    r = run("""
        import signal
        for s in (signal.SIGXCPU, signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGALRM):
            signal.signal(s, signal.SIG_IGN)
        while True: pass
    """)
    assert r.status == "timeout"


def test_closing_stdout_and_all_fds():
    r = run("""
        import os
        print('before', flush=True)
        os.closerange(0, 1024)
        print('after')
    """)
    assert r.stdout.startswith("before") and r.status in ("ok", "error")


def test_unicode_and_nul_in_output_survive():
    r = run("print('nul:\\x00 é 漢字 \\U0001F600 tab\\tend')\nimport sys; sys.stdout.buffer.write(b'bad:\\xff\\xfe\\n')")
    assert r.status == "ok"
    assert "nul:\x00 é 漢字 \U0001F600 tab\tend" in r.stdout and "bad:" in r.stdout


def test_privileges_cannot_be_raised():
    r = run("""
        import os, resource
        for attempt in (lambda: os.setuid(0), lambda: resource.setrlimit(resource.RLIMIT_AS, (-1, -1)),
                        lambda: resource.setrlimit(resource.RLIMIT_NPROC, (10**6, 10**6)), lambda: os.chroot('/'),
                        lambda: os.nice(-5)):
            try:
                attempt()
                print('raised privileges')
            except (OSError, ValueError):
                pass
        print('uid', os.getuid())
    """)
    assert "raised privileges" not in r.stdout and "uid 0" not in r.stdout


def test_host_processes_are_invisible():
    r = run("import os; print(sorted(int(p) for p in os.listdir('/proc') if p.isdigit()))")
    pids = eval(r.stdout)
    assert pids and max(pids) < 50 and os.getpid() not in pids or len(pids) < 5


def test_file_descriptor_exhaustion_is_limited():
    r = run("""
        fs = []
        try:
            while True:
                fs.append(open('/dev/null'))
        except OSError as e:
            print('limited at', len(fs))
    """)
    assert r.status == "ok" and "limited at" in r.stdout and int(r.stdout.split()[-1]) < FAST.open_files


def test_recursion_bomb_is_contained():
    r = run("import sys\nsys.setrecursionlimit(10**8)\ndef f(n): return f(n + 1)\nf(0)")
    assert r.status in ("error", "memory", "timeout")


def test_stdin_is_supplied_and_reading_past_it_ends():
    r = run("import sys\ndata = sys.stdin.read()\nprint(len(data), data.split())", stdin="3 4\n5\n")
    assert r.status == "ok" and r.stdout.strip() == "6 ['3', '4', '5']"


def test_writes_to_shared_memory_and_var_tmp_stay_private():
    r = run("open('/dev/shm/x', 'w').write('y'); open('/var/tmp/x', 'w').write('y'); print('ok')")
    assert not os.path.exists("/dev/shm/x") and not os.path.exists("/var/tmp/x")
    assert r.status in ("ok", "error")


def test_the_tests_cannot_be_read_from_the_harness_process():
    """The assert tests live in another process (pid 1, another uid): its memory and files are out of reach."""
    v = check_asserts(textwrap.dedent("""
        import gc, os
        found = []
        for path in ('/proc/1/mem', '/proc/1/environ', '/proc/1/fd/0', '/proc/1/fd/3'):
            try:
                open(path, 'rb').read(100)
                found.append(path)
            except OSError:
                pass
        marker = chr(83) + 'ECRET_MARK'  # the test's message below; spelled so that this source lacks it
        texts = [o for o in gc.get_objects() if o is not globals() and marker in repr(o)]
        def f(x):
            return (found, len(texts))
    """), "f", ["assert candidate(0) == ([], 0), 'SECRET_MARK'"], limits=FAST)
    assert v.status == "passed", v


def test_killing_the_calling_process_leaves_nothing_behind(tmp_path):
    """kill -9 of the Python process that owns the pool, mid-run: server, box and program all die."""
    script = tmp_path / "victim.py"
    script.write_text(textwrap.dedent("""
        import sys
        from r1kit.sandbox import Limits, run_program
        print('start', flush=True)
        run_program('import os\\nfor _ in range(4): os.fork()\\nwhile True: pass',
                    limits=Limits(timeout_s=60, cpu_s=60))
    """))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, env=env)
    assert proc.stdout.readline().strip() == b"start"
    deadline = time.monotonic() + 20
    while not sandbox_processes():
        assert time.monotonic() < deadline and proc.poll() is None, "the program never started"
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    assert_clean()
