"""Sandbox speed: runs per second and latency, per isolation option, and the cost of scoring a GRPO batch.

    python benchmarks/bench_sandbox.py [--runs 200] [--workers 2] [--out benchmarks/results/sandbox.json]

Side by side in one process, the same tiny program (`print(sum(range(100)))`) run `--runs` times with
`--workers` jobs in flight:
- "fork server + namespaces": r1kit's default (new net/mount/pid namespaces, random uid, rlimits, tmpfs);
- "fork server, rlimits only": the same server with the namespaces off (SandboxPool(isolate=False));
- "python per run": a fresh `python -I -S -c` per run, no isolation (what subprocess-based harnesses pay);
- "unshare(1) + python per run": `unshare --net --pid --fork --mount-proc python -I -S -c` per run.
Then "score 128 completions": the `code` reward on 128 distinct programs, 3 asserts each, as a GRPO step of
16 prompts x 8 samples would. The machine is shared: compare rows of one run, not runs of different days.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from r1kit.rewards.code import code_rewards
from r1kit.sandbox import run_program
from r1kit.sandbox.pool import SandboxPool
from r1kit.types import CodeTests, Problem

PROGRAM = "print(sum(range(100)))"


def stats(latencies: list[float], wall: float) -> dict[str, float]:
    ts = sorted(latencies)
    return {"runs_per_s": round(len(ts) / wall, 1), "p50_ms": round(1e3 * ts[len(ts) // 2], 1),
            "p99_ms": round(1e3 * ts[min(len(ts) - 1, int(0.99 * len(ts)))], 1)}


def timed(fn, runs: int, workers: int) -> dict[str, float]:
    def one(_):
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    one(0)  # warm-up (server start, page cache)
    start = time.perf_counter()
    with ThreadPoolExecutor(workers) as ex:
        latencies = list(ex.map(one, range(runs)))
    return stats(latencies, time.perf_counter() - start)


def subprocess_run(argv: list[str]) -> None:
    out = subprocess.run(argv, capture_output=True, timeout=30)
    assert out.stdout.strip() == b"4950", out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/sandbox.json"))
    args = ap.parse_args()
    rows = {}
    with SandboxPool(args.workers) as pool:
        assert pool.isolated, "run as root (or where namespaces are allowed) to measure the default"
        rows["fork server + namespaces"] = timed(lambda: run_program(PROGRAM, pool=pool), args.runs, args.workers)
    with SandboxPool(args.workers, isolate=False) as pool:
        rows["fork server, rlimits only"] = timed(lambda: run_program(PROGRAM, pool=pool), args.runs, args.workers)
    py = [sys.executable, "-I", "-S", "-c", PROGRAM]
    rows["python per run"] = timed(lambda: subprocess_run(py), args.runs, args.workers)
    if shutil.which("unshare") and os.geteuid() == 0:
        rows["unshare(1) + python per run"] = timed(
            lambda: subprocess_run(["unshare", "--net", "--pid", "--fork", "--mount-proc", *py]), args.runs, args.workers)
    tests = CodeTests("assert", entry_point="f", asserts=("assert candidate(1) == 2", "assert candidate(2) == 4",
                                                          "assert candidate(-3) == -6"))
    problems = [Problem(f"p{i}", "double", "", answer_style="code", tests=tests) for i in range(128)]
    completions = [f"<answer>\ndef f(x):\n    return x * 2 + {i % 2} * 0  # sample {i}\n</answer>" for i in range(128)]
    code_rewards(completions[:2], problems[:2])  # start the process-wide pool
    start = time.perf_counter()
    scores = code_rewards(completions, problems)
    batch = time.perf_counter() - start
    assert scores == [1.0] * 128
    report = {"runs": args.runs, "workers": args.workers, "cpus": os.cpu_count(), "load_avg": os.getloadavg(),
              "options": rows, "score_128_completions_s": round(batch, 2)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    for name, row in rows.items():
        print(f"{name:32s} {row['runs_per_s']:7.1f} runs/s  p50 {row['p50_ms']:6.1f} ms  p99 {row['p99_ms']:6.1f} ms")
    print(f"score 128 completions (3 asserts each): {batch:.2f} s; load average {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
