"""Tiny random stand-ins for tests, CI and smoke runs: real model classes with random weights, on CPU.

`tiny_gpt` is a random target, `perturbed_copy` a drafter related to it, and `tiny_random_bundle` a stand-in for
the zoo bundle (target, drafter, decoder, feature net, classes) that the bench's "tiny-random" generator serves.
Seeds are part of the contract: tests compare exact counters of runs built from these.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor

from specdec.adapters import GPTAdapter
from specdec.models.gpt import GPT, GPTConfig


def tiny_gpt(vocab=64, grid=(4, 4), dim=64, layers=2, heads=4, classes=3, seed=0, sharpen=1.0, max_len=None):
    """A random GPTAdapter. sharpen scales the output head (random heads give near-uniform p otherwise)."""
    torch.manual_seed(seed)
    tokens = 1
    for g in grid:
        tokens *= g
    model = GPT(GPTConfig(vocab_size=vocab, num_classes=classes, dim=dim, n_layers=layers, n_heads=heads,
                          max_len=max_len or tokens + 40))
    with torch.no_grad():
        model.head.weight.mul_(sharpen)
    return GPTAdapter(model, grid=grid)


def _noisy_copy(model: GPT, noise: float, randn: Callable[[Tensor], Tensor]) -> GPT:
    """A copy of `model` with every parameter moved by noise * std(parameter) * randn(parameter)."""
    copy = GPT(model.cfg)
    copy.load_state_dict(model.state_dict())
    with torch.no_grad():
        for p in copy.parameters():
            p.add_(noise * p.std() * randn(p))
    return copy


def perturbed_copy(adapter: GPTAdapter, noise: float, seed: int = 1) -> GPTAdapter:
    """A drafter that is the target with noisy weights: related enough to be accepted often, not always."""
    torch.manual_seed(seed)
    return GPTAdapter(_noisy_copy(adapter.model, noise, torch.randn_like), grid=adapter.grid)


class FakeFeatureNet(torch.nn.Module):
    """A fixed random projection of 4x4-pooled pixels: .features(images [N, 3, H, W]) -> [N, dim]."""

    def __init__(self, dim: int = 16, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.proj = torch.nn.Parameter(torch.randn(48, dim, generator=g) / math.sqrt(48), requires_grad=False)

    def features(self, images: Tensor) -> Tensor:
        pooled = torch.nn.functional.adaptive_avg_pool2d(images.float(), 4).flatten(1)        # [N, 48]
        return torch.tanh(pooled @ self.proj)


@dataclass
class TinyBundle:
    """A stand-in for the zoo bundle (`specdec.protocols.Bundle`), built from tiny random models."""

    target: Any
    drafter_model: Any
    tokenizer: Any
    features: Any
    classes: list
    target_gpt: Any
    pixels: int = 8
    eagle_head: Any = None

    def class_id(self, name) -> int:
        if isinstance(name, int) or (isinstance(name, str) and name.isdigit()):
            i = int(name)
            if 0 <= i < len(self.classes):
                return i
        if name in self.classes:
            return self.classes.index(name)
        raise ValueError(f"unknown class {name!r}; valid classes: {', '.join(self.classes)}")

    def heldout_images(self, n: int, seed: int = 0, classes: Tensor | None = None) -> Tensor:
        """Random stand-ins for real crops [n, 3, pixels, pixels] (classes accepted and ignored: no photos here)."""
        g = torch.Generator().manual_seed(10_000 + seed)
        return (torch.rand(n, 3, self.pixels, self.pixels, generator=g) * 2 - 1)


def tiny_random_bundle(vocab: int = 64, grid=(4, 4), classes: int = 3, seed: int = 0,
                       dtype: str | torch.dtype | None = None, device: str | torch.device = "cpu") -> TinyBundle:
    """Random target (2 layers, width 64) and a noisy copy as drafter, both with 3x sharpened heads; decode = a fixed
    random colour per token, upsampled to 8x8 pixels. dtype: what the target, drafter and EAGLE head compute in
    (made in float32 on the CPU first, so every dtype and device holds the same weights, rounded); device: where
    they run."""
    g = torch.Generator().manual_seed(seed)
    target_model = tiny_gpt(vocab, grid, classes=classes, seed=seed).model
    draft_model = _noisy_copy(target_model, 0.3, lambda p: torch.randn(p.shape, generator=g))
    with torch.no_grad():               # sharpened after the copy: the noise scales with the unsharpened weights
        target_model.head.weight.mul_(3.0)
        draft_model.head.weight.mul_(3.0)
    code = torch.randn(vocab, 3, generator=g)                       # token -> colour
    codebook = torch.randn(vocab, 8, generator=g)
    pixels = 8

    def decode(tokens: Tensor) -> Tensor:
        img = code[tokens.cpu()].reshape(tokens.shape[0], grid[0], grid[1], 3).permute(0, 3, 1, 2)
        img = torch.nn.functional.interpolate(img, size=(pixels, pixels), mode="bilinear", align_corners=False)
        return torch.tanh(img)

    from specdec.models.eagle import EagleConfig, EagleHead
    from specdec.precision import as_dtype
    torch.manual_seed(seed)
    eagle = EagleHead(EagleConfig(dim=target_model.cfg.dim, n_heads=target_model.cfg.n_heads)).eval()
    for module in (target_model, draft_model, eagle):
        module.to(device=device, dtype=as_dtype(dtype))
    codebook = codebook.to(device)
    target = GPTAdapter(target_model, grid=tuple(grid), codebook=codebook, decode=decode)
    drafter = GPTAdapter(draft_model, grid=tuple(grid), codebook=codebook, decode=decode)
    return TinyBundle(target, drafter, None, FakeFeatureNet(), [f"c{i}" for i in range(classes)], target_model,
                      pixels, eagle)
