"""How MAL grows with the Jacobi window, and what coupling successive iterates buys: SJD (a fresh draw from each
tail slot's new law every step) against MC-SJD (the previous iterate kept with probability min(1, p_new / q_old),
a maximal coupling) and the Gumbel-max coupling, with fresh slots drawn at random or copied from the token above;
lossless (exact rule), over N images in one batch, at CFG 1 and 3. Counts only, untimed (the timed comparison is
docs/results/zoo-jacobi-bf16.toml). MAL is the pooled committed tokens per target forward; +- its standard error
from the images' spread (`specdec.metrics.mal_standard_error`).

    python experiments/jacobi_mal.py --images 16 --threads 2
    python experiments/jacobi_mal.py --windows 16 --couplings maximal --inits repeat_vertical --cfg 3
    python experiments/jacobi_mal.py --windows 16 24 --couplings maximal --inits repeat_vertical \
        --rule bounded_lantern --rule-params '{"delta": 0.1}'
        # a relaxed rule on the same drafts (MAL and the samples' NLL under the target; its bound is the rule's own)
    python experiments/jacobi_mal.py --windows 16 --couplings maximal --inits repeat_vertical --cfg 1 \
        --dtype bfloat16 --compile freeze      # the target as the bench runs it: other roundings, other draws
"""
from __future__ import annotations

import argparse
import itertools
import json

import torch

import specdec
from drafters.jacobi import COUPLINGS, JacobiDrafter
from drafters.jacobi_tree import JacobiTreeDrafter
from specdec import Sampling
from specdec.compiled import TARGET_COMPILE, compile_adapter
from specdec.bench.timing import set_threads
from specdec.metrics import mal_standard_error, token_nll
from specdec.registry import make_rule


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cfg", type=float, nargs="+", default=[1.0, 3.0])
    ap.add_argument("--windows", type=int, nargs="+", default=[4, 6, 8, 12, 16, 24])
    ap.add_argument("--couplings", nargs="+", default=list(COUPLINGS), choices=COUPLINGS)
    ap.add_argument("--inits", nargs="+", default=["random", "repeat_vertical"])
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--branches", nargs="+", default=["chain"],
                    help="the chain, or KxD: a JacobiTreeDrafter with K candidates at each of the window's first D "
                         "positions (proactive drafting), KxD+T: and T copies of the spine below each "
                         "off-spine leaf, e.g. chain 2x1 2x2 3x1+4")
    ap.add_argument("--rule", default="exact", help="the rule (registry name; default: the exact rule)")
    ap.add_argument("--rule-params", default="{}", help="its parameters as JSON, e.g. '{\"delta\": 0.1}'")
    ap.add_argument("--dtype", default="float32", help="the zoo's compute dtype: float32 or bfloat16")
    ap.add_argument("--compile", default="off", choices=tuple(TARGET_COMPILE),
                    help="how the target's steps run (specdec.compiled.TARGET_COMPILE)")
    args = ap.parse_args(argv)
    torch.set_grad_enabled(False)
    set_threads(args.threads)
    bundle = specdec.zoo.load("cpu", dtype=args.dtype)
    target = bundle.target if TARGET_COMPILE[args.compile] is None else \
        compile_adapter(bundle.target, *TARGET_COMPILE[args.compile])
    cond = torch.arange(args.images) % 4
    rule = make_rule(args.rule, bundle.target, **json.loads(args.rule_params))
    print(f"| Jacobi drafts, {args.rule} {args.rule_params}, {args.images} images, {args.dtype}, compile "
          f"{args.compile} | CFG | window | MAL | +- "
          f"| target forwards / image | NLL under the target |")
    print("|---|---|---|---|---|---|---|")
    for cfg in args.cfg:
        for window in args.windows:
            for coupling in args.couplings:
                for init, branch in itertools.product(args.inits, args.branches):
                    drafter = _drafter(window, init, coupling, branch)
                    res = specdec.generate(target, cond, drafter=drafter, rule=rule,
                                           sampling=Sampling(cfg_scale=cfg), seed=args.seed, decode=False)
                    se = mal_standard_error(res.stats.forwards_per_row, res.stats.num_tokens - 1)
                    nll = float(token_nll(bundle.target_gpt, res.tokens, cond).mean())
                    name = f"{init} {coupling}" + ("" if branch == "chain" else f" tree {branch}")
                    print(f"| {name} | {cfg:g} | {window} | {res.stats.mean_accepted_length:.2f} | "
                          f"{se:.2f} | {res.stats.target_forwards / args.images:.1f} | {nll:.3f} |", flush=True)


def _drafter(window: int, init: str, coupling: str, branch: str):
    if branch == "chain":
        return JacobiDrafter(window=window, init=init, coupling=coupling)
    sizes = branch.replace("+", "x").split("x")
    if len(sizes) not in (2, 3) or not all(v.isdigit() for v in sizes):
        raise SystemExit(f"--branches takes 'chain', KxD or KxD+T (e.g. 2x2, 3x1+4), got {branch!r}")
    k, d, tails = (int(v) for v in sizes + ["0"] * (3 - len(sizes)))
    return JacobiTreeDrafter(window=window, init=init, coupling=coupling, branch=k, branch_depth=d, tails=tails)


if __name__ == "__main__":
    main()
