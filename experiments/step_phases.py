"""Where a decode step's time goes, AR against MC-SJD, with the loop's tensor work eager or compiled.

Wall-clock per step of: the target's forward (its compiled graph), the drafter's proposal, the engine's chain step
after the forward (probabilities, the rule's test, the commit: `specdec.step`) and the rest (the loop's own Python,
rollback, and the per-image prefill spread over the steps). The zoo in bfloat16 with the target compiled with frozen
weights; "eager" runs the engine's step and the Jacobi window eagerly, "compiled" as one graph each
(`generate(..., compiled=True)`, `JacobiDrafter(compile=True)`). Each (method, path) runs the same images, in
interleaved rounds; the figures are medians over rounds.

    python experiments/step_phases.py --threads 2 --cfg 1 --window 16
"""
from __future__ import annotations

import argparse
import collections
import statistics
import time

import torch

import specdec
import specdec.engine
from drafters.jacobi import JacobiDrafter
from specdec import Sampling
from specdec.bench.generators import load_generator
from specdec.bench.timing import set_threads
from specdec.phases import PhaseClock
from specdec.step import chain_step, compiled_chain_step

PHASES = ("forward", "propose", "step", "rest")


class PhaseTimer:
    """Routes each wrapped call's time to a phase of the current round's `specdec.phases.PhaseClock` (`new_round`
    starts an empty one)."""

    def __init__(self):
        self.new_round()

    def new_round(self) -> None:
        self.clock = PhaseClock("cpu")

    def wrap(self, fn, phase: str):
        return lambda *args: self.clock.run(phase, fn, *args)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--cfg", type=float, default=1.0)
    ap.add_argument("--window", type=int, default=16)
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)
    torch.set_grad_enabled(False)
    print(f"threads: {set_threads(args.threads)}")
    bundle = load_generator("zoo", "bfloat16", "freeze", "cpu")
    target, sampling = bundle.target, Sampling(cfg_scale=args.cfg)
    timer = PhaseTimer()
    forward = target.forward
    target.forward = timer.wrap(forward, "forward")
    steps = {False: timer.wrap(chain_step, "step"), True: timer.wrap(compiled_chain_step(), "step")}

    # the engine picks its step function by `compiled` when a generation starts: route both through the timer
    specdec.engine.chain_step = steps[False]
    specdec.engine.compiled_chain_step = lambda: steps[True]

    def run(spec: bool, compiled: bool, seed: int):
        drafter = None
        if spec:
            drafter = JacobiDrafter(args.window, "repeat_vertical", coupling="maximal", compile=compiled)
            drafter.propose = timer.wrap(drafter.propose, "propose")
        return specdec.generate(target, torch.tensor([seed % 4]), drafter=drafter, sampling=sampling, seed=seed,
                                decode=False, compiled=compiled)

    combos = [(spec, compiled) for spec in (False, True) for compiled in (False, True)]
    for combo in combos:                          # warm-up: compiles every graph once
        run(*combo, seed=0)
    per_step = {c: collections.defaultdict(list) for c in combos}
    for r in range(args.rounds):
        for combo in combos:
            timer.new_round()
            t0, n_steps = time.perf_counter(), 0
            for i in range(args.images):
                n_steps += run(*combo, seed=1 + i).stats.steps
            total = time.perf_counter() - t0
            seconds = {phase: timer.clock.seconds(phase) for phase in PHASES[:-1]}
            seconds.update(rest=total - sum(seconds.values()), total=total)
            for phase, s in seconds.items():
                per_step[combo][phase].append(s / n_steps * 1e3)
    print(f"ms per step, CFG {args.cfg}, window {args.window}, median of {args.rounds} rounds of {args.images} "
          f"images (bfloat16, target compiled with frozen weights)")
    print(f"{'method':8} {'loop':9}" + "".join(f"{p:>9}" for p in PHASES + ("total",)))
    for spec, compiled in combos:
        row = per_step[spec, compiled]
        print(f"{'MC-SJD' if spec else 'AR':8} {'compiled' if compiled else 'eager':9}" +
              "".join(f"{statistics.median(row[p]) if row[p] else 0.0:9.3f}" for p in PHASES + ("total",)))


if __name__ == "__main__":
    main()
