"""The engine's fast backend: a pure-torch forward for Llama-family models (llama, qwen2, mistral) that
reads the HF module's parameters in place, with pre-allocated KV caches in a shared-prefix layout.
`fast_path_problem` says why a model cannot use it (r1kit.engine then falls back to HF's forward).
The interface (prefill / decode / keep_rows / release) is the one r1kit.engine.local backends share.
"""
from __future__ import annotations

import operator
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

FAST_MODEL_TYPES = ("llama", "qwen2", "mistral")
_ATTN_CHILDREN = {"q_proj", "k_proj", "v_proj", "o_proj"}
_MLP_CHILDREN = {"gate_proj", "up_proj", "down_proj", "act_fn"}


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


class FastLlama:
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
