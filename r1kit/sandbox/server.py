"""The sandbox fork server, and the trusted code that runs inside each sandbox. Standard library only.

The parent (r1kit.sandbox.pool) starts this file once per pool as `python -I -S server.py FD`: a small,
clean interpreter (no torch, no site-packages, no user `__main__`) that forks one *box* per job in about a
millisecond, where a fresh interpreter costs ~80 ms on a loaded 2-core machine. Process tree of one job:

    server (host, root)  --fork-->  B (host: watchdog; reads the job, makes the work dir, enforces the wall
      deadline, collects outputs, removes the work dir, answers the parent)
        --unshare(net, mount, pid) + fork-->  I (pid 1 of a new pid namespace: when it dies, the kernel kills
          every process in the namespace, so a fork bomb or an `os.setsid()` escape cannot outlive the job)
            --fork-->  C (the untrusted program: its own random uid, rlimits, no network, / read-only to it)

Every link has PR_SET_PDEATHSIG=SIGKILL: killing the parent (even `kill -9`) kills the server, then B, then I,
and with I the whole namespace. Namespaces are created by the unshare(2)/mount(2) syscalls themselves (what
`unshare --net --pid --fork --mount-proc` does), so nothing needs installing. Without root (or where the kernel
refuses), boxes run with rlimits, process groups and parent-death only: no network or file isolation.

Modes:
- "stdio": run the program once per case with the case's stdin; B returns each case's stdout/stderr (capped by
  RLIMIT_FSIZE) and status. Expected outputs never enter the box: the parent compares.
- "assert": the *tests* run in I (as another uid, with pristine builtins) and call the candidate's function in C
  over a pipe, with arguments and results as plain data (None, bool, int, float, complex, str, bytes, and
  lists, tuples, dicts, sets of them). C cannot touch the test code, the builtins it uses, or the verdict, which
  only I can write and only once the last test has returned. The tests reach I after C was forked, so they are
  never in C's memory.
"""
from __future__ import annotations

import ctypes
import json
import os
import random
import resource
import select
import shutil
import signal
import socket
import sys
import tempfile
import time
import traceback

PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS = 1, 38
CLONE_NEWNS, CLONE_NEWPID, CLONE_NEWNET = 0x00020000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 0x1, 0x2, 0x4, 0x20, 0x1000, 0x4000, 0x40000
_libc = ctypes.CDLL(None, use_errno=True)

# The wire format (frames, plain-data codec) lives next to this file. This script runs with -I (no script
# dir on sys.path), and the path must not stay: r1kit/sandbox/types.py would shadow the standard `types`.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
try:
    from wire import decode, encode, read_frame, write_frame  # noqa: E402
finally:
    del sys.path[0]
    sys.modules.pop("wire", None)


# ----------------------------------------------------------------------------- small helpers


def die_with_parent(expected_ppid: int | None) -> None:
    """SIGKILL this process when its parent dies; exit now if the parent is already gone."""
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if expected_ppid is not None and os.getppid() != expected_ppid:
        os._exit(70)


def _check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def kill_job_and_reap(pid: int) -> None:
    """After a program (child `pid`) ended: SIGKILL whatever it left running, and reap.

    Inside the job's pid namespace (this process is its pid 1), kill(-1) reaches exactly the processes of the
    namespace. Anywhere else kill(-1) would signal every process the caller may signal, as root the whole
    machine, so without a namespace only the program's process group is killed (a program that called
    setsid() escapes it: one of the guarantees lost without namespaces)."""
    try:
        if os.getpid() == 1:
            os.kill(-1, signal.SIGKILL)
        else:
            os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    while True:
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            return


def wait_pid(pid: int, deadline: float) -> int | None:
    """Wait status of child `pid`, or None at the deadline (the child is still running)."""
    try:
        pidfd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        pidfd = None
    try:
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                return status
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            if pidfd is not None:
                select.select([pidfd], [], [], left)
            else:
                time.sleep(min(left, 0.002))
    finally:
        if pidfd is not None:
            os.close(pidfd)


# ----------------------------------------------------------------------------- C: the untrusted program


def _limit(which: int, value: int) -> None:
    try:
        resource.setrlimit(which, (value, value))
    except (ValueError, OSError):
        pass


def become_untrusted(job: dict, fds: dict[int, int], parent: int) -> None:
    """In a fresh fork of I: keep only `fds` (target -> source), apply the limits, drop to the job's uid."""
    for target, source in fds.items():
        if target != source:
            os.dup2(source, target)
    os.closerange(max(fds) + 1, 1 << 16)
    lim = job["limits"]
    _limit(resource.RLIMIT_AS, lim["memory_mb"] << 20)
    cpu = max(1, int(lim["cpu_s"] + 0.999))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))  # SIGXCPU, then SIGKILL a second later
    _limit(resource.RLIMIT_FSIZE, lim["file_bytes"])
    _limit(resource.RLIMIT_NOFILE, lim["open_files"])
    _limit(resource.RLIMIT_CORE, 0)
    os.setpgid(0, 0)
    if job["isolated"]:
        _limit(resource.RLIMIT_NPROC, lim["processes"])  # counted per uid: each job has its own uid
        os.setgroups([])
        os.setgid(job["uid"])
        os.setuid(job["uid"])
    _libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    die_with_parent(parent)  # after setuid, which clears the parent-death signal
    for sig in (signal.SIGPIPE, signal.SIGXFSZ, signal.SIGINT, signal.SIGTERM, signal.SIGCHLD):
        signal.signal(sig, signal.SIG_DFL)


def _fresh_main() -> dict:
    """A new `__main__` module for the candidate: the server's globals are not reachable through it."""
    import types

    module = types.ModuleType("__main__")
    sys.modules["__main__"] = module
    module.__dict__["__builtins__"] = __builtins__
    return module.__dict__


def run_program(code: str) -> None:
    """Run `code` as a script (stdin/stdout/stderr already set up) and exit with its status."""
    sys.stdin = open(0, "r", closefd=False)
    sys.stdout = open(1, "w", closefd=False)
    sys.stderr = open(2, "w", closefd=False)
    status = 0
    try:
        exec(compile(code, "solution.py", "exec"), _fresh_main())
    except SystemExit as e:
        status = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:  # noqa: BLE001 - print any exception, as python would
        traceback.print_exc()
        status = 1
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:  # noqa: BLE001
            pass
    os._exit(status & 0xFF)


def serve_candidate(code: str, entry_point: str, rx: int, tx: int) -> None:
    """C in assert mode: define the candidate, then answer I's calls to `entry_point` until EOF."""
    sys.stdout = open(1, "w", closefd=False)
    sys.stderr = open(2, "w", closefd=False)
    try:
        env = _fresh_main()
        exec(compile(code, "solution.py", "exec"), env)
        fn = env.get(entry_point)
        if not callable(fn):
            write_frame(tx, {"load": f"the program defines no function {entry_point!r}"})
            os._exit(0)
        write_frame(tx, {"load": None})
    except BaseException as e:  # noqa: BLE001
        write_frame(tx, {"load": _exc_text(e)})
        os._exit(0)
    while True:
        try:
            args = decode(read_frame(rx))
        except (EOFError, OSError):
            os._exit(0)
        try:
            reply = {"ok": encode(fn(*args))}
        except TypeError as e:
            reply = {"raise": _exc_text(e)} if "not plain data" not in str(e) else {"bad": str(e)}
        except BaseException as e:  # noqa: BLE001
            reply = {"raise": _exc_text(e)}
        sys.stdout.flush()
        write_frame(tx, reply)


def _exc_text(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"[:2000]


# ----------------------------------------------------------------------------- I: inside the namespace


def _hidden_ancestor(path: str) -> str | None:
    """The topmost directory above `path` that other users cannot enter (e.g. /root), or None."""
    parts = os.path.abspath(path).split(os.sep)[1:]
    for i in range(1, len(parts)):
        parent = os.sep + os.path.join(*parts[:i])
        if not os.stat(parent).st_mode & 0o001:
            return parent
    return None


def expose_python() -> None:
    """Python's standard library must be readable by the program's uid. Where it lives under a directory
    others cannot enter (pyenv under /root), that directory is replaced, in this mount namespace only, by an
    empty tmpfs holding just a read-only bind of the Python installation."""
    for prefix in dict.fromkeys((sys.base_prefix, sys.prefix)):
        top = _hidden_ancestor(prefix)
        if top is None:
            continue
        fd = os.open(prefix, os.O_PATH)
        try:
            _check(_libc.mount(b"tmpfs", top.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, b"size=64k,mode=755"),
                   f"hide {top}")
            os.makedirs(prefix, mode=0o755, exist_ok=True)
            _check(_libc.mount(f"/proc/self/fd/{fd}".encode(), prefix.encode(), None, MS_BIND | MS_REC, None),
                   f"expose {prefix}")
            _libc.mount(None, prefix.encode(), None, MS_BIND | MS_REMOUNT | MS_RDONLY, None)
        finally:
            os.close(fd)


def setup_filesystem(job: dict) -> None:
    """Private mounts: a fresh tmpfs on /tmp is the work dir (it vanishes with the namespace, even after a
    kill -9), other world-writable dirs are empty tmpfs, /proc shows only this namespace. Everything else
    keeps host permissions, which the job's uid (owner of nothing on the host) cannot write."""
    _check(_libc.unshare(CLONE_NEWNS), "unshare(mount)")  # I's own: B stays in the host's mount namespace
    _check(_libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None), "make / private")
    expose_python()
    size = f"size={4 * job['limits']['file_bytes'] + (4 << 20)},mode=700".encode()
    _check(_libc.mount(b"tmpfs", b"/tmp", b"tmpfs", MS_NOSUID | MS_NODEV, size), "mount the work dir on /tmp")
    os.chown("/tmp", job["uid"], job["uid"])
    for path in (b"/var/tmp", b"/dev/shm", b"/run/lock"):
        if os.path.isdir(path):
            _libc.mount(b"tmpfs", path, b"tmpfs", MS_NOSUID | MS_NODEV, b"size=64k,mode=755")
    _libc.mount(b"proc", b"/proc", b"proc", MS_NOSUID | MS_NODEV, None)
    os.chdir("/tmp")


def _outputs(i: int, job: dict) -> tuple[str, str]:
    cap = job["limits"]["output_bytes"]
    return read_capped(f".out{i}", cap), read_capped(f".err{i}", cap)


def _status(status: int) -> dict:
    if os.WIFSIGNALED(status):
        return {"signal": os.WTERMSIG(status)}
    return {"exit": os.WEXITSTATUS(status)}


def stdio_cases(job: dict, out: int) -> None:
    """I in stdio mode: each case in a fresh fork, stdin from a file, stdout/stderr to capped files."""
    results = []
    for i, stdin in enumerate(job["cases"]):
        with open(f".in{i}", "w", encoding="utf-8", errors="surrogatepass") as f:
            f.write(stdin)
        fin = os.open(f".in{i}", os.O_RDONLY)
        fo = os.open(f".out{i}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        fe = os.open(f".err{i}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        start = time.monotonic()
        pid = os.fork()
        if pid == 0:
            become_untrusted(job, {0: fin, 1: fo, 2: fe}, os.getppid())
            run_program(job["code"])
        for fd in (fin, fo, fe):
            os.close(fd)
        status = wait_pid(pid, start + job["limits"]["timeout_s"])
        kill_job_and_reap(pid)
        res = {"seconds": time.monotonic() - start}
        res.update({"timeout": True} if status is None else _status(status))
        res["stdout"], res["stderr"] = _outputs(i, job)
        results.append(res)
        if status is None and job.get("stop_on_timeout", True):
            break
    write_frame(out, {"cases": results})


def assert_tests(job: dict, jobfd: int, out: int) -> None:
    """I in assert mode: fork the candidate, read the tests, run them here against a proxy of it."""
    req_r, req_w = os.pipe()
    rep_r, rep_w = os.pipe()
    null = os.open(os.devnull, os.O_RDONLY)
    fo = os.open(".out0", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    fe = os.open(".err0", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    keep = (os.open(".out0", os.O_RDONLY), os.open(".err0", os.O_RDONLY))  # read after dropping privileges
    pid = os.fork()
    if pid == 0:
        become_untrusted(job, {0: null, 1: fo, 2: fe, 3: req_r, 4: rep_w}, os.getppid())
        serve_candidate(job["code"], job["entry_point"], 3, 4)
    for fd in (req_r, rep_w, null, fo, fe):
        os.close(fd)
    if job["isolated"]:  # the tests are trusted, but need no privileges either
        os.setgroups([])
        os.setgid(job["uid"] + 1)
        os.setuid(job["uid"] + 1)
    secret = read_frame(jobfd)
    os.close(jobfd)
    deadline = time.monotonic() + job["limits"]["timeout_s"]
    from_harness = run_assert_tests(secret, job["entry_point"], pid, req_w, rep_r, deadline)
    cap = job["limits"]["output_bytes"]
    from_harness["stdout"], from_harness["stderr"] = (os.pread(fd, cap, 0).decode("utf-8", "replace") for fd in keep)
    write_frame(out, from_harness)
    if not job["isolated"]:  # no namespace to take the candidate down with us
        kill_job_and_reap(pid)


class CandidateError(Exception):
    """The candidate raised, or returned something that is not plain data."""


class HarnessError(Exception):
    """The tests cannot be run as written (a problem with the problem, not with the program)."""


def _candidate_proxy(pid: int, tx: int, rx: int, deadline: float):
    def candidate(*args):
        try:
            message = encode(list(args))
        except TypeError as e:
            raise HarnessError(f"the test passes an argument that is not plain data ({e})") from None
        write_frame(tx, message)
        reply = read_frame(rx, deadline, limit=16 << 20)
        if "ok" in reply:
            return decode(reply["ok"])
        if "raise" in reply:
            raise CandidateError(reply["raise"])
        raise CandidateError(f"the function returned {reply.get('bad', 'a malformed reply')}")

    return candidate


def _gone(pid: int, deadline: float) -> dict:
    """How the candidate process ended (it closed its pipe); {"timeout": True} if it is still running."""
    status = wait_pid(pid, deadline)
    return {"timeout": True} if status is None else _status(status)


def _failed_line(tb, source: str) -> str:
    lines = source.splitlines()
    for frame in reversed(traceback.extract_tb(tb)):
        if frame.filename == "<test>" and frame.lineno and 0 < frame.lineno <= len(lines):
            return lines[frame.lineno - 1].strip()[:500]
    return ""


def run_assert_tests(secret: dict, entry_point: str, pid: int, tx: int, rx: int, deadline: float) -> dict:
    """Load the candidate, run setup then each test; the verdict is built only here, in trusted code."""
    try:
        loaded = read_frame(rx, deadline)
    except TimeoutError:
        return {"timeout": True, "passed": 0}
    except (EOFError, OSError, ValueError):
        return {"gone": _gone(pid, deadline), "passed": 0}
    if loaded.get("load") is not None:
        return {"load_error": str(loaded["load"]), "passed": 0}
    env = {"__name__": "__test__"}
    try:
        exec(compile(secret["setup"], "<setup>", "exec"), env)
    except BaseException as e:  # noqa: BLE001
        return {"passed": 0, "harness_error": f"the problem's setup code fails: {_exc_text(e)}"}
    # Tests may call the function by its own name too (HumanEval/33 does), as in HumanEval's harness.
    env["candidate"] = env[entry_point] = _candidate_proxy(pid, tx, rx, deadline)
    passed, first = 0, None
    for i, test in enumerate(secret["tests"]):
        outcome = _one_test(test, env, pid, deadline)
        if outcome is None:
            passed += 1
            continue
        outcome["failed"] = i
        first = first or outcome
        if "error" not in outcome and "line" not in outcome:  # timeout, crash, broken harness: stop here
            break
    return dict(first or {"done": True}, passed=passed)


def _one_test(test: str, env: dict, pid: int, deadline: float) -> dict | None:
    """None if the test ran to its end; else what stopped it."""
    try:
        exec(compile(test, "<test>", "exec"), env)
    except AssertionError as e:
        return {"line": _failed_line(e.__traceback__, test) or "assert", "message": str(e)[:500]}
    except CandidateError as e:
        return {"error": str(e)}
    except TimeoutError:
        return {"timeout": True}
    except HarnessError as e:
        return {"harness_error": str(e)}
    except (EOFError, OSError):
        return {"gone": _gone(pid, deadline)}
    except BaseException as e:  # noqa: BLE001 - the test itself raised (e.g. on a wrong type)
        return {"error": _exc_text(e), "line": _failed_line(e.__traceback__, test)}
    return None


def namespace_init(job: dict, jobfd: int, out: int, lifeline: int) -> None:
    """I: pid 1 of the job's namespaces. Dies with B; its death takes every process of the job with it."""
    die_with_parent(None)
    os.set_blocking(lifeline, False)
    try:
        if os.read(lifeline, 1) == b"":  # B died before the parent-death signal was armed
            os._exit(71)
    except BlockingIOError:
        pass
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    if job["isolated"]:
        setup_filesystem(job)
    if job["mode"] == "stdio":
        stdio_cases(job, out)
    else:
        assert_tests(job, jobfd, out)
    os._exit(0)


# ----------------------------------------------------------------------------- B: the watchdog on the host


def read_capped(path: str, cap: int) -> str:
    try:
        with open(path, "rb") as f:
            data = f.read(cap)
    except OSError:
        return ""
    return data.decode("utf-8", errors="replace")


def box(jobfd: int, resfd: int, server: int) -> None:
    """B: one job, start to end; always answers the parent with exactly one result frame."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    die_with_parent(server)
    write_frame(resfd, {"pid": os.getpid()})
    workdir = None
    try:
        job = read_frame(jobfd)
        job["uid"] = random.SystemRandom().randrange(1 << 20, 1 << 30, 2)
        if not job["isolated"]:  # no private tmpfs: a host temp dir, removed below
            workdir = tempfile.mkdtemp(prefix="r1kit-sbx-", dir=job.get("tmp_root") or None)
            os.chdir(workdir)
        result = supervise(job, jobfd)
    except BaseException as e:  # noqa: BLE001 - anything here is the sandbox's own failure
        result = {"sandbox_error": f"{type(e).__name__}: {e}"}
    finally:
        if workdir is not None:
            os.chdir("/")
            shutil.rmtree(workdir, ignore_errors=True)
    write_frame(resfd, result)
    os._exit(0)


def supervise(job: dict, jobfd: int) -> dict:
    """Start I in fresh namespaces, wait for it within the deadline, then gather its report and outputs."""
    if job["isolated"]:
        _check(_libc.unshare(CLONE_NEWPID | CLONE_NEWNET), "unshare(net, pid)")
    out_r, out_w = os.pipe()
    life_r, life_w = os.pipe()
    n_runs = len(job["cases"]) if job["mode"] == "stdio" else 1
    deadline = time.monotonic() + job["limits"]["timeout_s"] * n_runs + 0.5
    pid = os.fork()
    if pid == 0:
        os.close(out_r)
        os.close(life_w)
        namespace_init(job, jobfd, out_w, life_r)
    os.close(out_w)
    os.close(life_r)
    os.close(jobfd)
    try:
        report = read_frame(out_r, deadline)
    except TimeoutError:
        report = {"timeout": True, "whole": True}
    except (EOFError, ValueError):
        report = {"init_died": True}
    status = wait_pid(pid, deadline)
    if status is None:
        os.kill(pid, signal.SIGKILL)
        status = os.waitpid(pid, 0)[1]
    report["init"] = _status(status)
    return report


# ----------------------------------------------------------------------------- the server


def isolation_available() -> bool:
    """Whether this process may create the namespaces (root, or a kernel that allows it): try once."""
    if os.geteuid() != 0:
        return False
    pid = os.fork()
    if pid == 0:
        try:
            _check(_libc.unshare(CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWNET), "unshare")
            child = os.fork()
            if child == 0:
                _check(_libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None), "mount")
                os._exit(0)
            os._exit(os.waitstatus_to_exitcode(os.waitpid(child, 0)[1]))
        except BaseException:  # noqa: BLE001
            os._exit(1)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0


def serve(sock_fd: int, parent: int) -> None:
    """Fork one box per request: a request is a one-byte message carrying (job read end, result write end)."""
    die_with_parent(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sock = socket.socket(fileno=sock_fd)
    isolated = isolation_available()
    sock.sendall(json.dumps({"isolated": isolated, "pid": os.getpid()}).encode())
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # boxes are reaped by the kernel
    me = os.getpid()
    while True:
        try:
            msg, fds, _, _ = socket.recv_fds(sock, 16, 2)
        except OSError:
            return
        if not msg:
            return
        if len(fds) != 2:
            for fd in fds:
                os.close(fd)
            continue
        if os.fork() == 0:
            sock.close()
            box(fds[0], fds[1], me)
        for fd in fds:
            os.close(fd)


if __name__ == "__main__":
    serve(int(sys.argv[1]), int(sys.argv[2]))
