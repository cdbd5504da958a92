"""R1-Zero: RL straight from a base model with the R1-Zero template, no SFT.

    stage 0  (`r1kit pretrain`) the tiny base model, pretrained from scratch on the synthetic corpus
             (skipped when `model.path` names an existing model or the base folder is complete);
    stage 1  GRPO with rule-based rewards only, held-out evaluation every `eval.every` steps;
    final    held-out evaluation (pass@1 over k samples at T=0.6, cons@k) and the final HF model.

Run folder: runs/<name>/{base/, config.yaml, metrics.jsonl, samples.jsonl, curves.png, checkpoints/,
final/, eval_base/, eval_final/, summary.json}.
"""
from __future__ import annotations

import json
import random
import sys
import time
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from r1kit import dist
from r1kit.config import RunConfig, save_config
from r1kit.corpus import build_corpus
from r1kit.io import atomic_dir, atomic_write_json
from r1kit.model import build_tiny_model, save_model, train_tokenizer
from r1kit.policy import Policy
from r1kit.tasks import make_task
from r1kit.tasks.base import distinct_train_problems
from r1kit.templates import THINK_OPEN, parse_completion
from r1kit.types import R1KitError

ATTEMPT_STRIDE = 7907  # attempt k of stage 0 seeds its corpus, initialisation and batch order with seed + 7907 k
REASONED_MIN_CHARS = 16  # a chain of thought this long reasons ("easy." or an empty one does not)
EVAL_KEYS = ("pass1", "cons", "format_rate", "no_answer_rate", "reflection_rate", "mean_length")


def setup_torch(cfg: RunConfig) -> None:
    torch.manual_seed(cfg.seed)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)


def base_dir(cfg: RunConfig) -> Path:
    return Path(cfg.pretrain.output_dir) if cfg.pretrain.output_dir else cfg.run_dir / "base"


def ensure_base_model(cfg: RunConfig, show_progress: bool = True) -> Path:
    """Stage 0: return the base model folder, pretraining it first when it is missing."""
    if cfg.model.path:
        return Path(cfg.model.path)
    out = base_dir(cfg)
    # rank 0 decides for all (under torchrun every rank pretrains its share; rank 0 writes the folder)
    if dist.broadcast_object(not ((out / "config.json").exists() and (out / "pretrain.json").exists())):
        pretrain_base(cfg, out, make_task(cfg.task.name, **cfg.task.options), show_progress=show_progress)
    return out


def pretrain_base(cfg: RunConfig, out: Path, task, *, model_cfg=None, steps: int | None = None, tokenizer=None,
                  zh_frac: float = 0.0, mix_frac: float = 0.0, general_frac: float = 0.0, init_seed: int | None = None,
                  show_progress: bool = True) -> dict[str, Any]:
    """Pretrain a tiny model from scratch on `task`'s synthetic corpus and write it (atomically) to `out`.

    model_cfg/steps default to cfg.model/cfg.pretrain.steps; a new tokenizer is trained unless one is
    given (a distilled student shares its teacher's); zh_frac/mix_frac make the corpus bilingual (the R1
    pipeline's language-mixing material); init_seed (default cfg.seed) seeds the weight initialisation.
    With pretrain.gate_pass1 > 0 the readiness gate decides when to stop: a base below it is trained further
    (gate_action "extend") or pretrained again on a new corpus draw, from a new initialisation, in a new batch
    order ("restart"), within pretrain.max_steps in all; the best attempt is kept. Deterministic from the config.
    Returns the record also written to out/pretrain.json."""
    from r1kit.trainers.pretrain import gate_margin, pretrain

    setup_torch(cfg)
    t0 = time.time()
    p = cfg.pretrain if steps is None else replace(cfg.pretrain, steps=steps)

    def corpus(k: int):
        rng = random.Random(cfg.seed + ATTEMPT_STRIDE * k)
        docs = build_corpus(task, p.corpus_docs, p.direct_frac, p.reflect_frac, cfg.task.template, rng,
                            zh_frac=zh_frac, mix_frac=mix_frac)
        if not general_frac:
            return docs
        from r1kit.recipes.sampling import general_docs, general_task

        return docs + general_docs(round(p.corpus_docs * general_frac), cfg.task.template, rng, general_task(cfg))

    docs = corpus(0)
    tokenizer = tokenizer or train_tokenizer((d.prompt + d.completion for d in docs[:5000]), cfg.model.vocab_size)
    check = readiness_check(cfg, tokenizer, task) if p.gate_pass1 > 0 else None
    restart = p.gate_pass1 > 0 and p.gate_action == "restart"
    init = cfg.seed if init_seed is None else init_seed
    attempts, best, used = [], None, 0
    while True:
        # Attempt k: a fresh corpus draw, initialisation and batch order (k = 0 is the plain run); the
        # tokenizer stays. With the gate's "restart" action an attempt is one `steps`-long cycle; "extend"
        # lets it grow by warm restarts instead.
        k = len(attempts)
        docs = docs if k == 0 else corpus(k)
        torch.manual_seed(init + ATTEMPT_STRIDE * k)
        policy = Policy(build_tiny_model(model_cfg or cfg.model, tokenizer), tokenizer, device=cfg.model.device,
                        mixed_precision=cfg.model.mixed_precision, gradient_checkpointing=cfg.model.gradient_checkpointing)
        model = policy.module
        log = pretrain(policy, docs, replace(p, max_steps=p.steps) if restart else p,
                       cfg.seed + ATTEMPT_STRIDE * k, show_progress=show_progress, check=check)
        losses = [r for r in log if "loss" in r]
        gate = [dict(r, attempt=k) for r in log if "gate_pass1" in r]
        steps_k = losses[-1]["step"] + 1
        used += steps_k
        attempts.append({"attempt": k, "steps": steps_k, "final_loss": losses[-1]["loss"],
                         "styles": {s: sum(d.style == s for d in docs)
                                    for s in ("direct", "worked", "reflect") + (("general",) if general_frac else ())},
                         "gate_pass1": gate[-1]["gate_pass1"] if gate else None, "log": log, "gate": gate})
        passed = bool(gate) and gate[-1]["passed"]
        # the best attempt: one that passed, else the one closest to the gate (the highest sampled pass@1
        # without pretrain.gate_reasoned_pass1; with it, the smaller ratio to the two thresholds)
        rank = (passed, gate_margin(p, gate[-1])) if gate else (False, 0.0)
        if best is None or rank > best[2]:
            best = (attempts[-1], {n: t.detach().clone() for n, t in model.state_dict().items()}, rank)
        if not restart or passed or used + p.steps > p.max_steps:
            break
        if dist.is_main():
            why, gate_of = ((f"sampled pass@1 {gate[-1]['gate_pass1']:.3f}", p.gate_pass1)
                            if gate[-1]["gate_pass1"] < p.gate_pass1 else
                            (f"pass@1 {gate[-1]['reasoned_pass1']:.3f} of the samples that reason", p.gate_reasoned_pass1))
            tqdm.write(f"stage 0 attempt {k}: {why} is below the readiness gate {gate_of}; starting attempt {k + 1} "
                       "with a new corpus draw, initialisation and batch order", file=sys.stderr)
    kept, state, _ = best
    model.load_state_dict(state)
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_disable()  # a training setting, not part of the saved model
    info = {"seconds": time.time() - t0, "params": sum(x.numel() for x in model.parameters()),
            "docs": len(docs), "styles": kept["styles"], "steps": kept["steps"], "total_steps": used,
            "final_loss": kept["final_loss"], "log": kept["log"]}
    if p.gate_pass1 > 0:
        checks = [r for a in attempts for r in a["gate"]]
        info["gate"] = {"threshold": p.gate_pass1, "passed": any(r["passed"] for r in checks), "checks": checks,
                        "kept_attempt": kept["attempt"]}
        if p.gate_reasoned_pass1 > 0:
            info["gate"]["reasoned_threshold"] = p.gate_reasoned_pass1
        if not info["gate"]["passed"]:
            last = f"best {kept['gate_pass1']:.3f}" if checks else "never checked"
            also = f" (and {p.gate_reasoned_pass1} on the samples that reason)" if p.gate_reasoned_pass1 > 0 else ""
            warnings.warn(f"stage 0: the base model did not reach pass@1 {p.gate_pass1}{also} within pretrain.max_steps="
                          f"{p.max_steps} ({last}, kept); RL may get little reward signal. Raise "
                          f"pretrain.max_steps or pretrain.steps.", stacklevel=2)
    if dist.is_main():
        with atomic_dir(out) as tmp:
            save_model(model, tokenizer, tmp)
            atomic_write_json(tmp / "pretrain.json", info)
    dist.barrier()
    return info


def readiness_check(cfg: RunConfig, tokenizer, task):
    """Stage 0's gate: pass@1 of the policy on fresh training problems (never held-out ones), sampled as
    GRPO will sample them (template, rollout temperature and top-p, max new tokens), 4 samples each; with
    pretrain.gate_reasoned_pass1 > 0 also the pass@1 of the samples that reason (`reasoned_accuracy`), from
    8 more samples of the same problems at the evaluation's temperature and top-p: at T = 1.0 r1-tiny's
    miscopying seed-1 base and a sound one scored alike (0.386 and 0.383), at T = 0.6 0.20 against 0.65."""
    from r1kit.evaluation import evaluate_problems

    # distinct: a small train split (code_synth) repeats problems in a draw, and each is scored once
    problems = distinct_train_problems(task, cfg.pretrain.gate_problems, random.Random(cfg.seed + 104729))
    g = cfg.grpo

    def check(policy: Policy) -> float | dict[str, float]:
        policy.module.eval()
        engine = policy.make_engine(backend=cfg.engine.backend, dtype=cfg.engine.dtype)
        s = evaluate_problems(engine, tokenizer, problems, k=4, temperature=g.temperature, top_p=g.top_p,
                              max_new_tokens=g.max_new_tokens, template=cfg.task.template, seed=cfg.seed + 1, by=())
        if cfg.pretrain.gate_reasoned_pass1 <= 0:
            return s.pass1
        e = cfg.eval
        systematic = evaluate_problems(engine, tokenizer, problems, k=8, temperature=e.temperature, top_p=e.top_p,
                                       max_new_tokens=g.max_new_tokens, template=cfg.task.template, seed=cfg.seed + 2,
                                       by=())
        n, acc = reasoned_accuracy(systematic.records)
        return {"gate_pass1": s.pass1, "reasoned_pass1": acc, "reasoned": n}

    return check


def reasons(completion: str) -> bool:
    """Whether a completion writes a chain of thought: at least REASONED_MIN_CHARS non-space characters
    between <think> and </think> (or the end, when it never closes: a runaway chain counts, and is wrong)."""
    thought = parse_completion(completion).think
    if thought is None:
        thought = completion.partition(THINK_OPEN)[2]
    return len("".join(thought.split())) >= REASONED_MIN_CHARS


def reasoned_accuracy(records) -> tuple[int, float]:
    """(number of the samples that reason, the share of them that is correct; 0.0 when there are none)."""
    kept = [r.correct for r in records if reasons(r.completion)]
    return len(kept), (sum(kept) / len(kept) if kept else 0.0)


def heldout_evaluator(cfg: RunConfig, tokenizer, task):
    """A callable (engine, step) -> metrics for the trainer, over the fixed held-out problems."""
    from r1kit.evaluation import evaluate_problems

    problems = task.test_problems()[: cfg.eval.num_problems]
    if not problems:
        raise R1KitError(f"task {cfg.task.name!r} has no held-out problems to evaluate on")
    e = cfg.eval

    def evaluate(engine, step: int, out_dir: Path | None = None) -> dict[str, float]:
        s = evaluate_problems(engine, tokenizer, problems, k=e.k, temperature=e.temperature, top_p=e.top_p,
                              max_new_tokens=e.max_new_tokens, template=cfg.task.template, seed=cfg.seed + 7919,
                              out_dir=out_dir)
        d = s.to_dict()
        return {k: float(d[k]) for k in EVAL_KEYS if k in d}

    return evaluate


def run_zero(cfg: RunConfig, resume: bool = False) -> dict[str, Any]:
    """The whole R1-Zero job; returns the summary written to runs/<name>/summary.json."""
    from r1kit.trainers.grpo import GRPOTrainer

    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    if dist.is_main():  # under torchrun only rank 0 writes files
        save_config(cfg, run_dir / "config.yaml")
    t0 = time.time()
    base = ensure_base_model(cfg, cfg.log.progress)
    t_base = time.time() - t0
    setup_torch(cfg)
    policy = Policy.from_config(cfg, base)  # built once: the trainer, its engine and the evaluations share it
    tokenizer = policy.tokenizer
    task = make_task(cfg.task.name, **cfg.task.options)
    evaluate = heldout_evaluator(cfg, tokenizer, task)
    results: dict[int, dict[str, float]] = {}

    def evaluate_during_rl(engine, step: int) -> dict[str, float]:
        # the last step's evaluation is the final one: keep its samples and reports
        results[step] = evaluate(engine, step, run_dir / "eval_final" if step == cfg.grpo.steps else None)
        return results[step]

    trainer = GRPOTrainer(cfg, policy, task, run_dir, evaluate=evaluate_during_rl)
    with dist.full_params(policy.module):  # before any resume: the base weights; on rank 0, shared with all
        base_eval = evaluate(trainer.engine, 0, run_dir / "eval_base") if dist.is_main() else {}
    base_eval = dist.broadcast_object(base_eval)
    t1 = time.time()
    trainer.train(resume=resume, initial_metrics={f"eval/{k}": v for k, v in base_eval.items()})
    t_rl = time.time() - t1
    with dist.full_params(policy.module):
        final_eval = results.get(trainer.step_idx) or (evaluate(trainer.engine, trainer.step_idx, run_dir / "eval_final")
                                                       if dist.is_main() else {})
    final_eval = dist.broadcast_object(final_eval)
    weights = dist.full_state_dict(policy.module) if dist.is_sharded(policy.module) else None  # FSDP2: collective
    if dist.is_main():
        with atomic_dir(run_dir / "final") as tmp:
            policy.save(tmp, state_dict=weights)  # the adapter only with LoRA (r1kit export --merge: a full folder)
    stage0 = json.loads((base / "pretrain.json").read_text()) if (base / "pretrain.json").exists() else {}
    summary = {"name": cfg.name, "seed": cfg.seed, "base_model": str(base), "base": base_eval, "final": final_eval,
               "pretrain": {k: stage0[k] for k in ("steps", "total_steps", "params", "gate") if k in stage0},
               "seconds": {"pretrain": t_base, "rl": t_rl, "total": time.time() - t0}, "steps": trainer.step_idx}
    if dist.is_main():
        atomic_write_json(run_dir / "summary.json", summary)
    dist.barrier()
    return summary
