"""Continuous tokens: what a continuous acceptance rule sees, and the Gaussian math the rules share.

A continuous-token generator (MAR, Li et al., arXiv 2406.11838) samples each token with a small diffusion head: an
ancestral chain of S Gaussian transitions from x_0 = x_T ~ N(0, I),

    x_{j+1} = mu_j(x_j) + sigma_j * eps_j,   j = 0 .. S-2;      token = x_S = mu_{S-1}(x_{S-1})   (noiseless last)

so a rule sees per-position *distribution objects* (the chain's means, log-variances, noises and states) instead of
[V] probability vectors. Speculative rules over them: CSpD (arXiv 2411.11925) compares the two heads' last-step
Gaussians; the exact rule speculates over the transitions themselves and corrects a rejected one by reflection
maximal coupling (De Bortoli, Galashov, Gretton, Doucet, arXiv 2501.05370).

Notation: p = target head, q = draft head. B batch, n token positions verified together, S transitions of a chain
(m of a window of it), D token dimension. Transition j reads the chain index j; a head's callable
`mean_fn(x [..., D], step LongTensor [...]) -> [..., D]` maps it to its own timestep. Log-variances are those of the
Gaussian the transition samples from (the sampling temperature tau already in: log(tau^2) + the head's log-var).

Also here: a two-sample energy distance (sliced, with a label-permutation null) to certify what a continuous rule
does to the token law, and a linear-Gaussian chain whose token law is known in closed form.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

MeanFn = Callable[[Tensor, Tensor], Tensor]      # (x [..., D], step LongTensor [...]) -> mean [..., D]
LOG_2PI = math.log(2 * math.pi)


# --- what a rule sees ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GaussianChain:
    """A head's Gaussian transition chain (or a window of m transitions of it) at B x n token positions.

    states:   [B, n, m+1, D]  states[..., j, :] is where transition j's mean was evaluated; states[..., m, :] the end
    means:    [B, n, m, D]    transition means mu_j(states[..., j, :])
    log_vars: [B, n, m, D]    log-variances of the transitions (anything broadcastable; stored expanded, a view)
    noises:   [B, n, m, D] or None: the standard-normal noises eps_j the chain was (or is to be) drawn with, shared
              between drafter and target ("trajectory alignment")

    A head's own rollout satisfies states[j+1] = means[j] + exp(log_vars[j] / 2) * noises[j] (the last transition
    of a whole chain without noise); a target evaluated at a drafter's states does not, and need not.
    """

    states: Tensor
    means: Tensor
    log_vars: Tensor
    noises: Tensor | None = None

    def __post_init__(self):
        if self.means.dim() != 4:
            raise ValueError(f"GaussianChain.means must be [B, n, m, D], got shape {tuple(self.means.shape)}")
        B, n, m, D = self.means.shape
        if tuple(self.states.shape) != (B, n, m + 1, D):
            raise ValueError(f"GaussianChain.states must be [B, n, m+1, D] = {(B, n, m + 1, D)} for means "
                             f"{tuple(self.means.shape)}, got {tuple(self.states.shape)}")
        try:
            object.__setattr__(self, "log_vars", torch.broadcast_to(self.log_vars, self.means.shape))
        except RuntimeError:
            raise ValueError(f"GaussianChain.log_vars {tuple(self.log_vars.shape)} does not broadcast to the means' "
                             f"shape {tuple(self.means.shape)}; give one log-variance per transition (and dim)"
                             ) from None
        if self.noises is not None and tuple(self.noises.shape) != tuple(self.means.shape):
            raise ValueError(f"GaussianChain.noises must be [B, n, m, D] like the means {tuple(self.means.shape)}, "
                             f"got {tuple(self.noises.shape)}")

    @property
    def length(self) -> int:
        """m, the number of transitions."""
        return self.means.shape[2]

    @property
    def dim(self) -> int:
        return self.means.shape[3]

    @property
    def end(self) -> Tensor:
        """The last state [B, n, D] (the token, for a whole chain)."""
        return self.states[:, :, -1]


@dataclass(frozen=True)
class ChainVerdict:
    """A continuous rule's decision at B x n positions over a window of `window` tested transitions.

    state:          [B, n, D] the exact rule: the state after the window from which the target continues (the
                    corrected x_{r+1} after a rejection at r, else the last drafted state); CSpD: the emitted token
    first_rejected: LongTensor [B, n] index of the first rejected transition, `window` = none rejected
    window:         the number of transitions tested (CSpD: 1, the token)
    fallbacks:      LongTensor [B, n] residual loops that exhausted their tries and took the fallback sample
    residual_tries: LongTensor [B, n] proposals drawn by the residual loop (0 without one)
    """

    state: Tensor
    first_rejected: Tensor
    window: int
    fallbacks: Tensor
    residual_tries: Tensor

    @property
    def accepted(self) -> Tensor:
        """BoolTensor [B, n]: no transition of the window was rejected (CSpD: the draft token was kept)."""
        return self.first_rejected == self.window


@dataclass(frozen=True)
class HeadReference:
    """The target head's last evaluation per position, what the frozen drafter reuses: state [n, D] (the exact
    state it was evaluated at), index LongTensor [n] (its chain index), mean, logvar [n, D] (the target's output)."""

    state: Tensor
    index: Tensor
    mean: Tensor
    logvar: Tensor

    def rows(self, keep: Tensor) -> "HeadReference":
        return HeadReference(self.state[keep], self.index[keep], self.mean[keep], self.logvar[keep])


def check_pair(draft: GaussianChain, target: GaussianChain, u: Tensor, finite: bool = True) -> None:
    """The drafter's and target's chains must agree in shape (token dims included) and u must hold one uniform per
    transition [B, n, m]; finite=True also refuses NaN / inf head outputs (one host sync)."""
    if draft.dim != target.dim:
        raise ValueError(f"token dims differ: the drafter's head makes D={draft.dim}, the target's D={target.dim}; "
                         f"both heads must emit tokens of the same latent space")
    if draft.means.shape != target.means.shape:
        raise ValueError(f"drafter chain {tuple(draft.means.shape)} and target chain {tuple(target.means.shape)} "
                         f"must have the same [B, n, m, D]")
    if tuple(u.shape) != tuple(draft.means.shape[:3]):
        raise ValueError(f"u must hold one uniform per transition, [B, n, m] = {tuple(draft.means.shape[:3])}, "
                         f"got {tuple(u.shape)}")
    if finite:
        parts = (draft.means, draft.log_vars, draft.states, target.means, target.log_vars)
        ok = torch.stack([torch.isfinite(t).all() for t in parts]).tolist()
        names = ("drafter means", "drafter log-variances", "drafter states", "target means", "target log-variances")
        bad = [name for name, good in zip(names, ok) if not good]
        if bad:
            raise ValueError(f"non-finite (NaN or inf) head outputs in the {', '.join(bad)}; check the heads (and "
                             f"their dtype) before verifying")


# --- Gaussian math --------------------------------------------------------------------------------------------------
def gaussian_log_density(x: Tensor, mean: Tensor, log_var: Tensor) -> Tensor:
    """log N(x; mean, diag(exp(log_var))), summed over the last dim: [..., D] -> [...]."""
    return -0.5 * ((x - mean) ** 2 * torch.exp(-log_var) + log_var + LOG_2PI).sum(-1)


def reflect_coupling(x: Tensor, mu_q: Tensor, mu_p: Tensor, sigma: Tensor, u: Tensor) -> tuple[Tensor, Tensor]:
    """Reflection maximal coupling of q = N(mu_q, diag sigma^2) and p = N(mu_p, diag sigma^2) (arXiv 2501.05370).

    x [..., D] is a draw from q, u [...] a uniform in (0, 1), sigma broadcastable to [..., D] (a SHARED diagonal
    covariance). In whitened coordinates xi = (x - mu_q)/sigma, z = (mu_p - mu_q)/sigma:

        accept x iff u < min(1, p(x)/q(x)) = min(1, exp(<xi, z> - |z|^2/2))
        else y = mu_p + sigma * (xi - 2 <xi, e> e),  e = z/|z|   (x reflected across the bisector of mu_q, mu_p)

    The reflection R is an isometric involution with q o R = p, so a rejected x (sub-density (q - p)+) maps to
    (p - q)+ and y ~ p exactly, in one draw: P(y = x) = 1 - TV(p, q) = 2 Phi(-|z|/2). Returns (y [..., D],
    accepted BoolTensor [...])."""
    xi = (x - mu_q) / sigma
    z = (mu_p - mu_q) / sigma
    zz = (z * z).sum(-1)
    accepted = torch.log(u) < (xi * z).sum(-1) - 0.5 * zz          # z = 0: log-ratio 0, always accepted
    e = z / zz.sqrt().clamp_min(torch.finfo(z.dtype).tiny)[..., None]
    y = mu_p + sigma * (xi - 2 * (xi * e).sum(-1, keepdim=True) * e)
    return torch.where(accepted[..., None], x, y), accepted


def rejection_residual(p_mean: Tensor, p_log_var: Tensor, q_mean: Tensor, q_log_var: Tensor, pending: Tensor,
                       fallback: Tensor, generator: torch.Generator, max_tries: int,
                       log_factor: Tensor | float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
    """Acceptance-rejection for the residual norm((p - q/K)+) of Gaussians p = N(p_mean, diag exp(p_log_var)),
    q likewise, K = exp(log_factor) (1 for speculative sampling's residual): propose y ~ p, keep it with
    probability (1 - q(y) / (K p(y)))+ (valid with M = 1 since (p - q/K)+ <= p); about 1/TV tries at K = 1.

    Means and log-vars [..., D], pending BoolTensor [...] (where a residual is needed), fallback [..., D] (what a
    position whose `max_tries` proposals were all refused emits; never left as zeros), log_factor broadcastable to
    [...]. Only pending positions draw; tries per round double up to 1024 (one host sync per round).
    Returns (y [..., D] = fallback where not pending, tries LongTensor [...], exhausted BoolTensor [...])."""
    if max_tries < 1:
        raise ValueError(f"max_tries must be >= 1, got {max_tries}")
    shape, D = pending.shape, p_mean.shape[-1]
    flat = lambda t: torch.broadcast_to(t, (*shape, D)).reshape(-1, D)
    pm, pl, qm, ql = flat(p_mean), flat(p_log_var), flat(q_mean), flat(q_log_var)
    lk = torch.broadcast_to(torch.as_tensor(log_factor, dtype=pm.dtype, device=pm.device), shape).reshape(-1)
    out = flat(fallback).clone()
    tries = torch.zeros(out.shape[0], dtype=torch.long, device=out.device)
    todo = pending.reshape(-1).nonzero()[:, 0]
    drawn, chunk = 0, 16
    while todo.numel() and drawn < max_tries:
        c = min(chunk, max_tries - drawn)
        m, lv = pm[todo, None], pl[todo, None]
        y = m + torch.exp(0.5 * lv) * torch.randn(todo.numel(), c, D, generator=generator, device=pm.device,
                                                   dtype=pm.dtype)
        log_ratio = gaussian_log_density(y, qm[todo, None], ql[todo, None]) - gaussian_log_density(y, m, lv) \
            - lk[todo, None]
        keep_prob = (-torch.expm1(log_ratio.clamp_max(0.0)))               # (1 - q/(K p))+
        keep = torch.rand(todo.numel(), c, generator=generator, device=pm.device, dtype=pm.dtype) < keep_prob
        hit, first = keep.any(-1), keep.int().argmax(-1)
        out[todo[hit]] = y[hit, first[hit]]
        tries[todo] += torch.where(hit, first + 1, torch.full_like(first, c))
        todo, drawn, chunk = todo[~hit], drawn + c, min(2 * chunk, 1024)
    exhausted = torch.zeros_like(tries, dtype=torch.bool)
    exhausted[todo] = True
    return out.reshape(*shape, D), tries.reshape(shape), exhausted.reshape(shape)


def at_steps(x: Tensor, idx: Tensor) -> Tensor:
    """x [B, n, m, *rest], idx LongTensor [B, n, j] -> x[b, i, idx[b, i, :]] as [B, n, j, *rest]."""
    rest = x.shape[3:]
    x = torch.broadcast_to(x, (*idx.shape[:2], *x.shape[2:]))
    return x.gather(2, idx.reshape(*idx.shape, *([1] * len(rest))).expand(*idx.shape, *rest))


def roll_transitions(transition: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]], x: Tensor, steps: Tensor,
                     noises: Tensor, temperature: float = 1.0) -> tuple[Tensor, Tensor, Tensor]:
    """A proposer's w transitions from the exact states x [n, D] at chain indices steps LongTensor [n, w], with the
    shared noises [n, w, D]: x_{i+1} = mean + temperature * exp(logvar / 2) * noise, where transition(x [n, D],
    step LongTensor [n]) -> (mean, logvar) [n, D] is the proposer's head (one call per transition).
    -> (states [n, w+1, D] (states[:, 0] = x), means [n, w, D], logvars [n, w, D])."""
    states, means, logvars = [x], [], []
    for i in range(steps.shape[1]):
        mean, logvar = transition(states[-1], steps[:, i])
        means.append(mean)
        logvars.append(logvar)
        states.append(mean + torch.exp(0.5 * logvar) * noises[:, i] * temperature)
    return torch.stack(states, 1), torch.stack(means, 1), torch.stack(logvars, 1)


def rollout(mean_fn: MeanFn, x0: Tensor, steps: Tensor, noises: Tensor, log_vars: Tensor,
            noiseless_last: bool = False) -> GaussianChain:
    """Run a head's ancestral chain from x0 [B, n, D] over the chain indices steps LongTensor [B, n, m]:
    x_{i+1} = mean_fn(x_i, steps[..., i]) + exp(log_vars[..., i, :] / 2) * noises[..., i, :], the last one without
    noise when noiseless_last. noises [B, n, m, D], log_vars broadcastable to it. One head call per transition."""
    states, means = [x0], []
    for i in range(steps.shape[-1]):
        mu = mean_fn(states[-1], steps[..., i])
        if mu.shape != x0.shape:
            raise ValueError(f"a head returned means of shape {tuple(mu.shape)} for states {tuple(x0.shape)}; the "
                             f"drafter's and the target's tokens must have the same dims")
        means.append(mu)
        last = noiseless_last and i == steps.shape[-1] - 1
        std = torch.exp(0.5 * torch.broadcast_to(log_vars, noises.shape)[:, :, i])
        states.append(mu if last else mu + std * noises[:, :, i])
    return GaussianChain(torch.stack(states, 2), torch.stack(means, 2), log_vars, noises)


# --- a chain with a known token law ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class LinearGaussianChain:
    """mu_j(x) = a[j] * x + b[j] (per dim), transition log-variances log_vars [S, D]; x_0 ~ N(0, I), the last
    transition noiseless. The token is Gaussian with the mean and variance `law` computes: a test bed whose answer
    is known. a, b, log_vars: [S, D]."""

    a: Tensor
    b: Tensor
    log_vars: Tensor

    def __post_init__(self):
        if not (self.a.shape == self.b.shape == self.log_vars.shape) or self.a.dim() != 2:
            raise ValueError(f"a, b, log_vars must all be [S, D], got {tuple(self.a.shape)}, {tuple(self.b.shape)}, "
                             f"{tuple(self.log_vars.shape)}")

    def mean(self, x: Tensor, step: Tensor) -> Tensor:
        """The head: x [..., D], step LongTensor [...] -> a[step] * x + b[step]."""
        return self.a[step] * x + self.b[step]

    def law(self) -> tuple[Tensor, Tensor]:
        """(mean [D], variance [D]) of the token."""
        m, v = torch.zeros_like(self.a[0]), torch.ones_like(self.a[0])
        for j in range(self.a.shape[0]):
            m, v = self.a[j] * m + self.b[j], self.a[j] ** 2 * v
            if j < self.a.shape[0] - 1:
                v = v + torch.exp(self.log_vars[j])
        return m, v

    def sample(self, x_T: Tensor, noises: Tensor) -> Tensor:
        """Plain ancestral sampling: x_T [B, n, D], noises [B, n, S, D] -> tokens [B, n, D]."""
        S = self.a.shape[0]
        steps = torch.arange(S, device=x_T.device).expand(*x_T.shape[:2], S)
        return rollout(self.mean, x_T, steps, noises, self.log_vars, noiseless_last=True).end


# --- two-sample distance --------------------------------------------------------------------------------------------
def energy_test(x: Tensor, y: Tensor, generator: torch.Generator, directions: int = 64,
                permutations: int = 200) -> tuple[float, Tensor]:
    """Two-sample energy distance E = 2 E|X-Y| - E|X-X'| - E|Y-Y'| (V-statistic) of x [N, D], y [M, D], and its
    label-permutation null [permutations].

    In 1-D, E = 2 * integral (F_x - F_y)^2 exactly (sorted pooled sample). For D > 1 the statistic is averaged
    over `directions` random unit projections and scaled by c_D = sqrt(pi) Gamma((D+1)/2) / Gamma(D/2), since
    E_theta |<theta, v>| = |v| / c_D: an unbiased estimate of the D-dim statistic. The null relabels the pooled
    sample with the same projections (the sort is reused), so a threshold is a quantile of it."""
    z = torch.cat([x, y]).double()
    D = z.shape[1]
    if D == 1:
        theta, scale = torch.ones(1, 1, dtype=z.dtype), 1.0
    else:
        theta = torch.randn(directions, D, generator=generator, dtype=z.dtype)
        theta = theta / theta.norm(dim=1, keepdim=True)
        scale = math.exp(0.5 * math.log(math.pi) + math.lgamma((D + 1) / 2) - math.lgamma(D / 2))
    vals, order = (theta.to(z.device) @ z.T).sort(-1)                        # [P, N + M]
    gaps = vals.diff(dim=-1)
    # F_x - F_y after each sorted point is a cumulative sum of +1/N (an x) and -1/M (a y): one cumsum per labelling
    steps = torch.cat([torch.full((len(x),), 1 / len(x)), torch.full((len(y),), -1 / len(y))]).to(z)

    def stat(w: Tensor) -> float:
        diff = w[order].cumsum(-1)[:, :-1]
        return float(2 * scale * (diff * diff * gaps).sum(-1).mean())

    null = [stat(steps[torch.randperm(len(steps), generator=generator).to(z.device)])
            for _ in range(permutations)]
    return stat(steps), torch.tensor(null)
