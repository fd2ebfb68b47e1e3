"""Speculative sampling over a diffusion head's Gaussian transitions, exact by reflection maximal coupling. LOSSLESS.

De Bortoli, Galashov, Gretton, Doucet, "Accelerated Diffusion Models via Speculative Sampling", ICML 2025,
arXiv 2501.05370.

Notation: p = target head, q = draft head; B batch, n token positions, S transitions of a head's chain, k the
transitions drafted per round, D token dim. A continuous token's law under the target is the law of the target
head's ancestral chain given its condition z (MAR, arXiv 2406.11838):

    x_0 = x_T ~ N(0, I);  x_{j+1} = mu_p,j(x_j) + sigma_j eps_j  (j < S-1);  token = mu_p,S-1(x_{S-1})  (noiseless)

so one speculates over the chain: from the current exact state x_j the drafter rolls out k transitions with the
shared noises, x_{j+i+1} = mu_q(x_{j+i}) + sigma eps_{j+i}; the target head evaluates its means at all the drafted
states in ONE batched call; transitions are verified in order with min(1, N(x; mu_p, sigma^2) / N(x; mu_q,
sigma^2)); at the first rejection r the drafted x_{j+r+1} is replaced by its reflection across the bisector of
mu_q and mu_p (`specdec.continuous.reflect_coupling`), which is exactly a draw of the target's transition; the
target continues the chain from there. All k accepted: the target's mean at the last drafted state gives one more
transition for free (the bonus, with its shared noise), or the token when that state is x_{S-1}.

What it guarantees: with a SHARED covariance (both heads use the schedule's sigma_t, as a DDPM head with fixed
variances does; give both chains the same log-variances) every committed transition has exactly the target's law,
so the token has exactly the target's law: lossless, no loop, one draw. Where the log-variances differ (learned
variances, mismatched temperatures) reflection is not exact; that transition's residual norm((p - q)+) is then
sampled by rejection (propose y ~ p, keep with (1 - q(y)/p(y))+, ~1/TV tries, expected total cost one proposal per
transition), exact while the loop succeeds. The loop is capped at `max_tries`; an exhausted loop takes a fresh
draw from p and is counted (`fallbacks`). That one event is not exact: it moves the transition's law by at most
TV (1 - TV)^M <= M^M / (M + 1)^(M + 1) ~ 1 / (e (M + 1)) in total variation, M = max_tries (3.7e-5 per transition at
the default 10,000; the token's law by at most the sum over its transitions).

Why shared noises and per-transition uniforms keep it exact: a transition's decision reads its own noise and its
own uniform only; noises and uniforms of transitions drafted after a rejection were read by no committed decision,
so they are re-used when those transitions are drafted again from the corrected state.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from specdec.continuous import (ChainVerdict, GaussianChain, MeanFn, at_steps, check_pair, gaussian_log_density,
                                reflect_coupling, rejection_residual, rollout)
from specdec.protocols import ContinuousRule
from verifiers._kit import leading_run


@dataclass(frozen=True)
class GaussianChainRule(ContinuousRule):
    """max_tries: the cap of the rejection-loop residual (used only where the two heads' log-variances differ).
    check_finite: refuse NaN / inf head outputs (one host sync per call)."""

    max_tries: int = 10_000
    check_finite: bool = True

    lossless = True
    name = "gaussian_chain"
    target_at_draft_states = True

    def __post_init__(self):
        if isinstance(self.max_tries, bool) or not isinstance(self.max_tries, int) or self.max_tries < 1:
            raise ValueError(f"max_tries must be an integer >= 1 (the residual loop's cap), got {self.max_tries!r}")

    def verify(self, draft: GaussianChain, target: GaussianChain, u: Tensor,
               generator: torch.Generator) -> ChainVerdict:
        """draft: the drafter's window rollout, states [B, n, k+1, D] (states[..., 0, :] the current exact state),
        means / log_vars [B, n, k, D]; target: the target head's means / log_vars [B, n, k, D] at
        draft.states[..., :k, :] (its states are not read); u [B, n, k] -> ChainVerdict (state: the exact state
        after the window, first_rejected in 0..k)."""
        check_pair(draft, target, u, self.check_finite)
        k = draft.length
        x, mq, mp, lq, lp = draft.states[:, :, 1:], draft.means, target.means, draft.log_vars, target.log_vars
        shared = (lq == lp).all(-1)                                               # [B, n, k]
        y_reflect, ok_reflect = reflect_coupling(x, mq, mp, torch.exp(0.5 * lq), u)
        ok_ratio = torch.log(u) < gaussian_log_density(x, mp, lp) - gaussian_log_density(x, mq, lq)
        r = leading_run(torch.where(shared, ok_reflect, ok_ratio))               # [B, n]
        at_r = lambda t: at_steps(t, r.clamp_max(k - 1)[..., None])[:, :, 0]
        shared_r, mp_r, lp_r = at_r(shared), at_r(mp), at_r(lp)
        fresh = mp_r + torch.exp(0.5 * lp_r) * torch.randn(mp_r.shape, generator=generator, device=mp_r.device,
                                                           dtype=mp_r.dtype)
        y_loop, tries, exhausted = rejection_residual(mp_r, lp_r, at_r(mq), at_r(lq), (r < k) & ~shared_r, fresh,
                                                      generator, self.max_tries)
        corrected = torch.where(shared_r[..., None], at_r(y_reflect), y_loop)
        state = torch.where((r == k)[..., None], draft.states[:, :, k], corrected)
        return ChainVerdict(state, r, k, exhausted.long(), tries)


@dataclass(frozen=True)
class ChainRun:
    """A whole chain run speculatively by `run_chain`, per token position.

    token:          [B, n, D] the emitted token: the target's mean at the exact x_{S-1} (noiseless last step)
    first_rejected: LongTensor [B, n] chain index of the first rejected transition; S = none was rejected
    target_calls:   LongTensor [B, n] batched target head calls this position needed (plain ancestral sampling: S)
    drafted:        LongTensor [B, n] transitions drafted and verified
    accepted:       LongTensor [B, n] of those, accepted
    fallbacks:      LongTensor [B, n] capped residual loops that took their fallback (0 with a shared covariance)
    rounds:         batched target calls made for the whole batch
    """

    token: Tensor
    first_rejected: Tensor
    target_calls: Tensor
    drafted: Tensor
    accepted: Tensor
    fallbacks: Tensor
    rounds: int


def run_chain(draft_mean: MeanFn, target_mean: MeanFn, x_T: Tensor, noises: Tensor, uniforms: Tensor,
              draft_log_vars: Tensor, target_log_vars: Tensor, k: int, generator: torch.Generator,
              rule: GaussianChainRule | None = None) -> ChainRun:
    """The reference driver: speculate over whole chains until every position has its token.

    draft_mean, target_mean: heads, (x [..., D], chain index LongTensor [...]) -> means [..., D]; x_T [B, n, D];
    noises [B, n, S, D] (shared by both heads); uniforms [B, n, S] in (0, 1), one per transition;
    draft_log_vars, target_log_vars broadcastable to [B, n, S, D] (equal: reflection, exact; different: the capped
    rejection loop); k >= 1 transitions drafted per round. Each round: k drafter calls, ONE target call over the
    k+1 states [B, n, k+1, D], one `rule.verify`; a position advances r+1 transitions after a rejection at r, k+1
    when all pass (the bonus). A last target call at x_{S-1} makes the tokens the rounds did not."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k (gamma, transitions drafted per round) must be an integer >= 1, got {k!r}")
    if noises.dim() != 4 or tuple(x_T.shape) != (*noises.shape[:2], noises.shape[3]):
        raise ValueError(f"x_T must be [B, n, D] and noises [B, n, S, D] with the same B, n, D; got x_T "
                         f"{tuple(x_T.shape)}, noises {tuple(noises.shape)}")
    if tuple(uniforms.shape) != tuple(noises.shape[:3]):
        raise ValueError(f"uniforms must be [B, n, S] = {tuple(noises.shape[:3])}, got {tuple(uniforms.shape)}")
    rule = GaussianChainRule() if rule is None else rule
    S, last = noises.shape[2], noises.shape[2] - 1
    lvq, lvp = _expand("draft_log_vars", draft_log_vars, noises.shape), _expand("target_log_vars", target_log_vars,
                                                                                 noises.shape)
    zeros = torch.zeros(x_T.shape[:2], dtype=torch.long, device=x_T.device)
    j, x = zeros.clone(), x_T
    token, has_token = torch.zeros_like(x_T), torch.zeros_like(zeros, dtype=torch.bool)
    first, calls, drafted, accepted, fallbacks = zeros + S, zeros.clone(), zeros.clone(), zeros.clone(), zeros.clone()
    offsets, rounds = torch.arange(k + 1, device=x_T.device), 0
    while bool((active := j < last).any()):                                   # one host sync per round
        steps = (j[..., None] + offsets).clamp_max(last)                      # [B, n, k+1]
        valid = (j[..., None] + offsets[:k]) < last                           # transitions inside the chain
        window = steps[..., :k]
        eps, lq, lp = at_steps(noises, window), at_steps(lvq, window), at_steps(lvp, window)
        drafted_w = rollout(draft_mean, x, window, eps, lq)
        mp = target_mean(drafted_w.states, steps)                             # the one batched target call
        if mp.shape != drafted_w.states.shape:
            raise ValueError(f"the target head returned means {tuple(mp.shape)} for states "
                             f"{tuple(drafted_w.states.shape)}; drafter and target token dims must match")
        # transitions past the chain's end pass trivially (q := p there) and are not counted
        v = valid[..., None]
        draft = GaussianChain(drafted_w.states, torch.where(v, drafted_w.means, mp[:, :, :k]),
                              torch.where(v, lq, lp), eps)
        verdict = rule.verify(draft, GaussianChain(drafted_w.states, mp[:, :, :k], lp, eps),
                              at_steps(uniforms, window), generator)
        m = (last - j).clamp(max=k)                                           # transitions tested, >= 1 if active
        r = verdict.first_rejected
        rejected = r < m
        x_m, mu_m = at_steps(drafted_w.states, m[..., None])[:, :, 0], at_steps(mp, m[..., None])[:, :, 0]
        at_last = j + m == last                                               # x_m is x_{S-1}: mu_m is the token
        bonus_j = (j + m).clamp_max(last)[..., None]
        bonus = mu_m + torch.exp(0.5 * at_steps(lvp, bonus_j)[:, :, 0]) * at_steps(noises, bonus_j)[:, :, 0]
        new_x = torch.where(rejected[..., None], verdict.state, torch.where(at_last[..., None], x_m, bonus))
        new_j = torch.where(rejected, j + r + 1, torch.where(at_last, j + m, j + m + 1))
        made = active & ~rejected & at_last
        token = torch.where(made[..., None], mu_m, token)
        has_token = has_token | made
        first = torch.where(active & rejected & (first == S), j + r, first)
        drafted += torch.where(active, m, 0)
        accepted += torch.where(active, torch.minimum(r, m), 0)
        fallbacks += torch.where(active, verdict.fallbacks, 0)
        calls += active.long()
        x, j = torch.where(active[..., None], new_x, x), torch.where(active, new_j, j)
        rounds += 1
    need = ~has_token
    if bool(need.any()):
        final = target_mean(x, torch.full_like(j, last))
        token = torch.where(need[..., None], final, token)
        calls += need.long()
        rounds += 1
    if rule.check_finite and not bool(torch.isfinite(token).all()):
        raise ValueError("the target head returned non-finite (NaN or inf) means; check the head before sampling")
    return ChainRun(token, first, calls, drafted, accepted, fallbacks, rounds)


def _expand(name: str, log_vars: Tensor, shape: torch.Size) -> Tensor:
    try:
        return torch.broadcast_to(log_vars, shape)
    except RuntimeError:
        raise ValueError(f"{name} {tuple(log_vars.shape)} does not broadcast to the noises' [B, n, S, D] = "
                         f"{tuple(shape)}; give one log-variance per transition ([S, 1] or [S, D])") from None
