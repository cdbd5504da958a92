"""Distillation (`r1kit distill`): a smaller student fine-tuned on the final R1 model's reasoning traces.

DeepSeek-R1 section 2.4 fine-tunes smaller dense models on the ~800k samples curated with the R1
checkpoint, by SFT only, and (section 4.1) compares that with the same base trained by large-scale RL:
distillation wins. Three pipeline stages (registered into r1kit.recipes.r1.STAGES):

    student_base   the student: its own (smaller) ModelConfig `distill.student`, pretrained on the same
                   corpus with the teacher's tokenizer (text is the interface, but sharing it keeps the
                   traces' tokens identical); or `distill.student_init` names a pretrained one
    distill        the teacher (`rl_all`, or `distill.teacher`) samples `distill.num_prompts` training
                   prompts; only traces passing rejection sampling (the `sample` filters) are kept; the
                   student is fine-tuned on them (the `sft` section, per-stage overrides allowed)
    student_rl     the comparison: the same student trained by GRPO alone (the reasoning-RL rewards), for
                   `distill.rl_steps` steps or, when 0, for as many steps as fit in the wall-clock seconds
                   that distillation took (trace sampling + student SFT; the teacher's own training is
                   not counted, as in the paper's comparison the teacher already exists)

    r1kit distill r1-tiny distill.teacher=path/to/teacher    # student_base (if needed) + distill
"""
from __future__ import annotations

import random
from typing import Any

from r1kit.recipes.r1 import (
    RLTask, StageContext, evaluate_model, pretrain_stage_model, reasoning_task, register_stage, rl_stage, sample_data,
    sft_stage, _rl_weights,
)


@register_stage("student_base", parents=("base",), explicit=lambda c: {"base": c.distill.student_init},
                keys=("distill.student", "distill.student_pretrain_steps", "distill.student_init", "pretrain",
                      "pipeline.corpus_zh_frac", "pipeline.corpus_mix_frac", "pipeline.corpus_general_frac", "eval",
                      "pipeline.lang", "pipeline.general_test", "pipeline.general_digits"))
def stage_student_base(ctx: StageContext) -> dict[str, Any]:
    """The student before distillation: pretrained here (teacher's tokenizer) unless distill.student_init is set."""
    from r1kit.model import load_tokenizer

    cfg = ctx.cfg
    if cfg.distill.student_init:
        model, info = ctx.model("base"), {"given": cfg.distill.student_init}
    else:
        model = ctx.dir / "model"
        steps = cfg.distill.student_pretrain_steps or cfg.pretrain.steps
        # No readiness gate for the student: the comparison needs the same student for both arms, not a fit one
        # (a 0.3M student stays near 0 before training); its pretraining settings are still the base's.
        info = pretrain_stage_model(ctx, cfg.distill.student, model, steps=steps, tokenizer=load_tokenizer(ctx.model("base")),
                                    gate=False)
    return {"model": ctx.rel(model), "pretrain": info, "eval": evaluate_model(ctx, model)}


@register_stage("distill", parents=("rl_all", "student_base"), explicit=lambda c: {"rl_all": c.distill.teacher},
                keys=("distill.num_prompts", "sample", "sft", "eval", "pipeline.lang", "pipeline.general_test", "pipeline.general_digits"))
def stage_distill(ctx: StageContext) -> dict[str, Any]:
    """Teacher traces through rejection sampling, then SFT of the student on them."""
    from r1kit.recipes.sampling import general_task

    cfg = ctx.cfg
    rng = random.Random(ctx.seed)
    problems = reasoning_task(cfg).train_problems(cfg.distill.num_prompts, rng)
    general = general_task(cfg).train_problems(cfg.distill.num_prompts, rng) if cfg.sample.general_frac > 0 else []
    traces = sample_data(ctx, ctx.model("rl_all"), problems, general, "Teacher traces for distillation")
    out = sft_stage(ctx, ctx.model("student_base"), ctx.resolve(traces["data"]))
    budget = traces["stats"]["seconds"] + out["sft"]["seconds"]
    return {**out, "traces": traces, "teacher": traces["source_model"], "budget_s": budget}


@register_stage("student_rl", parents=("student_base", "distill"),
                keys=("grpo", "distill.rl_steps", "distill.rl_max_steps", "eval", "pipeline.lang", "pipeline.language_weight",
                      "pipeline.general_test", "pipeline.general_digits"))
def stage_student_rl(ctx: StageContext) -> dict[str, Any]:
    """The student trained by RL alone: fixed steps, or distillation's wall-clock budget."""
    cfg, d = ctx.cfg, ctx.cfg.distill
    task = RLTask(reasoning_task(cfg), cfg.pipeline.lang)
    weights = _rl_weights(cfg, language=True)
    import r1kit.rewards.language  # noqa: F401  registers the "language" reward

    if d.rl_steps > 0:
        return rl_stage(ctx, ctx.model("student_base"), task, weights, max_steps=d.rl_steps)
    budget = float(ctx.parents["distill"]["budget_s"])
    return {**rl_stage(ctx, ctx.model("student_base"), task, weights, budget_s=budget, max_steps=d.rl_max_steps),
            "budget_s": budget}


def run_distill(cfg, log=print) -> dict[str, Any]:
    """`r1kit distill`: the student (pretrained if needed) and its distillation, as pipeline stages."""
    from r1kit.recipes.r1 import run_stage

    return {name: run_stage(cfg, name, log) for name in ("student_base", "distill")}
