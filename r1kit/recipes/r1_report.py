"""The R1 pipeline's per-run results table (runs/<name>/pipeline.md): one row per evaluated stage."""
from __future__ import annotations

from typing import Any

from r1kit.config import RunConfig

ROWS = [("base", "base model"), ("zero", "R1-Zero (RL from base)"), ("cold_sft", "R1 stage 1: cold-start SFT"),
        ("reason_rl", "R1 stage 2: reasoning RL (+language reward)"), ("reason_rl_nolang", "  ablation: stage 2 without language reward"),
        ("sft", "R1 stage 3: SFT of base on rejection-sampled data"), ("rl_all", "R1 stage 4: RL all scenarios (final R1)"),
        ("student_base", "student before distillation"), ("distill", "student distilled (SFT only)"),
        ("student_rl", "student RL-only (same wall-clock)")]


def results_table(records: dict[str, dict[str, Any]], cfg: RunConfig) -> str:
    """One Markdown row per evaluated stage: accuracy, cons@k, format, mixing, length, general accuracy."""
    e = cfg.eval
    lines = [f"# {cfg.name}: held-out evaluation per stage", "",
             f"{e.num_problems} held-out problems, k={e.k} samples at T={e.temperature}; pass@1 averaged over the k.", "",
             f"| model | pass@1 | cons@{e.k} | format | lang. mixing | off-target | mean length | general pass@1 |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, label in ROWS:
        ev = records.get(name, {}).get("eval")
        if ev:
            lines.append(f"| {label} | {ev['pass1']:.3f} | {ev['cons']:.3f} | {ev['format_rate']:.3f} | {ev['mixing_rate']:.3f} | "
                         f"{ev['off_target_rate']:.3f} | {ev['mean_length']:.1f} | {ev.get('general_pass1', float('nan')):.3f} |")
    return "\n".join(lines) + "\n"
