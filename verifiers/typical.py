"""Medusa typical acceptance. LOSSY, no bound.

Cai et al., "Medusa: Simple LLM Inference Acceleration Framework with Multiple Decoding Heads", arXiv 2401.10774;
FasterDecoding/Medusa.

Notation: p = target distribution, q = draft distribution (both after specdec.sampling; q is not used), x = draft
token, k = draft tokens per step, B batch, V vocabulary, H(p) = -sum_v p(v) log p(v).

    accept x_i iff p_i(x_i) > min(epsilon, delta * exp(-H(p_i)));  n_accepted = the leading run of passes
    next token: a sample from p at the first failing position (or the bonus position p_{k+1})

What it guarantees: nothing. Tokens above the bar are kept at the drafter's rate, not at p's. At temperature 0
(one-hot p) it is argmax matching. Defaults are Medusa's medusa_generate values: epsilon = posterior_threshold =
0.09, delta = posterior_alpha = 0.3 (Medusa's evaluate_posterior has them swapped; not copied).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from specdec.protocols import AcceptanceRule, Randomness
from specdec.random import sample_categorical
from specdec.types import Verdict
from verifiers._kit import at_position, correction_uniform, leading_run, token_probs


@dataclass(frozen=True)
class TypicalRule(AcceptanceRule):
    """epsilon: the hard threshold (posterior_threshold); delta: the entropy-scaled one (posterior_alpha)."""

    epsilon: float = 0.09
    delta: float = 0.3

    lossless = False
    name = "typical"

    def __post_init__(self):
        if not 0 <= self.epsilon <= 1:
            raise ValueError(f"epsilon (posterior_threshold) must be in [0, 1], got {self.epsilon}")
        if not self.delta >= 0:
            raise ValueError(f"delta (posterior_alpha) must be >= 0, got {self.delta}")

    def threshold(self, p: Tensor) -> Tensor:
        """p [..., V] -> the acceptance bar [...]."""
        entropy = -(p * p.clamp_min(1e-30).log()).sum(-1)
        return torch.clamp(self.delta * torch.exp(-entropy), max=self.epsilon)

    def verify(self, draft_tokens: Tensor, draft_probs: Tensor, target_probs: Tensor,
               rng: Randomness) -> Verdict:
        """draft_tokens [B, k], draft_probs [B, k, V] (unused), target_probs [B, k+1, V] -> Verdict."""
        k = draft_tokens.shape[1]
        ok = token_probs(target_probs, draft_tokens) > self.threshold(target_probs[:, :k])
        n_accepted = leading_run(ok)
        u = correction_uniform(rng, n_accepted, k)
        return Verdict(n_accepted, sample_categorical(at_position(target_probs, n_accepted), u))
