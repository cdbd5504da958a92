"""Validation of the engine's construction inputs: special token ids, the model's context length and the
sampling dtype (`engine.dtype`)."""
from __future__ import annotations

import operator

import torch

from r1kit.types import R1KitError

# engine.dtype values -> the dtype the engine samples in (None: the model's own, whatever it is)
ENGINE_DTYPES: dict[str, torch.dtype | None] = {"auto": None, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
                                                 "fp32": torch.float32, "float32": torch.float32}


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


def engine_dtype(value, model_dtype: torch.dtype) -> torch.dtype:
    """`engine.dtype` (a name of ENGINE_DTYPES, a torch.dtype or None = "auto") -> the dtype to sample in,
    `model_dtype` for "auto"; anything else is an R1KitError naming the option."""
    if value is None or (isinstance(value, torch.dtype) and value.is_floating_point):
        dtype = value
    elif isinstance(value, str) and value in ENGINE_DTYPES:
        dtype = ENGINE_DTYPES[value]
    else:
        raise R1KitError(f"engine.dtype={value!r} is unknown; expected one of {list(ENGINE_DTYPES)}")
    return model_dtype if dtype is None else dtype
