"""Training MAR (Li et al., "Autoregressive Image Generation without Vector Quantization", arXiv 2406.11838): the
official recipe of LTH14/mar (`MAR.forward`, `DiffLoss.forward`, engine_mar.py) as small free functions over the
inference model of `specdec.models.mar`, which is left untouched.

One step (`mar_loss`), B images of L tokens of dim D, n masked tokens per image:
1. A uniform random order per image; a mask ratio r ~ N(1, 0.25) truncated to [mask_ratio_min, 1] (ONE draw per
   batch, as upstream), so every image masks the same n = ceil(L r) tokens' worth: the first n of its order.
2. Class dropout: with probability label_drop an image's class embedding is replaced by `fake_latent`, the
   unconditional embedding classifier-free guidance samples with.
3. The backbone sees the buffer and the VISIBLE tokens only (`MAR.condition`) and returns z [B, n, C] at the masked
   positions; targets are the masked tokens, detached (upstream: `gt_latents = x.clone().detach()`).
4. The DiffLoss training loss on the masked tokens only, each repeated diffusion_batch_mul times: t uniform over the
   FULL training schedule (diffusion_steps cosine steps, not the respaced sampler's), x_t = sqrt(abar_t) x_0 +
   sqrt(1 - abar_t) eps, loss = mean over D of (eps - eps_hat(x_t, t, z))^2. Upstream evaluates the head on every
   token and weights the masked ones by 1 (and the rest by 0); evaluating the masked ones only is the same mean.
5. Optional (vlb=True, upstream's default): the learned-range variance v is trained by the variational bound with
   the mean frozen (IDDPM's L_hybrid, Nichol & Dhariwal arXiv 2102.09672: KL of the true posterior to the model's
   Gaussian in bits, the discretised decoder NLL at t = 0). Off (the default here): the v half of the head's output
   is never trained and the sampler uses the schedule's FIXED variance (`variance="large"` or "small" in
   `MARAdapter`), so two heads trained this way share sigma_t at every step -- what an exact speculative rule over
   Gaussian transitions needs (equal covariances).
Around the step: AdamW with the official weight-decay groups (`param_groups`), gradient clipping, and an EMA of the
weights (`update_ema`; upstream rate 0.9999 over hundreds of epochs, `ema_rate_at` warms it up for short runs).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import Tensor, nn

from specdec.models.mar.backbone import MAR
from specdec.models.mar.diffloss import DiffLoss, respaced_schedule
from specdec.models.mar.sampling import random_order


@dataclass(frozen=True)
class TrainConfig:
    """The official training knobs (LTH14/mar main_mar.py / models/mar.py defaults), one place for all of them.

    mask_ratio_*: the truncated normal of the mask ratio; label_drop: class dropout for CFG; diffusion_batch_mul:
    repeats of every masked token in the head's loss (fresh t and noise each); vlb: train the learned variance;
    grad_clip: max gradient norm; ema_rate: EMA decay; weight_decay: AdamW's, off for 1-D weights, biases and the head.
    """

    mask_ratio_min: float = 0.7
    mask_ratio_mean: float = 1.0
    mask_ratio_std: float = 0.25
    label_drop: float = 0.1
    diffusion_batch_mul: int = 4
    vlb: bool = False
    grad_clip: float = 3.0
    ema_rate: float = 0.9999
    weight_decay: float = 0.02

    def __post_init__(self):
        if not 0.0 < self.mask_ratio_min <= 1.0:
            raise ValueError(f"mask_ratio_min must be in (0, 1], got {self.mask_ratio_min}")
        if self.mask_ratio_std <= 0:
            raise ValueError(f"mask_ratio_std must be > 0, got {self.mask_ratio_std}")
        if not 0.0 <= self.label_drop <= 1.0:
            raise ValueError(f"label_drop is a probability in [0, 1], got {self.label_drop}")
        if self.diffusion_batch_mul < 1:
            raise ValueError(f"diffusion_batch_mul must be >= 1, got {self.diffusion_batch_mul}")
        if self.grad_clip <= 0 or not 0.0 <= self.ema_rate < 1.0 or self.weight_decay < 0:
            raise ValueError("need grad_clip > 0, ema_rate in [0, 1) and weight_decay >= 0")


@dataclass(frozen=True)
class MaskedBatch:
    """What one step drew: positions LongTensor [B, n] (the masked tokens, whose loss is taken), visible BoolTensor
    [B, L] (True = the backbone sees it; exactly the complement of positions), dropped BoolTensor [B] (class ->
    fake_latent), ratio (the mask ratio drawn)."""

    positions: Tensor
    visible: Tensor
    dropped: Tensor
    ratio: float


# ---- masking and class dropout ----------------------------------------------------------------------------------
def mask_ratio(generator: torch.Generator, cfg: TrainConfig = TrainConfig()) -> float:
    """One draw of N(mean, std) truncated to [mask_ratio_min, 1] by the inverse CDF (scipy's truncnorm upstream)."""
    normal = torch.distributions.Normal(0.0, 1.0)
    lo = normal.cdf(torch.tensor((cfg.mask_ratio_min - cfg.mask_ratio_mean) / cfg.mask_ratio_std))
    hi = normal.cdf(torch.tensor((1.0 - cfg.mask_ratio_mean) / cfg.mask_ratio_std))
    u = lo + (hi - lo) * torch.rand((), generator=generator, device=generator.device).cpu()
    ratio = cfg.mask_ratio_mean + cfg.mask_ratio_std * normal.icdf(u.clamp(1e-7, 1 - 1e-7))
    return float(ratio.clamp(cfg.mask_ratio_min, 1.0))


def random_mask(batch: int, seq_len: int, ratio: float, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """n = ceil(L ratio) (at least 1) masked positions per image, the first n of a uniform random order
    -> (positions LongTensor [B, n], visible BoolTensor [B, L])."""
    n = min(seq_len, max(1, math.ceil(seq_len * ratio)))
    order = random_order(batch, seq_len, generator)
    positions = order[:, :n]
    visible = torch.ones(batch, seq_len, dtype=torch.bool, device=order.device).scatter(1, positions, False)
    return positions, visible


def drop_labels(batch: int, prob: float, generator: torch.Generator) -> Tensor:
    """BoolTensor [B]: which images train unconditionally (class embedding -> fake_latent)."""
    return torch.rand(batch, generator=generator, device=generator.device) < prob


def train_class_rows(model: MAR, labels: Tensor, dropped: Tensor) -> Tensor:
    """labels [B], dropped BoolTensor [B] -> the buffer's class rows [B, E]: class_emb, or fake_latent where dropped
    (upstream mixes the two with a 0/1 weight; `where` gives the same values and gradients)."""
    return torch.where(dropped[:, None].to(labels.device), model.fake_latent, model.class_emb(labels))


# ---- the diffusion loss ----------------------------------------------------------------------------------------
@lru_cache(maxsize=4)
def _schedule(diffusion_steps: int) -> dict[str, Tensor]:
    consts = respaced_schedule(diffusion_steps, diffusion_steps)     # every step kept: the training process
    consts["sqrt_abar"] = consts["recip"].reciprocal()
    consts["sqrt_1m_abar"] = consts["recipm1"] * consts["sqrt_abar"]
    return {k: v.float() for k, v in consts.items()}


def training_constants(diffusion_steps: int, device=None) -> dict[str, Tensor]:
    """The full cosine schedule's constants, float32 [T] each (t = 0 .. T-1): sqrt_abar, sqrt_1m_abar, coef1, coef2,
    recip, recipm1, log_betas, posterior_logvar (clipped at t = 0 as IDDPM)."""
    return {k: v.to(device) for k, v in _schedule(diffusion_steps).items()}


def q_sample(x0: Tensor, t: Tensor, noise: Tensor, consts: dict[str, Tensor]) -> Tensor:
    """x0, noise [N, D], t LongTensor [N] -> x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise [N, D]."""
    return consts["sqrt_abar"][t, None] * x0 + consts["sqrt_1m_abar"][t, None] * noise


def _normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _discretized_nll(x: Tensor, mean: Tensor, log_scale: Tensor) -> Tensor:
    """-log P(x) of a Gaussian discretised to 256 bins on [-1, 1] (IDDPM's decoder term, tanh CDF approximation)."""
    cdf = lambda v: 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (v + 0.044715 * v ** 3)))
    inv = torch.exp(-log_scale)
    plus, minus = cdf(inv * (x - mean + 1 / 255)), cdf(inv * (x - mean - 1 / 255))
    log = lambda v: v.clamp_min(1e-12).log()
    return -torch.where(x < -0.999, log(plus), torch.where(x > 0.999, log(1 - minus), log(plus - minus)))


def vlb_bits(x0: Tensor, x_t: Tensor, t: Tensor, eps_hat: Tensor, v: Tensor, consts: dict[str, Tensor]) -> Tensor:
    """The learned-range variance's variational term, per row [N], in bits, with the mean frozen (eps_hat detached):
    KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) for t > 0, the discretised decoder NLL at t = 0. All [N, D]."""
    at = lambda name: consts[name][t, None]
    true_mean = at("coef1") * x0 + at("coef2") * x_t
    x0_hat = at("recip") * x_t - at("recipm1") * eps_hat.detach()
    mean = at("coef1") * x0_hat + at("coef2") * x_t
    frac = (v + 1) / 2
    logvar = frac * at("log_betas") + (1 - frac) * at("posterior_logvar")
    kl = _normal_kl(true_mean, at("posterior_logvar").expand_as(x0), mean, logvar).mean(1)
    nll = _discretized_nll(x0, mean, 0.5 * logvar).mean(1)
    return torch.where(t == 0, nll, kl) / math.log(2.0)


def head_loss(head: DiffLoss, x0: Tensor, z: Tensor, generator: torch.Generator, diffusion_steps: int = 1000,
              vlb: bool = False) -> Tensor:
    """The DiffLoss training loss per row: x0 [N, D] target tokens, z [N, C] backbone conditions -> [N] (eps MSE
    averaged over D, plus the VLB term in bits when vlb). t ~ U{0 .. T-1} and eps ~ N(0, I) from `generator`; the
    head sees the original timestep t (the training process keeps every step)."""
    if x0.dim() != 2 or z.dim() != 2 or x0.shape[0] != z.shape[0] or x0.shape[1] != head.token_dim:
        raise ValueError(f"x0 must be [N, {head.token_dim}] and z [N, C] with the same N; got {tuple(x0.shape)} "
                         f"and {tuple(z.shape)}")
    consts = training_constants(diffusion_steps, x0.device)
    x0 = x0.float()
    t = torch.randint(diffusion_steps, (x0.shape[0],), generator=generator, device=generator.device).to(x0.device)
    noise = torch.randn(x0.shape, generator=generator, device=generator.device).to(x0.device)
    x_t = q_sample(x0, t, noise, consts)
    out = head.net(x_t, t.float(), z).float()
    eps_hat, v = out[:, : head.token_dim], out[:, head.token_dim:]
    loss = (noise - eps_hat).pow(2).mean(1)
    return loss + vlb_bits(x0, x_t, t, eps_hat, v, consts) if vlb else loss


def mar_loss(model: MAR, tokens: Tensor, labels: Tensor, generator: torch.Generator,
             cfg: TrainConfig = TrainConfig()) -> tuple[Tensor, MaskedBatch]:
    """One training loss: tokens [B, L, D] (scaled latents), labels LongTensor [B] -> (scalar loss: the mean of the
    head's per-row loss over the B * n * diffusion_batch_mul masked rows, MaskedBatch). Every random draw comes
    from `generator` (order, ratio, dropout, t, noise), so a step is reproducible from its generator's seed."""
    b, length, d = tokens.shape
    if (length, d) != (model.cfg.seq_len, model.cfg.token_dim):
        raise ValueError(f"tokens must be [B, {model.cfg.seq_len}, {model.cfg.token_dim}], got {tuple(tokens.shape)}")
    if labels.shape != (b,):
        raise ValueError(f"labels must be [B={b}], got {tuple(labels.shape)}")
    ratio = mask_ratio(generator, cfg)
    positions, visible = random_mask(b, length, ratio, generator)
    positions, visible = positions.to(tokens.device), visible.to(tokens.device)
    dropped = drop_labels(b, cfg.label_drop, generator).to(tokens.device)
    z = model.condition(tokens, visible, train_class_rows(model, labels, dropped), positions)   # [B, n, C]
    x0 = tokens.detach().gather(1, positions[..., None].expand(-1, -1, d))                       # [B, n, D]
    mul = cfg.diffusion_batch_mul
    rows = head_loss(model.diffloss, x0.reshape(-1, d).repeat(mul, 1), z.reshape(-1, z.shape[-1]).repeat(mul, 1),
                     generator, model.cfg.diffusion_steps, cfg.vlb)
    return rows.mean(), MaskedBatch(positions, visible, dropped, ratio)


# ---- around the step -------------------------------------------------------------------------------------------
def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups as upstream (util/misc.add_weight_decay): no decay on 1-D weights, biases and the DiffLoss head."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.dim() == 1 or name.endswith(".bias") or "diffloss" in name
        (no_decay if skip else decay).append(p)
    return [dict(params=no_decay, weight_decay=0.0), dict(params=decay, weight_decay=weight_decay)]


def ema_rate_at(step: int, rate: float) -> float:
    """The EMA decay at optimiser step `step`: min(rate, (1 + step) / (10 + step)), so that a short run's average is
    not dominated by its random initialisation (upstream runs long enough to use `rate` from the start)."""
    return min(rate, (1.0 + step) / (10.0 + step))


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, rate: float) -> None:
    """ema <- rate * ema + (1 - rate) * model, parameter by parameter (buffers copied)."""
    for e, p in zip(ema.parameters(), model.parameters()):
        e.mul_(rate).add_(p.detach(), alpha=1.0 - rate)
    for e, b in zip(ema.buffers(), model.buffers()):
        e.copy_(b)
