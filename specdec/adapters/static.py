"""The decode state and step of adapters whose model keeps a `StaticKVCache` (the project's GPT and LlamaGen).

gpt-fast style: one pre-allocated cache for all rows (CFG twins included), a per-row write pointer, explicit
positions. A step appends tokens after each row's own length; rollback only moves the pointers, so rows that
accepted different numbers of drafts stay independent and shapes never change.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from specdec.adapters.cfg import CFGRows
from specdec.cache import StaticKVCache
from specdec.protocols import ARModel
from specdec.tree import verify_inputs
from specdec.types import Logits


@dataclass
class StaticCacheState(CFGRows):
    """CFG rows (`CFGRows`), the static cache of all of them, and the condition slots in front of the image."""

    cache: StaticKVCache
    prefix: int


class StaticCacheAdapter(ARModel):
    """forward / rollback for a model with `step(tokens [rows, n], cache) -> logits [rows, n, V]` (self.model)."""

    @torch.no_grad()
    def forward(self, state: StaticCacheState, tokens: Tensor) -> Logits:
        logits = self.model.step(state.double(tokens), state.cache)
        return state.split(logits, state.cache.hidden)

    def rollback(self, state: StaticCacheState, keep: Tensor) -> None:
        state.cache.set_lengths(state.double(keep) + state.prefix)

    @torch.no_grad()
    def forward_tree(self, state: StaticCacheState, tree, last: Tensor, n_done: Tensor) -> Logits:
        """One forward over [last, tree nodes]: nodes take the slots after the root, attend their ancestors only
        (`specdec.tree.verify_inputs`), and sit at logical positions root + depth. The model needs `step_tree`."""
        slot0 = state.cache.lengths[: state.batch]
        tokens, positions, slots, allowed = verify_inputs(tree, n_done, last, slot0)
        return self.forward_tree_part(state, tokens, positions, slots, allowed, slot0)

    @torch.no_grad()
    def forward_tree_part(self, state: StaticCacheState, tokens: Tensor, positions: Tensor, slots: Tensor,
                          allowed: Tensor, base: Tensor) -> Logits:
        """Feed some nodes of a tree whose slots start at base [B]: tokens, positions (engine token positions),
        slots [B, n], allowed [B, n, m] over the tree's m slots -> Logits [B, n, V]. Drafters expand trees this
        way, level by level."""
        logits = self.model.step_tree(state.double(tokens), state.cache, state.double(positions + state.prefix),
                                      state.double(slots), state.double(allowed), state.double(base))
        return state.split(logits, state.cache.hidden)

    def commit_tree(self, state: StaticCacheState, tree, path: Tensor) -> None:
        """Move the K/V of the accepted path's nodes (path [B, D], -1 padded) right behind the root."""
        slot0 = state.cache.lengths[: state.batch, None] + 1
        dst = slot0 + torch.arange(path.shape[1], device=path.device)
        src = torch.where(path >= 0, slot0 + path, dst)                            # padding copies onto itself
        state.cache.move(state.double(src), state.double(dst))
