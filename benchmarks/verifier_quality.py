"""Verifier quality on the real benchmarks: does the grader accept the right answers and reject wrong ones?

A grader that rejects a right answer teaches the policy it is wrong (a false negative); one that accepts
a wrong answer rewards it (a false positive). Three checks, on the files under $R1KIT_DATA_DIR:

1. MATH-500: the last \\boxed{} of each reference `solution` must be judged equivalent to its `answer`
   field (graded exactly as a completion would be: `grade_many`, "math" style). Target >= 99% of 500.
   Because the text shortcut settles equal strings, the same pairs are also sent to math-verify alone
   (no shortcut), to show the slow path agrees too.
2. GSM8K test: the `#### N` of each original solution (`orig_answer`) must equal the `answer` field
   ("numeric" style). Target: all 1,319.
3. Shuffled pairs: the answer of problem j graded against problem i, for random pairs whose answers
   differ in text; fewer than 1% may be judged equivalent. Each judged-equivalent pair is listed.

Extra (no target): AIME 2024's last \\boxed{} of each solution against its answer.

Run: R1KIT_DATA_DIR=/path/to/shared/data python benchmarks/verifier_quality.py [--rounds 4]
     -> benchmarks/results/verifier_quality.json and .md
The check functions are imported by tests/test_verifier_quality.py.
"""
from __future__ import annotations

import argparse
import random
import time
from pathlib import Path
from typing import Any, Sequence

from r1kit.rewards.graders import clean_answer, extract_answer, grade_many, last_boxed
from r1kit.rewards.mathverify import verify_math_many
from r1kit.types import Problem

RESULTS = Path(__file__).resolve().parent / "results"

# Why a listed pair came out as it did, where a reader would otherwise have to work it out.
KNOWN = {
    ("120", "120^\\circ"): "the same number: math-verify drops the degree sign, a unit; not a different value",
    ("5", "x=5"): "the same value: math-verify reads the equation x=5 as its right-hand side; not a different value",
    ("\\textbf{(073)}", "73"): "the solution boxes an AMC-style answer choice, (073) in bold; the grader does not unwrap \\textbf",
}


def boxed_vs_answer(problems: Sequence[Problem]) -> dict[str, Any]:
    """Last \\boxed{} of each solution graded against the answer field; also via math-verify alone."""
    start = time.perf_counter()
    boxed = [last_boxed(p.solution) for p in problems]
    verdicts = grade_many(boxed, problems)
    seconds = time.perf_counter() - start
    found = [(b, p) for b, p in zip(boxed, problems) if b is not None]
    direct = verify_math_many([(clean_answer(b), clean_answer(p.answer)) for b, p in found])
    misses = [
        {"id": p.id, "boxed": b, "answer": p.answer, "reason": v.reason,
         "why": KNOWN.get((b, p.answer), "no \\boxed{} in the solution" if b is None else "")}
        for b, p, v in zip(boxed, problems, verdicts) if not v.correct
    ]
    return {
        "total": len(problems), "agree": sum(v.correct for v in verdicts),
        "agree_rate": sum(v.correct for v in verdicts) / len(problems),
        "text_equal": sum(b is not None and clean_answer(b) == clean_answer(p.answer) for b, p in zip(boxed, problems)),
        "math_verify_alone_agree": sum(r.correct for r in direct), "math_verify_alone_total": len(found),
        "seconds": round(seconds, 3), "misses": misses,
    }


def gsm8k_hash_vs_answer(problems: Sequence[Problem]) -> dict[str, Any]:
    """The "#### N" of each original solution (extracted as a completion would be) vs the answer field."""
    start = time.perf_counter()
    extracted = [extract_answer(p.solution) for p in problems]
    verdicts = grade_many(extracted, problems)
    misses = [{"id": p.id, "extracted": e, "answer": p.answer, "reason": v.reason}
              for e, p, v in zip(extracted, problems, verdicts) if not v.correct]
    return {
        "total": len(problems), "agree": sum(v.correct for v in verdicts),
        "agree_rate": sum(v.correct for v in verdicts) / len(problems),
        "text_equal": sum(e is not None and e.replace(",", "") == p.answer for e, p in zip(extracted, problems)),
        "seconds": round(time.perf_counter() - start, 3), "misses": misses,
    }


def shuffled_pairs(problems: Sequence[Problem], rounds: int = 1, seed: int = 0) -> dict[str, Any]:
    """Grade problem j's answer against problem i (j random, answer text different) `rounds` times per i."""
    rng = random.Random(seed)
    preds, golds = [], []
    for _ in range(rounds):
        for p in problems:
            while True:
                q = problems[rng.randrange(len(problems))]
                if clean_answer(q.answer) != clean_answer(p.answer):
                    break
            preds.append(q.answer)
            golds.append(p)
    start = time.perf_counter()
    verdicts = grade_many(preds, golds)
    seconds = time.perf_counter() - start
    accepted = [{"pred": a, "answer": p.answer, "problem": p.id, "why": KNOWN.get((a, p.answer), "")}
                for a, p, v in zip(preds, golds, verdicts) if v.correct]
    reasons: dict[str, int] = {}
    for v in verdicts:
        reasons[v.reason] = reasons.get(v.reason, 0) + 1
    return {"pairs": len(preds), "judged_equivalent": len(accepted), "rate": len(accepted) / len(preds),
            "reasons": dict(sorted(reasons.items())), "seconds": round(seconds, 3), "accepted": accepted}


# ----------------------------------------------------------------------------- report


def _md_table(rows: list[dict[str, Any]], keys: Sequence[str]) -> list[str]:
    if not rows:
        return ["none"]
    esc = lambda x: str(x).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    return ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)] + [
        "| " + " | ".join(f"`{esc(r[k])}`" if k in ("boxed", "answer", "pred", "extracted") else esc(r[k]) for k in keys) + " |"
        for r in rows
    ]


def markdown(results: dict[str, Any]) -> str:
    m, g, a = results["math500_boxed"], results["gsm8k_hash"], results["aime24_boxed"]
    lines = [
        "# Verifier quality", "",
        "Produced by `python benchmarks/verifier_quality.py` (r1kit.rewards.graders; math-verify in the time-limited pool).", "",
        "| check | result | target |", "|---|---|---|",
        f"| MATH-500: last `\\boxed{{}}` of the solution vs `answer` | {m['agree']}/{m['total']} ({100 * m['agree_rate']:.1f}%) | >= 99% |",
        f"| MATH-500: the same pairs through math-verify alone (no text shortcut) | {m['math_verify_alone_agree']}/{m['math_verify_alone_total']} | - |",
        f"| GSM8K test: `#### N` of `orig_answer` vs `answer` | {g['agree']}/{g['total']} | all |",
    ]
    for name, s in results["shuffled"].items():
        lines.append(f"| {name}: shuffled pairs judged equivalent | {s['judged_equivalent']}/{s['pairs']} ({100 * s['rate']:.2f}%) | < 1% |")
    lines += [
        f"| AIME 2024 (extra): last `\\boxed{{}}` of the solution vs `answer` | {a['agree']}/{a['total']} | - |", "",
        f"MATH-500: {m['text_equal']} of {m['total']} boxed answers equal the `answer` field as text after cleaning; "
        f"grading all 500 took {m['seconds']} s. GSM8K: {g['text_equal']} of {g['total']} equal as text (commas dropped).", "",
        "## MATH-500 misses", "", *_md_table(m["misses"], ["id", "boxed", "answer", "reason", "why"]), "",
        "## GSM8K misses", "", *_md_table(g["misses"], ["id", "extracted", "answer", "reason"]), "",
    ]
    for name, s in results["shuffled"].items():
        lines += [f"## {name}: shuffled pairs judged equivalent", "",
                  f"{s['pairs']} pairs, graded in {s['seconds']} s; verdicts: {s['reasons']}.", "",
                  *_md_table(s["accepted"], ["problem", "pred", "answer", "why"]), ""]
    lines += ["## AIME 2024 misses (extra)", "", *_md_table(a["misses"], ["id", "boxed", "answer", "reason", "why"]), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from r1kit.io import atomic_write_json, atomic_write_text
    from r1kit.tasks import make_task

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=4, help="shuffled pairs per problem")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    math500, gsm8k = make_task("math500").test_problems(), make_task("gsm8k").test_problems()
    results = {
        "math500_boxed": boxed_vs_answer(math500),
        "gsm8k_hash": gsm8k_hash_vs_answer(gsm8k),
        "shuffled": {name: shuffled_pairs(ps, args.rounds, args.seed) for name, ps in (("MATH-500", math500), ("GSM8K", gsm8k))},
        "aime24_boxed": boxed_vs_answer(make_task("aime24").test_problems()),
        "settings": {"rounds": args.rounds, "seed": args.seed},
    }
    RESULTS.mkdir(exist_ok=True)
    atomic_write_json(RESULTS / "verifier_quality.json", results)
    text = markdown(results)
    atomic_write_text(RESULTS / "verifier_quality.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
