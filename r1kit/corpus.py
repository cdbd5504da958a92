"""The synthetic pretraining corpus of the tiny base model (stage 0 of R1-Zero at tiny scale).

Documents are full R1-Zero conversations (template + completion + EOS) in three styles drawn from the
task (`direct`, `worked`, `reflect`): the raw material RL later elicits. The mixture is chosen so that
the base model *prefers* the short, systematically wrong direct answer; see ../shared/NOTES.md for why
the direct answers must be wrong in a way that cannot be averaged out.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from r1kit.templates import render_prompt
from r1kit.types import Problem, R1KitError

STYLES = ("direct", "worked", "reflect")


@dataclass(frozen=True)
class CorpusDoc:
    prompt: str
    completion: str
    style: str


def style_weights(direct_frac: float, reflect_frac: float) -> dict[str, float]:
    if not (0 <= direct_frac <= 1 and 0 <= reflect_frac <= 1 and direct_frac + reflect_frac <= 1):
        raise R1KitError(
            f"pretrain.direct_frac={direct_frac} and pretrain.reflect_frac={reflect_frac}: "
            "each must be in [0, 1] and their sum at most 1"
        )
    return {"direct": direct_frac, "worked": 1 - direct_frac - reflect_frac, "reflect": reflect_frac}


def build_corpus(task, n_docs: int, direct_frac: float, reflect_frac: float, template: str,
                 rng: random.Random) -> list[CorpusDoc]:
    """`n_docs` documents of training problems only (never held-out ones)."""
    if not hasattr(task, "completion"):
        raise R1KitError(f"task {task.name!r} cannot write a pretraining corpus (it has no completion styles)")
    if n_docs <= 0:
        raise R1KitError(f"pretrain.corpus_docs must be positive, got {n_docs}")
    weights = style_weights(direct_frac, reflect_frac)
    styles = rng.choices(list(weights), weights=list(weights.values()), k=n_docs)
    problems: list[Problem] = task.train_problems(n_docs, rng)
    return [CorpusDoc(render_prompt(p.question, template), task.completion(p, s), s) for p, s in zip(problems, styles)]
