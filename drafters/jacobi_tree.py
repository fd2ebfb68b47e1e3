"""Jacobi drafting with a shallow tree at the window's head (proactive drafting, after SJD-PAC, Kang et al., CVPR
2026, arXiv 2603.18599). Training-free, no extra model.

Guarantee: LOSSLESS with a tree rule that is lossless (ExactRule's recursive rejection over siblings drawn without
replacement, verifiers/_tree.py): every node is drawn from the sequential q it reports, given everything the
decision at its position reads (below).

Notation: p = target distribution, q = draft distribution (both after specdec.sampling), k = window - 1 drafts on
the spine, K = `branch` children per node near the root, D = `branch_depth`, B batch, V vocabulary, N tree nodes.

Why a tree. After a rejection at depth a, the next window's first slots carry laws computed on a context whose token
a was the rejected draft, not the committed correction: the head of the window is the stalest part of the tail, so
Jacobi steps often accept nothing there (in plain SJD about half of all steps accept no draft). Offering K
candidates at each of the first D positions gives the target more than one chance where a single draft is least
likely to survive, for no extra model call: one verification forward over N = k + (K + K^2 + .. + K^D - D) nodes.

Shape. The spine is the Jacobi chain of JacobiDrafter (its k drafts, coupled to the previous iterates as `coupling`
says). On top of it, the full K-ary tree of depth D whose first-child path is the spine's head: every node of depth
< D has K children. Child-rank paths: (0,)*d for d = 1..k, plus every path over ranks 0..K-1 of length <= D.

Laws. Let L_d be the spine's q at depth d (the stale tail law of that position, or the init's law for a fresh slot).
Every branch node of depth d is drawn from L_d, without replacement among its siblings: the r-th child's law is L_d
with the elder siblings' tokens removed and renormalised (that is the q it reports, the sequential q recursive
rejection tests it against). Where nothing is left (a one-hot L_d, e.g. a fresh slot copied from a neighbour, or
greedy decoding), the law is Uniform over the allowed tokens minus the elder siblings. The spine's own node is the
first child of its parent, so recursive rejection tests it first, exactly as the chain rule would.

Why it stays lossless. Recursive rejection accepts each child x_r with min(1, r(x_r) / q_r(x_r)) against the running
residual r, which is exact for any q_r that x_r was really drawn from given the elder siblings. The spine's node is
drawn from L_d (JacobiDrafter's argument: its law given everything a decision at its position reads is L_d); the
other children use uniforms keyed by (position, step) under the tag "jacobi_branch/<step>", fresh at every step and
read by nothing else. Nodes below a branch sibling also draw from L_d: any law is allowed, as long as it is the law
reported. The tree's depth is the spine's (k), so the bonus and residual uniforms are where the chain's are. The next
step's tail is the spine's outputs (the laws along the spine), so the coupling of successive iterates is the
chain's; off-spine outputs are dropped.
"""
from __future__ import annotations

import torch
from torch import Tensor

from drafters.jacobi import JacobiDrafter
from specdec.random import sample_categorical
from specdec.tree import DraftTree, shape_ancestors, shape_parents, shape_widths, static_shape


def branch_paths(k: int, branch: int, branch_depth: int, tails: int = 0) -> list[tuple[int, ...]]:
    """The shape as child-rank paths: a chain of k nodes (the spine), the full `branch`-ary tree of depth
    `branch_depth` around its head, and below each of its off-spine leaves a chain of `tails` first children (depth
    <= k)."""
    paths = {(0,) * d for d in range(1, k + 1)}
    level = [()]
    for _ in range(branch_depth):
        level = [path + (r,) for path in level for r in range(branch)]
        paths.update(level)
    for leaf in level:
        paths.update(leaf + (0,) * j for j in range(1, min(tails, k - branch_depth) + 1))
    return static_shape(sorted(paths))


class JacobiTreeDrafter(JacobiDrafter):
    """JacobiDrafter whose window's first `branch_depth` positions carry `branch` candidates each (module doc).
    window, init, init_q, coupling: as JacobiDrafter. The target must verify trees (GPTAdapter, LlamaGenAdapter,
    transformers adapters) and the rule must be a tree rule (ExactRule)."""

    def __init__(self, window: int = 16, init: str = "random", init_q: str = "onehot", coupling: str = "none",
                 branch: int = 2, branch_depth: int = 2, tails: int = 0):
        super().__init__(window, init, init_q, coupling)
        if not isinstance(branch, int) or isinstance(branch, bool) or branch < 2:
            raise ValueError(f"branch (candidates per position at the window's head) must be an integer >= 2, got "
                             f"{branch!r}; branch 1 is the chain: use JacobiDrafter")
        if not isinstance(branch_depth, int) or isinstance(branch_depth, bool) or not 1 <= branch_depth <= self.k:
            raise ValueError(f"branch_depth must be an integer in [1, window - 1 = {self.k}], got {branch_depth!r}")
        if not isinstance(tails, int) or isinstance(tails, bool) or tails < 0:
            raise ValueError(f"tails (copies of the spine below each off-spine leaf) must be an integer >= 0, got "
                             f"{tails!r}")
        self.branch, self.branch_depth, self.tails = branch, branch_depth, tails
        paths = branch_paths(self.k, branch, branch_depth, tails)
        parents, _, _ = shape_parents(paths)
        index = {path: i for i, path in enumerate(paths)}
        self.tree_size = len(paths)
        self.max_children = shape_widths(paths)
        self.parents = torch.tensor(parents)
        self.reach = shape_ancestors(parents)                                                  # [N, N]
        self.spine = torch.tensor([index[(0,) * d] for d in range(1, self.k + 1)])           # [k] node of depth d
        # the target's outputs along the spine, a chain's [root, d_1 .. d_k] rows of the [1 + N] tree outputs
        self.spine_rows = torch.cat([torch.zeros(1, dtype=torch.long), self.spine + 1])
        # nodes below the branched levels, off the spine: copies of the spine's node at their depth
        copies = [(index[p], len(p)) for p in paths if len(p) > branch_depth and p != (0,) * len(p)]
        self.copy_nodes = torch.tensor([i for i, _ in copies], dtype=torch.long)
        self.copy_spine = torch.tensor([d - 1 for _, d in copies], dtype=torch.long)
        # per branched depth d: the children [G_d, K] of every node of depth d - 1 that has K, the spine's first
        self.groups = []
        for d in range(1, branch_depth + 1):
            heads = [(0,) * (d - 1)] + sorted({p[:-1] for p in paths if len(p) == d} - {(0,) * (d - 1)})
            self.groups.append(torch.tensor([[index[h + (r,)] for r in range(branch)] for h in heads]))

    def start(self, ctx) -> None:
        super().start(ctx)
        dev = ctx.n_done.device
        for name in ("parents", "reach", "spine", "spine_rows", "copy_nodes", "copy_spine"):
            setattr(self, name, getattr(self, name).to(dev))
        self.groups = [g.to(dev) for g in self.groups]

    @torch.no_grad()
    def propose(self, k: int) -> DraftTree:
        chain = super().propose(k)                          # the spine: tokens [B, k], its laws; sets the step
        n = self.ctx.n_done
        B, N, V = n.shape[0], self.tree_size, self.uniform_q.shape[0]
        spine_q = chain.q(V).float()                                                      # [B, k, V]
        tokens = torch.zeros(B, N, dtype=torch.long, device=n.device)
        q = torch.zeros(B, N, V, device=n.device)
        tokens[:, self.spine] = chain.tokens
        q[:, self.spine] = spine_q
        allowed = self.uniform_q > 0                                                      # [V]
        for d, groups in enumerate(self.groups, start=1):
            G = groups.shape[0]
            law = spine_q[:, d - 1, None].expand(B, G, V)                                 # L_d for every group
            taken = torch.zeros(B, G, V, dtype=torch.bool, device=n.device)              # elder siblings' tokens
            u = self.ctx.streams.uniform_at(f"jacobi_branch/{self.step}", (n + d - 1)[:, None],
                                            slots=G * self.branch)[:, 0].view(B, G, self.branch)
            for r in range(self.branch):
                left = law.masked_fill(taken, 0.0)
                mass = left.sum(-1, keepdim=True)
                fallback = (allowed & ~taken).float()                                     # nothing left of L_d
                rank_q = torch.where(mass > 1e-12, left / mass.clamp_min(1e-30),
                                     fallback / fallback.sum(-1, keepdim=True).clamp_min(1.0))
                drawn = sample_categorical(rank_q, u[..., r])                             # [B, G]
                first = 1 if r == 0 else 0                 # rank 0 of the spine's group is the spine node itself
                if r == 0:
                    drawn[:, 0] = chain.tokens[:, d - 1]   # (what its younger siblings exclude)
                tokens[:, groups[first:, r]] = drawn[:, first:]
                q[:, groups[first:, r]] = rank_q[:, first:]
                taken = taken.scatter(2, drawn[..., None], True)
        tokens[:, self.copy_nodes] = chain.tokens[:, self.copy_spine]
        q[:, self.copy_nodes] = spine_q[:, self.copy_spine]
        return DraftTree(tokens, self.parents.expand(B, N).clone(), torch.full((B,), N, device=n.device), q,
                         self.k, self.max_children, reach=self.reach.expand(B, N, N))

    def observe(self, verdict, target_probs: Tensor) -> None:
        """target_probs [B, 1 + N, V], the tree's outputs: the spine's rows are the next step's tail laws."""
        super().observe(verdict, target_probs.index_select(1, self.spine_rows))
