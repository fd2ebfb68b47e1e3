"""Train the embedded default zoo: VQ tokenizer, feature net, target GPT, drafter GPT, then the cards' figures.

The drafter is distilled: it is trained on the target's own samples at --distill-cfg (the demo's CFG scale), and
drafts unguided (`ModelDrafter(bundle.drafter_model, draft_cfg=1.0)`). The last stage ("figures") writes the
target's realism (share of positions with top-1 p < 5 %, entropy) and speed (step, verification and drafter call
at batch 1) and the drafter's overlap sum min(p, q) into the cards (experiments/zoo_distill.py).

    python experiments/train_zoo.py                                  # everything, defaults
    python experiments/train_zoo.py --stages target --target-minutes 40
    python experiments/train_zoo.py --stages drafter                 # e.g. in a second process, in parallel

Each stage writes specdec/zoo/weights/<name>.safetensors + <name>.json (config, data, steps, seed, wall time,
held-out metrics, sha256). A stage whose card is complete is skipped (use --force to retrain it). Training
checkpoints every --ckpt-every steps into --work-dir; a killed run continues from there with the same arguments,
and batch i is always the same batch (seeded per step), so a resumed run matches an uninterrupted one.

Steps: a number, or "auto" (target/drafter): time the first steps and fit as many as the stage's minutes allow; the
count is then fixed in the checkpoint and recorded on the card, so passing it explicitly reproduces the run.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from specdec import zoo  # noqa: E402
from specdec.adapters import GPTAdapter  # noqa: E402
from specdec.metrics import token_nll  # noqa: E402
from specdec.models.gpt import GPT, GPTConfig  # noqa: E402
from specdec.zoo import data  # noqa: E402
from specdec.zoo.features import FeatureConfig, FeatureNet  # noqa: E402
from specdec.zoo.vq import VQConfig, VQTokenizer, psnr  # noqa: E402
from zoo_distill import guided_probs, overlap, realism, speed, target_samples, teacher_set  # noqa: E402

STAGES = ("vq", "features", "target", "drafter", "figures")
# Zoo v2. The target is sized so that, at batch 1 on 2 CPU cores, a step is dominated by compute rather than
# per-call overhead (17 M parameters: ~6 ms a step, verifying 5 tokens ~1.2x one step), as real generators are on
# a GPU; the drafter's raw step is ~6 % of it. 4096 codes of dim 8 (LlamaGen: 16384 of dim 8) give the target the
# near-synonymous tokens that make real visual AR models flat.
GPT_CONFIGS = {
    "target": dict(dim=384, n_layers=8, n_heads=6, max_len=160),
    "drafter": dict(dim=128, n_layers=3, n_heads=4, max_len=160),
}
LOG: Path | None = None


def log(msg: str) -> None:
    line = f"[{time.strftime('%H:%M:%S')}] {msg}"
    print(line, flush=True)
    if LOG is not None:
        with open(LOG, "a") as f:
            f.write(line + "\n")


def lr_at(step: int, total: int, peak: float, warmup: int, floor: float = 0.1) -> float:
    """Linear warm-up, then cosine from `peak` down to `floor * peak` at `total`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t)))


def card_complete(out: Path, name: str) -> bool:
    path = out / f"{name}.json"
    return path.is_file() and json.loads(path.read_text()).get("complete", False)


# ---- the generic resumable loop -----------------------------------------------------------------------------------
def train_loop(name: str, model: torch.nn.Module, opt: torch.optim.Optimizer, steps: int | None,
               minutes: float, peak_lr: float, warmup: int, step_fn: Callable[[int], dict[str, float]],
               work: Path, ckpt_every: int) -> dict:
    """Run step_fn(step) -> losses for steps [resume point, total). steps None = fit into `minutes` (timed on the
    first steps). Stops early (and says so) past 1.25x the budget. Returns {steps, wall_s, total, complete}."""
    ckpt = work / f"{name}.ckpt.pt"
    step, elapsed, total = 0, 0.0, steps
    if ckpt.is_file():
        st = torch.load(ckpt, weights_only=False)
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["opt"])
        step, elapsed, total = st["step"], st["elapsed"], st["total"]
        torch.set_rng_state(st["rng"])
        log(f"{name}: resumed at step {step}/{total} ({elapsed:.0f} s so far)")
    model.train()
    t_start, times = time.time() - elapsed, []
    while total is None or step < total:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, total or 10 ** 9, peak_lr, warmup)
        t0 = time.time()
        losses = step_fn(step)
        times.append(time.time() - t0)
        step += 1
        if total is None and step == 25:
            per_step = sorted(times[5:])[len(times[5:]) // 2]
            total = max(warmup + 50, int(minutes * 60 / per_step))
            log(f"{name}: {per_step:.2f} s/step -> {total} steps in {minutes} min")
        if step % 10 == 0 or step == total:
            desc = " ".join(f"{k}={v:.4f}" for k, v in losses.items())
            log(f"{name} step {step}/{total} {desc} lr={opt.param_groups[0]['lr']:.2e} "
                f"{times[-1]:.2f}s/step t={time.time() - t_start:.0f}s")
        over = time.time() - t_start > 1.25 * minutes * 60
        if step % ckpt_every == 0 or step == total or over:
            torch.save(dict(model=model.state_dict(), opt=opt.state_dict(), step=step, total=total,
                            elapsed=time.time() - t_start, rng=torch.get_rng_state()), ckpt)
        if over and step != total:
            log(f"{name}: time budget exceeded at step {step}/{total}; stopping (rerun to continue)")
            break
    model.eval()
    return dict(steps=step, total_steps=total, wall_s=round(time.time() - t_start, 1), complete=step == total)


def adamw(model: torch.nn.Module, lr: float) -> torch.optim.AdamW:
    """The zoo GPTs' optimiser: AdamW(0.9, 0.95), weight decay 0.05 on matrices only (not norms, biases)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([dict(params=decay, weight_decay=0.05), dict(params=no_decay, weight_decay=0.0)],
                             lr=lr, betas=(0.9, 0.95))


# ---- stages -----------------------------------------------------------------------------------------------------------
def stage_vq(args, out: Path, work: Path) -> None:
    torch.manual_seed(args.seed)
    cfg = VQConfig(codebook_size=args.vq_codes)
    model = VQTokenizer(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=args.vq_lr, betas=(0.9, 0.99))
    restarts = [0]

    def step_fn(step: int) -> dict[str, float]:
        x, _ = data.batch("train", args.vq_batch, args.seed + 1, step)
        recon, commit, _ = model(x)
        mse = F.mse_loss(recon, x)
        opt.zero_grad(set_to_none=True)
        (mse + commit).backward()
        opt.step()
        # restarts only in the first 85% so the last steps settle with a fixed codebook
        if step % 20 == 19 and step < 0.85 * args.vq_steps:
            restarts[0] += model.restart_dead_codes(model.latents_for_restart(x))
        return dict(mse=mse.item(), commit=commit.item(), used=float((model.cluster_size > 0.5).sum()))

    run = train_loop("vq", model, opt, args.vq_steps, args.vq_minutes, args.vq_lr, 50, step_fn, work,
                     args.ckpt_every)
    card = dict(config=_config_dict(cfg), data=_data_card(), seed=args.seed, batch=args.vq_batch, lr=args.vq_lr,
                loss="MSE + 0.25 commitment; EMA l2-normalised codebook with dead-code restarts", **run)
    zoo.save_model(model, out, "vq", card)
    model, card = zoo.load_model("vq", out)
    x, _ = data.fixed_set("heldout", args.eval_per_class, args.seed + 11)
    with torch.no_grad():
        ids = model.encode(x)
        p = psnr(model.decode(ids), x)
    counts = torch.bincount(ids.flatten(), minlength=cfg.codebook_size).float()
    probs = counts / counts.sum()
    metrics = dict(heldout_psnr_db=round(p.mean().item(), 2), heldout_psnr_p10_db=round(p.quantile(0.1).item(), 2),
                   heldout_codes_used=int((counts > 0).sum()),
                   heldout_code_perplexity=round(math.exp(-(probs[probs > 0] * probs[probs > 0].log()).sum()), 1),
                   heldout_images=len(x))
    _finish_card(out, "vq", metrics)


def stage_features(args, out: Path, work: Path) -> None:
    torch.manual_seed(args.seed + 2)
    cfg = FeatureConfig(num_classes=len(data.CLASS_NAMES))
    model = FeatureNet(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=args.features_lr, weight_decay=0.01)

    def step_fn(step: int) -> dict[str, float]:
        x, c = data.batch("train", args.features_batch, args.seed + 3, step)
        loss = F.cross_entropy(model(x), c)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return dict(ce=loss.item())

    run = train_loop("features", model, opt, args.features_steps, args.features_minutes, args.features_lr, 30,
                     step_fn, work, args.ckpt_every)
    card = dict(config=_config_dict(cfg), data=_data_card(), seed=args.seed, batch=args.features_batch,
                lr=args.features_lr, loss="cross-entropy over the photo classes", **run)
    zoo.save_model(model, out, "features", card)
    model, _ = zoo.load_model("features", out)
    x, c = data.fixed_set("heldout", args.eval_per_class, args.seed + 11)
    with torch.no_grad():
        acc = (model(x).argmax(-1) == c).float().mean().item()
    _finish_card(out, "features", dict(heldout_accuracy=round(acc, 4), heldout_images=len(x),
                                       chance=round(1 / len(data.CLASS_NAMES), 4)))


def token_pool(args, out: Path, work: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Pre-tokenised training crops from the shipped VQ: (tokens int16 [N, 144], classes [N]); cached in work."""
    card = zoo.read_card("vq", out)
    path = work / f"pool_{card['sha256'][:12]}_{args.pool}_{args.seed}.pt"
    if path.is_file():
        return tuple(torch.load(path))
    tok, _ = zoo.load_model("vq", out)
    toks, classes, chunk = [], [], 256
    t0 = time.time()
    for i in range(math.ceil(args.pool / chunk)):
        x, c = data.batch("train", chunk, args.seed + 5, i)
        toks.append(tok.encode(x).flatten(1).short())
        classes.append(c)
        if i % 20 == 0:
            log(f"pool: tokenised {(i + 1) * chunk}/{args.pool} crops ({time.time() - t0:.0f}s)")
    pool = (torch.cat(toks)[: args.pool], torch.cat(classes)[: args.pool])
    tmp = path.with_suffix(".tmp")
    torch.save(pool, tmp)
    tmp.rename(path)   # atomic: a parallel process never reads a half-written pool
    return pool


def heldout_tokens(args, out: Path) -> tuple[torch.Tensor, torch.Tensor]:
    tok, _ = zoo.load_model("vq", out)
    x, c = data.fixed_set("heldout", args.eval_per_class, args.seed + 11)
    return tok.encode(x).flatten(1), c


def zoo_adapter(name: str, out: Path) -> GPTAdapter:
    model, _ = zoo.load_model(name, out)
    return GPTAdapter(model, grid=tuple(zoo.read_card("vq", out)["config"]["image_size"] // 4 for _ in range(2)))


def distill_set(args, out: Path, work: Path, cfg: float, n: int, seed: int):
    """(tokens [n, T], classes [n]): the target's samples at cfg, cached in chunks in `work`."""
    return target_samples(zoo_adapter("target", out), n, cfg, args.distill_batch, seed, len(data.CLASS_NAMES),
                          work, log)


def stage_gpt(name: str, args, out: Path, work: Path) -> None:
    soft = None
    if name == "target":
        tokens, classes = token_pool(args, out, work)
        source = f"{args.pool} pre-tokenised training crops"
    else:
        tokens, classes = distill_set(args, out, work, args.distill_cfg, args.distill_samples, args.seed + 21)
        source = (f"{args.distill_samples} samples of the target at cfg {args.distill_cfg:g} (distillation; draft "
                  f"with draft_cfg=1.0)")
        if args.drafter_labels == "soft":   # the target's guided law at every position, top-k renormalised
            _, top_p, top_i = teacher_set(zoo_adapter("target", out).model, tokens, classes, args.distill_cfg,
                                          args.distill_topk, args.distill_batch, work, log)
            soft = (top_p, top_i)
            source += f", soft labels: the target's guided law, top {args.distill_topk}"
    torch.manual_seed(args.seed + (7 if name == "target" else 8))
    vocab = zoo.read_card("vq", out)["config"]["codebook_size"]
    cfg = GPTConfig(vocab_size=vocab, num_classes=len(data.CLASS_NAMES), **GPT_CONFIGS[name])
    model = GPT(cfg)
    peak = args.target_lr if name == "target" else args.drafter_lr
    opt = adamw(model, peak)
    bsz = args.gpt_batch

    def step_fn(step: int) -> dict[str, float]:
        g = torch.Generator().manual_seed(args.seed * 1_000_003 + 17 + step)
        idx = torch.randint(len(tokens), (bsz,), generator=g)
        t, c = tokens[idx].long(), classes[idx].clone()
        if name == "target" or soft is None:        # soft labels are the guided law: no unconditional rows
            c[torch.rand(bsz, generator=g) < args.class_dropout] = model.null_class   # for CFG at sampling time
        # bfloat16 autocast: 2-2.5x faster on CPUs with AVX-512 BF16, master weights and the loss stay float32
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            logits = model.forward_train(t, c)
        if name == "drafter" and soft is not None:
            labels = soft[0][idx].float()
            labels = labels / labels.sum(-1, keepdim=True)
            loss = -(labels * logits.float().log_softmax(-1).gather(-1, soft[1][idx].long())).sum(-1).mean()
        else:
            loss = F.cross_entropy(logits.float().flatten(0, 1), t.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return dict(nll=loss.item())

    steps = getattr(args, f"{name}_steps")
    run = train_loop(name, model, opt, None if steps == "auto" else int(steps), getattr(args, f"{name}_minutes"),
                     peak, 100, step_fn, work, args.ckpt_every)
    card = dict(config=_config_dict(cfg), data=dict(_data_card(), pool=source),
                seed=args.seed, batch=bsz, lr=peak, class_dropout=args.class_dropout,
                optimizer="AdamW(0.9, 0.95), wd 0.05, warm-up 100 + cosine to 10%, grad clip 1.0",
                precision="bfloat16 autocast, float32 master weights" if args.bf16 else "float32", **run)
    zoo.save_model(model, out, name, card, half=True)
    model, _ = zoo.load_model(name, out)
    ht, hc = heldout_tokens(args, out)
    train_idx = torch.arange(0, len(tokens), max(1, len(tokens) // len(ht)))[: len(ht)]
    metrics = dict(heldout_nll_per_token=round(token_nll(model, ht, hc).mean().item(), 4),
                   train_nll_per_token=round(token_nll(model, tokens[train_idx].long(),
                                                       classes[train_idx]).mean().item(), 4),
                   uniform_nll_per_token=round(math.log(cfg.vocab_size), 4),
                   heldout_nll_unconditional=round(token_nll(model, ht, torch.full_like(hc, model.null_class))
                                                   .mean().item(), 4),
                   heldout_images=len(ht))
    _finish_card(out, name, metrics)


def stage_figures(args, out: Path, work: Path) -> None:
    """Realism and speed on the target's card, overlap sum min(p, q) on the drafter's (held-out target samples)."""
    target, drafter = zoo_adapter("target", out), zoo_adapter("drafter", out)
    figures, overlaps = {}, {}
    for cfg in (1.0, args.distill_cfg):
        t, c = distill_set(args, out, work, cfg, args.eval_samples, args.seed + 31)
        p = guided_probs(target.model, t.long(), c, cfg)
        figures[f"cfg{cfg:g}"] = realism(p)
        overlaps[f"cfg{cfg:g}_unguided_drafter"] = overlap(p, guided_probs(drafter.model, t.long(), c, 1.0))
        overlaps[f"cfg{cfg:g}_guided_drafter"] = overlap(p, guided_probs(drafter.model, t.long(), c, cfg))
    timing = speed(target, drafter, args.distill_cfg)
    for name, extra in (("target", dict(realism=figures, speed_batch1=timing, realism_samples=args.eval_samples)),
                        ("drafter", dict(overlap_sum_min_p_q=overlaps, overlap_samples=args.eval_samples))):
        path = out / f"{name}.json"
        card = json.loads(path.read_text())
        card["metrics"] = {**card.get("metrics", {}), **extra}
        path.write_text(json.dumps(card, indent=2, sort_keys=True) + "\n")
    log(f"figures: realism {figures}, overlap {overlaps}, speed {timing}")


# ---- cards -----------------------------------------------------------------------------------------------------------
def _config_dict(cfg) -> dict:
    from dataclasses import asdict
    return asdict(cfg)


def _data_card() -> dict:
    from dataclasses import asdict
    return asdict(data.DataDescription())


def _finish_card(out: Path, name: str, metrics: dict) -> None:
    """Add held-out metrics (measured on the weights as shipped, after any float16 rounding) to the card."""
    path = out / f"{name}.json"
    card = json.loads(path.read_text())
    card["metrics"] = metrics
    card["environment"] = dict(torch=torch.__version__, threads=torch.get_num_threads(), device="cpu")
    path.write_text(json.dumps(card, indent=2, sort_keys=True) + "\n")
    log(f"{name}: done, {card['steps']} steps, {card['wall_s']} s, {card['params']} params, metrics {metrics}")


def start_run(p: argparse.ArgumentParser, args, stages_known: tuple[str, ...]) -> list[str]:
    """What every zoo training script does after parsing: log file, threads, the stages asked for (checked against
    stages_known, a parser error otherwise), the work folder. -> the stages, in the order given."""
    global LOG
    LOG = args.log
    torch.set_num_threads(args.threads)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    bad = [s for s in stages if s not in stages_known]
    if bad:
        p.error(f"unknown stages {bad}; valid: {','.join(stages_known)}")
    args.work_dir.mkdir(parents=True, exist_ok=True)
    return stages


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stages", default=",".join(STAGES))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=ROOT / "specdec" / "zoo" / "weights")
    p.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "specdec_zoo_work")
    p.add_argument("--log", type=Path, default=Path(tempfile.gettempdir()) / "train_zoo.log")
    # 1 thread: on a shared 2-core machine, 2 OpenMP threads stall on each other (measured 20x slower steps)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--force", action="store_true", help="retrain stages whose card is complete")
    p.add_argument("--ckpt-every", type=int, default=50)
    p.add_argument("--eval-per-class", type=int, default=50)
    p.add_argument("--vq-codes", type=int, default=4096)
    p.add_argument("--vq-steps", type=int, default=1200)
    p.add_argument("--vq-minutes", type=float, default=15)
    p.add_argument("--vq-batch", type=int, default=32)
    p.add_argument("--vq-lr", type=float, default=2e-3)
    p.add_argument("--features-steps", type=int, default=600)
    p.add_argument("--features-minutes", type=float, default=4)
    p.add_argument("--features-batch", type=int, default=64)
    p.add_argument("--features-lr", type=float, default=2e-3)
    p.add_argument("--pool", type=int, default=24000)
    p.add_argument("--gpt-batch", type=int, default=32)
    p.add_argument("--class-dropout", type=float, default=0.1)
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True,
                   help="bfloat16 autocast for the GPT stages (default on)")
    p.add_argument("--target-steps", default="auto")
    p.add_argument("--target-minutes", type=float, default=90)
    p.add_argument("--target-lr", type=float, default=1e-3)
    p.add_argument("--distill-cfg", type=float, default=3.0, help="CFG scale of the drafter's training samples")
    p.add_argument("--distill-samples", type=int, default=6144)
    p.add_argument("--distill-batch", type=int, default=64)
    p.add_argument("--eval-samples", type=int, default=256, help="held-out target samples for the card figures")
    p.add_argument("--drafter-steps", default="auto")
    p.add_argument("--drafter-minutes", type=float, default=10)
    p.add_argument("--drafter-lr", type=float, default=2e-3)
    p.add_argument("--drafter-labels", choices=("soft", "samples"), default="soft",
                   help="soft: the target's guided law at every position (top --distill-topk); samples: its tokens")
    p.add_argument("--distill-topk", type=int, default=128)
    args = p.parse_args(argv)
    stages = start_run(p, args, STAGES)
    log(f"train_zoo: stages {stages}, seed {args.seed}, out {args.out}, work {args.work_dir}")
    for stage in STAGES:
        if stage not in stages:
            continue
        if card_complete(args.out, stage) and not args.force:
            log(f"{stage}: complete card found, skipping (--force to retrain)")
            continue
        if args.force:
            (args.work_dir / f"{stage}.ckpt.pt").unlink(missing_ok=True)
        if stage == "vq":
            stage_vq(args, args.out, args.work_dir)
        elif stage == "features":
            stage_features(args, args.out, args.work_dir)
        elif stage == "figures":
            stage_figures(args, args.out, args.work_dir)
        else:
            stage_gpt(stage, args, args.out, args.work_dir)
    if "vq" in stages and "target" not in stages and "drafter" not in stages:
        token_pool(args, args.out, args.work_dir)   # ready for parallel target / drafter processes


if __name__ == "__main__":
    main()
