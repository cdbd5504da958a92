"""GRPO-family ablation on the embedded R1-Zero task (`zero-tiny`): each variant x each seed, the same
number of RL steps, all from ONE shared base model, then a table and overlaid accuracy curves.

The full run (the one recorded in benchmarks/results/ablation.*; 6 variants x 3 seeds, ~1 h of CPU):

    python benchmarks/ablate_grpo.py --steps 150 --seeds 0 1 2

Options: --variants NAME... (default: all six presets of r1kit.config.GRPO_PRESETS), --base PATH (an HF
model folder; default: pretrain zero-tiny's base once into <out>/base, or reuse it), --eval-every N,
--out DIR (run folders, default runs/ablation), --results DIR (default benchmarks/results), and
`key=value` config overrides for every run. Overrides are positional: put them BEFORE the options.
A smoke run in about a minute (a tiny base, 3 steps, results kept out of benchmarks/results):

    python benchmarks/ablate_grpo.py model.hidden_size=32 model.num_layers=1 model.num_heads=2 \\
        model.num_kv_heads=2 model.intermediate_size=64 pretrain.steps=30 pretrain.gate_pass1=0 pretrain.corpus_docs=600 \\
        eval.num_problems=8 eval.k=1 eval.max_new_tokens=32 grpo.prompts_per_step=4 grpo.group_size=4 \\
        grpo.max_new_tokens=32 --steps 3 --eval-every 1 --seeds 0 1 --out /tmp/abl --results /tmp/abl/results

Each variant's preset values are passed as explicit `grpo.*` overrides (after the YAML, before yours):
zero-tiny.yaml sets some grpo keys itself (beta), and a key written in the file would otherwise win
over the preset (see GRPOConfig.preset). A run whose summary.json exists with the same number of steps
is reused, so an interrupted ablation resumes where it stopped.

Table columns: final held-out pass@1 (mean ± std over seeds); steps until pass@1 first reaches 80% of
the best pass@1 any run of the ablation reached (mean over the seeds that reached it, with how many
did); final held-out mean completion length (tokens); wall time per run (base and final evaluation
included) and the training part of it (sum of the steps' time).
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from r1kit.cli import config_path  # noqa: E402
from r1kit.config import GRPO_PRESETS, RunConfig, load_config  # noqa: E402
from r1kit.io import read_jsonl  # noqa: E402

VARIANTS = ("grpo_paper", "dr_grpo", "dapo", "gspo", "rloo", "reinforce_pp")
CONFIG = "zero-tiny"
THRESHOLD = 0.8  # "steps to reach 80% of the best accuracy"


def variant_overrides(variant: str) -> list[str]:
    """The preset as explicit `grpo.*` overrides (mappings key by key, so reward weights add up)."""
    out = [f"grpo.preset={variant}"]
    for key, value in GRPO_PRESETS[variant].items():
        if isinstance(value, dict):
            out += [f"grpo.{key}.{k}={json.dumps(v)}" for k, v in value.items()]
        else:
            out.append(f"grpo.{key}={json.dumps(value)}")
    return out


def shared_base(out: Path, extra: list[str]) -> Path:
    """Pretrain zero-tiny's base model once into <out>/base (reused when complete)."""
    from r1kit.recipes.zero import ensure_base_model

    cfg = load_config(RunConfig, config_path(CONFIG), [f"output_dir={out}", "name=base",
                                                       f"pretrain.output_dir={out / 'base'}", *extra])
    t0 = time.time()
    base = ensure_base_model(cfg, show_progress=True)
    print(f"base model: {base} ({time.time() - t0:.0f}s)", flush=True)
    return base


def run_one(variant: str, seed: int, base: Path, steps: int, eval_every: int, out: Path, extra: list[str]) -> dict:
    """One R1-Zero RL run of `variant` from `base`; returns its summary plus its metrics records."""
    from r1kit.recipes.zero import run_zero

    name = f"{variant}-s{seed}"
    run_dir = out / name
    summary_path = run_dir / "summary.json"
    done = summary_path.exists() and json.loads(summary_path.read_text()).get("steps") == steps
    if not done:
        shutil.rmtree(run_dir, ignore_errors=True)  # a half-finished run would leave stale metrics lines
        overrides = [*variant_overrides(variant), f"seed={seed}", f"name={name}", f"output_dir={out}",
                     f"grpo.steps={steps}", f"eval.every={eval_every}", f"model.path={base}", "log.progress=false",
                     "log.tensorboard=false", "log.save_every=0", *extra]
        cfg = load_config(RunConfig, config_path(CONFIG), overrides)
        t0 = time.time()
        run_zero(cfg)
        print(f"{name}: {time.time() - t0:.0f}s", flush=True)
    summary = json.loads(summary_path.read_text())
    summary["variant"], summary["metrics"] = variant, read_jsonl(run_dir / "metrics.jsonl")
    return summary


def accuracy_curve(run: dict) -> list[tuple[int, float]]:
    return [(m["step"], m["eval/pass1"]) for m in run["metrics"] if "eval/pass1" in m]


def first_step_reaching(curve: list[tuple[int, float]], target: float) -> int | None:
    return next((step for step, acc in curve if acc >= target), None)


def mean_std(xs: list[float], fmt: str = "{:.3f}") -> str:
    if not xs:
        return "—"
    if len(xs) == 1:
        return fmt.format(xs[0])
    return f"{fmt.format(statistics.mean(xs))} ± {fmt.format(statistics.stdev(xs))}"


def summarize(runs: list[dict], variants: list[str]) -> tuple[dict, float]:
    """Per-variant figures (see the module doc) and the accuracy the step counts aim at."""
    best = max((acc for r in runs for _, acc in accuracy_curve(r)), default=0.0)
    target = THRESHOLD * best
    table = {}
    for v in variants:
        rs = [r for r in runs if r["variant"] == v]
        steps = [first_step_reaching(accuracy_curve(r), target) for r in rs] if best > 0 else []
        reached = [s for s in steps if s is not None]  # best = 0: no run learned anything, nothing to count
        table[v] = {
            "seeds": [r["seed"] for r in rs],
            "final_pass1": [r["final"]["pass1"] for r in rs],
            "steps_to_target": reached,
            "final_mean_length": [r["final"]["mean_length"] for r in rs],
            "wall_s": [r["seconds"]["total"] for r in rs],
            "train_s": [sum(m.get("time/step", 0.0) for m in r["metrics"]) for r in rs],
            "base_pass1": [r["base"]["pass1"] for r in rs],
        }
    return table, target


def markdown(table: dict, target: float, meta: dict) -> str:
    lines = [
        f"# GRPO-family ablation on `{CONFIG}`", "",
        f"`{meta['command']}`", "",
        f"{meta['steps']} RL steps, seeds {meta['seeds']}, one shared base model ({meta['base']}), "
        f"held-out pass@1 every {meta['eval_every']} steps. Base pass@1: {mean_std(meta['base_pass1'])}.",
        f"Target for the step count: {THRESHOLD:.0%} of the best pass@1 seen in any run = {target:.3f}.", "",
        "| variant | final pass@1 | steps to target | final mean length (tokens) | wall s / run | train s / run |",
        "|---|---|---|---|---|---|",
    ]
    for v, t in table.items():
        n = len(t["seeds"])
        steps = f"{mean_std([float(s) for s in t['steps_to_target']], '{:.0f}')} ({len(t['steps_to_target'])}/{n})"
        lines.append(f"| {v} | {mean_std(t['final_pass1'])} | {steps} | {mean_std(t['final_mean_length'], '{:.1f}')} "
                     f"| {mean_std(t['wall_s'], '{:.0f}')} | {mean_std(t['train_s'], '{:.0f}')} |")
    return "\n".join(lines) + "\n"


def plot(runs: list[dict], variants: list[str], path: Path) -> None:
    """Held-out pass@1 and training completion length against step: mean over seeds, band = min..max."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("held-out pass@1", accuracy_curve),
              ("training completion length (tokens)",
               lambda r: [(m["step"], m["completion_len_mean"]) for m in r["metrics"] if "completion_len_mean" in m])]
    fig, axes = plt.subplots(1, len(panels), figsize=(12, 4))
    for ax, (title, curve) in zip(axes, panels):
        for v in variants:
            by_step: dict[int, list[float]] = {}
            for r in (r for r in runs if r["variant"] == v):
                for step, y in curve(r):
                    by_step.setdefault(step, []).append(y)
            if not by_step:
                continue
            steps = sorted(by_step)
            mean = [statistics.mean(by_step[s]) for s in steps]
            (line,) = ax.plot(steps, mean, label=v, marker="o" if len(steps) < 30 else None, ms=3)
            ax.fill_between(steps, [min(by_step[s]) for s in steps], [max(by_step[s]) for s in steps],
                            color=line.get_color(), alpha=0.15)
        ax.set_title(title)
        ax.set_xlabel("GRPO step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("overrides", nargs="*", help="key=value config overrides for every run (put them first)")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=sorted(GRPO_PRESETS))
    ap.add_argument("--base", default=None, help="base model folder (default: pretrain one into <out>/base)")
    ap.add_argument("--eval-every", type=int, default=10)
    ap.add_argument("--out", default="runs/ablation")
    ap.add_argument("--results", default=str(ROOT / "benchmarks" / "results"))
    ns = ap.parse_args(argv)
    bad = [o for o in ns.overrides if "=" not in o]
    if bad:
        ap.error(f"overrides must be key=value, got {bad}")
    out, results = Path(ns.out).resolve(), Path(ns.results)
    base = Path(ns.base).resolve() if ns.base else shared_base(out, ns.overrides)
    runs = [run_one(v, s, base, ns.steps, ns.eval_every, out, ns.overrides) for v in ns.variants for s in ns.seeds]

    table, target = summarize(runs, ns.variants)
    meta = {"command": "python benchmarks/ablate_grpo.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "config": CONFIG, "steps": ns.steps, "seeds": ns.seeds, "eval_every": ns.eval_every, "base": str(base),
            "base_pass1": [r["base"]["pass1"] for r in runs if r["variant"] == ns.variants[0]],
            "target_pass1": target, "presets": {v: GRPO_PRESETS[v] for v in ns.variants}}
    curves = {f"{r['variant']}-s{r['seed']}": accuracy_curve(r) for r in runs}
    results.mkdir(parents=True, exist_ok=True)
    (results / "ablation.json").write_text(json.dumps({**meta, "variants": table, "curves": curves}, indent=2) + "\n")
    md = markdown(table, target, meta)
    (results / "ablation.md").write_text(md)
    plot(runs, ns.variants, results / "ablation.png")
    print(md)
    print(f"wrote {results / 'ablation.md'}, .json, .png")


if __name__ == "__main__":
    main()
