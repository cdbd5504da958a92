"""The engine's fast backend: a pure-torch forward for Llama-family models (llama, qwen2, mistral) that
reads the HF module's parameters in place (or cached copies of them in another dtype, `engine.dtype`), with
pre-allocated KV caches in a shared-prefix layout.
`fast_path_problem` says why a model cannot use it (r1kit.engine then falls back to HF's forward).
The interface (admit / decode / keep_rows / release) is the one r1kit.engine.local backends share.
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


def sliding_window(config) -> int | None:
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


def _layer_tensors(layer: nn.Module, weight) -> SimpleNamespace:
    """A layer's parameters as the forward reads them, looked up once per batch: nn.Module attribute
    lookups cost ~1 us each, and the decode loop would do ~40 per layer and step. `weight` maps a
    parameter (or None, a missing bias) to the tensor to read: itself, or its copy in the sampling dtype."""
    w = SimpleNamespace(**{name: weight(operator.attrgetter(path)(layer)) for name, path in _LAYER_TENSORS.items()})
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

    The rows of a prompt (its n samples) share its prefix, so the cache is split in two (a "shared-prefix"
    layout):
    - prompt cache [L, 2 (k/v), P, Hkv, Tp, D]: one slot per running prompt, written once by its prefill
      (right-aligned: a slot's padding is on the left, masked by `pbias` [P, Tp]);
    - generation cache [L, 2, N, Hkv, Tg, D]: one row per active sample, its k-th generated token's K/V in
      column k (`glen` [B] columns filled per row).
    At decode time the rows of a prompt attend to its prompt keys in one batched matmul, so the prompt part
    of the cache is read once per prompt and step instead of n times (decode attention on CPU is bound by
    reading the cache), and n times less memory holds it.

    Continuous batching: `admit` prefills new prompts (optionally on top of K/V served by the prefix cache)
    and appends their slots and rows while other rows are mid-decode; rows at different decode positions
    share a step through per-row column indices and a generation-cache mask. While every row has the same
    length (a batch admitted at once, as `Engine.generate` does) the step is exactly the original
    fixed-column one, so its numbers do not change.

    Active rows are the leading `batch` rows of the generation cache; `row_prompt` [B] and `row_g` [B]
    place each one in the [prompt, G] grid used for the shared-prefix matmul.

    dtype (`engine.dtype`; None: the model's own): the dtype the forward computes in. When it differs from
    the model's (bf16 sampling beside fp32 master weights: on a CPU with native bf16 a [32, 256] x [256, 768]
    linear takes 100 against 160 us on 1 thread, 60 against 165 on 2), the forward reads a copy of each
    parameter, cast once and cached; the copy is made again when the parameter changed since (its version
    counter, which an in-place optimizer step bumps, or its storage), checked once per batch, so the next
    batch after an optimizer step samples the new weights with no call. The RoPE tables and activations
    are then in that dtype, and so are the KV caches (`kv_dtype`) except for bf16/fp16 on a CPU: there the
    caches and the decode attention stay float32 (K and V are stored exactly, upcast from the projections),
    because the batched [1, D] x [D, t] products of decode attention over the generated tokens run 3-4x
    slower in bf16 than in float32 there (181 against 52 us for 32 rows x 4 heads, t = 40, 1 thread,
    AVX512-BF16): bf16 caches made a whole generate() 1.09x faster than fp32, float32 ones 1.29x. The
    sampler turns the logits into float32 (r1kit.engine.sampling), so the logprobs are
    log_softmax(logits / T) in float32 of the low-precision logits.
    """

    def __init__(self, model: nn.Module, dtype: torch.dtype | None = None):
        self.model, self.config = model, model.config
        own = model.get_input_embeddings().weight.dtype
        self.dtype = dtype if dtype is not None else own
        self._cast = self.dtype != own  # False: every parameter is read in place, whatever its dtype
        self._copies: dict[int, tuple] = {}  # id(param) -> (param, version, data_ptr, copy in self.dtype)
        on_cpu = model.get_input_embeddings().weight.device.type == "cpu"
        self.kv_dtype = torch.float32 if self._cast and on_cpu and self.dtype.itemsize < 4 else self.dtype
        attn = model.model.layers[0].self_attn
        self.head_dim = attn.head_dim
        self.n_heads = attn.q_proj.out_features // self.head_dim
        self.n_kv = attn.k_proj.out_features // self.head_dim
        self.scale = getattr(attn, "scaling", self.head_dim**-0.5)
        self.window = sliding_window(self.config)
        self._rope_len = 0
        self.batch = 0
        self.pkv = self.gkv = None

    supports_joins = True  # rows can join a running batch (the HF fallback cannot)
    initial_gen_cols = 256  # generation-cache columns allocated up front; more are added by doubling

    def supports_length(self, total: int) -> str | None:
        if self.window is not None and total > self.window:
            return f"sequence length {total} exceeds the sliding window {self.window}"
        return None

    @property
    def kv_shape(self) -> tuple[int, int, int]:
        """(layers, kv heads, head dim): the shape of one token's K/V is [L, 2, Hkv, D]."""
        return self.config.num_hidden_layers, self.n_kv, self.head_dim

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

    def _bind_weights(self) -> None:
        """Look the parameters up once per batch (read in place, or through fresh copies in self.dtype:
        either way optimizer steps are seen). Copies of parameters no longer in the model are dropped."""
        m, copies = self.model, self._copies
        self._copies = {}
        weight = lambda p: self._weight(p, copies)  # noqa: E731
        self.layers = [_layer_tensors(layer, weight) for layer in m.model.layers[: self.config.num_hidden_layers]]
        self.embed, norm, head = weight(m.get_input_embeddings().weight), m.model.norm, m.get_output_embeddings()
        self.final_norm_w, self.final_eps = weight(norm.weight), _eps(norm)
        self.head_w, self.head_b = weight(head.weight), weight(head.bias)

    def _weight(self, p: torch.Tensor | None, old: dict[int, tuple]) -> torch.Tensor | None:
        """p itself when it is in self.dtype, else its copy in self.dtype: the one in `old` (the previous
        batch's) while p's version and storage are unchanged, else a fresh cast. Tied weights share one."""
        if p is None or not self._cast or p.dtype == self.dtype:
            return p
        entry = self._copies.get(id(p)) or old.get(id(p))
        if entry is None or entry[0] is not p or entry[1] != p._version or entry[2] != p.data_ptr():
            entry = (p, p._version, p.data_ptr(), p.detach().to(self.dtype))
        self._copies[id(p)] = entry
        return entry[3]

    def drop_copies(self) -> None:
        """Forget the cached low-precision copies: the next batch casts every parameter again (for weight
        changes the version check cannot see, e.g. a write through `param.data`)."""
        self._copies = {}

    def admit(self, ids: torch.Tensor, mask: torch.Tensor, counts: list[int], max_pos: int, gen_cols: int,
              past: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Prefill P new prompts, give each a prompt slot and counts[p] rows; return last logits [P, V].

        ids, mask: [P, T] left-padded (the part of each prompt not served from the prefix cache).
        past: None, or (kv [L, 2, P, Hkv, C, D], valid [P, C]) right-aligned K/V of each prompt's cached
        prefix. max_pos: the largest position any row will reach; gen_cols: generation-cache columns to
        allocate up front (it grows on demand).
        """
        if self.batch == 0:
            self._bind_weights()
        dev, dtype = self.embed.device, self.kv_dtype
        self._rope_table(max_pos, dev, self.dtype)
        x_last, kv, valid = self._prefill(ids, mask, past)
        P, T = valid.shape
        bias = torch.zeros(P, T, device=dev, dtype=dtype).masked_fill_(~valid, float("-inf"))
        row_prompt = torch.arange(P, device=dev).repeat_interleave(torch.tensor(counts, device=dev))  # [n]
        row_g = torch.cat([torch.arange(c, device=dev) for c in counts])  # [n]
        if self.batch == 0:  # a fresh batch: exactly the original single-prefill layout
            L = len(self.layers)
            self.pkv, self.pbias, self.n_prompts = kv, bias, P
            cols = min(gen_cols, self.initial_gen_cols)  # grows on demand: a long max_tokens is not allocated
            self.gkv = torch.zeros(L, 2, sum(counts), self.n_kv, cols, self.head_dim, device=dev, dtype=dtype)
            self.glen = None  # per-row filled columns, once rows differ (`t` while they all agree)
            self.row_prompt, self.row_g, self.group, self.batch, self.t, self.tmax = row_prompt, row_g, max(counts), \
                sum(counts), 0, 0
        else:
            self._append(kv, bias, row_prompt, row_g, max(counts))
        return self._logits(x_last)

    def _prefill(self, ids, mask, past):
        """The prompt forward: -> (last hidden [P, H], kv [L, 2, P, Hkv, C+T, D], valid [P, C+T])."""
        (P, T), D = ids.shape, self.head_dim
        dev = ids.device
        valid = mask.bool()  # [P, T]
        offset = past[1].sum(-1, keepdim=True) if past is not None else 0  # [P, 1] cached prefix lengths
        pos = offset + (mask.cumsum(-1) - 1).clamp(min=0)  # [P, T]
        cos, sin = self._cos[pos][:, None], self._sin[pos][:, None]  # [P, 1, T, D]
        causal = torch.ones(T, T, dtype=torch.bool, device=dev).tril()
        # Padding queries attend to themselves: a fully masked row would give NaN that leaks into the
        # padding keys' values (0 * NaN), even though real tokens never attend to them.
        allowed = causal & (valid[:, None, None, :] | torch.eye(T, dtype=torch.bool, device=dev))  # [P,1,T,T]
        C = 0 if past is None else past[1].shape[1]
        if past is not None:
            allowed = torch.cat((past[1][:, None, None, :].expand(P, 1, T, C), allowed), dim=-1)  # [P,1,T,C+T]
            valid = torch.cat((past[1], valid), dim=1)
        kv = torch.empty(len(self.layers), 2, P, self.n_kv, C + T, D, device=dev, dtype=self.kv_dtype)
        if past is not None:
            kv[:, :, :, :, :C] = past[0]
        x = F.embedding(ids, self.embed)  # [P, T, H]
        for li, w in enumerate(self.layers):
            h = _rms_norm(x, w.in_norm, w.in_eps)
            q = _rotate(F.linear(h, w.wq, w.bq).view(P, T, -1, D).transpose(1, 2), cos, sin)  # [P, Hq, T, D]
            k = _rotate(F.linear(h, w.wk, w.bk).view(P, T, -1, D).transpose(1, 2), cos, sin)  # [P, Hkv, T, D]
            v = F.linear(h, w.wv, w.bv).view(P, T, -1, D).transpose(1, 2)
            kv[li, 0, :, :, C:], kv[li, 1, :, :, C:] = k, v
            if past is not None:  # [P, Hkv, C+T, D]: the cached prefix, then these tokens (exact in q's dtype)
                k, v = kv[li, 0].to(q.dtype), kv[li, 1].to(q.dtype)
            o = F.scaled_dot_product_attention(
                q, k, v, attn_mask=allowed, scale=self.scale, enable_gqa=self.n_kv != self.n_heads
            )  # [P, Hq, T, D]
            x = x + F.linear(o.transpose(1, 2).reshape(P, T, -1), w.wo, w.bo)
            x = x + _mlp(w, _rms_norm(x, w.post_norm, w.post_eps))
        return x[:, -1], kv, valid

    def _append(self, kv, bias, row_prompt, row_g, group) -> None:
        """Join new prompt slots and rows to the running batch (caches grow by doubling)."""
        P, T = bias.shape
        Pa, Tp, B, n = self.n_prompts, self.pbias.shape[1], self.batch, row_prompt.numel()
        if T > Tp or Pa + P > self.pkv.shape[2]:  # grow: old slots stay right-aligned, new columns masked
            Tn, cap = max(T, Tp), max(Pa + P, 2 * Pa)
            pkv = self.pkv.new_zeros(*self.pkv.shape[:2], cap, self.n_kv, Tn, self.head_dim)
            pbias = self.pbias.new_full((cap, Tn), float("-inf"))
            pkv[:, :, :Pa, :, Tn - Tp :], pbias[:Pa, Tn - Tp :] = self.pkv[:, :, :Pa], self.pbias[:Pa]
            self.pkv, self.pbias, Tp = pkv, pbias, Tn
        self.pkv[:, :, Pa : Pa + P, :, : Tp - T] = 0
        self.pkv[:, :, Pa : Pa + P, :, Tp - T :] = kv
        self.pbias[Pa : Pa + P, : Tp - T] = float("-inf")
        self.pbias[Pa : Pa + P, Tp - T :] = bias
        if B + n > self.gkv.shape[2]:
            gkv = self.gkv.new_zeros(*self.gkv.shape[:2], max(B + n, 2 * B), *self.gkv.shape[3:])
            gkv[:, :, :B, :, : self.tmax + 1] = self.gkv[:, :, :B, :, : self.tmax + 1]
            self.gkv = gkv
        self.row_prompt = torch.cat((self.row_prompt, row_prompt + Pa))
        self.row_g = torch.cat((self.row_g, row_g))
        if self.t:  # rows now sit at different columns
            self.glen, self.t = torch.full((B,), self.t, dtype=torch.long, device=row_g.device), None
        if self.t is None:
            self.glen = torch.cat((self.glen, self.glen.new_zeros(n)))
        self.n_prompts, self.batch, self.group = Pa + P, B + n, max(self.group, group)

    def decode(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Feed one token per active row; return logits [B, V]. tokens, positions: [B].

        Works on [B, H] rows (no time axis) to keep the per-step op count, which dominates at tiny
        model sizes, low.
        """
        B, t, D = self.batch, self.t, self.head_dim
        self._ensure_columns(self.tmax + 1)
        x = F.embedding(tokens, self.embed)  # [B, H]
        cos, sin = self._cos[positions][:, None], self._sin[positions][:, None]  # [B, 1, D]
        if t is not None:  # every row at column t
            new_kv, gbias = self.gkv[:, :, :B, :, t], None  # [L, 2, B, Hkv, D]: this step's cache column
        else:
            cols = torch.arange(self.tmax + 1, device=tokens.device)
            gbias = torch.zeros(B, self.tmax + 1, device=tokens.device, dtype=self.kv_dtype)
            gbias.masked_fill_(cols[None, :] > self.glen[:, None], float("-inf"))  # [B, tmax+1]
            new_kv = torch.empty(len(self.layers), 2, B, self.n_kv, D, device=tokens.device, dtype=self.kv_dtype)
            # each row's new K/V goes to its own column: as flat (row, head, column) indices into one layer's
            # [2, N*Hkv*C, D] view, one index_copy_ per layer (an advanced-index assignment costs ~20x more)
            N, C = self.gkv.shape[2], self.gkv.shape[4]
            heads = torch.arange(self.n_kv, device=tokens.device) * C
            flat = (torch.arange(B, device=tokens.device)[:, None] * (self.n_kv * C) + heads[None, :]
                    + self.glen[:, None]).reshape(-1)  # [B*Hkv]
        for li, w in enumerate(self.layers):
            h = _rms_norm(x, w.in_norm, w.in_eps)
            q = _rotate(F.linear(h, w.wq, w.bq).view(B, -1, D), cos, sin)  # [B, Hq, D]
            new_kv[li, 0] = _rotate(F.linear(h, w.wk, w.bk).view(B, -1, D), cos, sin)  # [B, Hkv, D]
            new_kv[li, 1] = F.linear(h, w.wv, w.bv).view(B, -1, D)
            if t is None:
                self.gkv[li].view(2, N * self.n_kv * C, D).index_copy_(1, flat, new_kv[li].view(2, B * self.n_kv, D))
            x = x + F.linear(self._decode_attention(li, q, gbias), w.wo, w.bo)
            x = x + _mlp(w, _rms_norm(x, w.post_norm, w.post_eps))
        if t is None:
            self.glen += 1
        self.tmax += 1
        self.t = None if t is None else t + 1
        return self._logits(x)

    def _ensure_columns(self, cols: int) -> None:
        if cols > self.gkv.shape[4]:
            gkv = self.gkv.new_zeros(*self.gkv.shape[:4], max(cols, 2 * self.gkv.shape[4]), self.head_dim)
            gkv[:, :, :, :, : self.gkv.shape[4]] = self.gkv
            self.gkv = gkv

    def keep_rows(self, keep: torch.Tensor, trim: bool = False) -> None:
        """Drop finished rows (keep: ascending indices into the active batch), and prompts left with none.

        trim: also drop prompt-cache columns that only padding uses now (a long prompt left); this
        changes the attention's reduction length, so `Engine.generate` (bit-stable batches) never asks.
        """
        b = keep.numel()
        if b == 0:
            return self.release()
        cols = self.tmax  # filled columns
        self.gkv[:, :, :b, :, :cols] = self.gkv[:, :, keep, :, :cols]  # only the filled columns are copied
        row_prompt, self.row_g, self.batch = self.row_prompt[keep], self.row_g[keep], b
        if self.t is None:
            self.glen = self.glen[keep]
            lo, hi = int(self.glen.min()), int(self.glen.max())
            self.tmax, self.t = hi, (hi if lo == hi else None)
            self.glen = None if lo == hi else self.glen
        alive = torch.unique(row_prompt)  # [Pa'] ascending
        if alive.numel() < self.n_prompts:
            self.pkv[:, :, : alive.numel()] = self.pkv[:, :, alive]
            self.pbias[: alive.numel()] = self.pbias[alive]
            renumber = torch.zeros(self.n_prompts, dtype=torch.long, device=alive.device)
            renumber[alive] = torch.arange(alive.numel(), device=alive.device)
            row_prompt, self.n_prompts = renumber[row_prompt], alive.numel()
        self.row_prompt = row_prompt
        if trim:
            first = int((self.pbias[: self.n_prompts] == 0).any(0).int().argmax())  # leading all-padding columns
            if first >= 16 and first >= self.pbias.shape[1] // 4:
                self.pkv, self.pbias = self.pkv[..., first:, :].contiguous(), self.pbias[:, first:].contiguous()

    def slot_kv(self, slot: int) -> torch.Tensor:
        """The K/V of a prompt slot's real (unmasked) columns, in position order: [L, 2, Hkv, Tp_real, D]."""
        real = (self.pbias[slot] == 0).nonzero().squeeze(1)  # [Tp_real]
        lo, hi = (int(real[0]), int(real[-1]) + 1) if real.numel() else (0, 0)
        if hi - lo == real.numel():  # one run of columns (no padding inside): a view, no copy
            return self.pkv[:, :, slot, :, lo:hi]
        return self.pkv[:, :, slot].index_select(3, real)

    def prompt_kv(self, row: int, length: int) -> torch.Tensor:
        """The K/V of row's prompt followed by its first `length` generated tokens: [L, 2, Hkv, n, D]."""
        return torch.cat((self.slot_kv(int(self.row_prompt[row])), self.gkv[:, :, row, :, :length]), dim=3)

    def release(self) -> None:
        self.pkv = self.gkv = self.pbias = self.layers = self.glen = None
        self.batch = 0

    def _decode_attention(self, li: int, q: torch.Tensor, gbias: torch.Tensor | None) -> torch.Tensor:
        """Attention of one new query per row over its prompt and its own generated tokens.

        q: [B, Hq, D] -> [B, Hq*D]. Query heads are grouped by the KV head they share (HF's repeat_kv
        order: head h uses KV head h // rep), so GQA needs no copy of the cache. One softmax runs over
        [prompt keys | generated keys]; the prompt half is computed per prompt on the [P, Hkv, G*rep, .]
        grid, the generated half per row (gbias [B, Tg] masks columns a row has not filled; None when
        every row has filled the same columns). It computes in the caches' dtype and returns q's.
        """
        B, rep, D, Tp, Pa = self.batch, self.n_heads // self.n_kv, self.head_dim, self.pbias.shape[1], self.n_prompts
        dtype = self.kv_dtype  # (the .to()s below return their input when it is q's dtype too)
        qg = q.view(B, self.n_kv, rep, D).to(dtype) * self.scale  # [B, Hkv, rep, D]
        pk, pv = self.pkv[li, 0, :Pa], self.pkv[li, 1, :Pa]  # [Pa, Hkv, Tp, D], read once per prompt
        s_prompt = torch.matmul(self._to_grid(qg), pk.transpose(-1, -2))  # [Pa, Hkv, G*rep, Tp]
        s_prompt = self._from_grid(s_prompt + self.pbias[:Pa, None, None, :])  # [B, Hkv, rep, Tp]
        gk, gv = self.gkv[li, 0, :B, :, : self.tmax + 1], self.gkv[li, 1, :B, :, : self.tmax + 1]  # [B, Hkv, t+1, D]
        s_gen = torch.matmul(qg, gk.transpose(-1, -2))  # [B, Hkv, rep, t+1]
        if gbias is not None:
            s_gen = s_gen + gbias[:, None, None, :]
        # softmax in float32 as HF's attention kernels do (a no-op for float32 models)
        probs = torch.softmax(torch.cat((s_prompt, s_gen), dim=-1), dim=-1, dtype=torch.float32).to(dtype)
        o_prompt = self._from_grid(torch.matmul(self._to_grid(probs[..., :Tp]), pv))  # [B, Hkv, rep, D]
        return (o_prompt + torch.matmul(probs[..., Tp:], gv)).reshape(B, self.n_heads * D).to(q.dtype)

    def _to_grid(self, x: torch.Tensor) -> torch.Tensor:
        """Rows to the per-prompt grid: [B, Hkv, rep, X] -> [Pa, Hkv, G*rep, X] (empty cells are 0)."""
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
        x = _rms_norm(x, self.final_norm_w, self.final_eps)
        return F.linear(x, self.head_w, self.head_b)
