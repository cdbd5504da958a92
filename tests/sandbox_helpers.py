"""Shared checks for the sandbox tests: stray processes and temp dirs after a job."""
from __future__ import annotations

import glob
import os
import tempfile
import time

SANDBOX_UID_MIN = 1 << 20  # boxes run as random uids in [2**20, 2**30)


def sandbox_processes() -> list[int]:
    """Pids of live (non-zombie) processes owned by a sandbox uid."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            if os.stat(f"/proc/{name}").st_uid < SANDBOX_UID_MIN:
                continue
            with open(f"/proc/{name}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
        if state != "Z":
            found.append(int(name))
    return found


def sandbox_dirs() -> list[str]:
    return glob.glob(os.path.join(tempfile.gettempdir(), "r1kit-sbx-*"))


def assert_clean(timeout_s: float = 15.0) -> None:
    """No process of a sandbox uid and no sandbox work dir is left. Waits up to `timeout_s` for the kernel to
    reap killed boxes (seconds under heavy load), returning as soon as everything is gone."""
    deadline = time.monotonic() + timeout_s
    while True:
        procs, dirs = sandbox_processes(), sandbox_dirs()
        if not procs and not dirs:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"left behind: processes {procs}, dirs {dirs}")
        time.sleep(0.05)
