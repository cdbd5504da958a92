"""Rejection sampling (`r1kit sample`) and the synthetic data of the R1 recipe.

DeepSeek-R1 section 2.3.3: when reasoning RL has converged, sample many completions per prompt from its
checkpoint, keep only the correct ones and filter out "chain-of-thought with mixed languages, long
paragraphs, and code blocks"; add non-reasoning data (answered without a chain of thought); fine-tune the
base model on the result. Here a completion is kept only if it is

    not truncated  ->  within [min_tokens, max_tokens]  ->  well formed  ->  correct (the RL rule reward)
    ->  in the target language only (r1kit.rewards.language)  ->  not repetitive  ->  not a duplicate

and at most `max_per_prompt` distinct completions per prompt are kept. Each rejected sample is counted
under the first check it fails, so the statistics report says exactly where samples go.

Also here, because the recipe's stages need them and no dataset can be downloaded:
- cold-start data (`cold_start_records`): long, readable chains of thought written by the tasks' own
  reference solvers (arithmetic worked solutions; the Countdown solver), in one fixed format:
  "<think> reasoning. summary: ... </think> <answer> ... </answer>";
- general prompts (`GeneralTask`, "Repeat 4721"): the non-reasoning scenario, answered without a chain
  of thought ("<think></think> <answer> 4721 </answer>"), scored by a reward model in RL;
- preference pairs (`preference_records`) on general prompts, to train that reward model.
"""
from __future__ import annotations

import ast
import json
import random
import time
from collections import Counter
from dataclasses import dataclass, replace
from fractions import Fraction
from pathlib import Path
from typing import Any, Sequence

from r1kit.config import SampleConfig
from r1kit.evaluation.readability import repetition_ratio
from r1kit.rewards.functions import accuracy_rewards
from r1kit.rewards.language import language_consistency
from r1kit.templates import parse_completion, render_prompt
from r1kit.types import Problem, R1KitError

REASONS = ("truncated", "too short", "too long", "malformed", "wrong", "language", "repetitive", "duplicate",
           "per-prompt cap")


# ----------------------------------------------------------------------------- the filters


def normalized(text: str) -> str:
    """What makes two completions duplicates: the same words (whitespace does not count)."""
    return " ".join(text.split())


def first_failure(text: str, *, n_tokens: int, truncated: bool, correct: bool, lang: str, cfg: SampleConfig) -> str | None:
    """The first filter `text` fails (a REASONS name), or None when it is kept (duplicates aside)."""
    if truncated:
        return "truncated"
    if n_tokens < cfg.min_tokens:
        return "too short"
    if n_tokens > cfg.max_tokens:
        return "too long"
    if not parse_completion(text).well_formed:
        return "malformed"
    if not correct:
        return "wrong"
    if language_consistency(text, lang) < 1.0:
        return "language"
    if repetition_ratio(text) > cfg.max_repetition:
        return "repetitive"
    return None


@dataclass
class Candidate:
    """One sampled completion of one problem, with what the filters need."""

    problem: Problem
    text: str
    n_tokens: int
    truncated: bool


def filter_candidates(cands: Sequence[Candidate], cfg: SampleConfig, lang: str) -> tuple[list[Candidate], Counter]:
    """Apply every filter; returns the kept candidates (input order) and rejections by reason."""
    correct = accuracy_rewards([c.text for c in cands], [c.problem for c in cands])
    kept, rejected = [], Counter()
    seen: dict[str, set[str]] = {}
    for c, ok in zip(cands, correct):
        reason = first_failure(c.text, n_tokens=c.n_tokens, truncated=c.truncated, correct=bool(ok), lang=lang, cfg=cfg)
        texts = seen.setdefault(c.problem.id, set())
        if reason is None and normalized(c.text) in texts:
            reason = "duplicate"
        if reason is None and len(texts) >= cfg.max_per_prompt:
            reason = "per-prompt cap"
        if reason is None:
            texts.add(normalized(c.text))
            kept.append(c)
        else:
            rejected[reason] += 1
    return kept, rejected


def validate_sample_config(cfg: SampleConfig) -> None:
    checks = {"num_prompts": cfg.num_prompts >= 1, "samples_per_prompt": cfg.samples_per_prompt >= 1,
              "max_new_tokens": cfg.max_new_tokens >= 1, "max_per_prompt": cfg.max_per_prompt >= 1,
              "min_tokens": 0 <= cfg.min_tokens <= cfg.max_tokens, "general_frac": 0 <= cfg.general_frac < 1,
              "max_repetition": 0 <= cfg.max_repetition <= 1}
    bad = [k for k, ok in checks.items() if not ok]
    if bad:
        raise R1KitError(f"sample: bad value for {', '.join('sample.' + k for k in bad)} "
                         f"(need counts >= 1, min_tokens <= max_tokens, fractions in range)")


# ----------------------------------------------------------------------------- sampling


def sample_candidates(engine, tokenizer, problems: list[Problem], cfg: SampleConfig, template: str, seed: int,
                      chunk_prompts: int = 64) -> list[Candidate]:
    """`cfg.samples_per_prompt` completions of each problem; chunk i is drawn from a generator seeded by
    (seed, i) alone, so the samples do not depend on what ran before."""
    from r1kit.evaluation.runner import chunk_generator, decode_rollout

    out: list[Candidate] = []
    G = cfg.samples_per_prompt
    for index, start in enumerate(range(0, len(problems), chunk_prompts)):
        chunk = problems[start : start + chunk_prompts]
        prompts = [tokenizer(render_prompt(p.question, template, tokenizer)).input_ids for p in chunk]
        ro = engine.generate(prompts, group_size=G, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                             top_p=cfg.top_p, generator=chunk_generator(seed, index))
        texts = decode_rollout(ro, tokenizer, getattr(engine, "eos_token_ids", None) or [tokenizer.eos_token_id])
        lengths, trunc = ro.lengths.tolist(), ro.truncated.tolist()
        out += [Candidate(chunk[r // G], texts[r], int(lengths[r]), bool(trunc[r])) for r in range(len(texts))]
    return out


def rejection_sample(engine, tokenizer, problems: list[Problem], cfg: SampleConfig, *, lang: str, template: str,
                     seed: int, general: list[Problem] = ()) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Sample, filter, and mix in non-reasoning examples: returns (SFT records, statistics).

    Records are {"prompt", "completion", "kind", "problem_id"} (prompt/completion SFT format). `general`
    problems are answered without a chain of thought; as many are added as make them `general_frac` of
    the output (all of them at most).
    """
    validate_sample_config(cfg)
    cands = sample_candidates(engine, tokenizer, problems, cfg, template, seed)
    kept, rejected = filter_candidates(cands, cfg, lang)
    records = [{"prompt": render_prompt(c.problem.question, template, tokenizer), "completion": c.text, "kind": "reasoning",
                "problem_id": c.problem.id} for c in kept]
    want = len(records) * cfg.general_frac / (1 - cfg.general_frac)  # general share of the output = general_frac
    n_general = min(len(general), max(1, round(want))) if records and cfg.general_frac > 0 else 0
    records += [{"prompt": render_prompt(p.question, template, tokenizer), "completion": general_completion(p), "kind": "general",
                 "problem_id": p.id} for p in list(general)[:n_general]]
    random.Random(seed).shuffle(records)
    per_prompt = Counter(c.problem.id for c in kept)
    stats = {"prompts": len(problems), "samples": len(cands), "kept": len(kept),
             "kept_rate": len(kept) / len(cands) if cands else 0.0,
             "rejected": {r: rejected.get(r, 0) for r in REASONS},
             "prompts_with_kept": len(per_prompt), "general_added": n_general, "records": len(records),
             "mean_kept_tokens": sum(c.n_tokens for c in kept) / len(kept) if kept else 0.0}
    return records, stats


def stats_markdown(stats: dict[str, Any], title: str = "Rejection sampling") -> str:
    """A small report: kept and rejected counts by reason, as a Markdown table."""
    n = max(1, stats["samples"])
    rows = [f"# {title}", "", f"{stats['samples']} samples of {stats['prompts']} prompts; kept {stats['kept']} "
            f"({stats['kept'] / n:.1%}) from {stats['prompts_with_kept']} prompts; {stats['general_added']} "
            f"non-reasoning examples added; {stats['records']} SFT records.", "", "| outcome | samples | share |",
            "|---|---:|---:|", f"| kept | {stats['kept']} | {stats['kept'] / n:.1%} |"]
    rows += [f"| rejected: {r} | {c} | {c / n:.1%} |" for r, c in stats["rejected"].items()]
    return "\n".join(rows) + "\n"


def sample_to_files(out_dir: Path, model_dir: Path, problems: list[Problem], general: list[Problem], cfg, *,
                    seed: int, title: str) -> dict[str, Any]:
    """`rejection_sample` from the model at `model_dir` (settings: cfg.sample, cfg.pipeline.lang) into
    out_dir/{data.jsonl, stats.md, stats.json}; returns the statistics. The stats file is written last, so
    it marks the data complete: a rerun reuses it. No kept completion at all is an R1KitError naming the
    rejection reasons (the stage cannot go on with empty data)."""
    from r1kit.io import atomic_write_json, atomic_write_text
    from r1kit.policy import Policy

    out_dir, stats_path = Path(out_dir), Path(out_dir) / "stats.json"
    if stats_path.exists():
        return json.loads(stats_path.read_text())
    t0 = time.time()
    policy = Policy.from_config(cfg, model_dir, lora=False)
    tok, engine = policy.tokenizer, policy.make_engine(backend=cfg.engine.backend, dtype=cfg.engine.dtype)
    records, stats = rejection_sample(engine, tok, problems, cfg.sample, lang=cfg.pipeline.lang,
                                      template=cfg.task.template, seed=seed, general=general)
    if stats["kept"] == 0:
        reasons = ", ".join(f"{k}: {v}" for k, v in stats["rejected"].items() if v)
        raise R1KitError(f"no sampled completion passed the filters ({stats['samples']} samples; rejected {reasons}); "
                         "the model is too weak or the filters too strict (see the sample section)")
    stats["seconds"] = time.time() - t0
    atomic_write_text(out_dir / "data.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    atomic_write_text(out_dir / "stats.md", stats_markdown(stats, title))
    atomic_write_json(stats_path, stats)
    return stats


# ----------------------------------------------------------------------------- general prompts


@dataclass
class GeneralTask:
    """Non-reasoning prompts ("Repeat 4721"): answered directly, no chain of thought needed.

    Problems carry meta["scenario"] = "general" (the reward-model scenario of the R1 recipe) and their
    reference answer (graded "exact"), used for evaluation and for writing preference labels only.
    """

    min_digits: int = 3
    max_digits: int = 5
    num_test: int = 50
    test_seed: int = 4321
    name: str = "general"

    def __post_init__(self) -> None:
        rng, self._test = random.Random(self.test_seed), []
        seen: set[int] = set()
        while len(self._test) < self.num_test:
            x = self._draw(rng)
            if x not in seen:
                seen.add(x)
                self._test.append(self._problem(x, f"general-test-{len(self._test):04d}"))
        self._held = seen

    def _draw(self, rng: random.Random) -> int:
        nd = rng.randint(self.min_digits, self.max_digits)
        return rng.randint(10 ** (nd - 1), 10**nd - 1)

    def _problem(self, x: int, pid: str) -> Problem:
        return Problem(pid, f"Repeat {x}", str(x), "exact", self.name, meta={"scenario": "general"})

    def train_problems(self, n: int, rng: random.Random) -> list[Problem]:
        out = []
        while len(out) < n:
            x = self._draw(rng)
            if x not in self._held:
                out.append(self._problem(x, f"general-{x}"))
        return out

    def test_problems(self) -> list[Problem]:
        return list(self._test)


def general_task(cfg, num_test: int | None = None) -> GeneralTask:
    """The run's general prompts: numbers of `pipeline.general_digits` digits; `num_test` held-out prompts
    (default pipeline.general_test). The held-out prompts of a smaller `num_test` are the first ones of a larger."""
    digits, n = cfg.pipeline.general_digits, cfg.pipeline.general_test if num_test is None else num_test
    if (not isinstance(digits, (list, tuple)) or len(digits) != 2 or not all(isinstance(d, int) for d in digits)
            or not 1 <= digits[0] <= digits[1] <= 9):
        raise R1KitError(f"pipeline.general_digits must be [min, max] with 1 <= min <= max <= 9, got {digits!r}")
    if 10 ** digits[1] - 10 ** (digits[0] - 1) < 4 * n:
        raise R1KitError(f"pipeline.general_digits={digits!r} has too few numbers for {n} held-out general prompts "
                         "(pipeline.general_test) and training prompts apart from them")
    return GeneralTask(min_digits=digits[0], max_digits=digits[1], num_test=n)


def general_docs(n: int, template: str, rng: random.Random, task: GeneralTask | None = None) -> list:
    """`n` pretraining documents of style "general" (r1kit.corpus.CorpusDoc): a "Repeat N" training prompt
    answered directly, as the SFT data answers general prompts (never a held-out general prompt); the R1
    pipeline's `pipeline.corpus_general_frac`."""
    from r1kit.corpus import CorpusDoc

    if n < 0:
        raise R1KitError(f"pipeline.corpus_general_frac gives {n} general documents; it must be >= 0")
    return [CorpusDoc(render_prompt(p.question, template), general_completion(p), "general")
            for p in (task or GeneralTask()).train_problems(n, rng)]


def general_completion(problem: Problem) -> str:
    """The non-reasoning answer: an empty chain of thought, then the answer.

    No space inside the empty think, on purpose: with " <think> </think>" the tiny models confused the
    space after "Assistant:" with the one after "<think>" and learned to skip "<think>" on general
    prompts (measured: P(<think>) ~ 0 after SFT with weight_decay 0; ~1 with this spelling)."""
    return f" <think></think> <answer> {problem.answer} </answer>"


def _wrong_value(answer: str, rng: random.Random) -> str:
    i = rng.randrange(len(answer))
    digit = rng.choice([d for d in "0123456789" if d != answer[i] and not (i == 0 and d == "0")])
    return answer[:i] + digit + answer[i + 1 :]


PREFERENCE_KINDS = ("wrong_value", "malformed", "repeated")


def kind_cycle(kind_weights: dict[str, int] | None) -> list[int]:
    """Indices into PREFERENCE_KINDS, each repeated by its weight (None: one of each, in turn); R1KitError
    naming rm.kind_weights on an unknown kind or a weight that is not a non-negative integer, or all 0."""
    weights = {k: 1 for k in PREFERENCE_KINDS} if kind_weights is None else dict(kind_weights)
    bad = [k for k, w in weights.items() if k not in PREFERENCE_KINDS or not isinstance(w, int) or isinstance(w, bool) or w < 0]
    if bad or not sum(weights.values()):
        raise R1KitError(f"rm.kind_weights: need non-negative integer weights, not all 0, over {list(PREFERENCE_KINDS)}; "
                         f"got {kind_weights}")
    return [j for j, k in enumerate(PREFERENCE_KINDS) for _ in range(weights.get(k, 0))]


def preference_records(problems: Sequence[Problem], template: str, rng: random.Random,
                       kind_weights: dict[str, int] | None = None) -> list[dict[str, str]]:
    """One {"prompt", "chosen", "rejected", "kind"} per general problem: chosen is the right direct answer;
    rejected is a wrong value (one digit changed), malformed output, or a repetitive answer (the labels a
    human would give; the reward model never sees the rule that wrote them, nor "kind", which only splits
    its validation accuracy). The kinds cycle in the proportions of `kind_weights` (default: in turn)."""
    cycle = kind_cycle(kind_weights)
    out = []
    for i, p in enumerate(problems):
        a, j = p.answer, cycle[i % len(cycle)]
        candidates = [f" <think></think> <answer> {_wrong_value(a, rng)} </answer>",  # all three drawn: same stream
                      rng.choice([f" {a}", f" <answer> {a}", f" <think> {a} </think>"]),
                      f" <think></think> <answer> {' '.join([a] * rng.randint(2, 4))} </answer>"]
        out.append({"prompt": render_prompt(p.question, template), "chosen": general_completion(p),
                    "rejected": candidates[j], "kind": PREFERENCE_KINDS[j]})
    return out


def policy_preference_records(cands: Sequence[Candidate], template: str) -> tuple[list[dict[str, str]], dict[str, Any]]:
    """Pairs from a policy's own samples on general prompts (labelled as a human would label them, by the
    reference answer the reward model never sees): each distinct wrong completion of a problem is rejected
    against the right direct answer (kind "policy_wrong"). These are the mistakes the policy makes, where
    synthetic one-digit changes are only a guess at them. Returns (records, stats: samples, right, pairs)."""
    correct = accuracy_rewards([c.text for c in cands], [c.problem for c in cands])
    out, seen = [], set()
    for c, ok in zip(cands, correct):
        key = (c.problem.id, normalized(c.text))
        if ok or key in seen:
            continue
        seen.add(key)
        out.append({"prompt": render_prompt(c.problem.question, template), "chosen": general_completion(c.problem),
                    "rejected": c.text, "kind": "policy_wrong"})
    return out, {"samples": len(cands), "right": int(sum(1 for ok in correct if ok)), "pairs": len(out)}


def policy_pairs(model_dir: Path, problems: list[Problem], cfg, *, seed: int) -> tuple[list[dict[str, str]], dict[str, Any]]:
    """`policy_preference_records` of the model at `model_dir` answering `problems` (settings: cfg.rm.policy_*,
    cfg.sample.max_new_tokens); the stats add the prompts and the share of right answers."""
    from r1kit.policy import Policy

    policy = Policy.from_config(cfg, model_dir, lora=False)
    engine = policy.make_engine(backend=cfg.engine.backend, dtype=cfg.engine.dtype)
    scfg = SampleConfig(num_prompts=len(problems), samples_per_prompt=cfg.rm.policy_samples,
                        temperature=cfg.rm.policy_temperature, max_new_tokens=cfg.sample.max_new_tokens)
    records, stats = policy_preference_records(sample_candidates(engine, policy.tokenizer, problems, scfg,
                                                                 cfg.task.template, seed), cfg.task.template)
    return records, {**stats, "prompts": len(problems), "right_rate": stats["right"] / max(1, stats["samples"])}


# ----------------------------------------------------------------------------- cold-start data

SUMMARY_WORDS = {"en": "summary:", "zh": "总结："}


def _arithmetic_cold_start(task, p: Problem, lang: str) -> str:
    from r1kit.tasks.arithmetic import worked_in

    key = (p.meta["a"], p.meta["op"], p.meta["b"])
    return f" <think> {worked_in(key, lang)} {SUMMARY_WORDS[lang]} {p.question}={p.answer}. </think> <answer> {p.answer} </answer>"


def countdown_steps(expr: str) -> list[str]:
    """The operations of an expression in evaluation order: "(37*2)-19" -> ["37*2=74", "74-19=55"]."""
    steps: list[str] = []
    ops = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/"}

    def ev(node: ast.AST) -> Fraction:
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return Fraction(node.value)
        if isinstance(node, ast.BinOp) and type(node.op) in ops:
            a, b = ev(node.left), ev(node.right)
            if isinstance(node.op, ast.Div):
                v = a / b
            else:
                v = {ast.Add: a + b, ast.Sub: a - b, ast.Mult: a * b}[type(node.op)]
            steps.append(f"{_num(a)}{ops[type(node.op)]}{_num(b)}={_num(v)}")
            return v
        raise ValueError(f"not a + - * / expression over integers: {expr!r}")

    ev(ast.parse(expr, mode="eval").body)
    return steps


def _num(v: Fraction) -> str:
    return str(v.numerator) if v.denominator == 1 else f"{v.numerator}/{v.denominator}"


def _countdown_cold_start(task, p: Problem, lang: str) -> str:
    from r1kit.tasks.countdown import solve

    expr = p.solution or solve(p.meta["nums"], int(p.answer))
    if expr is None:
        raise R1KitError(f"countdown problem {p.id!r} has no solution to write a chain of thought from")
    word = {"en": "so", "zh": "得"}[lang]
    steps = f" {word} ".join(countdown_steps(expr))
    return f" <think> {steps}. {SUMMARY_WORDS[lang]} {expr}={p.answer}. </think> <answer> {expr} </answer>"


COLD_START_WRITERS = {"arithmetic": _arithmetic_cold_start, "countdown": _countdown_cold_start}


def cold_start_records(task, n: int, rng: random.Random, *, lang: str, template: str) -> list[dict[str, str]]:
    """`n` {"prompt", "completion"} records of readable chains of thought in the target language:
    reasoning, then a short summary, then the answer, written by the task's reference solver."""
    writer = COLD_START_WRITERS.get(getattr(task, "name", ""))
    if writer is None:
        raise R1KitError(f"no cold-start writer for task {getattr(task, 'name', task)!r}; known: {sorted(COLD_START_WRITERS)}")
    if lang not in SUMMARY_WORDS:
        raise R1KitError(f"cold-start data can be written in {sorted(SUMMARY_WORDS)}, not {lang!r}")
    if n < 1:
        raise R1KitError(f"sft.cold_start_examples must be >= 1, got {n}")
    return [{"prompt": render_prompt(p.question, template), "completion": writer(task, p, lang), "kind": "cold_start",
             "problem_id": p.id} for p in task.train_problems(n, rng)]


def hide_answer(problem: Problem) -> Problem:
    """The problem as a reward-model-only prompt: no reference answer for a rule to check."""
    return replace(problem, answer="", meta={**problem.meta, "reference": problem.answer})
