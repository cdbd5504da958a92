"""The evaluation runner: sample k completions per problem with the Engine, grade them, summarise.

    summary = evaluate_problems(engine, tokenizer, problems, k=4, pass_k=(1, 2, 4), out_dir=Path("eval"))
    summary.pass1, summary.cons, summary.pass_at_k[4]

The RL trainer calls `evaluate_problems` during training; `r1kit eval` (r1kit.evaluation.cli) calls it
on a benchmark. Each prompt is `render_prompt(problem.question, template)` tokenised; prompts go to the
Engine in chunks of `batch_prompts`, each chunk sampled `k` times per prompt (group_size=k) with a
torch.Generator seeded from (seed, chunk index): a chunk's samples depend only on the settings, the
problems in it and the model, so a resumed run draws exactly what the uninterrupted one would have.
Completions are graded with the same graders as the RL reward (`grade_many`: math-verify in the
time-limited worker pool, so no adversarial completion can hang an evaluation). Unlike the RL reward,
evaluation extracts answers leniently (`extract_answer`: <answer>, then \\boxed{}, then the last number).

Resuming: with `out_dir`, each finished chunk's records are appended to samples.jsonl. A restart with
the same settings (checked against eval_config.json) keeps the problems whose k samples are all there,
re-samples the chunks that still miss some, and summarises everything. Reports: r1kit.evaluation.report.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from r1kit.evaluation.metrics import EvalSummary, SampleRecord, summarize
from r1kit.io import append_jsonl, atomic_write_json, atomic_write_text, read_jsonl
from r1kit.progress import progress_bar
from r1kit.rewards.functions import has_reflection
from r1kit.rewards.graders import extract_for, grade_many
from r1kit.rewards.mathverify import DEFAULT_TIMEOUT_S
from r1kit.templates import parse_completion, render_prompt
from r1kit.types import Problem, R1KitError

SAMPLES_FILE, CONFIG_FILE = "samples.jsonl", "eval_config.json"


def evaluate_problems(
    engine,
    tokenizer,
    problems: list[Problem],
    *,
    k: int = 4,
    temperature: float = 0.6,
    top_p: float = 0.95,
    max_new_tokens: int = 256,
    template: str = "r1_zero",
    seed: int = 0,
    batch_prompts: int = 64,
    pass_k: tuple[int, ...] = (),
    progress: bool = False,
    out_dir: Path | None = None,
    by: Sequence[str] | None = None,
    label: str = "",
    grade_timeout_s: float = DEFAULT_TIMEOUT_S,
) -> EvalSummary:
    """Sample `k` completions per problem, grade them, and return (and with `out_dir`, write) the summary.

    engine: an r1kit.engine.Engine (anything with its `generate`). tokenizer: the model's HF tokenizer.
    by: metadata fields to break results down by (None: every low-cardinality field, () none).
    label: free text naming what is evaluated (model, benchmark); part of the resume identity.
    grade_timeout_s: the hard limit per math-verify call.
    """
    settings = _settings(problems, k, temperature, top_p, max_new_tokens, template, seed, batch_prompts, pass_k, label)
    prompts = [tokenizer(render_prompt(p.question, template, tokenizer)).input_ids for p in problems]
    _check_lengths(engine, problems, prompts, max_new_tokens)
    out = Path(out_dir) if out_dir is not None else None
    finished = _resume(out, settings, problems, k) if out is not None else {}
    chunks = [range(i, min(i + batch_prompts, len(problems))) for i in range(0, len(problems), batch_prompts)]
    bar = progress_bar(chunks, desc="eval", enabled=progress, unit="chunk")
    for index, rows in enumerate(bar):
        if all(problems[i].id in finished for i in rows):
            continue
        records = _run_chunk(
            engine, tokenizer, [problems[i] for i in rows], [prompts[i] for i in rows],
            k=k, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
            generator=chunk_generator(seed, index), grade_timeout_s=grade_timeout_s,
        )
        fresh = [r for r in records if r.problem_id not in finished]
        if out is not None:
            for r in fresh:  # one flushed line each; a crash mid-chunk is repaired by _resume
                append_jsonl(out / SAMPLES_FILE, r.to_dict())
        for r in fresh:
            finished.setdefault(r.problem_id, []).append(r)
        done = [r for p in problems if p.id in finished for r in finished[p.id]]
        bar.set_postfix(pass1=f"{np.mean([r.correct for r in done]):.3f}")
    records = [r for p in problems for r in finished[p.id]]
    summary = summarize(records, problems, k=k, pass_k=pass_k, by=by, settings=settings)
    if out is not None:
        from r1kit.evaluation.report import write_report  # matplotlib is imported only when writing

        write_report(summary, out)
    return summary


def chunk_generator(seed: int, chunk_index: int) -> torch.Generator:
    """A CPU generator whose state depends only on (seed, chunk_index), well mixed by SeedSequence
    (neighbouring seeds give unrelated streams)."""
    state = np.random.SeedSequence([seed, chunk_index]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state) & (2**63 - 1))


# ----------------------------------------------------------------------------- one chunk


def decode_rollout(rollout, tokenizer, eos_token_ids: Sequence[int]) -> list[str]:
    """Completion texts of a Rollout, row by row, without the trailing EOS token's text."""
    eos = set(eos_token_ids)
    all_ids, mask = rollout.completion_ids.cpu(), rollout.completion_mask.cpu().bool()  # one device sync, not N
    texts = []
    for row in range(rollout.num_rows):
        ids = all_ids[row][mask[row]].tolist()
        while ids and ids[-1] in eos:
            ids.pop()
        texts.append(tokenizer.decode(ids, skip_special_tokens=False))
    return texts


def _run_chunk(engine, tokenizer, problems, prompts, *, k, temperature, top_p, max_new_tokens, generator,
               grade_timeout_s) -> list[SampleRecord]:
    """Generate k completions for each problem of the chunk and grade them all in one batch."""
    rollout = engine.generate(
        prompts, group_size=k, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
        generator=generator,
    )
    eos = getattr(engine, "eos_token_ids", None) or [tokenizer.eos_token_id]
    texts = decode_rollout(rollout, tokenizer, eos)
    if len(texts) != len(problems) * k:
        raise R1KitError(f"engine returned {len(texts)} completions for {len(problems)} prompts x {k} samples")
    owners = [p for p in problems for _ in range(k)]  # row p*k + g answers problem p
    answers = [extract_for(t, p) for t, p in zip(texts, owners)]
    verdicts = grade_many(answers, owners, grade_timeout_s)
    lengths = rollout.lengths.tolist()
    truncated = rollout.truncated.tolist()
    return [
        SampleRecord(
            problem_id=owners[row].id, sample=row % k, completion=texts[row], answer=answers[row],
            correct=bool(verdicts[row].correct), reason=verdicts[row].reason, length=int(lengths[row]),
            truncated=bool(truncated[row]), well_formed=parse_completion(texts[row]).well_formed,
            reflection=has_reflection(texts[row]),
        )
        for row in range(len(texts))
    ]


# ----------------------------------------------------------------------------- checks and resume


def _settings(problems, k, temperature, top_p, max_new_tokens, template, seed, batch_prompts, pass_k, label) -> dict[str, Any]:
    """Validate the arguments; return the settings that decide which samples are drawn."""
    if not problems:
        raise R1KitError("evaluate_problems: no problems to evaluate")
    ids = [p.id for p in problems]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise R1KitError(f"evaluate_problems: problem ids must be unique; {dup!r} appears more than once")
    for name, value in (("k", k), ("batch_prompts", batch_prompts), ("max_new_tokens", max_new_tokens)):
        if not isinstance(value, int) or value < 1:
            raise R1KitError(f"evaluate_problems: {name} must be an int >= 1, got {value!r}")
    if not isinstance(seed, int) or seed < 0:
        raise R1KitError(f"evaluate_problems: seed must be an int >= 0, got {seed!r}")
    if not temperature >= 0 or not 0 < top_p <= 1:
        raise R1KitError(f"evaluate_problems: need temperature >= 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
    bad = [j for j in pass_k if not 1 <= j <= k]
    if bad:
        raise R1KitError(f"evaluate_problems: pass@k needs 1 <= k <= samples per problem (k={k}); got {bad}")
    if template != "chat":  # (the chat template is checked with the tokenizer, at the first prompt)
        render_prompt("", template)  # an unknown template fails here, before any generation
    return {
        "k": k, "temperature": float(temperature), "top_p": float(top_p), "max_new_tokens": max_new_tokens,
        "template": template, "seed": seed, "batch_prompts": batch_prompts, "label": label,
    }


def _check_lengths(engine, problems, prompts, max_new_tokens) -> None:
    """Fail before sampling anything when a prompt cannot fit in the model's context."""
    limit = getattr(engine, "max_positions", None)
    if limit is None:
        return
    too_long = [(len(ids), p.id) for ids, p in zip(prompts, problems) if len(ids) + max_new_tokens > limit]
    if too_long:
        n, pid = max(too_long)
        raise R1KitError(
            f"{len(too_long)} of {len(problems)} prompts do not fit the model's context ({limit} positions) with "
            f"max_new_tokens={max_new_tokens}; the longest is problem {pid!r} at {n} tokens. Lower max_new_tokens, "
            "use a model with a longer context, or evaluate other problems"
        )


def _resume(out: Path, settings: dict[str, Any], problems: Sequence[Problem], k: int) -> dict[str, list[SampleRecord]]:
    """Finished problems' records from out/samples.jsonl (if any), after checking the settings match.

    Rewrites samples.jsonl to hold only whole problems, so records of a problem cut off mid-write
    are never duplicated when its chunk is sampled again.
    """
    samples, config = out / SAMPLES_FILE, out / CONFIG_FILE
    if samples.exists():
        if not config.exists():
            raise R1KitError(f"{samples} exists but {config} does not: not an r1kit evaluation folder; use another out_dir")
        old = json.loads(config.read_text(encoding="utf-8"))
        diff = {key: (old.get(key), value) for key, value in settings.items() if old.get(key) != value}
        if diff:
            raise R1KitError(
                f"{out} holds samples drawn with other settings "
                + ", ".join(f"{key}: {a!r} there, {b!r} now" for key, (a, b) in diff.items())
                + "; use another out_dir or delete that folder"
            )
    atomic_write_json(config, settings)
    if not samples.exists():
        return {}
    by_id: dict[str, list[SampleRecord]] = {}
    for d in read_jsonl(samples):
        r = SampleRecord.from_dict(d)
        by_id.setdefault(r.problem_id, []).append(r)
    whole = {pid: sorted(recs, key=lambda r: r.sample) for pid, recs in by_id.items()
             if sorted(r.sample for r in recs) == list(range(k))}
    kept = [r for recs in whole.values() for r in recs]
    atomic_write_text(samples, "".join(json.dumps(r.to_dict(), ensure_ascii=False) + "\n" for r in kept))
    wanted = {p.id for p in problems}
    return {pid: recs for pid, recs in whole.items() if pid in wanted}
