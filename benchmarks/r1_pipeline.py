"""The R1 acceptance run: `r1kit pipeline r1-tiny` per seed (every stage from scratch) plus the
R1-Zero + language-reward ablation, and one table of every stage's held-out evaluation.

    python benchmarks/r1_pipeline.py --seeds 0 [1 2] [--out runs/r1] [--jobs N] [key=value ...]

Writes benchmarks/results/r1_pipeline.{json,md}. Each seed's pipeline is one `r1kit pipeline` process
(resumable: a rerun skips finished stages, so an interrupted benchmark continues). Cells are mean ± std
over seeds (population std is not used: sample std, ddof=1; one seed shows the value alone).
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from r1kit.config import RunConfig, load_config  # noqa: E402
from r1kit.recipes.r1_report import attempts, general_rm_score, readability_of  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
ROWS = [("base", "base", "base model"), ("zero", "zero", "R1-Zero (RL from base, rule rewards)"),
        ("zerolang", "zero", "  R1-Zero + language reward"),
        ("base", "cold_sft", "R1 stage 1: cold-start SFT"), ("base", "reason_rl", "R1 stage 2: reasoning RL + language reward"),
        ("base", "reason_rl_nolang", "  stage 2 without language reward"),
        ("base", "sft", "R1 stage 3: SFT of base on rejection-sampled data"),
        ("base", "rl_all", "R1 stage 4: RL, all scenarios (final R1)"),
        ("base", "student_base", "student, pretrained only"), ("base", "distill", "student distilled from R1 (SFT only)"),
        ("base", "student_rl", "student RL-only (distillation's wall-clock)")]
COLS = [("pass1", "pass@1"), ("cons", "cons@4"), ("format_rate", "format"), ("readability", "readable"),
        ("mixing_rate", "lang. mixing"), ("off_target_rate", "off-target"), ("repetition_rate", "repetitive"),
        ("mean_length", "mean length"), ("general_pass1", "general pass@1")]


def run(args: list[str]) -> None:
    t0 = time.time()
    subprocess.run([sys.executable, "-m", "r1kit.cli", "pipeline", "r1-tiny", "log.progress=false", *args],
                   check=True, cwd=ROOT)
    print(f"  {' '.join(args[:2])}: {time.time() - t0:.0f}s", flush=True)


def run_seed(seed: int, out: Path, overrides: list[str], report_only: bool = False) -> dict[str, dict]:
    main, ablation = f"r1-tiny-s{seed}", f"r1-tiny-s{seed}-zerolang"
    base = out / main / "base" / "model"
    if not report_only:
        run([f"seed={seed}", f"name={main}", f"output_dir={out}", *overrides])
        run([f"seed={seed}", f"name={ablation}", f"output_dir={out}", f"model.path={base}", "pipeline.stages=[base, zero]",
             "pipeline.overrides.zero.grpo.reward_weights={accuracy: 1.0, format: 0.1, language: 1.0}", *overrides])
    recs = {"base": {}, "zerolang": {}}
    for key, name in (("base", main), ("zerolang", ablation)):
        for f in (out / name).glob("*/done.json"):
            rec = recs[key][f.parent.name] = json.loads(f.read_text())
            if "eval" in rec and "readability" not in rec["eval"]:  # finished before the metric existed
                rec["eval"].update(readability_of(f.parent, "en"))
    recs["zero"] = recs["base"]
    rm_model = out / main / "rm" / "model"
    if rm_model.exists():  # the reward model's view of the general samples before and after stage 4
        cfg = load_config(RunConfig, out / main / "config.yaml")
        recs["rm_scores"] = {st: general_rm_score(out / main / st, rm_model, cfg) for st in ("sft", "rl_all")}
    return recs


def cell(values: list[float], digits: int) -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def metric(runs: list[dict], run_key: str, stage: str, col: str) -> list[float]:
    return [r[run_key][stage]["eval"][col] for r in runs if stage in r[run_key] and col in r[run_key][stage].get("eval", {})]


def mean_of(runs, run_key, stage, col) -> float:
    v = metric(runs, run_key, stage, col)
    return statistics.mean(v) if v else float("nan")


def claims(runs: list[dict]) -> list[str]:
    """The paper's claims, each checked against the measured means (verdicts computed, not written)."""
    m = lambda key, stage, col: mean_of(runs, key, stage, col)  # noqa: E731
    out = []

    def claim(text: str, holds: bool | None, detail: str) -> None:
        verdict = "cannot be tested" if holds is None else "holds" if holds else "does not hold"
        out.append(f"- **{text}**: {verdict} here ({detail}).")

    claim("RL from the base model alone (R1-Zero) raises accuracy", m("zero", "zero", "pass1") > m("base", "base", "pass1"),
          f"pass@1 {m('base', 'base', 'pass1'):.3f} -> {m('zero', 'zero', 'pass1'):.3f}")
    claim("R1-Zero's reasoning mixes languages", m("zero", "zero", "mixing_rate") > 0.01,
          f"mixing {m('zero', 'zero', 'mixing_rate'):.3f}, off-target {m('zero', 'zero', 'off_target_rate'):.3f}")
    for run_key, with_, without, where in (("zerolang", "zero", None, "from base"),
                                           ("base", "reason_rl", "reason_rl_nolang", "from the cold start")):
        w_mix, w_acc = m(run_key, with_, "off_target_rate"), m(run_key, with_, "pass1")
        wo_key, wo_stage = ("zero", "zero") if without is None else ("base", without)
        wo_mix, wo_acc = m(wo_key, wo_stage, "off_target_rate"), m(wo_key, wo_stage, "pass1")
        claim(f"the language-consistency reward removes language mixing ({where})", None if wo_mix == 0 else w_mix < wo_mix,
              f"off-target rate {wo_mix:.3f} without -> {w_mix:.3f} with; mixing "
              f"{m(wo_key, wo_stage, 'mixing_rate'):.3f} -> {m(run_key, with_, 'mixing_rate'):.3f}")
        claim(f"... at a small accuracy cost ({where})", w_acc <= wo_acc,
              f"pass@1 {wo_acc:.3f} without -> {w_acc:.3f} with")
    claim("cold-start SFT makes the output readable (format, target language)",
          m("base", "cold_sft", "format_rate") >= m("base", "base", "format_rate") and m("base", "cold_sft", "off_target_rate") <= m("base", "base", "off_target_rate"),
          f"format {m('base', 'base', 'format_rate'):.3f} -> {m('base', 'cold_sft', 'format_rate'):.3f}; off-target "
          f"{m('base', 'base', 'off_target_rate'):.3f} -> {m('base', 'cold_sft', 'off_target_rate'):.3f}")
    claim("the final R1 model is at least as accurate as R1-Zero and more readable",
          m("base", "rl_all", "pass1") >= m("zero", "zero", "pass1") and m("base", "rl_all", "off_target_rate") <= m("zero", "zero", "off_target_rate"),
          f"pass@1 {m('zero', 'zero', 'pass1'):.3f} (R1-Zero) vs {m('base', 'rl_all', 'pass1'):.3f} (R1); off-target "
          f"{m('zero', 'zero', 'off_target_rate'):.3f} vs {m('base', 'rl_all', 'off_target_rate'):.3f}")
    claim("cold start gives more readable output than R1-Zero (reasoning -> summary -> answer, no repetition, one "
          "language)", m("base", "cold_sft", "readability") > m("zero", "zero", "readability"),
          f"readable share R1-Zero {m('zero', 'zero', 'readability'):.3f}, cold-start SFT "
          f"{m('base', 'cold_sft', 'readability'):.3f}, final R1 {m('base', 'rl_all', 'readability'):.3f}")
    claim("distillation beats RL on the small model at equal wall-clock",
          m("base", "distill", "pass1") > m("base", "student_rl", "pass1"),
          f"pass@1 distilled {m('base', 'distill', 'pass1'):.3f} vs RL-only {m('base', 'student_rl', 'pass1'):.3f}")
    return out


GATED = ("base", "cold_sft", "sft")


def acceptance(run: dict) -> list[tuple[str, bool | None, str]]:
    """Issue 15's per-seed checks on one seed's records: (check, holds or None when not measured, detail)."""
    b = run["base"]
    p = lambda stage, col="pass1": b.get(stage, {}).get("eval", {}).get(col)  # noqa: E731
    out = []
    trained = [s for s in b if s not in ("base", "student_base", "distill", "student_rl") and p(s) is not None]
    below = [s for s in trained if p(s) <= p("base")] + ([s for s in ("distill", "student_rl") if p(s) is not None
                                                          and p(s) <= p("student_base")] if p("student_base") is not None else [])
    out.append(("every stage above its base", not below if trained else None, f"at or below: {below or 'none'}"))
    for stage in ("cold_sft", "sft"):
        out.append((f"{stage} >= 0.9", None if p(stage) is None else p(stage) >= 0.9, f"{p(stage)}"))
    zero = run["zero"].get("zero", {}).get("eval", {}).get("pass1")
    out.append(("final R1 >= R1-Zero", None if p("rl_all") is None or zero is None else p("rl_all") >= zero,
                f"{p('rl_all')} vs {zero}"))
    d, r = p("distill"), p("student_rl")
    out.append(("distilled - RL-only >= 0.20", None if d is None or r is None else d - r >= 0.2,
                "not run" if d is None or r is None else f"{d:.3f} - {r:.3f} = {d - r:+.3f}"))
    g0, g1 = p("sft", "general_pass1"), p("rl_all", "general_pass1")
    out.append(("general pass@1 rises in stage 4", None if g0 is None or g1 is None else g1 > g0, f"{g0} -> {g1}"))
    s0, s1 = (run.get("rm_scores", {}).get(st, {}).get("rm_score") for st in ("sft", "rl_all"))
    out.append(("general RM score rises in stage 4", None if s0 is None or s1 is None else s1 > s0,
                "not measured" if s0 is None or s1 is None else f"{s0:.3f} -> {s1:.3f}"))
    return out


def write_results(runs: list[dict], seeds: list[int]) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    table = []
    for run_key, stage, label in ROWS:
        row = {"model": label, "stage": stage, "run": run_key}
        for col, _ in COLS:
            row[col] = metric(runs, run_key, stage, col)
        table.append(row)
    extras = [{"seed": s, "seconds": {k: round(v["seconds"], 1) for k, v in r["base"].items()},
               "zerolang_seconds": round(r["zerolang"].get("zero", {}).get("seconds", 0), 1),
               "rejection_sampling": r["base"].get("sample", {}).get("stats"),
               "distill_traces": r["base"].get("distill", {}).get("traces", {}).get("stats"),
               "distill_budget_s": r["base"].get("distill", {}).get("budget_s"),
               "student_rl_steps": r["base"].get("student_rl", {}).get("rl", {}).get("steps"),
               "reward_model": r["base"].get("rm", {}).get("rm"),
               "policy_pairs": r["base"].get("rm", {}).get("policy_pairs"),
               "general_rm_scores": r.get("rm_scores"),
               "gate_attempts": {g: attempts(r["base"][g]) for g in GATED if g in r["base"]},
               "gate_checks": {g: r["base"][g].get("gate") or r["base"][g].get("pretrain", {}).get("gate")
                               for g in GATED if g in r["base"]}} for s, r in zip(seeds, runs)]
    (RESULTS / "r1_pipeline.json").write_text(json.dumps({"seeds": seeds, "table": table, "runs": extras}, indent=2) + "\n")
    md = ["# R1 pipeline at tiny scale (`r1kit pipeline r1-tiny`)", "",
          f"Seeds: {seeds} ({'mean ± std (ddof=1)' if len(seeds) > 1 else 'ONE seed only: no spread measured'}). "
          "Held-out: 200 three-digit additions, k=4 samples at T=0.6 (pass@1 = mean over the 4), cons@4 = majority "
          "vote; general pass@1: 50 held-out 'Repeat N' prompts. Language mixing = share of samples whose chain of "
          "thought has words in two scripts; off-target = share with any word outside the target (English).", "",
          "| model | " + " | ".join(h for _, h in COLS) + " |", "|---" + "|---:" * len(COLS) + "|"]
    for row in table:
        md.append(f"| {row['model']} | " + " | ".join(cell(row[c], 1 if c == "mean_length" else 3) for c, _ in COLS) + " |")
    md += ["", "## The paper's claims at this scale", "", *claims(runs), "", "## Issue 15, per seed", "",
           "| seed | " + " | ".join(c for c, _, _ in acceptance(runs[0])) + " | gate attempts (" + ", ".join(GATED) + ") |",
           "|---" * (len(acceptance(runs[0])) + 2) + "|"]
    for seed, r in zip(seeds, runs):
        acc = acceptance(r)
        md.append(f"| {seed} | " + " | ".join(f"{'–' if ok is None else 'yes' if ok else 'NO'} ({detail})" for _, ok, detail in acc)
                  + " | " + ", ".join(str(attempts(r["base"][g])) if g in r["base"] else "–" for g in GATED) + " |")
    md += ["", "## Cost and data", ""]
    for e in extras:
        total = sum(e["seconds"].values()) + e["zerolang_seconds"]
        md.append(f"- seed {e['seed']}: {total / 60:.1f} min of stages in all (" + ", ".join(f"{k} {v:.0f}s" for k, v in e["seconds"].items()) + f", R1-Zero+language {e['zerolang_seconds']:.0f}s).")
        if g := (e["gate_checks"] or {}).get("base"):
            md.append("  stage-0 readiness checks: " + "; ".join(
                f"attempt {c['attempt']}: pass@1 {c['gate_pass1']:.3f}" + (f", {c['reasoned_pass1']:.3f} on the {c['reasoned']} "
                                                                         "samples that reason" if "reasoned_pass1" in c else "")
                + (" (passed)" if c["passed"] else "") for c in g["checks"]) + f"; attempt {g['kept_attempt']} kept.")
        rs, dt, rm = e["rejection_sampling"], e["distill_traces"], e["reward_model"]
        if rs:
            md.append(f"  rejection sampling: kept {rs['kept']}/{rs['samples']} ({rs['kept_rate']:.1%}); rejected "
                      + ", ".join(f"{k} {v}" for k, v in rs["rejected"].items() if v) + f"; {rs['general_added']} general examples added.")
        if dt:
            md.append(f"  teacher traces: kept {dt['kept']}/{dt['samples']}; distillation took {e['distill_budget_s']:.0f}s; "
                      f"the RL-only student ran {e['student_rl_steps']} GRPO steps in that time.")
        if pp := e["policy_pairs"]:
            md.append(f"  reward-model pairs from the SFT policy's own answers: {pp['pairs']} pairs from {pp['samples']} samples "
                      f"of {pp['prompts']} general prompts ({pp['right_rate']:.1%} right).")
        if rm:
            kinds = rm["val_after"].get("by_kind", {})
            md.append(f"  reward model: validation pairwise accuracy {rm['val_before']['accuracy']:.3f} -> {rm['val_after']['accuracy']:.3f}"
                      + (" (" + ", ".join(f"{k} {v['accuracy']:.3f} on {v['pairs']}" for k, v in kinds.items()) + ")" if kinds else "") + ".")
        for st, sc in (e["general_rm_scores"] or {}).items():
            if sc:
                md.append(f"  general samples after {st}: reward-model score {sc['rm_score']:.3f} (right answers "
                          f"{sc['rm_score_right']:.3f}, wrong {sc['rm_score_wrong']:.3f}; {sc['samples']} samples).")
    (RESULTS / "r1_pipeline.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    plot(table, seeds, RESULTS / "r1_pipeline.png")


def plot(table: list[dict], seeds: list[int], path: Path) -> None:
    """Held-out pass@1 and off-target rate per model, one bar per seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [row["model"].strip() for row in table]
    fig, axes = plt.subplots(1, 2, figsize=(14, 4.8), sharey=True)
    width = 0.8 / max(1, len(seeds))
    for ax, (col, title) in zip(axes, (("pass1", "held-out pass@1 (k=4, T=0.6)"), ("off_target_rate", "off-target language rate"))):
        for j, seed in enumerate(seeds):
            ys = [i + (j - (len(seeds) - 1) / 2) * width for i in range(len(table))]
            xs = [row[col][j] if j < len(row[col]) else 0.0 for row in table]
            ax.barh(ys, xs, height=width, label=f"seed {seed}")
        ax.set_title(title)
        ax.set_xlim(0, 1)
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(range(len(table)), labels, fontsize=8)
    axes[0].invert_yaxis()
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--out", default="runs/r1")
    ap.add_argument("--jobs", type=int, default=1, help="seeds run at once (then threads=1 per process unless given)")
    ap.add_argument("--report-only", action="store_true",
                    help="write the report from the stages finished so far, running nothing")
    ap.add_argument("overrides", nargs="*")
    ns = ap.parse_args()
    out = (ROOT / ns.out).resolve()
    if ns.jobs > 1 and not any(o.startswith("threads=") for o in ns.overrides):
        ns.overrides = ["threads=1", *ns.overrides]  # seeds side by side: one thread each, not oversubscribed
    with ThreadPoolExecutor(max_workers=max(1, ns.jobs)) as pool:
        runs = list(pool.map(lambda s: run_seed(s, out, ns.overrides, ns.report_only), ns.seeds))
    write_results(runs, ns.seeds)


if __name__ == "__main__":
    main()
