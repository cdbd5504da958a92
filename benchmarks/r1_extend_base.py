"""Train a finished r1-tiny base further on the corpus of the stage-0 attempt it came from, then rerun stage 0's
readiness check (r1kit.recipes.zero.readiness_check): does more pretraining repair a base the reasoned gate
refuses (e.g. one that miscopies the question), as `gate_action: extend` would try?

    python benchmarks/r1_extend_base.py runs/r1/r1-tiny-s1 --attempt 1 --steps 2500
"""
from __future__ import annotations

import argparse
import random
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from r1kit.config import RunConfig, load_config  # noqa: E402
from r1kit.corpus import build_corpus  # noqa: E402
from r1kit.policy import Policy  # noqa: E402
from r1kit.recipes.r1 import reasoning_task  # noqa: E402
from r1kit.recipes.zero import ATTEMPT_STRIDE, readiness_check  # noqa: E402
from r1kit.trainers.pretrain import pretrain  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path, help="a finished pipeline run (its base/ and config.yaml)")
    ap.add_argument("--attempt", type=int, required=True, help="the stage-0 attempt the kept base came from")
    ap.add_argument("--steps", type=int, default=2500, help="steps of one more cosine cycle")
    ap.add_argument("--threads", type=int, default=1)
    ns = ap.parse_args()
    torch.set_num_threads(ns.threads)
    cfg = load_config(RunConfig, ns.run / "config.yaml")
    task, pl, p = reasoning_task(cfg), cfg.pipeline, cfg.pretrain
    policy = Policy.from_config(cfg, ns.run / "base" / "model", lora=False)
    docs = build_corpus(task, p.corpus_docs, p.direct_frac, p.reflect_frac, cfg.task.template,
                        random.Random(cfg.seed + ATTEMPT_STRIDE * ns.attempt), zh_frac=pl.corpus_zh_frac,
                        mix_frac=pl.corpus_mix_frac)
    check = readiness_check(cfg, policy.tokenizer, task)
    print("before:", check(policy), flush=True)
    t0 = time.time()
    log = pretrain(policy, docs, replace(p, steps=ns.steps, gate_pass1=0.0, max_steps=ns.steps),
                   cfg.seed + ATTEMPT_STRIDE * 9, show_progress=False)
    loss = [r["loss"] for r in log if "loss" in r][-1]
    print(f"after {ns.steps} more steps ({time.time() - t0:.0f} s, final loss {loss:.3f}):", check(policy), flush=True)


if __name__ == "__main__":
    main()
