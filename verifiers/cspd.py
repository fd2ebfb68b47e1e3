"""Continuous speculative decoding (CSpD) for continuous-token AR generators. LOSSY (approximate), no bound.

Wang et al., "Continuous Speculative Decoding for Autoregressive Image Generation", arXiv 2411.11925;
released code MarkXCloud/CSpD (spec_decode/spec_decode_runner.py).

Notation: p = target head, q = draft head; B batch, n token positions, S transitions of a head's chain, D token dim.
A small MAR drafts gamma AR steps; both heads run their whole chains from the SAME x_T and per-step noises
("trajectory alignment", both `GaussianChain`s carry them); each drafted token is then tested independently (no
prefix truncation: masked AR's gamma steps share one context) against the density of the heads' LAST denoising
step, N(mu_0, s_0^2) with s_0 = tau exp(logvar_0 / 2) (the chains' last log-variances, sampling temperature in):

    x = mu_q,0 (the draft token: the last step is noiseless)
    log r = log N(x; mu_p,0, (T s_p,0)^2) - log N(x; mu_q,0, (T s_q,0)^2) + log K,    accept iff U < r
    rejected: y ~ norm((p_0 - q_0/K)+) by acceptance-rejection with the target's last-step Gaussian p_0 as the
              proposal (M = 1), y kept with probability (1 - q_0(y) / (K p_0(y)))+, untempered densities, at most
              `max_tries` proposals; an exhausted loop falls back to the target's own token (its chain's end),
              counted in `fallbacks` (the released code leaves a zero vector there).

T = `inner_temperature`: 1 is the paper's min(1, p/q) test; the released code hard-wires T = 42, a far looser test
(labelled relaxed here; the residual stays untempered, as released, so it is not the residual of the test
performed). K = the trajectory factor over the earlier transitions t > 0 and every dim:
  "gaussian" (default): prod sigma_q,t / sigma_p,t, the normaliser ratio of the two heads' Gaussian trajectory
              densities (each evaluated on its own trajectory, whose noises are shared), the same orientation as
              the last-step term;
  "released": prod sigma_p,t / sigma_q,t, the released code's factor, which looks inverted against a Gaussian
              normaliser (kept behind this explicit option to reproduce it);
  "none":     K = 1, the last-step density ratio alone.

What it guarantees: nothing exact. x = mu_q,0 is a deterministic function of x_1, so N(mu_q,0, s_q,0^2) is only a
proxy for the draft token's law, and so is the residual's p_0 for the target's: `lossless = False`, no bound;
measure the emitted law's distance to the target's (energy distance, per-dim KS). `prefill_ratio` (the first
ratio * K_steps MAR steps are target-only, default 0.15) and `gamma` (draft steps per verification) are carried
and validated here; a schedule applies them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from specdec.continuous import ChainVerdict, GaussianChain, check_pair, gaussian_log_density, rejection_residual
from specdec.protocols import ContinuousRule

TRAJECTORY_FACTORS = ("gaussian", "released", "none")
RELEASED_INNER_TEMPERATURE = 42.0      # MarkXCloud/CSpD's SpecDecodeRunner default


@dataclass(frozen=True)
class CSpDRule(ContinuousRule):
    """inner_temperature: T of the test (1 = the paper's rule; 42 = the released code, relaxed);
    prefill_ratio in [0, 1): fraction of MAR steps decoded by the target alone (schedule); gamma >= 1: draft steps
    per verification (schedule); max_tries: residual proposals before the fallback; trajectory_factor: one of
    TRAJECTORY_FACTORS; check_finite: refuse NaN / inf head outputs (one host sync per call)."""

    inner_temperature: float = 1.0
    prefill_ratio: float = 0.15
    gamma: int = 8
    max_tries: int = 100
    trajectory_factor: str = "gaussian"
    check_finite: bool = True

    lossless = False
    name = "cspd"
    target_at_draft_states = False

    def __post_init__(self):
        T = self.inner_temperature
        if isinstance(T, bool) or not isinstance(T, (int, float)) or not math.isfinite(T) or T <= 0:
            raise ValueError(f"inner_temperature must be a finite number > 0 (1 = the paper's rule, "
                             f"{RELEASED_INNER_TEMPERATURE:g} = the released code's relaxed test), got {T!r}")
        p = self.prefill_ratio
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p < 1:
            raise ValueError(f"prefill_ratio must be in [0, 1) (the fraction of steps the target decodes alone; "
                             f"the paper uses 0.15), got {p!r}")
        for field, value in (("gamma", self.gamma), ("max_tries", self.max_tries)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{field} must be an integer >= 1, got {value!r}")
        if self.trajectory_factor not in TRAJECTORY_FACTORS:
            raise ValueError(f"trajectory_factor must be one of {TRAJECTORY_FACTORS}, got {self.trajectory_factor!r}")

    @property
    def relaxed(self) -> bool:
        """True when the test is tempered (T != 1): not the paper's rule."""
        return self.inner_temperature != 1

    @property
    def label(self) -> str:
        """For reports: "cspd", or "cspd-relaxed(T=42)" and the trajectory factor when it is not the default."""
        base = f"cspd-relaxed(T={self.inner_temperature:g})" if self.relaxed else "cspd"
        return base if self.trajectory_factor == "gaussian" else f"{base}[K={self.trajectory_factor}]"

    def log_trajectory_factor(self, draft: GaussianChain, target: GaussianChain) -> Tensor:
        """log K [B, n] from the transitions before the last (sum over t > 0 and dims of log sigma)."""
        half_diff = 0.5 * (draft.log_vars[:, :, :-1] - target.log_vars[:, :, :-1]).sum((-1, -2))
        if self.trajectory_factor == "gaussian":
            return half_diff                                        # log prod sigma_q / sigma_p
        if self.trajectory_factor == "released":
            return -half_diff
        return torch.zeros_like(half_diff)

    def verify(self, draft: GaussianChain, target: GaussianChain, u: Tensor,
               generator: torch.Generator) -> ChainVerdict:
        """draft, target: each head's own whole chain [B, n, S, D] from the same x_T and noises (the token is the
        chain's end); u [B, n, S] (the test reads u[..., S-1]) -> ChainVerdict (state: the emitted tokens [B, n, D],
        first_rejected: 0 = the draft token was replaced, 1 = kept; window 1)."""
        check_pair(draft, target, u, self.check_finite)
        x = draft.end
        mq, mp = draft.means[:, :, -1], target.means[:, :, -1]
        lq, lp = draft.log_vars[:, :, -1], target.log_vars[:, :, -1]
        log_t2 = 2 * math.log(self.inner_temperature)
        log_k = self.log_trajectory_factor(draft, target)
        log_r = gaussian_log_density(x, mp, lp + log_t2) - gaussian_log_density(x, mq, lq + log_t2) + log_k
        accepted = torch.log(u[:, :, -1]) < log_r
        y, tries, exhausted = rejection_residual(mp, lp, mq, lq, ~accepted, target.end, generator, self.max_tries,
                                                 log_factor=log_k)
        token = torch.where(accepted[..., None], x, y)
        return ChainVerdict(token, accepted.long(), 1, exhausted.long(), tries)
