"""Validation of the engine's construction inputs: special token ids and the model's context length."""
from __future__ import annotations

import operator

from r1kit.types import R1KitError


def token_ids(name: str, ids, vocab: int) -> list[int]:
    """Validate special token ids (ints, numpy or 0-d torch integers) -> list[int] in [0, vocab)."""
    try:
        ids = [operator.index(t) for t in ids]
    except TypeError:
        raise R1KitError(f"Engine: {name} must be integer token ids, got {ids!r}") from None
    bad = [t for t in ids if not 0 <= t < vocab]
    if bad:
        raise R1KitError(f"Engine: {name} {bad} are outside the model's vocabulary [0, {vocab})")
    return ids


def max_positions(config) -> int | None:
    """The model's context length from whichever config field its architecture uses (None if unknown)."""
    for name in ("max_position_embeddings", "n_positions", "max_seq_len"):
        if isinstance(getattr(config, name, None), int):
            return getattr(config, name)
    return None
