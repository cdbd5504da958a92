"""The local engine's prefix cache: K/V of full token blocks, found again by a hash chain over token ids.

A block holds the K/V of `block_size` consecutive tokens [L, 2, Hkv, block_size, D], and is keyed by
hash((key of the block before it, its token ids)), so a key names the block's whole prefix: two prompts
share block i exactly when their first (i + 1) * block_size tokens agree. Lookups walk the chain from the
first block and stop at the first miss; every hit is checked against the stored token ids and parent key
(a hash collision is a miss, never wrong K/V).

Reference counts: a request holds its prompt's blocks (those it hit and those it stored) from admission
to finish (a system prompt in use by running requests is never evicted). Unreferenced blocks wait in LRU
order and are evicted, oldest first, when a new block would take the cache past its byte budget
(`cache_mb`); with nothing evictable, new blocks are simply not stored. A chain's blocks are released and
inserted deepest first, so a parent is always more recent than its children and eviction takes leaves
before the prefixes they hang on. Requests admitted in one step that share an uncached first block: all
but the first wait one step and then hit (Engine._defer_shared_misses).

The running batch reads a copy of the hit blocks in its prompt slot (see FastLlama's shared-prefix
layout), so prefill compute is what the cache saves; the cached K/V were computed with the weights at
the time, so the cache empties itself when a parameter changes (`check_weights`: an optimizer step bumps
the parameters' version counters) and on `Engine.load_weights`.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import nn

from r1kit.engine.api import CacheStats


@dataclass(eq=False)
class Block:
    key: int  # hash((parent key, tokens))
    parent: int | None  # key of the block before it (None for a first block)
    tokens: tuple[int, ...]  # its block_size token ids
    kv: torch.Tensor  # [L, 2, Hkv, block_size, D]
    refs: int = 0
    epoch: int = 0  # the cache's epoch when stored: a release after clear() leaves new blocks alone


def chain_keys(tokens: list[int], block_size: int, n_blocks: int) -> list[tuple[int, int | None, tuple[int, ...]]]:
    """(key, parent key, token ids) of the first n_blocks full blocks of `tokens`."""
    out, parent = [], None
    for i in range(n_blocks):
        block = tuple(tokens[i * block_size : (i + 1) * block_size])
        key = hash((parent, block))
        out.append((key, parent, block))
        parent = key
    return out


class PrefixCache:
    """Hash-chained, reference-counted K/V blocks under a byte budget (see the module docstring)."""

    def __init__(self, model: nn.Module, block_size: int, budget_bytes: int, bytes_per_token: int):
        if not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size must be an int >= 1, got {block_size!r}")
        self.model, self.block_size, self.budget_bytes = model, block_size, int(budget_bytes)
        self.block_bytes = bytes_per_token * block_size
        self._blocks: dict[int, Block] = {}
        self._lru: OrderedDict[int, None] = OrderedDict()  # unreferenced blocks, oldest first
        self._epoch = 0
        self._weights_fingerprint()
        self.hit_tokens = self.miss_tokens = self.evicted_blocks = self.stored_blocks = 0

    # -- lookups and references -----------------------------------------------------------------------

    def lookup(self, tokens: list[int], max_blocks: int) -> list[Block]:
        """The longest cached chain of full blocks at the start of `tokens` (at most max_blocks); each
        returned block gains a reference (give them back with `release`)."""
        hits = []
        for key, parent, block in chain_keys(tokens, self.block_size, max_blocks):
            found = self._blocks.get(key)
            if found is None or found.tokens != block or found.parent != parent:
                break
            hits.append(found)
        for block in hits:
            if block.refs == 0:
                self._lru.pop(block.key, None)
            block.refs += 1
        self.hit_tokens += len(hits) * self.block_size
        self.miss_tokens += len(tokens) - len(hits) * self.block_size
        return hits

    def has_prefix(self, tokens: list[int], n_blocks: int) -> bool:
        """Whether the first n_blocks full blocks of `tokens` are cached (no reference taken, no statistics)."""
        for key, parent, block in chain_keys(tokens, self.block_size, n_blocks):
            found = self._blocks.get(key)
            if found is None or found.tokens != block or found.parent != parent:
                return False
        return True

    def release(self, blocks: list[Block]) -> None:
        """Drop one reference on each block; unreferenced ones become evictable (deepest first, so the
        chain's first block ends most recent)."""
        for block in reversed(blocks):
            if block.epoch != self._epoch or block.refs == 0:
                continue  # stored before a clear(): no longer in the cache
            block.refs -= 1
            if block.refs == 0:
                self._lru[block.key] = None
                self._lru.move_to_end(block.key)

    def insert(self, tokens: list[int], kv: torch.Tensor, hold: bool = False) -> list[Block]:
        """Store the full blocks of `tokens` not cached yet; kv [L, 2, Hkv, >= n full, D] holds their K/V
        in position order. Returns the blocks stored, in chain order (fewer when the budget is all in use);
        hold: the caller keeps a reference on them (a running request on its prompt's blocks)."""
        n = min(len(tokens), kv.shape[3]) // self.block_size
        chain = chain_keys(tokens, self.block_size, n)
        new = []
        for i, (key, parent, block) in enumerate(chain):
            if key in self._blocks:
                if self._blocks[key].tokens != block or self._blocks[key].parent != parent:
                    break  # a hash collision: leave the resident block, stop this chain here
                continue
            new.append((i, key, parent, block))
        fit = 0  # the chain's first `fit` new blocks get room (a block without its parent is useless)
        while fit < len(new) and self._make_room(fit + 1):
            fit += 1
        stored = []
        for i, key, parent, block in reversed(new[:fit]):  # deepest first: parents end more recent
            kv_i = kv[:, :, :, i * self.block_size : (i + 1) * self.block_size].clone()
            self._blocks[key] = Block(key, parent, block, kv_i, int(hold), self._epoch)
            if not hold:
                self._lru[key] = None
            stored.append(self._blocks[key])
        self.stored_blocks += fit
        return stored[::-1]

    def _make_room(self, extra: int) -> bool:
        """Evict LRU blocks until `extra` more fit in the budget; False if they cannot."""
        while (len(self._blocks) + extra) * self.block_bytes > self.budget_bytes:
            if not self._lru:
                return False
            key, _ = self._lru.popitem(last=False)
            del self._blocks[key]
            self.evicted_blocks += 1
        return True

    # -- freshness ------------------------------------------------------------------------------------

    def clear(self) -> None:
        """Forget every block (references held by running requests become no-ops)."""
        self._blocks.clear()
        self._lru.clear()
        self._epoch += 1
        self._weights_fingerprint()

    def check_weights(self, rescan: bool = False) -> int:
        """Clear the cache if any parameter changed since the blocks were computed; -> the epoch (it
        changes with every clear: K/V computed in an older epoch must not be stored).

        Every call compares the parameters' version counters (an optimizer step or load_state_dict writes
        in place and bumps them; ~2 us). rescan also lists the module's parameters again and compares their
        storage (a parameter replaced or re-pointed without an in-place write; ~0.2 ms): the engine asks
        for it when a batch starts. Anything subtler: call Engine.load_weights().
        """
        if rescan:
            params = list(self.model.parameters())
            if [(id(p), p.data_ptr()) for p in params] != self._storage:
                self.clear()
                return self._epoch
        if [p._version for p in self._params] != self._versions:
            self.clear()
        return self._epoch

    def _weights_fingerprint(self) -> None:
        self._params = list(self.model.parameters())
        self._versions = [p._version for p in self._params]
        self._storage = [(id(p), p.data_ptr()) for p in self._params]

    def stats(self) -> CacheStats:
        return CacheStats(
            hit_tokens=self.hit_tokens,
            miss_tokens=self.miss_tokens,
            evicted_blocks=self.evicted_blocks,
            blocks_in_use=len(self._blocks),
            bytes_in_use=len(self._blocks) * self.block_bytes,
            extra={"budget_bytes": self.budget_bytes, "block_size": self.block_size,
                   "block_bytes": self.block_bytes, "referenced_blocks": len(self._blocks) - len(self._lru),
                   "stored_blocks": self.stored_blocks},
        )
