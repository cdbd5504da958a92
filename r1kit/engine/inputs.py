"""Validation of the engines' inputs (the local engine's and vLLM's alike): special token ids, the model's
context length, the sampling dtype (`engine.dtype`), prompts and generate()'s arguments; and left padding."""
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


def check_prompt(what: str, prompt, vocab: int) -> list[int]:
    """A prompt as a list of ints in [0, vocab), or an R1KitError starting with `what`."""
    try:
        prompt = [operator.index(t) for t in prompt]
    except TypeError:
        raise R1KitError(f"{what} must be a list of integer token ids") from None
    if len(prompt) == 0:
        raise R1KitError(f"{what} is empty (a prompt needs at least one token)")
    if min(prompt) < 0 or max(prompt) >= vocab:
        raise R1KitError(f"{what} has token ids outside [0, {vocab})")
    return prompt


def check_generate_args(who: str, prompts, group_size, max_new_tokens, temperature, top_p, vocab: int,
                        max_positions: int | None) -> None:
    """generate()'s arguments, each error naming `who` (e.g. "Engine.generate") and the argument at fault."""
    if not isinstance(prompts, (list, tuple)) or len(prompts) == 0:
        raise R1KitError(f"{who}: `prompts` is empty; pass at least one list of token ids")
    for i, p in enumerate(prompts):
        check_prompt(f"{who}: prompt {i}", p, vocab)
    for name, value in (("group_size", group_size), ("max_new_tokens", max_new_tokens)):
        if not isinstance(value, int) or value < 1:
            raise R1KitError(f"{who}: {name} must be an int >= 1, got {value!r}")
    if not temperature >= 0:
        raise R1KitError(f"{who}: temperature must be >= 0 (0 = greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise R1KitError(f"{who}: top_p must be in (0, 1], got {top_p}")
    longest = max(len(p) for p in prompts)
    if max_positions is not None and longest + max_new_tokens > max_positions:
        raise R1KitError(f"{who}: longest prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) = "
                         f"{longest + max_new_tokens} exceeds the model's max_position_embeddings ({max_positions})")


def left_pad(prompts: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """-> ids [P, Tp] left-padded with pad_id, mask [P, Tp] long (1 on real tokens), on `device`."""
    Tp = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), Tp), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), Tp, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, Tp - len(p):] = torch.as_tensor(p, dtype=torch.long)
        mask[i, Tp - len(p):] = 1
    return ids.to(device), mask.to(device)
