"""The GRPO update's forward + backward: padded (`token_logprobs`) vs packed (r1kit/trainers/packed_forward.py),
float32 vs bf16 autocast, side by side in one process, on the bench_vs_trl model.

Setting: the ~3.4M-parameter Llama of benchmarks/bench_vs_trl.py (hidden 256, 4 layers, MLP 768, its own
300-token BPE), 4 prompts x 8 completions in one micro-batch, prompts rendered from the arithmetic task with
the R1-Zero template. Completion lengths: `full` (all 64: what a random-init model samples, as in
bench_vs_trl) and `ragged` (uniform in 1..256, a trained model's spread at <= 256 new tokens).
Each variant runs the GRPO objective's forward and backward; variants are interleaved round by round so
that load drift hits all of them. Model FLOP utilisation counts 6 x params x real tokens (prompt once per
completion, as the padded computation needs) plus attention, over the measured time: the useful work.

    python benchmarks/bench_packed_update.py [--rounds 7] [--threads 2]
Writes benchmarks/results/packed_update.json and prints a table.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from r1kit.algorithms import agg_denominator, policy_objective  # noqa: E402
from r1kit.config import ModelConfig  # noqa: E402
from r1kit.corpus import build_corpus  # noqa: E402
from r1kit.model import build_tiny_model, train_tokenizer  # noqa: E402
from r1kit.tasks import make_task  # noqa: E402
from r1kit.templates import render_prompt  # noqa: E402
from r1kit.trainers.packed_forward import completion_logprobs  # noqa: E402
from r1kit.types import Rollout  # noqa: E402

P, G = 4, 8


def build(seed: int = 0):
    task = make_task("arithmetic")
    docs = build_corpus(task, 2000, 0.6, 0.1, "r1_zero", random.Random(seed))
    tok = train_tokenizer([d.prompt + d.completion for d in docs], 300)
    torch.manual_seed(seed)
    model = build_tiny_model(ModelConfig(hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=4,
                                         intermediate_size=768, max_position_embeddings=512), tok)
    prompts = [tok(render_prompt(p.question, "r1_zero")).input_ids
               for p in task.train_problems(P, random.Random(seed))]
    return model, tok, prompts


def rollout(prompts: list[list[int]], lengths: list[int], vocab: int, pad: int, seed: int = 0) -> Rollout:
    g = torch.Generator().manual_seed(seed)
    N, Tp, Tc = P * G, max(map(len, prompts)), max(lengths)
    pids, pmask = torch.full((N, Tp), pad), torch.zeros(N, Tp, dtype=torch.long)
    for r in range(N):
        p = prompts[r // G]
        pids[r, Tp - len(p):], pmask[r, Tp - len(p):] = torch.tensor(p), 1
    cids, cmask = torch.full((N, Tc), pad), torch.zeros(N, Tc)
    for r, n in enumerate(lengths):
        cids[r, :n], cmask[r, :n] = torch.randint(2, vocab, (n,), generator=g), 1
    return Rollout(pids, pmask, cids, cmask, torch.zeros(N, Tc), torch.zeros(N, dtype=torch.bool), G)


def step(model, ro: Rollout, packed: bool, bf16: bool) -> torch.Tensor:
    """One micro-batch of the update: objective forward + backward; returns the logprobs."""
    idx = torch.arange(ro.num_rows)
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        lp, ent, tc = completion_logprobs(model, ro, idx, 1.0, packed=packed, with_entropy=True, entropy_grad=False)
    mask = ro.completion_mask[:, :tc]
    adv = torch.linspace(-1, 1, ro.num_rows)
    loss, _ = policy_objective(lp, lp.detach(), adv, mask, entropy=ent, denominator=agg_denominator(mask, "seq-mean-token-mean"))
    loss.backward()
    return lp.detach()


def flops(model, ro: Rollout) -> float:
    """Useful FLOPs of one forward + backward: 6 x non-embedding params x tokens (each completion with its
    prompt) + attention (12 x layers x hidden x context per token) + the LM head at completion tokens."""
    cfg = model.config
    n_params = sum(p.numel() for n, p in model.named_parameters() if "embed" not in n and "lm_head" not in n)
    plen, clen = ro.prompt_mask.sum(-1).double(), ro.completion_mask.sum(-1).double()
    tokens = float((plen + clen).sum())
    ctx = float(((plen + clen) * (plen + clen + 1) / 2).sum())  # sum over tokens of their context length
    head = 6 * cfg.hidden_size * cfg.vocab_size * float(clen.sum())
    return 6 * n_params * tokens + 12 * cfg.num_hidden_layers * cfg.hidden_size * ctx + head


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ns = ap.parse_args()
    torch.set_num_threads(ns.threads)
    model, tok, prompts = build()
    model.train()
    rng = random.Random(1)
    shapes = {"full64": [64] * (P * G), "ragged256": [rng.randint(1, 256) for _ in range(P * G)]}
    variants = {"padded fp32": (False, False), "packed fp32": (True, False),
                "padded bf16": (False, True), "packed bf16": (True, True)}
    load_before = os.getloadavg()
    results = {}
    for shape, lengths in shapes.items():
        ro = rollout(prompts, lengths, len(tok), tok.pad_token_id)
        times = {v: [] for v in variants}
        lps = {v: step(model, ro, *flags) for v, flags in variants.items()}  # warm-up, and the logprobs
        for _ in range(ns.rounds):
            for v, flags in variants.items():
                t = time.perf_counter()
                step(model, ro, *flags)
                times[v].append(time.perf_counter() - t)
        valid = ro.completion_mask > 0
        f = flops(model, ro)
        ref = lps["padded fp32"]
        results[shape] = {
            "prompt_tokens": [len(p) for p in prompts], "completion_tokens": sum(lengths),
            "useful_gflop": f / 1e9,
            "variants": {v: {"median_s": statistics.median(t), "times_s": t,
                             "gflop_per_s": f / 1e9 / statistics.median(t),
                             "max_abs_logprob_err_vs_padded_fp32": float((lps[v] - ref)[valid].abs().max()),
                             "mean_abs_logprob_err_vs_padded_fp32": float((lps[v] - ref)[valid].abs().mean())}
                         for v, t in times.items()},
        }
    out = {"command": "python benchmarks/bench_packed_update.py " + " ".join(sys.argv[1:]), "threads": ns.threads,
           "torch": torch.__version__, "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
           "setting": f"{P} prompts x {G} completions, one micro-batch, ~3.4M-param llama (bench_vs_trl)",
           "results": results}
    path = ROOT / "benchmarks" / "results" / "packed_update.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    for shape, r in results.items():
        base = r["variants"]["padded fp32"]["median_s"]
        print(f"{shape}: prompts {r['prompt_tokens']} tokens, {r['completion_tokens']} completion tokens, "
              f"{r['useful_gflop']:.1f} useful GFLOP")
        for v, x in r["variants"].items():
            print(f"  {v:<12} {x['median_s']:7.3f} s  {base / x['median_s']:5.2f}x  {x['gflop_per_s']:6.1f} GFLOP/s  "
                  f"logprob err max {x['max_abs_logprob_err_vs_padded_fp32']:.1e} mean "
                  f"{x['mean_abs_logprob_err_vs_padded_fp32']:.1e}")
    print(f"load {out['loadavg_before'][0]:.2f} -> {out['loadavg_after'][0]:.2f}; wrote {path}")


if __name__ == "__main__":
    main()
