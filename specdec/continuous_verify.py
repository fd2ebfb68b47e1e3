"""One verification of drafted MAR steps (Li et al., arXiv 2406.11838): the target's conditions for the drafted
positions, and the target head's verdict on every drafted token. Used by `specdec.continuous_loop`.

Shapes: B images, L tokens, D token dim, S head steps (S - 1 noisy transitions, then the noiseless last step whose
mean is the token), G drafted AR steps, n_g positions of step g, N = sum n_g, C backbone width, R = B or 2B model
rows (CFG: [B conditional; B unconditional]).

Contexts (what the target's backbone sees when it conditions the drafted positions):
  "pre_draft"  one pass over the committed tokens only (CSpD, arXiv 2411.11925): every drafted step is conditioned
               on the context before the round, exact for the round's first step only;
  "per_step"   the G contexts in ONE backbone call of G x R rows: row group g sees the committed tokens and the
               drafted steps before g, exactly the context the sequential model sees at step g. MAR's encoder is
               bidirectional, so nothing cheaper gives these contexts in general;
  "union"      one pass over the committed tokens and the drafted steps before the last: for a causal model
               (attention along the generation order, `specdec.models.mar.backbone`) a token's condition depends
               only on the tokens generated before it, so this equals "per_step" when every drafted step predicts
               one token (raster continuous AR); otherwise it is an approximation.

Verification: a rule with `target_at_draft_states` (the exact rule over Gaussian transitions, arXiv 2501.05370)
speculates over each token's head chain (`speculate_chains`): windows of transitions proposed by the drafter's
head (the first one from its recorded chain), each window's states evaluated by the target head in ONE call,
verified in order; the token is the target's mean at the exact x_{S-1}. Any other rule (CSpD) gets the target
head's own whole chain from the same x_T and noises.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from specdec.adapters.mar import HeadChain, MARAdapter, MARState
from specdec.continuous import GaussianChain, HeadReference, roll_transitions
from specdec.protocols import ContinuousRule

CONTEXTS = ("pre_draft", "per_step", "union")


@dataclass(frozen=True)
class TokenVerdict:
    """The verdict on N drafted tokens of B images.

    tokens:         [B, N, D] what the rule emits (the draft token where it is kept)
    first_rejected: LongTensor [B, N] first rejected transition of the first verified window (the drafted chain);
                    `window` = none
    window:         transitions in that window (exact rule: S - 1; CSpD: 1, the token)
    counts:         LongTensor [5] over the whole verification, continuations included: sequential target head
                    calls, sequential drafter head calls, transitions (CSpD: tokens) drafted, accepted, fallbacks
    """

    tokens: Tensor
    first_rejected: Tensor
    window: int
    counts: Tensor


def step_visibility(committed: Tensor, groups: list[Tensor]) -> list[Tensor]:
    """committed BoolTensor [B, L] (True = known), groups: positions [B, n_g] of the drafted steps in order ->
    the visible set of each step, [B, L] each: the committed tokens and every drafted step before it."""
    out, visible = [], committed
    for positions in groups:
        out.append(visible)
        visible = visible.scatter(1, positions, True)
    return out


def draft_contexts(target: MARAdapter, state: MARState, drafted: Tensor, groups: list[Tensor],
                   mode: str) -> Tensor:
    """The target's conditions z [R, N, C] of the drafted positions torch.cat(groups, 1), in the context `mode`
    (see the module docstring). state: the committed state (mask: True = unknown); drafted [B, L, D]: committed
    tokens plus the drafted ones. One backbone call whatever the mode."""
    if mode not in CONTEXTS:
        raise ValueError(f"contexts must be one of {CONTEXTS}, got {mode!r}")
    positions = torch.cat(groups, 1)
    if mode == "pre_draft":
        return target.condition(state, positions)
    view = replace(state, tokens=drafted)
    visible = step_visibility(~state.mask, groups)
    if mode == "union" or len(groups) == 1:
        return target.condition(view, positions, visible[-1] if mode == "union" else visible[0])
    G, B, N = len(groups), state.batch, positions.shape[1]
    halves = state.class_rows.chunk(2) if state.cfg else (state.class_rows,)
    rows = replace(view, tokens=drafted.repeat(G, 1, 1), mask=state.mask.repeat(G, 1),
                   order=state.order.repeat(G, 1), rank=state.rank.repeat(G, 1),
                   class_rows=torch.cat([h.repeat(G, 1) for h in halves]))
    z = target.condition(rows, positions.repeat(G, 1), torch.cat(visible))           # [H * G * B, N, C]
    group = torch.cat([torch.full((g.shape[1],), i, dtype=torch.long, device=z.device)
                       for i, g in enumerate(groups)])                                # [N]: step of each column
    z = z.reshape(len(halves), G, B, N, z.shape[-1])
    z = z.gather(1, group.view(1, 1, 1, N, 1).expand(len(halves), 1, B, N, z.shape[-1])).squeeze(1)
    return z.reshape(len(halves) * B, N, -1)


def per_position(z: Tensor) -> Tensor:
    """z [R, N, C] -> [R N, 1, C]: every position its own 'image' (so that each takes its own step's guidance);
    the CFG layout is kept, [B N conditional rows; B N unconditional rows]."""
    return z.reshape(-1, 1, z.shape[-1])


def _rows(z: Tensor, idx: Tensor, n: int) -> Tensor:
    """Rows idx of a per-position z [n or 2n, 1, C] (with their unconditional twins)."""
    return torch.cat([z[idx], z[idx + n]]) if z.shape[0] == 2 * n else z[idx]


def _cfg_at(cfg_k: Tensor | float, idx: Tensor) -> Tensor | float:
    return cfg_k[idx] if isinstance(cfg_k, Tensor) else cfg_k


def _step(adapter: MARAdapter, z: Tensor, x: Tensor, chain_index: Tensor, cfg_k) -> tuple[Tensor, Tensor]:
    """One head evaluation at states x [n, m, D], chain indices [n, m] -> (mean, logvar) [n, m, D]."""
    S = adapter.num_steps
    mean, logvar = adapter.head_transition(z, x[:, None], (S - 1 - chain_index)[:, None], cfg_k)
    return mean[:, 0], logvar[:, 0]


def _first_transition(target: MARAdapter, zp: Tensor, cfg_k, x_T: Tensor, noise: Tensor,
                      temperature: float) -> tuple[Tensor, HeadReference]:
    """The target's own first transition from x_T [M, D] (one head call): -> (x_1 [M, D], the reference the frozen
    drafter reuses). Its last step (S = 1) is noiseless: then x_1 is the token."""
    S = target.num_steps
    mean, logvar = _step(target, zp, x_T[:, None], torch.zeros(len(x_T), 1, dtype=torch.long, device=x_T.device),
                         cfg_k)
    mean, logvar = mean[:, 0], logvar[:, 0]
    x = mean if S == 1 else mean + torch.exp(0.5 * logvar) * noise * temperature
    return x, HeadReference(x_T, torch.zeros(len(x_T), dtype=torch.long, device=x_T.device), mean, logvar)


def _model_proposals(drafter: MARAdapter, zq: Tensor, x: Tensor, at: Tensor, eps: Tensor, cfg_k,
                     temperature: float) -> tuple[Tensor, Tensor, Tensor]:
    """A drafter head's w transitions from x [n, D] at chain indices at [n, w] -> states [n, w+1, D], means and
    logvars [n, w, D] (one drafter head call per transition)."""
    def head(state: Tensor, step: Tensor) -> tuple[Tensor, Tensor]:
        mean, logvar = _step(drafter, zq, state[:, None], step[:, None], cfg_k)
        return mean[:, 0], logvar[:, 0]
    return roll_transitions(head, x, at, eps, temperature)


def speculate_chains(target: MARAdapter, drafter, zp: Tensor, zq: Tensor | None, cfg_k: Tensor | float,
                     x_T: Tensor, first: HeadChain | None, noises: Tensor, u: Tensor, temperature: float,
                     rule: ContinuousRule, generator: torch.Generator, window: int) -> tuple[Tensor, Tensor, Tensor]:
    """The target head's chains at M positions, sampled speculatively over their transitions (arXiv 2501.05370)
    from x_T [M, D] with the shared noises [M, S, D] and uniforms [M, S]. Each round, from the exact state x_j:
    the drafter proposes `window` transitions (a MARAdapter: its head, round one its recorded chain `first`
    [M, 1, S, ...] when given, which is exactly that; a chain-only drafter such as `drafters.FrozenHeadDrafter`:
    from the target's last evaluation, after one target call at x_T), the target's head evaluates all window + 1
    states in ONE call, `rule` verifies them in order; a rejection at r leaves the exact corrected x_{j+r+1}; all
    passed: the target's own next transition is free (the bonus), or the token (its mean at x_{S-1}, the noiseless
    last step) when the window reached x_{S-1}. Noises and uniforms of transitions after a rejection were read by
    no decision, so they are reused. zp, zq: per-position conditions of target and drafter [M or 2M, 1, C] (zq
    None for a chain-only drafter); cfg_k float or [M]. Host syncs per round: one to drop finished positions, plus
    the rule's (GaussianChainRule: its finite check; its residual loop only where variances differ).
    -> (tokens [M, D], first_rejected LongTensor [M]: chain index of the first rejected transition, S - 1 = none,
    counts LongTensor [5]: target head calls, drafter head calls, transitions drafted, accepted, fallbacks)."""
    S, M, last = noises.shape[1], noises.shape[0], noises.shape[1] - 1
    idx, x, j = torch.arange(M, device=x_T.device), x_T, torch.zeros(M, dtype=torch.long, device=x_T.device)
    out, first_rejected = torch.zeros_like(x), torch.full_like(j, last)
    counts = torch.zeros(5, dtype=torch.long, device=x.device)
    offsets, log_t2 = torch.arange(window + 1, device=x.device), 2 * math.log(temperature)
    chain_only, ref = getattr(drafter, "chain_only", False), None
    if chain_only:
        x, ref = _first_transition(target, zp, cfg_k, x_T, noises[:, 0], temperature)
        counts[0] += 1
        if last == 0:
            return x, first_rejected, counts
        j = j + 1
    while idx.numel():              # host syncs per round: this compaction's one, plus the rule's (see the doc)
        zp_i, c_i, n = _rows(zp, idx, M), _cfg_at(cfg_k, idx), idx.numel()
        at = (j[:, None] + offsets).clamp_max(last)                                  # chain index of each state
        eps = noises[idx[:, None], at]
        if first is not None:                # round one: every position at x_T, proposals already drafted
            states, mq, lq = (t[:, 0, :k] for t, k in ((first.states, window + 1), (first.means, window),
                                                       (first.logvars, window)))
            first = None
        elif chain_only:
            states, mq, lq = drafter.propose(target, ref, x, at[:, :window], eps[:, :window], temperature)
        else:
            states, mq, lq = _model_proposals(drafter, _rows(zq, idx, M), x, at[:, :window], eps, c_i, temperature)
            counts[1] += window
        mp, lp = _step(target, zp_i, states, at, c_i)
        m = (last - j).clamp(max=window)                                             # transitions inside the chain
        inside = (offsets[:window] < m[:, None])[..., None]         # past the chain's end q := p (passes, uncounted)
        e = eps[:, None, :window]
        verdict = rule.verify(GaussianChain(states[:, None], torch.where(inside, mq, mp[:, :window])[:, None],
                                            torch.where(inside, lq, lp[:, :window])[:, None] + log_t2, e),
                              GaussianChain(states[:, None], mp[:, None, :window], lp[:, None, :window] + log_t2, e),
                              u[idx[:, None], at[:, :window]][:, None], generator)
        r, rows = verdict.first_rejected[:, 0], torch.arange(n, device=x.device)
        rejected = r < m
        done = ~rejected & (j + m == last)
        out[idx] = torch.where(done[:, None], mp[rows, m], out[idx])
        first_rejected[idx] = torch.where(rejected & (first_rejected[idx] == last), j + r, first_rejected[idx])
        bonus = mp[rows, m] + torch.exp(0.5 * lp[rows, m]) * noises[idx, (j + m).clamp_max(last - 1)] * temperature
        if chain_only:                       # the target's evaluation just before the next state: x_{j+r} or x_{j+m}
            o = torch.where(rejected, r, m)
            ref = HeadReference(states[rows, o], j + o, mp[rows, o], lp[rows, o])
        x = torch.where(rejected[:, None], verdict.state[:, 0], bonus)
        j = torch.where(rejected, j + r + 1, j + m + 1)
        counts += torch.stack([torch.ones_like(m[0]), torch.zeros_like(m[0]), m.sum(), torch.minimum(r, m).sum(),
                               (verdict.fallbacks[:, 0] * rejected).sum()])
        keep = (~done).nonzero()[:, 0]                                               # the round's host sync
        idx, x, j = idx[keep], x[keep], j[keep]
        ref = ref if ref is None else ref.rows(keep)
    return out, first_rejected, counts


def verify_tokens(target: MARAdapter, rule: ContinuousRule, z: Tensor, cfg_k: Tensor | float,
                  draft: HeadChain | None, x_T: Tensor, noises: Tensor, u: Tensor, temperature: float,
                  generator: torch.Generator, drafter: MARAdapter | None = None, zq: Tensor | None = None,
                  window: int | None = None) -> TokenVerdict:
    """The verdict on N drafted tokens of B images. z: the target's conditions [R, N, C] (`draft_contexts`);
    cfg_k: float or per-position guidance [B, N]; draft: the drafter's recorded chains (tokens [B, N, D], means /
    logvars / states [B, N, S, D]; None for the exact rule: its head proposes from x_T); x_T [B, N, D], noises
    [B, N, S, D] shared by both heads; u [B, N, S] uniforms, one per head step (the exact rule reads the S - 1
    transitions', CSpD the last). A rule with `target_at_draft_states` runs `speculate_chains` with `window`
    transitions per target head call (None: the whole chain, S - 1), the drafter's conditions zq [R', N, C']
    proposing after a rejection."""
    B, N, S, D = noises.shape
    M = B * N
    zf, cf = per_position(z), cfg_k.reshape(M) if isinstance(cfg_k, Tensor) else cfg_k
    fc = None if draft is None else flat_chain(draft)
    flat = lambda t: t.reshape(M, 1, *t.shape[2:])                               # [B, N, ...] -> [M, 1, ...]
    if rule.target_at_draft_states:
        window = S - 1 if window is None else min(window, S - 1)
        zqf = None if zq is None else per_position(zq)                         # None: a chain-only drafter
        tokens, first, counts = speculate_chains(target, drafter, zf, zqf, cf, flat(x_T)[:, 0], fc,
                                                 flat(noises)[:, 0], flat(u)[:, 0], temperature, rule, generator,
                                                 window)
        return TokenVerdict(tokens.reshape(B, N, D), first.reshape(B, N), S - 1, counts)
    log_t2 = 2 * math.log(temperature)                                           # the samplers' tau^2 on sigma^2
    own = target.head_chain(zf, flat(x_T), flat(noises), temperature, cf, record=True)
    end = lambda c: torch.cat([c.states, c.tokens[:, :, None]], 2)                           # [M, 1, S + 1, D]
    verdict = rule.verify(GaussianChain(end(fc), fc.means, fc.logvars + log_t2, flat(noises)),
                          GaussianChain(end(own), own.means, own.logvars + log_t2, flat(noises)), flat(u), generator)
    kept = verdict.first_rejected.sum()
    counts = torch.stack([kept.new_tensor(S), kept.new_tensor(0), kept.new_tensor(M), kept, verdict.fallbacks.sum()])
    return TokenVerdict(verdict.state[:, 0].reshape(B, N, D), verdict.first_rejected.reshape(B, N), 1, counts)


def flat_chain(chain: HeadChain) -> HeadChain:
    """A recorded HeadChain [B, N, ...] as [B N, 1, ...] (per-position layout)."""
    f = lambda t: t.reshape(-1, 1, *t.shape[2:])
    return HeadChain(f(chain.tokens), f(chain.means), f(chain.logvars), f(chain.states))
