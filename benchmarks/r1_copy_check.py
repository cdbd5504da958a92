"""How often a model's worked solutions restate the question wrongly (arithmetic task), from the held-out
samples a finished r1-tiny stage stored: the chain starts `<think> a+b: ...`; a restated `a+b` that is not
the question is a copying error, and every later digit of that sample inherits it.

    python benchmarks/r1_copy_check.py runs/r1/r1-tiny-s0 runs/r1/r1-tiny-s1 [--stages base cold_sft]

Prints, per run and stage, the samples that restate the question and the share of those that miscopy it.
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from r1kit.config import RunConfig, load_config
from r1kit.tasks import make_task

RESTATED = re.compile(r"<think>\s*(\d+)\s*([+\-*])\s*(\d+)")


def miscopy_rate(run: Path, stage: str) -> tuple[int, int]:
    """(samples that restate the question, of which miscopied) in run/stage/eval/samples.jsonl."""
    cfg = load_config(RunConfig, run / "config.yaml")
    test = {p.id: p for p in make_task(cfg.task.name, **cfg.task.options).test_problems()}
    restated = wrong = 0
    for line in (run / stage / "eval" / "samples.jsonl").read_text().splitlines():
        row = json.loads(line)
        m = RESTATED.search(row["completion"])
        if m is None or row["problem_id"] not in test:
            continue
        restated += 1
        wrong += "".join(m.groups()) != test[row["problem_id"]].question.replace(" ", "").split("=")[0]
    return restated, wrong


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--stages", nargs="+", default=["base", "cold_sft"])
    ns = ap.parse_args()
    for run in ns.runs:
        for stage in ns.stages:
            n, bad = miscopy_rate(run, stage)
            print(f"{run.name:<16} {stage:<10} restated {n:4d}  miscopied {bad:4d} ({bad / max(1, n):.1%})")


if __name__ == "__main__":
    main()
