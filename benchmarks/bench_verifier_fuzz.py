"""Latency of the math verifier and the language reward on a fuzzed stream of completions.

    python benchmarks/bench_verifier_fuzz.py [--n 2000] [--seed 0] [--out benchmarks/results/verifier_fuzz.json]

The stream mixes ordinary answers (integers, fractions, LaTeX expressions) with adversarial ones (power towers,
huge exponents and factorials, thousands of nested braces, random LaTeX token soup, unicode junk), each in the
R1-Zero layout, graded against a math reference with `grade()` (extraction + math-verify in its time-limited
pool, after the static pre-check and quick_math's exact disproof). Reports p50/p99/max per call, and the
language reward's p50/p99 on 100,000-character completions (300 by default, after one warm-up call that builds
its tables). Every call is timed on its own, one after the other, on a warm pool. For figures "alone" on a
shared machine, run it at real-time priority: `chrt -r 1 python benchmarks/bench_verifier_fuzz.py`.
"""
from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

from r1kit.rewards import mathverify
from r1kit.rewards.graders import grade
from r1kit.rewards.language import language_reward
from r1kit.types import Problem

TOKENS = ["1", "2", "9", "10", "x", "y", "+", "-", "*", "/", "^", "!", "=", "(", ")", "{", "}", "\\frac", "\\sqrt",
          "\\pi", "\\infty", "\\cdot", "\\le", ",", ".", " ", "\\left(", "\\right)", "\\sin", "e", "i", "\\{", "\\}"]


def adversarial(rng: random.Random) -> str:
    n = lambda: str(rng.randint(2, 99))  # noqa: E731
    forms = [
        lambda: f"{n()}^{{{n()}^{{{n()}^{{{n()}}}}}}}",
        lambda: f"{n()}^{{{n()}^{{{n()}^{{{n()}}}}}}}!",
        lambda: "{" * rng.randint(100, 4000) + "1" + "}" * rng.randint(0, 4000),
        lambda: "(" * rng.randint(100, 5000) + "1",
        lambda: f"{n()}^{{{rng.randint(10**5, 10**9)}}}",
        lambda: f"{rng.randint(2000, 10**6)}!",
        lambda: "**".join(n() for _ in range(rng.randint(3, 6))),
        lambda: "^".join(n() for _ in range(rng.randint(3, 6))),
    ]
    return rng.choice(forms)()


def ordinary(rng: random.Random) -> str:
    forms = [
        lambda: str(rng.randint(-1000, 10**6)),
        lambda: f"\\frac{{{rng.randint(1, 99)}}}{{{rng.randint(1, 99)}}}",
        lambda: f"{rng.randint(1, 9)}\\sqrt{{{rng.randint(2, 50)}}}",
        lambda: f"({rng.randint(-9, 9)}, {rng.randint(-9, 9)})",
        lambda: f"{rng.randint(2, 9)}^{{{rng.randint(2, 40)}}}",
        lambda: f"x^{{2}} + {rng.randint(1, 9)}x + {rng.randint(1, 9)}",
        lambda: "".join(rng.choice(TOKENS) for _ in range(rng.randint(1, 30))),
        lambda: "".join(chr(rng.randint(32, 0x3000)) for _ in range(rng.randint(1, 40))),
    ]
    return rng.choice(forms)()


def stream(n: int, seed: int) -> list[tuple[str, str]]:
    """(completion, "adversarial" | "ordinary") pairs."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        kind = "adversarial" if rng.random() < 0.3 else "ordinary"
        answer = adversarial(rng) if kind == "adversarial" else ordinary(rng)
        out.append((f"<think> {'let me think. ' * rng.randint(0, 50)}</think> <answer> {answer} </answer>", kind))
    return out


def percentiles(ts: list[float]) -> dict[str, float]:
    ts = sorted(ts)
    pick = lambda q: ts[min(len(ts) - 1, int(q * len(ts)))]  # noqa: E731
    return {"p50_ms": round(1e3 * pick(0.5), 3), "p99_ms": round(1e3 * pick(0.99), 3), "max_ms": round(1e3 * ts[-1], 3)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lang-n", type=int, default=300, help="100,000-character completions for the language reward")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/verifier_fuzz.json"))
    args = ap.parse_args()
    mathverify.warm_up()
    problems = [Problem("p", "q", gold, "math") for gold in ("\\frac{1}{2}", "42", "2\\sqrt{3}", "x^{2}+1")]
    times, reasons, by_kind = [], {}, {"adversarial": [], "ordinary": []}
    for i, (text, kind) in enumerate(stream(args.n, args.seed)):
        start = time.perf_counter()
        v = grade(text, problems[i % len(problems)])
        times.append(time.perf_counter() - start)
        by_kind[kind].append(times[-1])
        key = v.reason.split(":")[0]
        reasons[key] = reasons.get(key, 0) + 1
    rng = random.Random(args.seed)
    alphabet = "abcdefghij 0123456789+=.,漢字得ЖжΩ"
    lang_times = []
    language_reward("<think> warm up </think> <answer> 1 </answer>", problems[0])  # builds its tables once
    for _ in range(args.lang_n):
        text = "<think> " + "".join(rng.choice(alphabet) for _ in range(100_000)) + " </think> <answer> 1 </answer>"
        start = time.perf_counter()
        language_reward(text, problems[0])
        lang_times.append(time.perf_counter() - start)
    report = {"n": args.n, "seed": args.seed, "grade": percentiles(times), "reasons": reasons,
              "grade_by_kind": {k: dict(percentiles(v), n=len(v)) for k, v in by_kind.items()},
              "calls_over_2s": sum(t > 2.0 for t in times), "language_100k": percentiles(lang_times)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
