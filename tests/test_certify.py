"""specdec.certify: the implied distribution of a rule, and what it says about each rule.

Resolution: V = 8, 20000 samples per pair; the Monte Carlo noise (expected TVD of an exact sampler's histogram) is
~0.005-0.008 per pair, and a pair passes when its TVD <= 2.5 x its noise."""
from __future__ import annotations

import pytest
import torch

from specdec.certify import (acceptance_probability, certify, certify_on, default_geometry, implied_distribution,
                             noise_level, random_pairs, simulate, single_step_law, tvd)
from verifiers.bounded_lantern import BoundedLanternRule
from verifiers.exact import ExactRule
from verifiers.grouped import GroupedRule
from verifiers.lantern import LanternRule
from verifiers.typical import TypicalRule

N = 20000


def test_random_pairs_families():
    pairs = random_pairs(8, 5, seed=0)
    assert set(pairs) == {"flat", "peaked", "q_zeros", "flat_half_q", "one_hot", "q_equals_p"}
    for p, q in pairs.values():
        assert p.shape == q.shape == (5, 8)
        assert torch.allclose(p.sum(-1), torch.ones(5)) and torch.allclose(q.sum(-1), torch.ones(5))
        assert (p >= 0).all() and (q >= 0).all()
    p, q = pairs["q_zeros"]
    assert ((q == 0) & (p > 0)).any(-1).all()
    assert ((pairs["one_hot"][1] == 1).sum(-1) == 1).all()
    assert torch.equal(*pairs["q_equals_p"])
    assert pairs["peaked"][0].max(-1).values.mean() > pairs["flat"][0].max(-1).values.mean() + 0.2
    torch.testing.assert_close(random_pairs(8, 5, seed=0)["peaked"], pairs["peaked"])       # reproducible


def test_noise_level_matches_the_normal_approximation():
    p = torch.full((8,), 1 / 8)
    approx = 0.5 * 8 * (2 * (1 / 8) * (7 / 8) / (torch.pi * N)) ** 0.5
    assert abs(noise_level(p, N, repeats=50) - approx) < 0.3 * approx


def test_exact_rule_certifies_lossless():
    report = certify(ExactRule(), V=8, n_pairs=4, n_samples=N, seed=0)
    assert report.lossless, str(report)
    assert report.verdict == "lossless (within noise)"
    assert report.max_tvd < 0.02                                           # stated noise threshold at this n
    assert report.families["q_equals_p"].mean_acceptance == 1.0
    d = report.as_dict()
    assert d["verdict"] == report.verdict and set(d["families"]) == set(random_pairs(8, 1))


def test_exact_rule_on_one_hot_q_and_exact_acceptance():
    p = torch.tensor([0.5, 0.2, 0.1, 0.1, 0.05, 0.05, 0.0, 0.0])
    q = torch.zeros(8)
    q[0] = 1
    hist = implied_distribution(ExactRule(), p, q, n_samples=N, seed=2)
    assert 0.5 * (hist - p.double()).abs().sum() < 2.5 * noise_level(p, N)
    assert abs(float(acceptance_probability(ExactRule(), p, q, grid=1000)) - 0.5) < 1e-3


def test_bounded_lantern_stays_within_delta_for_every_q_family():
    delta = 0.2
    report = certify(BoundedLanternRule(default_geometry(8), k=3, delta=delta), V=8, n_pairs=4, n_samples=N)
    for name, fam in report.families.items():
        assert fam.max_tvd <= delta + fam.tolerance, (name, str(report))
    assert not report.lossless                                             # it does use its budget
    assert report.families["flat"].mean_acceptance > certify(
        ExactRule(), V=8, n_pairs=4, n_samples=N, families=("flat",)).families["flat"].mean_acceptance + 0.1


def test_lantern_bound_holds_for_one_hot_q_and_fails_for_stochastic_q():
    """The documented failure mode: flat p, q uniform on half the vocabulary; every draft borrows its neighbours'
    mass, all drafts are accepted and the output law is q, at TVD 0.5 from p with delta = 0.3."""
    delta = 0.3
    report = certify(LanternRule(default_geometry(8), k=7, delta=delta), V=8, n_pairs=4, n_samples=N,
                     families=("one_hot", "flat_half_q"))
    one_hot = report.families["one_hot"]
    assert one_hot.max_tvd <= delta + one_hot.tolerance, str(report)
    assert report.families["flat_half_q"].max_tvd > delta + 0.15, str(report)


def test_certify_flags_lossy_rules():
    g = default_geometry(8)
    for rule in (TypicalRule(), GroupedRule(g, d_threshold=2.0)):
        report = certify(rule, V=8, n_pairs=3, n_samples=N, families=("flat", "one_hot"))
        assert not report.lossless and report.verdict.startswith("lossy, max TVD=")


def test_certify_on_given_distributions_and_errors():
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(3, 8, generator=g), -1)
    q = torch.softmax(torch.randn(3, 8, generator=g), -1)
    report = certify_on(ExactRule(), p, q, n_samples=N, name="zoo")
    assert report.lossless and set(report.families) == {"zoo"}
    with pytest.raises(ValueError, match="unknown pair families"):
        certify(ExactRule(), families=("nope",))
    with pytest.raises(ValueError, match=r"\[P, V\]"):
        certify_on(ExactRule(), p, q[:, :4])
    with pytest.raises(ValueError, match="probability vector"):
        implied_distribution(ExactRule(), p[0] * 2, q[0])


# --- exact single-step laws, the acceptance/TV frontier, LANTERN vs BoundedLANTERN at equal emitted TV -------------
@pytest.mark.parametrize("rule", [LanternRule(default_geometry(8), k=3, delta=0.2),
                                  LanternRule(default_geometry(8), k=7, lam=3.0),
                                  BoundedLanternRule(default_geometry(8), k=3, delta=0.2), ExactRule()],
                         ids=["lantern_delta", "lantern_lam", "bounded", "exact"])
def test_single_step_law_matches_monte_carlo(rule):
    N = 20_000
    for fam, (p, q) in random_pairs(8, 2, seed=2).items():
        law, acc = single_step_law(rule, p, q)
        assert torch.allclose(law.sum(-1), torch.ones(2, dtype=torch.float64))
        for i in range(2):
            hist, mc_acc = simulate(rule, p[i], q[i], N, seed=i)
            assert tvd(hist, law[i]) < 2.5 * noise_level(law[i].float(), N), fam
            assert abs(mc_acc - float(acc[i])) < 4 * (0.25 / N) ** 0.5, fam


def test_matched_tv_bounded_lantern_dominates_lantern():
    """Every rule's acceptance is at most sum min(p, q) + TV(emitted, p) (the frontier). BoundedLANTERN on the full
    neighbour graph reaches it: given LANTERN's own emitted TV of a pair as its budget, it accepts at least as often
    as LANTERN on that pair. Checked on every stochastic-q family, at two LANTERN budgets."""
    V = 8
    g = default_geometry(V)
    for fam, (p, q) in random_pairs(V, 6, seed=3).items():
        base = torch.minimum(p, q).double().sum(-1)
        for delta in (0.05, 0.2):
            law, acc = single_step_law(LanternRule(g, k=V - 1, delta=delta), p, q)
            tv = 0.5 * (law - p.double()).abs().sum(-1)
            assert (acc <= base + tv + 1e-6).all(), fam                                         # the frontier
            for i in range(len(p)):
                bounded = BoundedLanternRule(g, k=V - 1, delta=min(1.0, float(tv[i])), candidates=V, rounds=8)
                b_law, b_acc = single_step_law(bounded, p[i:i + 1], q[i:i + 1])
                assert 0.5 * float((b_law[0] - p[i].double()).abs().sum()) <= float(tv[i]) + 1e-6
                assert float(b_acc[0]) >= float(acc[i]) - 1e-5, (fam, delta, i)
                assert float(b_acc[0]) <= float(base[i] + tv[i]) + 1e-6
