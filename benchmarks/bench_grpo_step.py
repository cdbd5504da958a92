"""Seconds per GRPO step, split by phase (generate, score, logprobs, update).

Setting mirrors the TRL figure in ../shared/NOTES.md: a ~3.4M-parameter Llama-type model, 4 prompts x 8
generations, <= 64 new tokens, beta = 0, float32, on this CPU. Also runs beta > 0 (reference model).

    python benchmarks/bench_grpo_step.py [--steps 8] [--threads 2] [--packed]
Writes benchmarks/results/grpo_step.json and prints a table.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from r1kit.config import ModelConfig, RunConfig, load_config  # noqa: E402
from r1kit.model import build_tiny_model  # noqa: E402
from r1kit.policy import Policy  # noqa: E402
from r1kit.tasks import make_task  # noqa: E402
from r1kit.trainers.grpo import GRPOTrainer  # noqa: E402
from tests.helpers import tiny_pair  # noqa: E402

PHASES = ("generate", "score", "logprobs", "update")


def run(beta: float, steps: int, tmp: Path, packed: bool = False) -> dict:
    _, tok = tiny_pair()
    torch.manual_seed(0)
    mcfg = ModelConfig(hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=4, intermediate_size=768)
    model = build_tiny_model(mcfg, tok)
    ref = build_tiny_model(mcfg, tok).eval() if beta > 0 else None
    cfg = load_config(RunConfig, None, [
        "grpo.prompts_per_step=4", "grpo.group_size=8", "grpo.max_new_tokens=64", f"grpo.beta={beta}",
        f"grpo.steps={steps + 2}", "log.progress=false", "log.tensorboard=false", "log.save_every=0",
        "log.sample_every=0", "eval.every=0", f"output_dir={tmp}", f"name=b{beta}",
        f"grpo.packed_update={str(packed).lower()}"])
    policy = Policy(model, tok, device="cpu")
    recs = GRPOTrainer(cfg, policy, make_task("arithmetic"), cfg.run_dir, ref_model=ref).train()[2:]  # warm-up
    out = {p: statistics.median(r[f"time/{p}"] for r in recs) for p in PHASES}
    out["step"] = statistics.median(r["time/step"] for r in recs)
    out["completion_tokens_per_s"] = statistics.median(r["tokens_per_s"] for r in recs)
    out["params"] = sum(p.numel() for p in model.parameters())
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--packed", action="store_true", help="grpo.packed_update=true (writes grpo_step_packed.json)")
    ns = ap.parse_args()
    torch.set_num_threads(ns.threads)
    with tempfile.TemporaryDirectory() as d:
        results = {f"beta={b}": run(b, ns.steps, Path(d), ns.packed) for b in (0.0, 0.04)}
    print(f"{'setting':<10} {'step s':>7} " + " ".join(f"{p:>9}" for p in PHASES) + "  tok/s  params")
    for name, r in results.items():
        print(f"{name:<10} {r['step']:7.3f} " + " ".join(f"{r[p]:9.3f}" for p in PHASES)
              + f"  {r['completion_tokens_per_s']:5.0f}  {r['params']:,}")
    out = ROOT / "benchmarks" / "results" / ("grpo_step_packed.json" if ns.packed else "grpo_step.json")
    out.write_text(json.dumps({"threads": ns.threads, "steps": ns.steps, "results": results}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
