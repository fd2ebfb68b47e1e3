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
        return state.split(self.model.step(state.double(tokens), state.cache))

    def rollback(self, state: StaticCacheState, keep: Tensor) -> None:
        state.cache.set_lengths(state.double(keep) + state.prefix)
