"""Stage 0's readiness check (r1kit.recipes.zero.readiness_check) on finished r1-tiny bases: sampled pass@1
at GRPO's settings and, with the reasoned gate, pass@1 of the samples that reason at the evaluation's settings.
Used to calibrate `pretrain.gate_reasoned_pass1` against bases whose fate is known.

    python benchmarks/r1_gate_check.py runs/r1/r1-tiny-s0 runs/r1/r1-tiny-s1 [key=value ...]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from r1kit.config import RunConfig, load_config  # noqa: E402
from r1kit.policy import Policy  # noqa: E402
from r1kit.recipes.r1 import reasoning_task  # noqa: E402
from r1kit.recipes.zero import readiness_check  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path, help="finished pipeline runs (their base/ and config.yaml)")
    ap.add_argument("--overrides", nargs="*", default=[], help="key=value settings over each run's config")
    ns = ap.parse_args()
    for run in ns.runs:
        cfg = load_config(RunConfig, run / "config.yaml", ns.overrides)
        policy = Policy.from_config(cfg, run / "base" / "model", lora=False)
        t0 = time.time()
        result = readiness_check(cfg, policy.tokenizer, reasoning_task(cfg))(policy)
        print(f"{run.name:<16} {result} ({time.time() - t0:.1f} s)", flush=True)


if __name__ == "__main__":
    main()
