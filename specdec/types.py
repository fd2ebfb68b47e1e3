"""The data that flows through the speculative loop. Every tensor's shape is in the docstring.

Notation: p = target distribution, q = draft distribution, both after `specdec.sampling` (CFG mix, temperature,
top-k, top-p, token mask). B = batch, k = draft tokens per step, V = image-token vocabulary, T = tokens per image.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor


@dataclass
class Draft:
    """A drafter's proposal for one step.

    tokens: LongTensor [B, k] draft tokens, in image-vocabulary ids.
    probs:  FloatTensor [B, k, V] the law each draft token was drawn from (q), or None when the drafts are a
            deterministic function of the context (q is then one-hot at the token; rules treat it so).
    """

    tokens: Tensor
    probs: Tensor | None = None

    def q(self, vocab_size: int) -> Tensor:
        """The draft distribution [B, k, V], materialising the one-hot case."""
        if self.probs is not None:
            return self.probs
        return torch.nn.functional.one_hot(self.tokens, vocab_size).float()


@dataclass
class Verdict:
    """A rule's decision for one step.

    n_accepted: LongTensor [B] leading draft tokens kept (0..k).
    next_token: LongTensor [B] the correction (sampled from the rule's residual) or, when all k were accepted,
                the bonus token sampled from p at position k+1.
    """

    n_accepted: Tensor
    next_token: Tensor


@dataclass
class TreeVerdict:
    """A rule's decision on a draft tree.

    n_accepted: LongTensor [B] accepted depth (length of the accepted root-to-node path, 0..max depth)
    node:       LongTensor [B] the deepest accepted node (-1: none, the root)
    next_token: LongTensor [B] the correction (after a rejection) or bonus token committed after the path
    """

    n_accepted: Tensor
    node: Tensor
    next_token: Tensor


@dataclass(repr=False)
class SpecStats:
    """Counters with vLLM / Spec-Bench definitions. Per-image counters are averaged over rows.

    target_forwards:      verification calls of the target (prefill excluded), summed over rows ("row-steps")
    draft_forwards:       drafter model calls, summed over rows (0 for training-free drafters)
    drafted, accepted:    draft tokens proposed / accepted, summed over rows
    committed:            tokens committed by verification steps (the prefill's first token excluded)
    accepted_per_position:[k] how many times draft position j was accepted
    drafted_per_position: [k] how many times draft position j was proposed
    acceptance_map:       BoolTensor [B, T]: token t of row b was committed from a draft
    forwards_per_row:     LongTensor [B]: target_forwards of each row (their spread gives MAL's standard error,
                          `specdec.metrics.mal_standard_error`)
    """

    batch_size: int = 0
    num_tokens: int = 0
    target_forwards: int = 0
    draft_forwards: int = 0
    drafted: int = 0
    accepted: int = 0
    committed: int = 0
    steps: int = 0
    accepted_per_position: Tensor | None = None
    drafted_per_position: Tensor | None = None
    acceptance_map: Tensor | None = None
    forwards_per_row: Tensor | None = None
    wall_s: float = 0.0
    target_s: float = 0.0
    draft_s: float = 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Committed tokens per target forward, bonus included: plain AR gives exactly 1.0."""
        return self.committed / self.target_forwards if self.target_forwards else 0.0

    @property
    def target_forwards_per_image(self) -> float:
        return self.target_forwards / self.batch_size if self.batch_size else 0.0

    def __repr__(self) -> str:
        """One readable line: the figures, with tensors summarised by their shape."""
        per_pos = self.as_dict()["acceptance_per_position"]
        per_pos = "[" + ", ".join(f"{x:.2f}" for x in per_pos) + "]" if per_pos is not None else "None"
        amap = "None" if self.acceptance_map is None else f"<{list(self.acceptance_map.shape)} bool>"
        return (f"SpecStats(batch={self.batch_size}, tokens={self.num_tokens}, "
                f"MAL={self.mean_accepted_length:.3f}, acceptance={self.acceptance_rate:.3f}, "
                f"target_forwards/image={self.target_forwards_per_image:.1f}, draft_forwards={self.draft_forwards}, "
                f"steps={self.steps}, acceptance_per_position={per_pos}, acceptance_map={amap}, "
                f"wall={self.wall_s:.3f}s (target {self.target_s:.3f}s, draft {self.draft_s:.3f}s))")

    def as_dict(self) -> dict[str, Any]:
        per_pos = None
        if self.accepted_per_position is not None and self.drafted_per_position is not None:
            per_pos = (self.accepted_per_position.float()
                       / self.drafted_per_position.clamp_min(1).float()).tolist()
        return {
            "batch_size": self.batch_size, "num_tokens": self.num_tokens,
            "target_forwards": self.target_forwards, "draft_forwards": self.draft_forwards,
            "drafted": self.drafted, "accepted": self.accepted, "committed": self.committed, "steps": self.steps,
            "acceptance_rate": self.acceptance_rate, "mean_accepted_length": self.mean_accepted_length,
            "target_forwards_per_image": self.target_forwards_per_image,
            "acceptance_per_position": per_pos,
            "wall_s": self.wall_s, "target_s": self.target_s, "draft_s": self.draft_s,
        }


@dataclass
class GenerationResult:
    """tokens: LongTensor [B, T]; images: FloatTensor [B, 3, H, W] in [-1, 1] when the adapter decodes."""

    tokens: Tensor
    stats: SpecStats
    images: Tensor | None = None
    extras: dict = field(default_factory=dict)


@dataclass
class Logits:
    """Raw target or drafter logits for n positions: cond [B, n, V]; uncond [B, n, V] when CFG is on.
    hidden [B, n, H]: the conditional rows' last hidden state (what the output head reads), when the adapter was
    started with hidden=True (learned feature drafters such as EAGLE read it); None otherwise."""

    cond: Tensor
    uncond: Tensor | None = None
    hidden: Tensor | None = None
