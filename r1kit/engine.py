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
- `_FastLlama`: a pure-torch forward for Llama-family models (llama, qwen2, mistral: RMSNorm, default
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
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from r1kit.types import R1KitError, Rollout

FAST_MODEL_TYPES = ("llama", "qwen2", "mistral")
_ATTN_CHILDREN = {"q_proj", "k_proj", "v_proj", "o_proj"}
_MLP_CHILDREN = {"gate_proj", "up_proj", "down_proj", "act_fn"}


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


def _rope_parameters(config) -> dict:
    """RoPE settings as transformers 5 stores them (`config.rope_parameters`), or from 4.x fields."""
    params = getattr(config, "rope_parameters", None)
    if params is None:  # transformers 4.x: rope_theta + rope_scaling
        params = dict(getattr(config, "rope_scaling", None) or {})
        params.setdefault("rope_type", params.get("type", "default"))
        params["rope_theta"] = getattr(config, "rope_theta", 10000.0)
    return dict(params)


def fast_path_problem(model: nn.Module) -> str | None:
    """Why `model` cannot use the fast Llama-family forward, or None if it can.

    Checks both the config (type, activation, RoPE variant) and the module tree (the exact set of
    sub-modules), so a variant with e.g. q/k norms or a custom Linear is sent to the HF forward.
    """
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in FAST_MODEL_TYPES:
        return f"model_type {model_type!r} is not one of {FAST_MODEL_TYPES}"
    if getattr(config, "hidden_act", None) not in ("silu", "swish"):
        return f"hidden_act {config.hidden_act!r} is not silu"
    rope = _rope_parameters(config)
    if rope.get("rope_type", "default") != "default" or "rope_theta" not in rope:
        return f"rope parameters {rope} are not the default RoPE"
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        return f"partial_rotary_factor {rope['partial_rotary_factor']} is not 1"
    base = getattr(model, "model", None)
    if base is None or not all(hasattr(base, n) for n in ("embed_tokens", "layers", "norm")):
        return "module tree is not model.{embed_tokens, layers, norm}"
    if type(model.get_output_embeddings()) is not nn.Linear:
        return "lm_head is not an nn.Linear"
    for i, layer in enumerate(base.layers[: config.num_hidden_layers]):
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        if attn is None or {n for n, _ in attn.named_children()} != _ATTN_CHILDREN:
            return f"layer {i} attention has sub-modules other than {sorted(_ATTN_CHILDREN)}"
        if mlp is None or {n for n, _ in mlp.named_children()} != _MLP_CHILDREN:
            return f"layer {i} MLP has sub-modules other than {sorted(_MLP_CHILDREN)}"
        projections = [getattr(attn, n) for n in _ATTN_CHILDREN] + [mlp.gate_proj, mlp.up_proj, mlp.down_proj]
        if any(type(p) is not nn.Linear for p in projections):
            return f"layer {i} has projections that are not plain nn.Linear (quantized or custom layers)"
    return None


def _sliding_window(config) -> int | None:
    """The attention window that applies to some layer, or None if every layer attends fully."""
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if window is None or (layer_types is not None and "sliding_attention" not in layer_types):
        return None
    if getattr(config, "model_type", None) == "qwen2" and not getattr(config, "use_sliding_window", False):
        return None
    return int(window)


# The tensors one decoder layer's fast forward reads, by the name the forward uses for them.
_LAYER_TENSORS = dict(
    in_norm="input_layernorm.weight", post_norm="post_attention_layernorm.weight",
    wq="self_attn.q_proj.weight", bq="self_attn.q_proj.bias", wk="self_attn.k_proj.weight",
    bk="self_attn.k_proj.bias", wv="self_attn.v_proj.weight", bv="self_attn.v_proj.bias",
    wo="self_attn.o_proj.weight", bo="self_attn.o_proj.bias", w_gate="mlp.gate_proj.weight",
    b_gate="mlp.gate_proj.bias", w_up="mlp.up_proj.weight", b_up="mlp.up_proj.bias",
    w_down="mlp.down_proj.weight", b_down="mlp.down_proj.bias",
)


def _eps(norm: nn.Module) -> float:
    eps = getattr(norm, "variance_epsilon", None)
    return float(eps if eps is not None else getattr(norm, "eps", 1e-6))


def _layer_tensors(layer: nn.Module) -> SimpleNamespace:
    """References (not copies) to a layer's parameters, looked up once per generate(): nn.Module
    attribute lookups cost ~1 us each, and the decode loop would do ~40 per layer and step."""
    w = SimpleNamespace(**{name: operator.attrgetter(path)(layer) for name, path in _LAYER_TENSORS.items()})
    w.in_eps, w.post_eps = _eps(layer.input_layernorm), _eps(layer.post_attention_layernorm)
    return w


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm as HF Llama computes it: statistics in float32, weight applied in the input dtype."""
    if x.dtype == torch.float32:  # the same maths without two no-op casts (per-op cost dominates here)
        return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """RoPE in HF's half-split layout. x: [..., D]; cos, sin_signed broadcast to it.

    HF computes x*cos + rotate_half(x)*sin with rotate_half(x) = [-x2, x1]. Since [-x2, x1] * [s, s]
    = [x2, x1] * [-s, s], a roll and a pre-signed sin table give the same bits in half the ops.
    """
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin_signed


def _mlp(w: SimpleNamespace, h: torch.Tensor) -> torch.Tensor:
    """SiLU-gated MLP: down(silu(gate(h)) * up(h)). h: [..., H] -> [..., H]."""
    gate = F.silu(F.linear(h, w.w_gate, w.b_gate))
    return F.linear(gate * F.linear(h, w.w_up, w.b_up), w.w_down, w.b_down)


class _FastLlama:
    """Functional Llama-family forward over the HF module's own weights, with pre-allocated KV caches.

    The G rows of a prompt share its prefix, so the cache is split in two (a "shared-prefix" layout):
    - prompt cache [L, 2 (k/v), P, Hkv, Tp, D]: written once by the prefill, stored once per prompt;
    - generation cache [L, 2, N, Hkv, max_new, D]: one row per active sample, column t at decode step t.
    At decode time the G rows of a prompt attend to its prompt keys in one batched matmul, so the prompt
    part of the cache is read once per prompt and step instead of G times (decode attention on CPU is
    bound by reading the cache), and G times less memory holds it.

    Active rows are the leading `batch` rows of the generation cache; `row_prompt` [B] and `row_g` [B]
    place each one in the [prompt, G] grid used for the shared-prefix matmul.
    """

    def __init__(self, model: nn.Module):
        self.model, self.config = model, model.config
        attn = model.model.layers[0].self_attn
        self.head_dim = attn.head_dim
        self.n_heads = attn.q_proj.out_features // self.head_dim
        self.n_kv = attn.k_proj.out_features // self.head_dim
        self.scale = getattr(attn, "scaling", self.head_dim**-0.5)
        self.window = _sliding_window(self.config)
        self._rope_len = 0

    def supports_length(self, total: int) -> str | None:
        if self.window is not None and total > self.window:
            return f"sequence length {total} exceeds the sliding window {self.window}"
        return None

    def _rope_table(self, n: int, device: torch.device, dtype: torch.dtype) -> None:
        """cos and signed sin [n, D] for positions 0..n-1, computed exactly as the HF forward does.

        The inverse frequencies come from the model's own `rotary_emb.inv_freq` buffer when it has one
        (it is derived from config.rope_parameters["rope_theta"], but `model.to(bfloat16)` rounds it, and
        the trainer's HF forward uses the rounded values), else from the config's rope_theta.
        """
        if self._rope_len >= n and self._cos.dtype == dtype and self._cos.device == device:
            return
        rotary, d = getattr(self.model.model, "rotary_emb", None), self.head_dim
        inv_freq = getattr(rotary, "inv_freq", None)
        if inv_freq is None:
            theta = float(_rope_parameters(self.config)["rope_theta"])
            inv_freq = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.int64, device=device).float() / d))
        freqs = torch.arange(n, device=device).float()[:, None] * inv_freq.to(device).float()[None, :]  # [n, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [n, D]
        scaling = float(getattr(rotary, "attention_scaling", 1.0))
        cos, sin = emb.cos() * scaling, emb.sin() * scaling
        sin[:, : d // 2].neg_()  # pre-signed for _rotate
        self._cos, self._sin, self._rope_len = cos.to(dtype), sin.to(dtype), n

    def prefill(self, ids: torch.Tensor, mask: torch.Tensor, group_size: int, max_new: int) -> torch.Tensor:
        """Run the P left-padded prompts once and fill the prompt cache; return last logits [P, V].

        ids, mask: [P, Tp]. Position ids count real tokens only, so a left-padded prompt sees the same
        positions as the unpadded one.
        """
        (P, Tp), G, D = ids.shape, group_size, self.head_dim
        m = self.model
        self.layers = [_layer_tensors(layer) for layer in m.model.layers[: self.config.num_hidden_layers]]
        self.embed, self.final_norm, head = m.get_input_embeddings().weight, m.model.norm, m.get_output_embeddings()
        self.head_w, self.head_b, self.final_eps = head.weight, head.bias, _eps(self.final_norm)
        dev, dtype, L = self.embed.device, self.embed.dtype, len(self.layers)
        self._rope_table(Tp + max_new, dev, dtype)
        self.pkv = torch.empty(L, 2, P, self.n_kv, Tp, D, device=dev, dtype=dtype)
        self.gkv = torch.empty(L, 2, P * G, self.n_kv, max_new, D, device=dev, dtype=dtype)
        valid = mask.bool()  # [P, Tp]
        self.pbias = torch.zeros(P, Tp, device=dev, dtype=dtype).masked_fill_(~valid, float("-inf"))
        self.row_prompt = torch.arange(P, device=dev).repeat_interleave(G)  # [N]
        self.row_g = torch.arange(G, device=dev).repeat(P)  # [N]
        self.n_prompts, self.group, self.batch, self.t = P, G, P * G, 0

        pos = (mask.cumsum(-1) - 1).clamp(min=0)  # [P, Tp]
        cos, sin = self._cos[pos][:, None], self._sin[pos][:, None]  # [P, 1, Tp, D]
        causal = torch.ones(Tp, Tp, dtype=torch.bool, device=dev).tril()
        # Padding queries attend to themselves: a fully masked row would give NaN that leaks into the
        # padding keys' values (0 * NaN), even though real tokens never attend to them.
        allowed = causal & (valid[:, None, None, :] | torch.eye(Tp, dtype=torch.bool, device=dev))  # [P,1,Tp,Tp]
        x = F.embedding(ids, self.embed)  # [P, Tp, H]
        for li, w in enumerate(self.layers):
            h = _rms_norm(x, w.in_norm, w.in_eps)
            q = _rotate(F.linear(h, w.wq, w.bq).view(P, Tp, -1, D).transpose(1, 2), cos, sin)  # [P, Hq, Tp, D]
            k = _rotate(F.linear(h, w.wk, w.bk).view(P, Tp, -1, D).transpose(1, 2), cos, sin)  # [P, Hkv, Tp, D]
            v = F.linear(h, w.wv, w.bv).view(P, Tp, -1, D).transpose(1, 2)
            self.pkv[li, 0], self.pkv[li, 1] = k, v
            o = F.scaled_dot_product_attention(
                q, k, v, attn_mask=allowed, scale=self.scale, enable_gqa=self.n_kv != self.n_heads
            )  # [P, Hq, Tp, D]
            x = x + F.linear(o.transpose(1, 2).reshape(P, Tp, -1), w.wo, w.bo)
            x = x + _mlp(w, _rms_norm(x, w.post_norm, w.post_eps))
        return self._logits(x[:, -1])

    def decode(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Feed one token per active row; return logits [B, V]. tokens, positions: [B].

        Works on [B, H] rows (no time axis) to keep the per-step op count, which dominates at tiny
        model sizes, low.
        """
        B, t, D = self.batch, self.t, self.head_dim
        x = F.embedding(tokens, self.embed)  # [B, H]
        cos, sin = self._cos[positions][:, None], self._sin[positions][:, None]  # [B, 1, D]
        new_kv = self.gkv[:, :, :B, :, t]  # [L, 2, B, Hkv, D]: this step's cache column
        for li, w in enumerate(self.layers):
            h = _rms_norm(x, w.in_norm, w.in_eps)
            q = _rotate(F.linear(h, w.wq, w.bq).view(B, -1, D), cos, sin)  # [B, Hq, D]
            new_kv[li, 0] = _rotate(F.linear(h, w.wk, w.bk).view(B, -1, D), cos, sin)  # [B, Hkv, D]
            new_kv[li, 1] = F.linear(h, w.wv, w.bv).view(B, -1, D)
            x = x + F.linear(self._decode_attention(li, q), w.wo, w.bo)
            x = x + _mlp(w, _rms_norm(x, w.post_norm, w.post_eps))
        self.t = t + 1
        return self._logits(x)

    def keep_rows(self, keep: torch.Tensor) -> None:
        """Drop finished rows (keep: ascending indices into the active batch), and prompts left with none."""
        t, b = self.t, keep.numel()
        self.gkv[:, :, :b, :, :t] = self.gkv[:, :, keep, :, :t]  # only the filled columns are copied
        row_prompt, self.row_g, self.batch = self.row_prompt[keep], self.row_g[keep], b
        alive = torch.unique(row_prompt)  # [Pa'] ascending
        if alive.numel() < self.n_prompts:
            self.pkv[:, :, : alive.numel()] = self.pkv[:, :, alive]
            self.pbias[: alive.numel()] = self.pbias[alive]
            renumber = torch.zeros(self.n_prompts, dtype=torch.long, device=alive.device)
            renumber[alive] = torch.arange(alive.numel(), device=alive.device)
            row_prompt, self.n_prompts = renumber[row_prompt], alive.numel()
        self.row_prompt = row_prompt

    def release(self) -> None:
        self.pkv = self.gkv = self.pbias = self.layers = None

    def _decode_attention(self, li: int, q: torch.Tensor) -> torch.Tensor:
        """Attention of one new query per row over its prompt and its own generated tokens.

        q: [B, Hq, D] -> [B, Hq*D]. Query heads are grouped by the KV head they share (HF's repeat_kv
        order: head h uses KV head h // rep), so GQA needs no copy of the cache. One softmax runs over
        [prompt keys | generated keys]; the prompt half is computed per prompt on the [P, Hkv, G*rep, .]
        grid, the generated half per row.
        """
        B, rep, D, Tp, Pa = self.batch, self.n_heads // self.n_kv, self.head_dim, self.pbias.shape[1], self.n_prompts
        qg = q.view(B, self.n_kv, rep, D) * self.scale  # [B, Hkv, rep, D]
        pk, pv = self.pkv[li, 0, :Pa], self.pkv[li, 1, :Pa]  # [Pa, Hkv, Tp, D], read once per prompt
        s_prompt = torch.matmul(self._to_grid(qg), pk.transpose(-1, -2))  # [Pa, Hkv, G*rep, Tp]
        s_prompt = self._from_grid(s_prompt + self.pbias[:Pa, None, None, :])  # [B, Hkv, rep, Tp]
        gk, gv = self.gkv[li, 0, :B, :, : self.t + 1], self.gkv[li, 1, :B, :, : self.t + 1]  # [B, Hkv, t+1, D]
        s_gen = torch.matmul(qg, gk.transpose(-1, -2))  # [B, Hkv, rep, t+1]
        # softmax in float32 as HF's attention kernels do (a no-op for float32 models)
        probs = torch.softmax(torch.cat((s_prompt, s_gen), dim=-1), dim=-1, dtype=torch.float32).to(q.dtype)
        o_prompt = self._from_grid(torch.matmul(self._to_grid(probs[..., :Tp]), pv))  # [B, Hkv, rep, D]
        return (o_prompt + torch.matmul(probs[..., Tp:], gv)).reshape(B, self.n_heads * D)

    def _to_grid(self, x: torch.Tensor) -> torch.Tensor:
        """Rows to the per-prompt grid: [B, Hkv, rep, X] -> [Pa, Hkv, G*rep, X] (finished rows are 0)."""
        Pa, G, X = self.n_prompts, self.group, x.shape[-1]
        if self.batch == Pa * G:  # every slot filled, rows in (prompt, g) order: a transpose does it
            return x.reshape(Pa, G, *x.shape[1:]).transpose(1, 2).reshape(Pa, self.n_kv, -1, X)
        grid = x.new_zeros(Pa, self.n_kv, G, *x.shape[2:])
        grid[self.row_prompt, :, self.row_g] = x
        return grid.view(Pa, self.n_kv, -1, X)

    def _from_grid(self, y: torch.Tensor) -> torch.Tensor:
        """The inverse of _to_grid: [Pa, Hkv, G*rep, X] -> [B, Hkv, rep, X]."""
        Pa, G, X = self.n_prompts, self.group, y.shape[-1]
        y = y.view(Pa, self.n_kv, G, -1, X)
        if self.batch == Pa * G:
            return y.transpose(1, 2).reshape(self.batch, self.n_kv, -1, X)
        return y[self.row_prompt, :, self.row_g]

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        """Final norm + lm_head (tied or not: whatever module the model uses). x: [B, H] -> [B, V]."""
        x = _rms_norm(x, self.final_norm.weight, self.final_eps)
        return F.linear(x, self.head_w, self.head_b)


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
        self._fast = _FastLlama(model) if self.fallback_reason is None else None
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
