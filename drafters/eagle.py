"""EAGLE: a one-layer draft head over the target's own features (Li et al., "EAGLE: Speculative Sampling Requires
Rethinking Feature Uncertainty", arXiv 2401.15077; dynamic trees: EAGLE-2, arXiv 2406.16858; LANTERN / LANTERN++
draft with EAGLE heads, arXiv 2410.03355 / 2502.06352).

Notation: p = target distribution, q = draft distribution (both after specdec.sampling), h_t = the target's last
hidden state that predicts image token t, B batch, k draft depth, V vocabulary.

The head (`specdec.models.eagle`) reads (h_t, x_t) and predicts h_{t+1}; q is the target's own output head on that
prediction. Per step, the drafter first feeds the last k + 1 committed pairs with the target's TRUE features (the
verification just computed them: `ctx.hidden`), since the pairs it drafted last step carried its own predictions;
then it drafts from its predictions:
  tree="chain":           k tokens, one head call each (ModelDrafter's loop; drafts "sample" or "argmax");
  tree="static:<shape>":  a static tree ("spine-4", "binary-3", "seqs-4x4", child-rank paths; drafters.model_tree),
                          or "optimal-N" built from the head's rank acceptance profile (its card's, the zoo's);
  tree="dynamic":         EAGLE-2's dynamic tree (top_k, depth, total_tokens; drafters.dynamic_tree).
The head drafts unguided (it sees the conditional features only); trained on the target's samples at the user's
cfg scale (experiments/train_eagle.py), its q approximates the guided p. Guarantee: LOSSLESS with a lossless rule
(exact, spectr), for any head: drafts are drawn from the q reported (or deterministic, one-hot).
"""
from __future__ import annotations


import torch
from torch import Tensor

from drafters.dynamic_tree import DynamicTreeDrafter
from drafters.model import ModelDrafter
from drafters.model_tree import TreeModelDrafter
from specdec.adapters.eagle import EagleAdapter
from specdec.models.eagle import EagleHead
from specdec.types import Logits, Verdict


class EagleFeatures:
    """What every EAGLE drafter adds to its model drafter: the head bound to the target, true features written
    after each verification, and the k + 1-pair catch-up feed. Mixed in before a ModelDrafter class."""

    needs_hidden = True
    needs_draft_model = True
    draft_model_source = "eagle_head"     # the bundle's EagleHead

    def start(self, ctx) -> None:
        self.model.bind(ctx.target)
        if ctx.hidden is None:
            raise ValueError("the EAGLE drafter needs the target's hidden states: run it through specdec.generate, "
                             "which asks the target for them")
        super().start(ctx)
        self.window = torch.arange(self.k + 1, device=ctx.n_done.device)
        self.state.true[:, 0] = ctx.hidden[:, 0]
        self.state.n_true.fill_(1)
        self.n_prev = ctx.n_done.clone()

    def feed_root(self) -> Logits:
        """Re-feed the last k + 1 committed pairs (all of them early on) with true features; Logits [B, 1, V] of
        the first draft position. Rows with fewer committed pairs take their output from inside the window."""
        ctx = self.ctx
        width = 1 if self.first else self.k + 1
        self.first = False
        n = ctx.park(ctx.n_done - 1) + 1                     # committed pairs (finished rows parked)
        self.n_prev = ctx.n_done.clone()
        start = (n - width).clamp_min(0)
        self.model.rollback(self.state, start)
        logits = self._feed(self.model, self.state, ctx.tokens.gather(1, start[:, None] + self.window[:width]))
        self.forwards += 1
        self.model.rollback(self.state, n)
        at = (n - 1 - start)[:, None, None].expand(-1, 1, logits.cond.shape[-1])
        return Logits(logits.cond.gather(1, at))

    def observe(self, verdict: Verdict, target_probs: Tensor) -> None:
        """Store the target's features of the verified inputs: ctx.hidden[:, j] is h at position n_prev + j."""
        state, hidden = self.state, self.ctx.hidden
        at = (self.n_prev[:, None] + self.window[: hidden.shape[1]]).clamp_max(state.true.shape[1] - 1)
        state.true[state.rows, at] = hidden.to(state.true.dtype)
        state.n_true.copy_(self.ctx.n_done)


def _adapter(head) -> EagleAdapter:
    if head is None or isinstance(head, EagleAdapter):
        return head
    return EagleAdapter(head)


class EagleDrafter(EagleFeatures, ModelDrafter):
    """A chain of k drafts from an EAGLE head (EagleHead or EagleAdapter); drafts "sample" | "argmax"; compile:
    each draft token (head call, q, the draw) as one torch.compile graph, as ModelDrafter(compile=True)."""

    def __init__(self, head: EagleHead | EagleAdapter, k: int = 4, drafts: str = "sample",
                 compile: bool | str = False):
        super().__init__(_adapter(head), k=k, drafts=drafts, draft_cfg=1.0, compile=compile)


class EagleTreeDrafter(EagleFeatures, TreeModelDrafter):
    """A static draft tree from an EAGLE head; shape and drafts as TreeModelDrafter. rank_acceptance: for the
    "optimal-N" shapes; None takes the head's own profile (`EagleHead.rank_acceptance`, from the zoo card)."""

    def __init__(self, head: EagleHead | EagleAdapter, shape="spine-4", drafts: str = "sample",
                 rank_acceptance=None, compile: bool | str = False):
        adapter = _adapter(head)
        if rank_acceptance is None and adapter is not None:
            rank_acceptance = adapter.head.rank_acceptance
        super().__init__(adapter, shape=shape, drafts=drafts, draft_cfg=1.0, rank_acceptance=rank_acceptance,
                         compile=compile)


class EagleDynamicTreeDrafter(EagleFeatures, DynamicTreeDrafter):
    """EAGLE-2's dynamic draft tree from an EAGLE head; top_k, depth, total_tokens, drafts as DynamicTreeDrafter
    ("argmax": EAGLE-2's; "sample": siblings drawn without replacement)."""

    def __init__(self, head: EagleHead | EagleAdapter, top_k: int = 10, depth: int = 4, total_tokens: int = 59,
                 drafts: str = "argmax", compile: bool | str = False):
        super().__init__(_adapter(head), top_k=top_k, depth=depth, total_tokens=total_tokens, draft_cfg=1.0,
                         drafts=drafts, compile=compile)


def eagle(head: EagleHead | EagleAdapter, tree: str = "chain", k: int = 4, drafts: str | None = None,
          top_k: int = 10, total_tokens: int = 59, compile: bool | str = False, rank_acceptance=None):
    """The registry's `eagle` drafter. tree: "chain" (k drafts), "static:<shape>" (e.g. "static:binary-3", or
    "static:optimal-30" from rank_acceptance, default the head's profile; drafts as TreeModelDrafter) or
    "dynamic" (EAGLE-2: top_k, depth k, total_tokens). drafts: None means
    "sample" for chains and static trees, "argmax" (EAGLE-2's) for dynamic trees. compile: a chain's draft token,
    or a tree's level feed, as one compiled graph ("freeze" pre-packs the weights, as ModelDrafter)."""
    if tree == "chain":
        return EagleDrafter(head, k=k, drafts=drafts or "sample", compile=compile)
    if isinstance(tree, str) and tree.startswith("static:"):
        return EagleTreeDrafter(head, shape=tree.split(":", 1)[1], drafts=drafts or "sample",
                                rank_acceptance=rank_acceptance, compile=compile)
    if tree == "dynamic":
        return EagleDynamicTreeDrafter(head, top_k=top_k, depth=k, total_tokens=total_tokens,
                                       drafts=drafts or "argmax", compile=compile)
    raise ValueError(f"tree must be 'chain', 'static:<shape>' (e.g. 'static:binary-3') or 'dynamic', got {tree!r}")


eagle.needs_draft_model = True
eagle.draft_model_source = "eagle_head"
