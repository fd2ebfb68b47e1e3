"""The KL-16 VAE MAR ships (Li et al., arXiv 2406.11838; LDM's KL autoencoder, Rombach et al., arXiv 2112.10752),
written for specdec. Parameter names and shapes follow the public LTH14/mar code (models/vae.py, `AutoencoderKL`),
so the released kl16.ckpt loads as is: encoder.*, decoder.*, quant_conv, post_quant_conv.

MAR's tokens are latents times `VAEConfig.scale` (0.2325): `decode_tokens` divides before decoding, as the official
evaluation does (`vae.decode(tokens / 0.2325)`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from specdec.models.llamagen.vq import AttnBlock   # the same LDM attention block and key names
from specdec.models.mar.config import VAEConfig


def _norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, c, eps=1e-6)


class ResnetBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, plus a 1x1 `nin_shortcut` when the width changes (no time embedding)."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.norm1, self.conv1 = _norm(c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2, self.conv2 = _norm(c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        if c_in != c_out:
            self.nin_shortcut = nn.Conv2d(c_in, c_out, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class Downsample(nn.Module):
    """Pad right/bottom by one, 3x3 conv with stride 2 (key conv)."""

    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest x2, 3x3 conv (key conv)."""

    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _level(blocks: list[nn.Module], attn: list[nn.Module], resample: nn.Module | None, name: str) -> nn.Module:
    level = nn.Module()
    level.block = nn.ModuleList(blocks)
    level.attn = nn.ModuleList(attn)
    if resample is not None:
        setattr(level, name, resample)
    return level


def _middle(c: int) -> nn.Module:
    mid = nn.Module()
    mid.block_1, mid.attn_1, mid.block_2 = ResnetBlock(c, c), AttnBlock(c), ResnetBlock(c, c)
    return mid


def _run_level(level: nn.Module, h: Tensor) -> Tensor:
    for i, block in enumerate(level.block):
        h = block(h)
        if len(level.attn):
            h = level.attn[i](h)
    return h


def _run_middle(mid: nn.Module, h: Tensor) -> Tensor:
    return mid.block_2(mid.attn_1(mid.block_1(h)))


class Encoder(nn.Module):
    """pixels [B, 3, H, W] -> moments [B, 2 embed_dim, H/stride, W/stride] (before quant_conv)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, mult = cfg.ch, (1,) + tuple(cfg.ch_mult)
        self.conv_in = nn.Conv2d(cfg.in_channels, ch, 3, padding=1)
        self.down = nn.ModuleList()
        res = cfg.resolution
        for i in range(len(cfg.ch_mult)):
            c_in, c_out = ch * mult[i], ch * mult[i + 1]
            blocks = [ResnetBlock(c_in if j == 0 else c_out, c_out) for j in range(cfg.num_res_blocks)]
            attn = [AttnBlock(c_out) for _ in blocks] if res in cfg.encoder_attn_resolutions else []
            last = i == len(cfg.ch_mult) - 1
            self.down.append(_level(blocks, attn, None if last else Downsample(c_out), "downsample"))
            res = res if last else res // 2
        c = ch * cfg.ch_mult[-1]
        self.mid = _middle(c)
        self.norm_out = _norm(c)
        self.conv_out = nn.Conv2d(c, 2 * cfg.embed_dim, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = _run_level(level, h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = _run_middle(self.mid, h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """latents [B, embed_dim, h, w] (after post_quant_conv) -> pixels [B, 3, h stride, w stride]."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, n = cfg.ch, len(cfg.ch_mult)
        c = ch * cfg.ch_mult[-1]
        self.conv_in = nn.Conv2d(cfg.embed_dim, c, 3, padding=1)
        self.mid = _middle(c)
        levels = []
        res = cfg.resolution // cfg.stride
        for i in reversed(range(n)):            # built coarse to fine; stored fine to coarse (up[i] = level i)
            c_out = ch * cfg.ch_mult[i]
            blocks = [ResnetBlock(c if j == 0 else c_out, c_out) for j in range(cfg.num_res_blocks + 1)]
            attn = [AttnBlock(c_out) for _ in blocks] if res in cfg.decoder_attn_resolutions else []
            levels.insert(0, _level(blocks, attn, Upsample(c_out) if i else None, "upsample"))
            c, res = c_out, res * 2 if i else res
        self.up = nn.ModuleList(levels)
        self.norm_out = _norm(c)
        self.conv_out = nn.Conv2d(c, cfg.out_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = _run_middle(self.mid, self.conv_in(z))
        for level in reversed(self.up):
            h = _run_level(level, h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class KLVAE(nn.Module):
    """The official `AutoencoderKL` (use_variational=True) for inference."""

    def __init__(self, cfg: VAEConfig = VAEConfig()):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.embed_dim, 2 * cfg.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.embed_dim, 1)

    def encode(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """images [B, 3, H, W] in [-1, 1] -> posterior (mean, logvar) [B, embed_dim, H/stride, W/stride] each
        (logvar clamped to [-30, 20], as upstream)."""
        mean, logvar = self.quant_conv(self.encoder(images)).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def decode(self, latents: Tensor) -> Tensor:
        """latents [B, embed_dim, h, w] -> pixels [B, 3, h stride, w stride] (unclamped, about [-1, 1])."""
        return self.decoder(self.post_quant_conv(latents))

    def encode_tokens(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """images -> MAR-scaled latents [B, embed_dim, h, w]: the posterior mean, or a posterior sample drawn with
        `generator` when one is given (official training caches samples), times `scale`."""
        mean, logvar = self.encode(images)
        if generator is not None:
            noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
            mean = mean + torch.exp(0.5 * logvar) * noise
        return mean * self.cfg.scale

    def decode_tokens(self, latents: Tensor) -> Tensor:
        """MAR-scaled latents [B, embed_dim, h, w] -> pixels [B, 3, H, W]: decode(latents / scale)."""
        return self.decode(latents / self.cfg.scale)
