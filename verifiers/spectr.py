"""SpecTr k-SEQ: optimal-transport-style selection among k i.i.d. drafts. LOSSLESS.

Sun et al., "SpecTr: Fast Speculative Decoding via Optimal Transport", NeurIPS 2023, arXiv 2310.15141.

Notation: p = target distribution, q = draft distribution (both after specdec.sampling), B batch, V vocabulary.
At a tree node whose k children X_1..X_k were drawn i.i.d. from q:

    beta(rho) = sum_v min(q(v), p(v) / rho);   rho* in [1, k] solves 1 - (1 - beta)^k = rho * beta   (bisection)
    for i = 1..k: accept X_i iff U_i < min(1, p(X_i) / (rho* q(X_i)));   none accepted: y ~ norm((p - rho* q)+)

Guarantee: emitting v by acceptance has probability min(q(v), p(v)/rho) (1 - (1 - beta)^k) / beta, which at rho* is
min(rho* q(v), p(v)); with the residual (p - rho* q)+ the committed token's law is exactly p. P(some draft accepted)
= 1 - (1 - beta*)^k, at least the single-draft sum_v min(p, q). k = 1 is standard speculative sampling, so chains are
verified exactly as by the exact rule. The children must be i.i.d. draws from their parent's q (e.g.
`TreeModelDrafter(drafts="iid")`); trees are walked level by level as in verifiers/_tree.py, which pools the children
of every sibling that drew the accepted token (k-SEQ over whole sequences: the drafts that agree so far stay in).
"""
from __future__ import annotations

import torch
from torch import Tensor

from specdec.protocols import Randomness
from specdec.types import TreeVerdict
from verifiers._tree import tree_walk
from verifiers.exact import ExactRule

BISECTION_STEPS = 40          # rho* to within (k - 1) / 2^40


def rho_star(p: Tensor, q: Tensor, k: Tensor) -> Tensor:
    """p, q [B, V], k [B] drafts (>= 1) -> rho* [B] in [1, k] with 1 - (1 - beta)^k = rho * beta."""
    lo, hi = torch.ones_like(k, dtype=p.dtype), k.to(p.dtype)
    for _ in range(BISECTION_STEPS):
        rho = (lo + hi) / 2
        beta = torch.minimum(q, p / rho[:, None]).sum(-1)
        above = 1 - (1 - beta) ** k - rho * beta > 0                 # f(rho) > 0: the root lies higher
        lo, hi = torch.where(above, rho, lo), torch.where(above, hi, rho)
    return (lo + hi) / 2


def kseq_select(x: Tensor, q_kids: Tensor, has: Tensor, p: Tensor, u: Tensor) -> tuple[Tensor, Tensor]:
    """k-SEQ over one node's children: x [B, K] tokens, q_kids [B, K, V] (i.i.d.: every child's law is the same
    q), has [B, K], p [B, V], u [B, K] -> (accepted child's slot or -1 [B], residual norm((p - rho* q)+) [B, V])."""
    B, K = x.shape
    q = q_kids[:, 0]
    k = has.sum(1).clamp_min(1)
    rho = rho_star(p, q, k)
    ratio = p.gather(1, x) / (rho[:, None] * q.gather(1, x)).clamp_min(1e-30)      # [B, K]
    ok = has & (u < ratio)
    first = torch.where(ok, torch.arange(K, device=x.device), K).min(1).values
    pick = torch.where(first < K, first, -1)
    res = (p - rho[:, None] * q).clamp_min(0)
    empty = res.sum(-1, keepdim=True) <= 1e-9
    residual = torch.where(empty | ~has.any(1, keepdim=True), p, res / res.sum(-1, keepdim=True).clamp_min(1e-30))
    return pick, residual


class SpecTrRule(ExactRule):
    """SpecTr k-SEQ on draft trees with i.i.d. siblings; on chains, the exact rule."""

    lossless = True
    name = "spectr"
    supports_trees = True

    def verify_tree(self, tree, target_probs: Tensor, rng: Randomness) -> TreeVerdict:
        return tree_walk(tree.tokens, tree.parents, tree.valid(), tree.q, target_probs, rng, tree.max_depth,
                         tree.max_children, kseq_select, tree.pool)
