"""One draft token through `ModelDrafter`'s step, eager against compiled (`torch.compile` of the model call, q and
the draw), at batch 1: the zoo's drafter with a cache half full, or (--drafter eagle) the zoo's EAGLE head after one
image (it drafts unguided). Median of interleaved rounds.

    python experiments/bench_drafter_step.py --threads 1 --cfg 3
    python experiments/bench_drafter_step.py --threads 2 --drafter eagle
    python experiments/bench_drafter_step.py --device cuda       # timed with a clock that waits for the GPU
    python experiments/bench_drafter_step.py --threads 2 --dtype bfloat16 --freeze   # weights frozen in the graph
"""
from __future__ import annotations

import argparse
import statistics

import torch

import specdec
from drafters.model import draft_token
from specdec import Sampling
from specdec.bench.timing import interleaved_rounds, set_threads
from specdec.compiled import compile_step
from specdec.devices import use_device


def eagle_draft_state(bundle, cfg: float, cond: torch.Tensor):
    """The zoo's EAGLE head bound to its target after one generation of cond at guidance cfg (its true features
    written, as mid-decode) -> (head adapter, its state, its sampling): what `draft_token` is called with."""
    from drafters.eagle import eagle
    drafter = eagle(bundle.eagle_head, k=4)
    specdec.generate(bundle.target, cond, drafter=drafter, sampling=Sampling(cfg_scale=cfg), seed=0, decode=False)
    return drafter.model, drafter.state, drafter.sampling


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--cfg", type=float, default=3.0)
    ap.add_argument("--rounds", type=int, default=300)
    ap.add_argument("--drafter", choices=("model", "eagle"), default="model")
    ap.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1")
    ap.add_argument("--dtype", default="float32", help="the zoo's compute dtype: float32 or bfloat16")
    ap.add_argument("--freeze", action="store_true", help="compile with the weights frozen (compile_step(freeze=True))")
    args = ap.parse_args(argv)
    torch.set_grad_enabled(False)
    threads = set_threads(args.threads)
    device = use_device(args.device)
    bundle = specdec.zoo.load(device, dtype=args.dtype)
    cond = torch.tensor([1], device=device)
    if args.drafter == "eagle":
        model, state, sampling = eagle_draft_state(bundle, args.cfg, cond)
        state.cache.set_lengths(torch.tensor([60], device=device))
    else:
        model, sampling = bundle.drafter_model, Sampling(cfg_scale=args.cfg)
        state, _ = model.start(cond, sampling, 150)
        model.forward(state, torch.zeros(1, 60, dtype=torch.long, device=device))
    base = state.cache.lengths.clone()
    feed, u = torch.zeros(1, 1, dtype=torch.long, device=device), torch.full((1,), 0.5, device=device)
    compiled = compile_step(draft_token, freeze=args.freeze)

    def step(fn):
        def run():
            state.cache.set_lengths(base)
            fn(model, state, feed, u, sampling, None)
        return run
    for _ in range(20):                                  # warm-up (and compilation)
        step(draft_token)()
        step(compiled)()
    timings, _ = interleaved_rounds([step(draft_token), step(compiled)], args.rounds)
    eager, fast = (1e3 * statistics.median(t.seconds) for t in timings)
    print(f"zoo {args.drafter} drafter on {device}, {args.dtype}, batch 1, cfg {args.cfg:g}, {threads} threads: draft "
          f"token step {eager:.3f} ms eager, {fast:.3f} ms compiled{' with frozen weights' if args.freeze else ''} "
          f"({eager / fast:.2f}x)")


if __name__ == "__main__":
    main()
