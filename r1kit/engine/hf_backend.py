"""The engine's fallback backend: the model's own HF forward with a DynamicCache, for any causal LM that
takes position_ids (every architecture the fast Llama-family path does not cover). Same interface as
FastLlama (admit / decode / keep_rows / release)."""
from __future__ import annotations

import torch
from torch import nn


class HFBackend:
    """The model's own forward with a DynamicCache: correct for any causal LM that takes position_ids.

    Rows cannot join a running batch here (one prefill per batch): the scheduler admits requests for this
    backend only into an empty batch, so it batches less cleverly than the fast path.
    """

    supports_joins = False

    def __init__(self, model: nn.Module):
        self.model = model
        self.batch = 0

    def admit(self, ids: torch.Tensor, mask: torch.Tensor, counts: list[int], max_pos: int, gen_cols: int,
              past=None) -> torch.Tensor:
        if self.batch or past is not None:
            raise RuntimeError("the HF backend prefills only into an empty batch, without cached prefixes")
        pos = (mask.cumsum(-1) - 1).clamp(min=0)  # [P, Tp]
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
        self.cache = out.past_key_values
        P, Tp = ids.shape
        if len(set(counts)) == 1:
            self.cache.batch_repeat_interleave(counts[0])  # n rows per prompt, prefilled once
        else:
            self.cache.batch_select_indices(torch.arange(P, device=ids.device).repeat_interleave(
                torch.tensor(counts, device=ids.device)))
        rows = torch.tensor(counts, device=mask.device)
        self.attn = torch.ones(sum(counts), Tp + gen_cols, dtype=mask.dtype, device=mask.device)
        self.attn[:, :Tp] = mask.repeat_interleave(rows, 0)  # [N, Tp + max_new]
        self.length, self.batch = Tp, sum(counts)
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

    def keep_rows(self, keep: torch.Tensor, trim: bool = False) -> None:
        self.cache.batch_select_indices(keep)
        self.attn = self.attn[keep]
        self.batch = keep.numel()

    def release(self) -> None:
        self.cache = self.attn = None
        self.batch = 0
