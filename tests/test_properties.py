"""Property tests for every rule (hypothesis): random p and q with zeros, one-hots and ties, logits in float16 /
bfloat16 turned into probabilities the way `specdec.sampling` does, any (B, k, V)."""
from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from specdec.certify import default_geometry
from specdec.random import GeneratorRandomness
from specdec.sampling import Sampling, to_probs
from verifiers import BoundedLanternRule, ExactRule, GroupedRule, LanternRule, TypicalRule

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def make_rules(V: int):
    geometry = default_geometry(V)
    return {"exact": ExactRule(), "lantern": LanternRule(geometry, neighbours=min(3, V - 1), delta=0.2),
            "lantern_lam": LanternRule(geometry, neighbours=min(3, V - 1), lam=2.0),
            "bounded_lantern": BoundedLanternRule(geometry, neighbours=min(3, V - 1), delta=0.2),
            "grouped": GroupedRule(geometry, p_threshold=0.5, d_threshold=4.0, residual="group"),
            "grouped_standard": GroupedRule(geometry, p_threshold=0.5, d_threshold=4.0),
            "typical": TypicalRule()}


@st.composite
def distributions(draw, shape):
    """Probabilities [*shape, V] from float16 / bfloat16 / float32 logits: masked tokens (zeros), one-hot rows
    (temperature 0 or a single allowed token), tied logits, top-k."""
    *lead, V = shape
    n = 1
    for s in shape:
        n *= s
    seed = draw(st.integers(0, 2 ** 31 - 1))
    g = torch.Generator().manual_seed(seed)
    dtype = draw(st.sampled_from(DTYPES))
    logits = (torch.randn(shape, generator=g) * draw(st.sampled_from([0.1, 1.0, 4.0]))).to(dtype)
    if draw(st.booleans()):                                               # ties: quantised logits
        logits = (logits * 2).round() / 2
    mask = torch.rand(V, generator=g) > draw(st.sampled_from([0.0, 0.3, 0.7]))
    mask[torch.randint(V, (1,), generator=g)] = True                      # at least one allowed token
    sampling = draw(st.sampled_from([Sampling(), Sampling(temperature=0.0), Sampling(top_k=2),
                                     Sampling(temperature=0.5, top_p=0.8)]))
    return to_probs(logits, None, sampling, mask)


@st.composite
def steps(draw):
    B, k, V = draw(st.integers(1, 4)), draw(st.integers(1, 4)), draw(st.integers(2, 12))
    p = draw(distributions((B, k + 1, V)))
    q = draw(distributions((B, k, V)))
    seed = draw(st.integers(0, 2 ** 31 - 1))
    g = torch.Generator().manual_seed(seed)
    tokens = torch.multinomial(q.reshape(-1, V), 1, generator=g).reshape(B, k)   # drafts drawn from q
    return p, q, tokens, g


@settings(max_examples=60, deadline=None)
@given(steps())
def test_every_rule_keeps_its_counts_and_commits_a_token_with_mass(step):
    p, q, tokens, g = step
    B, k, V = q.shape
    for name, rule in make_rules(V).items():
        verdict = rule.verify(tokens, q, p, GeneratorRandomness(g, B))
        n, nxt = verdict.n_accepted, verdict.next_token
        assert n.shape == (B,) and nxt.shape == (B,) and n.dtype == torch.long
        assert bool(((n >= 0) & (n <= k)).all()), name
        assert bool(((nxt >= 0) & (nxt < V)).all()), name
        mass = p.gather(1, n[:, None, None].expand(-1, 1, V))[:, 0].gather(1, nxt[:, None])[:, 0]   # p_n(next)
        if name == "bounded_lantern":      # it emits from its relaxed target, which may move mass onto q's tokens
            relaxed = torch.cat([rule.relaxed_target(p, q), p[:, k:]], 1)
            mass = relaxed.gather(1, n[:, None, None].expand(-1, 1, V))[:, 0].gather(1, nxt[:, None])[:, 0]
        elif name.startswith("lantern"):   # or the draft itself, credited with its neighbours' mass
            at = tokens.gather(1, n.clamp_max(k - 1)[:, None])[:, 0]
            mass = mass + ((nxt == at) & (n < k)).float()
        assert bool((mass > 0).all()), (name, mass)


class _Grid:
    """Randomness enumerating a midpoint grid: row r reads uniform ((r // G**i) % G + 0.5) / G for its i-th tag."""

    def __init__(self, rows: int, G: int, tags: tuple[str, ...]):
        idx = torch.arange(rows)
        self.u = {tag: (((idx // G ** i) % G).double() + 0.5) / G for i, tag in enumerate(tags)}

    def uniform(self, tag: str, n: int) -> torch.Tensor:
        return self.u.get(tag, self.u["residual"])[:, None].expand(-1, n).float()


def grid_law(rule, p: torch.Tensor, q: torch.Tensor, G: int = 150) -> torch.Tensor:
    """The law [V] of the first committed token of one single-draft step (x ~ q), with the accept and residual
    uniforms enumerated on a G x G midpoint grid: exact up to the grid's resolution."""
    V = p.shape[-1]
    x = torch.arange(V).repeat_interleave(G * G)
    rows = x.shape[0]
    verdict = rule.verify(x[:, None], q.expand(rows, 1, V), p.expand(rows, 2, V), _Grid(rows, G, ("accept", "residual")))
    token = torch.where(verdict.n_accepted >= 1, x, verdict.next_token)
    weight = q.double()[x] / (G * G)
    return torch.zeros(V, dtype=torch.float64).index_add_(0, token, weight)


@settings(max_examples=25, deadline=None)
@given(distributions((1, 6)), distributions((1, 6)))
def test_the_exact_rule_emits_p_and_bounded_lantern_stays_within_delta(p, q):
    p, q = p[0], q[0]
    law = grid_law(ExactRule(), p, q)
    assert float((law - p.double()).abs().max()) < 0.03, (law, p)
    bounded = BoundedLanternRule(default_geometry(6), neighbours=3, delta=0.15)
    law = grid_law(bounded, p, q)
    assert 0.5 * float((law - p.double()).abs().sum()) <= 0.15 + 0.03
