"""The R1 pipeline's per-run results table (runs/<name>/pipeline.md): one row per evaluated stage, with
its readability (r1kit.evaluation.readability) and how many attempts its readiness gate took."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from r1kit.config import RunConfig

ROWS = [("base", "base model"), ("zero", "R1-Zero (RL from base)"), ("cold_sft", "R1 stage 1: cold-start SFT"),
        ("reason_rl", "R1 stage 2: reasoning RL (+language reward)"), ("reason_rl_nolang", "  ablation: stage 2 without language reward"),
        ("sft", "R1 stage 3: SFT of base on rejection-sampled data"), ("rl_all", "R1 stage 4: RL all scenarios (final R1)"),
        ("student_base", "student before distillation"), ("distill", "student distilled (SFT only)"),
        ("student_rl", "student RL-only (same wall-clock)")]


def attempts(record: dict[str, Any]) -> int:
    """How many attempts a stage's readiness gate took (stage 0: pretraining draws; SFT stages: training
    rounds); 1 for a stage without a gate."""
    if "gate" in record:  # r1kit.recipes.r1_gate
        return int(record["gate"]["attempts"])
    checks = record.get("pretrain", {}).get("gate", {}).get("checks")  # r1kit.recipes.zero.pretrain_base
    return len({c.get("attempt", 0) for c in checks}) if checks else 1


def readability_of(stage_dir: Path, lang: str) -> dict[str, float]:
    """Readability of a finished stage's held-out samples (stage_dir/eval/samples.jsonl): for records
    written before the metric was part of the evaluation."""
    from r1kit.evaluation.readability import readability

    samples = Path(stage_dir) / "eval" / "samples.jsonl"
    if not samples.exists():
        return {}
    texts = [json.loads(line)["completion"] for line in samples.read_text(encoding="utf-8").splitlines() if line.strip()]
    return readability(texts, lang)


def results_table(records: dict[str, dict[str, Any]], cfg: RunConfig) -> str:
    """One Markdown row per evaluated stage: accuracy, cons@k, format, readability, mixing, repetition,
    length, general accuracy, gate attempts."""
    e = cfg.eval
    lines = [f"# {cfg.name}: held-out evaluation per stage", "",
             f"{e.num_problems} held-out problems, k={e.k} samples at T={e.temperature}; pass@1 averaged over the k. "
             "Readable = reasoning, then a summary, then the answer; not repetitive; target language only.", "",
             f"| model | pass@1 | cons@{e.k} | format | readable | lang. mixing | off-target | repetitive | mean length "
             "| general pass@1 | attempts |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    nan = float("nan")
    for name, label in ROWS:
        rec = records.get(name, {})
        ev = rec.get("eval")
        if ev:
            lines.append(f"| {label} | {ev['pass1']:.3f} | {ev['cons']:.3f} | {ev['format_rate']:.3f} | "
                         f"{ev.get('readability', nan):.3f} | {ev['mixing_rate']:.3f} | {ev['off_target_rate']:.3f} | "
                         f"{ev.get('repetition_rate', nan):.3f} | {ev['mean_length']:.1f} | {ev.get('general_pass1', nan):.3f} | "
                         f"{attempts(rec)} |")
    return "\n".join(lines) + "\n"
