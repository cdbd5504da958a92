"""The GRPO update's forward without padding and with each prompt run once per group (issue 14).

`token_logprobs` (r1kit/model.py) runs a micro-batch as B rows of [prompt | completion], left- and
right-padded to the longest: every prompt is computed G times, every padding column costs as much as a
real token, and the LM head runs at every position. Here a micro-batch of rollout rows is laid out as

    prompt tokens of each distinct prompt, once  ++  real completion tokens of every row, once

as one flat sequence of T tokens: the projections, MLPs and norms (most of the FLOPs) see no padding and no
repeated prompt. Attention is the only place positions meet, and it runs in SDPA calls on padded views:
    prompts      [U, Tp', D] right-padded, causal (a real query never reaches the padding behind it);
    completions  [B, Tc, D]: each query attends to its prompt's keys (shared, gathered per row) and to its
                 own completion's earlier tokens, never to a sibling's: the block mask of the issue. Rows
                 of very different lengths go in two calls ("segments"), each padded to its own longest.
Stage 0 uses the same layout (`pack_documents`): the prefix every document of a batch starts with (the
template text) is the one "prompt", the documents' remainders its "completions".
Positions restart after the prompt for every completion (prompt length + t), exactly as the padded forward
numbers them. The final norm, LM head and log-softmax run only at the positions that predict a completion
token. The HF module's own parameters are used in place (norms, MLP, rotary embedding and head through their
modules; q/k/v as one matmul over their concatenated weights), so autograd reaches every parameter, tied
heads included. A group's G completions share one forward and one backward of the prompt: its keys and
values are gathered for every row, and the gather's backward sums the rows' gradients into them.
flex_attention was not tried: on CPU it needs torch.compile; two SDPA calls on gathered views cost little
next to the projections at these sizes (bench_packed_update.py).

`packed_problem(model)` says why a model cannot take this path (then the trainer uses `token_logprobs`);
`completion_logprobs` is the one call the trainer makes, packed or not. bf16 is the policy's business
(`model.mixed_precision=bf16`, r1kit/policy.py): its autocast wraps this forward like the padded one, and
the log-softmax runs on fp32 logits either way.

Exactness: tests/test_packed_forward.py checks logprobs and the GRPO objective's gradients against the
padded forward in float64 (<= 1e-10; HF's RMSNorm computes in float32 even in a float64 model, so the test
gives the norms a float64 forward) and float32 (<= 1e-5). Benchmarks: benchmarks/bench_packed_update.py
(the update's forward + backward alone) and benchmarks/bench_vs_trl.py --packed both (whole steps vs TRL).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from r1kit.engine.fast_llama import fast_path_problem, sliding_window
from r1kit.types import R1KitError, Rollout

__all__ = ["PackedLayout", "completion_logprobs", "pack_documents", "pack_rows", "packed_batch_loss",
           "packed_problem", "packed_token_logprobs"]


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


@dataclass
class Segment:
    """Completion rows whose attention runs in one SDPA call, padded to the segment's longest completion.

    Rows of very different lengths go to different segments (see `_segments`): a short row padded to the
    batch's longest would pay for keys and queries it does not have."""

    query_view: torch.Tensor  # [n * tc] long, flat token of each query slot
    key_view: torch.Tensor  # [n * (Tp' + tc)] long, keys of a row: its prompt's slots, then its own
    key_mask: torch.Tensor  # [n, 1, tc, Tp' + tc] bool, the prompt's real tokens + own tokens up to the query
    rows: int  # n
    width: int  # tc


@dataclass
class PackedLayout:
    """Where each token of a micro-batch lives: flat, and in the padded attention views.

    B rows (completions) from U distinct prompts; T = sum(p_u) + sum(c_b) flat tokens, prompts first.
    The views are filled by gathering flat tokens; a padding slot gathers token 0, which is harmless: a
    padding key is masked out for every real query (probability exactly 0, so exactly 0 gradient), and a
    padding query's output is never gathered back.
    """

    ids: torch.Tensor  # [T] long, flat tokens: prompt tokens (unit-major) then completion tokens (row-major)
    positions: torch.Tensor  # [T] long, 0..p_u-1 for a prompt, p_u + t for completion token t
    prompt_view: torch.Tensor  # [U * Tp'] long, flat token of each prompt-view slot (left-aligned prompts)
    segments: list[Segment]  # the completion rows' attention views (none for documents without a shared prefix)
    out_index: torch.Tensor  # [T] long, each flat token's slot in cat(prompt view, segment views...)
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
    starts = torch.cat([torch.ones(1, dtype=torch.long, device=pids.device), (~same).long()])  # [B]
    return starts.cumsum(0) - 1


def _check_completions(cmask: torch.Tensor, clen: torch.Tensor) -> None:
    cols = torch.arange(cmask.shape[1], device=cmask.device)
    if not torch.equal(cmask, cols[None] < clen[:, None]):
        raise R1KitError("rollout.completion_mask: the packed update needs each completion's real tokens first "
                         "(right padding only); a row has a gap")


# One more SDPA call with its gathers, forward and backward (~150 us), costs about as much as this many
# query x key slots of attention (~7 ns a slot at 4 heads of 32 dims: [32, 4, 125, 125] took 14.5 ms per
# layer on 2 cores); rows are split into two segments only when that saves more.
_SEGMENT_OVERHEAD = 20_000


def _segments(clen: list[int], tp: int) -> list[list[int]]:
    """Rows grouped for attention: one group, or two (short rows, long rows) when padding every row to the
    longest costs more query x key slots than a second SDPA call. clen: each row's completion length."""
    order = sorted(range(len(clen)), key=clen.__getitem__)
    width = lambda c: max(c, 1)  # noqa: E731  an empty row still has one (masked) query slot
    longest = width(clen[order[-1]])
    best, cut = len(order) * longest * (tp + longest), None
    for k in range(1, len(order)):
        a = width(clen[order[k - 1]])
        if a == longest:
            break
        cost = k * a * (tp + a) + (len(order) - k) * longest * (tp + longest) + _SEGMENT_OVERHEAD
        if cost < best:
            best, cut = cost, k
    if cut is None:
        return [list(range(len(clen)))]
    return [sorted(order[:cut]), sorted(order[cut:])]


def pack_rows(rollout: Rollout, idx: torch.Tensor) -> PackedLayout:
    """The packed layout of rollout rows `idx` (any rows; rows sharing a prompt should be adjacent)."""
    pids, pmask = rollout.prompt_ids[idx], rollout.prompt_mask[idx].bool()  # [B, Tp] left-padded
    B, dev = idx.numel(), pids.device
    clen = (rollout.completion_mask[idx] > 0).sum(-1)  # [B]
    tc = int(clen.max()) or 1
    cids, cmask = rollout.completion_ids[idx, :tc], rollout.completion_mask[idx, :tc] > 0  # [B, tc]
    _check_completions(cmask, clen)
    row_unit = _units(pids, pmask)  # [B]
    first = torch.cat([torch.ones(1, dtype=torch.bool, device=dev), row_unit[1:] != row_unit[:-1]])  # [B]
    plen = pmask[first].sum(-1)  # [U]
    if bool((plen == 0).any()):
        raise R1KitError("rollout.prompt_mask: a row has an empty prompt; nothing would predict its first token")
    U, tp, full_tp = int(plen.numel()), int(plen.max()), pids.shape[1]
    cols, cols_p = torch.arange(tc, device=dev), torch.arange(tp, device=dev)
    prompt_valid = cols_p[None] < plen[:, None]  # [U, tp] left-aligned
    src = (cols_p[None] + (full_tp - plen)[:, None]).clamp(max=full_tp - 1)  # [U, tp] column in the left-padded row
    n_prompt, n_comp = int(plen.sum()), int(clen.sum())
    flat_prompt = torch.zeros(U * tp, dtype=torch.long, device=dev)  # padding slots -> token 0
    flat_prompt[prompt_valid.reshape(-1)] = torch.arange(n_prompt, device=dev)
    flat_comp = torch.zeros(B * tc, dtype=torch.long, device=dev)
    flat_comp[cmask.reshape(-1)] = torch.arange(n_comp, device=dev) + n_prompt
    flat_comp = flat_comp.view(B, tc)
    ids = torch.cat([pids[first].gather(1, src)[prompt_valid], cids[cmask]])  # [T]
    positions = torch.cat([cols_p[None].expand(U, tp)[prompt_valid], (plen[row_unit][:, None] + cols[None])[cmask]])
    # each flat token's slot in cat(prompt view, segment views): prompts keep their slots; a completion token
    # (row, t) goes to its segment's block at (the row's place in the segment) * width + t
    out_index = torch.empty(n_prompt + n_comp, dtype=torch.long, device=dev)
    out_index[:n_prompt] = prompt_valid.reshape(-1).nonzero().squeeze(1)
    segments, offset = [], U * tp
    for rows in _segments(clen.tolist(), tp):
        n, w = len(rows), max(int(clen[rows].max()), 1)
        r = torch.tensor(rows, dtype=torch.long, device=dev)
        own = torch.ones(w, w, dtype=torch.bool, device=dev).tril()  # [w, w]
        key_mask = torch.cat([prompt_valid[row_unit[r]][:, None, :].expand(n, w, tp), own.expand(n, w, w)], dim=-1)
        key_view = torch.cat([flat_prompt.view(U, tp)[row_unit[r]], flat_comp[r, :w]], dim=1)  # [n, tp + w]
        segments.append(Segment(flat_comp[r, :w].reshape(-1), key_view.reshape(-1), key_mask[:, None], n, w))
        seg_valid = cmask[r, :w]  # [n, w]
        slots = offset + torch.arange(n * w, device=dev).view(n, w)
        out_index[flat_comp[r, :w][seg_valid]] = slots[seg_valid]
        offset += n * w
    # (row, t) is predicted by token t-1 of the row, or by the prompt's last token for t = 0; every row
    # predicts at least its t = 0 (zeroed when empty) so that an all-empty micro-batch still has a graph.
    last_prompt = plen.cumsum(0) - 1  # [U] flat index of each prompt's last token
    pred_rows, pred_cols = (cols[None] < clen.clamp(min=1)[:, None]).nonzero(as_tuple=True)  # [M]
    prev = flat_comp[pred_rows, (pred_cols - 1).clamp(min=0)]
    predictors = torch.where(pred_cols == 0, last_prompt[row_unit[pred_rows]], prev)  # [M]
    return PackedLayout(ids, positions, flat_prompt, segments, out_index, predictors, pred_rows, pred_cols,
                        cids[pred_rows, pred_cols], cmask, U, tp, tc)


def _attention(qkv: torch.Tensor, lay: PackedLayout, n_heads: int, n_kv: int, scale: float) -> torch.Tensor:
    """Prompt tokens attend causally within their prompt; completion tokens to their prompt and their own
    earlier tokens. qkv: [T, Hq + 2 Hkv, D] flat (q, k rotated) -> [T, Hq * D] flat."""
    U, tp, (T, _, D) = lay.num_units, lay.prompt_width, qkv.shape
    gqa = n_kv != n_heads
    heads = lambda x: x.transpose(1, 2)  # noqa: E731  [rows, cols, H, D] -> [rows, H, cols, D]
    pv = qkv.index_select(0, lay.prompt_view).view(U, tp, -1, D)  # [U, tp, Hq + 2Hkv, D]
    qp, kp, vp = heads(pv[:, :, :n_heads]), heads(pv[:, :, n_heads:-n_kv]), heads(pv[:, :, -n_kv:])
    op = F.scaled_dot_product_attention(qp, kp, vp, is_causal=True, scale=scale, enable_gqa=gqa)  # [U, Hq, tp, D]
    flat = lambda o: o.transpose(1, 2).reshape(-1, n_heads * D)  # noqa: E731  [rows, H, cols, D] -> [rows*cols, H*D]
    outs = [flat(op)]
    for seg in lay.segments:
        n, w = seg.rows, seg.width
        qc = heads(qkv[:, :n_heads].index_select(0, seg.query_view).view(n, w, n_heads, D))  # [n, Hq, w, D]
        kv = qkv[:, n_heads:].index_select(0, seg.key_view).view(n, tp + w, 2 * n_kv, D)  # [n, tp + w, 2Hkv, D]
        oc = F.scaled_dot_product_attention(qc, heads(kv[:, :, :n_kv]), heads(kv[:, :, n_kv:]),
                                            attn_mask=seg.key_mask, scale=scale, enable_gqa=gqa)  # [n, Hq, w, D]
        outs.append(flat(oc))
    return (outs[0] if len(outs) == 1 else torch.cat(outs)).index_select(0, lay.out_index)  # [T, Hq * D]


def _qkv_weights(attn: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """q/k/v projections as one [(Hq + 2Hkv) * D, H] matrix (a view of autograd's cat: gradients reach each)."""
    w = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])
    biases = [attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias]
    if all(b is None for b in biases):
        return w, None
    return w, torch.cat([b if b is not None else w.new_zeros(p.out_features)
                         for b, p in zip(biases, (attn.q_proj, attn.k_proj, attn.v_proj))])


def packed_hidden(model: nn.Module, lay: PackedLayout) -> torch.Tensor:
    """The decoder's final hidden states (before the final norm) at every flat token: [T, H]."""
    base, cfg = model.model, model.config
    attn0 = base.layers[0].self_attn
    D = attn0.head_dim
    n_heads, n_kv = attn0.q_proj.out_features // D, attn0.k_proj.out_features // D
    scale = float(getattr(attn0, "scaling", D**-0.5))
    x = base.embed_tokens(lay.ids)  # [T, H]
    cos, sin = base.rotary_emb(x, lay.positions[None])  # [1, T, D]
    # HF's rotate_half(x) * sin = roll(x, D/2) * [-sin_1, sin_2]: a roll and a pre-signed table, same bits
    sin = torch.cat([-sin[0, :, : D // 2], sin[0, :, D // 2:]], dim=-1)[:, None]  # [T, 1, D]
    cos = cos[0, :, None]  # [T, 1, D]
    T, n_qk = x.shape[0], n_heads + n_kv
    for layer in base.layers[: cfg.num_hidden_layers]:
        a = layer.self_attn
        qkv = F.linear(layer.input_layernorm(x), *_qkv_weights(a)).view(T, n_qk + n_kv, D)
        qk = qkv[:, :n_qk]
        qkv = torch.cat([qk * cos + qk.roll(D // 2, dims=-1) * sin, qkv[:, n_qk:]], dim=1)  # RoPE on q and k
        x = x + a.o_proj(_attention(qkv, lay, n_heads, n_kv, scale))
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


def _common_prefix(docs: list[list[int]]) -> int:
    """Length of the longest token prefix every document starts with."""
    first, n = docs[0], min(map(len, docs))
    for i in range(n):
        t = first[i]
        if any(d[i] != t for d in docs):
            return i
    return n


def pack_documents(docs: list[list[int]], device: torch.device | str = "cpu", share_prefix: bool = True) -> PackedLayout:
    """Stage 0's batch of documents as a packed layout: every token but a document's last predicts the next.

    With `share_prefix` and a common prefix of at least 2 tokens (zero-tiny's documents all start with the
    template's 27-token system text) the prefix runs once, as a GRPO prompt does for its G completions:
    the remainders are the "completions", attending to the prefix's keys and their own; a prediction inside
    the prefix is made once per document from the one hidden state. The prefix is cut one token short of the shortest
    document so that every remainder predicts something. Otherwise each document is a causal "prompt"
    with no completions."""
    lens = torch.tensor([len(d) for d in docs], device=device)  # [U]
    if not docs or bool((lens == 0).any()):
        raise R1KitError("pretrain: a batch holds an empty document")
    shared = min(_common_prefix(docs), int(lens.min()) - 1) if share_prefix and len(docs) > 1 else 0
    if shared >= 2:
        B, L = len(docs), shared
        rest = lens - L  # [B] >= 1
        prompt = torch.tensor(docs[0][:L], dtype=torch.long, device=device)
        comp = torch.zeros(B, int(rest.max()), dtype=torch.long, device=device)
        cmask = torch.arange(comp.shape[1], device=device)[None] < rest[:, None]  # [B, Tc]
        comp[cmask] = torch.tensor([t for d in docs for t in d[L:]], dtype=torch.long, device=device)
        ro = Rollout(prompt.expand(B, L), torch.ones(B, L, dtype=torch.long, device=device), comp, cmask.float(),
                     torch.zeros(cmask.shape, device=device), torch.zeros(B, dtype=torch.bool, device=device), B)
        lay = pack_rows(ro, torch.arange(B, device=device))
        # a remainder's last token (each document's end) predicts nothing: predictions are of completion
        # tokens (t >= 0, made by the token before), so pack_rows already has exactly those
        # prefix token i predicts prefix token i + 1 once per document: the same hidden state gathered B times
        # (the LM head on B copies costs little), so the loss and its gradient are the padded batch's sums
        inner = torch.arange(L - 1, device=device).repeat(B)
        lay.predictors = torch.cat([inner, lay.predictors])
        lay.targets = torch.cat([prompt[1:].repeat(B), lay.targets])
        return lay
    U, tp = len(docs), int(lens.max())
    valid = torch.arange(tp, device=device)[None] < lens[:, None]  # [U, tp]
    ids = torch.tensor([t for d in docs for t in d], dtype=torch.long, device=device)  # [T]
    view = torch.zeros(U * tp, dtype=torch.long, device=device)
    view[valid.reshape(-1)] = torch.arange(ids.numel(), device=device)
    positions = torch.arange(tp, device=device)[None].expand(U, tp)[valid]  # [T]
    is_last = torch.zeros(ids.numel(), dtype=torch.bool, device=device)
    is_last[lens.cumsum(0) - 1] = True
    predictors = (~is_last).nonzero().squeeze(1)  # [M]
    none = torch.zeros(0, dtype=torch.long, device=device)
    return PackedLayout(ids, positions, view, [], valid.reshape(-1).nonzero().squeeze(1), predictors, none, none,
                        ids[predictors + 1], torch.zeros(0, 0, dtype=torch.bool, device=device), U, tp, 0)


def packed_batch_loss(model: nn.Module, batch: list[list[int]], per: float | None = None,
                      share_prefix: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """`r1kit.trainers.pretrain.batch_loss` without padding: (objective, per-token mean loss) of next-token
    prediction on a batch of documents, the summed loss over `per` tokens (or the batch's own token count).
    A prefix shared by every document is computed once (`pack_documents`); its predictions count once per
    document, so the objective is the same sum over the same predictions."""
    lay = pack_documents(batch, next(model.parameters()).device, share_prefix)
    x = packed_hidden(model, lay)[lay.predictors]  # [M, H]
    logits = model.get_output_embeddings()(model.model.norm(x)).float()  # [M, V]
    total = F.cross_entropy(logits, lay.targets, reduction="sum")
    n = lay.targets.numel()
    return total / (n if per is None else per), total.detach() / n


def completion_logprobs(
    model: nn.Module, rollout: Rollout, idx: torch.Tensor, temperature: float, *, packed: bool,
    with_entropy: bool = False, entropy_grad: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """Logprobs (and entropies) [B, tc] of rollout rows `idx` and tc, packed when asked and possible,
    else by the padded `token_logprobs` (the reference computation)."""
    if packed:
        reason = packed_problem(model)
        if reason is None:
            lay = pack_rows(rollout, idx)
            window = sliding_window(model.config)
            if window is None or int(lay.positions.max()) < window:
                lp, ent = packed_token_logprobs(model, lay, temperature, with_entropy, entropy_grad)
                return lp, ent, lay.width
            reason = f"a sequence of {int(lay.positions.max()) + 1} tokens exceeds the sliding window {window}"
        # the default warning filter shows each distinct message once
        warnings.warn(f"grpo.packed_update: {reason}; using the padded forward", stacklevel=2)
    from r1kit.model import token_logprobs
    from r1kit.trainers.grpo import micro_inputs

    ids, mask, tc = micro_inputs(rollout, idx)
    lp, ent = token_logprobs(model, ids, mask, tc, temperature, with_entropy=with_entropy, entropy_grad=entropy_grad)
    return lp, ent, tc
