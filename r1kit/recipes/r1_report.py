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


def general_rm_score(stage_dir: Path, rm_dir: Path, cfg) -> dict[str, float]:
    """The reward model's mean score (sigmoid, as stage 4's RL sees it) on a finished stage's held-out
    general samples (stage_dir/eval_general/samples.jsonl), overall and split by whether the sample is
    exactly right: the first says whether RL raised the score, the split whether the reward model tells
    the policy's right answers from its wrong ones. {} when the stage has no general samples."""
    from r1kit.recipes.sampling import general_task
    from r1kit.rewards.reward_model import RewardModelScorer
    from r1kit.templates import render_prompt

    samples = Path(stage_dir) / "eval_general" / "samples.jsonl"
    if not samples.exists():
        return {}
    recs = [json.loads(line) for line in samples.read_text(encoding="utf-8").splitlines() if line.strip()]
    template = cfg.task.template
    questions = {p.id: p.question for p in general_task(cfg).test_problems()}
    scores = RewardModelScorer(rm_dir, template=template).score([render_prompt(questions[r["problem_id"]], template) for r in recs],
                                                                 [r["completion"] for r in recs])
    mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")  # noqa: E731
    return {"rm_score": mean(scores), "rm_score_right": mean([s for s, r in zip(scores, recs) if r["correct"]]),
            "rm_score_wrong": mean([s for s, r in zip(scores, recs) if not r["correct"]]), "samples": len(recs)}
