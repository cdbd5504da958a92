"""Shared builders for tests: a tiny tokenizer/model pair made in milliseconds, no downloads."""
from __future__ import annotations

import random

from r1kit.config import ModelConfig
from r1kit.corpus import build_corpus
from r1kit.model import build_tiny_model, train_tokenizer
from r1kit.tasks import make_task


def tiny_pair(arch: str = "llama", hidden: int = 32, layers: int = 1, seed: int = 0):
    import torch

    torch.manual_seed(seed)
    task = make_task("arithmetic", min_digits=1, max_digits=2, num_test=20)
    docs = build_corpus(task, 200, 0.5, 0.2, "r1_zero", random.Random(seed))
    tok = train_tokenizer([d.prompt + d.completion for d in docs], 300)
    cfg = ModelConfig(arch=arch, hidden_size=hidden, num_layers=layers, num_heads=2, num_kv_heads=2,
                      intermediate_size=2 * hidden, max_position_embeddings=256)
    return build_tiny_model(cfg, tok).eval(), tok
