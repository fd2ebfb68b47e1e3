"""The pieces every acceptance rule is built from: acceptance scan, gathers, correction uniforms, residual sampling.

Speculative sampling as in Leviathan et al., arXiv 2211.17192 and Chen et al., arXiv 2302.01318.

Notation: p = target distribution, q = draft distribution (both after specdec.sampling), x = draft token,
k = draft tokens per step, B batch, V vocabulary. A step tests drafts left to right; n_accepted [B] is the leading
run of passes, and the committed token after them sits at position n_accepted (a correction when n_accepted < k,
the bonus from p_{k+1} when n_accepted == k). Everything here is batched tensor code: no loop over rows or
vocabulary, no host sync.
"""
from __future__ import annotations

import functools
import warnings

import torch
from torch import Tensor

from specdec.protocols import Randomness
from specdec.random import draw_uniforms, sample_categorical


# --- scanning and gathering ------------------------------------------------------------------------------------------
def leading_run(ok: Tensor) -> Tensor:
    """ok [B, k] bool -> LongTensor [B]: the number of leading True values per row."""
    return ok.long().cumprod(-1).sum(-1)


def accept_run(rng: Randomness, p_x: Tensor, q_x: Tensor, u: Tensor | None = None) -> Tensor:
    """The speculative-sampling test, scanned: draft j passes iff U_j < p_x[:, j] / q_x[:, j] (U from the "accept"
    stream, or u [B, k] when already drawn), written without division (q = 0 cannot occur for a real draft, p = 0
    always rejects). p_x, q_x [B, k] -> n_accepted LongTensor [B]."""
    return leading_run((rng.uniform("accept", p_x.shape[1]) if u is None else u) * q_x < p_x)


def step_uniforms(rng: Randomness, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """A chain step's uniforms in one draw where rng allows (`specdec.random.draw_uniforms`), in the order the
    separate calls make them: ("accept" [B, k], "sample" [B, k + 1], "residual" [B, k + 1])."""
    return tuple(draw_uniforms(rng, (("accept", k), ("sample", k + 1), ("residual", k + 1))))


def token_probs(probs: Tensor, tokens: Tensor) -> Tensor:
    """probs [B, k(+1), V], tokens [B, k] -> probs[b, j, tokens[b, j]] as [B, k]."""
    return probs[:, : tokens.shape[1]].gather(-1, tokens[..., None])[..., 0]


def at_position(x: Tensor, index: Tensor) -> Tensor:
    """x [B, n, ...], index [B] -> x[b, index[b]] as [B, ...]."""
    return x.gather(1, index.view(-1, *([1] * (x.dim() - 1))).expand(-1, 1, *x.shape[2:]))[:, 0]


def draft_q_at(draft_probs: Tensor, n_accepted: Tensor) -> Tensor:
    """q of the committed position [B, V]: the rejected draft's q, or 0 at the bonus position (n_accepted == k)."""
    k = draft_probs.shape[1]
    if k == 0:
        return draft_probs.new_zeros(draft_probs.shape[0], draft_probs.shape[-1])
    # gather one row, then zero it at the bonus: no copy of the whole [B, k, V] draft law per step
    return at_position(draft_probs, n_accepted.clamp_max(k - 1)).masked_fill((n_accepted == k)[:, None], 0.0)


# --- the committed token ------------------------------------------------------------------------------------------
def correction_uniform(rng: Randomness, n_accepted: Tensor, k: int,
                       drawn: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """The uniform [B] for the token committed after n_accepted drafts (drawn: the "sample" and "residual" uniforms
    [B, k + 1] when already drawn, `step_uniforms`).

    A correction (after a rejection) draws from the "residual" stream. A bonus (all k accepted) is a plain draw
    from p, and takes the "sample" stream, the one plain AR decoding and drafters use at the same position: so a
    drafter equal to the target reproduces plain AR token for token. Both are fresh: no committed decision so far
    read them."""
    if drawn is None:
        drawn = rng.uniform("sample", k + 1), rng.uniform("residual", k + 1)
    u_sample, u_residual = drawn
    u = torch.where(n_accepted[:, None] == k, u_sample, u_residual)
    return u.gather(1, n_accepted[:, None])[:, 0]


def residual(p: Tensor, q: Tensor) -> Tensor:
    """The unnormalised correction law (p - q)+ [..., V], or p itself where p and q agree to rounding (the
    residual then has no mass, and p is the right law)."""
    r = (p - q).clamp_min(0)
    return torch.where(r.sum(-1, keepdim=True) <= 1e-9, p, r)


def residual_sample(target_probs: Tensor, draft_probs: Tensor, n_accepted: Tensor, u: Tensor) -> Tensor:
    """Standard speculative sampling's committed token: y ~ norm((p - q)+) at the first rejection, y ~ p_{k+1}
    after k acceptances. target_probs [B, k+1, V], draft_probs [B, k, V], n_accepted [B], u [B] -> LongTensor [B]."""
    p = at_position(target_probs, n_accepted)
    return sample_categorical(residual(p, draft_q_at(draft_probs, n_accepted)), u)


def relax(p: Tensor, removed: Tensor, drop: Tensor, x: Tensor | None = None,
          credited: Tensor | None = None) -> Tensor:
    """A draft's relaxed target: p [..., V] with p(removed[..., m]) := 0 where drop[..., m], then, when x [...] is
    given, p(x) := credited [...]. removed [..., M] must not hold x where drop is set."""
    out = p.scatter(-1, removed, torch.where(drop, torch.zeros((), dtype=p.dtype, device=p.device),
                                             p.gather(-1, removed)))
    if x is not None:
        out = out.scatter(-1, x[..., None], credited[..., None].to(p.dtype))
    return out


def relaxed_residual_sample(target_probs: Tensor, draft_probs: Tensor, draft_tokens: Tensor, n_accepted: Tensor,
                            u: Tensor, removed: Tensor, drop: Tensor, credited: Tensor | None = None) -> Tensor:
    """The committed token when each draft x_j was tested against its own relaxed target p'_j (LANTERN, GSD's
    group residual): at the first rejection y ~ norm((p'_j - q_j)+) (p'_j itself when that has no mass), after k
    acceptances y ~ p_{k+1}. p'_j = `relax`(p_j, removed[:, j], drop[:, j], x_j, credited[:, j]).

    target_probs [B, k+1, V], draft_probs [B, k, V], draft_tokens [B, k], n_accepted [B], u [B],
    removed LongTensor [B, k, M], drop BoolTensor [B, k, M], credited [B, k] or None -> LongTensor [B]."""
    k = draft_tokens.shape[1]
    if k == 0:                                                                # no draft: plain sampling from p_1
        return residual_sample(target_probs, draft_probs, n_accepted, u)
    pos = n_accepted.clamp_max(k - 1)
    p = at_position(target_probs, n_accepted)                                 # p_j, or p_{k+1} for the bonus
    x = at_position(draft_tokens, pos)
    p_rel = relax(p, at_position(removed, pos), at_position(drop, pos), None if credited is None else x,
                  None if credited is None else at_position(credited, pos))
    p_rel = torch.where((n_accepted < k)[:, None], p_rel, p)                 # the bonus is not relaxed
    return sample_categorical(residual(p_rel, draft_q_at(draft_probs, n_accepted)), u)


# --- constructor arguments ---------------------------------------------------------------------------------------
K_DEPRECATED = "k= is deprecated, use neighbours=; k will be removed in the next release"


def neighbours_alias(cls):
    """Class decorator (above @dataclass) for the rules whose neighbour count was called `k` until this release:
    `k=` stays accepted as a keyword alias of `neighbours=` with a DeprecationWarning, and `rule.k` reads
    `rule.neighbours`. Positional use is unchanged (the second argument is the neighbour count). Messages about the
    count use the name the caller spelled (`rule._neighbours_word`)."""
    init = cls.__init__

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        if "k" in kwargs:
            warnings.warn(K_DEPRECATED, DeprecationWarning, stacklevel=2)
            if len(args) > 1 or "neighbours" in kwargs:
                raise TypeError(f"{cls.__name__}: give the neighbour count once, as neighbours= (k= is its "
                                f"deprecated alias)")
            kwargs["neighbours"] = kwargs.pop("k")
            object.__setattr__(self, "_neighbours_word", "k")
        # a count the caller never gave (the default) is clamped to the geometry without a warning
        object.__setattr__(self, "_neighbours_given", len(args) > 1 or "neighbours" in kwargs)
        init(self, *args, **kwargs)

    cls.__init__ = __init__
    cls._neighbours_word = "neighbours"
    cls.k = property(lambda self: self.neighbours, doc="Deprecated alias of `neighbours` (removed next release).")
    return cls


# a rule's __post_init__ -> dataclass __init__ -> `neighbours_alias` __init__ -> the caller that built the rule
CALLER_OF_RULE = 4


class NeighbourTable:
    """What the rules built on a k-nearest-neighbour table of the token geometry share (mixed in before
    AcceptanceRule): the count clamped to what the geometry holds, and the table built ahead of decoding."""

    def _clamp_neighbours(self) -> None:
        """Clamp self.neighbours to V - 1 (with a warning at the line that built the rule); call in __post_init__."""
        object.__setattr__(self, "neighbours", self.geometry.clamp_neighbours(
            self.neighbours, type(self).__name__, self._neighbours_word, CALLER_OF_RULE + 1,
            quiet=not self._neighbours_given))

    def prepare(self, device) -> None:
        """Build the neighbour table on `device` before the first step."""
        self.geometry.prepare(device, self.neighbours)
