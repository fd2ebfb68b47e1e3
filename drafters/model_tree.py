"""A draft model that proposes a static tree of drafts instead of a chain (SpecInfer, Miao et al. arXiv
2305.09781; static trees as in Medusa arXiv 2401.10774 and LANTERN++ arXiv 2502.06352).

Notation: p = target distribution, q = draft distribution (both after specdec.sampling), x = draft token, B batch,
V vocabulary, N tree nodes, D tree depth (the most tokens a step can accept).

The shape is fixed (`specdec.tree.static_shape`: "chain-K", "spine-D", "binary-D", "seqs-KxL", child-rank
paths, or "optimal-N[xD]": the N-node shape with the most expected accepted drafts for the drafter's measured
rank_acceptance profile, `specdec.tree.optimal_shape` after Sequoia, arXiv 2402.12374). Each step the drafter
feeds its committed tail as a chain (q at the root), then expands the tree level by level: the nodes of a level
that have children are fed in one forward (tree attention over their ancestors, `forward_tree_part`), and each of
them draws its children from its q in rank order:
  drafts="sample": without replacement; child r's law is q with the r earlier siblings removed and renormalised
                   (the sequential q the tree rule tests it against);
  drafts="iid":    independently from q (i.i.d. siblings, each tested against q; what SpecTr's k-SEQ needs);
  drafts="argmax": the r-th most likely token, q one-hot (deterministic drafts).
Under greedy sampling (temperature 0) every q is one-hot, so siblings are always the top-ranked tokens (ranked by
the drafter's temperature-1 law). D draft forwards per step whatever N. Guarantee: LOSSLESS with the exact rule's
recursive rejection (verifiers/_tree.py), for every kind of siblings, and with SpecTr's k-SEQ for i.i.d. ones.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from drafters.model import ModelDrafter
from specdec.protocols import ARModel
from specdec.random import sample_categorical
from specdec.sampling import to_probs
from specdec.tree import DraftTree, shape_ancestors, shape_parents, shape_preset, shape_widths, static_shape


class TreeModelDrafter(ModelDrafter):
    """ModelDrafter whose proposal is a static tree. shape: see the module doc; drafts: "sample" | "argmax";
    draft_cfg: the drafter's own guidance scale (None: the target's); rank_acceptance: the drafter's profile
    (`specdec.tree_profile`), needed by the "optimal-N" shapes only. The draft model needs a static cache with
    tree attention (the project's GPT)."""

    def __init__(self, model: ARModel, shape="spine-4", drafts: str = "sample", draft_cfg: float | None = None,
                 rank_acceptance=None, compile: bool | str = False):
        if model is None and rank_acceptance is None and isinstance(shape, str):
            kind, sizes = shape_preset(shape)          # parameters checked alone (a bench config): the profile
            if kind == "optimal":                      # comes with the model, a chain of as many nodes stands in
                shape = f"chain-{sizes[0]}"
        paths = static_shape(shape, rank_acceptance)
        parents, ranks, depths = shape_parents(paths)
        if drafts not in ("sample", "iid", "argmax"):
            raise ValueError(f"drafts must be 'sample' (siblings without replacement), 'iid' or 'argmax', "
                             f"got {drafts!r}")
        self.siblings = drafts
        super().__init__(model, k=max(depths), drafts="argmax" if drafts == "argmax" else "sample",
                         draft_cfg=draft_cfg, compile=compile)
        if model is not None and not model.supports_trees:    # None: parameters checked alone
            raise ValueError(f"a tree drafter needs a draft model that verifies trees (GPTAdapter); "
                             f"{type(model).__name__} does not")
        self.shape = paths
        self.tree_size = len(paths)
        self.max_children = shape_widths(paths)         # verification tests only the siblings each depth has
        # i.i.d. siblings that drew the same token share their prefix: a lossless rule pools their children, at most
        # the widest level of the shape (not for siblings drawn without replacement or top-ranked: they differ)
        self.pool = max(depths.count(d) for d in set(depths)) if drafts == "iid" else 0
        # the shape is static: which nodes each level draws (in rank order) and feeds is known here, once
        self.drawn = {d: sorted((i for i in range(len(paths)) if depths[i] == d), key=lambda i: ranks[i])
                      for d in range(1, self.k + 1)}
        self.fed = {d: [i for i in range(len(paths)) if depths[i] == d and i in set(parents)]
                    for d in range(1, self.k + 1)}
        self.parent_list = parents
        self.parents = torch.tensor(parents)
        self.depths = torch.tensor(depths)
        self.ancestors = shape_ancestors(parents)        # [N, N]: node j is node i or one of its ancestors

    def start(self, ctx) -> None:
        super().start(ctx)
        # greedy decoding makes every q one-hot: rank siblings by the temperature-1 law and draft them as top-k
        self.deterministic = self.siblings == "argmax" or self.sampling.greedy
        self.rank_sampling = dataclasses.replace(self.sampling, temperature=1.0) if self.sampling.greedy \
            else self.sampling
        dev = ctx.n_done.device
        for name in ("parents", "depths", "ancestors"):
            setattr(self, name, getattr(self, name).to(dev))
        self.fed_index = {d: torch.tensor(nodes, dtype=torch.long, device=dev) for d, nodes in self.fed.items()}

    def _children(self, parent_q: Tensor, level: int, tokens: Tensor, q: Tensor, u: Tensor) -> None:
        """Draw the nodes of depth `level` from their parents' q (parent_q [B, N + 1, V], row 0: the root) in rank
        order, writing tokens [B, N] and their sequential q [B, N, V] in place."""
        remaining = parent_q.clone()
        for i in self.drawn[level]:                                       # rank order: elder siblings first
            row = self.parent_list[i] + 1
            law = remaining[:, row]
            if self.deterministic:
                tok = law.argmax(-1)
                q[:, i] = torch.nn.functional.one_hot(tok, law.shape[-1]).to(law.dtype)
            else:
                tok = sample_categorical(law, u[:, i])
                q[:, i] = law / law.sum(-1, keepdim=True)
            tokens[:, i] = tok
            if self.deterministic or self.siblings != "iid":
                rest = law.scatter(1, tok[:, None], 0.0)                  # the next sibling's law
                remaining[:, row] = rest / rest.sum(-1, keepdim=True).clamp_min(1e-30)

    @torch.no_grad()
    def propose(self, k: int) -> DraftTree:
        ctx = self.ctx
        n = ctx.n_done
        B, N = n.shape[0], self.tree_size
        logits = self.feed_root()
        V = logits.cond.shape[-1]
        parent_q = torch.zeros(B, N + 1, V, device=n.device)
        parent_q[:, 0] = to_probs(logits.cond[:, -1], None if logits.uncond is None else logits.uncond[:, -1],
                                  self.rank_sampling, ctx.token_mask)
        tokens = torch.zeros(B, N, dtype=torch.long, device=n.device)
        q = torch.zeros(B, N, V, device=n.device)
        u = ctx.streams.uniform_at("tree_draft", n[:, None], slots=N)[:, 0]           # [B, N]
        base = self.state.cache.lengths[:B]                  # the first node's slot: right after the root
        for level in range(1, self.k + 1):
            self._children(parent_q, level, tokens, q, u)
            if not self.fed[level]:
                break
            feed_nodes = self.fed_index[level]
            parent_q[:, feed_nodes + 1] = self._level(
                self.model, self.state, tokens[:, feed_nodes], (n - 1)[:, None] + self.depths[feed_nodes][None],
                base[:, None] + feed_nodes[None], self.ancestors[feed_nodes][None].expand(B, -1, -1), base,
                self.rank_sampling, ctx.token_mask)
            self.forwards += 1
        return DraftTree(tokens, self.parents.expand(B, N).clone(), torch.full((B,), N, device=n.device), q,
                         self.k, self.max_children, self.pool, self.ancestors.expand(B, N, N))
