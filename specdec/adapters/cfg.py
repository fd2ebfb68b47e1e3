"""The rows of classifier-free guidance, shared by every adapter.

CFG (Ho & Salimans, "Classifier-Free Diffusion Guidance", arXiv 2207.12598; for AR image generators as in LlamaGen,
arXiv 2406.06525) runs every conditional row b next to an unconditional twin: the model's batch holds the B
conditional rows first and their B unconditional rows after them, and `specdec.sampling` mixes
`uncond + s * (cond - uncond)`. Adapters keep that layout here and nowhere else: `stack` builds the 2B conditions,
`double` repeats per-row inputs (tokens, keep-lengths) for the twins, `split` hands the engine `Logits(cond, uncond)`.
Without CFG all three are the identity (B rows, `Logits(cond)`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, TypeVar

import torch
from torch import Tensor

from specdec.types import Logits

Rows = TypeVar("Rows", Tensor, list)


@dataclass
class CFGRows:
    """batch: conditional rows B the engine sees; cfg: whether B unconditional rows follow them in the model.
    Adapter states inherit it, so `state.double(tokens)` and `state.split(logits)` read the state's own layout."""

    batch: int
    cfg: bool

    def stack(self, cond: Rows, uncond: Callable[[Rows], Rows]) -> Rows:
        """Conditions of the B rows [B, ...] (a tensor, or a list of per-row tensors) -> the model's rows:
        cond followed by uncond(cond) with CFG, cond alone without (uncond is then never called)."""
        if not self.cfg:
            return cond
        if isinstance(cond, list):
            return cond + uncond(cond)
        return torch.cat([cond, uncond(cond)])

    def double(self, x: Tensor) -> Tensor:
        """A per-row input [B, ...] (tokens, keep-lengths, masks) -> [rows, ...]: the twins get the same values."""
        return torch.cat([x, x]) if self.cfg else x

    def split(self, logits: Tensor, hidden: Tensor | None = None) -> Logits:
        """Model logits [rows, n, V] (and last hidden states [rows, n, H]) -> Logits(cond [B, n, V], uncond
        [B, n, V] or None, hidden [B, n, H] of the conditional rows or None)."""
        hidden = None if hidden is None else hidden[: self.batch]
        if not self.cfg:
            return Logits(logits, None, hidden)
        return Logits(logits[: self.batch], logits[self.batch:], hidden)
