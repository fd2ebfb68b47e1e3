"""Train the embedded continuous-token zoo (specdec.zoo.continuous): a KL autoencoder on the zoo's photo crops, a
MAR-style target and a drafter over its latents (Li et al., arXiv 2406.11838), then the cards' figures.

Stages:
  ae       continuous_ae: 48 x 48 crops <-> 12 x 12 x 16 latents (MSE + small KL); the latent scale (tokens with
           unit std, MAR's 0.2325) is fitted on training crops at the end and stored in the config / card
  target   continuous_target: MAR (encoder / decoder 3 + 3 blocks of width 256, DiffLoss head 320 x 3), trained with
           the official recipe (specdec.models.mar.training): random orders, truncated-normal mask ratio >= 0.7,
           eps loss on the masked tokens at random steps of the full 1000-step schedule, diffusion_batch_mul 4,
           class dropout 0.1 to the fake latent, AdamW, gradient clipping, EMA weights shipped
  drafter  continuous_drafter: the same recipe on the same data (NOT distilled), 1 + 1 blocks of width 96 and a
           160 x 1 head: > 5x cheaper per AR step than the target in FLOPs and in measured time at batch 1.
           Data, not distillation: the eps loss's minimiser is the same function for both models (the conditional
           mean of the noise), no target pass is needed per step (so the budget buys ~3x more steps), and the
           stage does not wait for the target (the two can run in parallel processes).
  figures  autoencoder PSNR and latent scale, held-out diffusion loss of both models on the same draws, Frechet
           distance of samples in the zoo's feature space, speed at batch 1 (one AR step: backbone and head ms, and
           multiply-accumulates), written into the cards; a PNG of samples in --work-dir

Both heads are trained on the eps loss only and sample with the schedule's FIXED variance (--variance, recorded on
the cards as head_variance), so target and drafter share sigma_t at every head step, which an exact speculative
rule over Gaussian transitions needs. --vlb trains the official learned-range variance too (then the heads sample
with their own learned variances, and no longer share them).

    python experiments/train_continuous_zoo.py                      # everything (about 70 min on one thread)
    python experiments/train_continuous_zoo.py --stages target --target-minutes 40
    python experiments/train_continuous_zoo.py --stages drafter     # e.g. in a second process, after the ae stage

Resumable like experiments/train_zoo.py: each training stage checkpoints (weights, EMA, optimiser) every
--ckpt-every steps in --work-dir (the MAR stages in a subfolder per autoencoder) and a rerun continues; batch i is
always the same batch; a stage whose card is complete is skipped (--force retrains), unless it was trained on
another autoencoder than the one shipped beside it. Weights and cards: specdec/zoo/weights/continuous_*.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "experiments"))

import train_zoo  # noqa: E402
from train_zoo import _config_dict, _data_card, _finish_card, card_complete, log, train_loop  # noqa: E402
from specdec import zoo  # noqa: E402
from specdec.metrics import feature_fd  # noqa: E402
from specdec.models.mar import MAR, MARConfig, mask_schedule  # noqa: E402
from specdec.models.mar.training import (TrainConfig, ema_rate_at, mar_loss, param_groups,  # noqa: E402
                                         update_ema)
from specdec.plots import image_grid  # noqa: E402
from specdec.zoo import continuous, data  # noqa: E402
from specdec.zoo.continuous import KLAutoencoder, KLConfig, ae_loss, fit_scale, step_macs  # noqa: E402
from specdec.zoo.vq import psnr  # noqa: E402

STAGES = ("ae", "target", "drafter", "figures")
NAMES = {"ae": "continuous_ae", "target": "continuous_target", "drafter": "continuous_drafter"}
# "tiny" is for tests and smoke runs (seconds); "default" is the shipped zoo
AE_SIZES = {"default": dict(channels=(32, 64, 128)), "tiny": dict(channels=(8, 8, 16))}
MAR_SIZES = {
    "default": {
        "continuous_target": dict(encoder_embed_dim=256, encoder_depth=3, encoder_num_heads=4, decoder_embed_dim=256,
                                  decoder_depth=3, decoder_num_heads=4, buffer_size=16, diffloss_w=320, diffloss_d=3),
        "continuous_drafter": dict(encoder_embed_dim=96, encoder_depth=1, encoder_num_heads=4, decoder_embed_dim=96,
                                   decoder_depth=1, decoder_num_heads=4, buffer_size=8, diffloss_w=160, diffloss_d=1),
    },
    "tiny": {
        "continuous_target": dict(encoder_embed_dim=32, encoder_depth=1, encoder_num_heads=2, decoder_embed_dim=32,
                                  decoder_depth=1, decoder_num_heads=2, buffer_size=2, diffloss_w=32, diffloss_d=2),
        "continuous_drafter": dict(encoder_embed_dim=16, encoder_depth=1, encoder_num_heads=2, decoder_embed_dim=16,
                                   decoder_depth=1, decoder_num_heads=2, buffer_size=1, diffloss_w=16, diffloss_d=1),
    },
}


class Trainee(torch.nn.Module):
    """The model being trained and its EMA, in one module so that train_loop's checkpoints hold both."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        self.ema = copy.deepcopy(model).requires_grad_(False)


def _steps(value: str) -> int | None:
    return None if value == "auto" else int(value)


def _set_card(out: Path, name: str, **extra) -> None:
    path = out / f"{name}.json"
    card = json.loads(path.read_text())
    card["metrics"] = {**card.get("metrics", {}), **extra}
    path.write_text(json.dumps(card, indent=2, sort_keys=True) + "\n")


# ---- autoencoder ----------------------------------------------------------------------------------------------------
def stage_ae(args, out: Path, work: Path) -> None:
    torch.manual_seed(args.seed + 41)
    cfg = KLConfig(kl_weight=args.kl_weight, **AE_SIZES[args.sizes])
    model = KLAutoencoder(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=args.ae_lr, betas=(0.9, 0.99))

    def step_fn(step: int) -> dict[str, float]:
        x, _ = data.batch("train", args.ae_batch, args.seed + 42, step)
        loss, parts = ae_loss(model, x, torch.Generator().manual_seed(args.seed * 1_000_003 + 43 + step))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return parts

    run = train_loop("continuous_ae", model, opt, _steps(args.ae_steps), args.ae_minutes, args.ae_lr, 50, step_fn,
                     work, args.ckpt_every)
    # the latent scale from data: posterior samples of training crops -> unit std tokens
    x, _ = data.batch("train", args.scale_images, args.seed + 44, 0)
    scale = fit_scale(model, x, torch.Generator().manual_seed(args.seed + 45))
    final = KLAutoencoder(replace(cfg, scale=scale))
    final.load_state_dict(model.state_dict())
    card = dict(config=_config_dict(final.config), data=_data_card(), seed=args.seed, batch=args.ae_batch,
                lr=args.ae_lr, latent_scale=scale, scale_fit=f"1 / std of posterior samples of {len(x)} train crops",
                loss=f"per-pixel MSE of a posterior sample's reconstruction + {args.kl_weight:g} x KL (per latent "
                     f"element); Adam(0.9, 0.99), warm-up 50 + cosine to 10%", **run)
    zoo.save_model(final, out, "continuous_ae", card)
    _finish_card(out, "continuous_ae", ae_metrics(args, out))


@torch.no_grad()
def ae_metrics(args, out: Path) -> dict:
    """Held-out PSNR (posterior mean decoded) and the std of held-out tokens, on the weights as shipped."""
    model, card = zoo.load_model("continuous_ae", out)
    x, _ = data.fixed_set("heldout", args.eval_per_class, args.seed + 11)
    p = psnr(model.decode_tokens(model.encode_tokens(x)), x)
    tokens = model.encode_tokens(x, torch.Generator().manual_seed(args.seed + 46))
    _, logvar = model.encode(x)
    return dict(heldout_psnr_db=round(p.mean().item(), 2), heldout_psnr_p10_db=round(p.quantile(0.1).item(), 2),
                latent_scale=round(card["config"]["scale"], 5), heldout_token_std=round(tokens.std().item(), 4),
                heldout_posterior_std_scaled=round((0.5 * logvar).exp().mean().item() * card["config"]["scale"], 4),
                heldout_images=len(x))


def encode_batch(ae: KLAutoencoder, mar: MAR, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """images [B, 3, 48, 48] -> MAR tokens [B, L, D]: scaled posterior samples (as the official training caches)."""
    with torch.no_grad():
        return mar.patchify(ae.encode_tokens(images, generator))


# ---- MAR target / drafter ---------------------------------------------------------------------------------------
def mar_config(name: str, args, ae_config: KLConfig) -> MARConfig:
    return MARConfig(img_size=ae_config.image_size, vae_stride=ae_config.stride, vae_embed_dim=ae_config.embed_dim,
                     class_num=len(data.CLASS_NAMES), num_sampling_steps=args.sampling_steps,
                     **MAR_SIZES[args.sizes][name])


def train_config(args) -> TrainConfig:
    return TrainConfig(label_drop=args.class_dropout, diffusion_batch_mul=args.diffusion_batch_mul, vlb=args.vlb,
                       grad_clip=args.grad_clip, ema_rate=args.ema_rate, weight_decay=args.weight_decay)


def head_variance(args) -> str:
    return "learned" if args.vlb else args.variance


def stage_mar(name: str, args, out: Path, work: Path) -> None:
    ae, ae_card = zoo.load_model("continuous_ae", out)
    is_target = name == "continuous_target"
    torch.manual_seed(args.seed + (51 if is_target else 52))
    cfg, tcfg = mar_config(name, args, ae.config), train_config(args)
    trainee = Trainee(MAR(cfg))
    peak = args.target_lr if is_target else args.drafter_lr
    opt = torch.optim.AdamW(param_groups(trainee.model, tcfg.weight_decay), lr=peak, betas=(0.9, 0.95))

    def step_fn(step: int) -> dict[str, float]:
        x, c = data.batch("train", args.mar_batch, args.seed + 53, step)
        g = torch.Generator().manual_seed(args.seed * 1_000_003 + (54 if is_target else 55) + step)
        tokens = encode_batch(ae, trainee.model, x, g)
        # bfloat16 autocast: ~2.5x faster on CPUs with AVX-512 BF16; master weights and the loss stay float32
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            loss, _ = mar_loss(trainee.model, tokens, c, g, tcfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainee.model.parameters(), tcfg.grad_clip)
        opt.step()
        update_ema(trainee.ema, trainee.model, ema_rate_at(step, tcfg.ema_rate))
        return dict(loss=loss.item())

    steps = args.target_steps if is_target else args.drafter_steps
    minutes = args.target_minutes if is_target else args.drafter_minutes
    run = train_loop(name, trainee, opt, _steps(steps), minutes, peak, 100, step_fn, work, args.ckpt_every)
    variance = head_variance(args)
    card = dict(config=_config_dict(cfg), data=_data_card(), seed=args.seed, batch=args.mar_batch, lr=peak,
                training=asdict(tcfg), weights="EMA (decay min(ema_rate, (1 + step) / (10 + step)))",
                autoencoder_sha256=ae_card["sha256"], head_variance=variance,
                head_variance_note=("eps loss only; sampled with the schedule's fixed variance, shared by target and "
                                    "drafter at every head step (exact Gaussian-transition speculation needs it)"
                                    if variance != "learned" else "learned-range variance (VLB); NOT shared "
                                    "between target and drafter"),
                sampling=dict(num_iter=args.num_iter, cfg=args.cfg, cfg_schedule="linear", temperature=1.0,
                              variance=variance, clip_x0=continuous.DEFAULT_CLIP_X0),
                trained_on="autoencoder tokens (scaled posterior samples) of fresh training crops every step"
                           + ("" if is_target else "; the same loss and data as the target, not distilled"),
                optimizer="AdamW(0.9, 0.95), official decay groups, warm-up 100 + cosine to 10%, grad clip "
                          f"{tcfg.grad_clip:g}",
                precision="bfloat16 autocast, float32 master weights" if args.bf16 else "float32", **run)
    zoo.save_model(trainee.ema, out, name, card, half=True)
    model, _ = zoo.load_model(name, out)
    _finish_card(out, name, diffusion_losses({name: model}, ae, args)[name])


@torch.no_grad()
def diffusion_losses(models: dict[str, MAR], ae: KLAutoencoder, args) -> dict[str, dict]:
    """Held-out (and train) diffusion loss of each model on the SAME draws (masks, t, noise; the draw sequence does
    not depend on the architecture), conditional and with every label dropped. -> {name: {...}}."""
    tcfg = train_config(args)
    sets = {split: data.fixed_set(split, args.eval_per_class, args.seed + 11) for split in ("heldout", "train")}
    out = {name: {} for name in models}
    for split, (x, c) in sets.items():
        for drop, tag in ((0.0, ""), (1.0, "_unconditional")):
            for name, model in models.items():
                losses = []
                for r in range(args.eval_rounds):
                    g = torch.Generator().manual_seed(args.seed + 61 + r)
                    tokens = encode_batch(ae, model, x, g)
                    loss, _ = mar_loss(model, tokens, c, g, replace(tcfg, label_drop=drop, vlb=False,
                                                                     diffusion_batch_mul=1))
                    losses.append(loss.item())
                out[name][f"{split}_diffusion_loss{tag}"] = round(statistics.fmean(losses), 5)
    for name in models:
        out[name].update(eval_images=len(sets["heldout"][0]), eval_rounds=args.eval_rounds)
    return out


def mar_work(args) -> Path:
    """The MAR stages' checkpoint folder, one per autoencoder: a checkpoint never resumes on other tokens."""
    if not (args.out / "continuous_ae.json").is_file():
        raise SystemExit(f"the target and drafter stages train on the autoencoder's tokens: no continuous_ae.json "
                         f"in {args.out}; run --stages ae first")
    sha = zoo.read_card("continuous_ae", args.out)["sha256"]
    path = args.work_dir / f"ae-{sha[:12]}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def stale(out: Path, name: str) -> bool:
    """A MAR card trained on another autoencoder than the one in `out` (the ae stage was retrained)."""
    if name == "continuous_ae":
        return False
    trained_on = json.loads((out / f"{name}.json").read_text()).get("autoencoder_sha256")
    if trained_on != zoo.read_card("continuous_ae", out)["sha256"]:
        log(f"{name}: trained on another autoencoder; retraining")
        return True
    return False


# ---- figures ----------------------------------------------------------------------------------------------------
def speed(target, drafter, num_iter: int, cfg: float, rounds: int) -> dict:
    """Batch 1, one whole sample per model in interleaved rounds (the first a warm-up): the median per AR step of the
    wall time, the backbone and the head (MARAdapter.timing), and the schedule-averaged multiply-accumulates."""
    schedule = mask_schedule(target.num_tokens, num_iter)
    active = [(s, n) for s, n in zip(schedule.starts, schedule.counts) if n]
    res = {"target": [], "drafter": []}
    for r in range(rounds + 1):
        for name, adapter in (("target", target), ("drafter", drafter)):
            adapter.timing.reset()
            t0 = time.perf_counter()
            adapter.sample(torch.tensor([r % 10]), num_iter=num_iter, cfg=cfg,
                           generator=torch.Generator().manual_seed(r))
            wall = time.perf_counter() - t0
            if r:
                res[name].append((wall, adapter.timing.backbone_s, adapter.timing.head_s))
    out = dict(batch=1, num_iter=num_iter, sampling_steps=target.num_steps, cfg=cfg, rounds=rounds,
               threads=torch.get_num_threads(), device="cpu")
    for name, adapter in (("target", target), ("drafter", drafter)):
        for i, part in enumerate(("step", "backbone", "head")):
            out[f"{name}_{part}_ms"] = round(1e3 * statistics.median(x[i] for x in res[name]) / len(active), 3)
        macs = [step_macs(adapter.model.cfg, s, n, cfg != 1.0) for s, n in active]
        for part in ("backbone", "head"):
            out[f"{name}_{part}_mmac"] = round(sum(m[part] for m in macs) / len(active) / 1e6, 2)
    for part in ("step", "backbone", "head"):
        out[f"{part}_ms_ratio"] = round(out[f"target_{part}_ms"] / out[f"drafter_{part}_ms"], 2)
    t_macs = out["target_backbone_mmac"] + out["target_head_mmac"]
    out["step_macs_ratio"] = round(t_macs / (out["drafter_backbone_mmac"] + out["drafter_head_mmac"]), 2)
    return out


@torch.no_grad()
def sample_fd(bundle, args, work: Path) -> dict:
    """Frechet distance in the zoo's feature space to held-out crops: target and drafter samples (zoo defaults),
    autoencoder reconstructions and real train crops (references); a PNG of one sample per class."""
    n = args.fd_samples
    if n < 2:
        return {}
    classes = torch.arange(n) % len(bundle.classes)
    real = bundle.heldout_images(n, seed=args.seed + 71, classes=classes)
    fds, grid = {}, {}
    for name, adapter in (("target", bundle.target), ("drafter", bundle.drafter)):
        imgs = []
        for i in range(0, n, args.fd_batch):
            tokens = adapter.sample(classes[i:i + args.fd_batch], num_iter=bundle.num_iter, cfg=bundle.cfg_scale,
                                    generator=torch.Generator().manual_seed(args.seed + 72 + i))
            imgs.append(adapter.decode(tokens))
        imgs = torch.cat(imgs)
        fds[f"fd_{name}_samples"] = round(feature_fd(imgs, real, bundle.features), 3)
        grid[name] = imgs[: len(bundle.classes)]
    other = bundle.heldout_images(n, seed=args.seed + 74, classes=classes)
    train = data.sample_crops("train", classes, torch.Generator().manual_seed(args.seed + 73))
    recon = bundle.autoencoder.decode_tokens(bundle.autoencoder.encode_tokens(other)).clamp(-1, 1)
    for name, imgs in (("autoencoder_reconstructions", recon), ("real_heldout_crops", other),
                       ("real_train_crops", train)):
        fds[f"fd_{name}"] = round(feature_fd(imgs, real, bundle.features), 3)
    fds.update(fd_samples=n, fd_note="vs held-out crops; same n for every entry (FD is biased upwards at small n); "
                                     "real_heldout_crops is the floor at this n")
    path = image_grid([grid["target"], grid["drafter"], real[: len(bundle.classes)]], ["target", "drafter", "held-out"],
                      work / "continuous_zoo_samples.png", columns=list(bundle.classes))
    log(f"figures: samples in {path}")
    return fds


def stage_figures(args, out: Path, work: Path) -> None:
    bundle = continuous.load(directory=out)
    ae = bundle.autoencoder
    models = {"continuous_target": bundle.target.model, "continuous_drafter": bundle.drafter.model}
    losses = diffusion_losses(models, ae, args)
    timing = speed(bundle.target, bundle.drafter, bundle.num_iter, bundle.cfg_scale, args.speed_rounds)
    fds = sample_fd(bundle, args, work)
    ae_figures = ae_metrics(args, out)
    summary = dict(autoencoder=ae_figures, diffusion_loss=losses, speed_batch1=timing, sampling_clip_x0=bundle.clip_x0,
                   **fds)
    _set_card(out, "continuous_ae", figures=ae_figures)
    for name in models:
        _set_card(out, name, figures=summary)
    log(f"figures: {json.dumps(summary)}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stages", default=",".join(STAGES))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=ROOT / "specdec" / "zoo" / "weights")
    p.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "specdec_continuous_zoo_work")
    p.add_argument("--log", type=Path, default=Path(tempfile.gettempdir()) / "train_continuous_zoo.log")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--force", action="store_true", help="retrain stages whose card is complete")
    p.add_argument("--ckpt-every", type=int, default=50)
    p.add_argument("--sizes", choices=sorted(MAR_SIZES), default="default", help="tiny: for tests and smoke runs")
    p.add_argument("--eval-per-class", type=int, default=20)
    p.add_argument("--eval-rounds", type=int, default=4, help="draws of masks / t / noise for held-out losses")
    # autoencoder
    p.add_argument("--ae-steps", default="auto")
    p.add_argument("--ae-minutes", type=float, default=10)
    p.add_argument("--ae-batch", type=int, default=32)
    p.add_argument("--ae-lr", type=float, default=2e-3)
    p.add_argument("--kl-weight", type=float, default=KLConfig.kl_weight)
    p.add_argument("--scale-images", type=int, default=1024, help="train crops the latent scale is fitted on")
    # MAR
    p.add_argument("--mar-batch", type=int, default=32)
    p.add_argument("--sampling-steps", type=int, default=50, help="the head's respaced steps S (of 1000)")
    p.add_argument("--num-iter", type=int, default=continuous.DEFAULT_NUM_ITER, help="zoo default AR steps")
    p.add_argument("--cfg", type=float, default=continuous.DEFAULT_CFG, help="zoo default guidance")
    p.add_argument("--variance", choices=("large", "small"), default=continuous.DEFAULT_VARIANCE,
                   help="the fixed head variance both models sample with")
    p.add_argument("--vlb", action="store_true", help="also train the learned-range variance (official; the heads "
                                                      "then no longer share sigma_t)")
    p.add_argument("--class-dropout", type=float, default=TrainConfig.label_drop)
    p.add_argument("--diffusion-batch-mul", type=int, default=TrainConfig.diffusion_batch_mul)
    p.add_argument("--grad-clip", type=float, default=TrainConfig.grad_clip)
    p.add_argument("--weight-decay", type=float, default=TrainConfig.weight_decay)
    p.add_argument("--ema-rate", type=float, default=0.999, help="official 0.9999 assumes far longer runs")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True,
                   help="bfloat16 autocast for the MAR stages (default on)")
    p.add_argument("--target-steps", default="auto")
    p.add_argument("--target-minutes", type=float, default=40)
    p.add_argument("--target-lr", type=float, default=1e-3)
    p.add_argument("--drafter-steps", default="auto")
    p.add_argument("--drafter-minutes", type=float, default=15)
    p.add_argument("--drafter-lr", type=float, default=2e-3)
    # figures
    p.add_argument("--speed-rounds", type=int, default=5)
    p.add_argument("--fd-samples", type=int, default=200, help="samples per model for the Frechet distance (0: skip)")
    p.add_argument("--fd-batch", type=int, default=50)
    args = p.parse_args(argv)
    stages = train_zoo.start_run(p, args, STAGES)
    log(f"train_continuous_zoo: stages {stages}, sizes {args.sizes}, seed {args.seed}, out {args.out}")
    for stage in STAGES:
        if stage not in stages:
            continue
        if stage == "figures":
            stage_figures(args, args.out, args.work_dir)
            continue
        name = NAMES[stage]
        work = args.work_dir if stage == "ae" else mar_work(args)
        if card_complete(args.out, name) and not args.force and not stale(args.out, name):
            log(f"{name}: complete card found, skipping (--force to retrain)")
            continue
        if args.force:
            (work / f"{name}.ckpt.pt").unlink(missing_ok=True)
        if stage == "ae":
            stage_ae(args, args.out, work)
        else:
            stage_mar(name, args, args.out, work)


if __name__ == "__main__":
    main()
