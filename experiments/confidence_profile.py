"""Does the draft's confidence tell which sibling the target will accept? EAGLE-2 (arXiv 2406.16858) grows its
dynamic trees where the draft is confident; this measures whether that signal exists for the zoo's EAGLE head.

One star tree of R siblings drawn without replacement under the root, decoded over N images: each step records the
head's top-1 probability max q at the root and which sibling (rank r) the exact rule accepted. Per quintile of
max q it prints the rank acceptance a[r] (the chance that sibling r is the accepted one) and A(R) = sum a[r].
Then a confidence-aware tree is bounded from above: an oracle that knows every node's quintile before the tree is
built keeps, for each draw of quintiles (independent per node), the N nodes of largest value (prod a_c[r] along the
path, c the quintile of the node's parent), against the static optimal shape of the pooled profile
(`specdec.tree.optimal_shape`), whose expected value under independent quintiles is that of the mean profile.
Counts only, untimed.

    python experiments/confidence_profile.py --cfg 3 --images 64 --threads 2
"""
from __future__ import annotations

import argparse
import math
import random

import torch

import specdec
from drafters.eagle import EagleTreeDrafter
from specdec import Sampling
from specdec.bench.timing import set_threads
from specdec.tree import best_first_nodes, expected_accepted, optimal_shape
from specdec.tree_profile import non_increasing

BINS = 5


class RecordingStar(EagleTreeDrafter):
    """A star tree of `ranks` siblings that records, per step and row, the root's max q and the accepted rank."""

    def __init__(self, head, ranks: int):
        super().__init__(head, shape=[(r,) for r in range(ranks)])
        self.records: list[torch.Tensor] = []

    def _children(self, parent_q, level, tokens, q, u) -> None:
        if level == 1:
            self._confidence = parent_q[:, 0].max(-1).values
            self._running = self.ctx.n_done < self.ctx.num_tokens
        super()._children(parent_q, level, tokens, q, u)

    def observe(self, verdict, target_probs) -> None:
        row = torch.stack([self._confidence, verdict.node.float()], -1)[self._running]
        self.records.append(row.cpu())
        super().observe(verdict, target_probs)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cfg", type=float, default=3.0)
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--ranks", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--draws", type=int, default=300, help="draws of node quintiles for the oracle tree")
    args = ap.parse_args(argv)
    torch.set_grad_enabled(False)
    set_threads(args.threads)
    bundle = specdec.zoo.load()
    drafter = RecordingStar(bundle.eagle_head, args.ranks)
    cond = torch.arange(args.images) % len(bundle.classes)
    specdec.generate(bundle.target, cond, drafter, sampling=Sampling(cfg_scale=args.cfg), seed=args.seed,
                     decode=False)
    records = torch.cat(drafter.records)
    confidence, accepted = records[:, 0], records[:, 1]
    edges = torch.quantile(confidence, torch.linspace(0, 1, BINS + 1))
    print(f"{len(records)} steps, CFG {args.cfg:g}, {args.images} images, star of {args.ranks} siblings")
    print("| max q at the root | steps | A(R) | a[0] | a[1] | a[2] | a[3] |\n|---|---|---|---|---|---|---|")
    profiles = []
    for b in range(BINS):
        inside = (confidence >= edges[b]) & ((confidence < edges[b + 1]) | (b == BINS - 1))
        raw = [(accepted[inside] == r).float().mean().item() for r in range(args.ranks)]
        profiles.append(non_increasing(raw))
        print(f"| {edges[b]:.3f}-{edges[b + 1]:.3f} | {int(inside.sum())} | {sum(raw):.3f} | "
              + " | ".join(f"{a:.3f}" for a in raw[:4]) + " |")
    # the pooled profile as the mean of the quintiles' (smoothed) profiles: the static shape's expected value under
    # independent quintiles, so that the oracle's figure is an upper bound on it draw by draw
    pooled = [sum(p[r] for p in profiles) / BINS for r in range(args.ranks)]
    rng = random.Random(args.seed)
    print("| nodes | static optimal shape, predicted MAL | confidence oracle, predicted MAL |\n|---|---|---|")
    for n in (4, 14, 30, 62):
        shape = optimal_shape(pooled, n)
        static, oracle = [], []
        for _ in range(args.draws):       # both trees valued on the same draws of quintiles (paired)
            quintile: dict[tuple[int, ...], int] = {}

            def profile_at(path):
                return profiles[quintile.setdefault(path, rng.randrange(BINS))]
            static.append(1 + sum(math.prod(profile_at(path[:d])[path[d]] for d in range(len(path)))
                                  for path in shape))
            oracle.append(1 + sum(value for _, value in best_first_nodes(profile_at, n)))
        print(f"| {n} | {sum(static) / len(static):.3f} (expected {1 + expected_accepted(shape, pooled):.3f}) | "
              f"{sum(oracle) / len(oracle):.3f} |")


if __name__ == "__main__":
    main()
