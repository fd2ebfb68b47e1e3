"""The ARModel protocol: what the engine needs from a generator, and shared checks for adapters.

The engine speaks image-vocabulary ids 0..V-1 only; an adapter maps them to its model's own ids, restricts the
model's logits to the image vocabulary, and hides its prompt format, CFG doubling and cache layout.
"""
from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from specdec.sampling import Sampling
from specdec.types import Logits


@runtime_checkable
class ARModel(Protocol):
    vocab_size: int                    # image-token vocabulary seen by rules (V)
    num_tokens: int                    # tokens per image (T)
    grid: tuple[int, ...]              # (H, W) or (F, H, W), raster order
    codebook: Tensor | None            # [V, D] VQ code vectors (LANTERN geometry), if known
    token_embeddings: Tensor | None    # [V, D] LM input embeddings of the image tokens (GSD geometry), if known
    supports_cfg: bool                 # has an unconditional path
    max_new_tokens: int                # context limit for generated tokens (draft slack included)

    def start(self, cond: Tensor, sampling: Sampling, capacity: int) -> tuple[Any, Logits]:
        """Prefill the condition (doubling rows for CFG when sampling.cfg_scale != 1).
        cond [B, ...]; capacity = generated tokens the cache must hold. Returns (state, logits [B, 1, V] for
        image token 0)."""
        ...

    def forward(self, state: Any, tokens: Tensor) -> Logits:
        """Append tokens [B, n] (image ids) after each row's own length; logits [B, n, V] predict the next."""
        ...

    def rollback(self, state: Any, keep: Tensor) -> None:
        """Per row: keep the first keep[b] generated tokens in the cache, drop the rest."""
        ...

    def decode(self, tokens: Tensor) -> Tensor | None:
        """tokens [B, T] -> pixels [B, 3, H, W] in [-1, 1], or None when the adapter cannot decode."""
        ...


def check_capacity(model: ARModel, capacity: int) -> None:
    if capacity > model.max_new_tokens:
        raise ValueError(
            f"generation needs room for {capacity} tokens (num_tokens + draft slack) but the model's context "
            f"holds {model.max_new_tokens} generated tokens; lower num_tokens or k, or use a longer-context model")


def check_cfg(model: ARModel, sampling: Sampling) -> None:
    if sampling.uses_cfg and not model.supports_cfg:
        raise ValueError(
            f"cfg_scale={sampling.cfg_scale} needs an unconditional path, and {type(model).__name__} has none; "
            "use cfg_scale=1.0 or give the adapter an unconditional prompt")


def check_class_ids(cond: Tensor, num_classes: int) -> Tensor:
    """cond: LongTensor [B] of class ids in [0, num_classes)."""
    if not isinstance(cond, Tensor):
        cond = torch.as_tensor(cond)
    if cond.dim() != 1 or cond.dtype.is_floating_point or cond.dtype == torch.bool:
        raise TypeError(f"cond must be an integer tensor of shape [B] with one class id per image; "
                        f"got dtype {cond.dtype} and shape {tuple(cond.shape)}")
    if cond.numel() == 0:
        raise ValueError("cond is empty: pass at least one class id")
    bad = (cond < 0) | (cond >= num_classes)
    if bad.any():
        raise ValueError(f"class ids must be in [0, {num_classes}); got {cond[bad].tolist()}")
    return cond.long()
