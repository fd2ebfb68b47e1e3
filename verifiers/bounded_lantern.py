"""Bounded LANTERN: latent-neighbour relaxation with a total-variation bound for ANY drafter. LOSSY, BOUNDED.

New in specdec; the neighbourhood idea is LANTERN's (Jang et al., ICLR 2025, arXiv 2410.03355), the verification
is standard speculative sampling (Leviathan et al. arXiv 2211.17192; Chen et al. arXiv 2302.01318).

Notation: p = target distribution, q = draft distribution (both after specdec.sampling), x = draft token,
k = draft tokens per step, B batch, V vocabulary, N_K(v) = the K nearest codes of v in the VQ codebook.

Per position, ONE relaxed target p~ is built from (p, q, geometry), before and independently of the sampled draft:
mass is moved from surplus tokens (p > q) to deficit tokens (q > p), only from u to v where u is in N_K(v), at most
delta in total. Then exact speculative sampling runs against p~:

    accept x iff U < min(1, p~(x) / q(x));   rejection: y ~ norm((p~ - q)+);   bonus: y ~ p_{k+1}

Guarantee: the emitted token's law is exactly p~, so TV(emitted, p) <= (mass moved) <= delta per token, for any
drafter, stochastic or deterministic (a one-hot q is a function of the context, so p~ still is). Over T tokens the
sequence-level TV is at most T * delta. Each unit of moved mass raises the acceptance probability
sum_v min(p~(v), q(v)) by exactly one unit.

Transport scheme (vectorised greedy, `rounds` rounds): each deficit token v asks its neighbours' surplus for up to
its deficit, nearest first; requests on an over-asked surplus token are scaled down pro rata; the round's total is
scaled to the remaining budget. Memory: a few [B, k, V, K] tensors per step, so keep K small (default 16).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from specdec.geometry import TokenGeometry
from specdec.types import Randomness, Verdict
from verifiers.exact import correction_uniform, leading_run, residual_sample, token_probs


def transport(p: Tensor, q: Tensor, nbr: Tensor, delta: float, rounds: int = 3) -> Tensor:
    """The relaxed target p~ [..., V] for p, q [..., V] and the neighbour table nbr LongTensor [V, K]
    (mass may move from nbr[v, j] to v). Moves at most delta in total, only from p > q to q > p tokens."""
    V, K = nbr.shape
    surplus = (p - q).clamp_min(0)
    deficit = (q - p).clamp_min(0)
    budget = torch.full(p.shape[:-1] + (1,), float(delta), dtype=p.dtype, device=p.device)
    gain = torch.zeros_like(p)
    loss = torch.zeros_like(p)
    flat_nbr = nbr.reshape(-1)                                                  # [V*K]
    for _ in range(rounds):                                                     # a fixed, small number of rounds
        avail = surplus[..., flat_nbr].reshape(*p.shape, K)                     # [..., V, K] surplus of v's nbrs
        before = avail.cumsum(-1) - avail                                       # asked from nearer nbrs already
        ask = torch.minimum(avail, (deficit[..., None] - before).clamp_min(0))  # nearest first, up to deficit
        asked = torch.zeros_like(p).index_add_(-1, flat_nbr, ask.reshape(*p.shape[:-1], V * K))
        share = torch.where(asked > surplus, surplus / asked.clamp_min(1e-30), torch.ones_like(asked))
        grant = ask * share[..., flat_nbr].reshape(*p.shape, K)
        total = grant.sum((-2, -1))[..., None]                                  # [..., 1]
        scale = torch.where(total > budget, budget / total.clamp_min(1e-30), torch.ones_like(total))
        grant = grant * scale[..., None]
        received = grant.sum(-1)                                                # [..., V]
        given = torch.zeros_like(p).index_add_(-1, flat_nbr, grant.reshape(*p.shape[:-1], V * K))
        gain = gain + received
        loss = loss + given
        surplus = (surplus - given).clamp_min(0)
        deficit = (deficit - received).clamp_min(0)
        budget = (budget - received.sum(-1, keepdim=True)).clamp_min(0)
    return (p + gain - loss).clamp_min(0)


@dataclass(frozen=True)
class BoundedLanternRule:
    """geometry: TokenGeometry over the VQ codebook; k: neighbours per token (clamped to V-1); delta in [0, 1]:
    the TV budget per token; rounds: transport rounds (>= 1)."""

    geometry: TokenGeometry
    k: int = 16
    delta: float = 0.1
    rounds: int = 3

    lossless = False
    name = "bounded_lantern"

    def __post_init__(self):
        object.__setattr__(self, "geometry", TokenGeometry.coerce(self.geometry, "codebook"))
        if not (0.0 <= self.delta <= 1.0):
            raise ValueError(f"delta must be in [0, 1] (a total-variation budget), got {self.delta}")
        if not isinstance(self.rounds, int) or self.rounds < 1:
            raise ValueError(f"rounds must be an integer >= 1, got {self.rounds!r}")
        object.__setattr__(self, "k", self.geometry.clamp_k(self.k, "BoundedLanternRule"))

    def relaxed_target(self, target_probs: Tensor, draft_probs: Tensor) -> Tensor:
        """target_probs [B, k(+1), V], draft_probs [B, k, V] -> p~ [B, k, V] for the k draft positions."""
        k = draft_probs.shape[1]
        if self.delta == 0:
            return target_probs[:, :k]
        idx, _ = self.geometry.neighbours(self.k, target_probs.device)
        return transport(target_probs[:, :k], draft_probs, idx, self.delta, self.rounds)

    def verify(self, draft_tokens: Tensor, draft_probs: Tensor, target_probs: Tensor,
               rng: Randomness) -> Verdict:
        """draft_tokens [B, k], draft_probs [B, k, V], target_probs [B, k+1, V] -> Verdict."""
        self.geometry.check_vocab(target_probs.shape[-1], "BoundedLanternRule")
        k = draft_tokens.shape[1]
        p_tilde = self.relaxed_target(target_probs, draft_probs)                 # [B, k, V]
        ok = rng.uniform("accept", k) * token_probs(draft_probs, draft_tokens) < token_probs(p_tilde, draft_tokens)
        n_accepted = leading_run(ok)
        relaxed = torch.cat([p_tilde, target_probs[:, k:]], 1)                  # bonus position keeps p_{k+1}
        next_token = residual_sample(relaxed, draft_probs, n_accepted, correction_uniform(rng, n_accepted, k))
        return Verdict(n_accepted, next_token)
