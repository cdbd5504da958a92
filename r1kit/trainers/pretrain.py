"""Stage 0: pretrain the tiny base model from scratch on the synthetic corpus.

A plain next-token loop: batches of whole documents, right-padded, AdamW with warm-up + cosine decay.
"""
from __future__ import annotations

import math
import random
import time

import torch
import torch.nn.functional as F

from r1kit.config import PretrainConfig
from r1kit.corpus import CorpusDoc
from r1kit.progress import progress_bar


def lr_at(step: int, total: int, warmup: int, peak: float) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    frac = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))


def pretrain(model, tokenizer, docs: list[CorpusDoc], cfg: PretrainConfig, seed: int,
             show_progress: bool = True) -> list[dict]:
    """Train `model` in place; returns one metrics record per 50 steps."""
    encoded = [tokenizer(d.prompt + d.completion + tokenizer.eos_token).input_ids for d in docs]
    rng = random.Random(seed)
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    model.train()
    pad = tokenizer.pad_token_id
    log, t0 = [], time.time()
    bar = progress_bar(range(cfg.steps), desc="pretrain", enabled=show_progress)
    for step in bar:
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
            g["lr"] = lr_at(step, cfg.steps, cfg.warmup_steps, cfg.lr)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 50 == 0 or step == cfg.steps - 1:
            log.append({"step": step, "loss": loss.item(), "lr": opt.param_groups[0]["lr"], "time": time.time() - t0})
            bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    return log
