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

Pooling (trees of i.i.d. siblings, `DraftTree.pool`): siblings that drew the same token share their prefix, and
the draws below each of them are i.i.d. from the same law given everything a level's decision reads (a decision at
depth d reads depth-d tokens and uniforms only). So, as SpecTr's k-SEQ does over whole sequences, the walk may stand
on all of them at once and test the children of every one as that prefix's siblings: still lossless, more draws per
level. The walk then descends into the accepted child (whose ancestors are the path committed).

Work is vectorised over the batch; the loops run over depth and sibling rank (small), never over rows or vocabulary.
Uniforms: the accept test of the r-th sibling at depth d reads tag "accept" (r = 0, as the chain rule does) or
"accept<r>" at position n + d; the committed token reads "sample" at n + a when it is a bonus (a = accepted depth,
nothing rejected at its node) and "residual" otherwise, as for chains.
"""
from __future__ import annotations

import torch
from torch import Tensor

from specdec.protocols import Randomness
from specdec.random import draw_uniforms, sample_categorical
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


def recursive_select(x: Tensor, q_kids: Tensor, has: Tensor, p: Tensor, u: Tensor) -> tuple[Tensor, Tensor]:
    """Recursive rejection over one node's children in sibling order: x [B, K] their tokens, q_kids [B, K, V] their
    (sequential) laws, has [B, K] real children, p [B, V] the node's target law, u [B, K] accept uniforms ->
    (the accepted child's slot, -1 if none [B]; the residual r [B, V] left after the rejected ones)."""
    B, K = x.shape
    rows = torch.arange(B, device=x.device)
    residual = p
    pick = torch.full((B,), -1, dtype=torch.long, device=x.device)
    for r in range(K):
        test = has[:, r] & (pick < 0)
        q_i = q_kids[:, r]
        ok = test & (u[:, r] * q_i[rows, x[:, r]] < residual[rows, x[:, r]])
        res = (residual - q_i).clamp_min(0)                     # rejected: r loses this sibling's law
        empty = res.sum(-1, keepdim=True) <= 1e-9               # (where nothing is left, r itself stays)
        res = torch.where(empty, residual, res / res.sum(-1, keepdim=True).clamp_min(1e-30))
        residual = torch.where((test & ~ok)[:, None], res, residual)
        pick = torch.where(ok, r, pick)
    return pick, residual


def pooled_children(parents: Tensor, valid: Tensor, members: Tensor, K: int) -> tuple[Tensor, Tensor]:
    """The children of a set of nodes, members BoolTensor [B, N + 1] (column 0: the root, 1 + i: node i), in node
    order, at most K: -> (children LongTensor [B, K] padded with -1, BoolTensor [B, N]: which nodes are children)."""
    N = parents.shape[1]
    child = valid & members.gather(1, parents + 1)                                    # [B, N]
    idx = torch.arange(N, device=parents.device)
    kids = torch.where(child, idx, N).sort(-1).values[:, :K]                          # K <= N
    return torch.where(kids < N, kids, -1), child


def tree_walk(tokens: Tensor, parents: Tensor, valid: Tensor, q: Tensor | None, target_probs: Tensor,
              rng: Randomness, max_depth: int, max_children: int, select=recursive_select,
              pool: int = 0) -> TreeVerdict:
    """Walk down a batch of trees from the root: at each node `select` accepts one child (descend into it) or none
    (commit a token from the residual it returns and stop); a node with no children commits a bonus from its
    target law. tokens, parents [B, N], valid [B, N], q [B, N, V] (each node's law; None = one-hot),
    target_probs [B, 1 + N, V] (row 0: the root's output, row 1 + i: node i's); max_depth, max_children: static
    bounds of the tree's shape (max_children: one int, or one per depth, `DraftTree`); pool: 0, or (i.i.d.
    siblings, a lossless `select`) the most nodes of one depth: the walk stands on every sibling that drew the
    accepted token and tests all their children (the module doc) -> TreeVerdict."""
    B, N = tokens.shape
    V = target_probs.shape[-1]
    dev = tokens.device
    rows = torch.arange(B, device=dev)
    widths = tuple(max_children) if isinstance(max_children, (tuple, list)) else (max_children,) * max_depth
    K = min(pool, N) if pool else max(widths)
    if pool:                                                                 # the nodes the walk stands on: the root
        members = (torch.arange(N + 1, device=dev) == 0).expand(B, -1)
    else:
        table = children_table(parents, valid, K)                            # [B, N + 1, K]
    # every stream the walk may read, in one draw where rng allows (the order separate calls would take)
    *accepts, u_sample, u_residual = draw_uniforms(
        rng, [("accept" if r == 0 else f"accept{r}", max_depth) for r in range(K)]
        + [("sample", max_depth + 1), ("residual", max_depth + 1)])
    u_accept = torch.stack(accepts, -1)                                       # [B, max_depth, K]
    cur = torch.full((B,), -1, dtype=torch.long, device=dev)                 # the node the walk stands on
    law = target_probs[:, 0]                                                 # what a stop at cur commits from
    rejected = torch.zeros(B, dtype=torch.bool, device=dev)                  # the walk stopped on a rejection
    walking = torch.ones(B, dtype=torch.bool, device=dev)
    depth = torch.zeros(B, dtype=torch.long, device=dev)
    # the thin part of a static shape (every node at depth >= thin has at most one child: a tree's long spine) is
    # a chain below wherever the walk stands: recursive rejection there is the chain rule, tested in one vectorised
    # pass (`_chain_below`) instead of one loop iteration per depth; same uniforms, same verdicts
    thin = max_depth
    if not pool and select is recursive_select:
        while thin > 0 and widths[thin - 1] == 1:
            thin -= 1
    for d in range(thin if max_depth - thin > 1 else max_depth):
        width = K if pool else widths[d]             # siblings a node of this depth can have (static)
        if pool:
            kids, child = pooled_children(parents, valid, members, K)        # [B, K], [B, N]
        else:
            kids = table[rows, cur + 1, :width]                              # [B, width]
        has = walking[:, None] & (kids >= 0)
        c = kids.clamp_min(0)
        x = tokens.gather(1, c)
        q_kids = torch.nn.functional.one_hot(x, V).to(law.dtype) if q is None else q[rows[:, None], c]
        pick, residual = select(x, q_kids, has, target_probs[rows, cur + 1], u_accept[:, d, :width])
        moved = pick >= 0
        stop_here = walking & ~moved
        law = torch.where(stop_here[:, None], residual, law)
        rejected = rejected | (stop_here & has.any(1))
        cur = torch.where(moved, kids.gather(1, pick.clamp_min(0)[:, None])[:, 0], cur)
        if pool:                        # stand on every child that drew the accepted token: same prefix, same law
            same = child & (tokens == tokens.gather(1, cur.clamp_min(0)[:, None]))
            members = torch.cat([torch.zeros_like(members[:, :1]), same], 1)
        depth = depth + moved.long()
        walking = walking & moved
    if max_depth - thin > 1:
        cur, depth, stopped, residual = _chain_below(tokens, q, target_probs, table[:, :, 0], cur, depth, walking,
                                                     u_accept[:, thin:, 0])
        law = torch.where(stopped[:, None], residual, law)
        rejected = rejected | stopped
        walking = walking & ~stopped
    law = torch.where(walking[:, None], target_probs[rows, cur + 1], law)    # walked to the bottom: a bonus
    at = depth[:, None]
    u = torch.where(rejected, u_residual.gather(1, at)[:, 0], u_sample.gather(1, at)[:, 0])
    return TreeVerdict(depth, cur, sample_categorical(law, u))


def _chain_below(tokens: Tensor, q: Tensor | None, target_probs: Tensor, first_child: Tensor, cur: Tensor,
                 depth: Tensor, walking: Tensor, u: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Recursive rejection down the chain of only children below cur [B] (first_child [B, N + 1]: the first child
    of the root / of node c at column c + 1, -1 for none), for the m = u.shape[1] levels left, as the chain rule
    does: accept child j iff u[:, j] q_j(x_j) < p(x_j) under its parent's law, stop at the first rejection. Rows not
    walking stay put. -> (cur, depth advanced by the accepted run; stopped [B]: rejected on this chain; residual
    [B, V]: norm((p - q)+) at the rejected child, p where that is empty, as `recursive_select`)."""
    B, m = u.shape
    rows = torch.arange(B, device=tokens.device)
    chain, node = [], torch.where(walking, first_child[rows, cur + 1], -1)
    for _ in range(m):                                   # m gathers of [B], the nodes below cur
        chain.append(node)
        node = torch.where(node >= 0, first_child[rows, node + 1], -1)
    nodes = torch.stack(chain, 1)                                                  # [B, m], -1 past the end
    has = nodes >= 0
    c = nodes.clamp_min(0)
    x = tokens.gather(1, c)                                                        # [B, m]
    parent_rows = torch.cat([(cur + 1)[:, None], c[:, :-1] + 1], 1)                # each child's parent's output
    p_x = target_probs[rows[:, None], parent_rows, x]
    q_x = torch.ones_like(p_x) if q is None else q[rows[:, None], c, x]
    ok = has & (u * q_x < p_x)
    run = ok.long().cumprod(1).sum(1)                                              # accepted children [B]
    at = run.clamp_max(m - 1)[:, None]
    stopped = (run < m) & has.gather(1, at)[:, 0]                                  # a child tested and rejected
    new_cur = torch.where(run > 0, nodes.gather(1, (run - 1).clamp_min(0)[:, None])[:, 0], cur)
    p = target_probs[rows, new_cur + 1]
    rejected_node = c.gather(1, at)[:, 0]
    q_r = torch.nn.functional.one_hot(x.gather(1, at)[:, 0], p.shape[-1]).to(p.dtype) if q is None \
        else q[rows, rejected_node]
    res = (p - q_r).clamp_min(0)
    empty = res.sum(-1, keepdim=True) <= 1e-9
    residual = torch.where(empty, p, res / res.sum(-1, keepdim=True).clamp_min(1e-30))
    return new_cur, depth + run, stopped, residual


def recursive_rejection(tokens: Tensor, parents: Tensor, valid: Tensor, q: Tensor | None, target_probs: Tensor,
                        rng: Randomness, max_depth: int, max_children: int, pool: int = 0) -> TreeVerdict:
    """`tree_walk` with recursive rejection over siblings (the module doc): lossless given sequential q."""
    return tree_walk(tokens, parents, valid, q, target_probs, rng, max_depth, max_children, recursive_select, pool)
