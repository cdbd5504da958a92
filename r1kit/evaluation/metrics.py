"""Evaluation metrics: unbiased pass@k, cons@k (majority vote over equivalent answers), and the summary.

Pure functions of per-sample records; nothing here generates or touches files. The runner
(r1kit.evaluation.runner) produces `SampleRecord`s, `summarize` turns them into an `EvalSummary`.

Definitions (n = samples per problem, c = correct samples of a problem):
- pass@1: mean over problems of c / n, i.e. pass@1 averaged over the n samples (the R1 paper's pass@1
  with k samples, section 3.1). Its 95% confidence interval is the **normal approximation over
  problems**: mean ± 1.96 · s / sqrt(P), with s the sample standard deviation (ddof=1) of the P
  per-problem rates, clipped to [0, 1]. It measures how much pass@1 would move on another draw of
  problems like these (sampling noise within a problem is folded in); it is degenerate (zero width)
  when every problem has the same rate.
- pass@k (Chen et al. 2021, eq. 1): 1 - C(n-c, k) / C(n, k) per problem, averaged; the unbiased
  estimate of "at least one of k fresh samples is correct".
- cons@k: the answers of a problem's n samples vote; answers fall into one group when the verifier
  judges them equivalent (`answers_equivalent` under the problem's answer_style: "1/2", "0.5" and
  "\\frac{1}{2}" are one vote), not when their strings match. The largest group wins, ties go to the
  group seen first; the problem counts as solved when that group's answers are correct. Samples with
  no answer form one group of their own, and a problem whose majority is "no answer" counts wrong.
"""
from __future__ import annotations

import math
import operator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from r1kit.rewards.graders import answers_equivalent
from r1kit.types import Problem, R1KitError

# Verdict reasons that say the verifier could not read or finish an answer: such answers only vote
# with answers of identical text, since asking the verifier again would cost another time limit.
_UNVERIFIABLE = frozenset({"timeout", "too long", "worker error", "unparseable"})
_AUTO_BY_MAX_VALUES = 20  # a metadata field is broken down automatically only when it has few values


# ----------------------------------------------------------------------------- records


@dataclass(frozen=True)
class SampleRecord:
    """One sampled completion of one problem, graded. One JSON line of samples.jsonl."""

    problem_id: str
    sample: int  # index of the sample within its problem, 0..k-1
    completion: str  # decoded completion text (the EOS token's text stripped)
    answer: str | None  # the extracted final answer (None: no parseable answer)
    correct: bool
    reason: str  # the verdict's reason: "correct", "wrong value", "no answer", "timeout", ...
    length: int  # completion length in tokens (EOS included when emitted)
    truncated: bool  # hit max_new_tokens without EOS
    well_formed: bool  # "<think> ... </think> <answer> ... </answer>" and nothing else
    reflection: bool  # the reasoning re-checks itself ("wait", "verify", ...)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SampleRecord":
        try:
            return cls(**{f: d[f] for f in cls.__dataclass_fields__})
        except KeyError as e:
            raise R1KitError(f"sample record is missing the field {e.args[0]!r}: {str(d)[:200]}") from None


@dataclass
class EvalSummary:
    """What an evaluation measured. Rates are in [0, 1]; lengths in tokens."""

    pass1: float
    pass1_ci: tuple[float, float]  # 95% normal-approximation interval over problems
    cons: float  # cons@k
    pass_at_k: dict[int, float]  # k -> unbiased pass@k, for the requested k <= samples per problem
    no_answer_rate: float  # share of samples with no parseable answer
    format_rate: float  # share of samples in the exact <think></think><answer></answer> format
    reflection_rate: float  # share of samples whose reasoning re-checks itself
    truncated_rate: float  # share of samples cut at max_new_tokens
    mean_length: float
    p50_length: float
    p90_length: float
    num_problems: int
    k: int  # samples per problem
    by: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)  # field -> value -> metrics
    settings: dict[str, Any] = field(default_factory=dict)  # how the samples were drawn
    records: list[SampleRecord] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of everything but the records (pass@k keys become strings)."""
        d = {f: getattr(self, f) for f in self.__dataclass_fields__ if f != "records"}
        d["pass1_ci"] = list(self.pass1_ci)
        d["pass_at_k"] = {str(k): v for k, v in sorted(self.pass_at_k.items())}
        return d


# ----------------------------------------------------------------------------- estimators


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one problem with `c` correct out of `n` samples (Chen et al. 2021, eq. 1):

        pass@k = 1 - C(n - c, k) / C(n, k) = 1 - prod_{i = n-c+1}^{n} (1 - k / i)

    The product form never forms the huge binomials, so it is exact enough and fast for any n.
    """
    try:
        n, c, k = operator.index(n), operator.index(c), operator.index(k)
    except TypeError:
        raise ValueError(f"pass_at_k takes integers, got n={n!r}, c={c!r}, k={k!r}") from None
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:  # every choice of k samples contains a correct one
        return 1.0
    return 1.0 - float(np.prod(1.0 - k / np.arange(n - c + 1, n + 1, dtype=np.float64)))


def mean_ci(values: Sequence[float], z: float = 1.96) -> tuple[float, float]:
    """Normal-approximation interval mean ± z · s / sqrt(n) (s with ddof=1), clipped to [0, 1].

    One value gives a zero-width interval: there is no spread to estimate from.
    """
    if len(values) == 0:
        raise ValueError("mean_ci of no values")
    x = np.asarray(values, dtype=np.float64)
    mean = float(x.mean())
    if len(x) < 2:
        return mean, mean
    half = z * float(x.std(ddof=1)) / math.sqrt(len(x))
    return max(0.0, mean - half), min(1.0, mean + half)


def length_stats(lengths: Sequence[int]) -> tuple[float, float, float]:
    """(mean, median, 90th percentile) of token lengths; percentiles interpolate linearly."""
    if len(lengths) == 0:
        return 0.0, 0.0, 0.0
    x = np.asarray(lengths, dtype=np.float64)
    return float(x.mean()), float(np.percentile(x, 50)), float(np.percentile(x, 90))


# ----------------------------------------------------------------------------- cons@k


@dataclass(frozen=True)
class Vote:
    answer: str | None  # the winning group's first answer (None: "no answer" won)
    correct: bool  # the winning group's answers are correct
    votes: int  # size of the winning group
    groups: int  # number of distinct groups


def majority_vote(
    answers: Sequence[str | None],
    correct: Sequence[bool],
    reasons: Sequence[str],
    answer_style: str,
    equivalent: Callable[[str, str, str], bool] = answers_equivalent,
) -> Vote:
    """Majority vote over one problem's sampled answers, grouping equivalent answers.

    answers/correct/reasons: one per sample (the extracted answer and its verdict). Each answer joins
    the first group whose representative (first member) it is equivalent to. Two answers with
    different verdicts are never compared: if they were equivalent the verifier would have graded
    them alike, and skipping them saves verifier calls. Answers the verifier could not read or
    finish (timeouts, unparseable) only group with identical text.
    """
    if not (len(answers) == len(correct) == len(reasons)) or not answers:
        raise ValueError(f"majority_vote needs equal, non-zero lengths: {len(answers)}, {len(correct)}, {len(reasons)}")
    groups: list[list[int]] = []  # member sample indices; groups[g][0] is the representative
    for i, ans in enumerate(answers):
        for members in groups:
            r = members[0]
            if _same_group(ans, answers[r], correct[i], correct[r], reasons[i], reasons[r], answer_style, equivalent):
                members.append(i)
                break
        else:
            groups.append([i])
    # max() keeps the first of equal sizes: ties go to the group seen first.
    winner = max(groups, key=len)
    rep = winner[0]
    return Vote(answers[rep], answers[rep] is not None and bool(correct[rep]), len(winner), len(groups))


def _same_group(a, b, ok_a, ok_b, why_a, why_b, style, equivalent) -> bool:
    if a is None or b is None:
        return a is None and b is None
    if ok_a != ok_b:
        return False
    if a.strip() == b.strip():
        return True
    if why_a in _UNVERIFIABLE or why_b in _UNVERIFIABLE:
        return False
    return equivalent(b, a, style)


def cons_votes(records_by_problem: dict[str, list[SampleRecord]], problems: Sequence[Problem], threads: int = 4) -> dict[str, Vote]:
    """majority_vote for each problem; "math" problems vote in parallel threads, because their
    equivalence checks wait on the math-verify worker pool rather than on this process's CPU."""

    def vote(p: Problem) -> Vote:
        recs = records_by_problem[p.id]
        return majority_vote([r.answer for r in recs], [r.correct for r in recs], [r.reason for r in recs], p.answer_style)

    if threads > 1 and len(problems) > 1 and any(p.answer_style == "math" for p in problems):
        with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="r1kit-vote") as ex:
            return dict(zip((p.id for p in problems), ex.map(vote, problems)))
    return {p.id: vote(p) for p in problems}


# ----------------------------------------------------------------------------- summary


def auto_by_fields(problems: Sequence[Problem]) -> list[str]:
    """Metadata fields worth a breakdown: scalar (str/int/bool) in every problem, with 2..20 values that
    repeat (at most half as many values as problems: a per-problem field such as an operand is noise)."""
    if not problems:
        return []
    out = []
    for name in problems[0].meta:
        values = [p.meta.get(name) for p in problems]
        n_values = len(set(values)) if all(isinstance(v, (str, int, bool)) for v in values) else 0
        if 2 <= n_values <= min(_AUTO_BY_MAX_VALUES, len(problems) / 2):
            out.append(name)
    return out


def _sort_key(value: str) -> tuple[int, float, str]:
    """Numbers in numeric order ("2" before "10"), then text in alphabetical order."""
    try:
        return 0, float(value), ""
    except ValueError:
        return 1, 0.0, value


def breakdown(
    problems: Sequence[Problem], rates: dict[str, float], votes: dict[str, Vote], by: Sequence[str]
) -> dict[str, dict[str, dict[str, float]]]:
    """{field: {value: {"num_problems", "pass1", "cons"}}} over each metadata field in `by`."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for name in by:
        missing = [p.id for p in problems if name not in p.meta]
        if missing:
            raise R1KitError(
                f"breakdown by {name!r}: {len(missing)} problems have no such metadata field (first: {missing[0]!r}); "
                f"their fields are {sorted(problems[0].meta) if problems else []}"
            )
        cells: dict[str, list[Problem]] = {}
        for p in problems:
            cells.setdefault(str(p.meta[name]), []).append(p)
        out[name] = {
            v: {
                "num_problems": len(ps),
                "pass1": float(np.mean([rates[p.id] for p in ps])),
                "cons": float(np.mean([votes[p.id].correct for p in ps])),
            }
            for v, ps in sorted(cells.items(), key=lambda kv: _sort_key(kv[0]))
        }
    return out


def group_records(records: Sequence[SampleRecord], problems: Sequence[Problem], k: int) -> dict[str, list[SampleRecord]]:
    """Records per problem id, ordered by sample index; every problem must have exactly samples 0..k-1."""
    by_id: dict[str, list[SampleRecord]] = {p.id: [] for p in problems}
    for r in records:
        if r.problem_id in by_id:
            by_id[r.problem_id].append(r)
    for pid, recs in by_id.items():
        recs.sort(key=lambda r: r.sample)
        if [r.sample for r in recs] != list(range(k)):
            raise ValueError(f"problem {pid!r}: expected samples 0..{k - 1}, got {[r.sample for r in recs]}")
    return by_id


def summarize(
    records: Sequence[SampleRecord],
    problems: Sequence[Problem],
    *,
    k: int,
    pass_k: Sequence[int] = (),
    by: Sequence[str] | None = None,
    settings: dict[str, Any] | None = None,
) -> EvalSummary:
    """All metrics of an evaluation from its records (k per problem). `by=None` breaks down by every
    low-cardinality metadata field (`auto_by_fields`); `()` by none."""
    if not problems:
        raise R1KitError("nothing to summarise: no problems were evaluated")
    bad = [j for j in pass_k if not 1 <= j <= k]
    if bad:
        raise R1KitError(f"pass@k needs 1 <= k <= samples per problem ({k}); got {bad}")
    by_id = group_records(records, problems, k)
    ordered = [r for p in problems for r in by_id[p.id]]
    rates = {pid: sum(r.correct for r in recs) / k for pid, recs in by_id.items()}
    votes = cons_votes(by_id, problems)
    pass_at = {
        j: float(np.mean([pass_at_k(k, sum(r.correct for r in by_id[p.id]), j) for p in problems]))
        for j in sorted(set(pass_k))
    }
    mean_len, p50, p90 = length_stats([r.length for r in ordered])
    n = len(ordered)
    return EvalSummary(
        pass1=float(np.mean([rates[p.id] for p in problems])),
        pass1_ci=mean_ci([rates[p.id] for p in problems]),
        cons=float(np.mean([votes[p.id].correct for p in problems])),
        pass_at_k=pass_at,
        no_answer_rate=sum(r.answer is None for r in ordered) / n,
        format_rate=sum(r.well_formed for r in ordered) / n,
        reflection_rate=sum(r.reflection for r in ordered) / n,
        truncated_rate=sum(r.truncated for r in ordered) / n,
        mean_length=mean_len,
        p50_length=p50,
        p90_length=p90,
        num_problems=len(problems),
        k=k,
        by=breakdown(problems, rates, votes, auto_by_fields(problems) if by is None else by),
        settings=dict(settings or {}),
        records=ordered,
    )
