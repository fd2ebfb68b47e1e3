"""The EAGLE draft head (`specdec.models.eagle.EagleHead`) as a draft model the model drafters can drive.

The head's cache holds pairs: pair t = (feature h_t, token x_t) at position and slot t (no prefix). Its input feature
is the target's true feature for committed tokens (t < n_true, written by `drafters.eagle` from the target's hidden
states after each verification) and otherwise the head's own prediction from the pair before it: the previous slot
in a chain, the parent node's slot in a draft tree. Every forward stores its outputs per slot, so a child reads its
parent's prediction. The head's logits are its predicted features through the target's own output head, over the
target's image vocabulary; tokens enter through the target's own input embeddings (`bind`).

No CFG: the head sees the conditional rows' features only. Trained on the target's guided samples, its law
approximates the guided target; drafting is lossless with a lossless rule whatever the law.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from specdec.adapters.base import check_capacity
from specdec.cache import StaticKVCache
from specdec.models.eagle import EagleHead
from specdec.protocols import ARModel
from specdec.sampling import Sampling
from specdec.types import Logits


@dataclass
class EagleState:
    """cache: the head's K/V [rows = B]; true [B, S, H]: the target's features by position; out [B, S, H]: the
    head's predicted next feature by slot; n_true [B]: positions 0..n_true-1 have true features; rows [B, 1]: row
    indices for per-row gathers and writes (made once, not per call)."""

    cache: StaticKVCache
    true: Tensor
    out: Tensor
    n_true: Tensor
    rows: Tensor


class EagleAdapter(ARModel):
    """ARModel-shaped wrapper of an EagleHead, bound to one target (`bind`) before `start`."""

    supports_trees = True
    supports_cfg = False
    compilable = True            # static cache and feature buffers: a draft step is one graph (ModelDrafter compile)

    def __init__(self, head: EagleHead):
        if not isinstance(head, EagleHead):
            raise TypeError(f"EagleAdapter wraps a specdec.models.eagle.EagleHead, got {type(head).__name__}")
        self.head = head.eval()
        self.vocab_size = 0
        self.max_new_tokens = 1 << 30            # rotary positions: the cache is sized per generation

    @property
    def device(self) -> torch.device:
        return self.head.fuse.weight.device

    def bind(self, target: ARModel) -> None:
        """Share the target's input embeddings and output head; ValueError when the head cannot serve it."""
        dim = self.head.cfg.dim
        if target.hidden_size != dim:
            raise ValueError(f"the EAGLE head was trained on features of size {dim}, but the target "
                             f"({type(target).__name__}) has hidden size {target.hidden_size or 'unknown'}: an EAGLE "
                             f"head serves the target it was trained on; train one for this target "
                             f"(experiments/train_eagle.py)")
        if target.token_embeddings is None or target.output_embeddings is None:
            raise ValueError(f"an EAGLE head shares the target's input embeddings and output head, which "
                             f"{type(target).__name__} does not expose (token_embeddings / output_embeddings)")
        for name, table in (("token_embeddings", target.token_embeddings),
                            ("output_embeddings", target.output_embeddings)):
            if table.shape[-1] != dim:
                raise ValueError(f"the target's {name} have width {table.shape[-1]}, the EAGLE head {dim}")
        dtype = self.head.fuse.weight.dtype
        self.embed = target.token_embeddings.to(self.device, dtype)
        self.out_head = target.output_embeddings.to(self.device, dtype)
        self.vocab_size = target.vocab_size
        self.grid, self.num_tokens = target.grid, target.num_tokens

    @torch.no_grad()
    def start(self, cond, sampling: Sampling, capacity: int) -> tuple[EagleState, Logits]:
        if self.vocab_size == 0:
            raise ValueError("bind the EAGLE head to its target first (EagleAdapter.bind(target))")
        if sampling.uses_cfg:
            raise ValueError("the EAGLE head drafts without guidance (it reads the conditional features only): "
                             "draft with cfg_scale 1")
        check_capacity(self, capacity)
        B, dim, S = len(cond), self.head.cfg.dim, capacity + 2
        cache = self.head.new_cache(B, max_len=S)
        zeros = torch.zeros(B, S, dim, device=self.device, dtype=self.embed.dtype)
        state = EagleState(cache, zeros, zeros.clone(), torch.zeros(B, dtype=torch.long, device=self.device),
                           torch.arange(B, device=self.device)[:, None])
        return state, Logits(torch.zeros(B, 1, self.vocab_size, device=self.device))

    def _logits(self, state: EagleState, h: Tensor, slots: Tensor) -> Logits:
        state.out[state.rows, slots] = h
        return Logits((h @ self.out_head.T).float())

    @torch.no_grad()
    def forward(self, state: EagleState, tokens: Tensor) -> Logits:
        """Pairs for tokens [B, n] at each row's write pointer: true features below n_true, else the prediction
        of the previous slot."""
        pos = state.cache.positions(tokens.shape[1])
        rows = state.rows
        known = (pos < state.n_true[:, None])[..., None]
        feat = torch.where(known, state.true[rows, pos.clamp_max(state.true.shape[1] - 1)],
                           state.out[rows, (pos - 1).clamp_min(0)])
        h = self.head(feat, self.embed[tokens], pos, state.cache)
        state.cache.advance(tokens.shape[1])
        return self._logits(state, h, pos)

    @torch.no_grad()
    def forward_tree_part(self, state: EagleState, tokens: Tensor, positions: Tensor, slots: Tensor,
                          allowed: Tensor, base: Tensor) -> Logits:
        """Tree nodes (see `specdec.adapters.static.StaticCacheAdapter.forward_tree_part`): each node's input
        feature is its parent's prediction, the parent being its deepest strict ancestor in `allowed` (the root,
        slot base - 1, when it has none)."""
        m = allowed.shape[-1]
        node = slots - base[:, None]                                                   # [B, n]
        j = torch.arange(m, device=slots.device)
        parent = torch.where(allowed & (j < node[..., None]), j, -1).amax(-1)          # [B, n], -1: the root
        feat = state.out[state.rows, base[:, None] + parent]
        h = self.head(feat, self.embed[tokens], positions, state.cache, slots, state.cache.tree_mask(base, allowed))
        return self._logits(state, h, slots)

    def rollback(self, state: EagleState, keep: Tensor) -> None:
        state.cache.set_lengths(keep)

    def decode(self, tokens: Tensor) -> None:
        return None
