"""Stage 0: pretrain the tiny base model from scratch on the synthetic corpus.

A plain next-token loop: batches of whole documents (optionally bucketed by length), right-padded, AdamW;
warm-up, then cosine decay to 10% of the peak over `steps` steps. With the readiness gate on (`gate_pass1` >
0) the model is checked at the end of that cycle (a callable model -> pass@1) and, while it is below the
gate, trained for another cosine cycle of `extend_steps` (a warm restart as in SGDR, at `restart_lr_scale` x
the peak; the optimizer state carries over) as long as the total stays within `max_steps`. A check happens
only on an annealed model: at the peak rate the sampled accuracy of these tiny models is mostly noise. (The
gate's other action, a fresh attempt, needs a new model: r1kit.recipes.zero.pretrain_base runs it, with this
loop's `max_steps` set to `steps`.)
"""
from __future__ import annotations

import math
import random
import sys
import time
import warnings
from typing import Callable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from r1kit import dist
from r1kit.config import PretrainConfig
from r1kit.corpus import CorpusDoc
from r1kit.policy import Policy
from r1kit.progress import progress_bar
from r1kit.trainers.packed_forward import packed_batch_loss, packed_problem
from r1kit.types import R1KitError


def lr_at(step: int, total: int, warmup: int, peak: float) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    frac = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))


class Schedule:
    """The learning rate per step as a list of cosine cycles [(start, length, peak)]; the gate appends one."""

    def __init__(self, cfg: PretrainConfig):
        self.cfg = cfg
        self.cycles = [(0, cfg.steps, cfg.lr)]

    @property
    def total(self) -> int:
        start, length, _ = self.cycles[-1]
        return start + length

    def lr(self, step: int) -> float:
        start, length, peak = next(c for c in reversed(self.cycles) if c[0] <= step)
        return lr_at(step - start, length, min(self.cfg.warmup_steps, length), peak)

    def can_extend(self) -> bool:
        return self.total + self.cfg.extend_steps <= self.cfg.max_steps

    def extend(self) -> None:
        c = self.cfg
        self.cycles.append((self.total, c.extend_steps, c.lr * c.restart_lr_scale ** len(self.cycles)))


def batches(encoded: list[list[int]], batch_size: int, pool: int, rng: random.Random):
    """Endless batches of documents (token id lists), drawn at random without replacement within a draw.

    pool > 1 buckets by length: `pool` batches' worth of documents are drawn at once, sorted by length, cut
    into batches and those batches shuffled, so a batch holds documents of about one length (in this corpus
    that means one style) and pads little: 1.5x less compute per step on zero-tiny. pool = 1 draws each
    batch alone (mixed lengths, padded to the longest)."""
    draw = pool * batch_size
    while True:
        docs = rng.sample(encoded, draw) if len(encoded) >= draw else rng.choices(encoded, k=draw)
        if pool > 1:
            docs.sort(key=len)
        group = [docs[i: i + batch_size] for i in range(0, draw, batch_size)]
        rng.shuffle(group)
        yield from group


def batch_loss(model, batch: list[list[int]], pad: int, per: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(objective, per-token mean loss) of next-token prediction on a batch of documents. The objective is
    the summed loss divided by `per` (an expected token count), or the per-token mean when `per` is None."""
    width = max(map(len, batch))
    ids = torch.full((len(batch), width), pad, dtype=torch.long)  # [B, T]
    mask = torch.zeros((len(batch), width), dtype=torch.long)  # [B, T]
    for i, seq in enumerate(batch):
        ids[i, : len(seq)] = torch.tensor(seq)
        mask[i, : len(seq)] = 1
    device = next(model.parameters()).device
    ids, mask = ids.to(device), mask.to(device)
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits  # [B, T, V]
    targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)  # [B, T-1]
    total = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=-100,
                            reduction="sum")
    n = (targets != -100).sum()
    return total / (n if per is None else per), total.detach() / n


def _packed_ok(model) -> bool:
    reason = packed_problem(model)
    if reason is not None:
        warnings.warn(f"pretrain.packed: {reason}; using padded batches", stacklevel=2)
    return reason is None


def validate(cfg: PretrainConfig) -> None:
    checks = [("steps", cfg.steps > 0, "a positive integer"), ("batch_size", cfg.batch_size > 0, "a positive integer"),
              ("lr", cfg.lr > 0, "positive"), ("bucket_pool", cfg.bucket_pool >= 1, "at least 1 (1 = no length bucketing)"), ("warmup_steps", cfg.warmup_steps >= 1, "at least 1"),
              ("gate_pass1", 0 <= cfg.gate_pass1 <= 1, "in [0, 1] (0 = no readiness gate)"),
              ("gate_reasoned_pass1", 0 <= cfg.gate_reasoned_pass1 <= 1, "in [0, 1] (0 = off)"),
              ("gate_problems", cfg.gate_problems > 0, "a positive integer"),
              ("gate_action", cfg.gate_action in ("restart", "extend"), "'restart' or 'extend'"),
              ("extend_steps", cfg.extend_steps > 0, "a positive integer"),
              ("max_steps", cfg.max_steps >= cfg.steps, f"at least pretrain.steps ({cfg.steps})"),
              ("restart_lr_scale", 0 < cfg.restart_lr_scale <= 1, "in (0, 1]")]
    for name, ok, expected in checks:
        if not ok:
            raise R1KitError(f"pretrain.{name} = {getattr(cfg, name)!r}: expected {expected}")


def gate_passed(cfg: PretrainConfig, result: dict) -> bool:
    """Whether a readiness check's result passes the gate: pass@1, and with gate_reasoned_pass1 > 0 the
    pass@1 of the samples that reason (none of them: not passed)."""
    if result["gate_pass1"] < cfg.gate_pass1:
        return False
    if cfg.gate_reasoned_pass1 > 0:
        if "reasoned_pass1" not in result:
            raise R1KitError("pretrain.gate_reasoned_pass1 > 0 needs a readiness check that reports reasoned_pass1")
        return result["reasoned_pass1"] >= cfg.gate_reasoned_pass1
    return True


def gate_margin(cfg: PretrainConfig, result: dict) -> float:
    """How close a failed check came to the gate (>= 1 for a pass): the smaller of its ratios to the thresholds."""
    ratios = [result["gate_pass1"] / cfg.gate_pass1]
    if cfg.gate_reasoned_pass1 > 0:
        ratios.append(result.get("reasoned_pass1", 0.0) / cfg.gate_reasoned_pass1)
    return min(ratios)


def pretrain(policy: Policy, docs: list[CorpusDoc], cfg: PretrainConfig, seed: int,
             show_progress: bool = True, check: Callable[[Policy], float | dict] | None = None) -> list[dict]:
    """Train the policy's model in place; returns one metrics record per 50 steps plus one per readiness check
    ({"step", "gate_pass1", "passed"}, and the check's other fields). `check` is called when cfg.gate_pass1 > 0:
    policy -> pass@1, or a dict with "gate_pass1" (and "reasoned_pass1" for cfg.gate_reasoned_pass1 > 0)."""
    validate(cfg)
    if cfg.batch_size < dist.world():
        raise R1KitError(f"pretrain.batch_size={cfg.batch_size} must be at least the number of ranks ({dist.world()})")
    dist.prepare(policy)  # under torchrun: DDP (stage 0's models are tiny), each rank a share of every batch
    model, tokenizer = policy.model, policy.tokenizer
    gated = cfg.gate_pass1 > 0
    if gated and check is None:
        raise R1KitError("pretrain.gate_pass1 > 0 needs a readiness check (the caller passes `check`)")
    encoded = [tokenizer(d.prompt + d.completion + tokenizer.eos_token).input_ids for d in docs]
    if not encoded:
        raise R1KitError("pretrain: the corpus is empty")
    # Bucketed batches hold documents of one length, so a token mean per batch would weigh the tokens of
    # short documents up; the sum over a batch divided by its expected token count keeps every token's
    # weight equal to the one it has in mixed batches.
    expected_tokens = cfg.batch_size * sum(len(e) - 1 for e in encoded) / len(encoded)
    rng = random.Random(seed)
    draws = batches(encoded, cfg.batch_size, cfg.bucket_pool, rng)
    torch.manual_seed(seed)
    opt = policy.make_optimizer(cfg.lr, cfg.weight_decay, betas=(0.9, 0.95))
    model.train()
    pad = tokenizer.pad_token_id
    packed = cfg.packed and _packed_ok(model)
    sched = Schedule(cfg)
    log, t0 = [], time.time()
    bar = progress_bar(None, desc="pretrain", enabled=show_progress and dist.is_main(), total=cfg.steps)
    step = 0
    while True:
        if step == sched.total:  # the end of a cycle
            if not gated:
                break
            result = dist.broadcast_object(check(policy) if dist.is_main() else None)  # every rank decides alike
            model.train()
            result = result if isinstance(result, dict) else {"gate_pass1": float(result)}
            score, passed = result["gate_pass1"], gate_passed(cfg, result)
            log.append({"step": step, **result, "passed": passed, "time": time.time() - t0})
            extend = not passed and sched.can_extend()
            if dist.is_main():
                on = cfg.gate_reasoned_pass1 > 0
                reasoned = f", {result['reasoned_pass1']:.3f} of the {result['reasoned']} samples that reason" if on else ""
                tqdm.write(f"stage 0 readiness check after {step} steps: sampled pass@1 {score:.3f}{reasoned} "
                           f"({'passed' if passed else 'below'} {cfg.gate_pass1}"
                           f"{f' and {cfg.gate_reasoned_pass1}' if on else ''}"
                           f"{'; training another cycle' if extend else ''})", file=sys.stderr)
            if not extend:
                break
            sched.extend()
            bar.total = sched.total
            bar.refresh()
        batch = next(draws)  # the global batch, drawn alike on every rank
        mine = batch[dist.even_share(len(batch))]  # this rank's documents
        # the global token count normalises every rank's sum (one process: the batch's own mean, as before)
        per = expected_tokens if cfg.bucket_pool > 1 else None if dist.world() == 1 else sum(len(d) - 1 for d in batch)
        with policy.autocast():
            objective, loss = packed_batch_loss(model, mine, per) if packed else batch_loss(model, mine, pad, per)
        for g in opt.param_groups:
            g["lr"] = sched.lr(step)
        opt.zero_grad(set_to_none=True)
        objective.backward()
        policy.clip_grad_norm(1.0)
        opt.step()
        if step % 50 == 0 or step == sched.total - 1:
            if dist.world() > 1:  # the global batch's token mean
                n = [sum(len(d) - 1 for d in x) for x in (mine, batch)]
                loss = dist.all_reduce_sum(loss.double() * n[0]) / n[1]
            log.append({"step": step, "loss": loss.item(), "lr": opt.param_groups[0]["lr"], "time": time.time() - t0})
            bar.set_postfix(loss=f"{loss.item():.3f}")
        bar.update(1)
        step += 1
    bar.close()
    model.eval()
    return log
