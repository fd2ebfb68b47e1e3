"""A draft model that grows a dynamic tree each step, EAGLE-2 style (Li et al., "EAGLE-2: Faster Inference of
Language Models with Dynamic Draft Trees", arXiv 2406.16858; LANTERN++ verifies such trees, arXiv 2502.06352).

Notation: p = target distribution, q = draft distribution (after specdec.sampling, at temperature 1 for ranking),
B batch, V vocabulary. Per step, with the drafter's q:
  level 1: the top_k tokens of q at the root, scored by log q;
  level d = 2..depth: the top_k best-scored nodes of level d - 1 are fed (one forward, tree attention) and each
           proposes its top_k tokens, scored by their parent's score + log q (the path's draft log-probability);
  rerank: the total_tokens best-scored nodes of all levels are kept (a node scores below its parent, so the kept
          set is closed under ancestors), in depth order.
drafts="argmax" (EAGLE-2): children are the top_k tokens of q; every node is a deterministic function of the
context (one-hot q), so the tree's shape may differ per row and per step and the exact rule's recursive rejection
stays LOSSLESS. On a flat target a deterministic draft x is accepted with probability p(x) only.
drafts="sample" (new): each expanded node draws its top_k children from q WITHOUT replacement (child r's law: q
with the r earlier siblings removed, renormalised: the sequential q recursive rejection tests it against), scored
by their path's log q as above. The rerank may not look at a node's own value (keeping a sampled node because it
came out likely would bias its law), so it keeps whole sibling groups ranked by their PARENT's score (shallower
first, then a prefix in draw order when the budget ends inside a group): which children exist depends only on
values drawn before them, so each kept child's law is its sequential q and the rule stays LOSSLESS.
Defaults are EAGLE-2's: top_k 10, depth 4 (5 or 6 in its code), total_tokens 59.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from drafters.model import ModelDrafter
from specdec.protocols import ARModel
from specdec.random import sample_categorical
from specdec.sampling import to_probs
from specdec.tree import DraftTree


class DynamicTreeDrafter(ModelDrafter):
    """EAGLE-2 dynamic draft trees from a draft model (see the module doc). top_k >= 1 children per expanded node
    and nodes expanded per level; depth >= 1 levels; total_tokens >= 1 nodes kept; drafts "argmax" (EAGLE-2) or
    "sample" (siblings without replacement). draft_cfg as ModelDrafter."""

    def __init__(self, model: ARModel, top_k: int = 10, depth: int = 4, total_tokens: int = 59,
                 draft_cfg: float | None = None, drafts: str = "argmax", compile: bool | str = False):
        if drafts not in ("argmax", "sample"):
            raise ValueError(f"drafts must be 'argmax' (EAGLE-2's top-k children) or 'sample' (children drawn "
                             f"without replacement), got {drafts!r}")
        self.siblings = drafts
        for name, v in (("top_k", top_k), ("depth", depth), ("total_tokens", total_tokens)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        super().__init__(model, k=depth, drafts="argmax", draft_cfg=draft_cfg, compile=compile)
        if model is not None and not model.supports_trees:    # None: parameters checked alone
            raise ValueError(f"a tree drafter needs a draft model that verifies trees (GPTAdapter); "
                             f"{type(model).__name__} does not")
        self.top_k, self.depth = top_k, depth
        self.candidates = top_k + (depth - 1) * top_k * top_k          # nodes grown before the rerank
        self.tree_size = min(total_tokens, self.candidates)

    def start(self, ctx) -> None:
        super().start(ctx)
        if self.top_k > ctx.target.vocab_size:
            raise ValueError(f"top_k={self.top_k} exceeds the vocabulary ({ctx.target.vocab_size} tokens)")
        if (self.depth - 1) * self.top_k > self.tree_size:
            raise ValueError(f"(depth - 1) * top_k = {(self.depth - 1) * self.top_k} expanded nodes need more cache "
                             f"room than total_tokens={self.tree_size} reserves; raise total_tokens or lower them")
        self.rank_sampling = dataclasses.replace(self.sampling, temperature=1.0) if self.sampling.greedy \
            else self.sampling
        self.deterministic = self.siblings == "argmax" or self.sampling.greedy   # greedy: every q is one-hot

    def _children(self, q: Tensor, u: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """top_k children of each row of q [..., V]: (tokens [..., K], log q of each [..., K], their sequential
        laws [..., K, V] or None when deterministic). u [..., K]: one uniform per child (sampled siblings)."""
        if self.deterministic:
            top = q.topk(self.top_k, -1)
            return top.indices, top.values.clamp_min(1e-30).log(), None
        remaining, tokens, laws = q, [], []
        for r in range(self.top_k):                                    # elder siblings first
            mass = remaining.sum(-1, keepdim=True)                     # no mass left: a fresh draw from q is
            law = torch.where(mass > 0, remaining / mass.clamp_min(1e-30), q)   # then the true conditional law
            tok = sample_categorical(law, u[..., r])
            tokens.append(tok)
            laws.append(law)
            remaining = law.scatter(-1, tok[..., None], 0.0)
        tokens = torch.stack(tokens, -1)
        return tokens, q.gather(-1, tokens).clamp_min(1e-30).log(), torch.stack(laws, -2)

    def _probs(self, logits) -> torch.Tensor:
        return to_probs(logits.cond, logits.uncond, self.rank_sampling, self.ctx.token_mask)

    @torch.no_grad()
    def propose(self, k: int) -> DraftTree:
        ctx = self.ctx
        n = ctx.n_done
        B, K, C, dev = n.shape[0], self.top_k, self.candidates, n.device
        q = self._probs(self.feed_root())[:, -1]                                      # [B, V] at the root
        # all candidates, grown level by level: token, parent (-1 root), depth, score (path log q). Only the fed
        # nodes take slots of the drafter's cache: (level - 1) * top_k + j for the j-th fed node of a level
        S = (self.depth - 1) * K
        tokens = torch.zeros(B, C, dtype=torch.long, device=dev)
        parents = torch.full((B, C), -1, dtype=torch.long, device=dev)
        depth = torch.zeros(B, C, dtype=torch.long, device=dev)
        score = torch.full((B, C), -float("inf"), device=dev)
        seen = torch.zeros(B, C, max(S, 1), dtype=torch.bool, device=dev)     # the fed ancestors' slots of each node
        laws = None if self.deterministic else torch.zeros(B, C, q.shape[-1], device=dev)
        u = None if self.deterministic else ctx.streams.uniform_at("tree_draft", n[:, None], slots=C)[:, 0]
        tokens[:, :K], score[:, :K], law = self._children(q, None if u is None else u[:, :K])
        depth[:, :K] = 1
        if laws is not None:
            laws[:, :K] = law
        frontier = torch.arange(K, device=dev).expand(B, K)              # candidate ids of the last level
        base = self.state.cache.lengths[:B]
        rows = torch.arange(B, device=dev)[:, None]
        slot_ids = torch.arange(K, device=dev)
        for level in range(2, self.depth + 1):
            best = score.gather(1, frontier).topk(K, -1).indices         # expand the top_k of the last level
            fed = frontier.gather(1, best)                               # [B, K] candidate ids
            slots = (level - 2) * K + slot_ids                           # [K] their slots (relative to base)
            seen[rows, fed, slots[None]] = True
            probs = self._level(self.model, self.state, tokens.gather(1, fed), (n - 1)[:, None] + level - 1,
                                base[:, None] + slots[None], seen[rows, fed], base, self.rank_sampling,
                                ctx.token_mask)
            self.forwards += 1
            start = K + (level - 2) * K * K
            new = slice(start, start + K * K)
            kids, logq, law = self._children(probs, None if u is None else u[:, new].reshape(B, K, K))
            tokens[:, new] = kids.reshape(B, K * K)                      # [B, K, K]: fed node, sibling rank
            parents[:, new] = fed.repeat_interleave(K, 1)
            depth[:, new] = level
            score[:, new] = (score.gather(1, fed)[..., None] + logq).reshape(B, K * K)
            if laws is not None:
                laws[:, new] = law.reshape(B, K * K, -1)
            seen[:, new] = seen[rows, fed].repeat_interleave(K, 1)
            frontier = torch.arange(start, start + K * K, device=dev).expand(B, -1)
        return self._rerank(tokens, parents, depth, score, laws)

    def _rerank(self, tokens, parents, depth, score, laws=None) -> DraftTree:
        """Keep tree_size candidates, parents re-indexed. Deterministic drafts: the best-scored, ordered by depth
        (then score). Sampled: whole sibling groups by their parent's score (see the module doc), in candidate order
        (by depth, siblings in draw order)."""
        B, C = tokens.shape
        N = self.tree_size
        if laws is None:
            keep = score.topk(N, -1).indices                             # ancestor-closed: scores fall along paths
            order = (depth.gather(1, keep) * 4.0 - score.gather(1, keep).exp()).argsort(-1)   # shallow, then likely
        else:
            key = torch.where(parents >= 0, score.gather(1, parents.clamp_min(0)), 0.0)   # the parent's score
            by_depth = depth.argsort(dim=-1, stable=True)                   # ties: shallower, then earlier drawn
            keep = by_depth.gather(1, (-key.gather(1, by_depth)).argsort(dim=-1, stable=True))[:, :N]
            order = keep.argsort(-1)                                     # candidate order: by depth, draw order
        keep = keep.gather(1, order)                                     # [B, N] candidate ids, topological
        new_index = torch.full((B, C + 1), -1, dtype=torch.long, device=tokens.device)
        new_index[torch.arange(B, device=tokens.device)[:, None], keep] = torch.arange(N, device=tokens.device)
        par = parents.gather(1, keep)
        new_par = torch.where(par >= 0, new_index.gather(1, par.clamp_min(0)), -1)
        toks = tokens.gather(1, keep)
        q = torch.nn.functional.one_hot(toks, self.model.vocab_size).float() if laws is None else \
            laws.gather(1, keep[..., None].expand(-1, -1, laws.shape[-1]))
        return DraftTree(toks, new_par, torch.full((B,), N, device=tokens.device), q, self.depth, self.top_k)
