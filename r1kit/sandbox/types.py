"""The sandbox's typed values: limits in, one typed verdict out."""
from __future__ import annotations

from dataclasses import dataclass

from r1kit.types import R1KitError

# Verdict statuses. "sandbox_error" is the sandbox's own failure (it could not run the job, or the problem's
# tests are broken): never the program's fault, so it is logged and counted apart from a wrong answer.
PASSED, FAILED, ERROR, TIMEOUT, MEMORY, OUTPUT_LIMIT, SANDBOX_ERROR = (
    "passed", "failed", "error", "timeout", "memory", "output_limit", "sandbox_error")
STATUSES = (PASSED, FAILED, ERROR, TIMEOUT, MEMORY, OUTPUT_LIMIT, SANDBOX_ERROR)


@dataclass(frozen=True)
class Limits:
    """What one program may use. `timeout_s` is wall time per run (per case for stdin/stdout tests)."""

    timeout_s: float = 5.0
    cpu_s: float = 5.0  # CPU seconds of the program (all its threads); SIGXCPU, then SIGKILL
    memory_mb: int = 512  # address space per process (RLIMIT_AS): a memory bomb gets MemoryError
    output_bytes: int = 1 << 20  # stdout, stderr and any file it writes (RLIMIT_FSIZE); more -> output_limit
    processes: int = 32  # processes + threads of the job's uid (RLIMIT_NPROC): a fork bomb stops here
    open_files: int = 64

    def __post_init__(self) -> None:
        for name in ("timeout_s", "cpu_s"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0 < value <= 3600):
                raise R1KitError(f"sandbox limit {name} must be in (0, 3600] seconds, got {value!r}")
        for name, low in (("memory_mb", 32), ("output_bytes", 1), ("processes", 1), ("open_files", 8)):
            value = getattr(self, name)
            if not (isinstance(value, int) and value >= low):
                raise R1KitError(f"sandbox limit {name} must be an integer >= {low}, got {value!r}")

    def to_job(self) -> dict:
        return {"timeout_s": float(self.timeout_s), "cpu_s": float(self.cpu_s), "memory_mb": self.memory_mb,
                "file_bytes": self.output_bytes, "output_bytes": self.output_bytes,
                "processes": self.processes, "open_files": self.open_files}


@dataclass(frozen=True)
class RunResult:
    """One run of a program on one stdin. status: "ok" (exit 0), "error" (non-zero exit or a signal),
    "timeout", "memory", "output_limit" or "sandbox_error"."""

    status: str
    stdout: str
    stderr: str
    exit_code: int | None  # None when killed by a signal or not run
    signal: int | None
    seconds: float
    detail: str = ""  # why, in words, when status is not "ok"


@dataclass(frozen=True)
class TestVerdict:
    """The outcome of running a program against a problem's tests."""

    status: str  # one of STATUSES
    passed: int  # tests that passed before the first failure
    total: int
    failed_test: int | None = None  # index of the first test that did not pass
    detail: str = ""  # the failing assert line, the exception text, or what went wrong
    stdout: str = ""
    stderr: str = ""
    seconds: float = 0.0

    @property
    def fraction(self) -> float:
        return self.passed / self.total if self.total else 0.0

    @property
    def ok(self) -> bool:
        return self.status == PASSED
