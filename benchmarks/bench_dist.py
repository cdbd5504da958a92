"""Seconds per GRPO step of the R1-Zero default on this machine: one process with 2 threads against
`torchrun --nproc-per-node 2` with 1 thread per process, side by side on one base model.

    python benchmarks/bench_dist.py --base runs/zero-tiny-ddp/base [--steps 12] [--out runs/bench-dist]

Four runs of `r1kit zero` from the same base (stage 0 skipped), the embedded default's RL settings
(16 prompts x 8 samples, 96 new tokens), held-out evaluation only before and after (not timed):
  1 process x 2 threads, rollout_seeds=batch  (the single-process default)
  1 process x 2 threads, rollout_seeds=group  (what a data-parallel run samples, in one process)
  1 process x 1 thread, rollout_seeds=batch   (separates the cost of a second thread from data parallelism)
  2 processes x 1 thread (torchrun, DDP, gloo; rollout_seeds=auto = group)
The figures are medians over steps 2..N of `time/step` and its phases from each run's metrics.jsonl.
Writes benchmarks/results/dist.{json,md}. The machine is shared: say how loaded it was with the figures.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
PHASES = ("time/step", "time/generate", "time/score", "time/update")


def run(name: str, launcher: list[str], base: Path, out: Path, steps: int, extra: list[str], eval_problems: int) -> dict:
    args = ["zero", f"model.path={base}", f"name={name}", f"output_dir={out}", f"grpo.steps={steps}", "eval.every=0",
            f"eval.num_problems={eval_problems}", "log.save_every=0", "log.progress=false", "log.tensorboard=false", *extra]
    shutil.rmtree(out / name, ignore_errors=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1" if "threads=1" in extra else "2"}
    t0 = time.time()
    subprocess.run([*launcher, *args], cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)
    wall = time.time() - t0
    records = [json.loads(x) for x in (out / name / "metrics.jsonl").read_text().splitlines()]
    steps_ = [r for r in records if r.get("step", 0) >= 2 and "time/step" in r]  # step 1 warms up
    return {"per_step": {k: [r[k] for r in steps_] for k in PHASES}, "wall_s": wall}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", type=Path, required=True, help="a pretrained base model folder (stage 0's output)")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-dist")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds over the settings")
    ap.add_argument("--eval-problems", type=int, default=50, help="held-out problems evaluated before and after (untimed)")
    ns = ap.parse_args()
    py = [sys.executable, "-m", "r1kit"]
    torchrun = [shutil.which("torchrun") or "torchrun", "--standalone", "--nproc-per-node", "2", "-m", "r1kit"]
    configs = {
        "1 process x 2 threads (rollout_seeds=batch)": (py, ["threads=2", "grpo.rollout_seeds=batch"]),
        "1 process x 2 threads (rollout_seeds=group)": (py, ["threads=2", "grpo.rollout_seeds=group"]),
        "1 process x 1 thread (rollout_seeds=batch)": (py, ["threads=1", "grpo.rollout_seeds=batch"]),
        "2 processes x 1 thread (torchrun, DDP)": (torchrun, ["threads=1"]),
    }
    load = os.getloadavg()[0]
    runs: dict[str, list[dict]] = {label: [] for label in configs}
    for _ in range(ns.rounds):  # interleaved, so a change in the machine's load hits every setting alike
        for i, (label, (launcher, extra)) in enumerate(configs.items()):
            runs[label].append(run(f"bench-{i}", launcher, ns.base.resolve(), ns.out.resolve(), ns.steps, extra,
                                   ns.eval_problems))
    results = {label: {**{k: statistics.median(x for r in rs for x in r["per_step"][k]) for k in PHASES},
                       "steps": sum(len(r["per_step"]["time/step"]) for r in rs),
                       "round_medians": [statistics.median(r["per_step"]["time/step"]) for r in rs]}
               for label, rs in runs.items()}
    ref = results[next(iter(results))]["time/step"]
    rows = ["| setting | s/step | generate | score | update | speed-up vs 1x2 | s/step per round |",
            "|---|---|---|---|---|---|---|"]
    for label, r in results.items():
        rows.append(f"| {label} | {r['time/step']:.3f} | {r['time/generate']:.3f} | {r['time/score']:.3f} | "
                    f"{r['time/update']:.3f} | {ref / r['time/step']:.2f}x | {', '.join(f'{x:.2f}' for x in r['round_medians'])} |")
    note = (f"Medians over steps 2..{ns.steps} of {ns.rounds} interleaved rounds of the zero-tiny default (16 x 8, 96 new tokens) from base "
            f"`{ns.base}`; load average {load:.1f} on {os.cpu_count()} cores when it started (shared machine).")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "dist.json").write_text(json.dumps({"results": results, "load_avg_start": load,
                                                   "cores": os.cpu_count(), "steps": ns.steps,
                                                   "rounds": ns.rounds}, indent=2))
    (RESULTS / "dist.md").write_text("\n".join(rows) + "\n\n" + note + "\n")
    print("\n".join(rows) + "\n\n" + note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
