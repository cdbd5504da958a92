"""Supervised fine-tuning (cold start, the R1 recipe's SFT stage, distillation): loss on completions only.

    examples = load_sft_data(Path("data.jsonl"), tokenizer)       # {"messages": [...]} or {"prompt", "completion"}
    summary = train_sft(policy, examples, cfg.sft, out_dir, seed=0)  # policy: r1kit.policy.Policy

Data: one JSON object a line, either `{"prompt": str, "completion": str}` (the prompt text is used as is,
e.g. an R1-Zero prompt ending in "Assistant:") or `{"messages": [{"role", "content"}, ...]}` rendered with
the tokenizer's chat template, every assistant turn trained. The prompt and the completion are tokenised
separately and concatenated, exactly as at inference (the engine continues the prompt's own tokens); the
completion is followed by EOS, which is trained too, so the model learns to stop.

Packing: examples are shuffled each epoch (seeded) and packed greedily into rows of `seq_len` tokens.
Each example keeps its own positions (restarting at 0) and attends only to itself (a block-diagonal
causal 4-D mask), so a packed row computes exactly what its examples would alone, without padding waste.

Loss: token cross-entropy summed over completion tokens and divided by the number of completion tokens of
the whole optimizer step, so `micro_batch_size x grad_accum` can be traded freely (batch 1 x 8 steps =
batch 8 x 1). AdamW, linear warm-up then cosine decay to `lr * min_lr_frac`, gradient clipping.
Checkpoints (atomic, r1kit.checkpoint) every `save_every` steps; a rerun resumes from the newest, and
since each epoch's packing depends only on (seed, epoch), it trains on exactly the batches it would have.
"""
from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from r1kit import dist
from r1kit.checkpoint import latest_checkpoint, load_trainer_state, save_checkpoint
from r1kit.config import SFTConfig
from r1kit.io import append_jsonl, atomic_dir, atomic_write_json, atomic_write_text, read_jsonl
from r1kit.policy import Policy
from r1kit.progress import progress_bar
from r1kit.types import R1KitError


@dataclass(frozen=True)
class SFTExample:
    """One tokenised training example."""

    ids: list[int]  # [L] prompt tokens, then completion tokens (+ EOS)
    trained: list[bool]  # [L] True on the tokens the loss learns to predict (completion + EOS)


@dataclass
class SFTBatch:
    """Packed rows ready for the model; T = longest row of the micro-batch."""

    input_ids: torch.Tensor  # [B, T] long, pad where no example
    targets: torch.Tensor  # [B, T] long, the next token of each position (pad where none)
    loss_mask: torch.Tensor  # [B, T] float, 1 where the next token is a trained token of the same example
    position_ids: torch.Tensor  # [B, T] long, restarting at 0 for each example
    attention_mask: torch.Tensor  # [B, 1, T, T] bool, causal within each example only

    @property
    def num_tokens(self) -> int:
        return int(self.loss_mask.sum().item())

    def to(self, device: torch.device) -> SFTBatch:
        return SFTBatch(*(t.to(device, non_blocking=True) for t in (self.input_ids, self.targets, self.loss_mask,
                                                                      self.position_ids, self.attention_mask)))


# ----------------------------------------------------------------------------- data


def read_sft_records(path: Path) -> list[dict[str, Any]]:
    """The JSONL records of `path`; R1KitError naming the file (and line) when missing, empty or not JSON."""
    path = Path(path)
    if not path.is_file():
        raise R1KitError(f"SFT data file {str(path)!r} not found")
    records = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise R1KitError(f"SFT data file {str(path)!r}, line {i + 1}: not JSON ({e})") from e
    if not records:
        raise R1KitError(f"SFT data file {str(path)!r} has no examples")
    return records


def encode_record(record: dict[str, Any], tokenizer, where: str = "") -> SFTExample:
    """Tokenise one record ({"prompt","completion"} or {"messages"}); `where` names it in errors."""
    if not isinstance(record, dict):
        raise R1KitError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if "messages" in record:
        segments = chat_segments(record["messages"], tokenizer, where)
    elif "prompt" in record and "completion" in record:
        p, c = record["prompt"], record["completion"]
        if not isinstance(p, str) or not isinstance(c, str) or not c:
            raise R1KitError(f"{where}: 'prompt' and 'completion' must be strings, the completion non-empty")
        segments = [(p, False), (c, True)]
    else:
        raise R1KitError(f"{where}: expected keys 'messages' or 'prompt'+'completion', got {sorted(record)}")
    ids: list[int] = []
    trained: list[bool] = []
    for text, train in segments:
        piece = tokenizer(text, add_special_tokens=False).input_ids if text else []
        if train:  # each trained segment ends the turn, so it ends with EOS
            piece = piece + [tokenizer.eos_token_id]
        ids += piece
        trained += [train] * len(piece)
    if not any(trained):
        raise R1KitError(f"{where}: nothing to train on (no assistant content)")
    return SFTExample(ids, trained)


def chat_segments(messages: Any, tokenizer, where: str) -> list[tuple[str, bool]]:
    """Split a rendered chat into (text, trained) pieces: each assistant message's content is trained,
    everything else (system/user turns, role headers) is context. Works for any prefix-stable template:
    the text of message k is render(messages[:k+1]) minus render(messages[:k], generation prompt)."""
    if not isinstance(messages, list) or not messages:
        raise R1KitError(f"{where}: 'messages' must be a non-empty list")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or m.get("role") not in ("system", "user", "assistant"):
            raise R1KitError(f"{where}: message {i} must be {{'role': system|user|assistant, 'content': str}}, got {m!r}")
    if not getattr(tokenizer, "chat_template", None):
        raise R1KitError(f"{where}: 'messages' data needs a tokenizer with a chat template; use prompt/completion records")
    if messages[-1]["role"] != "assistant":
        raise R1KitError(f"{where}: the last message must be the assistant's (it is what is learned)")

    def render(msgs, gen):  # EOS is appended by the caller, so strip the template's own turn ending
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen) if msgs else ""

    segments, done = [], ""
    for k, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        head = render(messages[:k], True)
        full = render(messages[: k + 1], False)
        content_at = full.find(m["content"], len(head))
        if not full.startswith(done) or not head.startswith(done) or content_at < 0:
            raise R1KitError(f"{where}: the tokenizer's chat template is not prefix-stable; use prompt/completion records")
        segments += [(head[len(done):] + full[len(head):content_at], False), (m["content"], True)]
        done = full
    return segments


def load_sft_data(path: Path, tokenizer, seq_len: int | None = None) -> tuple[list[SFTExample], dict[str, int]]:
    """All examples of a JSONL file, and counts: examples, truncated (longer than `seq_len`, cut), tokens."""
    records = read_sft_records(path)
    examples, truncated = [], 0
    for i, r in enumerate(records):
        ex = encode_record(r, tokenizer, f"{path}:{i + 1}")
        if seq_len is not None and len(ex.ids) > seq_len:
            ex, truncated = SFTExample(ex.ids[:seq_len], ex.trained[:seq_len]), truncated + 1
        examples.append(ex)
    stats = {"examples": len(examples), "truncated": truncated, "tokens": sum(len(e.ids) for e in examples),
             "trained_tokens": sum(sum(e.trained) for e in examples)}
    return examples, stats


# ----------------------------------------------------------------------------- packing


def pack_examples(examples: list[SFTExample], seq_len: int, rng: random.Random) -> list[list[SFTExample]]:
    """Shuffle, then pack greedily: each example goes into the first row with room (first fit), so rows
    stay full without reordering much. Examples longer than `seq_len` are a programming error here."""
    order = list(range(len(examples)))
    rng.shuffle(order)
    rows: list[list[SFTExample]] = []
    room: list[int] = []
    for i in order:
        ex = examples[i]
        if len(ex.ids) > seq_len:
            raise ValueError(f"example of {len(ex.ids)} tokens does not fit seq_len={seq_len}")
        slot = next((r for r, free in enumerate(room) if free >= len(ex.ids)), None)
        if slot is None:
            rows.append([])
            room.append(seq_len)
            slot = len(rows) - 1
        rows[slot].append(ex)
        room[slot] -= len(ex.ids)
    return rows


def collate(rows: list[list[SFTExample]], pad_id: int) -> SFTBatch:
    """Packed rows -> one SFTBatch. The target of position t is token t+1 of the same example; the loss
    mask is 1 where that token is trained (the first token of an example is predicted by nothing)."""
    width = max(sum(len(e.ids) for e in row) for row in rows)
    B = len(rows)
    ids = torch.full((B, width), pad_id, dtype=torch.long)  # [B, T]
    targets = torch.full((B, width), pad_id, dtype=torch.long)  # [B, T]
    mask = torch.zeros((B, width))  # [B, T]
    pos = torch.zeros((B, width), dtype=torch.long)  # [B, T]
    seg = -torch.arange(1, B * width + 1).view(B, width)  # [B, T] each pad its own segment
    for b, row in enumerate(rows):
        t = 0
        for j, ex in enumerate(row):
            n = len(ex.ids)
            ids[b, t : t + n] = torch.tensor(ex.ids)
            targets[b, t : t + n - 1] = torch.tensor(ex.ids[1:])
            mask[b, t : t + n - 1] = torch.tensor(ex.trained[1:], dtype=torch.float)
            pos[b, t : t + n] = torch.arange(n)
            seg[b, t : t + n] = j
            t += n
    causal = torch.ones(width, width, dtype=torch.bool).tril()  # [T, T]
    attn = (seg[:, :, None] == seg[:, None, :]) & causal  # [B, T, T]
    return SFTBatch(ids, targets, mask, pos, attn[:, None])


def completion_loss_sum(model, batch: SFTBatch) -> torch.Tensor:
    """Sum over trained positions of -log p(next token): the SFT objective before normalisation,
    L = -sum_t m_t log p(y_t | y_<t, x) (only completion tokens y count; the prompt x is context)."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                   position_ids=batch.position_ids, use_cache=False).logits  # [B, T, V]
    nll = F.cross_entropy(logits.float().flatten(0, 1), batch.targets.flatten(), reduction="none")  # [B*T]
    return (nll * batch.loss_mask.flatten()).sum()


# ----------------------------------------------------------------------------- schedule


def lr_at(step: int, total: int, warmup: int, peak: float, min_frac: float) -> float:
    """Linear warm-up over `warmup` steps, then cosine from `peak` to `peak * min_frac` at `total`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    frac = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (min_frac + (1 - min_frac) * 0.5 * (1 + math.cos(math.pi * frac)))


@dataclass
class SFTPlan:
    """Which micro-batches make each optimizer step: a pure function of (examples, config, seed)."""

    examples: list[SFTExample]
    cfg: SFTConfig
    seed: int

    def __post_init__(self) -> None:
        rows = len(pack_examples(self.examples, self.cfg.seq_len, random.Random(0)))
        self.rows_per_step = self.cfg.micro_batch_size * self.cfg.grad_accum
        self.steps_per_epoch = max(1, math.ceil(rows / self.rows_per_step))
        total = self.cfg.epochs * self.steps_per_epoch
        self.total_steps = min(total, self.cfg.max_steps) if self.cfg.max_steps > 0 else total
        self._epoch, self._rows = -1, []

    def micro_batches(self, step: int, pad_id: int) -> list[SFTBatch]:
        epoch, k = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:  # each epoch's packing depends only on (seed, epoch)
            self._epoch, self._rows = epoch, pack_examples(self.examples, self.cfg.seq_len, random.Random(f"{self.seed}-{epoch}"))
        rows = self._rows[k * self.rows_per_step : (k + 1) * self.rows_per_step]
        mb = self.cfg.micro_batch_size
        # Under torchrun each rank takes a contiguous share of the step's rows (sizes differ by at most one);
        # a rank with fewer micro-batches than the busiest pads with weightless ones (loss mask 0), because
        # every rank must run as many forward/backward passes (DDP/FSDP2 collectives).
        mine = rows[dist.even_share(len(rows))]
        batches = [collate(mine[i : i + mb], pad_id) for i in range(0, len(mine), mb)]
        busiest = -(-len(rows) // dist.world())
        while len(batches) < -(-busiest // mb):
            b = collate(rows[:1], pad_id)
            batches.append(SFTBatch(b.input_ids, b.targets, torch.zeros_like(b.loss_mask), b.position_ids, b.attention_mask))
        return batches


# ----------------------------------------------------------------------------- the loop


def validate_sft_config(cfg: SFTConfig) -> None:
    for name in ("epochs", "seq_len", "micro_batch_size", "grad_accum"):
        if getattr(cfg, name) < 1:
            raise R1KitError(f"sft.{name} must be >= 1, got {getattr(cfg, name)}")
    if not cfg.lr > 0 or not 0 <= cfg.min_lr_frac <= 1 or cfg.warmup_steps < 0:
        raise R1KitError(f"sft: need lr > 0, 0 <= min_lr_frac <= 1, warmup_steps >= 0; got {cfg.lr}, {cfg.min_lr_frac}, {cfg.warmup_steps}")


def train_sft(policy: Policy, examples: list[SFTExample], cfg: SFTConfig, out_dir: Path, *, seed: int,
              resume: bool = True, config_yaml: str = "", show_progress: bool = False) -> dict[str, Any]:
    """Fine-tune the policy in place on `examples`; write out_dir/{metrics.jsonl, checkpoints/, model/, sft.json}
    (model/ and the checkpoints hold only the adapter when the policy has LoRA).

    Returns the summary also written to sft.json: steps, tokens, first/last loss, seconds, parameter
    counts and peak memory.
    """
    if not isinstance(policy, Policy):
        raise TypeError(f"train_sft takes an r1kit.policy.Policy, got {type(policy).__name__}")
    dist.prepare(policy)  # DDP (or the recipe's FSDP2) when on several ranks; before the optimizer
    model, tokenizer = policy.model, policy.tokenizer
    validate_sft_config(cfg)
    if not examples:
        raise R1KitError("SFT: no training examples")
    out_dir = Path(out_dir)
    plan = SFTPlan(examples, cfg, seed)
    torch.manual_seed(seed)
    opt = policy.make_optimizer(cfg.lr, cfg.weight_decay, betas=(0.9, 0.95))
    start = _resume(policy, opt, out_dir) if resume else 0
    metrics = out_dir / "metrics.jsonl"
    main = dist.is_main()  # under torchrun only rank 0 writes files
    if metrics.exists() and main:  # records after the checkpoint will be logged again
        keep = [r for r in read_jsonl(metrics) if r.get("step", 0) <= start]
        atomic_write_text(metrics, "".join(json.dumps(r) + "\n" for r in keep))
    t0 = time.time()
    model.train()
    bar = progress_bar(range(start, plan.total_steps), desc="sft", enabled=show_progress and main, initial=start,
                       total=plan.total_steps)
    for step in bar:
        record = sft_step(policy, opt, plan.micro_batches(step, tokenizer.pad_token_id), cfg,
                          lr_at(step, plan.total_steps, cfg.warmup_steps, cfg.lr, cfg.min_lr_frac))
        record.update(step=step + 1, epoch=step // plan.steps_per_epoch, time=time.time() - t0)
        if main:
            append_jsonl(metrics, record)
        bar.set_postfix(loss=f"{record['loss']:.3f}")
        if (step + 1) % max(1, cfg.save_every) == 0 and step + 1 < plan.total_steps:
            _save(policy, opt, out_dir, step + 1, config_yaml, cfg.keep_checkpoints)
    model.eval()
    weights = dist.full_state_dict(model) if dist.is_sharded(policy.module) else None  # FSDP2: gathered (collective)
    if not main:
        dist.barrier()
        return {}
    log = read_jsonl(metrics) if metrics.exists() else []
    summary = {"steps": plan.total_steps, "resumed_from": start, "examples": len(examples),
               "steps_per_epoch": plan.steps_per_epoch, "trained_tokens": sum(r["tokens"] for r in log),
               "first_loss": log[0]["loss"] if log else None, "last_loss": log[-1]["loss"] if log else None,
               "seconds": time.time() - t0, "params": policy.parameter_counts(),
               "peak_memory_mb": policy.peak_memory_mb()}
    with atomic_dir(out_dir / "model") as tmp:
        policy.save(tmp, state_dict=weights)
    atomic_write_json(out_dir / "sft.json", summary)
    dist.barrier()
    return summary


def sft_step(policy: Policy, opt, micro: list[SFTBatch], cfg: SFTConfig, lr: float) -> dict[str, float]:
    """One optimizer step over its micro-batches; the loss is the mean over the step's trained tokens (of
    every rank: each rank's gradient is then its part of the sum, and gradients are summed over ranks)."""
    n_tokens = max(1, int(dist.all_reduce_sum(sum(b.num_tokens for b in micro))))
    for g in opt.param_groups:
        g["lr"] = lr
    opt.zero_grad(set_to_none=True)
    total = 0.0
    for j, b in enumerate(micro):
        with dist.grad_sync(policy.model, j == len(micro) - 1):  # DDP: only the last micro-batch all-reduces
            with policy.autocast():
                loss = completion_loss_sum(policy.model, b.to(policy.device)) / n_tokens
            loss.backward()
        total += loss.item()
    total = float(dist.all_reduce_sum(total))
    grad_norm = policy.clip_grad_norm(cfg.grad_clip)
    opt.step()
    return {"loss": total, "lr": lr, "grad_norm": float(grad_norm), "tokens": n_tokens}


def _save(policy: Policy, opt, out_dir: Path, step: int, config_yaml: str, keep: int) -> None:
    weights = dist.full_state_dict(policy.module) if dist.is_sharded(policy.module) else None  # collective
    state = {"step": step, "optimizer": dist.full_optimizer_state(policy.module, opt), "torch_rng": torch.get_rng_state()}
    if dist.is_main():
        save_checkpoint(out_dir / "checkpoints", step, policy, state, config_yaml, keep=keep, state_dict=weights)
    dist.barrier()


def _resume(policy: Policy, opt, out_dir: Path) -> int:
    """Load the newest checkpoint under out_dir/checkpoints (if any); return its step."""
    ckpt = latest_checkpoint(out_dir / "checkpoints")
    if ckpt is None:
        return 0
    policy.load_weights(ckpt / "model")
    state = load_trainer_state(ckpt)
    dist.load_full_optimizer_state(policy.module, opt, state["optimizer"])
    torch.set_rng_state(state["torch_rng"])
    return int(state["step"])

