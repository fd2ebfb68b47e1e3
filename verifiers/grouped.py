"""GSD: Grouped Speculative Decoding. LOSSY, no bound.

So et al., "Grouped Speculative Decoding for Autoregressive Image Generation", ICCV 2025, arXiv 2508.07747.
Reference code: junhyukso/GSD.

Notation: p = target distribution, q = draft distribution (both after specdec.sampling), x = draft token,
k = draft tokens per step, B batch, V vocabulary, e = the LM input-embedding table (geometry), r = rank of x by p.

    G(x) = {x} + { t : rank(t) in [r - window, r + window), |p(t) - p(x)| < p_threshold, ||e_t - e_x||^2 < d_threshold }
    accept x (x itself is committed) iff U < min(1, sum_G p / sum_G q)
    rejection: y ~ norm((p - q)+)  (residual="standard", the paper's)  or
               y ~ norm((p_G - q)+), p_G = p with G \\ {x} zeroed  (residual="group")

What it guarantees: nothing. The distortion is set by window, p_threshold and d_threshold, and is measured
(specdec.certify), not promised. With one-hot q and residual="group" the emitted law is within sum_{G\\{x}} p of p.
Ranks come from ONE batched stable sort of p over [B, k, V] (ties broken by token id); no Python loops.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from specdec.geometry import TokenGeometry
from specdec.protocols import AcceptanceRule, Randomness
from specdec.types import Verdict
from verifiers._kit import accept_run, correction_uniform, relaxed_residual_sample, residual_sample, step_uniforms


@dataclass(frozen=True)
class GroupedRule(AcceptanceRule):
    """geometry: TokenGeometry over the LM input embeddings (squared L2 on them); window: candidate ranks
    [r - window, r + window); p_threshold, d_threshold: group membership; residual: "standard" | "group"."""

    geometry: TokenGeometry
    window: int = 7
    p_threshold: float = 0.15
    d_threshold: float = 0.5
    residual: str = "standard"

    lossless = False
    name = "grouped"
    geometry_source = "token_embeddings"   # the registry builds it over the target's input embeddings

    def __post_init__(self):
        object.__setattr__(self, "geometry", TokenGeometry.coerce(self.geometry, "token_embeddings"))
        if not isinstance(self.window, int) or self.window < 1:
            raise ValueError(f"window must be an integer >= 1, got {self.window!r}")
        if not self.p_threshold >= 0:
            raise ValueError(f"p_threshold must be >= 0 (0 = groups of one), got {self.p_threshold}")
        if not self.d_threshold >= 0:
            raise ValueError(f"d_threshold must be >= 0 (0 = groups of one), got {self.d_threshold}")
        if self.residual not in ("standard", "group"):
            raise ValueError(f"residual must be 'standard' or 'group', got {self.residual!r}")

    def prepare(self, device) -> None:
        """Place the embedding table on `device` before the first step."""
        self.geometry.prepare(device)

    def groups(self, draft_tokens: Tensor, target_probs: Tensor):
        """-> (cand LongTensor [B, k, 2w], keep BoolTensor [B, k, 2w]); invalid slots point at x and are not kept
        (the slot of x itself is kept)."""
        k = draft_tokens.shape[1]
        p = target_probs[:, :k]
        V = p.shape[-1]
        order = torch.sort(p, dim=-1, descending=True, stable=True).indices               # [B, k, V]
        rank_of = torch.empty_like(order).scatter_(-1, order, torch.arange(V, device=p.device).expand_as(order))
        r = rank_of.gather(-1, draft_tokens[..., None])                                   # [B, k, 1]
        ranks = r + torch.arange(-self.window, self.window, device=p.device)              # [B, k, 2w]
        valid = (ranks >= 0) & (ranks < V)
        x = draft_tokens[..., None]
        cand = torch.where(valid, order.gather(-1, ranks.clamp(0, V - 1)), x)
        p_x = p.gather(-1, x)
        close_p = (p.gather(-1, cand) - p_x).abs() < self.p_threshold
        close_e = self.geometry.squared_distance(cand, x.expand_as(cand)) < self.d_threshold
        is_x = ranks == r
        keep = is_x | (valid & close_p & close_e)
        return cand, keep

    def verify(self, draft_tokens: Tensor, draft_probs: Tensor, target_probs: Tensor,
               rng: Randomness) -> Verdict:
        """draft_tokens [B, k], draft_probs [B, k, V], target_probs [B, k+1, V] -> Verdict."""
        self.geometry.check_vocab(target_probs.shape[-1], "GroupedRule")
        k = draft_tokens.shape[1]
        cand, keep = self.groups(draft_tokens, target_probs)
        zero = torch.zeros((), dtype=target_probs.dtype, device=target_probs.device)
        p_g = torch.where(keep, target_probs[:, :k].gather(-1, cand), zero).sum(-1)
        q_g = torch.where(keep, draft_probs.gather(-1, cand), zero).sum(-1)
        u_accept, u_sample, u_residual = step_uniforms(rng, k)
        n_accepted = accept_run(rng, p_g, q_g, u_accept)
        u = correction_uniform(rng, n_accepted, k, (u_sample, u_residual))
        if self.residual == "standard":
            return Verdict(n_accepted, residual_sample(target_probs, draft_probs, n_accepted, u))
        # p_G: the group's other members removed, p(x) itself kept (slots pointing at x are never dropped)
        others = keep & (cand != draft_tokens[..., None])
        return Verdict(n_accepted, relaxed_residual_sample(target_probs, draft_probs, draft_tokens, n_accepted, u,
                                                           cand, others))
