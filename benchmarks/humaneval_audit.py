"""Audit the code verifier on real data: HumanEval's 164 canonical solutions must pass, mutants must fail.

    python benchmarks/humaneval_audit.py [--workers 2] [--out benchmarks/results/humaneval_audit.json]

Mutants of each canonical solution (each must FAIL):
- "pass":        the body replaced by `pass` (the function returns None);
- "return_changed": every `return X` becomes `return _mutate(X)`: a different value of the same kind
  (number + 1, string + "x", a list/tuple with an element added, a bool flipped, None -> 0);
- "wrong_type":  the returned value wrapped in a one-element list.
Records pass counts, the failing ids, and the wall time of the whole audit (all programs in the sandbox pool).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from r1kit.rewards.code import run_code_tests
from r1kit.sandbox import get_pool
from r1kit.tasks.humaneval import load_records, to_problem

MUTATE = '''
def _mutate(x):
    if isinstance(x, bool):
        return not x
    if isinstance(x, (int, float)):
        return x + 1
    if isinstance(x, str):
        return x + "x"
    if isinstance(x, list):
        return x + [0]
    if isinstance(x, tuple):
        return x + (0,)
    if x is None:
        return 0
    return [x]
'''


def mutants(rec: dict) -> dict[str, str]:
    body = rec["canonical_solution"]
    indent = re.match(r"\s*", body).group(0) or "    "
    changed = re.sub(r"\breturn\b(?!\s*$)([^\n]*)", r"return _mutate(\1)", body)
    wrapped = re.sub(r"\breturn\b(?!\s*$)([^\n]*)", r"return [\1]", body)
    return {
        "pass": rec["prompt"] + f"{indent.lstrip(chr(10))}pass\n",
        "return_changed": MUTATE + rec["prompt"] + changed,
        "wrong_type": rec["prompt"] + wrapped,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", type=int, default=None, help="concurrent sandboxes (default: CPU count)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/humaneval_audit.json"))
    args = ap.parse_args()
    records = load_records()
    jobs = []
    for rec in records:
        problem = to_problem(rec)
        jobs.append((rec["task_id"], "canonical", rec["prompt"] + rec["canonical_solution"], problem))
        jobs += [(rec["task_id"], kind, code, problem) for kind, code in mutants(rec).items()]
    get_pool()
    start = time.perf_counter()
    with ThreadPoolExecutor(args.workers or get_pool().workers) as ex:
        verdicts = list(ex.map(lambda j: run_code_tests(j[2], j[3].tests), jobs))
    seconds = time.perf_counter() - start
    report: dict = {"problems": len(records), "programs": len(jobs), "seconds": round(seconds, 2), "kinds": {}}
    for kind in ("canonical", "pass", "return_changed", "wrong_type"):
        rows = [(j[0], v) for j, v in zip(jobs, verdicts) if j[1] == kind]
        passed = [tid for tid, v in rows if v.ok]
        statuses: dict[str, int] = {}
        for _, v in rows:
            statuses[v.status] = statuses.get(v.status, 0) + 1
        report["kinds"][kind] = {"programs": len(rows), "passed": len(passed), "statuses": statuses,
                                 "passed_ids": passed if kind != "canonical" else [],
                                 "failed": [(tid, v.status, v.detail[:200]) for tid, v in rows if not v.ok][:20]
                                 if kind == "canonical" else []}
    canon = report["kinds"]["canonical"]
    mutant_rows = [report["kinds"][k] for k in ("pass", "return_changed", "wrong_type")]
    caught = sum(r["programs"] - r["passed"] for r in mutant_rows) / sum(r["programs"] for r in mutant_rows)
    report["canonical_pass"] = f"{canon['passed']}/{canon['programs']}"
    report["mutants_failing"] = round(caught, 4)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"canonical solutions pass {canon['passed']}/{canon['programs']}; mutants fail {100 * caught:.1f}% "
          + ", ".join(f"{k}: {report['kinds'][k]['programs'] - report['kinds'][k]['passed']}/{report['kinds'][k]['programs']}"
                      for k in ("pass", "return_changed", "wrong_type"))
          + f"; {len(jobs)} sandboxed programs in {seconds:.1f} s")
    return 0 if canon["passed"] == canon["programs"] and caught >= 0.99 else 1


if __name__ == "__main__":
    sys.exit(main())
