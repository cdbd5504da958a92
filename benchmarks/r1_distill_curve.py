"""Student accuracy against the number of distillation traces (issue 15: what the student needs to beat
RL-only by 20 points): SFT of one pretrained student on the first N traces, for each N, then held-out pass@1.

    python benchmarks/r1_distill_curve.py --run runs/r1/r1-tiny-s0 --counts 250 500 1000 2000 [--epochs 6]
    python benchmarks/r1_distill_curve.py --proxy --counts 250 500 1000 2000      # no teacher needed

--run takes the student (student_base/model) and the teacher's traces (distill/data.jsonl) of a pipeline run.
--proxy stands in for a teacher: the reference solver's cold-start traces (the format every R1 stage
after the cold start writes, correct by construction), and a student pretrained here with r1-tiny's
student settings (its tokenizer its own); label the results as a proxy. Each N trains from the same student,
on the first N reasoning traces (general examples dropped), with r1-tiny's distill-stage SFT settings.
Writes benchmarks/results/r1_distill_curve[_proxy].{json,md} (one row per N x epochs x student).
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from r1kit.config import RunConfig, load_config  # noqa: E402
from r1kit.io import atomic_write_json  # noqa: E402


def r1_config(overrides: list[str]) -> RunConfig:
    from r1kit.recipes.r1 import stage_config

    cfg = load_config(RunConfig, ROOT / "r1kit" / "configs" / "r1-tiny.yaml", ["log.progress=false", *overrides])
    return stage_config(cfg, "distill")


def proxy_inputs(cfg: RunConfig, out: Path, n: int, student_steps: int) -> tuple[Path, Path]:
    """A student pretrained as the pipeline's student_base would be (no gate), and n cold-start traces."""
    from r1kit.recipes.r1 import reasoning_task, write_jsonl
    from r1kit.recipes.sampling import cold_start_records
    from r1kit.recipes.zero import pretrain_base

    traces, student = out / "proxy_traces.jsonl", out / "proxy_student"
    if not traces.exists():
        write_jsonl(traces, cold_start_records(reasoning_task(cfg), n, random.Random(cfg.seed + 11), lang=cfg.pipeline.lang,
                                               template=cfg.task.template))
    if not (student / "pretrain.json").exists():
        pl = cfg.pipeline
        pcfg = replace(cfg, pretrain=replace(cfg.pretrain, gate_pass1=0.0))
        pretrain_base(pcfg, student, reasoning_task(cfg), model_cfg=cfg.distill.student, steps=student_steps,
                      init_seed=cfg.seed * 1000 + 9, zh_frac=pl.corpus_zh_frac, mix_frac=pl.corpus_mix_frac, show_progress=False)
    return student, traces


def point(cfg: RunConfig, student: Path, traces: list[dict], n: int, epochs: int, out: Path, problems: int) -> dict:
    """SFT of `student` on traces[:n] for `epochs`, then held-out pass@1 (resumable: a finished point is read back)."""
    from r1kit.evaluation import evaluate_problems
    from r1kit.policy import Policy
    from r1kit.recipes.r1 import reasoning_task, write_jsonl
    from r1kit.trainers.sft import load_sft_data, train_sft

    d = out / f"n{n}_e{epochs}"
    if (d / "point.json").exists():
        return json.loads((d / "point.json").read_text())
    d.mkdir(parents=True, exist_ok=True)
    write_jsonl(d / "data.jsonl", traces[:n])
    policy = Policy.from_config(cfg, student)
    examples, _ = load_sft_data(d / "data.jsonl", policy.tokenizer, cfg.sft.seq_len)
    t0 = time.time()
    summary = train_sft(policy, examples, replace(cfg.sft, epochs=epochs), d, seed=cfg.seed, resume=True)
    seconds = time.time() - t0
    policy = Policy.from_config(cfg, d / "model", lora=False)
    e = cfg.eval
    s = evaluate_problems(policy.make_engine(backend=cfg.engine.backend), policy.tokenizer,
                          reasoning_task(cfg).test_problems()[:problems], k=e.k, temperature=e.temperature, top_p=e.top_p,
                          max_new_tokens=e.max_new_tokens, template=cfg.task.template, seed=cfg.seed + 7919)
    rec = {"traces": n, "epochs": epochs, "steps": summary["steps"], "sft_seconds": round(seconds, 1),
           "last_loss": summary["last_loss"], "pass1": s.pass1, "format_rate": s.to_dict()["format_rate"],
           "problems": problems}
    atomic_write_json(d / "point.json", rec)
    print(json.dumps(rec), flush=True)
    return rec


def main() -> None:
    ap = argparse.ArgumentParser()
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", help="a pipeline run folder (student_base/model, distill/data.jsonl)")
    src.add_argument("--proxy", action="store_true", help="cold-start traces and a student pretrained here")
    ap.add_argument("--counts", type=int, nargs="+", default=[250, 500, 1000, 2000])
    ap.add_argument("--epochs", type=int, nargs="+", default=[6])
    ap.add_argument("--problems", type=int, default=200, help="held-out problems evaluated per point")
    ap.add_argument("--student-steps", type=int, default=1000, help="--proxy: the student's pretraining steps")
    ap.add_argument("--out", default="runs/r1/distill_curve")
    ap.add_argument("overrides", nargs="*", help="r1-tiny key=value overrides (e.g. distill.student.hidden_size=128)")
    ns = ap.parse_args()
    cfg = r1_config(ns.overrides)
    tag = "proxy" if ns.proxy else Path(ns.run).name
    out = (ROOT / ns.out / tag).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if ns.proxy:
        student, trace_file = proxy_inputs(cfg, out, max(ns.counts), ns.student_steps)
    else:
        student, trace_file = Path(ns.run) / "student_base" / "model", Path(ns.run) / "distill" / "data.jsonl"
    lines = trace_file.read_text(encoding="utf-8").splitlines()
    traces = [r for r in map(json.loads, lines) if r.get("kind", "reasoning") != "general"]
    counts = [n for n in ns.counts if n <= len(traces)]
    if len(counts) < len(ns.counts):
        print(f"only {len(traces)} traces: counts above that skipped", flush=True)
    rows = [point(cfg, student, traces, n, ep, out, ns.problems) for ep in ns.epochs for n in counts]
    name = "r1_distill_curve" + ("_proxy" if ns.proxy else f"_{tag}")
    res = ROOT / "benchmarks" / "results"
    (res / f"{name}.json").write_text(json.dumps({"source": "proxy" if ns.proxy else ns.run, "student": str(student),
                                                  "overrides": ns.overrides, "rows": rows}, indent=2) + "\n")
    md = [f"# Student pass@1 against distillation traces ({'PROXY: cold-start traces' if ns.proxy else ns.run})", "",
          f"Student {cfg.distill.student.hidden_size}x{cfg.distill.student.num_layers} "
          f"({' '.join(ns.overrides) or 'r1-tiny settings'}); held-out pass@1 on {ns.problems} problems, k={cfg.eval.k}, "
          f"T={cfg.eval.temperature}. Command: `python benchmarks/r1_distill_curve.py {' '.join(sys.argv[1:])}`.", "",
          "| traces | epochs | SFT steps | SFT seconds | last loss | pass@1 | format |", "|---:|---:|---:|---:|---:|---:|---:|"]
    md += [f"| {r['traces']} | {r['epochs']} | {r['steps']} | {r['sft_seconds']:.0f} | {r['last_loss']:.3f} | {r['pass1']:.3f} | "
           f"{r['format_rate']:.3f} |" for r in rows]
    (res / f"{name}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
