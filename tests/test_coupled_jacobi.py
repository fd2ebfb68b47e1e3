"""Coupled Jacobi drafting (MC-SJD, arXiv 2510.24211) and the previous-frame init: exact with the exact rule
(sequence-level chi-square against an enumerable target, images and video grids), greedy output equal to greedy AR,
and the coupling keeps iterates that plain SJD re-draws."""
from __future__ import annotations

import pytest
import torch

import specdec
from drafters.jacobi import JacobiDrafter
from specdec import Sampling
from helpers import fit_of, tiny_gpt


@pytest.fixture(scope="module")
def image_target():
    """V = 5, T = 4 on a (2, 2) grid: 625 sequences, sharpened so the joint law is far from uniform."""
    return tiny_gpt(vocab=5, grid=(2, 2), dim=32, heads=2, classes=2, sharpen=15.0)


@pytest.fixture(scope="module")
def video_target():
    """The same size as a video: 2 frames of 1 x 2 tokens, raster over (frame, row, column)."""
    return tiny_gpt(vocab=5, grid=(2, 1, 2), dim=32, heads=2, classes=2, sharpen=15.0, seed=3)


@pytest.mark.parametrize("coupling", ["maximal", "gumbel"])
@pytest.mark.parametrize("init,init_q,window,video", [("random", "onehot", 3, False),
                                                      ("repeat_horizontal", "onehot", 4, False),
                                                      ("repeat_vertical", "onehot", 3, False),
                                                      ("random", "uniform", 3, False),
                                                      ("previous_frame", "onehot", 3, True)])
def test_coupled_jacobi_is_exact(image_target, video_target, coupling, init, init_q, window, video):
    """Chi-square p > 0.001 and TVD at the noise level of an exact sampler (20k sequences of 625 outcomes)."""
    target = video_target if video else image_target
    drafter = JacobiDrafter(window, init, init_q=init_q, coupling=coupling)
    fit, res = fit_of(target, drafter, Sampling())
    assert fit.p_value > 1e-3, str(fit)
    assert fit.tvd < 2 * fit.tvd_noise + 1e-3, str(fit)
    assert 0.05 < res.stats.acceptance_rate < 0.95, res.stats.acceptance_rate


def test_coupled_jacobi_is_exact_with_cfg_and_top_k(image_target):
    fit, res = fit_of(image_target, JacobiDrafter(3, "random", coupling="maximal"),
                      Sampling(cfg_scale=2.5, top_k=4))
    assert fit.p_value > 1e-3, str(fit)
    assert 0.05 < res.stats.acceptance_rate < 0.95


class _KeepAlways(JacobiDrafter):
    """Negative control: keeps the previous iterate whatever p_new says, yet reports q := p_new."""

    def _tail_draws(self, tail_p, src, pos, old_tokens, old_q, ids):
        new = super()._tail_draws(tail_p, src, pos, old_tokens, old_q, ids)
        old = old_tokens.gather(1, src.clamp_max(old_tokens.shape[1] - 1))
        return torch.where(src < old_tokens.shape[1], old, new)


@pytest.mark.parametrize("broken", [_KeepAlways])
def test_exactness_test_catches_broken_coupling(image_target, broken):
    """The chi-square test has power against a coupling that does not produce p_new."""
    fit, _ = fit_of(image_target, broken(4, "random", coupling="maximal"), Sampling(), n=5000)
    assert fit.p_value < 1e-6, str(fit)


@pytest.mark.parametrize("coupling", ["maximal", "gumbel"])
@pytest.mark.parametrize("init,grid", [("random", (4, 4)), ("previous_frame", (2, 2, 4))])
def test_greedy_coupled_jacobi_equals_greedy_ar(coupling, init, grid):
    target = tiny_gpt(vocab=64, grid=grid)
    cond = torch.arange(4) % 3
    for cfg in (1.0, 3.0):
        sampling = Sampling(temperature=0.0, cfg_scale=cfg)
        ar = specdec.generate(target, cond, sampling=sampling, seed=0).tokens
        spec = specdec.generate(target, cond, drafter=JacobiDrafter(6, init, coupling=coupling), sampling=sampling,
                                seed=0)
        assert torch.equal(ar, spec.tokens)


def test_maximal_coupling_keeps_more_iterates_than_sjd():
    """On a peaked target whose tail laws move little between passes, the coupled tail survives more often: fewer
    target forwards per image than uncoupled SJD (deterministic for the seed)."""
    target = tiny_gpt(vocab=64, grid=(6, 6), sharpen=4.0, seed=2)
    cond = torch.arange(8) % 3
    forwards = {}
    for coupling in ("none", "maximal", "gumbel"):
        res = specdec.generate(target, cond, drafter=JacobiDrafter(8, "random", coupling=coupling),
                               sampling=Sampling(), seed=0, decode=False)
        forwards[coupling] = res.stats.target_forwards
    assert forwards["maximal"] < forwards["none"], forwards
    assert forwards["gumbel"] < forwards["none"], forwards


def test_bad_coupling_is_named():
    with pytest.raises(ValueError, match="unknown Jacobi coupling 'gibbs'"):
        JacobiDrafter(4, coupling="gibbs")
