"""Stage 0 of the R1-Zero default, step by step, on 1 process or under torchrun: where do the runs part?

    python benchmarks/trace_stage0_dist.py run OUT_1 --steps 300 --threads 1
    OMP_NUM_THREADS=1 torchrun --standalone --nproc-per-node 2 benchmarks/trace_stage0_dist.py run OUT_2 --steps 300
    python benchmarks/trace_stage0_dist.py compare OUT_1 OUT_2
    python benchmarks/trace_stage0_dist.py run OUT_H --halves 2   # 2 ranks' arithmetic in one process

`run` builds attempt 0 of stage 0 exactly as `r1kit zero` does (corpus, tokenizer, seeded initialisation, the
2,500-step cosine schedule of the config; config overrides as extra key=value arguments), trains its first
`--steps` steps and writes OUT/trace.json (per step: the global batch's token-mean loss, token count, the
clipped gradient's norm) and OUT/params.pt (rank 0's final parameters). Under torchrun it also records whether
every rank holds bitwise the same parameters at the end (DDP never re-syncs them). `compare` prints where two
traces part: the first step whose loss differs by more than a relative 1e-5, the largest relative loss and
grad-norm differences per 50 steps, and the largest parameter difference at the end.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from r1kit import dist  # noqa: E402


class _Stop(Exception):
    pass


def run(out: Path, steps: int, threads: int, overrides: list[str], halves: int = 1) -> int:
    import r1kit.trainers.pretrain as P
    from r1kit.cli import config_path
    from r1kit.config import RunConfig, load_config
    from r1kit.corpus import build_corpus
    from r1kit.model import build_tiny_model, train_tokenizer
    from r1kit.policy import Policy
    from r1kit.tasks import make_task

    cfg = load_config(RunConfig, config_path(None), overrides)
    torch.set_num_threads(threads)
    task = make_task(cfg.task.name, **cfg.task.options)
    p = cfg.pretrain
    docs = build_corpus(task, p.corpus_docs, p.direct_frac, p.reflect_frac, cfg.task.template, random.Random(cfg.seed))
    tok = train_tokenizer((d.prompt + d.completion for d in docs[:5000]), cfg.model.vocab_size)
    torch.manual_seed(cfg.seed)  # as pretrain_base's attempt 0
    policy = Policy(build_tiny_model(cfg.model, tok), tok, device="cpu")
    rec: list[dict] = []
    batch_loss, clip = P.batch_loss, policy.clip_grad_norm

    def traced_loss(model, batch, pad, per=None):
        n = sum(len(d) - 1 for d in batch)
        if halves > 1:  # one process doing what N ranks do: each share padded alone, over the global count
            parts = [batch_loss(model, batch[dist.even_share(len(batch), world_size=halves, rank_=i)], pad, n)
                     for i in range(halves)]
            objective = sum(o for o, _ in parts)
            loss = objective.detach()
        else:
            objective, loss = batch_loss(model, batch, pad, per)
        total, count = dist.all_reduce_sum(loss.detach().double() * n), dist.all_reduce_sum(float(n))
        rec.append({"loss": float(total / count), "tokens": float(count)})
        return objective, loss

    def traced_clip(max_norm):
        norm = clip(max_norm)
        rec[-1]["grad_norm"] = float(norm)
        if len(rec) == steps:
            raise _Stop  # before the last update: both sides stop alike
        return norm

    P.batch_loss, policy.clip_grad_norm = traced_loss, traced_clip
    t0 = time.time()
    try:
        P.pretrain(policy, docs, replace(p, gate_pass1=0.0), cfg.seed, show_progress=False)
    except _Stop:
        pass
    state = policy.module.state_dict()
    sums = dist.gather_objects([float(v.double().abs().sum()) for v in state.values()])
    if dist.is_main():
        out.mkdir(parents=True, exist_ok=True)
        torch.save(state, out / "params.pt")
        (out / "trace.json").write_text(json.dumps({
            "steps": rec, "seconds": time.time() - t0, "world": dist.world(), "threads": threads,
            "ranks_identical": all(s == sums[0] for s in sums), "overrides": overrides, "halves": halves}))
    return 0


def compare(a: Path, b: Path) -> int:
    ta, tb = (json.loads((x / "trace.json").read_text()) for x in (a, b))
    sa, sb = ta["steps"], tb["steps"]
    n = min(len(sa), len(sb))

    def rel(x, y):
        return abs(x - y) / max(abs(x), 1e-12)

    first = next((i for i in range(n) if rel(sa[i]["loss"], sb[i]["loss"]) > 1e-5), None)
    print(f"{a}: world {ta['world']} x {ta['threads']} thread(s); {b}: world {tb['world']} x {tb['threads']} thread(s); "
          f"{n} steps; ranks identical: {ta['ranks_identical']}, {tb['ranks_identical']}")
    print(f"token counts equal at every step: {all(sa[i]['tokens'] == sb[i]['tokens'] for i in range(n))}")
    print(f"first step with relative loss difference > 1e-5: {first}")
    print("steps | max rel. loss diff | max rel. grad-norm diff | loss (first) at the window's end")
    for lo in range(0, n, 50):
        hi = min(n, lo + 50)
        dl = max(rel(sa[i]["loss"], sb[i]["loss"]) for i in range(lo, hi))
        dg = max(rel(sa[i]["grad_norm"], sb[i]["grad_norm"]) for i in range(lo, hi))
        print(f"{lo:>4}-{hi - 1:<4} | {dl:.2e} | {dg:.2e} | {sa[hi - 1]['loss']:.4f}")
    pa, pb = (torch.load(x / "params.pt") for x in (a, b))
    print(f"largest parameter difference at the end: {max(float((pa[k] - pb[k]).abs().max()) for k in pa):.3e}")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("out", type=Path)
    r.add_argument("--steps", type=int, default=300)
    r.add_argument("--threads", type=int, default=1)
    r.add_argument("--halves", type=int, default=1, help="in one process, take each batch's gradient as N shares "
                   "padded alone and summed, as N ranks do (isolates the arithmetic from DDP)")
    c = sub.add_parser("compare")
    c.add_argument("a", type=Path)
    c.add_argument("b", type=Path)
    ns, overrides = ap.parse_known_args()  # config overrides: key=value
    if ns.cmd == "run" and any("=" not in o for o in overrides):
        ap.error(f"unrecognized arguments: {[o for o in overrides if '=' not in o]}")
    if ns.cmd == "compare":
        return compare(ns.a, ns.b)
    dist.init_from_env()
    return dist.run_main(lambda: run(ns.out, ns.steps, ns.threads, overrides, ns.halves))


if __name__ == "__main__":
    sys.exit(main())
