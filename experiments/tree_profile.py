"""The zoo EAGLE head's rank acceptance profile (`specdec.tree_profile`), and the MAL its optimal static trees
(`specdec.tree.optimal_shape`, after Sequoia, arXiv 2402.12374) are predicted to reach against the binary trees of
the same size. --write stores the profile on the head's card, where `eagle(head, tree="static:optimal-N")` and
the bench's `tree = "static:optimal-N"` find it. Counts only, untimed.

    python experiments/tree_profile.py --cfg 3 --images 64 --threads 2 --write
    python experiments/tree_profile.py --zoo-dir <folder> --write     # a retrained head, before adopting it
"""
from __future__ import annotations

import argparse
import shlex
import sys

import torch

import specdec
from drafters.eagle import EagleTreeDrafter
from specdec import Sampling
from specdec.bench.timing import set_threads
from specdec.devices import use_device
from specdec.tree import expected_accepted, optimal_shape, static_shape
from specdec.tree_profile import rank_acceptance
from specdec.zoo import read_card, write_card

COMPARED = {14: "binary-3", 30: "binary-4", 62: "binary-5", 126: "binary-6"}


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
    args = ap.parse_args(argv)
    torch.set_grad_enabled(False)
    threads = set_threads(args.threads)
    device = use_device(args.device)
    bundle = specdec.zoo.load(device, directory=args.zoo_dir)
    if bundle.eagle_head is None:
        raise SystemExit("this zoo has no EAGLE head: train one with experiments/train_eagle.py")
    cond = (torch.arange(args.images) % len(bundle.classes)).to(device)
    measured = rank_acceptance(bundle.target, lambda paths: EagleTreeDrafter(bundle.eagle_head, shape=paths),
                               cond, Sampling(cfg_scale=args.cfg), ranks=args.ranks, seed=args.seed,
                               progress=lambda line: print(line, flush=True))
    profile = measured.profile
    print(f"rank acceptance (CFG {args.cfg:g}, {args.images} images): " + ", ".join(f"{a:.4f}" for a in profile))
    print("| nodes | optimal: depth | predicted MAL | binary tree | predicted MAL |\n|---|---|---|---|---|")
    for nodes, binary in COMPARED.items():
        paths = optimal_shape(profile, nodes)
        print(f"| {nodes} | {max(map(len, paths))} | {1 + expected_accepted(paths, profile):.2f} | {binary} | "
              f"{1 + expected_accepted(static_shape(binary), profile):.2f} |")
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
