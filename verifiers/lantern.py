"""LANTERN relaxed speculative decoding. LOSSY.

Jang et al., "LANTERN: Accelerating Visual Autoregressive Models with Relaxed Speculative Decoding", ICLR 2025,
arXiv 2410.03355 (delta mode); LANTERN++, arXiv 2502.06352 (lambda mode). Reference code: jadohu/LANTERN.

Notation: p = target distribution, q = draft distribution (both after specdec.sampling), x = draft token,
k = draft tokens per step, B batch, V vocabulary, K = `neighbours`, n_1..n_K = the K nearest codes of x in the VQ
codebook.

    c_j = sum_{i<=j} p(n_i),   j* = max{ j <= K : c_j <= budget } (0 if none),   p~(x) = p(x) + c_{j*}
    budget = delta (delta mode)  or  (lam - 1) * p(x) (lambda mode, LANTERN++)
    accept x iff U < min(1, p~(x) / q(x))
    rejection: y ~ norm((p'_x - q)+),  p'_x = p with p'_x(x) = p~(x) and the j* aggregated neighbours set to 0

Only the j* neighbours whose mass was credited to x are zeroed, so p'_x is a distribution (it moves c_{j*} from
those neighbours to x and nothing else). The reference code zeroes all K, which removes more mass than was
borrowed: p'_x then sums to less than 1, the residual pushes the mass of the uncredited neighbours onto the other
tokens, and the delta bound below no longer holds.

What it guarantees, plainly:
- delta mode: TV(p'_x, p) = c_{j*} <= delta for every draft token x.
- With a deterministic (one-hot) drafter, x is fixed given the context, and the step is exact speculative sampling
  against p'_x, so the emitted token's law is p'_x: within delta of p (per token).
- With a STOCHASTIC drafter the relaxed target p'_x changes with the sampled x, and the emitted law is a mixture that
  can be much farther than delta from p (e.g. flat p, q spread over half the vocabulary: every draft is accepted and
  the output law is q). Use `BoundedLanternRule` when a bound for any drafter is needed.
- lambda mode: c_{j*} <= (lam - 1) p(x), no fixed cap.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from specdec.geometry import TokenGeometry
from specdec.protocols import AcceptanceRule, Randomness
from specdec.types import TreeVerdict, Verdict
from verifiers._tree import tree_walk
from verifiers._kit import (NeighbourTable, accept_run, correction_uniform, neighbours_alias, relax,
                            relaxed_residual_sample, residual, step_uniforms, token_probs)


@neighbours_alias
@dataclass(frozen=True)
class LanternRule(NeighbourTable, AcceptanceRule):
    """geometry: TokenGeometry (or a raw [V, D] tensor) over the VQ codebook; neighbours: K, neighbours per token
    (clamped to V-1; `k=` is its deprecated alias); delta (default 0.1 when lam is None) or lam: the budget, one of
    the two."""

    geometry: TokenGeometry
    neighbours: int = 1000
    delta: float | None = None
    lam: float | None = None

    lossless = False
    name = "lantern"
    geometry_source = "codebook"           # the registry builds it over the target's VQ codebook

    def __post_init__(self):
        object.__setattr__(self, "geometry", TokenGeometry.coerce(self.geometry, "codebook"))
        if self.delta is not None and self.lam is not None:
            raise ValueError("give either delta (LANTERN budget) or lam (LANTERN++ budget), not both")
        if self.lam is not None:
            if not (self.lam >= 1):
                raise ValueError(f"lam must be >= 1 (p~(x) <= lam * p(x)), got {self.lam}")
        else:
            if self.delta is None:
                object.__setattr__(self, "delta", 0.1)
            if not (0.0 <= self.delta <= 1.0):
                raise ValueError(f"delta must be in [0, 1] (a total-variation budget), got {self.delta}")
        self._clamp_neighbours()

    def distortion_bound(self, one_hot_drafts: bool) -> float | None:
        """delta for deterministic (one-hot) drafts in delta mode; no bound for sampled drafts or lambda mode."""
        return float(self.delta) if self.lam is None and one_hot_drafts else None

    supports_trees = True

    def verify_tree(self, tree, target_probs: Tensor, rng: Randomness) -> TreeVerdict:
        """Draft trees, as LANTERN++ verifies static trees: the siblings are tested in order, each against its own
        relaxed target p'_x of the current residual r (accept iff U q_i(x) < p~(x)); a rejection continues with
        norm((p'_x - q_i)+). Guarantee as for chains: with deterministic siblings each tested candidate moves at
        most delta (delta mode), so at most m delta over m siblings tried in turn; none for sampled siblings."""
        def select(x, q_kids, has, p, u):
            B, K = x.shape
            rows = torch.arange(B, device=x.device)
            res_law, pick = p, torch.full((B,), -1, dtype=torch.long, device=x.device)
            for r in range(K):
                test = has[:, r] & (pick < 0)
                p_tilde, nbr, aggregated = self.relaxed(x[:, r:r + 1], res_law[:, None])
                q_i = q_kids[:, r]
                ok = test & (u[:, r] * q_i[rows, x[:, r]] < p_tilde[:, 0])
                p_rel = relax(res_law, nbr[:, 0], aggregated[:, 0], x[:, r], p_tilde[:, 0])
                left = residual(p_rel, q_i)
                res_law = torch.where((test & ~ok)[:, None], left / left.sum(-1, keepdim=True), res_law)
                pick = torch.where(ok, r, pick)
            return pick, res_law
        return tree_walk(tree.tokens, tree.parents, tree.valid(), tree.q, target_probs, rng, tree.max_depth,
                         tree.max_children, select)

    def relaxed(self, draft_tokens: Tensor, target_probs: Tensor):
        """draft_tokens [B, k], target_probs [B, >=k, V] -> (p_tilde [B, k], nbr [B, k, K], aggregated [B, k, K])."""
        k = draft_tokens.shape[1]
        idx, _ = self.geometry.neighbours(self.neighbours, draft_tokens.device)
        nbr = idx[draft_tokens]                      # [B, k, K]
        p = target_probs[:, :k]
        p_x = token_probs(p, draft_tokens)                                    # [B, k]
        c = p.gather(-1, nbr).cumsum(-1)                                      # [B, k, K]
        budget = p_x.new_full(p_x.shape, self.delta) if self.lam is None else (self.lam - 1.0) * p_x
        aggregated = c <= budget[..., None]                                   # a prefix: c is nondecreasing
        c_star = torch.where(aggregated, c, torch.zeros_like(c)).amax(-1)     # c_{j*}, 0 when j* = 0
        return p_x + c_star, nbr, aggregated

    @torch.no_grad()
    def single_step_law(self, p: Tensor, q: Tensor) -> tuple[Tensor, Tensor]:
        """Exact law of the first committed token of one single-draft step, x ~ q, and the acceptance probability:
        p, q [P, V] -> (law float64 [P, V], acceptance float64 [P]). Enumerates every draft x at once:

            law = sum_x q(x) [ a(x) e_x + (1 - a(x)) norm((p'_x - q)+) ],   a(x) = min(1, p~(x) / q(x))

        Memory [P, V, V]: pass P * V * V within reach (P = 64 at V = 512 is 64 MB)."""
        P, V = p.shape
        self.geometry.check_vocab(V, "LanternRule")
        p, q = p.double(), q.double()
        x = torch.arange(V, device=p.device).expand(P, V)                                 # every draft token
        p_tilde, nbr, aggregated = self.relaxed(x, p[:, None].expand(P, V, V))            # [P, V], [P, V, K] x2
        p_tilde = p_tilde.double()
        accept = torch.where(q > 0, (p_tilde / q.clamp_min(1e-300)).clamp_max(1), torch.zeros_like(q))
        p_rel = relax(p[:, None].expand(P, V, V), nbr, aggregated, x, p_tilde)             # [P, V(x), V]
        r = residual(p_rel, q[:, None])
        law = (q * accept).diag_embed() + ((q * (1 - accept))[..., None] * (r / r.sum(-1, keepdim=True)))
        return law.sum(1), (q * accept).sum(-1)

    def verify(self, draft_tokens: Tensor, draft_probs: Tensor, target_probs: Tensor,
               rng: Randomness) -> Verdict:
        """draft_tokens [B, k], draft_probs [B, k, V], target_probs [B, k+1, V] -> Verdict."""
        self.geometry.check_vocab(target_probs.shape[-1], "LanternRule")
        k = draft_tokens.shape[1]
        p_tilde, nbr, aggregated = self.relaxed(draft_tokens, target_probs)
        u_accept, u_sample, u_residual = step_uniforms(rng, k)
        n_accepted = accept_run(rng, p_tilde, token_probs(draft_probs, draft_tokens), u_accept)
        # the committed token: residual of p'_x (the relaxed target of the first rejected draft) minus q; bonus: p_{k+1}
        next_token = relaxed_residual_sample(target_probs, draft_probs, draft_tokens, n_accepted,
                                             correction_uniform(rng, n_accepted, k, (u_sample, u_residual)), nbr,
                                             aggregated, p_tilde)
        return Verdict(n_accepted, next_token)
