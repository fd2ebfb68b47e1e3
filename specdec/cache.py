"""KV caches with per-row lengths and rollback.

Two designs live here, one per kind of model:

* `StaticKVCache` for the project's own models (gpt-fast style): one pre-allocated buffer, every row has its own
  write pointer `lengths[b]`, slot s of row b holds logical position s. Rollback moves the pointer; the stale slots
  are simply overwritten later. Shapes never change, so the decode step is CUDA-graph friendly.
* `HoleMask` for transformers models, whose `Cache` objects grow for the whole batch at once: every forward appends
  n slots to all rows, and a per-row validity mask marks rejected slots as holes. Attention uses a 4-D mask built
  from it and explicit `position_ids` (the logical positions), so rows stay independent.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


class StaticKVCache:
    """Pre-allocated K/V buffers of shape [layers, B, heads, max_len, head_dim] with per-row lengths [B].

    prefix_valid: BoolTensor [B, P] or None. Which of the first P slots (a left-padded condition, e.g. LlamaGen's
    t2i caption) hold real tokens; a model that pads its prefix sets it at prefill and masks the padded slots in
    every later step. None: every slot below a row's length is real.
    """

    def __init__(self, layers: int, batch: int, heads: int, max_len: int, head_dim: int,
                 device=None, dtype=torch.float32):
        shape = (layers, batch, heads, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.lengths = torch.zeros(batch, dtype=torch.long, device=device)
        # the write's row and per-layer index tensors [B, 1], made once instead of per layer and step
        self._rows = torch.arange(batch, device=device)[:, None]
        self._layer_rows = torch.arange(layers, device=device)[:, None, None].repeat(1, batch, 1)
        self.max_len = max_len
        self.prefix_valid: Tensor | None = None
        # keep_hidden: the model stores its last forward's final hidden states [B, n, dim] in `hidden` (for
        # drafters that read the target's features); the cache is the per-generation state both already share
        self.keep_hidden = False
        self.hidden: Tensor | None = None

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    def positions(self, n: int) -> Tensor:
        """Logical positions [B, n] of the next n tokens of every row."""
        return self.lengths[:, None] + torch.arange(n, device=self.lengths.device)

    def write(self, layer: int, k: Tensor, v: Tensor, slots: Tensor) -> tuple[Tensor, Tensor]:
        """Store k, v [B, heads, n, head_dim] in `slots` [B, n] (a chain's slots are its logical positions; a draft
        tree's nodes take consecutive slots whatever their depth); return the full buffers of this layer."""
        rows, at = self._rows, self._layer_rows[layer]
        # one index_put on the whole buffer, not on the layer's view: a compiled step (torch.compile) turns a write
        # through a view into a copy of the whole buffer every step (at batch 8 four times the step's own cost).
        # Advanced indexing on dims (layer, B, S) puts them first: [B, n, heads, head_dim]
        self.k[at, rows, :, slots] = k.transpose(1, 2)
        self.v[at, rows, :, slots] = v.transpose(1, 2)
        return self.k[layer], self.v[layer]

    def tree_mask(self, slot0: Tensor, allowed: Tensor) -> Tensor:
        """Boolean mask [B, 1, n, max_len] for n inputs of a tree whose m slots start at slot0[b]: every input sees
        its row's prefix (slots < slot0) and, among slots slot0 .. slot0 + m - 1, those allowed[b, i, j]
        ([B, n, m]; n = m when the whole tree is fed at once, n < m when a drafter feeds it level by level)."""
        B, n, m = allowed.shape
        rel = torch.arange(self.max_len, device=slot0.device)[None] - slot0[:, None]             # [B, S]
        inside = (rel >= 0) & (rel < m)
        pick = allowed.gather(2, rel.clamp(0, m - 1)[:, None, :].expand(B, n, self.max_len))    # [B, n, S]
        return ((rel < 0)[:, None, :] | (inside[:, None, :] & pick))[:, None]

    def move(self, src: Tensor, dst: Tensor) -> None:
        """Copy the K/V of slots src [B, L] into slots dst [B, L] of every layer (a tree's accepted path moves
        behind the prefix; dst[b, j] <= src[b, j], and the right side is read whole before it is written)."""
        rows = torch.arange(src.shape[0], device=src.device)[:, None]
        self.k[:, rows, :, dst] = self.k[:, rows, :, src]
        self.v[:, rows, :, dst] = self.v[:, rows, :, src]

    def attention_mask(self, positions: Tensor) -> Tensor:
        """Boolean mask [B, 1, n, max_len]: query at logical position t sees slots 0..t of its own row."""
        slots = torch.arange(self.max_len, device=positions.device)
        return (slots[None, None, :] <= positions[:, :, None])[:, None]

    def advance(self, n: int) -> None:
        self.lengths += n

    def set_lengths(self, lengths: Tensor) -> None:
        self.lengths.copy_(lengths)


@dataclass
class HoleMask:
    """Per-row validity of the slots of a growing transformers cache.

    valid:   [B, S] bool, slot s of row b holds a committed (or not yet judged) token
    next_pos:[B] long, the logical position the next token of each row will take
    """

    valid: Tensor
    next_pos: Tensor

    @classmethod
    def from_prefix(cls, attention_mask: Tensor) -> "HoleMask":
        """attention_mask [B, P] (1 = real token, 0 = left padding) of the prefill."""
        valid = attention_mask.bool()
        return cls(valid=valid, next_pos=valid.sum(1).long())

    def prefill_inputs(self) -> tuple[Tensor, Tensor]:
        """For feeding the slots already in the mask (the prefix of `from_prefix`): (position_ids [B, S],
        boolean allowed [B, 1, S, S]). Causal over the valid slots; holes (left padding) are never attended and
        take no logical position of their own (position_ids clamp them to 0)."""
        S = self.valid.shape[1]
        causal = torch.ones(S, S, dtype=torch.bool, device=self.valid.device).tril()
        allowed = causal[None, None] & self.valid[:, None, None, :]
        positions = (self.valid.long().cumsum(1) - 1).clamp_min(0)
        return positions, allowed

    def extend(self, n: int) -> tuple[Tensor, Tensor]:
        """Append n slots to every row; return (position_ids [B, n], 4-D additive mask [B, 1, n, S + n])."""
        B, S = self.valid.shape
        device = self.valid.device
        positions = self.next_pos[:, None] + torch.arange(n, device=device)
        self.valid = torch.cat([self.valid, torch.ones(B, n, dtype=torch.bool, device=device)], 1)
        past = self.valid[:, None, :S].expand(B, n, S)
        causal = torch.ones(n, n, dtype=torch.bool, device=device).tril()[None].expand(B, n, n)
        allowed = torch.cat([past, causal], 2)[:, None]
        self.next_pos = self.next_pos + n
        return positions, allowed

    def extend_tree(self, offsets: Tensor, allowed: Tensor) -> tuple[Tensor, Tensor]:
        """Append n slots holding a draft tree's [root, nodes]: offsets [B, n] (0 for the root, a node's depth)
        give position_ids next_pos + offset; allowed [B, n, n] says which of the block each slot attends (its
        ancestors and itself), besides every valid slot before the block. -> (position_ids [B, n], boolean allowed
        [B, 1, n, S + n]). next_pos is left at the root's position; `keep_tree` settles it."""
        B, S = self.valid.shape
        n = offsets.shape[1]
        positions = self.next_pos[:, None] + offsets
        self.valid = torch.cat([self.valid, torch.ones(B, n, dtype=torch.bool, device=self.valid.device)], 1)
        allowed = torch.cat([self.valid[:, None, :S].expand(B, n, S), allowed], 2)[:, None]
        return positions, allowed

    def keep_tree(self, keep: Tensor, accepted: Tensor) -> None:
        """After `extend_tree` of n slots: keep [B, n] says which block slots stay (the root and the accepted
        path), the others become holes; accepted [B] path lengths move next_pos past the root and the path."""
        n = keep.shape[1]
        self.valid[:, -n:] = keep
        self.next_pos = self.next_pos + 1 + accepted

    def rollback(self, drop: Tensor) -> None:
        """Mark the last drop[b] slots of row b (all appended since the last commit) as holes."""
        B, S = self.valid.shape
        slots = torch.arange(S, device=self.valid.device)
        last_valid = torch.where(self.valid, slots, -1)
        # rank of each valid slot counted from the end of the row
        rank_from_end = self.valid.flip(1).long().cumsum(1).flip(1)
        kill = self.valid & (rank_from_end <= drop[:, None]) & (last_valid >= 0)
        self.valid = self.valid & ~kill
        self.next_pos = self.next_pos - drop
