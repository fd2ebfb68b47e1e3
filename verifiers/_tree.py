"""Recursive rejection over a draft tree (SpecInfer, Miao et al. arXiv 2305.09781; EAGLE, Li et al. arXiv
2401.15077), shared by the rules that verify trees.

Notation: p = target distribution, q = draft distribution (both after specdec.sampling). A node's children are
tested in sibling order (node index order). At node c with target law p_c:

    for each child x_i of c:  accept iff U < r(x_i) / q_i(x_i);  else r <- norm((r - q_i)+)      (r starts at p_c)
    a child accepted: descend into it (r <- p_child);  every child rejected (or none): commit y ~ r, stop

q_i is the law child i was drawn from given the earlier siblings: the parent's q for i.i.d. siblings, q with the
earlier siblings removed and renormalised for siblings drawn without replacement, one-hot for deterministic
(top-k) siblings. With that q_i each test is exact speculative sampling against the current residual, so the
committed token's law is p_c: LOSSLESS for all three kinds (a chain is the special case of one child per node).

Work is vectorised over the batch; the loops run over depth and sibling rank (small), never over rows or vocabulary.
Uniforms: the accept test of the r-th sibling at depth d reads tag "accept" (r = 0, as the chain rule does) or
"accept<r>" at position n + d; the committed token reads "sample" at n + a when it is a bonus (a = accepted depth,
nothing rejected at its node) and "residual" otherwise, as for chains.
"""
from __future__ import annotations

import torch
from torch import Tensor

from specdec.protocols import Randomness
from specdec.random import sample_categorical
from specdec.types import TreeVerdict


def children_table(parents: Tensor, valid: Tensor, K: int) -> Tensor:
    """LongTensor [B, N + 1, K]: the children of the root (row 0) and of node c (row c + 1) in sibling order,
    padded with -1; K = the most children a node may have (a static bound of the tree's shape: no host sync)."""
    B, N = parents.shape
    dev = parents.device
    same = (parents[:, :, None] == parents[:, None, :]) & valid[:, None, :] & valid[:, :, None]     # [B, N, N]
    rank = (same & torch.ones(N, N, dtype=torch.bool, device=dev).tril(-1)).sum(-1)                # earlier sibs
    valid = valid & (rank < K)
    table = torch.full((B, N + 1, K + 1), -1, dtype=torch.long, device=dev)
    row = torch.where(valid, parents + 1, 0)
    col = torch.where(valid, rank, K)                                         # invalid nodes land in a spare column
    table[torch.arange(B, device=dev)[:, None], row, col] = torch.where(valid, torch.arange(N, device=dev), -1)
    return table[:, :, :K]


def recursive_rejection(tokens: Tensor, parents: Tensor, valid: Tensor, q: Tensor | None, target_probs: Tensor,
                        rng: Randomness, max_depth: int, max_children: int) -> TreeVerdict:
    """tokens, parents [B, N], valid [B, N], q [B, N, V] (the sequential law of each node; None = one-hot),
    target_probs [B, 1 + N, V] (row 0: the root's output, row 1 + i: node i's); max_depth, max_children: static
    bounds of the tree's shape -> TreeVerdict."""
    B, N = tokens.shape
    V = target_probs.shape[-1]
    dev = tokens.device
    rows = torch.arange(B, device=dev)
    K = max_children
    table = children_table(parents, valid, K)                                # [B, N + 1, K]
    u_accept = torch.stack([rng.uniform("accept" if r == 0 else f"accept{r}", max_depth) for r in range(K)], -1)
    cur = torch.full((B,), -1, dtype=torch.long, device=dev)                 # the node the walk stands on
    residual = target_probs[:, 0].clone()                                    # r at the current node
    rejected_here = torch.zeros(B, dtype=torch.bool, device=dev)             # a sibling was rejected at cur
    walking = torch.ones(B, dtype=torch.bool, device=dev)
    depth = torch.zeros(B, dtype=torch.long, device=dev)
    for d in range(max_depth):
        moved = torch.zeros(B, dtype=torch.bool, device=dev)
        for r in range(K):
            child = table[rows, cur + 1, r]                                  # [B]
            test = walking & ~moved & (child >= 0)
            c = child.clamp_min(0)
            x = tokens[rows, c]
            q_i = torch.nn.functional.one_hot(x, V).to(residual.dtype) if q is None else q[rows, c]
            ok = test & (u_accept[:, d, r] * q_i[rows, x] < residual[rows, x])
            # rejected: the residual loses this sibling's law (where it has no mass left, r itself stays)
            res = (residual - q_i).clamp_min(0)
            empty = res.sum(-1, keepdim=True) <= 1e-9
            res = torch.where(empty, residual, res / res.sum(-1, keepdim=True).clamp_min(1e-30))
            residual = torch.where((test & ~ok)[:, None], res, residual)
            rejected_here = rejected_here | (test & ~ok)
            # accepted: descend; the next depth starts from the child's target law
            residual = torch.where(ok[:, None], target_probs[rows, c + 1], residual)
            rejected_here = rejected_here & ~ok
            cur = torch.where(ok, child, cur)
            moved = moved | ok
        depth = depth + moved.long()
        walking = walking & moved
    u_sample, u_residual = rng.uniform("sample", max_depth + 1), rng.uniform("residual", max_depth + 1)
    at = depth[:, None]
    u = torch.where(rejected_here, u_residual.gather(1, at)[:, 0], u_sample.gather(1, at)[:, 0])
    return TreeVerdict(depth, cur, sample_categorical(residual, u))
