"""GRPO step time by phase on a GPU for a ~0.5B-parameter model (bf16 autocast, fp32 master weights).

The model is a Qwen2-type config of ~0.47B parameters (hidden 1024, 24 layers, 16 heads, 2 KV heads, MLP 5632)
built from the config with random weights and the tiny local tokenizer (no downloads; random weights sample long,
so every completion runs to --max-new-tokens, which makes the step cost predictable). One step = 8 prompts x 8
samples, generate (r1kit's engine, fast Llama-family path), score, logprobs, update; the first --warmup steps are
not counted. Needs CUDA: without it the script says so and exits 2 (it records nothing).

    python benchmarks/bench_gpu.py [--steps 6] [--warmup 2] [--max-new-tokens 256] [--mixed-precision bf16]
Writes benchmarks/results/gpu_grpo_step.json and prints a table of median seconds per phase.
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

PHASES = ("generate", "score", "logprobs", "update", "sync")
MODEL = ModelConfig(arch="qwen2", hidden_size=1024, num_layers=24, num_heads=16, num_kv_heads=2,
                    intermediate_size=5632, max_position_embeddings=2048)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--micro-batch-size", type=int, default=16)
    ap.add_argument("--mixed-precision", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--beta", type=float, default=0.0, help="> 0 adds the reference forward (a frozen copy)")
    ns = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_gpu: no CUDA device here; this benchmark only runs on a GPU", file=sys.stderr)
        return 2
    _, tok = tiny_pair()
    torch.manual_seed(0)
    policy = Policy(build_tiny_model(MODEL, tok), tok, device="cuda", mixed_precision=ns.mixed_precision,
                    gradient_checkpointing=ns.gradient_checkpointing)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(RunConfig, None, [
            f"grpo.prompts_per_step={ns.prompts}", f"grpo.group_size={ns.group_size}",
            f"grpo.max_new_tokens={ns.max_new_tokens}", f"grpo.micro_batch_size={ns.micro_batch_size}",
            f"grpo.beta={ns.beta}", f"grpo.steps={ns.steps + ns.warmup}", "log.progress=false",
            "log.tensorboard=false", "log.save_every=0", "log.sample_every=0", "eval.every=0",
            f"output_dir={tmp}", "name=gpu"])
        trainer = GRPOTrainer(cfg, policy, make_task("arithmetic"), cfg.run_dir)
        torch.cuda.reset_peak_memory_stats()
        records = trainer.train()[ns.warmup:]
    out = {p: statistics.median(r.get(f"time/{p}", 0.0) for r in records) for p in PHASES}
    out["step"] = statistics.median(r["time/step"] for r in records)
    result = {"command": " ".join(["python benchmarks/bench_gpu.py"] + sys.argv[1:]),
              "device": torch.cuda.get_device_name(), "params": policy.parameter_counts()["total"],
              "mixed_precision": ns.mixed_precision, "gradient_checkpointing": ns.gradient_checkpointing,
              "rows_per_step": ns.prompts * ns.group_size, "max_new_tokens": ns.max_new_tokens,
              "engine_path": trainer.engine.fallback_reason or "fast", "median_seconds": out,
              "completion_tokens_per_s": statistics.median(r["tokens_per_s"] for r in records),
              "peak_memory_mb": policy.peak_memory_mb(), "steps_timed": len(records)}
    path = ROOT / "benchmarks" / "results" / "gpu_grpo_step.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{result['device']}: {result['params'] / 1e9:.2f}B parameters, {ns.mixed_precision}, "
          f"{result['rows_per_step']} rows x <= {ns.max_new_tokens} new tokens, engine path: {result['engine_path']}")
    print("| phase | median s/step |\n|---|---:|")
    for k, v in out.items():
        print(f"| {k} | {v:.3f} |")
    print(f"peak memory {result['peak_memory_mb']:.0f} MiB, {result['completion_tokens_per_s']:.0f} completion tokens/s -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
