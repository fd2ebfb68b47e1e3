"""Speculative Jacobi Decoding (SJD): the target's previous pass is the drafter. Training-free, no extra model.

Teng et al., "Accelerating Auto-regressive Text-to-Image Generation with Training-free Speculative Jacobi
Decoding", ICLR 2025, arXiv 2410.01699 (reference code tyshiwo1/Accelerating-T2I-AR-with-SJD).

Guarantee: LOSSLESS with a lossless rule (ExactRule): every draft is drawn from the q it reports, given everything
the decision at its position reads (argued below); with a relaxed rule, that rule's bound for a stochastic drafter.

Notation: p = target distribution, q = draft distribution (both after specdec.sampling), x = draft token,
k = window - 1 draft tokens per step, B batch, V vocabulary, t = token position, n = ctx.n_done.

Bookkeeping. A step at n0 feeds [token n0-1, d_1..d_k]; output j of that pass is p_j, the law of position n0 + j
computed on the context [committed < n0, d_1..d_j]. After a verdict with a accepted drafts the row commits
a + 1 tokens, so n_new = n0 + a + 1 and the next window covers n_new .. n_new + k - 1. Outputs j <= a are spent
(their positions are committed). Outputs j = a+1 .. k are the *unverified tail*: positions n_new .. n0 + k, computed
on a context that agrees with the committed prefix only up to n0 + a (d_{a+1} was rejected there), i.e. stale. SJD
keeps them anyway: slot i of the new window with i + (n_new - n0) <= k is a tail slot, drafted x ~ p_{i + n_new - n0}
with q := that p. The last a slots (all k on the first step; after a bonus, a = k) are *fresh*,
filled by the init strategy with a one-hot q (or q = Uniform for init="random", init_q="uniform").

Why stale tails stay lossless: the exact rule tests each draft against the law it was drawn from, whatever context
produced that law. Precisely, by induction over positions: everything a decision at position t reads (the committed
prefix < t, q_t, the step layout n0) is a function of uniforms keyed at positions < t (the target is causal and a
verdict only decides positions < n_new), plus for fresh slots the "jacobi_init" uniform at t. The draft x_t is
F_{q_t}^{-1}(U_sample(t)), and U_sample(t), U_accept(t), U_residual(t) are independent of all that, so x_t ~ q_t
given the past and the committed token has law p(. | prefix). An earlier (discarded) draft at t used the same
U_sample(t), but it only fed outputs at positions > t, which the decision at t never reads.

Stream reuse. Tail drafts at t use ctx.streams.uniform_at("sample", t): the draw plain AR makes at t, so when the tail
law equals the true p the draft *is* the AR token (a common-random-numbers coupling of successive Jacobi iterates,
in the spirit of MC-SJD, So et al., arXiv 2510.24211, without its maximal-coupling step). The rule's uniforms at t are "accept"
(never used here) and, for the committed token after the drafts, "residual" or "sample" (the bonus). The bonus reads
"sample" at t = n0 + k, the position just past the window: it is never drafted in that step, and no earlier step
drafted it either (earlier windows end at n0' + k - 1 < n0 + k), and once committed it is never drafted again. So the
uniform that draws a draft is never the one that decides it.

Coupling of successive iterates (`coupling`). SJD draws each tail slot afresh from its new law every step, so a
tail that is already right churns whenever p moves a little. MC-SJD (So et al., arXiv 2510.24211) couples the new
draft to the previous iterate y_old ~ q_old at the same position instead:
  "maximal": keep y_old with probability min(1, p_new(y_old) / q_old(y_old)), else draw from
             norm((p_new - q_old)^+). The draft's marginal is exactly p_new (a maximal coupling of q_old and p_new,
             so y_old survives with probability 1 - TV(q_old, p_new)), and the draft reports q := p_new. The keep and
             residual uniforms are keyed by (position, step) ("mc_keep/<step>", "mc_residual/<step>"): fresh at
             every iteration, so the iterate at step s is ~ p_s given everything at positions < t, by induction.
  "gumbel":  x = argmax(log p_new + g_t) with one Gumbel vector g_t per position (stream "jacobi_gumbel", V slots),
             reused across iterations: the Gumbel-max coupling, exact for the same reason as the inverse-CDF one.
  "none":    SJD's draw by inverse CDF with the position's "sample" uniform (a common-random-numbers coupling).
A slot with no previous iterate (the one just past the old window, and fresh slots) falls back to "none" / init.

Per-step work is O(B k V) (one gather of the tail laws, one inverse-CDF sample) in a fixed number of tensor ops:
fresh slots with a neighbour init copy through chains within the window, followed by pointer doubling (about log2 k
gathers, vectorised over rows and slots, ragged n_done handled by per-row gather indices), not a loop over slots.
"""
from __future__ import annotations

import torch
from torch import Tensor

from drafters.lookup import grid_dims, neighbour
from specdec.protocols import Drafter
from specdec.compiled import compile_step
from specdec.random import sample_categorical, tag_ids
from specdec.types import Draft, Verdict

INITS = ("random", "repeat_horizontal", "repeat_vertical", "previous_frame")
INIT_QS = ("onehot", "uniform")
COUPLINGS = ("none", "maximal", "gumbel")
IDS_AHEAD = 64                  # decode steps whose coupled-draw tag ids are made in one go


class JacobiDrafter(Drafter):
    """SJD drafter. window: Jacobi window L (>= 2); proposes k = L - 1 drafts per step.

    init: how fresh slots (positions no previous pass covered) are filled:
      "random"            a uniform token over the allowed image vocabulary (stream "jacobi_init", by position);
      "repeat_horizontal" the token to the left on the grid (above for the first column, else the previous token);
      "repeat_vertical"   the token above (W positions back); left, then the previous token, where there is none.
      "previous_frame"    video: the token at the same place one frame back (H*W positions); in the first frame
                          left, then above, then the previous token.
    A neighbour that is itself a draft of this step is copied from the draft (drafts chain).
    coupling: how a tail slot's new draft is tied to the previous iterate: "none" (SJD), "maximal" (MC-SJD) or
      "gumbel" (see the module docstring); every choice is exact with a lossless rule.
    init_q: the law claimed for fresh slots: "onehot" (SJD; acceptance p(x)) or, for init="random" only,
      "uniform" (q = Uniform over the V' allowed tokens, the law x is really drawn from: equally exact, with
      acceptance sum_v min(p(v), 1/V') instead of p(x)).
    compile: every window after the first (the tail's gather, the coupled draw, the fresh slots' copies, q) as one
      torch.compile graph (fullgraph, static shapes; compiled once per process and configuration): the same
      drafts without the per-op overhead of some sixty small tensor ops a step.
    """

    one_hot_drafts = False                  # the tail's q is the target's p from the last pass

    def __init__(self, window: int = 16, init: str = "random", init_q: str = "onehot", coupling: str = "none",
                 compile: bool = False):
        if not isinstance(window, int) or isinstance(window, bool) or window < 2:
            raise ValueError(f"window (the Jacobi window L, drafting L - 1 tokens per step) must be an integer "
                             f">= 2, got {window!r}")
        if init not in INITS:
            raise ValueError(f"unknown Jacobi init {init!r}; valid inits are {INITS}")
        if init_q not in INIT_QS:
            raise ValueError(f"unknown init_q {init_q!r}; valid values are {INIT_QS}")
        if init_q == "uniform" and init != "random":
            raise ValueError(f"init_q='uniform' is the law of init='random' only; with init={init!r} the fresh "
                             f"drafts are copies (one-hot q): use init_q='onehot'")
        if coupling not in COUPLINGS:
            raise ValueError(f"unknown Jacobi coupling {coupling!r}; valid couplings are {COUPLINGS}")
        self.coupling = coupling
        self.window = window
        self.k = window - 1
        self.init = init
        self.init_q = init_q
        if compile not in (False, True):
            raise ValueError(f"compile must be False or True (a window's tensor work as one torch.compile graph), "
                             f"got {compile!r}")
        self.compile = compile
        self._next_window = compiled_window() if compile else JacobiDrafter._window
        self.forwards = 0           # no drafter model calls

    def start(self, ctx) -> None:
        self.dims = grid_dims(ctx.grid, ctx.num_tokens, f"JacobiDrafter(init={self.init!r})") \
            if self.init != "random" else None
        self.ctx = ctx
        self.prev_p = None          # [B, k+1, V] target laws of the last pass
        self.prev_n = None          # [B] n_done when that pass was proposed
        self.prev_draft = None      # the Draft of that pass (previous iterates for the coupling)
        self.step = 0
        self._ids_first = -1        # the first step of the coupled-draw tag ids made so far (_coupling_ids)
        # the token mask is fixed for a generation: its id table and uniform law are built here, once, so that a
        # step runs on the device only (no data-dependent shape, no transfer)
        V, dev = ctx.target.vocab_size, ctx.n_done.device
        allowed = torch.ones(V, dtype=torch.bool, device=dev) if ctx.token_mask is None else ctx.token_mask.to(dev)
        self.allowed_ids = allowed.nonzero()[:, 0]                                 # [V'] allowed token ids
        if self.allowed_ids.numel() == 0:
            raise ValueError("JacobiDrafter: the target's token_mask allows no token")
        self.uniform_q = allowed.float() / self.allowed_ids.numel()                # [V] Uniform over allowed ids

    # -- fresh slots --------------------------------------------------------------------------------------------
    def _random_tokens(self, pos: Tensor) -> Tensor:
        u = self.ctx.streams.uniform_at("jacobi_init", pos)                        # [B, k]
        n = self.allowed_ids.numel()
        return self.allowed_ids[(u * n).long().clamp_max(n - 1)]

    def _sources(self) -> tuple[str, ...]:
        if self.init == "repeat_horizontal":
            return ("left", "above", "prev")
        if self.init == "previous_frame":
            return ("prev_frame", "left", "above", "prev")
        return ("above", "left", "prev")

    @torch.no_grad()
    def propose(self, k: int) -> Draft:
        ctx = self.ctx
        n = ctx.n_done
        if self.prev_p is None:                     # the first step: every slot fresh
            tokens, q = self._fresh_window(k, n)
        else:
            coupled = self.coupling == "maximal" and self.prev_draft is not None
            old_tokens = self.prev_draft.tokens if coupled else None
            old_q = self.prev_draft.q(self.prev_p.shape[-1]) if coupled else None
            ids = self._coupling_ids(n.device) if coupled else None
            tokens, q = self._next_window(self, k, n, self.prev_p, self.prev_n, old_tokens, old_q, ids)
        self.prev_n = n.clone()
        self.step += 1
        self.prev_draft = Draft(tokens, q)
        return self.prev_draft

    def _coupling_ids(self, device) -> Tensor:
        """The ids [3] of this step's coupled-draw streams ("sample", "mc_keep/<step>", "mc_residual/<step>"). A tag's
        id is a host computation, which a compiled step cannot hold; they are looked up for IDS_AHEAD steps at a
        time (`tag_ids`, kept across generations) and viewed step by step."""
        first = self.step - self.step % IDS_AHEAD
        if self._ids_first != first:
            tags = [t for s in range(first, first + IDS_AHEAD) for t in ("sample", f"mc_keep/{s}", f"mc_residual/{s}")]
            self._ids = tag_ids(tags, device).view(IDS_AHEAD, 3)
            self._ids_first = first
        return self._ids[self.step - first]

    def _fresh_window(self, k: int, n: Tensor) -> tuple[Tensor, Tensor | None]:
        """The first window [B, k]: all slots filled by the init; q None (one-hot) unless init_q is "uniform"."""
        pos = n[:, None] + torch.arange(k, device=n.device)                          # [B, k]
        if self.init == "random":
            tokens = self._random_tokens(pos)
        else:
            fresh = torch.ones_like(pos, dtype=torch.bool)
            tokens = self._copied_tokens(pos, fresh, torch.zeros_like(pos))
        if self.init_q == "uniform":
            return tokens, self.uniform_q.expand(*tokens.shape, -1).contiguous()
        return tokens, None

    def _window(self, k: int, n: Tensor, prev_p: Tensor, prev_n: Tensor, old_tokens: Tensor | None,
                old_q: Tensor | None, ids: Tensor | None) -> tuple[Tensor, Tensor]:
        """A later window: tail slots drawn from the last pass's laws, fresh slots filled by the init. n [B] this
        step's n_done; prev_p [B, k+1, V], prev_n [B], old_tokens [B, k], old_q [B, k, V] (None unless coupled
        maximally: SJD's draw): the last pass's laws, n_done and drafts; ids [3] (with them): the "sample",
        "mc_keep/<step>" and "mc_residual/<step>" tag ids -> (tokens [B, k], q [B, k, V])."""
        B, V = n.shape[0], prev_p.shape[-1]
        slots = torch.arange(k, device=n.device)
        pos = n[:, None] + slots                                                    # [B, k]
        # slot i of this window is output i + shift of the last pass (shift = a + 1 for a row that advanced,
        # 0 for a finished row that idled); outputs past k do not exist: those slots are fresh
        src = slots[None] + (n - prev_n)[:, None]                                   # [B, k]
        fresh = src > prev_p.shape[1] - 1
        idx = src.clamp_max(prev_p.shape[1] - 1)
        tail_p = prev_p.gather(1, idx[..., None].expand(-1, -1, V))                 # [B, k, V]
        tail_tok = self._tail_draws(tail_p, src, pos, old_tokens, old_q, ids)
        if self.init == "random":
            tokens = torch.where(fresh, self._random_tokens(pos), tail_tok)
        else:
            tokens = torch.where(fresh, self._copied_tokens(pos, fresh, tail_tok), tail_tok)
        if self.init == "random" and self.init_q == "uniform":
            q_fresh = self.uniform_q.expand(B, k, V)
        else:
            q_fresh = torch.nn.functional.one_hot(tokens, V).to(tail_p.dtype)
        return tokens, torch.where(fresh[..., None], q_fresh, tail_p)

    def _copied_tokens(self, pos: Tensor, fresh: Tensor, tail: Tensor) -> Tensor:
        """Neighbour copies [B, k] for the window's positions pos [B, k]. fresh [B, k] marks the slots to fill; tail
        [B, k] holds the other slots' drafts. A fresh slot's neighbour may itself be a fresh slot of this window
        (copies chain through the window): each slot's source is followed to the first one that is committed or a
        tail draft by pointer doubling (about log2 k rounds of one gather) instead of a loop over the k slots, so
        that a step costs a handful of tensor ops whatever the window. Every neighbour lies before its slot, so
        chains end; the result is the slot-by-slot copy's."""
        n = self.ctx.n_done[:, None]                                               # [B, 1]
        k = pos.shape[1]
        src = pos - 1
        for name in reversed(self._sources()):              # the earliest available name in order wins
            p_s, ok = neighbour(name, pos, self.dims)
            src = torch.where(ok, p_s, src)
        # a pointer per slot, as a slot index: its source's slot while that source is a fresh slot of this window,
        # else itself; doubling makes it the last fresh slot of the chain, whose source is committed or a tail draft
        src_slot = (src - n).clamp(0, k - 1)
        ptr = torch.where((src >= n) & fresh.gather(1, src_slot), src_slot,
                          torch.arange(k, device=pos.device).expand_as(src_slot))
        for _ in range(max(1, (k - 1).bit_length())):       # 2^rounds >= k - 1 hops, the longest chain
            ptr = ptr.gather(1, ptr)
        root = src.gather(1, ptr)                                                  # [B, k] source positions
        committed = self.ctx.tokens.gather(1, root.clamp(0, self.ctx.tokens.shape[1] - 1))
        drafted = tail.gather(1, (root - n).clamp(0, k - 1))
        return torch.where(root < n, committed, drafted)

    def _tail_draws(self, tail_p: Tensor, src: Tensor, pos: Tensor, old_tokens: Tensor | None,
                    old_q: Tensor | None, ids: Tensor | None) -> Tensor:
        """New iterates [B, k] of the tail laws tail_p [B, k, V] at positions pos [B, k]; src [B, k]: each slot's
        index in the previous window (its previous iterate exists where src < the old window's length); old_tokens
        [B, k] and old_q [B, k, V] the previous iterates and their laws; ids as in `_window`."""
        streams = self.ctx.streams
        if self.coupling == "gumbel":
            u = streams.uniform_at("jacobi_gumbel", pos, slots=tail_p.shape[-1])       # [B, k, V]
            return (tail_p.log() - (-u.log()).log()).argmax(-1)
        if self.coupling == "none" or old_tokens is None:
            return sample_categorical(tail_p, streams.uniform_at("sample", pos))
        # the three streams a coupled draw reads, in one pass
        u_sample, u_keep, u_residual = streams.uniforms_by_id(ids, pos)
        k_old, V = old_tokens.shape[1], tail_p.shape[-1]
        has_old = src < k_old                                                          # [B, k]
        idx = src.clamp_max(k_old - 1)
        y_old = old_tokens.gather(1, idx)                                              # [B, k]
        q_old = old_q.gather(1, idx[..., None].expand(-1, -1, V))                      # [B, k, V]
        p_y = tail_p.gather(-1, y_old[..., None])[..., 0]
        q_y = q_old.gather(-1, y_old[..., None])[..., 0]
        keep = u_keep * q_y <= p_y                                                     # U < p/q, no division
        residual = (tail_p - q_old).clamp_min(0)
        mass = residual.sum(-1, keepdim=True)
        # mass 0 means p_new <= q_old everywhere, i.e. p_new == q_old: then keep is certain and the residual unused.
        # One draw serves both kinds of slot: the residual with its own uniforms where a previous iterate exists,
        # else tail_p with the position's "sample" uniform (SJD's draw)
        law = torch.where(has_old[..., None] & (mass > 0), residual / mass.clamp_min(1e-30), tail_p)
        u = torch.where(has_old, u_residual, u_sample)
        return torch.where(has_old & keep, y_old, sample_categorical(law, u))

    def observe(self, verdict: Verdict, target_probs: Tensor) -> None:
        """Keep the target's laws of this pass [B, k+1, V]; the next proposal takes its unverified tail."""
        self.prev_p = target_probs


_COMPILED_WINDOW = None


def compiled_window():
    """`JacobiDrafter._window` as one graph, compiled once per process (a graph per configuration and shape)."""
    global _COMPILED_WINDOW
    if _COMPILED_WINDOW is None:
        _COMPILED_WINDOW = compile_step(JacobiDrafter._window)
    return _COMPILED_WINDOW
