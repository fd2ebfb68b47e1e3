"""Adapter for the project's own class-conditional decoder (`specdec.models.gpt.GPT`, the zoo's models).

Static cache with a per-row write pointer: rollback just moves the pointer. CFG appends B null-class rows.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from specdec.adapters.base import check_capacity, check_cfg, check_class_ids
from specdec.adapters.cfg import CFGRows
from specdec.adapters.static import StaticCacheAdapter, StaticCacheState
from specdec.models.gpt import GPT
from specdec.sampling import Sampling
from specdec.types import Logits


class GPTAdapter(StaticCacheAdapter):
    """ARModel over `GPT`. grid: token layout (H, W); decode: tokens [B, T] -> pixels, optional."""

    prefix_len = 1
    supports_trees = True           # GPT.step_tree verifies a draft tree in one forward

    def __init__(self, model: GPT, grid: tuple[int, ...], codebook: Tensor | None = None,
                 decode: Callable[[Tensor], Tensor] | None = None):
        num = 1
        for g in grid:
            num *= g
        self.model = model.eval()
        self.grid = tuple(grid)
        self.num_tokens = num
        self.vocab_size = model.cfg.vocab_size
        self.num_classes = model.cfg.num_classes
        self.codebook = codebook
        self.token_embeddings = model.tok_emb.weight.detach()
        self.output_embeddings = model.head.weight.detach()
        self.supports_cfg = True
        self.hidden_size = model.cfg.dim            # start(..., hidden=True) returns the last hidden states
        self.max_new_tokens = model.cfg.max_len - self.prefix_len
        self._decode = decode
        self.can_decode = decode is not None     # without a decoder generate() returns tokens only

    @property
    def device(self) -> torch.device:
        return self.model.head.weight.device

    @torch.no_grad()
    def start(self, cond: Tensor, sampling: Sampling, capacity: int,
              hidden: bool = False) -> tuple[StaticCacheState, Logits]:
        cond = check_class_ids(cond, self.num_classes).to(self.device)
        check_cfg(self, sampling)
        check_capacity(self, capacity)
        rows = CFGRows(cond.shape[0], sampling.uses_cfg)
        classes = rows.stack(cond, lambda c: torch.full_like(c, self.model.null_class))
        cache = self.model.new_cache(classes.shape[0], max_len=self.prefix_len + capacity)
        cache.keep_hidden = hidden
        state = StaticCacheState(rows.batch, rows.cfg, cache, self.prefix_len)
        logits = self.model.prefill(classes, cache)[:, None]
        return state, state.split(logits, cache.hidden)

    @torch.no_grad()
    def decode(self, tokens: Tensor) -> Tensor | None:
        return None if self._decode is None else self._decode(tokens)
