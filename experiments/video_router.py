"""Block routing (SDVG, arXiv 2604.17397) on the embedded video zoo: speedup against quality retention over tau.

The video target and the distilled video drafter become block generators (`specdec.adapters.video`); the drafter drafts each block (--frames-per-block frames) with its own sampler (draft_cfg 1: it was distilled on the target's guided
law), the zoo feature net's class probability scores each decoded frame (`specdec.scorers.ClassScorer`), and the
router accepts the draft or has the target regenerate the frame from the same uniforms.

tau is calibrated offline as in the paper: quantiles of the drafter's block scores on --calib-clips draft-only clips
(seeds disjoint from the evaluation's) give one fixed tau per target acceptance rate. Every router (min and mean
aggregation) and the random-routing control at the acceptance the scorer reached run on the same --clips seeds,
interleaved clip by clip with the target-only baseline (batch 1, latency). Quality: retention of the routing score
(mean class probability of the final clips / target-only's), and two measures the router does not optimise: the
target's NLL per token of the final clips and the share of frames classified as the clip's class.

    python experiments/video_router.py --out docs/results/video-router          # ~20 min on 2 cores

Writes rows.jsonl (one line per configuration, resumable: finished configurations are skipped) and router.png.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from specdec.adapters.video import TokenBlockGenerator, TokenFrameDecoder  # noqa: E402
from specdec.blocks import draft_only, generate_blocks, score_clip, target_only  # noqa: E402
from specdec.metrics import token_nll  # noqa: E402
from specdec.sampling import Sampling  # noqa: E402
from specdec.scorers import ClassScorer  # noqa: E402
from specdec.zoo import video  # noqa: E402
from verifiers.router import BlockRouter, RandomRouter  # noqa: E402


def setup(cfg: float, frames_per_block: int):
    bundle = video.load()
    target = TokenBlockGenerator(bundle.target, frames_per_block, Sampling(cfg_scale=cfg))
    drafter = TokenBlockGenerator(bundle.drafter_model, frames_per_block, Sampling(cfg_scale=1.0))
    decoder = TokenFrameDecoder(bundle.tokenizer.decode_grid)
    scorer = ClassScorer(bundle.features.net)
    return bundle, target, drafter, decoder, scorer


def quality(bundle, scorer, res, cond) -> dict:
    """Quality of one finished batch of clips."""
    s = score_clip(scorer, res.frames, cond, res.block_frames)                           # [B, F]
    probs = bundle.features.net(torch.nn.functional.interpolate(res.frames.flatten(0, 1), size=(48, 48),
                                                                mode="bilinear", antialias=True))
    top1 = probs.argmax(-1).view(res.frames.shape[:2]) == cond[:, None]
    tokens = res.latents.reshape(res.latents.shape[0], -1)
    return {"score": float(s.mean()), "top1": float(top1.float().mean()),
            "nll": float(token_nll(bundle.target_gpt, tokens, cond).mean())}


def calibrate(bundle, drafter, target, decoder, scorer, args) -> torch.Tensor:
    """Frame scores of the drafter's blocks [n, F_b] on draft-only clips of calibration seeds (block 0 left out:
    the router always gives it to the target)."""
    scores = []
    for i in range(args.calib_clips):
        cond = torch.tensor([i % len(bundle.classes)])
        res = draft_only(drafter, decoder, cond, seed=10_000 + i, noise_from=target)
        s = score_clip(scorer, res.frames, cond, res.block_frames)[0]
        scores.append(s.view(-1, args.frames_per_block)[1:])
    return torch.cat(scores)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "video_router")
    p.add_argument("--clips", type=int, default=40)
    p.add_argument("--calib-clips", type=int, default=40)
    p.add_argument("--cfg", type=float, default=3.0)
    p.add_argument("--frames-per-block", type=int, default=2, help="SDVG: 3 latent frames per block")
    p.add_argument("--rates", default="0.5,0.7,0.8,0.9,0.95", help="target acceptance rates (calibrated tau)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    args.out.mkdir(parents=True, exist_ok=True)
    bundle, target, drafter, decoder, scorer = setup(args.cfg, args.frames_per_block)
    calib = calibrate(bundle, drafter, target, decoder, scorer, args)
    rates = [float(r) for r in args.rates.split(",")]
    block_scores = {"min": calib.min(1).values, "mean": calib.mean(1)}
    configs = {"target only": None, "draft only": "draft"}
    for r in rates:
        for agg in ("min", "mean"):
            tau = float(torch.quantile(block_scores[agg], 1 - r))
            configs[f"sdvg {agg} rate {r:g}"] = BlockRouter(threshold=tau, aggregation=agg)
    print(f"calibration: {len(calib)} drafted blocks, mean frame score {calib.mean():.3f}", flush=True)
    runs = {name: {"wall": [], "q": [], "acc": 0, "drafted": 0} for name in configs}

    def run(name, router, cond, seed):
        t0 = time.perf_counter()
        if router is None:
            res = target_only(target, decoder, cond, seed)
        elif router == "draft":
            res = draft_only(drafter, decoder, cond, seed, noise_from=target)
        else:
            res = generate_blocks(target, drafter, router, scorer, decoder, cond, seed)
        runs[name]["wall"].append(time.perf_counter() - t0)
        runs[name]["q"].append(quality(bundle, scorer, res, cond))
        runs[name]["acc"] += res.counts.accepted
        runs[name]["drafted"] += res.counts.drafted

    def sweep(names: list[str], phase: str) -> None:
        """Clip by clip, every configuration on the same clip (interleaved: load hits all alike)."""
        for i in range(args.clips):
            cond = torch.tensor([i % len(bundle.classes)])
            for name in names:
                run(name, configs[name], cond, i)
            print(f"{phase}: clip {i + 1}/{args.clips}", flush=True)

    run("target only", None, torch.tensor([0]), 0)        # warm-up, discarded
    runs["target only"] = {"wall": [], "q": [], "acc": 0, "drafted": 0}
    sweep(list(configs), "scorer routers")
    controls = []
    for name in [n for n in configs if n.startswith("sdvg")]:   # the control at the acceptance each one reached
        controls.append(f"random at {name}")
        configs[controls[-1]] = RandomRouter(accept_rate=runs[name]["acc"] / max(1, runs[name]["drafted"]))
        runs[controls[-1]] = {"wall": [], "q": [], "acc": 0, "drafted": 0}
    sweep(["target only"] + controls, "random controls")
    base = runs["target only"]
    base_wall = torch.tensor(base["wall"]).median().item() if base["wall"] else float("nan")
    base_score = sum(q["score"] for q in base["q"]) / len(base["q"])
    rows = []
    for name, r in runs.items():
        wall = torch.tensor(r["wall"])
        q = {k: sum(x[k] for x in r["q"]) / len(r["q"]) for k in r["q"][0]}
        rows.append({"config": name, "clips": len(r["wall"]), "acceptance": r["acc"] / max(1, r["drafted"]),
                     "median_s": wall.median().item(), "min_s": wall.min().item(), "max_s": wall.max().item(),
                     "speedup": base_wall / wall.median().item(), "score": q["score"],
                     "retention": q["score"] / base_score, "top1": q["top1"], "nll": q["nll"],
                     "tau": getattr(configs.get(name), "threshold", None), "cfg": args.cfg,
                     "threads": args.threads, "device": "cpu", "batch": 1,
                     "frames_per_block": args.frames_per_block})
    with open(args.out / "rows.jsonl", "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    for row in rows:
        print(f"{row['config']:32s} acc {row['acceptance']:.2f} speedup {row['speedup']:.2f}x "
              f"retention {row['retention']:.3f} top1 {row['top1']:.2f} nll {row['nll']:.3f}")
    plot(rows, args.out / "router.png")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for prefix, marker in (("sdvg min", "o-"), ("sdvg mean", "s-"), ("random at sdvg min", "x--"),
                           ("random at sdvg mean", "+--")):
        pts = sorted((r["speedup"], r["retention"]) for r in rows if r["config"].startswith(prefix))
        if pts:
            ax.plot(*zip(*pts), marker, label=prefix.replace("random at sdvg", "random (rate of"))
    for r in rows:
        if r["config"] in ("target only", "draft only"):
            ax.plot(r["speedup"], r["retention"], "k*", ms=10)
            ax.annotate(r["config"], (r["speedup"], r["retention"]), fontsize=8)
    ax.axhline(0.98, color="grey", lw=0.5, ls=":")
    ax.set_xlabel("speedup vs target only (batch 1, median)")
    ax.set_ylabel("quality retention (class score)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
