"""What each continuous-token rule does to the token law, on Gaussian chains whose law is known.

    python experiments/continuous_rules_table.py --out runs/continuous_rules

Heads: linear-Gaussian transitions mu_j(x) = a_j x + b_j per dim (specdec.continuous.LinearGaussianChain), S
transitions (the last noiseless), the schedule's sigma_t from 0.55 to 0.05 (the last one is the token density CSpD
reads); the drafter's slopes are `--slope` times the target's and its offsets `--offset` higher. For D in {1, 16}
and each rule, 20k emitted tokens are compared with 20k direct ancestral samples of the target (independent
noises): two-sample energy distance (sliced over random directions for D > 1) with the 99th percentile of its
label-permutation null, and the per-dimension Kolmogorov-Smirnov statistic and p-value (the smallest over dims),
two-sample and against the known Gaussian law.

Rules: `exact` (verifiers.gaussian_chain, shared sigma_t: reflection maximal coupling, arXiv 2501.05370),
`exact-loop` (the drafter's variances 1.35x the target's: the capped rejection-loop residual), `cspd` (arXiv
2411.11925, inner temperature 1, the paper's test), `cspd-relaxed(T=42)` (the released code's temperature), and
two references: `target` (a second independent target sample: the null) and `drafter` (the drafter's own law).
Acceptance: transitions accepted / drafted (exact rules) or draft tokens kept (CSpD). target calls / token: batched
target head calls per token (plain ancestral sampling: S). One JSON line per (D, rule, setting); settings already in
the output are skipped (resume).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from scipy.stats import ks_2samp, kstest

from specdec.continuous import LinearGaussianChain, energy_test, rollout
from verifiers.cspd import CSpDRule
from verifiers.gaussian_chain import run_chain

RULES = ("target", "drafter", "exact", "exact-loop", "cspd", "cspd-relaxed(T=42)")


def heads(D: int, S: int, slope: float, offset: float, seed: int) -> tuple[LinearGaussianChain, LinearGaussianChain]:
    g = torch.Generator().manual_seed(seed)
    a, b = 0.9 + 0.05 * torch.randn(S, D, generator=g), 0.1 * torch.randn(S, D, generator=g)
    log_vars = torch.log((0.05 + 0.5 * torch.linspace(1, 0, S)[:, None]) ** 2).expand(S, D).clone()
    return LinearGaussianChain(a, b, log_vars), LinearGaussianChain(slope * a, b + offset, log_vars)


def draws(D: int, S: int, tokens: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x_T, noises = torch.randn(1, tokens, D, generator=g), torch.randn(1, tokens, S, D, generator=g)
    return x_T, noises, torch.rand(1, tokens, S, generator=g).clamp(1e-7, 1 - 1e-7), g


def emit(rule: str, target, drafter, D: int, S: int, k: int, tokens: int, seed: int) -> tuple[torch.Tensor, dict]:
    """Tokens [tokens, D] emitted by `rule` and its counters."""
    x_T, noises, u, g = draws(D, S, tokens, seed)
    if rule == "target":
        return target.sample(x_T, noises)[0], {}
    if rule == "drafter":
        return drafter.sample(x_T, noises)[0], {}
    if rule.startswith("exact"):
        draft_log_vars = target.log_vars + (0.3 if rule == "exact-loop" else 0.0)
        run = run_chain(drafter.mean, target.mean, x_T, noises, u, draft_log_vars, target.log_vars, k, g)
        return run.token[0], {
            "acceptance": run.accepted.sum().item() / max(run.drafted.sum().item(), 1),
            "target_calls_per_token": run.target_calls.float().mean().item(),
            "rejected_tokens": (run.first_rejected < S).float().mean().item(),
            "first_rejected_histogram": torch.bincount(run.first_rejected.flatten(), minlength=S + 1).tolist(),
            "fallbacks": int(run.fallbacks.sum())}
    cspd = CSpDRule(inner_temperature=42.0 if "relaxed" in rule else 1.0)
    steps = torch.arange(S).expand(1, tokens, S)
    chains = [rollout(h.mean, x_T, steps, noises, h.log_vars, noiseless_last=True) for h in (drafter, target)]
    v = cspd.verify(*chains, u, g)
    tries = (v.residual_tries.sum() / (~v.accepted).sum().clamp_min(1)).item()
    return v.state[0], {"acceptance": v.accepted.float().mean().item(), "fallbacks": int(v.fallbacks.sum()),
                        "residual_tries_per_rejection": tries, "label": cspd.label}


def measure(x: torch.Tensor, y: torch.Tensor, law: tuple[torch.Tensor, torch.Tensor], directions: int,
            permutations: int, seed: int) -> dict:
    """x, y [N, D]: emitted and target tokens; law: the target token's (mean [D], variance [D])."""
    stat, null = energy_test(x, y, torch.Generator().manual_seed(seed), directions, permutations)
    ks = [ks_2samp(x[:, d].numpy(), y[:, d].numpy()) for d in range(x.shape[1])]
    white = ((x.double() - law[0].double()) / law[1].double().sqrt()).numpy()
    return {"energy_distance": stat, "energy_null_q99": float(null.quantile(0.99)),
            "energy_p": float((1 + (null >= stat).sum()) / (1 + len(null))),
            "ks_max_stat": max(float(r.statistic) for r in ks), "ks_min_p": min(float(r.pvalue) for r in ks),
            "ks_law_min_p": min(float(kstest(white[:, d], "norm").pvalue) for d in range(x.shape[1]))}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/continuous_rules", help="results folder (JSONL)")
    ap.add_argument("--dims", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--tokens", type=int, default=20_000)
    ap.add_argument("--steps", type=int, default=8, help="transitions S per chain (the last one noiseless)")
    ap.add_argument("--k", type=int, default=3, help="transitions drafted per round (exact rules)")
    ap.add_argument("--slope", type=float, default=1.05)
    ap.add_argument("--offset", type=float, default=0.1)
    ap.add_argument("--directions", type=int, default=128)
    ap.add_argument("--permutations", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    out = Path(args.out) / "continuous_rules.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    setting = lambda r: (r["dim"], r["rule"], r["tokens"], r["steps"], r["k"], r["slope"], r["offset"], r["seed"])
    done = {setting(r) for r in map(json.loads, out.read_text().splitlines())} if out.exists() else set()
    for D in args.dims:
        target, drafter = heads(D, args.steps, args.slope, args.offset, args.seed)
        reference, _ = emit("target", target, drafter, D, args.steps, args.k, args.tokens, args.seed + 1000)
        for i, rule in enumerate(RULES):
            if (D, rule, args.tokens, args.steps, args.k, args.slope, args.offset, args.seed) in done:
                continue
            t0 = time.perf_counter()
            tokens, counters = emit(rule, target, drafter, D, args.steps, args.k, args.tokens, args.seed + 1 + i)
            row = {"dim": D, "rule": rule, "tokens": args.tokens, "steps": args.steps, "k": args.k,
                   "slope": args.slope, "offset": args.offset, **counters,
                   **measure(tokens, reference, target.law(), args.directions, args.permutations, args.seed),
                   "seed": args.seed,
                   "wall_s": round(time.perf_counter() - t0, 2)}
            with out.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"D={D:2d} {rule:20s} energy {row['energy_distance']:.2e} (null q99 {row['energy_null_q99']:.2e}, "
                  f"p {row['energy_p']:.3f})  KS max {row['ks_max_stat']:.4f} min p {row['ks_min_p']:.1e} "
                  f"(vs law {row['ks_law_min_p']:.1e})  "
                  f"acceptance {row.get('acceptance', float('nan')):.3f}  "
                  f"target calls/token {row.get('target_calls_per_token', float('nan')):.2f}  "
                  f"fallbacks {row.get('fallbacks', 0)}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
