"""What a verified window of head transitions costs: the continuous zoo target's head called over m states per
position in one call (`MARAdapter.head_transition`, what the exact rule's target does each round) against one step
of its plain chain (`head_chain`, per step), at batch 1 with CFG (the 9 tokens of one AR step of K = 16). Medians of
interleaved rounds. A device on which m states cost about one state is where speculating over the chain saves time;
m states costing ~m steps (compute-bound) leave nothing to save.

    python experiments/bench_head_window.py --threads 2
    python experiments/bench_head_window.py --threads 2 --dtype bfloat16
    python experiments/bench_head_window.py --device cuda --dtype bfloat16   # where a window should cost ~one state
"""
from __future__ import annotations

import argparse
import statistics

import torch

from specdec.bench.timing import interleaved_rounds, set_threads
from specdec.devices import use_device
from specdec.zoo import continuous


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--cfg", type=float, default=3.0)
    ap.add_argument("--rounds", type=int, default=100)
    ap.add_argument("--states", default="1,2,3,5,9,17", help="states per position per call")
    ap.add_argument("--dtype", default="float32", help="what the MAR networks compute in (float32, bfloat16)")
    ap.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1")
    args = ap.parse_args(argv)
    torch.set_grad_enabled(False)
    threads = set_threads(args.threads)
    device = use_device(args.device)
    target = continuous.load(device, dtype=args.dtype).target
    g = torch.Generator(device).manual_seed(0)
    state = target.prepare(torch.tensor([3], device=device), args.cfg, generator=g)
    positions = state.order[:, :9]
    z = target.condition(state, positions)
    S, D = target.num_steps, target.token_dim
    x_T = torch.randn(1, 9, D, generator=g, device=device)
    noises = torch.randn(1, 9, S, D, generator=g, device=device)
    windows = [int(m) for m in args.states.split(",")]
    calls = [lambda: target.head_chain(z, x_T, noises, 1.0, args.cfg, record=False)]
    for m in windows:
        x, t = torch.randn(1, 9, m, D, generator=g, device=device), torch.arange(m, device=device)
        calls.append(lambda x=x, t=t: target.head_transition(z, x, t, args.cfg))
    for call in calls:
        call()
    timings, _ = interleaved_rounds(calls, args.rounds)
    step = 1e3 * statistics.median(timings[0].seconds) / S
    print(f"continuous zoo target head ({args.dtype}, {device}), 9 positions, cfg {args.cfg:g}, {threads} threads: "
          f"one chain step {step:.3f} ms")
    for m, t in zip(windows, timings[1:]):
        ms = 1e3 * statistics.median(t.seconds)
        print(f"  {m:2d} states per position in one call: {ms:.3f} ms = {ms / step:.2f} chain steps "
              f"({ms / step / m:.2f} per state)")


if __name__ == "__main__":
    main()
