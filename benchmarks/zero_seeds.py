"""The R1-Zero acceptance run: the embedded default (`r1kit zero`) over several seeds, each from scratch
(pretraining included), and one table + overlaid curves of the two signature results.

    python benchmarks/zero_seeds.py --seeds 0 1 2 [--out runs/seeds] [--jobs 1] [key=value ...]

Writes benchmarks/results/zero_seeds.{json,md,png}. Each seed is a separate `r1kit zero` process, so its
wall time is what a user sees for the README's main command, when it runs alone (--jobs 1, the default);
with --jobs 2 two seeds share the machine (pass threads=1) and their times are not the README's figure.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def run_seed(seed: int, out: Path, overrides: list[str]) -> dict:
    name = f"zero-tiny-s{seed}"
    summary = out / name / "summary.json"
    if not summary.exists():
        t0 = time.time()
        cmd = [sys.executable, "-m", "r1kit.cli", "zero", f"seed={seed}", f"name={name}", f"output_dir={out}",
               "log.progress=false", *overrides]
        subprocess.run(cmd, check=True, cwd=ROOT)
        print(f"seed {seed}: {time.time() - t0:.0f}s wall", flush=True)
    s = json.loads(summary.read_text())
    info = json.loads((Path(s["base_model"]) / "pretrain.json").read_text())
    s["pretrain_steps"] = info.get("total_steps", info.get("steps", 0))  # all attempts
    gate = info.get("gate", {})
    kept = [c for c in gate.get("checks", []) if c.get("attempt", 0) == gate.get("kept_attempt", 0)]
    s["attempts"] = 1 + max((c.get("attempt", 0) for c in gate.get("checks", [])), default=0)
    s["gate_pass1"] = kept[-1]["gate_pass1"] if kept else float("nan")
    s["metrics"] = [json.loads(x) for x in (out / name / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return s


def mean_std(xs: list[float]) -> str:
    return f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs):.3f}" if len(xs) > 1 else f"{xs[0]:.3f}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", default="runs/seeds")
    ap.add_argument("--jobs", type=int, default=1, help="seeds run at once (their wall times then overlap)")
    ap.add_argument("overrides", nargs="*")
    ns = ap.parse_args()
    out = (ROOT / ns.out).resolve()
    with ThreadPoolExecutor(max_workers=max(1, ns.jobs)) as pool:
        runs = list(pool.map(lambda s: run_seed(s, out, ns.overrides), ns.seeds))
    rows = []
    for r in runs:
        b, f = r["base"], r["final"]
        rows.append({"seed": r["seed"], "base_pass1": b["pass1"], "final_pass1": f["pass1"], "base_cons": b["cons"],
                     "final_cons": f["cons"], "base_len": b["mean_length"], "final_len": f["mean_length"],
                     "base_reflection": b["reflection_rate"], "final_reflection": f["reflection_rate"],
                     "pretrain_steps": r.get("pretrain_steps", 0), "attempts": r["attempts"],
                     "gate_pass1": r.get("gate_pass1", float("nan")),
                     "pretrain_s": r["seconds"]["pretrain"], "rl_s": r["seconds"]["rl"], "total_s": r["seconds"]["total"]})
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "zero_seeds.json").write_text(json.dumps(rows, indent=2) + "\n")
    cols = list(rows[0])[1:]
    md = ["| seed | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    md += [f"| {r['seed']} | " + " | ".join(f"{r[c]:.3f}" if c.endswith(("pass1", "cons", "reflection"))
                                             else str(r[c]) if c == "attempts" else f"{r[c]:.1f}"
                                             for c in cols) + " |" for r in rows]
    md.append("| mean ± std | " + " | ".join(mean_std([r[c] for r in rows]) for c in cols) + " |")
    (RESULTS / "zero_seeds.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    plot(runs, RESULTS / "zero_seeds.png")


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("held-out pass@1 (k=4, T=0.6)", "eval/pass1"), ("mean completion length (tokens)", "completion_len_mean"),
              ("reflection rate", "reflection_rate")]
    fig, axes = plt.subplots(1, len(panels), figsize=(13, 3.6))
    for ax, (title, key) in zip(axes, panels):
        for r in runs:
            pts = [(m["step"], m[key]) for m in r["metrics"] if key in m]
            if pts:
                ax.plot(*zip(*pts), label=f"seed {r['seed']}", marker="o" if key.startswith("eval") else None, ms=3)
        ax.set_title(title)
        ax.set_xlabel("GRPO step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
