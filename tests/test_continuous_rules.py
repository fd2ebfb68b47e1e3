"""Continuous-token rules on Gaussian chains whose token law is known (linear-Gaussian heads mu_j(x) = a_j x + b_j).

The exact rule (verifiers.gaussian_chain, arXiv 2501.05370) must emit tokens with the target chain's law; CSpD
(verifiers.cspd, arXiv 2411.11925) is measured, not asserted close. Statistical thresholds, all at fixed seeds:
  * energy distance (two-sample, V-statistic; sliced over 32 random directions in 16-d): the observed value must not
    exceed the 99th percentile of its null from 100 label permutations of the pooled sample (1 % false alarm);
  * Kolmogorov-Smirnov per dimension (scipy.stats.ks_2samp; for the exact rule also one-sample against the known
    Gaussian law): every p-value >= 0.01 / D (Bonferroni, family 1 %);
  * reflection acceptance vs 2 Phi(-|z|/2): within 4 binomial standard errors (two-sided false alarm 6e-5).
Samples: 20,000 tokens per law. The same thresholds must reject the drafter's own law (the tests can fail).
"""
from __future__ import annotations

import math

import pytest
import torch
from scipy.stats import ks_2samp, kstest, norm

from specdec.continuous import (GaussianChain, LinearGaussianChain, energy_test, reflect_coupling,
                                rejection_residual, rollout)
from specdec.protocols import ContinuousRule
from verifiers.cspd import CSpDRule
from verifiers.gaussian_chain import GaussianChainRule, run_chain

S, K, B, N = 8, 3, 4, 5000                # 8 transitions (7 noisy + the noiseless last), 3 drafted per round
PERMUTATIONS, DIRECTIONS = 100, 32


def schedule(D: int) -> torch.Tensor:
    """The schedule's log sigma_t^2 [S, D]: sigma from 0.55 down to 0.05 (the last one is CSpD's token density)."""
    return torch.log((0.05 + 0.5 * torch.linspace(1, 0, S)[:, None]) ** 2).expand(S, D).clone()


def heads(D: int, seed: int = 0) -> tuple[LinearGaussianChain, LinearGaussianChain]:
    """(target, drafter): the drafter's slopes 5 % steeper and offsets 0.1 higher."""
    g = torch.Generator().manual_seed(seed)
    a, b = 0.9 + 0.05 * torch.randn(S, D, generator=g), 0.1 * torch.randn(S, D, generator=g)
    return LinearGaussianChain(a, b, schedule(D)), LinearGaussianChain(1.05 * a, b + 0.1, schedule(D))


def draws(D: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Generator]:
    """x_T [B, N, D], shared noises [B, N, S, D], uniforms [B, N, S], and a generator for residual proposals."""
    g = torch.Generator().manual_seed(seed)
    x_T, noises = torch.randn(B, N, D, generator=g), torch.randn(B, N, S, D, generator=g)
    return x_T, noises, torch.rand(B, N, S, generator=g).clamp(1e-7, 1 - 1e-7), g


@pytest.fixture(scope="module", params=[1, 16], ids=["1d", "16d"])
def setup(request):
    """Per dim: the heads, and 20k direct ancestral target samples (independent noises)."""
    D = request.param
    target, drafter = heads(D)
    x_T, noises, _, _ = draws(D, seed=100)
    return D, target, drafter, target.sample(x_T, noises).reshape(-1, D)


def distance(x: torch.Tensor, y: torch.Tensor, seed: int = 7) -> tuple[float, float, float]:
    """(energy distance, its null's 99th percentile, min over dims of the KS p-value)."""
    stat, null = energy_test(x, y, torch.Generator().manual_seed(seed), DIRECTIONS, PERMUTATIONS)
    ks = min(ks_2samp(x[:, d].numpy(), y[:, d].numpy()).pvalue for d in range(x.shape[1]))
    return stat, float(null.quantile(0.99)), ks


def same_law(x: torch.Tensor, y: torch.Tensor) -> bool:
    stat, threshold, ks = distance(x, y)
    return stat <= threshold and ks >= 0.01 / x.shape[1]


def ks_to_law(x: torch.Tensor, chain: LinearGaussianChain) -> float:
    """Min over dims of the one-sample KS p-value of x [N, D] against the chain's known Gaussian token law."""
    mean, var = chain.law()
    white = ((x.double() - mean.double()) / var.double().sqrt()).numpy()
    return min(kstest(white[:, d], "norm").pvalue for d in range(x.shape[1]))


# --- the exact rule ---------------------------------------------------------------------------------------------
def test_exact_rule_emits_the_target_law(setup):
    D, target, drafter, reference = setup
    x_T, noises, u, g = draws(D, seed=1)
    run = run_chain(drafter.mean, target.mean, x_T, noises, u, target.log_vars, target.log_vars, K, g)
    tokens = run.token.reshape(-1, D)
    assert same_law(tokens, reference), distance(tokens, reference)
    assert ks_to_law(tokens, target) >= 0.01 / D
    assert (run.first_rejected < S).float().mean() > 0.3          # reflections happened, often
    assert int(run.fallbacks.sum()) == 0                           # shared covariance: no loop
    assert run.target_calls.float().mean() < S - 1                 # and it saved target calls
    drafted_law = drafter.sample(x_T, noises).reshape(-1, D)       # power: the drafter's own law is rejected
    assert not same_law(drafted_law, reference) and ks_to_law(drafted_law, target) < 0.01 / D


def test_rejection_loop_keeps_the_rule_exact_when_variances_differ(setup):
    D, target, drafter, reference = setup
    x_T, noises, u, g = draws(D, seed=2)
    run = run_chain(drafter.mean, target.mean, x_T, noises, u, target.log_vars + 0.3, target.log_vars, K, g)
    tokens = run.token.reshape(-1, D)
    assert same_law(tokens, reference), distance(tokens, reference)
    assert ks_to_law(tokens, target) >= 0.01 / D
    assert (run.first_rejected < S).any() and int(run.fallbacks.sum()) == 0


def test_drafter_equal_to_target_reproduces_the_target_chain_bit_for_bit():
    target, _ = heads(16)
    x_T, noises, u, g = draws(16, seed=3)
    run = run_chain(target.mean, target.mean, x_T, noises, u, target.log_vars, target.log_vars, K, g)
    assert torch.equal(run.token, target.sample(x_T, noises))
    assert bool((run.first_rejected == S).all()) and torch.equal(run.accepted, run.drafted)
    assert bool((run.target_calls == math.ceil(S / (K + 1))).all())  # k+1 transitions per call, the last one too


def test_verdict_reports_the_first_rejected_transition():
    target, drafter = heads(4)
    x_T, noises, u, g = draws(4, seed=4)
    steps = torch.arange(K).expand(B, N, K)
    d = rollout(drafter.mean, x_T, steps, noises[:, :, :K], target.log_vars[:K])
    t = GaussianChain(d.states, target.mean(d.states[:, :, :K], steps), target.log_vars[:K], d.noises)
    v = GaussianChainRule().verify(d, t, u[:, :, :K], g)
    _, ok = reflect_coupling(d.states[:, :, 1:], d.means, t.means, torch.exp(0.5 * t.log_vars), u[:, :, :K])
    expected = torch.where(ok.all(-1), K, (~ok).int().argmax(-1))
    assert torch.equal(v.first_rejected, expected) and 0 < v.accepted.float().mean() < 1
    kept = v.accepted[..., None]                                    # all accepted: the last drafted state
    assert torch.equal(torch.where(kept, v.state, 0), torch.where(kept, d.end, 0))


@pytest.mark.parametrize("D", [1, 16])
@pytest.mark.parametrize("znorm", [0.0, 0.5, 1.5, 3.0])
def test_reflection_acceptance_is_two_phi_and_its_output_is_p(D, znorm):
    g = torch.Generator().manual_seed(5)
    n = 20_000
    sigma = 0.5 + torch.rand(D, generator=g)                       # a shared diagonal covariance
    direction = torch.randn(D, generator=g)
    mu_q = torch.randn(D, generator=g)
    mu_p = mu_q + sigma * znorm * direction / direction.norm()       # whitened distance |z| = znorm
    x = mu_q + sigma * torch.randn(n, D, generator=g)
    y, ok = reflect_coupling(x, mu_q, mu_p, sigma, torch.rand(n, generator=g).clamp(1e-7, 1 - 1e-7))
    p_accept = 2 * norm.cdf(-znorm / 2)
    assert abs(ok.double().mean().item() - p_accept) <= 4 * math.sqrt(p_accept * (1 - p_accept) / n) + 1e-12
    assert torch.equal(y[ok], x[ok])
    white = ((y - mu_p) / sigma).double()                          # y ~ N(mu_p, sigma^2): white ~ N(0, I)
    assert min(ks_2samp(white[:, d].numpy(), torch.randn(n, generator=g).double().numpy()).pvalue
               for d in range(D)) >= 0.01 / D


# --- CSpD -------------------------------------------------------------------------------------------------------
def whole_chains(target, drafter, D, seed):
    x_T, noises, u, g = draws(D, seed)
    steps = torch.arange(S).expand(B, N, S)
    full = lambda h: rollout(h.mean, x_T, steps, noises, h.log_vars, noiseless_last=True)
    return full(drafter), full(target), u, g


def test_cspd_distance_is_measured_and_the_relaxed_test_accepts_more(setup, capsys):
    D, target, drafter, reference = setup
    draft, tgt, u, g = whole_chains(target, drafter, D, seed=6)
    acceptance = {}
    for T in (1.0, 42.0):
        rule = CSpDRule(inner_temperature=T)
        v = rule.verify(draft, tgt, u, g)
        stat, threshold, ks = distance(v.state.reshape(-1, D), reference)
        assert math.isfinite(stat) and bool(torch.isfinite(v.state).all())
        acceptance[T] = v.accepted.float().mean().item()
        with capsys.disabled():
            print(f"\n{rule.label} D={D}: acceptance {acceptance[T]:.3f}, energy distance {stat:.2e} "
                  f"(null q99 {threshold:.2e}), min KS p {ks:.1e}, fallbacks {int(v.fallbacks.sum())}")
    assert acceptance[42.0] > acceptance[1.0]


def test_cspd_trajectory_factor_options():
    target, drafter = heads(4)
    wide = LinearGaussianChain(drafter.a, drafter.b, drafter.log_vars + 0.2)   # sigma_q > sigma_p
    draft, tgt, _, _ = whole_chains(target, wide, 4, seed=8)
    log_k = {f: CSpDRule(trajectory_factor=f).log_trajectory_factor(draft, tgt) for f in ("gaussian", "released",
                                                                                           "none")}
    assert torch.allclose(log_k["gaussian"], torch.full_like(log_k["gaussian"], 0.1 * (S - 1) * 4))
    assert torch.equal(log_k["released"], -log_k["gaussian"]) and not log_k["none"].any()
    assert CSpDRule(42.0, trajectory_factor="released").label == "cspd-relaxed(T=42)[K=released]"


def test_residuals_never_emit_zero_vectors_and_count_exhausted_loops():
    target, drafter = heads(16)
    near = LinearGaussianChain(target.a, target.b + 0.002, target.log_vars)  # small residual mass: loops exhaust
    draft, tgt, u, g = whole_chains(target, near, 16, seed=9)
    v = CSpDRule(max_tries=1).verify(draft, tgt, u, g)
    fell = v.fallbacks.bool()
    assert fell.any() and torch.equal(v.state[fell], tgt.end[fell])  # the fallback is the target's own token
    assert bool((v.state.abs().sum(-1) > 0).all()) and bool(((v.residual_tries > 0) == ~v.accepted.bool()).all())
    x_T, noises, u, g = draws(16, seed=10)
    run = run_chain(drafter.mean, target.mean, x_T, noises, u, target.log_vars + 0.3, target.log_vars, K, g,
                    rule=GaussianChainRule(max_tries=1))
    assert int(run.fallbacks.sum()) > 0 and bool((run.token.abs().sum(-1) > 0).all())


def test_rejection_residual_samples_the_normalised_positive_part():
    """1-D: p = N(0, 1), q = N(1, 1): (p - q)+ lives on x < 1/2 with known mass; its samples' CDF there."""
    g = torch.Generator().manual_seed(11)
    n = 20_000
    zero, one = torch.zeros(n, 1), torch.ones(n, 1)
    pending = torch.ones(n, dtype=torch.bool)
    y, tries, exhausted = rejection_residual(zero, zero, one, zero, pending, one * 99, g, max_tries=10_000)
    assert not exhausted.any() and bool((y < 0.5).all())
    tv = norm.cdf(0.5) - norm.cdf(-0.5)                              # mass of (p - q)+
    t = -0.5                                                         # P(Y <= t) = (Phi(t) - Phi(t - 1)) / tv
    expected = (norm.cdf(t) - norm.cdf(t - 1)) / tv
    assert abs((y <= t).double().mean().item() - expected) <= 4 * math.sqrt(expected * (1 - expected) / n)
    assert abs(tries.double().mean().item() - 1 / tv) < 0.1 / tv    # geometric with success probability tv


def test_energy_test_matches_the_pairwise_statistic():
    g = torch.Generator().manual_seed(12)
    for D, tol in ((1, 1e-6), (8, 0.05)):         # 1-D: exact; 8-d: 1000 directions
        x, y = torch.randn(800, D, generator=g).double(), 1.2 * torch.randn(800, D, generator=g).double()
        exact = float(2 * torch.cdist(x, y).mean() - torch.cdist(x, x).mean() - torch.cdist(y, y).mean())
        stat, null = energy_test(x, y, g, directions=1000, permutations=20)
        assert abs(stat - exact) <= tol * exact and null.shape == (20,) and float(null.max()) < stat


# --- protocol and bad input ---------------------------------------------------------------------------------------
def test_rules_follow_the_continuous_protocol():
    assert isinstance(GaussianChainRule(), ContinuousRule) and isinstance(CSpDRule(), ContinuousRule)
    assert GaussianChainRule.lossless and not CSpDRule.lossless
    assert GaussianChainRule.target_at_draft_states and not CSpDRule.target_at_draft_states
    assert not CSpDRule().relaxed and CSpDRule(42.0).relaxed and CSpDRule().label == "cspd"


@pytest.mark.parametrize("kwargs, match", [
    ({"inner_temperature": 0.0}, "inner_temperature"), ({"inner_temperature": -1.0}, "inner_temperature"),
    ({"inner_temperature": float("nan")}, "inner_temperature"), ({"prefill_ratio": 1.0}, "prefill_ratio"),
    ({"prefill_ratio": -0.1}, "prefill_ratio"), ({"gamma": 0}, "gamma"), ({"max_tries": 0}, "max_tries"),
    ({"trajectory_factor": "inverse"}, "trajectory_factor")])
def test_cspd_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CSpDRule(**kwargs)


def test_bad_input_errors():
    target, drafter = heads(4)
    small, _ = heads(2)
    draft, tgt, u, g = whole_chains(target, drafter, 4, seed=13)
    other, _, _, _ = whole_chains(small, small, 2, seed=13)
    for rule in (CSpDRule(), GaussianChainRule()):
        with pytest.raises(ValueError, match="token dims differ"):
            rule.verify(other, tgt, u, g)
        nan_means = tgt.means.clone()
        nan_means[0, 0, 0, 0] = float("nan")
        with pytest.raises(ValueError, match="non-finite"):
            rule.verify(draft, GaussianChain(tgt.states, nan_means, tgt.log_vars, tgt.noises), u, g)
        with pytest.raises(ValueError, match="one uniform per transition"):
            rule.verify(draft, tgt, u[:, :, :2], g)
    x_T, noises, u, g = draws(4, seed=14)
    args = (x_T, noises, u, target.log_vars, target.log_vars)
    with pytest.raises(ValueError, match="gamma"):
        run_chain(drafter.mean, target.mean, *args, 0, g)
    with pytest.raises(ValueError, match="dims must match|same dims"):
        run_chain(lambda x, t: x[..., :2], target.mean, *args, K, g)
    with pytest.raises(ValueError, match="non-finite"):
        run_chain(drafter.mean, lambda x, t: target.mean(x, t) * float("nan"), *args, K, g)
    with pytest.raises(ValueError, match="does not broadcast"):
        run_chain(drafter.mean, target.mean, x_T, noises, u, target.log_vars[:3], target.log_vars, K, g)
    with pytest.raises(ValueError, match="max_tries"):
        GaussianChainRule(max_tries=0)
