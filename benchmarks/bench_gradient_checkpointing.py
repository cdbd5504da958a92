"""Peak memory and step time of a training step with and without gradient checkpointing (model.gradient_checkpointing).

A ~100M-parameter Llama-type model (hidden 768, 14 layers, 12 heads, MLP 2048, the tiny tokenizer's vocabulary),
built from a config, float32 on this CPU; one step = the GRPO training forward (r1kit.model.token_logprobs through
the Policy) on `--batch` rows of `--seq` tokens whose second half is the completion, a backward and an AdamW step.
Each setting runs in a fresh process, so the peak resident set (ru_maxrss) is that setting's own; the two run one
after the other in the same invocation (side by side), on a machine other people may be using (say so when quoting).

    python benchmarks/bench_gradient_checkpointing.py [--steps 3] [--batch 4] [--seq 512] [--threads 2]
Writes benchmarks/results/gradient_checkpointing.json and prints a table.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def one_setting(gc: bool, steps: int, batch: int, seq: int, threads: int) -> dict:
    """Runs in its own process: build, then `steps` timed training steps after one warm-up step."""
    import torch

    from r1kit.config import ModelConfig
    from r1kit.model import build_tiny_model, token_logprobs
    from r1kit.policy import Policy
    from tests.helpers import tiny_pair

    torch.set_num_threads(threads)
    _, tok = tiny_pair()
    torch.manual_seed(0)
    cfg = ModelConfig(hidden_size=768, num_layers=14, num_heads=12, num_kv_heads=12, intermediate_size=2048,
                      max_position_embeddings=seq)
    policy = Policy(build_tiny_model(cfg, tok), tok, device="cpu", gradient_checkpointing=gc)
    opt = policy.make_optimizer(1e-5)
    ids = torch.randint(5, len(tok), (batch, seq))
    mask = torch.ones_like(ids)
    base_rss = _rss_mb()
    times = []
    policy.module.train()
    for i in range(steps + 1):
        t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        logprobs, _ = token_logprobs(policy.model, ids, mask, seq // 2)
        (-logprobs.mean()).backward()
        opt.step()
        if i > 0:  # the first step allocates the optimizer state
            times.append(time.perf_counter() - t)
    return {"gradient_checkpointing": gc, "params": policy.parameter_counts()["total"],
            "step_s_median": statistics.median(times), "step_s_all": times,
            "peak_rss_mb": policy.peak_memory_mb(), "rss_before_steps_mb": base_rss}


def summarize(rows: list[dict]) -> dict:
    """Ratios of the two settings. RSS growth during the steps holds the gradients and AdamW's two moments
    (3 x the fp32 parameters, the same in both settings) plus the activations: the rest is the activations."""
    off, on = rows
    state_mib = 3 * 4 * off["params"] / 2**20
    act = {r["gradient_checkpointing"] and "on" or "off": r["peak_rss_mb"] - r["rss_before_steps_mb"] - state_mib
           for r in rows}
    return {"settings": rows, "grads_and_adam_state_mib": state_mib, "activation_mib": act,
            "activation_ratio_off_over_on": act["off"] / max(1e-9, act["on"]),
            "peak_rss_ratio_off_over_on": off["peak_rss_mb"] / on["peak_rss_mb"],
            "step_time_ratio_on_over_off": on["step_s_median"] / off["step_s_median"]}


def _rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--child", choices=["on", "off"], help=argparse.SUPPRESS)
    ns = ap.parse_args()
    if ns.child:
        print(json.dumps(one_setting(ns.child == "on", ns.steps, ns.batch, ns.seq, ns.threads)))
        return
    rows = []
    for mode in ("off", "on"):
        cmd = [sys.executable, __file__, "--child", mode, "--steps", str(ns.steps), "--batch", str(ns.batch),
               "--seq", str(ns.seq), "--threads", str(ns.threads)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    result = {"command": " ".join(["python benchmarks/bench_gradient_checkpointing.py"] + sys.argv[1:]),
              "batch": ns.batch, "seq": ns.seq, "threads": ns.threads, **summarize(rows)}
    out_path = ROOT / "benchmarks" / "results" / "gradient_checkpointing.json"
    out_path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{rows[0]['params'] / 1e6:.1f}M parameters, batch {ns.batch} x {ns.seq} tokens, {ns.threads} threads")
    print("| gradient checkpointing | step (s, median) | peak RSS (MiB) | RSS growth during steps (MiB) |")
    print("|---|---:|---:|---:|")
    for r in rows:
        print(f"| {'on' if r['gradient_checkpointing'] else 'off'} | {r['step_s_median']:.2f} | {r['peak_rss_mb']:.0f} | "
              f"{r['peak_rss_mb'] - r['rss_before_steps_mb']:.0f} |")
    print(f"step time x{result['step_time_ratio_on_over_off']:.2f} with checkpointing; activation memory "
          f"(RSS growth minus gradients and Adam state) {result['activation_mib']['off']:.0f} -> "
          f"{result['activation_mib']['on']:.0f} MiB ({result['activation_ratio_off_over_on']:.2f}x lower) -> {out_path}")


if __name__ == "__main__":
    main()
