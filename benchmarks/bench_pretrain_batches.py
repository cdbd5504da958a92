"""Stage 0's seconds per step: plain mixed-length batches (pretrain.bucket_pool=1, the default) against
length-bucketed ones (--pool, 8), side by side on zero-tiny's corpus and model, interleaved in one process.

    python benchmarks/bench_pretrain_batches.py [--rounds 4] [--steps 40] [--threads 2] [--pool 8] [--packed]

--packed adds two kinds: the plain batches (the same draws) through pretrain.packed's loss (no padding,
per-document attention; r1kit/trainers/packed_forward.py), with the template's prefix (shared by every
document) computed once per batch ("packed") or once per document ("packed_unshared"), and writes
pretrain_packed.json instead.

Each round times `--steps` optimizer steps of each kind (the same loss code stage 0 runs: batch_loss, AdamW).
Writes benchmarks/results/pretrain_batches.json and prints s/step and padded tokens per step.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time
from pathlib import Path

import torch

from r1kit.cli import config_path
from r1kit.config import RunConfig, load_config
from r1kit.corpus import build_corpus
from r1kit.model import build_tiny_model, train_tokenizer
from r1kit.tasks import make_task
from r1kit.trainers.packed_forward import pack_documents, packed_batch_loss
from r1kit.trainers.pretrain import batch_loss, batches

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--pool", type=int, default=8, help="pretrain.bucket_pool of the bucketed batches")
    ap.add_argument("--packed", action="store_true", help="also time packed plain batches (pretrain.packed)")
    ns = ap.parse_args()
    torch.set_num_threads(ns.threads)
    cfg = load_config(RunConfig, config_path("zero-tiny"))
    p = cfg.pretrain
    task = make_task(cfg.task.name, **cfg.task.options)
    docs = build_corpus(task, 20000, p.direct_frac, p.reflect_frac, cfg.task.template, random.Random(0))
    tok = train_tokenizer((d.prompt + d.completion for d in docs[:5000]), cfg.model.vocab_size)
    encoded = [tok(d.prompt + d.completion + tok.eos_token).input_ids for d in docs]
    per = p.batch_size * sum(len(e) - 1 for e in encoded) / len(encoded)
    torch.manual_seed(0)
    model = build_tiny_model(cfg.model, tok).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    kinds = {"plain": batches(encoded, p.batch_size, 1, random.Random(1)),
             "bucketed": batches(encoded, p.batch_size, ns.pool, random.Random(1))}
    if ns.packed:  # the plain kind's batches, in the same order: the template's prefix once per batch or not
        kinds["packed"] = batches(encoded, p.batch_size, 1, random.Random(1))
        kinds["packed_unshared"] = batches(encoded, p.batch_size, 1, random.Random(1))
    times = {k: [] for k in kinds}
    padded = {k: [] for k in kinds}
    for _ in range(ns.rounds):
        for kind, draws in kinds.items():
            t0 = time.perf_counter()
            for _ in range(ns.steps):
                batch = next(draws)
                # tokens the projections see: the padded rectangle, or (packed) the real tokens only
                if kind.startswith("packed"):
                    lay = pack_documents(batch, share_prefix=kind == "packed")
                    padded[kind].append(lay.ids.numel())
                    objective, _ = packed_batch_loss(model, batch, share_prefix=kind == "packed")
                else:
                    padded[kind].append(len(batch) * max(map(len, batch)))
                    objective, _ = batch_loss(model, batch, tok.pad_token_id, per if kind == "bucketed" else None)
                opt.zero_grad(set_to_none=True)
                objective.backward()
                opt.step()
            times[kind].append((time.perf_counter() - t0) / ns.steps)
    real = p.batch_size * sum(map(len, encoded)) / len(encoded)
    res = {k: {"s_per_step": statistics.median(v), "rounds": v, "padded_tokens_per_step": statistics.mean(padded[k])}
           for k, v in times.items()}
    res["real_tokens_per_step"] = real
    res["speedup"] = res["plain"]["s_per_step"] / res["bucketed"]["s_per_step"]
    if ns.packed:
        res["packed_speedup_over_plain"] = res["plain"]["s_per_step"] / res["packed"]["s_per_step"]
        res["packed_unshared_speedup_over_plain"] = res["plain"]["s_per_step"] / res["packed_unshared"]["s_per_step"]
    res["setting"] = {"threads": ns.threads, "steps_per_round": ns.steps, "rounds": ns.rounds,
                      "batch_size": p.batch_size, "bucket_pool": ns.pool, "load_avg_1m": os.getloadavg()[0],
                      "cpu": torch.backends.cpu.get_cpu_capability()}
    out = ROOT / "benchmarks" / "results" / ("pretrain_packed.json" if ns.packed else "pretrain_batches.json")
    out.write_text(json.dumps(res, indent=2) + "\n")
    for k in kinds:
        print(f"{k:15s} {res[k]['s_per_step']:.3f} s/step  {res[k]['padded_tokens_per_step']:.0f} tokens/step computed "
              f"({real:.0f} real)")
    print(f"bucketed is {res['speedup']:.2f}x faster per step"
          + (f"; packed {res['packed_speedup_over_plain']:.2f}x (prefix not shared: "
                 f"{res['packed_unshared_speedup_over_plain']:.2f}x)" if ns.packed else "") + f"; wrote {out}")


if __name__ == "__main__":
    main()
