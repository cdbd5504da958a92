"""The engine's sampler: one token per row by inverse CDF, with the logprob the trainer recomputes."""
from __future__ import annotations

import numpy as np
import torch


def sample_tokens(
    logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one token per row; return (tokens [B] long, logprobs [B] float32).

    logits: [B, V]. logprobs are log_softmax(logits / temperature) of the sampled token over the full
    distribution (top-p only restricts which tokens can be drawn). temperature == 0: greedy argmax with
    raw log_softmax(logits). Top-p keeps the smallest set of most likely tokens whose cumulative
    probability reaches top_p (always at least the top token; tokens tied with the last one kept are
    kept too).

    Sampling is by inverse CDF with one uniform draw per row from `generator`, so the result is a
    deterministic function of its state. (On CPU this is ~20x cheaper than torch.multinomial or an
    exponential race over [B, V] noise, which cost ~1 ms per step for 128 x 512.)
    """
    logits = logits.float()
    if temperature == 0:
        logp = torch.log_softmax(logits, dim=-1)  # [B, V]
        tokens = logits.argmax(dim=-1)  # [B]
        return tokens, logp.gather(1, tokens[:, None]).squeeze(1)
    logp = torch.log_softmax(logits / temperature if temperature != 1.0 else logits, dim=-1)  # [B, V]
    probs = logp.exp()
    if top_p < 1.0:
        # keep tokens with p >= threshold; float ops, because bool masks are ~10x slower on CPU here
        probs = probs * ((probs - _top_p_threshold(probs, top_p)).sign() + 1).clamp(max=1)
    cdf = probs.cumsum(dim=-1)  # [B, V] unnormalised
    total = cdf[:, -1:].contiguous()  # [B, 1]
    u = torch.rand(total.shape, generator=generator, device=generator.device if generator is not None else total.device)
    tokens = torch.searchsorted(cdf, u.to(total.device) * total, right=True)  # [B, 1]
    # u * total can round up to total: never step past the last token with non-zero probability.
    tokens = torch.minimum(tokens, torch.searchsorted(cdf, total)).squeeze(1)
    return tokens, logp.gather(1, tokens[:, None]).squeeze(1)


def _top_p_threshold(probs: torch.Tensor, top_p: float | torch.Tensor) -> torch.Tensor:
    """The probability of the least likely token in each row's nucleus: [B, V] -> [B, 1].

    Only the sorted values are needed, not the permutation; on CPU numpy sorts them ~50x faster than
    torch.sort (3 ms for 128 x 512 on this machine, more than the whole model step).
    """
    if probs.device.type == "cpu":
        desc = torch.from_numpy(np.ascontiguousarray(np.sort(probs.numpy(), axis=-1)[:, ::-1]))
    else:
        desc = probs.sort(dim=-1, descending=True).values  # [B, V]
    # The nucleus is the top n tokens, n = 1 + #(prefix sums < top_p) (the token that crosses top_p is in).
    if isinstance(top_p, torch.Tensor):  # [B, 1] per row
        below = top_p.to(device=desc.device, dtype=desc.dtype).contiguous()
    else:
        below = torch.full((desc.shape[0], 1), top_p, dtype=desc.dtype, device=desc.device)
    n_keep = (torch.searchsorted(desc.cumsum(dim=-1), below) + 1).clamp(max=desc.shape[1])  # [B, 1]
    return desc.gather(1, n_keep - 1)


def sample_rows(
    logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor, u: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """`sample_tokens` with per-row settings and pre-drawn uniforms: -> (tokens [B] long, logprobs [B]).

    logits [B, V]; temperature, top_p [B] (temperature 0: greedy, its u unused); u [B] in [0, 1), row i's
    draw from its request's generator. Row by row it is the same computation as sample_tokens given the
    same draw, in one pass over the batch instead of one per request (requests with their own seeds).
    """
    logits = logits.float()
    greedy = temperature == 0  # [B]
    scaled = logits / torch.where(greedy, 1.0, temperature).to(logits.dtype)[:, None]  # x / 1.0 is exact
    logp = torch.log_softmax(scaled, dim=-1)  # [B, V]
    probs = logp.exp()
    nucleus = top_p < 1.0  # [B]
    if bool(nucleus.any()):
        threshold = torch.where(nucleus[:, None], _top_p_threshold(probs, top_p[:, None].to(probs.dtype)), 0.0)
        probs = probs * ((probs - threshold).sign() + 1).clamp(max=1)
    cdf = probs.cumsum(dim=-1)  # [B, V] unnormalised
    total = cdf[:, -1:].contiguous()  # [B, 1]
    tokens = torch.searchsorted(cdf, u.to(total)[:, None] * total, right=True)
    tokens = torch.minimum(tokens, torch.searchsorted(cdf, total)).squeeze(1)
    tokens = torch.where(greedy, logits.argmax(dim=-1), tokens)
    return tokens, logp.gather(1, tokens[:, None]).squeeze(1)
