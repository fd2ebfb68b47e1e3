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

Per-step work is O(B k V) (one gather of the tail laws, one inverse-CDF sample); fresh slots with a neighbour init
chain through the window with a loop over the k slots (vectorised over rows, ragged n_done handled by per-row
gather indices).
"""
from __future__ import annotations

import torch
from torch import Tensor

from drafters.lookup import grid_dims, neighbour, read_token
from specdec.protocols import Drafter
from specdec.random import sample_categorical
from specdec.types import Draft, Verdict

INITS = ("random", "repeat_horizontal", "repeat_vertical")
INIT_QS = ("onehot", "uniform")


class JacobiDrafter(Drafter):
    """SJD drafter. window: Jacobi window L (>= 2); proposes k = L - 1 drafts per step.

    init: how fresh slots (positions no previous pass covered) are filled:
      "random"            a uniform token over the allowed image vocabulary (stream "jacobi_init", by position);
      "repeat_horizontal" the token to the left on the grid (above for the first column, else the previous token);
      "repeat_vertical"   the token above (W positions back); left, then the previous token, where there is none.
    A neighbour that is itself a draft of this step is copied from the draft (drafts chain).
    init_q: the law claimed for fresh slots: "onehot" (SJD; acceptance p(x)) or, for init="random" only,
      "uniform" (q = Uniform over the V' allowed tokens, the law x is really drawn from: equally exact, with
      acceptance sum_v min(p(v), 1/V') instead of p(x)).
    """

    one_hot_drafts = False                  # the tail's q is the target's p from the last pass

    def __init__(self, window: int = 16, init: str = "random", init_q: str = "onehot"):
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
        self.window = window
        self.k = window - 1
        self.init = init
        self.init_q = init_q
        self.forwards = 0           # no drafter model calls

    def start(self, ctx) -> None:
        self.dims = grid_dims(ctx.grid, ctx.num_tokens, f"JacobiDrafter(init={self.init!r})") \
            if self.init != "random" else None
        self.ctx = ctx
        self.prev_p = None          # [B, k+1, V] target laws of the last pass
        self.prev_n = None          # [B] n_done when that pass was proposed
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
        return ("above", "left", "prev")

    @torch.no_grad()
    def propose(self, k: int) -> Draft:
        ctx = self.ctx
        n = ctx.n_done
        B = n.shape[0]
        dev = n.device
        V = ctx.target.vocab_size
        slots = torch.arange(k, device=dev)
        pos = n[:, None] + slots                                                   # [B, k]

        if self.prev_p is None:
            fresh = torch.ones(B, k, dtype=torch.bool, device=dev)
            tail_p = tail_tok = None
        else:
            # slot i of this window is output i + shift of the last pass (shift = a + 1 for a row that advanced,
            # 0 for a finished row that idled); outputs past k do not exist: those slots are fresh
            V = self.prev_p.shape[-1]
            src = slots[None] + (n - self.prev_n)[:, None]                          # [B, k]
            fresh = src > self.prev_p.shape[1] - 1
            idx = src.clamp_max(self.prev_p.shape[1] - 1)
            tail_p = self.prev_p.gather(1, idx[..., None].expand(-1, -1, V))        # [B, k, V]
            tail_tok = sample_categorical(tail_p, ctx.streams.uniform_at("sample", pos))

        if self.init == "random":
            init_tok = self._random_tokens(pos)
            tokens = init_tok if tail_tok is None else torch.where(fresh, init_tok, tail_tok)
        else:
            tokens = torch.zeros(B, k, dtype=torch.long, device=dev) if tail_tok is None else tail_tok.clone()
            names = self._sources()
            for j in range(k):                      # copies chain through the window: loop over k, not rows
                t = pos[:, j]
                src = t - 1
                for name in reversed(names):        # the earliest available name in order wins
                    p_s, ok = neighbour(name, t, self.dims)
                    src = torch.where(ok, p_s, src)
                copied = read_token(ctx, tokens, src)
                tokens[:, j] = torch.where(fresh[:, j], copied, tokens[:, j])

        self.prev_n = n.clone()
        if self.init == "random" and self.init_q == "uniform":
            q_fresh = self.uniform_q.expand(B, k, V)
        else:
            if tail_p is None:
                return Draft(tokens)                # all fresh and one-hot: the rule materialises q
            q_fresh = torch.nn.functional.one_hot(tokens, V).to(tail_p.dtype)
        if tail_p is None:
            return Draft(tokens, q_fresh.contiguous())
        return Draft(tokens, torch.where(fresh[..., None], q_fresh, tail_p))

    def observe(self, verdict: Verdict, target_probs: Tensor) -> None:
        """Keep the target's laws of this pass [B, k+1, V]; the next proposal takes its unverified tail."""
        self.prev_p = target_probs
