"""A small VQ tokenizer: 48 x 48 RGB crops <-> 12 x 12 grids of ids from a 512-entry codebook.

Conv encoder (two stride-2 convs: 4x downsampling), vector quantiser, conv decoder. The quantiser follows the
"factorised, l2-normalised codes" recipe of ViT-VQGAN (Yu et al., 2022, arXiv:2110.04627): latents are projected to
a low dimension (`code_dim`) and both latents and codes are l2-normalised before the nearest-neighbour lookup, which
keeps most codes in use. Codes are updated by exponential moving averages (van den Oord et al., 2017, appendix) and
codes that stop being used are restarted on random encoder outputs (dead-code restarts), so nearly all 512 codes
carry information. Gradients reach the encoder through the straight-through estimator plus a commitment loss.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class VQConfig:
    codebook_size: int = 512
    code_dim: int = 8
    channels: tuple[int, int, int] = (32, 64, 128)   # at 48x48, 24x24, 12x12
    image_size: int = 48
    beta: float = 0.25                # commitment weight
    ema_decay: float = 0.99
    dead_threshold: float = 1.0       # EMA usage (assignments per batch) below which a code is restarted

    def __post_init__(self):
        if self.codebook_size < 2 or self.code_dim < 1:
            raise ValueError(f"need codebook_size >= 2 and code_dim >= 1, got {self.codebook_size}, {self.code_dim}")
        if len(self.channels) != 3 or min(self.channels) < 8:
            raise ValueError(f"channels must be 3 widths >= 8 (full, 1/2, 1/4 resolution), got {self.channels}")
        if self.image_size % 4:
            raise ValueError(f"image_size must be divisible by 4 (two stride-2 stages), got {self.image_size}")
        if not 0 < self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in (0, 1), got {self.ema_decay}")

    @property
    def grid(self) -> tuple[int, int]:
        return (self.image_size // 4, self.image_size // 4)

    @property
    def num_tokens(self) -> int:
        return (self.image_size // 4) ** 2


class ResBlock(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.GroupNorm(8, ch), nn.SiLU(), nn.Conv2d(ch, ch, 3, padding=1),
            nn.GroupNorm(8, ch), nn.SiLU(), nn.Conv2d(ch, ch, 3, padding=1),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


def _encoder(cfg: VQConfig) -> nn.Sequential:
    c0, c1, c2 = cfg.channels
    return nn.Sequential(
        # no residual blocks at full resolution: they would triple the cost on a CPU for little PSNR
        nn.Conv2d(3, c0, 3, padding=1), nn.SiLU(),
        nn.Conv2d(c0, c1, 4, stride=2, padding=1), ResBlock(c1),
        nn.Conv2d(c1, c2, 4, stride=2, padding=1), ResBlock(c2),
        nn.GroupNorm(8, c2), nn.SiLU(), nn.Conv2d(c2, cfg.code_dim, 1),
    )


def _decoder(cfg: VQConfig) -> nn.Sequential:
    c0, c1, c2 = cfg.channels
    return nn.Sequential(
        nn.Conv2d(cfg.code_dim, c2, 3, padding=1), ResBlock(c2), ResBlock(c2),
        nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(c2, c1, 3, padding=1), ResBlock(c1),
        nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(c1, c0, 3, padding=1),
        nn.GroupNorm(8, c0), nn.SiLU(), nn.Conv2d(c0, 3, 3, padding=1),
    )


class VQTokenizer(nn.Module):
    """Image tokenizer. encode: [B, 3, 48, 48] in [-1, 1] -> LongTensor [B, 12, 12]; decode: the inverse."""

    def __init__(self, config: VQConfig = VQConfig()):
        super().__init__()
        self.config = config
        self.encoder = _encoder(config)
        self.decoder = _decoder(config)
        # EMA codebook state; `embed_sum / cluster_size` is the (un-normalised) code vector
        self.register_buffer("cluster_size", torch.ones(config.codebook_size))
        self.register_buffer("embed_sum", F.normalize(torch.randn(config.codebook_size, config.code_dim), dim=-1))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))

    # ---- codebook -------------------------------------------------------------------------------------------------
    @property
    def codebook(self) -> Tensor:
        """[V, D] unit-norm code vectors, exactly what the decoder sees for each id."""
        return F.normalize(self.embed_sum / self.cluster_size.clamp_min(1e-6)[:, None], dim=-1)

    def _latents(self, images: Tensor) -> Tensor:
        """images [B, 3, H, W] -> unit-norm latents [B, h, w, D]."""
        return F.normalize(self.encoder(images).permute(0, 2, 3, 1), dim=-1)

    @staticmethod
    def _nearest(z: Tensor, codebook: Tensor) -> Tensor:
        """z [..., D], codebook [V, D], both unit norm -> ids [...] (max cosine = min distance)."""
        return (z.reshape(-1, z.shape[-1]) @ codebook.t()).argmax(-1).view(z.shape[:-1])

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        """images [B, 3, 48, 48] in [-1, 1] -> ids LongTensor [B, 12, 12]."""
        self._check_images(images)
        return self._nearest(self._latents(images), self.codebook)

    @torch.no_grad()
    def decode(self, tokens: Tensor) -> Tensor:
        """ids [B, 12, 12] or [B, 144] -> images [B, 3, 48, 48] clamped to [-1, 1]."""
        h, w = self.config.grid
        if tokens.dim() != 2 and tokens.dim() != 3 or tokens[0].numel() != h * w:
            raise ValueError(f"tokens must be [B, {h}, {w}] or [B, {h * w}], got {tuple(tokens.shape)}")
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= self.config.codebook_size):
            raise ValueError(f"token ids must lie in [0, {self.config.codebook_size}), got "
                             f"[{int(tokens.min())}, {int(tokens.max())}]")
        q = self.codebook[tokens.reshape(-1, h, w).long()]          # [B, h, w, D]
        return self.decoder(q.permute(0, 3, 1, 2)).clamp(-1, 1)

    @torch.no_grad()
    def encode_grid(self, images: Tensor) -> Tensor:
        """images [B, 3, H, W] in [-1, 1], any H, W divisible by 4 (e.g. video frames smaller than the training
        crops: the tokenizer is convolutional) -> ids LongTensor [B, H/4, W/4]."""
        if images.dim() != 4 or images.shape[1] != 3 or images.shape[2] % 4 or images.shape[3] % 4:
            raise ValueError(f"images must be [B, 3, H, W] with H, W divisible by 4, got {tuple(images.shape)}")
        return self._nearest(self._latents(images), self.codebook)

    @torch.no_grad()
    def decode_grid(self, tokens: Tensor) -> Tensor:
        """ids [B, h, w] (any h, w) -> images [B, 3, 4h, 4w] clamped to [-1, 1]."""
        if tokens.dim() != 3:
            raise ValueError(f"tokens must be [B, h, w], got {tuple(tokens.shape)}")
        q = self.codebook[tokens.long()]                               # [B, h, w, D]
        return self.decoder(q.permute(0, 3, 1, 2)).clamp(-1, 1)

    def _check_images(self, images: Tensor) -> None:
        s = self.config.image_size
        if images.dim() != 4 or tuple(images.shape[1:]) != (3, s, s):
            raise ValueError(f"images must be [B, 3, {s}, {s}], got {tuple(images.shape)}")

    # ---- training -------------------------------------------------------------------------------------------------
    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Training pass. images [B, 3, 48, 48] -> (reconstruction [B, 3, 48, 48] unclamped,
        commitment loss [], ids [B, 12, 12]). In training mode also updates the EMA codebook."""
        z = self._latents(images)
        if self.training and not bool(self.initialized):
            self._init_codes(z.detach().reshape(-1, z.shape[-1]))
        codebook = self.codebook
        ids = self._nearest(z.detach(), codebook)
        q = codebook[ids]
        commit = self.config.beta * F.mse_loss(z, q.detach())
        if self.training:
            self._ema_update(z.detach().reshape(-1, z.shape[-1]), ids.reshape(-1))
        q = z + (q - z).detach()                                    # straight-through
        return self.decoder(q.permute(0, 3, 1, 2)), commit, ids

    @torch.no_grad()
    def _init_codes(self, z: Tensor) -> None:
        """Start the codebook on random encoder outputs so every code is near data from step 0."""
        pick = torch.randint(len(z), (self.config.codebook_size,), device=z.device)
        self.embed_sum.copy_(z[pick])
        self.cluster_size.fill_(1.0)
        self.initialized.fill_(True)

    @torch.no_grad()
    def _ema_update(self, z: Tensor, ids: Tensor) -> None:
        """z [N, D] unit latents, ids [N]: EMA of per-code counts and sums."""
        d = self.config.ema_decay
        onehot = F.one_hot(ids, self.config.codebook_size).type_as(z)     # [N, V]
        self.cluster_size.mul_(d).add_(onehot.sum(0), alpha=1 - d)
        self.embed_sum.mul_(d).add_(onehot.t() @ z, alpha=1 - d)

    @torch.no_grad()
    def restart_dead_codes(self, z: Tensor) -> int:
        """Move codes whose EMA usage fell below `dead_threshold` onto random latents z [N, D]; returns how many."""
        dead = self.cluster_size < self.config.dead_threshold
        n = int(dead.sum())
        if n:
            pick = torch.randint(len(z), (n,), device=z.device)
            self.embed_sum[dead] = z[pick]
            self.cluster_size[dead] = 1.0
        return n

    def latents_for_restart(self, images: Tensor) -> Tensor:
        """images [B, 3, 48, 48] -> flat unit latents [B * 144, D], no grad."""
        with torch.no_grad():
            z = self._latents(images)
        return z.reshape(-1, z.shape[-1])


def psnr(a: Tensor, b: Tensor) -> Tensor:
    """Per-image PSNR in dB of images in [-1, 1]: a, b [B, 3, H, W] -> [B]."""
    mse = ((a.clamp(-1, 1) - b.clamp(-1, 1)) / 2).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-10))
