"""Stage 0: pretrain the tiny base model from scratch on the synthetic corpus.

A plain next-token loop: batches of whole documents, right-padded, AdamW. Two schedules:
  fixed   (gate off) warm-up, then cosine decay to 10% of the peak over exactly `steps` steps;
  gated   (gate on)  warm-up, a stable peak until the readiness check passes, then cosine decay over
          `decay_frac` of the steps done (the warm-up/stable/decay shape of MiniCPM's WSD schedule, which
          lets the run stop at a point chosen during training). The check is a callable model -> score,
          evaluated every `gate_every` steps; `steps` caps the run, decay included, whether or not it passes.
"""
from __future__ import annotations

import math
import random
import time

import torch
import torch.nn.functional as F

from typing import Callable

from r1kit.config import PretrainConfig
from r1kit.corpus import CorpusDoc
from r1kit.progress import progress_bar
from r1kit.types import R1KitError


def lr_at(step: int, total: int, warmup: int, peak: float) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    frac = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))


def decay_lr(step: int, start: int, length: int, peak: float) -> float:
    """Cosine from `peak` at `start` down to 10% of it at `start + length`."""
    frac = (step - start) / max(1, length)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, max(0.0, frac)))))


class Schedule:
    """The learning rate per step, and when to stop; `gated` waits for `pass_gate(step)` to fix the decay."""

    def __init__(self, cfg: PretrainConfig, gated: bool):
        self.cfg, self.gated, self.total = cfg, gated, cfg.steps
        # without a pass, decay starts where its length (decay_frac of the steps before it) ends on the cap
        self.decay_start = round(cfg.steps / (1 + cfg.decay_frac)) if gated else cfg.warmup_steps
        self.passed_at: int | None = None

    def lr(self, step: int) -> float:
        c = self.cfg
        if not self.gated:
            return lr_at(step, c.steps, c.warmup_steps, c.lr)
        if step < c.warmup_steps:
            return c.lr * (step + 1) / c.warmup_steps
        if step < self.decay_start:
            return c.lr
        return decay_lr(step, self.decay_start, self.total - self.decay_start, c.lr)

    def wants_check(self, step: int) -> bool:
        c = self.cfg
        return (self.gated and self.passed_at is None and step >= c.gate_min_steps and step < self.decay_start
                and step % c.gate_every == 0)

    def pass_gate(self, step: int) -> None:
        self.passed_at, self.decay_start = step, step
        self.total = min(self.cfg.steps, step + max(1, round(self.cfg.decay_frac * step)))


def validate(cfg: PretrainConfig) -> None:
    checks = [("steps", cfg.steps > 0, "a positive integer"), ("batch_size", cfg.batch_size > 0, "a positive integer"),
              ("lr", cfg.lr > 0, "positive"), ("warmup_steps", cfg.warmup_steps >= 1, "at least 1"),
              ("gate_pass1", 0 <= cfg.gate_pass1 <= 1, "in [0, 1] (0 = no readiness gate)"),
              ("gate_every", cfg.gate_every > 0, "a positive integer"),
              ("gate_min_steps", cfg.gate_min_steps >= 0, "0 or more"),
              ("gate_problems", cfg.gate_problems > 0, "a positive integer"),
              ("decay_frac", 0 < cfg.decay_frac <= 1, "in (0, 1]")]
    for name, ok, expected in checks:
        if not ok:
            raise R1KitError(f"pretrain.{name} = {getattr(cfg, name)!r}: expected {expected}")


def pretrain(model, tokenizer, docs: list[CorpusDoc], cfg: PretrainConfig, seed: int,
             show_progress: bool = True, check: Callable[[object], float] | None = None) -> list[dict]:
    """Train `model` in place; returns one metrics record per 50 steps plus one per readiness check
    ({"step", "gate_pass1", "passed"}). `check` (model -> pass@1) is used when cfg.gate_pass1 > 0."""
    validate(cfg)
    gated = cfg.gate_pass1 > 0
    if gated and check is None:
        raise R1KitError("pretrain.gate_pass1 > 0 needs a readiness check (the caller passes `check`)")
    encoded = [tokenizer(d.prompt + d.completion + tokenizer.eos_token).input_ids for d in docs]
    rng = random.Random(seed)
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    model.train()
    pad = tokenizer.pad_token_id
    sched = Schedule(cfg, gated)
    log, t0 = [], time.time()
    bar = progress_bar(None, desc="pretrain", enabled=show_progress, total=cfg.steps)
    step = 0
    while step < sched.total:
        if sched.wants_check(step):
            score = check(model)
            model.train()
            passed = score >= cfg.gate_pass1
            log.append({"step": step, "gate_pass1": score, "passed": passed, "time": time.time() - t0})
            if passed:
                sched.pass_gate(step)
                bar.reset(total=sched.total)
                bar.update(step)
            bar.set_postfix(gate=f"{score:.2f}")
        batch = rng.sample(encoded, cfg.batch_size) if len(encoded) >= cfg.batch_size else rng.choices(encoded, k=cfg.batch_size)
        width = max(map(len, batch))
        ids = torch.full((len(batch), width), pad, dtype=torch.long)  # [B, T]
        mask = torch.zeros((len(batch), width), dtype=torch.long)  # [B, T]
        for i, seq in enumerate(batch):
            ids[i, : len(seq)] = torch.tensor(seq)
            mask[i, : len(seq)] = 1
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits  # [B, T, V]
        targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)  # [B, T-1]
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=-100)
        for g in opt.param_groups:
            g["lr"] = sched.lr(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 50 == 0 or step == sched.total - 1:
            log.append({"step": step, "loss": loss.item(), "lr": opt.param_groups[0]["lr"], "time": time.time() - t0})
            bar.set_postfix(loss=f"{loss.item():.3f}")
        bar.update(1)
        step += 1
    bar.close()
    model.eval()
    return log
