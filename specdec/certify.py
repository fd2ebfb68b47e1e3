"""What an acceptance rule does to the output distribution.

For one single-draft step (k = 1) with target p [V] and draft q [V], the FIRST committed token is the draft x ~ q
when accepted, else the rule's correction. Its law (the rule's *implied distribution*) must equal p for a lossless
rule. `implied_distribution` estimates it by Monte Carlo with an explicit generator; `certify` runs it over families
of (p, q) pairs on a small vocabulary and compares the total variation distance TVD(emitted, p) with the Monte Carlo
noise level: the expected TVD of an empirical histogram of the same number of samples drawn from p itself.

    noise(p, n)  = E[ TV(hist_n(p), p) ]   (estimated with `noise_repeats` multinomial draws)
    verdict      = "lossless (within noise)"  iff  TVD(pair) <= tolerance_factor * noise(pair)  for every pair

The noise is about 0.5 * sum_v sqrt(2 p(v) (1 - p(v)) / (pi n)): ~0.005 for uniform p at V = 8, n = 40000. A lossy
rule whose distortion sits below the tolerance is reported lossless at that resolution: read max_tvd beside it.

Deterministic (one-hot) drafters: x is fixed given the context and q = one_hot(x); the "one_hot" family covers them.
`acceptance_probability` is deterministic: it enumerates x and a midpoint grid of acceptance uniforms.
`certify_command` is the body of `specdec certify` (random pairs, or real pairs from the zoo on request).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from specdec.protocols import AcceptanceRule, require
from specdec.random import GeneratorRandomness
from specdec.registry import geometry_source, make_rule, resolve
from specdec.sampling import Sampling
from specdec.types import Verdict


def _check_pq(p: Tensor, q: Tensor) -> tuple[Tensor, Tensor]:
    p = torch.as_tensor(p, dtype=torch.float32)
    q = torch.as_tensor(q, dtype=torch.float32)
    if p.shape != q.shape or p.dim() != 1:
        raise ValueError(f"p and q must be 1-D of one size V, got {tuple(p.shape)} and {tuple(q.shape)}")
    for name, d in (("p", p), ("q", q)):
        if not torch.isfinite(d).all() or (d < 0).any() or abs(float(d.sum()) - 1) > 1e-4:
            raise ValueError(f"{name} must be a probability vector (finite, >= 0, sums to 1)")
    return p, q


def simulate(rule, p: Tensor, q: Tensor, n_samples: int = 40_000, seed: int = 0) -> tuple[Tensor, float]:
    """One k = 1 step on n_samples copies -> (histogram [V] of the first committed token, acceptance rate)."""
    p, q = _check_pq(p, q)
    V = p.shape[0]
    gen = torch.Generator().manual_seed(seed)
    x = torch.multinomial(q, n_samples, replacement=True, generator=gen)                 # x ~ q
    # chunks keep rules that build per-neighbour tensors ([N, V, K]) within memory at large V
    chunk = max(1, (1 << 26) // (V * 64))
    counts = torch.zeros(V, dtype=torch.float64)
    n_accepted = 0
    for xs in x.split(chunk):
        n = xs.shape[0]
        verdict: Verdict = rule.verify(xs[:, None], q.expand(n, 1, V), p.expand(n, 2, V),   # bonus position: p
                                       GeneratorRandomness(gen, n))
        accepted = verdict.n_accepted >= 1
        counts += torch.bincount(torch.where(accepted, xs, verdict.next_token), minlength=V).double()
        n_accepted += int(accepted.sum())
    return counts / n_samples, n_accepted / n_samples


def implied_distribution(rule, p: Tensor, q: Tensor, n_samples: int = 40_000, seed: int = 0) -> Tensor:
    """The law [V] of the first committed token of a single-draft step, x ~ q, by Monte Carlo (float64).

    Standard error per entry: sqrt(h (1 - h) / n_samples); see `noise_level` for the TVD noise."""
    return simulate(rule, p, q, n_samples, seed)[0]


def tvd(a: Tensor, b: Tensor) -> float:
    return 0.5 * float((a.double() - b.double()).abs().sum())


def noise_level(p: Tensor, n_samples: int, repeats: int = 20, seed: int = 0) -> float:
    """Expected TVD between p and the histogram of n_samples draws from p itself (same estimator as certify)."""
    p = torch.as_tensor(p, dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed + 7919)
    draws = torch.multinomial(p.float().expand(repeats, -1), n_samples, replacement=True, generator=gen)
    V = p.shape[0]
    counts = torch.zeros(repeats, V, dtype=torch.float64).scatter_add_(
        1, draws, torch.ones_like(draws, dtype=torch.float64))
    return float(0.5 * (counts / n_samples - p).abs().sum(-1).mean())


class _GridRandomness:
    """Acceptance uniforms on a midpoint grid (row r gets (r % M + 0.5) / M); other streams 0.5."""

    def __init__(self, batch: int, m: int):
        self.u = ((torch.arange(batch) % m).float() + 0.5) / m
        self.batch = batch

    def uniform(self, tag: str, n: int) -> Tensor:
        if tag == "accept":
            return self.u[:, None].expand(self.batch, n)
        return torch.full((self.batch, n), 0.5)


@torch.no_grad()
def acceptance_probability(rule, p: Tensor, q: Tensor, grid: int = 2000) -> Tensor:
    """P(the single draft is accepted) for each pair: p, q [P, V] (or [V]) -> float64 [P] (or scalar).

    Deterministic: sum over x of q(x) times the fraction of a midpoint grid of `grid` uniforms that accept x, so the
    error is at most 1/grid, and for rules of the form `U < a(x)` it is monotone in a(x) exactly."""
    single = p.dim() == 1
    p, q = (p[None], q[None]) if single else (p, q)
    P, V = p.shape
    rows = P * V * grid
    pair = torch.arange(P).repeat_interleave(V * grid)
    x = torch.arange(V).repeat_interleave(grid).repeat(P)
    draft_probs = q.float()[pair][:, None]
    target_probs = p.float()[pair][:, None].expand(rows, 2, V)
    verdict = rule.verify(x[:, None], draft_probs, target_probs, _GridRandomness(rows, grid))
    acc = (verdict.n_accepted >= 1).double().reshape(P, V, grid).mean(-1)
    out = (acc * q.double()).sum(-1)
    return out[0] if single else out


def random_pairs(V: int = 8, n: int = 10, seed: int = 0) -> dict[str, tuple[Tensor, Tensor]]:
    """Families of (p [n, V], q [n, V]) pairs:

    flat        p ~ Dir(50) (near uniform), q ~ Dir(1)
    peaked      p ~ Dir(0.2), q ~ Dir(1)
    q_zeros     p ~ Dir(20), q ~ Dir(1) on a random half of the tokens, 0 elsewhere (q = 0 where p > 0)
    flat_half_q p exactly uniform, q uniform on a random half (the documented LANTERN failure mode)
    one_hot     p ~ Dir(1), q = one_hot(x) for a random x (deterministic drafters)
    q_equals_p  p ~ Dir(1), q = p
    """
    if V < 2 or n < 1:
        raise ValueError(f"need V >= 2 and n >= 1, got V={V}, n={n}")
    gen = torch.Generator().manual_seed(seed)

    def dirichlet(alpha: float, size: int) -> Tensor:
        # torch's Gamma sampler takes no generator: Marsaglia-Tsang below, boosted by G(a) = G(a+1) U^(1/a) for a < 1
        a = alpha + 1.0 if alpha < 1 else alpha
        g = _gamma(a, (n, size), gen)
        if alpha < 1:
            g = g * torch.rand(n, size, generator=gen, dtype=torch.float64).pow(1.0 / alpha)
        g = g.clamp_min(1e-12)
        return g / g.sum(-1, keepdim=True)

    def half_mask() -> Tensor:
        keys = torch.rand(n, V, generator=gen)
        return keys.argsort(-1) < max(1, V // 2)

    out = {}
    out["flat"] = (dirichlet(50.0, V), dirichlet(1.0, V))
    out["peaked"] = (dirichlet(0.2, V), dirichlet(1.0, V))
    m = half_mask()
    qz = dirichlet(1.0, V) * m
    out["q_zeros"] = (dirichlet(20.0, V), qz / qz.sum(-1, keepdim=True))
    m = half_mask().double()
    out["flat_half_q"] = (torch.full((n, V), 1.0 / V, dtype=torch.float64), m / m.sum(-1, keepdim=True))
    x = torch.randint(V, (n,), generator=gen)
    out["one_hot"] = (dirichlet(1.0, V), torch.nn.functional.one_hot(x, V).double())
    p = dirichlet(1.0, V)
    out["q_equals_p"] = (p, p.clone())
    return {name: (a.float() / a.float().sum(-1, keepdim=True), b.float() / b.float().sum(-1, keepdim=True))
            for name, (a, b) in out.items()}


def _gamma(a: float, shape, gen: torch.Generator) -> Tensor:
    """Gamma(a, 1) samples for a >= 1 (Marsaglia-Tsang), driven by an explicit generator; float64."""
    d = a - 1.0 / 3.0
    c = 1.0 / (9.0 * d) ** 0.5
    out = torch.empty(shape, dtype=torch.float64).view(-1)
    filled = torch.zeros_like(out, dtype=torch.bool)
    while not filled.all():      # a few rounds: acceptance > 95 %
        z = torch.randn(out.shape, generator=gen, dtype=torch.float64)
        u = torch.rand(out.shape, generator=gen, dtype=torch.float64)
        v = (1 + c * z) ** 3
        ok = (v > 0) & (u.clamp_min(1e-300).log() < 0.5 * z * z + d - d * v + d * v.clamp_min(1e-300).log())
        take = ok & ~filled
        out = torch.where(take, d * v, out)
        filled = filled | take
    return out.view(shape)


@dataclass(frozen=True)
class FamilyReport:
    n_pairs: int
    mean_acceptance: float
    mean_tvd: float
    max_tvd: float
    noise: float              # mean over pairs of the expected TVD of an exact sampler (Monte Carlo noise level)
    tolerance: float          # the largest per-pair tolerance (tolerance_factor * that pair's noise)
    excess: float             # max over pairs of TVD - tolerance (<= 0: within noise)
    deviates: bool = True     # some pair's acceptance left sum min(p, q) (the exact rule's) beyond 4 standard errors

    @property
    def within_noise(self) -> bool:
        return self.excess <= 0


@dataclass(frozen=True)
class CertifyReport:
    rule: str
    claims_lossless: bool
    V: int
    n_samples: int
    tolerance_factor: float
    families: dict = field(default_factory=dict)      # name -> FamilyReport

    @property
    def max_tvd(self) -> float:
        return max(f.max_tvd for f in self.families.values())

    @property
    def lossless(self) -> bool:
        return all(f.within_noise for f in self.families.values())

    @property
    def vacuous(self) -> bool:
        """A lossy rule that behaved as the exact rule on every pair: the certificate says nothing about it."""
        return not self.claims_lossless and self.lossless and not any(f.deviates for f in self.families.values())

    @property
    def verdict(self) -> str:
        if self.vacuous:
            return ("vacuous: on these pairs the rule never departed from the exact rule (acceptance sum min(p, q), "
                    "output law p), so nothing was certified; use pairs that exercise it, e.g. --zoo N, a larger "
                    "--vocab or other --params")
        if self.lossless:
            return "lossless (within noise)"
        return f"lossy, max TVD={self.max_tvd:.4f}"

    def __str__(self) -> str:
        lines = [f"{self.rule} (claims {'lossless' if self.claims_lossless else 'lossy'}), V={self.V}, "
                 f"n={self.n_samples}/pair: {self.verdict}"]
        for name, f in self.families.items():
            lines.append(f"  {name:12s} pairs={f.n_pairs:3d} acc={f.mean_acceptance:.3f} "
                         f"TVD mean={f.mean_tvd:.4f} max={f.max_tvd:.4f} noise~{f.noise:.4f}"
                         f"{'' if f.within_noise else '  <- beyond noise'}")
        return "\n".join(lines)

    def as_dict(self) -> dict:
        return {"rule": self.rule, "claims_lossless": self.claims_lossless, "V": self.V,
                "n_samples": self.n_samples, "verdict": self.verdict, "max_tvd": self.max_tvd,
                "families": {k: {**vars(f), "within_noise": f.within_noise} for k, f in self.families.items()}}


def _family(rule, p: Tensor, q: Tensor, n_samples: int, seed: int, factor: float) -> FamilyReport:
    tvds, accs, noises, deviates = [], [], [], False
    for i in range(p.shape[0]):
        hist, acc = simulate(rule, p[i], q[i], n_samples, seed + 1000 * i)
        tvds.append(tvd(hist, p[i]))
        accs.append(acc)
        noises.append(noise_level(p[i], n_samples, seed=seed + 1000 * i))
        exact = min(1.0, float(torch.minimum(p[i], q[i]).sum()))
        deviates |= abs(acc - exact) > 4 * (exact * (1 - exact) / n_samples) ** 0.5 + 1e-9
    t, nz = torch.tensor(tvds), torch.tensor(noises)
    return FamilyReport(len(tvds), float(torch.tensor(accs).mean()), float(t.mean()), float(t.max()),
                        float(nz.mean()), float(factor * nz.max()), float((t - factor * nz).max()), deviates)


def certify_on(rule, p_batch: Tensor, q_batch: Tensor, n_samples: int = 40_000, seed: int = 0,
               tolerance_factor: float = 2.5, name: str = "given") -> CertifyReport:
    """Certify on real distributions: p_batch, q_batch [P, V] (e.g. target and drafter outputs from the zoo)."""
    p_batch, q_batch = torch.as_tensor(p_batch).float(), torch.as_tensor(q_batch).float()
    if p_batch.dim() != 2 or p_batch.shape != q_batch.shape:
        raise ValueError(f"p_batch and q_batch must both be [P, V], got {tuple(p_batch.shape)} and "
                         f"{tuple(q_batch.shape)}")
    require(rule, AcceptanceRule, "the rule")
    fam = _family(rule, p_batch, q_batch, n_samples, seed, tolerance_factor)
    return CertifyReport(rule.name, rule.lossless, p_batch.shape[1], n_samples, tolerance_factor, {name: fam})


def certify(rule, V: int = 8, n_pairs: int = 8, n_samples: int = 40_000, seed: int = 0,
            tolerance_factor: float = 2.5, families: tuple[str, ...] | None = None) -> CertifyReport:
    """Run `rule` on every pair family of `random_pairs(V, n_pairs, seed)` and report acceptance and TVD to p.

    A pair passes when TVD(emitted, p) <= tolerance_factor * noise(p, n_samples); the rule certifies lossless when
    every pair passes. Rules with a geometry need one of size V, e.g. `default_geometry(V)`."""
    require(rule, AcceptanceRule, "the rule")
    pairs = random_pairs(V, n_pairs, seed)
    if families is not None:
        unknown = set(families) - set(pairs)
        if unknown:
            raise ValueError(f"unknown pair families {sorted(unknown)}; known: {sorted(pairs)}")
        pairs = {k: v for k, v in pairs.items() if k in families}
    reports = {name: _family(rule, p, q, n_samples, seed + 17 * j, tolerance_factor)
               for j, (name, (p, q)) in enumerate(pairs.items())}
    return CertifyReport(rule.name, rule.lossless, V, n_samples, tolerance_factor, reports)


def default_geometry(V: int = 8, dim: int = 4, seed: int = 0, metric: str = "l2"):
    """A random TokenGeometry of V tokens for certifying geometry-based rules."""
    from specdec.geometry import TokenGeometry

    gen = torch.Generator().manual_seed(seed)
    return TokenGeometry.from_vectors(torch.randn(V, dim, generator=gen), metric=metric)


# --- exact single-step laws and the acceptance / TV frontier ---------------------------------------------------------
def single_step_law(rule, p: Tensor, q: Tensor, chunk: int = 16) -> tuple[Tensor, Tensor]:
    """Exact law of the first committed token of one single-draft step (x ~ q) and its acceptance probability,
    for rules that provide `single_step_law` (exact, lantern, bounded_lantern): p, q [P, V] ->
    (law float64 [P, V], acceptance float64 [P]), computed `chunk` pairs at a time. No Monte Carlo noise, so it
    resolves TV differences far below `noise_level` at V = 512."""
    if not hasattr(rule, "single_step_law"):
        raise TypeError(f"{type(rule).__name__} has no single_step_law(p, q); use simulate() (Monte Carlo) instead")
    p, q = torch.as_tensor(p).float(), torch.as_tensor(q).float()
    if p.dim() != 2 or p.shape != q.shape:
        raise ValueError(f"p and q must both be [P, V], got {tuple(p.shape)} and {tuple(q.shape)}")
    parts = [rule.single_step_law(a, b) for a, b in zip(p.split(chunk), q.split(chunk))]
    return torch.cat([law for law, _ in parts]), torch.cat([acc for _, acc in parts])


@dataclass(frozen=True)
class TVPoint:
    """One rule on a set of (p, q) pairs: mean acceptance, mean and max TV(emitted, p) over the pairs, and the
    frontier: the mean over pairs of sum_v min(p, q) + TV(emitted, p), which no rule's acceptance can exceed
    (accepted mass at v is at most q(v) and at most emitted(v), and sum_v min(q, emitted) <= sum_v min(q, p) + TV)."""
    label: str
    acceptance: float
    mean_tvd: float
    max_tvd: float
    frontier: float


def tv_sweep(rules: dict, p: Tensor, q: Tensor) -> list[TVPoint]:
    """rules: label -> rule with `single_step_law`; p, q [P, V] -> one TVPoint per rule (exact, no sampling)."""
    base = torch.minimum(p, q).double().sum(-1)
    out = []
    for label, rule in rules.items():
        law, acc = single_step_law(rule, p, q)
        d = 0.5 * (law - p.double()).abs().sum(-1)
        out.append(TVPoint(label, float(acc.mean()), float(d.mean()), float(d.max()), float((base + d).mean())))
    return out


def acceptance_at_tv(points: list[TVPoint], tv: float) -> float:
    """Acceptance interpolated linearly along (mean_tvd, acceptance) of a sweep of one rule family at `tv`; nan
    outside the swept range."""
    pts = sorted((pt.mean_tvd, pt.acceptance) for pt in points)
    for (t0, a0), (t1, a1) in zip(pts, pts[1:]):
        if t0 <= tv <= t1:
            return a0 if t1 == t0 else a0 + (a1 - a0) * (tv - t0) / (t1 - t0)
    return float("nan")


# --- the `specdec certify` command -----------------------------------------------------------------------------------
@torch.no_grad()
def certify_command(rule_name: str, params: dict, vocab: int = 8, n_samples: int = 40_000, zoo: int = 0,
                    cfg: float = 3.0) -> str:
    """The report `specdec certify RULE` prints. The rule comes from the registry with `params`; it is certified on
    random pairs over `vocab` tokens (geometry rules on `default_geometry(vocab)`), or, with zoo = N > 0, on N real
    (p, q) pairs of the zoo's target and drafter at CFG `cfg`, followed by the exact single-step law when the rule
    has one. ValueError for an unknown rule or bad parameters. The zoo is imported only when asked for."""
    if zoo:
        import specdec.zoo
        from specdec.zoo.pairs import zoo_pairs

        try:
            bundle = specdec.zoo.load()
        except specdec.zoo.ZooError as e:
            raise ValueError(str(e)) from e
        rule = _build(lambda: make_rule(rule_name, bundle.target, **params), rule_name)
        p, q = zoo_pairs(bundle, zoo, Sampling(cfg_scale=cfg))
        lines = [str(certify_on(rule, p, q, n_samples=n_samples, name=f"zoo cfg={cfg}"))]
        if hasattr(rule, "single_step_law"):
            (point,) = tv_sweep({rule_name: rule}, p, q)
            lines.append(f"  exact single-step law (no sampling noise): acc={point.acceptance:.4f} "
                         f"TVD mean={point.mean_tvd:.4f} max={point.max_tvd:.4f} "
                         f"(frontier sum min(p,q)+TVD = {point.frontier:.4f})")
        return "\n".join(lines)
    cls = resolve("rule", rule_name)
    if geometry_source(cls) is not None:
        rule = _build(lambda: cls(default_geometry(vocab), **params), rule_name)
    else:
        rule = _build(lambda: make_rule(rule_name, **params), rule_name)
    return str(certify(rule, V=vocab, n_samples=n_samples))


def _build(make, rule_name: str):
    """make() -> the rule; a constructor's TypeError (unknown or missing parameter) as a ValueError naming it."""
    try:
        return make()
    except TypeError as e:
        raise ValueError(f"rule {rule_name!r} does not take these parameters ({e}); check --params") from e
