"""The one generation path of r1kit: token ids in, sampled completions (ids, masks, logprobs) out.

Used by RL rollouts, evaluation, `r1kit generate` and serving. Per `Engine.generate` call:
1. left-pad the P prompts and prefill each unique prompt ONCE; its G samples (rows p*G+g) share that
   prefill (TRL and HF `generate(num_return_sequences=G)` prefill every copy);
2. decode step by step from a KV cache; rows that emitted EOS are dropped from the batch and the cache
   (compaction), so finished rows stop costing compute (TRL decodes them on: 17-31% padding, NOTES.md);
3. return a `Rollout` with the sampler's per-token logprobs:
       logprob_t = log_softmax(logits_t / temperature)[token_t]
   over the FULL temperature-scaled distribution (before top-p), which is what the trainer recomputes,
   so the importance ratio is 1 on-policy. temperature == 0 is greedy, with raw log_softmax(logits_t).

Two backends share one interface (prefill / decode / keep_rows / release):
- `FastLlama` (r1kit/engine/fast_llama.py): a pure-torch forward for Llama-family models (llama, qwen2, mistral: RMSNorm, default
  RoPE, GQA, SiLU-gated MLP, optional biases, tied or untied lm_head) that reads the HF module's
  parameters in place (no copies: optimizer updates are seen at once), with pre-allocated caches in a
  shared-prefix layout (the prompt's K/V stored and read once per group). Where Python and HF per-step
  overhead dominate (tiny models, CPU) it is several times faster than `model.generate()`.
- `_HFBackend`: the model's own forward with a `DynamicCache`, for every other architecture and for
  Llama-family configs with features the fast path lacks (rope scaling, a sliding window shorter than
  the sequence, q/k norms, ...): we fall back rather than be silently wrong (`Engine.fallback_reason`).

Speed: `python benchmarks/bench_engine.py` (results in benchmarks/results/engine.json).
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from r1kit.engine.fast_llama import FastLlama, fast_path_problem
from r1kit.types import R1KitError, Rollout


@dataclass
class EngineStats:
    """Counters accumulated over an Engine's lifetime (call `reset()` to zero them)."""

    prefill_calls: int = 0  # forward passes over prompts
    prefill_tokens: int = 0  # prompt positions pushed through prefill: P * Tp, not P * G * Tp
    decode_steps: int = 0  # single-token forward passes
    decode_tokens: int = 0  # rows summed over decode steps (what compaction keeps small)
    compactions: int = 0  # times finished rows were dropped from the batch and cache
    generated_tokens: int = 0  # completion tokens returned (mask sum)

    def reset(self) -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, 0)


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


def _top_p_threshold(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """The probability of the least likely token in each row's nucleus: [B, V] -> [B, 1].

    Only the sorted values are needed, not the permutation; on CPU numpy sorts them ~50x faster than
    torch.sort (3 ms for 128 x 512 on this machine, more than the whole model step).
    """
    if probs.device.type == "cpu":
        desc = torch.from_numpy(np.ascontiguousarray(np.sort(probs.numpy(), axis=-1)[:, ::-1]))
    else:
        desc = probs.sort(dim=-1, descending=True).values  # [B, V]
    # The nucleus is the top n tokens, n = 1 + #(prefix sums < top_p) (the token that crosses top_p is in).
    below = torch.full((desc.shape[0], 1), top_p, dtype=desc.dtype, device=desc.device)
    n_keep = (torch.searchsorted(desc.cumsum(dim=-1), below) + 1).clamp(max=desc.shape[1])  # [B, 1]
    return desc.gather(1, n_keep - 1)


class _HFBackend:
    """The model's own forward with a DynamicCache: correct for any causal LM that takes position_ids."""

    def __init__(self, model: nn.Module):
        self.model = model

    def prefill(self, ids: torch.Tensor, mask: torch.Tensor, group_size: int, max_new: int) -> torch.Tensor:
        pos = (mask.cumsum(-1) - 1).clamp(min=0)  # [P, Tp]
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
        self.cache = out.past_key_values
        self.cache.batch_repeat_interleave(group_size)  # G rows per prompt, prefilled once
        P, Tp = ids.shape
        self.attn = torch.ones(P * group_size, Tp + max_new, dtype=mask.dtype, device=mask.device)
        self.attn[:, :Tp] = mask.repeat_interleave(group_size, 0)  # [N, Tp + max_new]
        self.length = Tp
        return out.logits[:, -1]

    def decode(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        out = self.model(
            input_ids=tokens[:, None],
            attention_mask=self.attn[:, : self.length + 1],
            position_ids=positions[:, None],
            past_key_values=self.cache,
            use_cache=True,
        )
        self.length += 1
        return out.logits[:, -1]

    def keep_rows(self, keep: torch.Tensor) -> None:
        self.cache.batch_select_indices(keep)
        self.attn = self.attn[keep]

    def release(self) -> None:
        self.cache = self.attn = None


def _token_ids(name: str, ids, vocab: int) -> list[int]:
    """Validate special token ids (ints, numpy or 0-d torch integers) -> list[int] in [0, vocab)."""
    try:
        ids = [operator.index(t) for t in ids]
    except TypeError:
        raise R1KitError(f"Engine: {name} must be integer token ids, got {ids!r}") from None
    bad = [t for t in ids if not 0 <= t < vocab]
    if bad:
        raise R1KitError(f"Engine: {name} {bad} are outside the model's vocabulary [0, {vocab})")
    return ids


def _max_positions(config) -> int | None:
    for name in ("max_position_embeddings", "n_positions", "max_seq_len"):
        if isinstance(getattr(config, name, None), int):
            return getattr(config, name)
    return None


class Engine:
    """Batched sampler over a causal LM: see the module docstring.

    eos_token_ids: tokens that end a completion (kept in it, mask 1); an empty list never stops early.
    fast_path: None picks the fast Llama-family forward when the model supports it; False forces the
        HF forward; True raises if the model cannot use the fast path.
    compact_fraction: finished rows are dropped from the batch once they are at least this fraction of
        it. Compaction copies the surviving rows' cache, so doing it for every single finished row costs
        more than it saves; 0 compacts whenever any row finishes.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        eos_token_ids: list[int],
        pad_token_id: int,
        fast_path: bool | None = None,
        compact_fraction: float = 0.125,
    ):
        vocab = model.get_input_embeddings().weight.shape[0]
        eos_token_ids = _token_ids("eos_token_ids", eos_token_ids, vocab)
        pad_token_id = _token_ids("pad_token_id", [pad_token_id], vocab)[0]
        if not 0.0 <= compact_fraction <= 1.0:
            raise ValueError(f"compact_fraction must be in [0, 1], got {compact_fraction}")
        self.model, self.vocab_size, self.compact_fraction = model, vocab, compact_fraction
        self.eos_token_ids, self.pad_token_id = eos_token_ids, pad_token_id
        self.fallback_reason = fast_path_problem(model) if fast_path is not False else "fast_path=False"
        if fast_path and self.fallback_reason:
            raise R1KitError(f"Engine: fast_path=True but this model cannot use it: {self.fallback_reason}")
        self._fast = FastLlama(model) if self.fallback_reason is None else None
        self._hf = _HFBackend(model)
        self.max_positions = _max_positions(model.config)
        self.stats = EngineStats()
        self.last_backend = ""  # "fast" or "hf": which forward the last generate() used

    @torch.no_grad()
    def generate(
        self,
        prompts: list[list[int]],
        *,
        group_size: int = 1,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> Rollout:
        """Sample `group_size` completions for each prompt; rows are prompt-major (row p*G + g).

        prompts: P unpadded token-id lists. Returns a Rollout with prompt_ids/mask [N, Tp] (left-padded),
        completion_ids/mask and logprobs [N, Tc] (Tc = longest completion generated) and truncated [N].
        """
        self._check_args(prompts, group_size, max_new_tokens, temperature, top_p)
        ids, mask = self._left_pad(prompts)  # [P, Tp]
        backend = self._pick_backend(ids.shape[1] + max_new_tokens)
        was_training = self.model.training
        self.model.eval()  # dropout off while sampling; restored below
        try:
            with torch.inference_mode():
                tokens, logprobs, lengths, stopped = self._sample(
                    backend, ids, mask, group_size, max_new_tokens, temperature, top_p, generator
                )
        finally:
            backend.release()
            self.model.train(was_training)
        # Built outside inference mode, so the trainer can feed them to autograd.
        return self._rollout(ids, mask, group_size, tokens, logprobs, lengths, stopped)

    # -- the decode loop ------------------------------------------------------------------------------

    def _sample(self, backend, ids, mask, G, max_new, temperature, top_p, generator):
        """Prefill once per prompt, then decode until every row hit EOS or max_new tokens.

        Returns tokens [N, max_new], logprobs [N, max_new] (valid up to lengths), lengths [N], stopped [N].
        Row bookkeeping: `rows` [B] maps the active batch to output rows; a row stays in the batch after
        its EOS until the next compaction, but its extra tokens fall beyond its length and are masked.
        """
        P, Tp = ids.shape
        N, dev = P * G, ids.device
        logits = backend.prefill(ids, mask, G, max_new).repeat_interleave(G, 0)  # [N, V]
        self.stats.prefill_calls += 1
        self.stats.prefill_tokens += P * Tp
        out_tokens = torch.full((N, max_new), self.pad_token_id, dtype=torch.long, device=dev)
        out_logprobs = torch.zeros(N, max_new, dtype=torch.float32, device=dev)
        lengths = torch.full((N,), max_new, dtype=torch.long, device=dev)
        stopped = torch.zeros(N, dtype=torch.bool, device=dev)
        eos = torch.tensor(self.eos_token_ids, dtype=torch.long, device=dev)
        rows = torch.arange(N, device=dev)  # [B] output row of each active row
        positions = mask.sum(-1).repeat_interleave(G)  # [B] position of the next token (real length)
        done = torch.zeros(N, dtype=torch.bool, device=dev)  # [B] active rows that already hit EOS
        for t in range(max_new):
            tok, lp = sample_tokens(logits, temperature, top_p, generator)  # [B]
            out_tokens[rows, t], out_logprobs[rows, t] = tok, lp
            hit = torch.isin(tok, eos) & ~done  # [B] first EOS of a row
            if bool(hit.any()):
                lengths[rows[hit]], stopped[rows[hit]] = t + 1, True
                done |= hit
                n_done = int(done.sum())
                if n_done == done.numel():
                    break
                if n_done >= max(1.0, self.compact_fraction * done.numel()):
                    keep = (~done).nonzero().squeeze(1)  # [b] ascending
                    backend.keep_rows(keep)
                    rows, positions, tok, done = rows[keep], positions[keep], tok[keep], done[keep]
                    self.stats.compactions += 1
            if t == max_new - 1:
                break  # the last sampled token is never fed back
            logits = backend.decode(tok, positions)  # [B, V]
            positions = positions + 1
            self.stats.decode_steps += 1
            self.stats.decode_tokens += tok.numel()
        return out_tokens, out_logprobs, lengths, stopped

    def _rollout(self, ids, mask, G, tokens, logprobs, lengths, stopped) -> Rollout:
        Tc = int(lengths.max())
        completion_mask = torch.arange(Tc, device=ids.device)[None, :] < lengths[:, None]  # [N, Tc]
        self.stats.generated_tokens += int(lengths.sum())
        return Rollout(
            prompt_ids=ids.repeat_interleave(G, 0),
            prompt_mask=mask.repeat_interleave(G, 0),
            completion_ids=torch.where(completion_mask, tokens[:, :Tc], self.pad_token_id),
            completion_mask=completion_mask.float(),
            logprobs=torch.where(completion_mask, logprobs[:, :Tc], 0.0),
            truncated=~stopped,
            group_size=G,
        )

    # -- inputs ---------------------------------------------------------------------------------------

    def _pick_backend(self, total_len: int):
        reason = self._fast.supports_length(total_len) if self._fast is not None else "no fast path"
        self.last_backend = "fast" if reason is None else "hf"
        return self._fast if reason is None else self._hf

    def _check_args(self, prompts, group_size, max_new_tokens, temperature, top_p) -> None:
        if not isinstance(prompts, (list, tuple)) or len(prompts) == 0:
            raise R1KitError("Engine.generate: `prompts` is empty; pass at least one list of token ids")
        for i, p in enumerate(prompts):
            if len(p) == 0:
                raise R1KitError(f"Engine.generate: prompt {i} is empty (a prompt needs at least one token)")
            if min(p) < 0 or max(p) >= self.vocab_size:
                raise R1KitError(f"Engine.generate: prompt {i} has token ids outside [0, {self.vocab_size})")
        for name, value in (("group_size", group_size), ("max_new_tokens", max_new_tokens)):
            if not isinstance(value, int) or value < 1:
                raise R1KitError(f"Engine.generate: {name} must be an int >= 1, got {value!r}")
        if not temperature >= 0:
            raise R1KitError(f"Engine.generate: temperature must be >= 0 (0 = greedy), got {temperature}")
        if not 0 < top_p <= 1:
            raise R1KitError(f"Engine.generate: top_p must be in (0, 1], got {top_p}")
        longest = max(len(p) for p in prompts)
        if self.max_positions is not None and longest + max_new_tokens > self.max_positions:
            raise R1KitError(
                f"Engine.generate: longest prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) = "
                f"{longest + max_new_tokens} exceeds the model's max_position_embeddings ({self.max_positions})"
            )

    def _left_pad(self, prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """-> ids [P, Tp] left-padded with pad_token_id, mask [P, Tp] long (1 on real tokens)."""
        dev = self.model.get_input_embeddings().weight.device
        Tp = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), Tp), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros(len(prompts), Tp, dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, Tp - len(p) :] = torch.as_tensor(p, dtype=torch.long)
            mask[i, Tp - len(p) :] = 1
        return ids.to(dev), mask.to(dev)
