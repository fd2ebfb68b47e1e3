"""`specdec demo --video`: plain AR against token-level speculative decoding on the embedded video zoo
(`specdec.zoo.video`), through the same loop and measurements as the image demo (`specdec.demo.measure_methods`).

Rows: SJD (uncoupled Jacobi), MC-SJD (maximally coupled Jacobi, random and previous-frame inits), the
previous-frame lookup, and the exact rule over the distilled video drafter: all lossless, the speedups are free of
quality cost by construction, and NLL / FD are reported as the check. Without --quick, one more row: SDVG block
routing (arXiv 2604.17397; LOSSY, unbounded) of the video drafter's two-frame blocks by the zoo feature net's class
probability, tau calibrated on draft-only clips of other seeds for ROUTER_RATE acceptance, timed against the same
block loop with the target alone, with its quality retention (class score, routed / target only).
Writes into the output folder:
  clips.gif       the clips of every method (rows) for the same seeds (columns), frame by frame
  acceptance.png  per-frame share of tokens committed from drafts, one row per speculative method
  table.json      the rows (same fields as the image demo's table, plus `lossless`) and the setup
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from specdec.bench.methods import MODEL_DRAFTER, Method, available
from specdec.bench.results import format_table
from specdec.demo import DemoError, demo_device, demo_dtype, measure_methods, prepare
from specdec.plots import _plt, to_uint8
from specdec.sampling import Sampling

VIDEO_METHODS = (
    Method("AR"),
    Method("exact + jacobi w=16", "jacobi", {"window": 16, "init": "random"}),
    Method("exact + jacobi w=16 maximal", "jacobi", {"window": 16, "init": "random", "coupling": "maximal"}),
    Method("exact + jacobi w=16 previous_frame maximal", "jacobi",
           {"window": 16, "init": "previous_frame", "coupling": "maximal"}),
    Method("exact + lookup prev_frame k=4", "lookup", {"k": 4, "sources": ("prev_frame",)}),
    Method("exact + model k=4", "model", MODEL_DRAFTER),
)
QUICK_VIDEO_METHODS = (VIDEO_METHODS[0], VIDEO_METHODS[2], VIDEO_METHODS[5])
ROUTER_RATE = 0.8            # the router row's calibrated acceptance of drafted blocks
ROUTER_FRAMES = 2            # frames per block
GIF_SCALE = 3
GIF_FRAME_MS = 250


@torch.no_grad()
def run_video_demo(out: str | Path = "specdec-demo-video", quick: bool = False, classes: list | None = None,
                   per_class: int = 0, seed: int = 0, temperature: float = 1.0, top_k: int = 0, cfg: float = 3.0,
                   repeats: int = 0, fd_real: int = 256, threads: int = 0, dtype: str | None = None,
                   device: str | None = None) -> int:
    """Run the video demo and print its table; arguments as `specdec.demo.run_demo`. Raises DemoError."""
    import specdec.zoo
    from specdec.zoo import video

    out, threads = prepare(out, threads)
    dtype, device = demo_dtype(dtype), demo_device(device)
    if not video.available():
        raise DemoError("the video zoo's weights are not installed: reinstall specdec or train them with "
                        "`python experiments/train_video_zoo.py`")
    try:
        bundle = video.load(device, dtype=dtype)
    except specdec.zoo.ZooError as e:
        raise DemoError(str(e)) from e
    try:
        class_ids = [bundle.class_id(n) for n in classes or bundle.classes[: (2 if quick else 4)]]
    except ValueError as e:
        raise DemoError(str(e)) from e
    per_class = per_class or 2
    cond = torch.tensor([c for c in class_ids for _ in range(per_class)])
    sampling = Sampling(temperature=temperature, top_k=top_k, cfg_scale=cfg)
    rounds = repeats or (2 if quick else 3)
    methods = available(QUICK_VIDEO_METHODS if quick else VIDEO_METHODS, bundle)
    print(f"specdec demo --video: {len(methods)} methods, latency of 1 clip ({rounds} interleaved rounds) and "
          f"{len(cond)} clips of {bundle.frames} frames, {sampling}, seed {seed}, {threads} threads", flush=True)
    rows, strips, maps, t_step, fd_used = measure_methods(bundle, methods, cond, sampling, seed, rounds, fd_real)
    for r in rows:
        r["lossless"] = r["rule"] == "exact"
    if not quick:
        row, routed = router_row(bundle, cond, sampling, seed, rounds)
        rows.append(row)
        strips.append(routed)
        maps.append(torch.zeros_like(maps[0]))        # blocks, not tokens: no per-token acceptance
    frames = bundle.frames
    per_frame = [m.reshape(frames, -1).mean(1) for m in maps]                                    # [F] each
    meta = {"sampling": vars(sampling), "seed": seed, "classes": [bundle.classes[i] for i in class_ids],
            "device": str(bundle.target.device), "dtype": dtype, "threads": threads, "latency_batch": 1,
            "throughput_batch": len(cond), "target_step_s": t_step, "frames": frames, "grid": bundle.target.grid,
            "fd_real_images": fd_used, "fd_metric": "Frechet distance of clip features (mean over frames of the "
                                                    "zoo feature net's features)"}
    (out / "table.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    write_gif([video.strip_to_frames(s, frames) for s in strips], out / "clips.gif")
    frame_heatmap(per_frame[1:len(methods)], [r["method"] for r in rows[1:len(methods)]], out / "acceptance.png")
    print(format_table(rows))
    print(f"\nwrote {out / 'clips.gif'}, {out / 'acceptance.png'}, {out / 'table.json'}")
    return 0


def router_row(bundle, cond: torch.Tensor, sampling: Sampling, seed: int, rounds: int, calib_clips: int = 8):
    """The SDVG row: (a table row, the routed clips as filmstrips [B, 3, H, F * W])."""
    from specdec import metrics
    from specdec.adapters.video import TokenBlockGenerator, TokenFrameDecoder
    from specdec.bench.timing import interleaved_rounds
    from specdec.blocks import draft_only, generate_blocks, score_clip, target_only, quality_retention
    from specdec.scorers import ClassScorer
    from specdec.zoo.video import filmstrip
    from verifiers.router import BlockRouter

    target = TokenBlockGenerator(bundle.target, ROUTER_FRAMES, sampling)
    drafter = TokenBlockGenerator(bundle.drafter_model, ROUTER_FRAMES,
                                  Sampling(temperature=sampling.temperature, top_k=sampling.top_k, cfg_scale=1.0))
    decoder = TokenFrameDecoder(bundle.tokenizer.decode_grid)
    scorer = ClassScorer(bundle.features.net)
    calib = []
    for i in range(calib_clips):          # seeds the measured clips never use
        c = cond[i % len(cond)][None]
        res = draft_only(drafter, decoder, c, seed=100_000 + i, noise_from=target)
        calib.append(score_clip(scorer, res.frames, c, res.block_frames)[0].view(-1, ROUTER_FRAMES)[1:].mean(1))
    tau = float(torch.quantile(torch.cat(calib), 1 - ROUTER_RATE))
    router = BlockRouter(threshold=tau, aggregation="mean")
    alone = lambda c: lambda: target_only(target, decoder, c, seed)                       # noqa: E731
    routed = lambda c: lambda: generate_blocks(target, drafter, router, scorer, decoder, c, seed)   # noqa: E731
    alone(cond[:1])(), routed(cond[:1])()                                                # warm-up
    (t_alone, t_routed), _ = interleaved_rounds([alone(cond[:1]), routed(cond[:1])], rounds)
    base, res = alone(cond)(), routed(cond)()
    retention = quality_retention(score_clip(scorer, res.frames, cond, res.block_frames),
                                  score_clip(scorer, base.frames, cond, base.block_frames))
    tokens = res.latents.reshape(len(cond), -1)
    per_block = tokens.shape[1] // (res.accepted.shape[1])
    row = {"method": f"sdvg mean tau@{ROUTER_RATE:g} + video drafter", "drafter": "video drafter (blocks)",
           "rule": "sdvg", "k": ROUTER_FRAMES, "mean_accepted_length": None,
           "acceptance_rate": res.counts.acceptance_rate,
           "target_forwards_per_image": res.counts.target_computed * per_block / len(cond),
           "latency_s": t_routed.as_dict(), "speedup": t_alone.median / t_routed.median, "speedup_bound": None,
           "reliability": None, "throughput_images_per_s": None, "throughput_speedup": None, "feature_fd": None,
           "nll": float(metrics.token_nll(bundle.target_gpt, tokens, cond).mean()), "images": len(cond),
           "rounds": rounds, "lossless": False, "quality_retention": retention, "tau": tau,
           "baseline": "the block loop with the target alone (same seeds)"}
    return row, filmstrip(res.frames)


def write_gif(clips: list[torch.Tensor], path: Path) -> Path:
    """clips: one [B, F, 3, H, W] tensor in [-1, 1] per method -> an animated GIF, methods as rows, clips as
    columns, upscaled GIF_SCALE times (nearest), one GIF frame per clip frame."""
    from PIL import Image

    B, Fr, _, H, W = clips[0].shape
    gap = 2
    frames = []
    for f in range(Fr):
        canvas = torch.full((len(clips) * (H + gap), B * (W + gap), 3), 255, dtype=torch.uint8)
        for i, clip in enumerate(clips):
            pics = to_uint8(clip[:, f].cpu())                                     # [B, H, W, 3]
            for b in range(B):
                canvas[i * (H + gap): i * (H + gap) + H, b * (W + gap): b * (W + gap) + W] = pics[b]
        img = Image.fromarray(canvas.numpy())
        frames.append(img.resize((img.width * GIF_SCALE, img.height * GIF_SCALE), Image.NEAREST))
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=GIF_FRAME_MS, loop=0)
    return path


def frame_heatmap(per_frame: list[torch.Tensor], labels: list[str], path: Path) -> Path:
    """per_frame: [F] share of tokens committed from drafts, per method -> a methods x frames heatmap."""
    plt = _plt()
    data = torch.stack(per_frame).numpy() if per_frame else torch.zeros(1, 1).numpy()
    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * data.shape[1], 0.8 + 0.45 * data.shape[0]))
    im = ax.imshow(data, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    for (i, j), v in np.ndenumerate(data):
        ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="white" if v < 0.6 else "black")
    ax.set_xticks(range(data.shape[1]), [str(f) for f in range(data.shape[1])])
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.set_xlabel("frame")
    ax.set_title("share of tokens committed from drafts, per frame")
    fig.colorbar(im, ax=ax, fraction=0.03)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
