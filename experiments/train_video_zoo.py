"""Train the embedded video zoo (specdec.zoo.video): a class-conditional clip target and a distilled drafter.

Stages:
  pool      tokenise --pool training clips (synthetic pans and zooms over the image zoo's photos) with the image
            zoo's VQ tokenizer; cached in --work-dir
  target    video_target: GPT over the raster (frame, row, column), class-conditional with class dropout for CFG
  drafter   video_drafter: >= 5x fewer parameters, distilled online on the pool's clips with soft labels: the
            target's guided law at --distill-cfg at every position (teacher forcing; no sampling needed), so it
            drafts with draft_cfg=1.0 like the image zoo's drafter
  figures   held-out NLL, realism, speed at batch 1 and the drafter's overlap sum min(p, q) on the cards

    python experiments/train_video_zoo.py                          # everything (about 75 min on one thread)
    python experiments/train_video_zoo.py --stages drafter,figures --force

Resumable: each GPT stage checkpoints every --ckpt-every steps in --work-dir, and a rerun with the same arguments
continues; a stage whose card is complete is skipped (--force retrains). Weights and cards go to
specdec/zoo/weights/video_*.{safetensors,json}.
"""
from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "experiments"))

import train_zoo  # noqa: E402
from train_zoo import _config_dict, _finish_card, adamw, card_complete, log, train_loop  # noqa: E402
from specdec import zoo  # noqa: E402
from specdec.adapters import GPTAdapter  # noqa: E402
from specdec.metrics import token_nll  # noqa: E402
from specdec.models.gpt import GPT, GPTConfig  # noqa: E402
from specdec.zoo import video  # noqa: E402
from specdec.zoo.data import CLASS_NAMES  # noqa: E402
from zoo_distill import guided_probs, overlap, realism, speed  # noqa: E402

STAGES = ("pool", "target", "drafter", "figures")
TOKENS = video.FRAMES * (video.FRAME // 4) ** 2
GPT_CONFIGS = {
    "video_target": dict(dim=256, n_layers=6, n_heads=4, max_len=TOKENS + 8),
    "video_drafter": dict(dim=96, n_layers=2, n_heads=4, max_len=TOKENS + 8),
}
GRID = (video.FRAMES, video.FRAME // 4, video.FRAME // 4)


def clip_pool(args, work: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens int16 [N, T], classes [N]) of --pool training clips; cached in `work`, built in resumable chunks."""
    card = zoo.read_card("vq", args.out)
    path = work / f"video_pool_{card['sha256'][:12]}_{args.pool}_{args.seed}.pt"
    if path.is_file():
        return tuple(torch.load(path))
    tok, _ = zoo.load_model("vq", args.out)
    chunk, toks, classes = 256, [], []
    t0 = time.time()
    for i in range(math.ceil(args.pool / chunk)):
        part = work / f"video_pool_part_{card['sha256'][:12]}_{args.seed}_{i}.pt"
        if part.is_file():
            t, c = torch.load(part)
        else:
            frames, c = video.clip_batch("train", chunk, args.seed + 5, i)
            t = video.encode_clips(tok, frames).short()
            torch.save((t, c), part)
        toks.append(t)
        classes.append(c)
        log(f"pool: {(i + 1) * chunk}/{args.pool} clips ({time.time() - t0:.0f}s)")
    pool = (torch.cat(toks)[: args.pool], torch.cat(classes)[: args.pool])
    tmp = path.with_suffix(".tmp")
    torch.save(pool, tmp)
    tmp.rename(path)
    return pool


def heldout_tokens(args) -> tuple[torch.Tensor, torch.Tensor]:
    tok, _ = zoo.load_model("vq", args.out)
    classes = torch.arange(len(CLASS_NAMES)).repeat_interleave(args.eval_per_class)
    frames = video.sample_clips("heldout", classes, torch.Generator().manual_seed(args.seed + 11))
    return video.encode_clips(tok, frames), classes


def adapter(name: str, out: Path) -> GPTAdapter:
    model, _ = zoo.load_model(name, out)
    return GPTAdapter(model, grid=GRID)


def stage_gpt(name: str, args, out: Path, work: Path) -> None:
    tokens, classes = clip_pool(args, work)
    teacher = adapter("video_target", out).model if name == "video_drafter" else None
    torch.manual_seed(args.seed + (7 if name == "video_target" else 8))
    vocab = zoo.read_card("vq", out)["config"]["codebook_size"]
    cfg = GPTConfig(vocab_size=vocab, num_classes=len(CLASS_NAMES), **GPT_CONFIGS[name])
    model = GPT(cfg)
    peak = args.target_lr if teacher is None else args.drafter_lr
    opt = adamw(model, peak)
    bsz = args.batch

    def step_fn(step: int) -> dict[str, float]:
        g = torch.Generator().manual_seed(args.seed * 1_000_003 + 17 + step)
        idx = torch.randint(len(tokens), (bsz,), generator=g)
        t, c = tokens[idx].long(), classes[idx].clone()
        if teacher is None:
            c[torch.rand(bsz, generator=g) < args.class_dropout] = model.null_class   # for CFG at sampling time
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            logits = model.forward_train(t, c)
        if teacher is None:
            loss = F.cross_entropy(logits.float().flatten(0, 1), t.flatten())
        else:   # soft labels: the target's guided law at every position of a real clip
            with torch.no_grad():
                labels = guided_probs(teacher, t, c, args.distill_cfg)
            loss = -(labels * logits.float().log_softmax(-1)).sum(-1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return dict(loss=loss.item())

    steps = args.target_steps if teacher is None else args.drafter_steps
    minutes = args.target_minutes if teacher is None else args.drafter_minutes
    run = train_loop(name, model, opt, None if steps == "auto" else int(steps), minutes, peak, 100, step_fn,
                     work, args.ckpt_every)
    source = f"{args.pool} tokenised training clips"
    if teacher is not None:
        source += f", soft labels: the target's guided law at cfg {args.distill_cfg:g} (draft with draft_cfg=1.0)"
    card = dict(config=_config_dict(cfg), data=dict(_data_card(), pool=source), seed=args.seed, batch=bsz, lr=peak,
                class_dropout=args.class_dropout if teacher is None else 0.0, grid=list(GRID),
                optimizer="AdamW(0.9, 0.95), wd 0.05, warm-up 100 + cosine to 10%, grad clip 1.0",
                precision="bfloat16 autocast, float32 master weights" if args.bf16 else "float32", **run)
    zoo.save_model(model, out, name, card, half=True)
    model, _ = zoo.load_model(name, out)
    ht, hc = heldout_tokens(args)
    metrics = dict(heldout_nll_per_token=round(token_nll(model, ht, hc).mean().item(), 4),
                   uniform_nll_per_token=round(math.log(cfg.vocab_size), 4), heldout_clips=len(ht))
    _finish_card(out, name, metrics)


def stage_figures(args, out: Path, work: Path) -> None:
    """Realism and speed on the target's card, overlap sum min(p, q) on the drafter's (held-out real clips)."""
    import json
    target, drafter = adapter("video_target", out), adapter("video_drafter", out)
    t, c = heldout_tokens(args)
    t, c = t[: args.eval_clips], c[: args.eval_clips]
    figures, overlaps = {}, {}
    for cfg in (1.0, args.distill_cfg):
        p = guided_probs(target.model, t, c, cfg)
        figures[f"cfg{cfg:g}"] = realism(p)
        overlaps[f"cfg{cfg:g}_unguided_drafter"] = overlap(p, guided_probs(drafter.model, t, c, 1.0))
    timing = speed(target, drafter, args.distill_cfg)
    for name, extra in (("video_target", dict(realism=figures, speed_batch1=timing)),
                        ("video_drafter", dict(overlap_sum_min_p_q=overlaps, overlap_clips=len(t)))):
        path = out / f"{name}.json"
        card = json.loads(path.read_text())
        card["metrics"] = {**card.get("metrics", {}), **extra}
        path.write_text(json.dumps(card, indent=2, sort_keys=True) + "\n")
    log(f"figures: realism {figures}, overlap {overlaps}, speed {timing}")


def _data_card() -> dict:
    from dataclasses import asdict
    return asdict(video.VideoDataDescription())


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stages", default=",".join(STAGES))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=ROOT / "specdec" / "zoo" / "weights")
    p.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "specdec_video_zoo_work")
    p.add_argument("--log", type=Path, default=Path(tempfile.gettempdir()) / "train_video_zoo.log")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--force", action="store_true")
    p.add_argument("--ckpt-every", type=int, default=50)
    p.add_argument("--pool", type=int, default=12288)
    p.add_argument("--batch", type=int, default=24)
    p.add_argument("--class-dropout", type=float, default=0.1)
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--target-steps", default="auto")
    p.add_argument("--target-minutes", type=float, default=55)
    p.add_argument("--target-lr", type=float, default=1e-3)
    p.add_argument("--drafter-steps", default="auto")
    p.add_argument("--drafter-minutes", type=float, default=12)
    p.add_argument("--drafter-lr", type=float, default=2e-3)
    p.add_argument("--distill-cfg", type=float, default=3.0)
    p.add_argument("--eval-per-class", type=int, default=20)
    p.add_argument("--eval-clips", type=int, default=64)
    args = p.parse_args(argv)
    stages = train_zoo.start_run(p, args, STAGES)
    log(f"train_video_zoo: stages {stages}, seed {args.seed}")
    names = {"target": "video_target", "drafter": "video_drafter"}
    for stage in STAGES:
        if stage not in stages:
            continue
        if stage == "pool":
            clip_pool(args, args.work_dir)
            continue
        if stage == "figures":
            stage_figures(args, args.out, args.work_dir)
            continue
        name = names[stage]
        if card_complete(args.out, name) and not args.force:
            log(f"{name}: complete card found, skipping (--force to retrain)")
            continue
        if args.force:
            (args.work_dir / f"{name}.ckpt.pt").unlink(missing_ok=True)
        stage_gpt(name, args, args.out, args.work_dir)


if __name__ == "__main__":
    main()
