"""The zoo EAGLE head's rank acceptance profile (`specdec.tree_profile`), and the MAL its optimal static trees
(`specdec.tree.optimal_shape`, after Sequoia, arXiv 2402.12374) are predicted to reach against the binary trees of
the same size. --write stores the profile on the head's card, where `eagle(head, tree="static:optimal-N")` and
the bench's `tree = "static:optimal-N"` find it. Counts only, untimed, unless --costs: then the target's
verification cost per token count (raw forwards) and a drafter call through the loop are measured on this device,
and the shapes predicted fastest here are listed (`specdec.tree_profile.fastest_shapes`), with the chain's and the
bench's optimal shapes for comparison with measured speedups.

    python experiments/tree_profile.py --cfg 3 --images 64 --threads 2 --write
    python experiments/tree_profile.py --zoo-dir <folder> --write     # a retrained head, before adopting it
    python experiments/tree_profile.py --costs --from-card --threads 2  # which tree this device wants
    python experiments/tree_profile.py --costs --from-card --threads 2 --dtype bfloat16
    python experiments/tree_profile.py --costs --from-card --threads 2 --dtype bfloat16 --compile freeze

--compile runs the target's decode step and tree verification compiled (specdec.compiled.TARGET_COMPILE), and the
EAGLE trees' level feeds compiled the same way ("freeze": weights pre-packed), as the bench's `compile` sweep does.
"""
from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys

import torch

import specdec
from drafters.eagle import EagleTreeDrafter
from specdec import Sampling
from specdec.bench.timing import set_threads
from specdec.compiled import TARGET_COMPILE, compile_adapter
from specdec.devices import use_device
from specdec.tree import expected_accepted, optimal_shape, static_shape
from specdec.bench.timing import step_costs
from specdec.tree_profile import StepCost, fastest_shapes, rank_acceptance, shape_choice
from specdec.zoo import read_card, write_card

COMPARED = {14: "binary-3", 30: "binary-4", 62: "binary-5", 126: "binary-6"}
VERIFY_SIZES = (2, 4, 8, 16, 32, 64)
ON_THE_BENCH = {"chain-4 (optimal-4x4)": (4, 4), "optimal-4x2": (4, 2), "optimal-6x3": (6, 3), "optimal-14": (14, 12),
                "optimal-30": (30, 12), "optimal-62": (62, 12)}


def loop_stats(bundle, cond, sampling: Sampling, drafter=None):
    """SpecStats of one generation through the loop, after a warm-up one."""
    for seed in (0, 1):
        stats = specdec.generate(bundle.target, cond, drafter=drafter() if drafter else None, sampling=sampling,
                                 seed=seed, decode=False).stats
    return stats


def measured_cost(bundle, profile, sampling: Sampling, rounds: int, compile_drafter: bool | str = False) -> StepCost:
    """This device's StepCost at batch 1, in raw one-token target forwards: raw verification forwards; a drafter
    call (draft seconds per call of an optimal-14 tree's steps through the loop); what else a step costs through
    the loop, fitted as fixed + per_node * nodes to a 4-chain's and an optimal-14 tree's steps; AR's loop per
    token."""
    cond = torch.tensor([1], device=bundle.target.device)
    verify, step = {1: 1.0}, []
    for n in VERIFY_SIZES:
        t_step, t_n = step_costs(bundle.target, cond, sampling, n, rounds)
        verify[n], step = t_n / t_step, step + [t_step]
    t_step = sorted(step)[len(step) // 2]
    ar = loop_stats(bundle, cond, sampling)
    runs = {}
    for nodes, depth in ((4, 4), (14, 12)):
        shape = optimal_shape(profile, nodes, depth)
        stats = loop_stats(bundle, cond, sampling,
                           lambda: EagleTreeDrafter(bundle.eagle_head, shape=shape, compile=compile_drafter))
        runs[nodes] = (max(map(len, shape)), stats)
    depth14, tree = runs[14]
    base = StepCost(verify, tree.draft_s / (tree.steps * (depth14 + 1)) / t_step)
    rest = {n: stats.wall_s / stats.steps / t_step - base.step(n, d) for n, (d, stats) in runs.items()}
    per_node = (rest[14] - rest[4]) / 10
    return dataclasses.replace(base, fixed=rest[4] - 4 * per_node, per_node=per_node,
                               ar_token=ar.wall_s / ar.steps / t_step)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cfg", type=float, default=3.0, help="the guidance scale the head was trained for")
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--ranks", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1")
    ap.add_argument("--zoo-dir", default=None, help="a zoo weights folder (default: the installed zoo)")
    ap.add_argument("--write", action="store_true", help="store the profile on the EAGLE head's card")
    ap.add_argument("--costs", action="store_true", help="also measure this device's costs and rank the shapes")
    ap.add_argument("--from-card", action="store_true", help="take the profile on the head's card, measure none")
    ap.add_argument("--rounds", type=int, default=20, help="timing rounds per verification size (--costs)")
    ap.add_argument("--dtype", default="float32", help="what the target and the head compute in (float32, bfloat16)")
    ap.add_argument("--compile", default="off", choices=tuple(TARGET_COMPILE),
                    help="the target's steps and the trees' level feeds compiled (--costs)")
    args = ap.parse_args(argv)
    torch.set_grad_enabled(False)
    threads = set_threads(args.threads)
    device = use_device(args.device)
    bundle = specdec.zoo.load(device, directory=args.zoo_dir, dtype=args.dtype)
    if bundle.eagle_head is None:
        raise SystemExit("this zoo has no EAGLE head: train one with experiments/train_eagle.py")
    if args.from_card:
        if args.write or bundle.eagle_head.rank_acceptance is None:
            raise SystemExit("--from-card reads the profile on the head's card (none there, or --write given)")
        profile, source = bundle.eagle_head.rank_acceptance, "the head's card"
    else:
        cond = (torch.arange(args.images) % len(bundle.classes)).to(device)
        measured = rank_acceptance(bundle.target, lambda paths: EagleTreeDrafter(bundle.eagle_head, shape=paths),
                                   cond, Sampling(cfg_scale=args.cfg), ranks=args.ranks, seed=args.seed,
                                   progress=lambda line: print(line, flush=True))
        profile, source = measured.profile, f"CFG {args.cfg:g}, {args.images} images"
    print(f"rank acceptance ({source}): " + ", ".join(f"{a:.4f}" for a in profile))
    print("| nodes | optimal: depth | predicted MAL | binary tree | predicted MAL |\n|---|---|---|---|---|")
    for nodes, binary in COMPARED.items():
        paths = optimal_shape(profile, nodes)
        print(f"| {nodes} | {max(map(len, paths))} | {1 + expected_accepted(paths, profile):.2f} | {binary} | "
              f"{1 + expected_accepted(static_shape(binary), profile):.2f} |")
    if args.costs:
        compiled = TARGET_COMPILE[args.compile]
        if compiled is not None:
            bundle = dataclasses.replace(bundle, target=compile_adapter(bundle.target, *compiled))
        compile_drafter = {"off": False, "freeze": "freeze"}.get(args.compile, True)
        cost = measured_cost(bundle, profile, Sampling(cfg_scale=args.cfg), args.rounds, compile_drafter)
        print(f"costs on {device} in {args.dtype} (compile {args.compile}), batch 1, CFG {args.cfg:g}, "
              f"{threads} threads, in raw target steps: verify "
              + ", ".join(f"{n} tokens {c:.2f}" for n, c in sorted(cost.verify.items()))
              + f"; a drafter call {cost.draft_call:.3f}; the rest of a step {cost.fixed:.3f} + {cost.per_node:.4f} "
              f"per node; AR {cost.ar_token:.3f} per token")
        print("| shape | nodes | depth | predicted MAL | step cost | predicted speedup |\n|---|---|---|---|---|---|")
        rows = [(f"fastest #{i + 1}", c) for i, c in enumerate(fastest_shapes(profile, cost))]
        rows += [(name, shape_choice(profile, cost, nodes, depth)) for name, (nodes, depth) in ON_THE_BENCH.items()]
        for name, c in rows:
            print(f"| {name} | {c.nodes} | {c.depth} | {c.mal:.2f} | {c.cost:.2f} | {c.speedup:.2f}x |")
    if args.write:
        card = read_card("eagle", args.zoo_dir)
        command = "python experiments/tree_profile.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
        card["tree_profile"] = {"rank_acceptance": [round(a, 5) for a in profile],
                                "accepted_per_forward_with_r_siblings": [round(a, 5) for a in measured.cumulative],
                                "siblings": "sample (without replacement)", "cfg": args.cfg,
                                "images": args.images, "seed": args.seed, "threads": threads,
                                "command": command}
        write_card("eagle", card, args.zoo_dir)
        print("written to the EAGLE head's card")


if __name__ == "__main__":
    main()
