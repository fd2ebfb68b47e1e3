"""Real (p, q) pairs from the zoo: target and drafter distributions at token positions of plain-AR samples.

What `specdec certify --zoo N` and the matched-TV study certify rules on, instead of random pairs.
"""
from __future__ import annotations

import torch
from torch import Tensor

from specdec.engine import generate
from specdec.sampling import Sampling, to_probs


def zoo_pairs(bundle, n_positions: int, sampling: Sampling, seed: int = 0) -> tuple[Tensor, Tensor]:
    """(p, q), each [n_positions, V]: target and drafter distributions (after `sampling`) at positions drawn
    uniformly from one AR sample of every class, both models reading the same tokens."""
    g = torch.Generator().manual_seed(seed)
    cond = torch.arange(len(bundle.classes))
    available = len(cond) * bundle.target.num_tokens
    if not 1 <= n_positions <= available:
        raise ValueError(f"the zoo gives {available} (p, q) pairs ({len(cond)} classes x {bundle.target.num_tokens} "
                         f"tokens); ask for 1 to {available}, got {n_positions}")
    tokens = generate(bundle.target, cond, sampling=sampling, seed=seed, decode=False).tokens      # [C, T]
    null = torch.full_like(cond, len(bundle.classes))                                              # CFG null class

    def probs(model):
        uncond = model.forward_train(tokens, null) if sampling.uses_cfg else None
        return to_probs(model.forward_train(tokens, cond), uncond, sampling)                       # [C, T, V]

    p, q = probs(bundle.target_gpt), probs(bundle.drafter_gpt)
    pick = torch.randperm(p.shape[0] * p.shape[1], generator=g)[:n_positions]
    return p.reshape(-1, p.shape[-1])[pick], q.reshape(-1, q.shape[-1])[pick]
