"""The GRPO update's forward without padding and with each prompt run once per group (issue 14).

`token_logprobs` (r1kit/model.py) runs a micro-batch as B rows of [prompt | completion], left- and
right-padded to the longest: every prompt is computed G times, every padding column costs as much as a
real token, and the LM head runs at every position. Here a micro-batch of rollout rows is laid out as

    prompt tokens of each distinct prompt, once  ++  real completion tokens of every row, once

as one flat sequence of T tokens: the projections, MLPs and norms (most of the FLOPs) see no padding and no
repeated prompt. Attention is the only place positions meet, and it runs in two SDPA calls on padded views:
    prompts      [U, Tp', D] right-padded, causal (a real query never reaches the padding behind it);
    completions  [B, Tc, D]: each query attends to its prompt's keys (shared, gathered per row) and to its
                 own completion's earlier tokens, never to a sibling's: the block mask of the issue.
Positions restart after the prompt for every completion (prompt length + t), exactly as the padded forward
numbers them. The final norm, LM head and log-softmax run only at the positions that predict a completion
token. The HF module's own sub-modules (projections, norms, MLP, rotary embedding, head) are called, so
autograd reaches every parameter, tied heads included.

`packed_problem(model)` says why a model cannot take this path (then the trainer uses `token_logprobs`);
`completion_logprobs` is the one call the trainer makes, packed or not. bf16 is the policy's business
(`model.mixed_precision=bf16`, r1kit/policy.py): its autocast wraps this forward like the padded one, and
the log-softmax runs on fp32 logits either way.

Exactness: tests/test_packed_forward.py checks logprobs and the GRPO objective's gradients against the
padded forward in float64 (<= 1e-10). Benchmark: benchmarks/bench_vs_trl.py --packed.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from r1kit.engine.fast_llama import fast_path_problem
from r1kit.types import R1KitError, Rollout

__all__ = ["PackedLayout", "completion_logprobs", "pack_rows", "packed_problem", "packed_token_logprobs"]


def packed_problem(model: nn.Module) -> str | None:
    """Why `model` cannot use the packed forward, or None if it can: the Llama families of the engine's fast
    path (same checks), a plain module (not DDP/FSDP-wrapped or sharded: their hooks run in the wrapper's
    forward), no gradient checkpointing and no attention dropout while training (the packed forward has
    neither). A sliding window is checked per call against the micro-batch's length."""
    reason = fast_path_problem(model)
    if reason is not None:
        return reason
    if any(type(p.data) is not torch.Tensor for p in model.parameters()):
        return "parameters are not plain tensors (sharded by FSDP, or DTensors)"
    if getattr(model, "is_gradient_checkpointing", False):
        return "gradient checkpointing is on"
    if getattr(model.model, "rotary_emb", None) is None:
        return "model.model has no rotary_emb module"
    if model.training and float(getattr(model.config, "attention_dropout", 0.0) or 0.0) > 0:
        return f"attention_dropout={model.config.attention_dropout} while training"
    return None


def _sliding_window(config) -> int | None:
    window = getattr(config, "sliding_window", None)
    if window is None or (getattr(config, "model_type", None) == "qwen2" and not getattr(config, "use_sliding_window", False)):
        return None
    layer_types = getattr(config, "layer_types", None)
    return None if layer_types is not None and "sliding_attention" not in layer_types else int(window)


@dataclass
class PackedLayout:
    """Where each token of a micro-batch lives, flat and in the two padded attention views.

    B rows (completions) from U distinct prompts; T = sum(p_u) + sum(c_b) flat tokens, prompts first.
    """

    ids: torch.Tensor  # [T] long, flat tokens: prompt tokens (unit-major) then completion tokens (row-major)
    positions: torch.Tensor  # [T] long, 0..p_u-1 for a prompt, p_u + t for completion token t
    prompt_slots: torch.Tensor  # [Tp_flat] long, flat prompt token -> index into the [U * Tp'] prompt view
    completion_slots: torch.Tensor  # [Tc_flat] long, flat completion token -> index into the [B * Tc] view
    row_unit: torch.Tensor  # [B] long, the prompt (unit) of each row
    prompt_valid: torch.Tensor  # [U, Tp'] bool, real prompt tokens (left-aligned)
    predictors: torch.Tensor  # [M] long, flat index of the token whose output predicts (row, t) below
    pred_rows: torch.Tensor  # [M] long
    pred_cols: torch.Tensor  # [M] long
    targets: torch.Tensor  # [M] long, the completion token predicted
    valid: torch.Tensor  # [B, Tc] bool, real completion tokens
    num_units: int  # U
    prompt_width: int  # Tp'
    width: int  # Tc (>= 1, as micro_inputs trims it)


def _units(pids: torch.Tensor, pmask: torch.Tensor) -> torch.Tensor:
    """[B] unit index: consecutive rows with the same prompt (ids and mask) share one unit."""
    same = (pids[1:] == pids[:-1]).all(-1) & (pmask[1:] == pmask[:-1]).all(-1)  # [B-1]
    starts = torch.cat([torch.ones(1, dtype=torch.long), (~same).long()])  # [B]
    return starts.cumsum(0) - 1


def pack_rows(rollout: Rollout, idx: torch.Tensor) -> PackedLayout:
    """The packed layout of rollout rows `idx` (any rows; rows sharing a prompt should be adjacent)."""
    pids, pmask = rollout.prompt_ids[idx], rollout.prompt_mask[idx].bool()  # [B, Tp] left-padded
    cmask = rollout.completion_mask[idx] > 0  # [B, Tc_full]
    B, dev = idx.numel(), pids.device
    clen = cmask.sum(-1)  # [B]
    tc = int(clen.max()) or 1
    cmask, cids = cmask[:, :tc], rollout.completion_ids[idx, :tc]  # [B, tc]
    cols = torch.arange(tc, device=dev)
    if not torch.equal(cmask, cols[None] < clen[:, None]):
        raise R1KitError("rollout.completion_mask: the packed update needs each completion's real tokens first "
                         "(right padding only); a row has a gap")
    row_unit = _units(pids, pmask)  # [B]
    first = torch.cat([torch.ones(1, dtype=torch.bool), row_unit[1:] != row_unit[:-1]])  # [B]
    plen = pmask[first].sum(-1)  # [U]
    if bool((plen == 0).any()):
        raise R1KitError("rollout.prompt_mask: a row has an empty prompt; nothing would predict its first token")
    U, tp = int(plen.numel()), int(plen.max())
    # left-padded [U, Tp] -> left-aligned [U, tp]: column j of unit u is token Tp - p_u + j
    full_tp = pids.shape[1]
    src = (cols_p := torch.arange(tp, device=dev))[None] + (full_tp - plen)[:, None]  # [U, tp]
    prompt_valid = cols_p[None] < plen[:, None]  # [U, tp]
    prompt_ids = pids[first].gather(1, src.clamp(max=full_tp - 1))  # [U, tp]
    prompt_slots = prompt_valid.reshape(-1).nonzero().squeeze(1)  # [Tp_flat]
    completion_slots = cmask.reshape(-1).nonzero().squeeze(1)  # [Tc_flat]
    ids = torch.cat([prompt_ids.reshape(-1)[prompt_slots], cids.reshape(-1)[completion_slots]])  # [T]
    comp_pos = plen[row_unit][:, None] + cols[None]  # [B, tc]
    positions = torch.cat([cols_p[None].expand(U, tp).reshape(-1)[prompt_slots],
                           comp_pos.reshape(-1)[completion_slots]])  # [T]
    n_prompt = prompt_slots.numel()
    # flat index of every completion slot (row, t) that holds a token; -1 elsewhere
    flat_of_slot = torch.full((B * tc,), -1, dtype=torch.long, device=dev)
    flat_of_slot[completion_slots] = torch.arange(completion_slots.numel(), device=dev) + n_prompt
    unit_start = torch.cat([torch.zeros(1, dtype=torch.long, device=dev), plen.cumsum(0)[:-1]])  # [U]
    last_prompt = unit_start + plen - 1  # [U] flat index of each prompt's last token
    # (row, t) is predicted by token t-1 of the row, or by the prompt's last token for t = 0; every row
    # predicts at least its t = 0 (zeroed when empty) so that an all-empty micro-batch still has a graph.
    want = cols[None] < clen.clamp(min=1)[:, None]  # [B, tc]
    pred_rows, pred_cols = want.nonzero(as_tuple=True)  # [M]
    prev = flat_of_slot.view(B, tc)[pred_rows, (pred_cols - 1).clamp(min=0)]
    predictors = torch.where(pred_cols == 0, last_prompt[row_unit[pred_rows]], prev)  # [M]
    return PackedLayout(ids, positions, prompt_slots, completion_slots, row_unit, prompt_valid, predictors,
                        pred_rows, pred_cols, cids[pred_rows, pred_cols], cmask, U, tp, tc)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """HF's apply_rotary_pos_emb for one tensor: x * cos + rotate_half(x) * sin. x: [T, H, D]; cos/sin [T, 1, D]."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def _to_view(x: torch.Tensor, slots: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Flat [n, H, D] tokens into a zero-padded [rows, H, cols, D] attention view."""
    out = x.new_zeros(rows * cols, *x.shape[1:]).index_copy(0, slots, x)  # [rows*cols, H, D]
    return out.view(rows, cols, *x.shape[1:]).transpose(1, 2)


def _from_view(o: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """The inverse of _to_view for an attention output [rows, H, cols, D] -> flat [n, H*D]."""
    rows, H, cols, D = o.shape
    return o.transpose(1, 2).reshape(rows * cols, H * D).index_select(0, slots)


def _attention(q, k, v, lay: PackedLayout, masks, scale: float, gqa: bool) -> torch.Tensor:
    """Prompt tokens attend causally within their prompt; completion tokens to their prompt and their own
    earlier tokens. q: [T, Hq, D], k/v: [T, Hkv, D] flat -> [T, Hq*D] flat."""
    n_p, U, tp, tc, B = lay.prompt_slots.numel(), lay.num_units, lay.prompt_width, lay.width, lay.row_unit.numel()
    qp, kp, vp = (_to_view(x[:n_p], lay.prompt_slots, U, tp) for x in (q, k, v))  # [U, H, tp, D]
    op = F.scaled_dot_product_attention(qp, kp, vp, is_causal=True, scale=scale, enable_gqa=gqa)
    qc, kc, vc = (_to_view(x[n_p:], lay.completion_slots, B, tc) for x in (q, k, v))  # [B, H, tc, D]
    keys = torch.cat([kp.index_select(0, lay.row_unit), kc], dim=2)  # [B, Hkv, tp + tc, D]
    values = torch.cat([vp.index_select(0, lay.row_unit), vc], dim=2)
    oc = F.scaled_dot_product_attention(qc, keys, values, attn_mask=masks, scale=scale, enable_gqa=gqa)
    return torch.cat([_from_view(op, lay.prompt_slots), _from_view(oc, lay.completion_slots)])  # [T, Hq*D]


def _completion_mask(lay: PackedLayout) -> torch.Tensor:
    """[B, 1, tc, tp + tc] bool: the prompt's real tokens, then the row's own tokens up to the query."""
    tc = lay.width
    prompt_part = lay.prompt_valid[lay.row_unit][:, None, :].expand(-1, tc, -1)  # [B, tc, tp]
    own = torch.ones(tc, tc, dtype=torch.bool, device=prompt_part.device).tril()  # [tc, tc]
    return torch.cat([prompt_part, own[None].expand(prompt_part.shape[0], -1, -1)], dim=-1)[:, None]


def packed_hidden(model: nn.Module, lay: PackedLayout) -> torch.Tensor:
    """The decoder's final hidden states (before the final norm) at every flat token: [T, H]."""
    base, cfg = model.model, model.config
    attn0 = base.layers[0].self_attn
    D = attn0.head_dim
    n_heads, n_kv = attn0.q_proj.out_features // D, attn0.k_proj.out_features // D
    scale = float(getattr(attn0, "scaling", D**-0.5))
    x = base.embed_tokens(lay.ids)  # [T, H]
    cos, sin = base.rotary_emb(x, lay.positions[None])  # [1, T, D]
    cos, sin = cos[0, :, None], sin[0, :, None]  # [T, 1, D]
    masks = _completion_mask(lay)
    T = x.shape[0]
    for layer in base.layers[: cfg.num_hidden_layers]:
        a = layer.self_attn
        h = layer.input_layernorm(x)
        q = _rotate(a.q_proj(h).view(T, n_heads, D), cos, sin)  # [T, Hq, D]
        k = _rotate(a.k_proj(h).view(T, n_kv, D), cos, sin)  # [T, Hkv, D]
        v = a.v_proj(h).view(T, n_kv, D)
        x = x + a.o_proj(_attention(q, k, v, lay, masks, scale, n_kv != n_heads))
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    return x


def packed_token_logprobs(
    model: nn.Module, lay: PackedLayout, temperature: float = 1.0, with_entropy: bool = False,
    entropy_grad: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`token_logprobs` for a packed micro-batch: logprobs [B, Tc] of each completion token under
    softmax(logits / temperature), 0 on padding, and the entropy [B, Tc] when asked (0 on padding)."""
    x = packed_hidden(model, lay)[lay.predictors]  # [M, H] only where a completion token is predicted
    logits = model.get_output_embeddings()(model.model.norm(x)).float()  # [M, V]
    if temperature > 0 and temperature != 1.0:
        logits = logits / temperature
    logp_all = F.log_softmax(logits, dim=-1)  # [M, V]
    lp = logp_all.gather(-1, lay.targets[:, None]).squeeze(-1)  # [M]
    shape, where = lay.valid.shape, (lay.pred_rows, lay.pred_cols)
    logprobs = torch.where(lay.valid, lp.new_zeros(shape).index_put(where, lp), 0.0)  # [B, Tc]
    entropy = None
    if with_entropy:
        with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
            ent = -(logp_all.exp() * logp_all).sum(-1)  # [M]
            entropy = torch.where(lay.valid, ent.new_zeros(shape).index_put(where, ent), 0.0)  # [B, Tc]
    return logprobs, entropy


def completion_logprobs(
    model: nn.Module, rollout: Rollout, idx: torch.Tensor, temperature: float, *, packed: bool,
    with_entropy: bool = False, entropy_grad: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """Logprobs (and entropies) [B, tc] of rollout rows `idx` and tc, packed when asked and possible,
    else by the padded `token_logprobs` (the reference computation)."""
    if packed and packed_problem(model) is None:
        lay = pack_rows(rollout, idx)
        window = _sliding_window(model.config)
        if window is None or int(lay.positions.max()) < window:
            lp, ent = packed_token_logprobs(model, lay, temperature, with_entropy, entropy_grad)
            return lp, ent, lay.width
    from r1kit.model import token_logprobs
    from r1kit.trainers.grpo import micro_inputs

    ids, mask, tc = micro_inputs(rollout, idx)
    lp, ent = token_logprobs(model, ids, mask, tc, temperature, with_entropy=with_entropy, entropy_grad=entropy_grad)
    return lp, ent, tc
