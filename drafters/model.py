"""A smaller autoregressive model as the drafter (classic draft-model speculative decoding).

Leviathan et al., arXiv 2211.17192; Chen et al., arXiv 2302.01318. Lossless with a lossless rule: drafts are
sampled from q, the drafter's distribution after the same `specdec.sampling` transforms (CFG included) as p.

Notation: p = target distribution, q = draft distribution (both after specdec.sampling), x = draft token,
k = draft tokens per step, B batch, V vocabulary.

drafts="argmax" makes it a deterministic drafter: x = argmax q, reported as q = one_hot(x). Still lossless with
the exact rule (x is a function of the context). With a relaxed rule this is the setting in which LANTERN's delta
bounds the emitted law (TV <= delta per token); with sampled drafts it does not (see verifiers/lantern.py).

Cache bookkeeping without per-row branches: before each proposal the drafter rolls its cache back to
n_done - 2 generated tokens and re-feeds the last two committed tokens. Whatever the previous verdict was, the
first n_done - 2 tokens in its cache are right (it held the committed prefix plus d_1..d_{k-1}), so every row feeds
the same number of tokens and shapes stay static. Re-computing one token's K/V is the price.

draft_cfg sets the drafter's own guidance scale (None: the target's). A drafter distilled on the target's
CFG-guided samples already models the guided law, so it drafts best unguided (draft_cfg=1.0), which also halves its
rows. Any q is lossless with the exact rule as long as the drafts are drawn from it; only acceptance changes.

compile=True runs each draft token (model call, q, the draw) as one torch.compile graph: a small drafter's step is
mostly per-call overhead, which the graph removes (the zoo drafter: about half the time per token). It needs a
model with a static KV cache (the project's GPT, LlamaGen, an EAGLE head); the first step of each shape pays the
compilation. The catch-up feed before the first draft token is compiled as well (one graph per width).
compile="freeze" adds inductor's freezing (weights pre-packed once; see specdec.compiled). Tree drafters
(drafters.model_tree, drafters.dynamic_tree) compile their level feeds the same way.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from specdec.adapters.base import check_capacity
from specdec.compiled import compile_step
from specdec.protocols import ARModel, Drafter
from specdec.random import sample_categorical
from specdec.sampling import Sampling, to_probs
from specdec.types import Draft, Logits, Verdict


class ModelDrafter(Drafter):
    """Drafts k tokens per step with `model`, an ARModel over the same image vocabulary as the target."""

    def __init__(self, model: ARModel, k: int = 4, drafts: str = "sample", compile: bool | str = False,
                 draft_cfg: float | None = None):
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"k (draft tokens per step) must be an integer >= 1, got {k!r}")
        if drafts not in ("sample", "argmax"):
            raise ValueError(f"drafts must be 'sample' (x ~ q) or 'argmax' (one-hot q), got {drafts!r}")
        if draft_cfg is not None and (isinstance(draft_cfg, bool) or not isinstance(draft_cfg, (int, float))
                                      or not draft_cfg >= 0 or draft_cfg == float("inf")):
            raise ValueError(f"draft_cfg must be None (the target's cfg_scale) or a finite number >= 0, "
                             f"got {draft_cfg!r}")
        self.model = model
        self.k = k
        self.drafts = drafts
        self.draft_cfg = draft_cfg
        self.forwards = 0
        self._token_step, self._feed, self._level = draft_token, feed_tokens, level_probs
        if compile not in (False, True, "freeze"):
            raise ValueError(f"compile must be False, True or 'freeze' (compiled with weights pre-packed), "
                             f"got {compile!r}")
        if compile:
            from specdec.adapters.static import StaticCacheAdapter
            if model is not None and not (isinstance(model, StaticCacheAdapter)          # None: params alone
                                          or getattr(model, "compilable", False)):
                raise TypeError(f"compile=True needs a draft model with a static KV cache (GPTAdapter, "
                                f"LlamaGenAdapter); {type(model).__name__} is not one: use compile=False")
            self._token_step = compile_step(draft_token, freeze=compile == "freeze")
            self._feed = compile_step(feed_tokens, freeze=compile == "freeze")
            self._level = compile_step(level_probs, freeze=compile == "freeze")

    needs_draft_model = True        # the registry passes the bundle's draft model first

    @property
    def one_hot_drafts(self) -> bool:
        return self.drafts == "argmax"

    def start(self, ctx) -> None:
        if self.model.vocab_size != ctx.target.vocab_size:
            raise ValueError(
                f"drafter vocabulary ({self.model.vocab_size} tokens) differs from the target's "
                f"({ctx.target.vocab_size}); a drafter must propose tokens of the target's image vocabulary")
        check_capacity(self.model, ctx.capacity)
        self.ctx = ctx
        self.sampling = ctx.sampling if self.draft_cfg is None else \
            dataclasses.replace(ctx.sampling, cfg_scale=float(self.draft_cfg))
        try:
            self.state, _ = self.model.start(ctx.cond, self.sampling, ctx.capacity)
        except ValueError as e:
            if self.sampling.uses_cfg and not self.model.supports_cfg:
                raise ValueError(f"the drafter's model ({type(self.model).__name__}) has no unconditional path for "
                                 f"cfg_scale={self.sampling.cfg_scale}: pass ModelDrafter(..., draft_cfg=1.0) to "
                                 f"draft without guidance (still lossless), or a draft model with an unconditional "
                                 f"path") from e
            raise
        self.offsets = torch.arange(self.k + 1, device=ctx.n_done.device)
        self.first = True
        self.forwards = 0

    def feed_root(self) -> Logits:
        """Bring the draft model's cache up to the committed tokens; Logits [B, 1, V] of the first draft position.

        Before each proposal the cache is rolled back to n_done - 2 and the last two committed tokens are fed (see
        the module doc). Drafters whose cache entries depend on more than the tokens (EAGLE's features) override
        this."""
        ctx = self.ctx
        n_feed = 1 if self.first else 2
        self.first = False
        self.model.rollback(self.state, ctx.park(ctx.n_done - n_feed))
        feed = ctx.tokens.gather(1, ctx.n_done[:, None] - n_feed + self.offsets[:n_feed])
        logits = self._feed(self.model, self.state, feed)
        self.forwards += 1
        return Logits(logits.cond[:, -1:], None if logits.uncond is None else logits.uncond[:, -1:])

    @torch.no_grad()
    def propose(self, k: int) -> Draft:
        ctx = self.ctx
        # the "sample" stream at each drafted position: the draw plain AR would make there (the bonus uniform of
        # verifiers._kit.correction_uniform); all k at once, a step's per-token work is the model call
        u = ctx.streams.uniform_at("sample", ctx.n_done[:, None] + self.offsets[:k]) if self.drafts == "sample" \
            else None
        u = [None] * k if u is None else u.unbind(1)
        token, q = draw_token(self.feed_root(), u[0], self.sampling, ctx.token_mask)
        drafts, probs = [token], [q]
        for j in range(1, k):
            token, q = self._token_step(self.model, self.state, token[:, None], u[j], self.sampling,
                                        ctx.token_mask)
            self.forwards += 1
            drafts.append(token)
            probs.append(q)
        return Draft(torch.stack(drafts, 1), torch.stack(probs, 1))

    def observe(self, verdict: Verdict, target_probs: Tensor) -> None:
        """Nothing to do: the next proposal rolls the cache back from ctx.n_done."""


def feed_tokens(model: ARModel, state, tokens: Tensor) -> Logits:
    """The draft model's forward over tokens [B, n] (the catch-up feed before the first draft token); a function of
    its own so that compile=True compiles it too (one graph per width)."""
    return model.forward(state, tokens)


def level_probs(model: ARModel, state, tokens: Tensor, positions: Tensor, slots: Tensor, allowed: Tensor,
                base: Tensor, sampling: Sampling, token_mask: Tensor | None) -> Tensor:
    """A tree drafter's feed of some nodes of its tree (`forward_tree_part`: tokens, positions, slots [B, n],
    allowed [B, n, m], base [B]) -> q [B, n, V] of their children; a function of its own so that compile=True
    compiles it (one graph per number of nodes fed)."""
    out = model.forward_tree_part(state, tokens, positions, slots, allowed, base)
    return to_probs(out.cond, out.uncond, sampling, token_mask)


def draft_token(model: ARModel, state, feed: Tensor, u: Tensor | None, sampling: Sampling,
                token_mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """One draft token: feed [B, 1] into the draft model, q [B, V] of the position after it, and the token [B]
    drawn from q with uniforms u [B] (u None: the argmax, with q reported one-hot)."""
    return draw_token(model.forward(state, feed), u, sampling, token_mask)


def draw_token(logits: Logits, u: Tensor | None, sampling: Sampling,
               token_mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """Logits [B, n, V] -> (token [B], q [B, V]) at the last position: drawn with uniforms u [B], or the argmax
    with q reported one-hot when u is None."""
    q = to_probs(logits.cond[:, -1], None if logits.uncond is None else logits.uncond[:, -1], sampling, token_mask)
    if u is None:
        token = q.argmax(-1)
        return token, torch.nn.functional.one_hot(token, q.shape[-1]).to(q.dtype)
    return sample_categorical(q, u), q
