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
                 rng: random.Random, *, zh_frac: float = 0.0, mix_frac: float = 0.0) -> list[CorpusDoc]:
    """`n_docs` documents of training problems only (never held-out ones).

    zh_frac / mix_frac (the R1 recipe's language-mixing material, both 0 by default = the original
    corpus): when either is positive, worked and reflect solutions get step words, in Chinese with
    probability zh_frac, code-switched (en-zh or zh-en) with probability mix_frac, else in English."""
    if not hasattr(task, "completion"):
        raise R1KitError(f"task {task.name!r} cannot write a pretraining corpus (it has no completion styles)")
    if n_docs <= 0:
        raise R1KitError(f"pretrain.corpus_docs must be positive, got {n_docs}")
    if zh_frac or mix_frac:
        return _build_bilingual(task, n_docs, direct_frac, reflect_frac, template, rng, zh_frac, mix_frac)
    weights = style_weights(direct_frac, reflect_frac)
    styles = rng.choices(list(weights), weights=list(weights.values()), k=n_docs)
    problems: list[Problem] = task.train_problems(n_docs, rng)
    return [CorpusDoc(render_prompt(p.question, template), task.completion(p, s), s) for p, s in zip(problems, styles)]


def _build_bilingual(task, n_docs: int, direct_frac: float, reflect_frac: float, template: str,
                     rng: random.Random, zh_frac: float, mix_frac: float) -> list[CorpusDoc]:
    if not (0 <= zh_frac <= 1 and 0 <= mix_frac <= 1 and zh_frac + mix_frac <= 1):
        raise R1KitError(f"corpus zh_frac={zh_frac} and mix_frac={mix_frac}: each in [0, 1], sum at most 1")
    weights = style_weights(direct_frac, reflect_frac)
    # The same style and problem draws as the monolingual corpus; languages are drawn afterwards.
    styles = rng.choices(list(weights), weights=list(weights.values()), k=n_docs)
    problems: list[Problem] = task.train_problems(n_docs, rng)
    docs = []
    for p, s in zip(problems, styles):
        lang = ""
        if s != "direct":
            u = rng.random()
            lang = "zh" if u < zh_frac else rng.choice(["en-zh", "zh-en"]) if u < zh_frac + mix_frac else "en"
        try:
            text = task.completion(p, s, lang=lang) if lang else task.completion(p, s)
        except TypeError:
            raise R1KitError(f"task {task.name!r} cannot write its solutions in another language (no lang option)") from None
        docs.append(CorpusDoc(render_prompt(p.question, template), text, s))
    return docs

