"""Reward-model training (`r1kit rm`): a sequence classifier with one output, Bradley-Terry loss on pairs.

    pairs = read_preference_pairs(Path("prefs.jsonl"))        # {"prompt", "chosen", "rejected"} a line
    model = build_reward_model("runs/r1-tiny/base/model", tokenizer)   # or None + a ModelConfig: tiny
    policy = Policy(model, tokenizer, device="auto", lora=cfg.lora, task_type="SEQ_CLS")   # r1kit.policy
    summary = train_reward_model(policy, pairs, cfg.rm, out_dir, seed=0)

DeepSeek-R1 (section 2.3.4) scores general (non-reasoning) prompts with reward models trained on human
preferences; the loss is the Bradley-Terry negative log-likelihood that the chosen answer wins,
    L = -log sigmoid(r(x, y_chosen) - r(x, y_rejected)).
The model is any Hugging Face `...ForSequenceClassification` with `num_labels=1`: the score is read at
the last non-pad token (the model's own pooling), so `pad_token_id` must be set in its config. Building
it from a causal LM's folder keeps that model's backbone and adds a fresh linear score head, the usual
way reward models start. Each text is prompt + completion + EOS, tokenised like SFT data. The output
folder `model/` is a plain HF folder (with LoRA: the adapter merged in): r1kit.rewards.reward_model loads
it as a reward function.
"""
from __future__ import annotations

import random
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from r1kit import dist
from r1kit.config import ModelConfig, RewardModelConfig
from r1kit.io import append_jsonl, atomic_dir, atomic_write_json
from r1kit.model import load_classifier
from r1kit.policy import Policy
from r1kit.rewards.reward_model import encode_texts, rewards_of  # noqa: F401  (encode_texts re-exported)
from r1kit.trainers.sft import lr_at
from r1kit.types import R1KitError


@dataclass(frozen=True)
class PreferencePair:
    prompt: str  # the prompt text as the policy saw it
    chosen: str  # the preferred completion
    rejected: str  # the other one
    kind: str = ""  # optional label of how the rejected answer is wrong; validation accuracy is reported per kind


def read_preference_pairs(path: Path) -> list[PreferencePair]:
    """Pairs from a JSONL file; R1KitError naming the file and line of a malformed record."""
    from r1kit.tasks.files import load_records  # one JSONL/parquet reader for every data file

    path = Path(path)
    pairs = []
    for loc, d in load_records(path):
        if not all(isinstance(d.get(k), str) for k in ("prompt", "chosen", "rejected")):
            raise R1KitError(f"preference file {str(path)!r}, {loc}: expected string fields 'prompt', 'chosen', 'rejected'")
        if not isinstance(d.get("kind", ""), str):
            raise R1KitError(f"preference file {str(path)!r}, {loc}: 'kind' must be a string, got {d['kind']!r}")
        if d["chosen"] == d["rejected"]:
            raise R1KitError(f"preference file {str(path)!r}, {loc}: chosen and rejected are the same text")
        pairs.append(PreferencePair(d["prompt"], d["chosen"], d["rejected"], d.get("kind", "")))
    if not pairs:
        raise R1KitError(f"preference file {str(path)!r} has no pairs")
    return pairs


def build_reward_model(init: str | Path | None, tokenizer, model_cfg: ModelConfig | None = None) -> torch.nn.Module:
    """A one-output sequence classifier: from an HF folder (causal LM or classifier) or, with init None,
    a tiny Llama/Qwen2 classifier built from `model_cfg` (random weights)."""
    if init:
        try:
            model = load_classifier(init, num_labels=1)
        except R1KitError as e:
            raise R1KitError(f"reward model init: {e}") from e
    else:
        if model_cfg is None:
            raise ValueError("build_reward_model needs `init` or `model_cfg`")
        model = _tiny_classifier(model_cfg, tokenizer)
    model.config.pad_token_id = tokenizer.pad_token_id
    return model


def _tiny_classifier(cfg: ModelConfig, tokenizer) -> torch.nn.Module:
    common = dict(vocab_size=len(tokenizer), hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
                  num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
                  intermediate_size=cfg.intermediate_size, max_position_embeddings=cfg.max_position_embeddings,
                  num_labels=1, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    if cfg.arch == "llama":
        from transformers import LlamaConfig, LlamaForSequenceClassification

        return LlamaForSequenceClassification(LlamaConfig(**common))
    if cfg.arch == "qwen2":
        from transformers import Qwen2Config, Qwen2ForSequenceClassification

        return Qwen2ForSequenceClassification(Qwen2Config(**common))
    raise R1KitError(f"model.arch: unknown tiny architecture {cfg.arch!r}; expected 'llama' or 'qwen2'")


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """Mean over pairs of -log sigmoid(r_chosen - r_rejected); chosen, rejected: [B] -> scalar."""
    return -F.logsigmoid(chosen - rejected).mean()


@torch.no_grad()
def evaluate_pairs(model, tokenizer, pairs: list[PreferencePair], batch_size: int = 64) -> dict[str, Any]:
    """Pairwise accuracy (chosen scored higher), mean Bradley-Terry loss and mean margin over `pairs`; with
    labelled pairs also "by_kind": {kind: {"accuracy", "pairs"}} (an overall accuracy can hide a kind at chance)."""
    if not pairs:
        return {"accuracy": float("nan"), "loss": float("nan"), "margin": float("nan")}
    was = model.training
    model.eval()
    won: list[bool] = []
    losses, margins = 0.0, 0.0
    for i in range(0, len(pairs), batch_size):
        b = pairs[i : i + batch_size]
        rc = rewards_of(model, tokenizer, [p.prompt for p in b], [p.chosen for p in b])
        rr = rewards_of(model, tokenizer, [p.prompt for p in b], [p.rejected for p in b])
        won += (rc > rr).tolist()
        losses += float(bradley_terry_loss(rc, rr)) * len(b)
        margins += float((rc - rr).sum())
    model.train(was)
    out: dict[str, Any] = {"accuracy": sum(won) / len(pairs), "loss": losses / len(pairs), "margin": margins / len(pairs)}
    counts, wins = Counter(p.kind for p in pairs if p.kind), Counter(p.kind for w, p in zip(won, pairs) if p.kind and w)
    if counts:
        out["by_kind"] = {k: {"accuracy": wins[k] / n, "pairs": n} for k, n in sorted(counts.items())}
    return out


def split_pairs(pairs: list[PreferencePair], val_frac: float, seed: int) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """A seeded shuffle split into (train, validation); at least one training pair."""
    if not 0 <= val_frac < 1:
        raise R1KitError(f"rm.val_frac must be in [0, 1), got {val_frac}")
    order = list(pairs)
    random.Random(seed).shuffle(order)
    n_val = min(len(order) - 1, int(round(val_frac * len(order))))
    return order[n_val:], order[:n_val]


def train_reward_model(policy: Policy, pairs: list[PreferencePair], cfg: RewardModelConfig, out_dir: Path, *,
                       seed: int) -> dict[str, Any]:
    """Train the policy's classifier in place; write out_dir/{metrics.jsonl, model/, rm.json}. Returns the
    rm.json summary: validation accuracy/loss before and after, first/last training loss, seconds.

    No mid-run checkpoints: reward models here train in seconds; a rerun starts over (deterministic)."""
    if not isinstance(policy, Policy):
        raise TypeError(f"train_reward_model takes an r1kit.policy.Policy, got {type(policy).__name__}")
    dist.prepare(policy)  # under torchrun: DDP, each rank a share of every batch of pairs
    model, tokenizer = policy.model, policy.tokenizer
    if cfg.epochs < 1 or cfg.batch_size < 1 or not cfg.lr > 0:
        raise R1KitError(f"rm: need epochs >= 1, batch_size >= 1, lr > 0; got {cfg.epochs}, {cfg.batch_size}, {cfg.lr}")
    out_dir = Path(out_dir)
    train, val = split_pairs(pairs, cfg.val_frac, seed)
    torch.manual_seed(seed)
    rng = random.Random(seed)
    steps_per_epoch = -(-len(train) // cfg.batch_size)
    total = cfg.epochs * steps_per_epoch
    opt = policy.make_optimizer(cfg.lr, cfg.weight_decay, betas=(0.9, 0.95))
    before = evaluate_pairs(policy.module, tokenizer, val)
    metrics = out_dir / "metrics.jsonl"
    if dist.is_main():  # only rank 0 writes files
        metrics.unlink(missing_ok=True)
    t0, step, log = time.time(), 0, []
    model.train()
    for _ in range(cfg.epochs):
        order = list(train)
        rng.shuffle(order)
        for i in range(0, len(order), cfg.batch_size):
            b = order[i : i + cfg.batch_size]
            mine = b[dist.even_share(len(b))] or b[:1]  # this rank's pairs (weight 0 when it has none)
            prompts = [p.prompt for p in mine]
            with policy.autocast():
                loss = bradley_terry_loss(rewards_of(model, tokenizer, prompts, [p.chosen for p in mine]),
                                          rewards_of(model, tokenizer, prompts, [p.rejected for p in mine]))
            if dist.world() > 1:  # this rank's part of the mean over the GLOBAL batch; gradients are summed
                loss = loss * (len(b[dist.even_share(len(b))]) / len(b))
            for g in opt.param_groups:
                g["lr"] = lr_at(step, total, cfg.warmup_steps, cfg.lr, 0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            policy.clip_grad_norm(cfg.grad_clip)
            opt.step()
            step += 1
            log.append({"step": step, "loss": float(dist.all_reduce_sum(loss.detach().double())),
                        "lr": opt.param_groups[0]["lr"]})
            if dist.is_main():
                append_jsonl(metrics, log[-1])
    model.eval()
    after = evaluate_pairs(policy.module, tokenizer, val)
    summary = {"pairs": len(pairs), "train_pairs": len(train), "val_pairs": len(val), "steps": step,
               "first_loss": log[0]["loss"], "last_loss": log[-1]["loss"], "val_before": before, "val_after": after,
               "seconds": time.time() - t0, "params": policy.parameter_counts(),
               "peak_memory_mb": policy.peak_memory_mb()}
    if dist.is_main():
        with atomic_dir(out_dir / "model") as tmp:
            policy.export_merged(tmp)  # a plain classifier folder even with LoRA: the scorer loads it as is
        atomic_write_json(out_dir / "rm.json", summary)
    dist.barrier()
    return summary
