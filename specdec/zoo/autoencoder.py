"""The continuous zoo's KL autoencoder: 48 x 48 RGB crops <-> 12 x 12 latents of 16 channels with a diagonal
Gaussian posterior (the KL-regularised autoencoder of LDM, Rombach et al. arXiv 2112.10752, after the VAE of Kingma &
Welling arXiv 1312.6114), small enough to train on one CPU thread in minutes. MAR (Li et al., arXiv 2406.11838)
models its latents times a scale factor fitted from data (`fit_scale`; the released KL-16 uses 0.2325) so that the
tokens have unit standard deviation.

Conv encoder (two stride-2 stages), a 1 x 1 `quant_conv` to (mean, logvar), a 1 x 1 `post_quant_conv` and a conv
decoder (two nearest-upsampling stages). Trained with the per-pixel MSE of a posterior sample's reconstruction plus
a small KL term (`ae_loss`); no perceptual or adversarial loss (nothing to download, one CPU thread).
The bundle that loads it with the MAR models is `specdec.zoo.continuous`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from specdec.zoo.vq import ResBlock


@dataclass(frozen=True)
class KLConfig:
    """image_size: square input side; embed_dim: latent channels; channels: widths at full, 1/2 and 1/4 resolution
    (stride 4: 48 -> 12); kl_weight: weight of the KL term (mean per latent element) against the per-pixel MSE;
    scale: token = latent * scale (set from data after training)."""

    image_size: int = 48
    embed_dim: int = 16
    channels: tuple[int, int, int] = (32, 64, 128)
    kl_weight: float = 1e-4
    scale: float = 1.0

    def __post_init__(self):
        if self.image_size % 4 or self.image_size < 4:
            raise ValueError(f"KLConfig.image_size must be a positive multiple of 4 (stride 4), got {self.image_size}")
        if self.embed_dim < 1:
            raise ValueError(f"KLConfig.embed_dim must be >= 1, got {self.embed_dim}")
        if len(self.channels) != 3 or any(c < 8 or c % 8 for c in self.channels):
            raise ValueError(f"KLConfig.channels must be 3 multiples of 8 (GroupNorm of 8 groups), got {self.channels}")
        if not self.kl_weight >= 0:
            raise ValueError(f"KLConfig.kl_weight must be >= 0, got {self.kl_weight}")
        if not 0 < self.scale < float("inf"):
            raise ValueError(f"KLConfig.scale must be a positive finite number, got {self.scale}")

    @property
    def stride(self) -> int:
        return 4

    @property
    def grid(self) -> tuple[int, int]:
        return (self.image_size // 4, self.image_size // 4)


def _down(c_in: int, c_out: int) -> nn.Sequential:
    """Halve the resolution (strided 4 x 4 conv), then a residual block."""
    return nn.Sequential(nn.Conv2d(c_in, c_out, 4, stride=2, padding=1), ResBlock(c_out))


def _up(c_in: int, c_out: int) -> nn.Sequential:
    """Double the resolution (nearest, 3 x 3 conv), then a residual block."""
    return nn.Sequential(nn.Upsample(scale_factor=2.0, mode="nearest"), nn.Conv2d(c_in, c_out, 3, padding=1),
                         ResBlock(c_out))


def _out(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.GroupNorm(8, c_in), nn.SiLU(), nn.Conv2d(c_in, c_out, 3, padding=1))


class KLAutoencoder(nn.Module):
    """images [B, 3, S, S] in [-1, 1] <-> latents [B, E, S/4, S/4] with a diagonal Gaussian posterior.

    Also the VAE interface `specdec.adapters.mar.MARAdapter` uses: `cfg.stride`, `cfg.embed_dim`,
    `post_quant_conv`, `encode_tokens` and `decode_tokens` (latents times / divided by `config.scale`).
    """

    def __init__(self, config: KLConfig = KLConfig()):
        super().__init__()
        self.config = config
        c0, c1, c2 = config.channels
        e = config.embed_dim
        self.encoder = nn.Sequential(nn.Conv2d(3, c0, 3, padding=1), nn.SiLU(), _down(c0, c1), _down(c1, c2),
                                     ResBlock(c2), _out(c2, 2 * e))
        self.quant_conv = nn.Conv2d(2 * e, 2 * e, 1)
        self.post_quant_conv = nn.Conv2d(e, e, 1)
        self.decoder = nn.Sequential(nn.Conv2d(e, c2, 3, padding=1), ResBlock(c2), ResBlock(c2), _up(c2, c1),
                                     _up(c1, c0), _out(c0, 3))

    @property
    def cfg(self) -> KLConfig:
        return self.config

    def _check(self, images: Tensor) -> None:
        s = self.config.image_size
        if not isinstance(images, Tensor) or images.dim() != 4 or tuple(images.shape[1:]) != (3, s, s):
            raise ValueError(f"images must be [B, 3, {s}, {s}] in [-1, 1], got "
                             f"{tuple(getattr(images, 'shape', ()))}")

    def encode(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """images [B, 3, S, S] -> posterior (mean, logvar) [B, E, S/4, S/4] each (logvar clamped to [-30, 20])."""
        self._check(images)
        mean, logvar = self.quant_conv(self.encoder(images)).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def decode(self, latents: Tensor) -> Tensor:
        """latents [B, E, h, w] (unscaled) -> pixels [B, 3, 4h, 4w] (unclamped)."""
        return self.decoder(self.post_quant_conv(latents))

    def forward(self, images: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Training pass: a reparameterised posterior sample (noise from `generator`) decoded
        -> (reconstruction [B, 3, S, S], mean, logvar [B, E, S/4, S/4])."""
        mean, logvar = self.encode(images)
        noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return self.decode(mean + torch.exp(0.5 * logvar) * noise), mean, logvar

    def encode_tokens(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """images -> scaled latents [B, E, h, w]: the posterior mean, or a posterior sample drawn with `generator`
        when one is given (MAR trains on samples), times `scale`."""
        mean, logvar = self.encode(images)
        if generator is not None:
            noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
            mean = mean + torch.exp(0.5 * logvar) * noise
        return mean * self.config.scale

    def decode_tokens(self, latents: Tensor) -> Tensor:
        """Scaled latents [B, E, h, w] -> pixels [B, 3, 4h, 4w] (unclamped): decode(latents / scale)."""
        return self.decode(latents / self.config.scale)


def kl_divergence(mean: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mean, exp(logvar)) || N(0, I)) per image, averaged over latent elements: [B, E, h, w] -> [B]."""
    return 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).flatten(1).mean(1)


def ae_loss(model: KLAutoencoder, images: Tensor, generator: torch.Generator | None = None
            ) -> tuple[Tensor, dict[str, float]]:
    """The autoencoder's training loss on images [B, 3, S, S]: per-pixel MSE of a posterior sample's reconstruction
    + kl_weight * KL (per latent element) -> (scalar, {"mse", "kl"})."""
    recon, mean, logvar = model(images, generator)
    mse = F.mse_loss(recon, images)
    kl = kl_divergence(mean, logvar).mean()
    return mse + model.config.kl_weight * kl, dict(mse=mse.item(), kl=kl.item())


@torch.no_grad()
def fit_scale(model: KLAutoencoder, images: Tensor, generator: torch.Generator, chunk: int = 256) -> float:
    """1 / std of posterior samples over images [N, 3, S, S] (all channels and positions pooled; encoded `chunk`
    at a time): the factor that gives MAR's tokens unit standard deviation (official: 'normalize the std of latent
    to be 1')."""
    samples = []
    for part in images.split(chunk):
        mean, logvar = model.encode(part)
        noise = torch.randn(mean.shape, generator=generator, device=mean.device)
        samples.append(mean + torch.exp(0.5 * logvar) * noise)
    return float(1.0 / torch.cat(samples).std())
