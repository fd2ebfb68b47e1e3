"""THE place where logits become probabilities.

Order: classifier-free guidance mix `u + s * (c - u)` on logits, token mask, temperature, top-k, top-p, softmax.
Both p (target) and q (drafter) go through `to_probs` with the same `Sampling`, so rules always compare the
distributions the baseline really samples from. temperature == 0 gives one-hot argmax distributions, which turns
the exact rule into greedy exact-match.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


MIN_TEMPERATURE = 1e-6    # float32 logits up to ~3e32 stay finite when divided by it


@dataclass(frozen=True)
class Sampling:
    temperature: float = 1.0
    top_k: int = 0            # 0 = off
    top_p: float = 1.0        # 1.0 = off
    cfg_scale: float = 1.0    # 1.0 = no classifier-free guidance

    def __post_init__(self):
        for name in ("temperature", "top_p", "cfg_scale"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise TypeError(f"Sampling.{name} must be a number, got {type(v).__name__} {v!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int):
            raise TypeError(f"Sampling.top_k must be an integer (0 = off), got {type(self.top_k).__name__} "
                            f"{self.top_k!r}")
        if not (math.isfinite(self.temperature) and (self.temperature == 0 or self.temperature >= MIN_TEMPERATURE)):
            raise ValueError(f"temperature must be >= 0 (0 = greedy), finite, and not in (0, {MIN_TEMPERATURE}) "
                             f"(smaller ones overflow float32 logits into NaN probabilities), got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (1 = off), got {self.top_p}")
        if not (math.isfinite(self.cfg_scale) and self.cfg_scale >= 0):
            raise ValueError(f"cfg_scale must be a finite number >= 0 (1 = off), got {self.cfg_scale}")

    @property
    def uses_cfg(self) -> bool:
        return self.cfg_scale != 1.0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def mix_cfg(cond: Tensor, uncond: Tensor | None, scale: float) -> Tensor:
    """Classifier-free guidance on logits: u + s * (c - u). cond, uncond [..., V]."""
    if uncond is None or scale == 1.0:
        return cond
    return uncond + scale * (cond - uncond)


def to_probs(cond: Tensor, uncond: Tensor | None, sampling: Sampling, token_mask: Tensor | None = None) -> Tensor:
    """Logits [..., V] (cond and optional uncond) -> probabilities [..., V] in float32.

    token_mask: BoolTensor [V] of allowed tokens, or None.
    """
    logits = mix_cfg(cond.float(), None if uncond is None else uncond.float(), sampling.cfg_scale)
    if token_mask is not None:
        logits = logits.masked_fill(~token_mask, float("-inf"))
    if sampling.greedy:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    logits = logits / sampling.temperature
    if sampling.top_k and sampling.top_k < logits.shape[-1]:
        kth = logits.topk(sampling.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1)
    if sampling.top_p < 1.0:
        sorted_probs, order = probs.sort(-1, descending=True)
        # keep the smallest prefix whose mass reaches top_p (the token that crosses it is kept)
        drop_sorted = sorted_probs.cumsum(-1) - sorted_probs >= sampling.top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def nonfinite(*tensors: Tensor | None) -> Tensor:
    """A 0-d bool tensor, True if any logits hold NaN or +inf (-inf is a legitimate mask value). Kept on device:
    the engine checks it at its one per-step sync instead of adding a host sync per call. One reduction per tensor:
    a max propagates NaN, so `max < +inf` fails exactly when a NaN or a +inf is present."""
    flags = [~(t.amax() < float("inf")) for t in tensors if t is not None]
    return torch.stack(flags).any()


def nan_probs(p: Tensor) -> Tensor:
    """A 0-d bool tensor, True if probabilities p (finite where valid, so their sum is too) hold a NaN: one
    reduction, on device."""
    return torch.isnan(p.sum())
