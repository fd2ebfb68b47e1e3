"""Configurations of MAR (Li et al., "Autoregressive Image Generation without Vector Quantization", NeurIPS 2024,
arXiv 2406.11838) and of its KL-16 VAE, with the released sizes by name.

Every field that shapes a weight or the computation of the released models is here, with the official default;
training-only knobs (mask-ratio generator, label drop, dropouts, diffusion_batch_mul) are not, since this package
runs inference. `causal` is not an official option: it turns the backbone into a causal continuous AR model in the
same weight layout (see `specdec.models.mar.backbone`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

# name -> (embed dim, depth, heads, diffloss depth, diffloss width); encoder and decoder are the same size.
# The backbone sizes are the official mar_base / mar_large / mar_huge; the DiffLoss sizes are the ones the released
# checkpoints were trained with (README: --diffloss_d 6/8/12 --diffloss_w 1024/1280/1536). "mar_tiny" is for tests.
MAR_SIZES = {
    "mar_base": (768, 12, 12, 6, 1024),
    "mar_large": (1024, 16, 16, 8, 1280),
    "mar_huge": (1280, 20, 16, 12, 1536),
    "mar_tiny": (32, 1, 2, 2, 32),
}
_ALIASES = {"B": "mar_base", "L": "mar_large", "H": "mar_huge", "MAR-B": "mar_base", "MAR-L": "mar_large",
            "MAR-H": "mar_huge"}
# what the tiny size changes beyond the widths, so that it runs in milliseconds (4 x 4 tokens, 10 head steps)
_TINY = dict(img_size=16, vae_stride=4, buffer_size=4, class_num=10, num_sampling_steps=10)

# the guidance scale the paper reports its best FID with, per size (num_iter 256, temperature 1.0)
DEFAULT_CFG = {"mar_base": 2.9, "mar_large": 3.0, "mar_huge": 3.2}


@dataclass(frozen=True)
class MARConfig:
    """The official `MAR(...)` arguments that matter at inference, defaults as upstream (mar_large widths).

    seq_len = (img_size // vae_stride // patch_size) ** 2 tokens of token_dim = vae_embed_dim * patch_size ** 2.
    num_sampling_steps: the DiffLoss sampler's respaced steps S (of diffusion_steps training steps).
    causal: attention follows the generation order and token i is read out one slot earlier (not official).
    """

    img_size: int = 256
    vae_stride: int = 16
    patch_size: int = 1
    encoder_embed_dim: int = 1024
    encoder_depth: int = 16
    encoder_num_heads: int = 16
    decoder_embed_dim: int = 1024
    decoder_depth: int = 16
    decoder_num_heads: int = 16
    mlp_ratio: float = 4.0
    vae_embed_dim: int = 16
    class_num: int = 1000
    buffer_size: int = 64
    diffloss_d: int = 3
    diffloss_w: int = 1024
    num_sampling_steps: int = 100
    diffusion_steps: int = 1000
    norm_eps: float = 1e-6
    causal: bool = False

    def __post_init__(self):
        for name in ("img_size", "vae_stride", "patch_size", "encoder_embed_dim", "encoder_depth",
                     "encoder_num_heads", "decoder_embed_dim", "decoder_depth", "decoder_num_heads", "vae_embed_dim",
                     "class_num", "diffloss_d", "diffloss_w", "num_sampling_steps", "diffusion_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"MARConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.buffer_size < 1:
            # the class embedding enters only through the buffer slots: without them nothing is conditional
            raise ValueError(f"MARConfig.buffer_size must be >= 1 (the class embedding lives there), "
                             f"got {self.buffer_size}")
        if self.img_size % (self.vae_stride * self.patch_size):
            raise ValueError(f"img_size={self.img_size} must be a multiple of vae_stride * patch_size = "
                             f"{self.vae_stride * self.patch_size}")
        for part in ("encoder", "decoder"):
            dim, heads = getattr(self, f"{part}_embed_dim"), getattr(self, f"{part}_num_heads")
            if dim % heads:
                raise ValueError(f"{part}_embed_dim={dim} must be divisible by {part}_num_heads={heads}")
        if self.num_sampling_steps < 2:
            # the learned-range variance's lower end at t = 0 is the posterior variance of step 1 (clipped log)
            raise ValueError(f"num_sampling_steps must be >= 2, got {self.num_sampling_steps}")
        if self.num_sampling_steps > self.diffusion_steps:
            raise ValueError(f"num_sampling_steps={self.num_sampling_steps} cannot exceed "
                             f"diffusion_steps={self.diffusion_steps}")
        if self.mlp_ratio <= 0 or self.norm_eps <= 0:
            raise ValueError("MARConfig.mlp_ratio and norm_eps must be > 0")

    @property
    def seq_side(self) -> int:
        return self.img_size // self.vae_stride // self.patch_size

    @property
    def seq_len(self) -> int:
        return self.seq_side ** 2

    @property
    def token_dim(self) -> int:
        return self.vae_embed_dim * self.patch_size ** 2

    @property
    def grid(self) -> tuple[int, int]:
        return (self.seq_side, self.seq_side)

    @classmethod
    def named(cls, name: str, **overrides) -> "MARConfig":
        """A released size ("mar_base" / "mar_large" / "mar_huge", or "B" / "L" / "H") or "mar_tiny", with
        field overrides (e.g. num_sampling_steps=50, causal=True)."""
        key = _ALIASES.get(name, name)
        if key not in MAR_SIZES:
            raise ValueError(f"unknown MAR size {name!r}; choose one of {sorted(MAR_SIZES)} "
                             f"(or {sorted(_ALIASES)})")
        dim, depth, heads, d_d, d_w = MAR_SIZES[key]
        base = dict(encoder_embed_dim=dim, encoder_depth=depth, encoder_num_heads=heads, decoder_embed_dim=dim,
                    decoder_depth=depth, decoder_num_heads=heads, diffloss_d=d_d, diffloss_w=d_w)
        if key == "mar_tiny":
            base.update(_TINY)
        return cls(**{**base, **overrides})

    def with_(self, **overrides) -> "MARConfig":
        return replace(self, **overrides)


@dataclass(frozen=True)
class VAEConfig:
    """The official `AutoencoderKL(embed_dim=16, ch_mult=(1, 1, 2, 2, 4))` (LDM's KL autoencoder, as MAR ships it).

    The encoder has self-attention at resolution 16 (`attn_resolutions=(16,)`), the decoder only in its middle
    (`attn_resolutions=()`): the two defaults differ upstream. scale: MAR's tokens are the VAE latents times 0.2325
    (the official training caches `posterior.sample() * 0.2325` and decodes `tokens / 0.2325`).
    """

    embed_dim: int = 16
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    resolution: int = 256
    encoder_attn_resolutions: tuple[int, ...] = (16,)
    decoder_attn_resolutions: tuple[int, ...] = ()
    in_channels: int = 3
    out_channels: int = 3
    scale: float = 0.2325

    def __post_init__(self):
        if self.ch % 32:
            raise ValueError(f"VAEConfig.ch={self.ch} must be a multiple of 32 (GroupNorm with 32 groups)")
        if not self.ch_mult or self.num_res_blocks < 1 or self.embed_dim < 1:
            raise ValueError("VAEConfig needs a non-empty ch_mult, num_res_blocks >= 1 and embed_dim >= 1")
        if self.resolution % self.stride:
            raise ValueError(f"resolution={self.resolution} must be a multiple of the stride {self.stride}")
        if not (self.scale > 0 and math.isfinite(self.scale)):
            raise ValueError(f"VAEConfig.scale must be a positive number, got {self.scale}")

    @property
    def stride(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @classmethod
    def tiny(cls, **overrides) -> "VAEConfig":
        """A 32-channel, stride-4 VAE matching MARConfig.named("mar_tiny") (16 x 16 pixels), for tests."""
        base = dict(ch=32, ch_mult=(1, 1, 2), num_res_blocks=1, resolution=16, encoder_attn_resolutions=(4,))
        return cls(**{**base, **overrides})
