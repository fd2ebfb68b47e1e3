"""Sequence-level exactness: compare `generate`'s output law with the target's own joint distribution.

For a tiny vocabulary V and short length T the joint law of plain AR sampling is enumerable: V**T sequences, each
with probability prod_t p(x_t | x_<t), p after `specdec.sampling` (CFG, temperature, top-k/p). A lossless
drafter+rule pair must reproduce it; a chi-square goodness-of-fit test and the total variation distance say whether
the samples agree within sampling noise.
"""
from __future__ import annotations

from dataclasses import dataclass
from itertools import product

import numpy as np
import torch
from torch import Tensor

from specdec.sampling import Sampling, to_probs


@torch.no_grad()
def exact_joint(target, cond_row, sampling: Sampling, num_tokens: int) -> Tensor:
    """The joint law [V**T] of plain AR sampling for one condition (cond_row: the condition of one image, e.g.
    a 0-d class id). Sequence index = base-V number with token 0 most significant."""
    V, T = target.vocab_size, num_tokens
    seqs = torch.tensor(list(product(range(V), repeat=T)), dtype=torch.long)          # [V**T, T]
    n = seqs.shape[0]
    cond = torch.as_tensor(cond_row)[None].expand(n, *torch.as_tensor(cond_row).shape).contiguous()
    state, first = target.start(cond, sampling, T + 2)
    mask = target.token_mask
    p0 = to_probs(first.cond[:, -1], None if first.uncond is None else first.uncond[:, -1], sampling, mask)
    log_joint = p0.gather(1, seqs[:, :1]).log()[:, 0]
    if T > 1:
        logits = target.forward(state, seqs[:, :-1])
        p = to_probs(logits.cond, logits.uncond, sampling, mask)                        # [n, T-1, V]
        log_joint = log_joint + p.gather(2, seqs[:, 1:, None])[..., 0].log().sum(1)
    return log_joint.double().exp()


def sequence_index(tokens: Tensor, vocab_size: int) -> Tensor:
    """tokens [N, T] -> LongTensor [N] base-V index, matching `exact_joint`."""
    weights = vocab_size ** torch.arange(tokens.shape[1] - 1, -1, -1, dtype=torch.long)
    return (tokens.cpu().long() * weights).sum(1)


@dataclass(frozen=True)
class FitReport:
    chi2: float
    dof: int
    p_value: float
    tvd: float
    tvd_noise: float      # expected TVD of an exact sampler with the same sample size (Monte Carlo noise level)
    n: int

    def __str__(self):
        return (f"chi2={self.chi2:.1f} dof={self.dof} p={self.p_value:.4f} TVD={self.tvd:.4f} "
                f"(noise ~{self.tvd_noise:.4f}, n={self.n})")


def goodness_of_fit(indices: Tensor, probs: Tensor, seed: int = 0, min_expected: float = 5.0) -> FitReport:
    """Chi-square test of sampled sequence indices [N] against the exact law probs [M]; cells with expected count
    below min_expected are pooled into one."""
    from scipy.stats import chisquare

    probs = probs.double().numpy()
    probs = probs / probs.sum()
    n = int(indices.numel())
    counts = np.bincount(indices.numpy(), minlength=probs.size).astype(float)
    expected = probs * n
    big = expected >= min_expected
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    chi2, p_value = chisquare(obs, exp)
    tvd = 0.5 * np.abs(counts / n - probs).sum()
    rng = np.random.default_rng(seed)
    noise = np.mean([0.5 * np.abs(rng.multinomial(n, probs) / n - probs).sum() for _ in range(20)])
    return FitReport(float(chi2), int(obs.size - 1), float(p_value), float(tvd), float(noise), n)
