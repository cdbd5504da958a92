"""The SFT stages of the R1 pipeline (cold_sft, sft, and the student's distill), with a readiness gate.

A stage's outcome must not hang on luck (the same seed took another floating-point path on another CPU
and cold-start SFT reached 0.620 instead of 0.996). With `pipeline.sft_gate_pass1 > 0` a gated SFT stage
checks its model the way stage 0 checks the base (r1kit.recipes.zero.readiness_check): pass@1 on fresh
*training* problems (never held-out ones), here sampled at the evaluation settings, k=4 each. Below the
threshold, attempt k (k = 1, 2, ...) trains `sft.epochs` more epochs in a new batch order (seed + 7907 k),
from the previous attempt's model ("extend") or from the stage's initial model ("restart"), in
ctx.dir/attempt<k>/, until one passes or `pipeline.sft_max_attempts` are spent; the best attempt is kept.
Every attempt resumes from its checkpoints and its check is stored (gate.json), so a killed stage
continues where it stopped. done.json records each attempt's check: how often a stage needed another try.
"""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import yaml

from r1kit import dist
from r1kit.config import PIPELINE_STAGES, to_dict
from r1kit.io import atomic_write_json
from r1kit.recipes.zero import ATTEMPT_STRIDE
from r1kit.tasks.base import distinct_train_problems
from r1kit.types import R1KitError

GATE_FILE = "gate.json"


def validate_gate(pl) -> None:
    bad = [name for name, ok in (("sft_gate_pass1", 0 <= pl.sft_gate_pass1 <= 1), ("sft_gate_problems", pl.sft_gate_problems >= 1),
                                 ("sft_gate_action", pl.sft_gate_action in ("extend", "restart")),
                                 ("sft_max_attempts", pl.sft_max_attempts >= 1)) if not ok]
    if bad:
        raise R1KitError(f"bad value for {', '.join('pipeline.' + b for b in bad)} (need sft_gate_pass1 in [0, 1], "
                         "sft_gate_problems >= 1, sft_gate_action extend|restart, sft_max_attempts >= 1)")


def sft_readiness(ctx, model_dir: Path) -> float:
    """pass@1 of the model at `model_dir` on fresh training problems, sampled at the eval settings (k=4)."""
    from r1kit.evaluation import evaluate_problems
    from r1kit.policy import Policy
    from r1kit.recipes.r1 import reasoning_task

    cfg, e = ctx.cfg, ctx.cfg.eval
    rng = random.Random(cfg.seed + 104729 + PIPELINE_STAGES.index(ctx.name))  # same problems for every attempt
    problems = distinct_train_problems(reasoning_task(cfg), cfg.pipeline.sft_gate_problems, rng)  # each scored once
    policy = Policy.from_config(cfg, model_dir, lora=False)
    engine = policy.make_engine(backend=cfg.engine.backend, dtype=cfg.engine.dtype)
    return evaluate_problems(engine, policy.tokenizer, problems, k=4, temperature=e.temperature, top_p=e.top_p,
                             max_new_tokens=e.max_new_tokens, template=cfg.task.template, seed=cfg.seed + 1, by=()).pass1


def train_attempt(ctx, init: Path, data: Path, out: Path, seed: int) -> dict[str, Any]:
    """One SFT run of the model at `init` on `data` into out/{model, sft.json, data_stats.json} (resumable)."""
    from r1kit.policy import Policy
    from r1kit.trainers.sft import load_sft_data, train_sft

    cfg = ctx.cfg
    if not (out / "sft.json").exists():
        out.mkdir(parents=True, exist_ok=True)
        policy = Policy.from_config(cfg, init)
        dist.prepare(policy, cfg.dist.strategy)  # under torchrun: DDP or FSDP2 (train_sft alone would pick DDP)
        examples, stats = load_sft_data(data, policy.tokenizer, cfg.sft.seq_len)
        atomic_write_json(out / "data_stats.json", stats)
        train_sft(policy, examples, cfg.sft, out, seed=seed, resume=True,
                  config_yaml=yaml.safe_dump(to_dict(cfg), sort_keys=False), show_progress=cfg.log.progress)
    return {**json.loads((out / "sft.json").read_text()), **json.loads((out / "data_stats.json").read_text())}


def sft_stage(ctx, init: Path, data: Path, *, gated: bool = False) -> dict[str, Any]:
    """SFT of the model at `init` on `data` into ctx.dir/model (resumes from its checkpoints), then evaluate.
    With `gated` and pipeline.sft_gate_pass1 > 0, train to the readiness gate (module docstring)."""
    from r1kit.recipes.r1 import evaluate_model

    pl = ctx.cfg.pipeline
    validate_gate(pl)
    gate_on = gated and pl.sft_gate_pass1 > 0
    attempts: list[dict[str, Any]] = []
    for k in range(pl.sft_max_attempts if gate_on else 1):
        out = ctx.dir if k == 0 else ctx.dir / f"attempt{k}"
        start = init if k == 0 or pl.sft_gate_action == "restart" else Path(attempts[-1]["dir"]) / "model"
        summary = train_attempt(ctx, start, data, out, ctx.seed + ATTEMPT_STRIDE * k)
        attempts.append({"attempt": k, "dir": str(out), "sft": summary})
        if not gate_on:
            break
        if not (out / GATE_FILE).exists():
            atomic_write_json(out / GATE_FILE, {"gate_pass1": sft_readiness(ctx, out / "model")})
        attempts[-1]["gate_pass1"] = json.loads((out / GATE_FILE).read_text())["gate_pass1"]
        if attempts[-1]["gate_pass1"] >= pl.sft_gate_pass1:
            break
    kept = max(attempts, key=lambda a: a.get("gate_pass1", 0.0)) if gate_on else attempts[0]
    model = Path(kept["dir"]) / "model"
    record = {"model": ctx.rel(model), "init": ctx.rel(init), "data": ctx.rel(data), "sft": kept["sft"]}
    if gate_on:
        record["gate"] = {"threshold": pl.sft_gate_pass1, "action": pl.sft_gate_action, "attempts": len(attempts),
                          "passed": kept["gate_pass1"] >= pl.sft_gate_pass1, "kept_attempt": kept["attempt"],
                          "checks": [{"attempt": a["attempt"], "gate_pass1": a["gate_pass1"], "seconds": a["sft"]["seconds"]}
                                     for a in attempts]}
    return {**record, "eval": evaluate_model(ctx, model)}
