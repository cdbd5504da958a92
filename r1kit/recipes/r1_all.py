"""Stage 4 of the R1 pipeline: a reward model for general prompts (`rm`) and RL for all scenarios (`rl_all`):
rules on reasoning prompts, the reward model on general ones. Registered by importing r1kit.recipes.r1."""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from r1kit.io import atomic_write_json
from r1kit.recipes.r1 import RLTask, StageContext, _rl_weights, reasoning_task, register_stage, rl_stage, write_jsonl


@register_stage("rm", parents=("sft",), keys=("rm", "task.template", "pipeline.general_digits"),
                explicit=lambda c: {"sft": c.rm.init, "preference data": c.rm.data})
def stage_rm(ctx: StageContext) -> dict[str, Any]:
    """Stage 4a: a Bradley-Terry reward model for general prompts, from the SFT model's backbone (as
    InstructGPT's reward models start from the SFT model: the base model has never seen a general prompt,
    and a reward model from it stayed at chance on one-digit-wrong answers, r1_observations.md §7)."""
    from r1kit.model import load_tokenizer
    from r1kit.policy import Policy
    from r1kit.recipes.sampling import general_task, policy_pairs, preference_records
    from r1kit.trainers.reward_model import build_reward_model, read_preference_pairs, train_reward_model

    cfg, policy_stats = ctx.cfg, None
    if cfg.rm.data:
        data = Path(cfg.rm.data)
        ctx.record_input(data)
    else:
        data = ctx.dir / "prefs.jsonl"
        if not data.exists():
            rng = random.Random(ctx.seed)
            records = preference_records(general_task(cfg).train_problems(cfg.rm.pairs, rng), cfg.task.template, rng,
                                         cfg.rm.kind_weights)
            if cfg.rm.policy_prompts > 0:
                own, policy_stats = policy_pairs(ctx.model("sft"), general_task(cfg).train_problems(cfg.rm.policy_prompts, rng),
                                                 cfg, seed=ctx.seed)
                records += own
                rng.shuffle(records)  # the validation split (the last val_frac) gets both sources
                atomic_write_json(ctx.dir / "policy_pairs.json", policy_stats)
            write_jsonl(data, records)
        ctx.record_input(data)
    if (ctx.dir / "policy_pairs.json").exists():
        policy_stats = json.loads((ctx.dir / "policy_pairs.json").read_text())
    if not (ctx.dir / "rm.json").exists():
        init = ctx.model("sft")
        tok = load_tokenizer(init)
        policy = Policy(build_reward_model(init, tok), tok, device=cfg.model.device, lora=cfg.lora, task_type="SEQ_CLS",
                        mixed_precision=cfg.model.mixed_precision)
        train_reward_model(policy, read_preference_pairs(data), cfg.rm, ctx.dir, seed=ctx.seed)
    out = {"model": ctx.rel(ctx.dir / "model"), "data": ctx.rel(data), "rm": json.loads((ctx.dir / "rm.json").read_text())}
    return out if policy_stats is None else {**out, "policy_pairs": policy_stats}


@register_stage("rl_all", parents=("sft", "rm"), keys=("grpo", "eval", "pipeline"))
def stage_rl_all(ctx: StageContext) -> dict[str, Any]:
    """Stage 4b: RL for all scenarios: rules (accuracy, format, language) on reasoning prompts, the
    reward model on general prompts (it scores only those: meta["scenario"] == "general")."""
    import r1kit.rewards.language  # noqa: F401  registers the "language" reward
    from r1kit.recipes.sampling import general_task
    from r1kit.rewards.reward_model import register_reward_model

    cfg = ctx.cfg
    register_reward_model(ctx.model("rm"), "reward_model", scenarios=("general",), template=cfg.task.template)
    task = RLTask(reasoning_task(cfg), cfg.pipeline.lang, general_task(cfg), cfg.pipeline.general_frac)
    return rl_stage(ctx, ctx.model("sft"), task, _rl_weights(cfg, True, reward_model=True))
