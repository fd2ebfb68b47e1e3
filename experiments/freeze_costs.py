"""The zoo target's raw forward eager, compiled, and compiled with frozen weights (`compile_adapter(..., freeze=True)`:
weights folded into the graph as constants and pre-packed for the CPU's matrix kernels), at batch 1: one token (an AR
step) and a verification of --tokens tokens. One process, the three variants timed in interleaved rounds on a cache
that is refilled to the same length before every call (the refill is not timed); medians over rounds.

    python experiments/freeze_costs.py --threads 2 --cfg 1
    python experiments/freeze_costs.py --threads 2 --cfg 3 --tokens 12
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import specdec
from specdec import Sampling
from specdec.bench.timing import set_threads
from specdec.compiled import compile_adapter


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--cfg", type=float, default=1.0)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--calls", type=int, default=100, help="timed calls per variant, size and round")
    args = ap.parse_args(argv)
    torch.set_grad_enabled(False)
    threads = set_threads(args.threads)
    bundle = specdec.zoo.load("cpu", dtype=args.dtype)
    variants = {"eager": bundle.target, "compiled": compile_adapter(bundle.target),
                "frozen": compile_adapter(bundle.target, freeze=True)}
    half = bundle.target.num_tokens // 2
    states = {}
    for name, target in variants.items():
        state, _ = target.start(torch.tensor([1]), Sampling(cfg_scale=args.cfg), bundle.target.num_tokens + 16)
        target.forward(state, torch.zeros(1, half, dtype=torch.long))
        states[name] = (state, state.cache.lengths.clone())
    sizes = (1, args.tokens)
    medians: dict[tuple[str, int], list[float]] = {}
    for r in range(args.rounds + 1):                      # round 0 warms up (and compiles)
        for n in sizes:
            feed = torch.zeros(1, n, dtype=torch.long)
            for name, target in variants.items():
                state, length = states[name]
                times = []
                for _ in range(args.calls if r else 5):
                    state.cache.set_lengths(length)
                    t0 = time.perf_counter()
                    target.forward(state, feed)
                    times.append(time.perf_counter() - t0)
                if r:
                    medians.setdefault((name, n), []).append(1e3 * statistics.median(times))
    print(f"zoo target, {args.dtype}, batch 1, CFG {args.cfg:g}, {threads} threads: ms per forward, median of "
          f"{args.rounds} rounds (min-max)")
    for name in variants:
        cells = []
        for n in sizes:
            m = medians[name, n]
            cells.append(f"{n:>2} tokens {statistics.median(m):.3f} ({min(m):.2f}-{max(m):.2f})")
        ratio = statistics.median(medians[name, args.tokens]) / statistics.median(medians[name, 1])
        print(f"{name:9} " + "   ".join(cells) + f"   verify / step {ratio:.2f}")


if __name__ == "__main__":
    main()
