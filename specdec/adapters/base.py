"""Shared checks for adapters (the ARModel protocol itself is in `specdec.protocols`).

The engine speaks image-vocabulary ids 0..V-1 only; an adapter maps them to its model's own ids, restricts the
model's logits to the image vocabulary, and hides its prompt format, CFG doubling and cache layout.
"""
from __future__ import annotations

import torch
from torch import Tensor

from specdec.sampling import Sampling
from specdec.protocols import ARModel


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
