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
gets the target head's means at the drafter's chain states, all S of them in one batched head call; a rejected
chain is continued by the target head from the corrected state (one call per remaining transition, batched over
the rejected positions), and the token is the target's mean at the exact x_{S-1}. Any other rule (CSpD) gets the
target head's own whole chain from the same x_T and noises.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from specdec.adapters.mar import HeadChain, MARAdapter, MARState
from specdec.continuous import GaussianChain
from specdec.protocols import ContinuousRule

CONTEXTS = ("pre_draft", "per_step", "union")


@dataclass(frozen=True)
class TokenVerdict:
    """The verdict on N drafted tokens of B images.

    tokens:         [B, N, D] what the rule emits (the draft token where it is kept)
    first_rejected: LongTensor [B, N] first rejected transition of the verified window; `window` = none
    window:         transitions in the verified window (exact rule: S - 1; CSpD: 1, the token)
    fallbacks:      LongTensor [B, N] residual loops that took their fallback sample
    head_calls:     sequential target head evaluations this verification took (batched over all positions)
    """

    tokens: Tensor
    first_rejected: Tensor
    window: int
    fallbacks: Tensor
    head_calls: int


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


def finish_chains(target: MARAdapter, z: Tensor, cfg_k: Tensor | float, x: Tensor, j: Tensor, noises: Tensor,
                  temperature: float, todo: Tensor, tokens: Tensor) -> tuple[Tensor, int]:
    """Run the target head's ancestral chain to the token where todo [M] (BoolTensor), from state x [M, D] at chain
    index j [M] (x = x_j; j = S - 1 means only the noiseless last step is left). z: per-position conditions
    [M or 2M, 1, C]; cfg_k float or [M]; noises [M, S, D] (shared); tokens [M, D] kept where not todo.
    -> (tokens [M, D], head calls made: one per remaining transition, batched over the positions)."""
    S, M = noises.shape[1], x.shape[0]
    idx = todo.nonzero()[:, 0]
    x, j, out, calls = x[idx], j[idx], tokens.clone(), 0
    while idx.numel():
        mean, logvar = target.head_transition(_rows(z, idx, M), x[:, None, None], (S - 1 - j)[:, None, None],
                                              _cfg_at(cfg_k, idx))
        mean, logvar, calls = mean[:, 0, 0], logvar[:, 0, 0], calls + 1
        last = j == S - 1
        out[idx[last]] = mean[last]
        # the same expression as the head's own chain (same float rounding)
        x = mean + torch.exp(0.5 * logvar) * noises[idx, j.clamp_max(S - 2)] * temperature
        idx, x, j = idx[~last], x[~last], j[~last] + 1
    return out, calls


def verify_tokens(target: MARAdapter, rule: ContinuousRule, z: Tensor, cfg_k: Tensor | float, draft: HeadChain,
                  x_T: Tensor, noises: Tensor, u: Tensor, temperature: float,
                  generator: torch.Generator) -> TokenVerdict:
    """The verdict on N drafted tokens of B images. z: the target's conditions [R, N, C] (`draft_contexts`);
    cfg_k: float or per-position guidance [B, N]; draft: the drafter's recorded chains (tokens [B, N, D], means /
    logvars / states [B, N, S, D]); x_T [B, N, D], noises [B, N, S, D] shared by both heads; u [B, N, S] uniforms,
    one per head step (the exact rule reads the S - 1 transitions', CSpD the last)."""
    B, N, S, D = draft.states.shape
    M = B * N
    zf, cf = per_position(z), cfg_k.reshape(M) if isinstance(cfg_k, Tensor) else cfg_k
    flat = lambda t: t.reshape(M, 1, *t.shape[2:])                               # [B, N, ...] -> [M, 1, ...]
    log_t2 = 2 * math.log(temperature)                                           # the samplers' tau^2 on sigma^2
    if rule.target_at_draft_states:
        steps = torch.arange(S - 1, -1, -1, device=x_T.device)
        mean_p, logvar_p = target.head_transition(zf, flat(draft.states), steps, cf)          # [M, 1, S, D]
        states, eps = flat(draft.states), flat(noises)[:, :, :-1]
        verdict = rule.verify(GaussianChain(states, flat(draft.means)[:, :, :-1], flat(draft.logvars)[:, :, :-1]
                                            + log_t2, eps),
                              GaussianChain(states, mean_p[:, :, :-1], logvar_p[:, :, :-1] + log_t2, eps),
                              flat(u)[:, :, :-1], generator)
        r = verdict.first_rejected[:, 0]                                                      # [M]
        tokens, calls = mean_p[:, 0, -1], 1
        todo = r < S - 1
        if bool(todo.any()):
            tokens, more = finish_chains(target, zf, cf, verdict.state[:, 0], r + 1, flat(noises)[:, 0],
                                         temperature, todo, tokens)
            calls += more
    else:
        own = target.head_chain(zf, flat(x_T), flat(noises), temperature, cf, record=True)
        end = lambda c: torch.cat([c.states, c.tokens[:, :, None]], 2)                       # [M, 1, S + 1, D]
        verdict = rule.verify(GaussianChain(end(flat_chain(draft)), flat(draft.means), flat(draft.logvars) + log_t2,
                                            flat(noises)),
                              GaussianChain(end(own), own.means, own.logvars + log_t2, flat(noises)), flat(u),
                              generator)
        tokens, calls = verdict.state[:, 0], S
    return TokenVerdict(tokens.reshape(B, N, D), verdict.first_rejected.reshape(B, N), verdict.window,
                        verdict.fallbacks.reshape(B, N), calls)


def flat_chain(chain: HeadChain) -> HeadChain:
    """A recorded HeadChain [B, N, ...] as [B N, 1, ...] (per-position layout)."""
    f = lambda t: t.reshape(-1, 1, *t.shape[2:])
    return HeadChain(f(chain.tokens), f(chain.means), f(chain.logvars), f(chain.states))
