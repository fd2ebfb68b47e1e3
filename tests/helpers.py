"""Tiny random models for tests: real model classes, random weights, CPU."""
from __future__ import annotations

import torch

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


def perturbed_copy(adapter: GPTAdapter, noise: float, seed: int = 1) -> GPTAdapter:
    """A drafter that is the target with noisy weights: related enough to be accepted often, not always."""
    torch.manual_seed(seed)
    model = GPT(adapter.model.cfg)
    model.load_state_dict(adapter.model.state_dict())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(noise * p.std() * torch.randn_like(p))
    return GPTAdapter(model, grid=adapter.grid)
