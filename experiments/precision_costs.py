"""What the zoo's decode-step costs look like per compute dtype, at batch 1 (or --batch): the target's one-token step
(CFG rows included), a verification of 5 and of 16 tokens over that step, one drafter call (the distilled draft model,
unguided) and one EAGLE draft token over the step. Raw forwards on a half-full cache, the dtypes measured in
alternating passes (float32, bfloat16, float32, ...), medians over passes.

On CPUs with AVX512-BF16 a bfloat16 matrix product with 10 rows costs about what one row costs, while float32 costs
in proportion to the rows: the ratio a speculative step pays for its verification.

    python experiments/precision_costs.py --threads 2 --out docs/results/precision-costs.json
    python experiments/precision_costs.py --threads 2 --compile freeze --out docs/results/precision-costs-freeze.json

--compile runs the target's decode step compiled (specdec.compiled.TARGET_COMPILE; the drafters stay eager);
--device cuda measures on a GPU (every call timed with a clock that waits for the GPU's queued work).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from pathlib import Path

import torch

import specdec
from bench_drafter_step import eagle_draft_state          # experiments/, the script's own folder
from drafters.model import draft_token
from specdec import Sampling
from specdec.bench.timing import set_threads, step_costs, synced_clock
from specdec.compiled import TARGET_COMPILE, compile_adapter
from specdec.devices import use_device
from specdec.precision import DTYPES


def eagle_token_s(bundle, cfg: float, rounds: int, cond: torch.Tensor) -> float:
    """Median seconds of one EAGLE draft token (head call, q, the draw) for the rows of cond on a half-full head
    cache."""
    model, state, sampling = eagle_draft_state(bundle, cfg, cond)
    B, device = len(cond), bundle.target.device
    half = torch.full((B,), bundle.target.num_tokens // 2, device=device)
    feed, u = torch.zeros(B, 1, dtype=torch.long, device=device), torch.full((B,), 0.5, device=device)
    times = []
    for i in range(rounds + 5):
        state.cache.set_lengths(half)
        t0 = synced_clock()
        draft_token(model, state, feed, u, sampling, None)
        if i >= 5:
            times.append(synced_clock() - t0)
    return statistics.median(times)


def measure(bundle, cfg: float, rounds: int, batch: int) -> dict[str, float]:
    cond = (torch.arange(batch) % 4).to(bundle.target.device)
    t_step, t_verify5 = step_costs(bundle.target, cond, Sampling(cfg_scale=cfg), 5, rounds)
    _, t_verify16 = step_costs(bundle.target, cond, Sampling(cfg_scale=cfg), 16, rounds)
    d_step, _ = step_costs(bundle.drafter_model, cond, Sampling(), 2, rounds)
    return {"target_step_ms": 1e3 * t_step, "verify5_over_step": t_verify5 / t_step,
            "verify16_over_step": t_verify16 / t_step, "drafter_call_over_step": d_step / t_step,
            "eagle_token_over_step": eagle_token_s(bundle, cfg, rounds, cond) / t_step}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--cfg", type=float, default=3.0)
    ap.add_argument("--passes", type=int, default=3)
    ap.add_argument("--batch", type=int, default=1, help="images per call")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--out", default="")
    ap.add_argument("--compile", default="off", choices=tuple(TARGET_COMPILE))
    ap.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1")
    args = ap.parse_args(argv)
    device = use_device(args.device)
    torch.set_grad_enabled(False)
    threads = set_threads(args.threads)
    names = [d for d in args.dtypes.split(",") if d]
    bundles = {d: specdec.zoo.load(device, dtype=d) for d in names if d in DTYPES}
    if args.compile != "off":
        bundles = {d: dataclasses.replace(b, target=compile_adapter(b.target, *TARGET_COMPILE[args.compile]))
                   for d, b in bundles.items()}
    passes: dict[str, list[dict]] = {d: [] for d in bundles}
    for p in range(args.passes):
        for d, bundle in bundles.items():
            passes[d].append(measure(bundle, args.cfg, args.rounds, args.batch))
            print(f"pass {p + 1}/{args.passes} {d}: " + ", ".join(f"{k} {v:.3f}" for k, v in passes[d][-1].items()),
                  flush=True)
    result = {"cfg": args.cfg, "batch": args.batch, "threads": threads, "torch": torch.__version__,
              "compile": args.compile, "device": str(device),
              "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
              "cpu_bf16": bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()),
              "date": time.strftime("%Y-%m-%d"),
              "dtypes": {d: {k: round(statistics.median(x[k] for x in runs), 4) for k in runs[0]}
                         for d, runs in passes.items()}}
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
