"""The Wan video VAE from diffusers (`AutoencoderKLWan`) as a streaming `specdec.protocols.BlockDecoder`.

Wan's decoder is causal in time: `AutoencoderKLWan._decode` feeds the latent clip one frame at a time through the
decoder and every causal 3-D convolution keeps the last frames of its input in a feature cache (`feat_cache`), so a
frame is decoded from itself and that cache alone. This class runs the same loop but keeps the cache between calls,
so a clip is decoded block by block as blocks are committed; `snapshot` / `restore` copy and put back the cache
(and the count of decoded latent frames) so that a router can decode a draft block and undo it on rejection
(SDVG, Hu & Zhang, arXiv 2604.17397). Wan VAE: Wan team, "Wan: Open and Advanced Large-Scale Video Generative
Models", arXiv 2503.20314.

Frames: latent frame 0 of a clip decodes to 1 frame, every later latent frame to `scale_factor_temporal` (4)
frames, so a block of F_b latent frames gives 4 F_b frames (4 F_b - 3 for the first block). Decoding a clip block
by block returns exactly `vae.decode` of the whole clip, concatenated along time (the test checks it).

Latents are the transformer's normalised ones, (z - latents_mean) / latents_std; they are mapped back with the
pipeline's own arithmetic before decoding. Tiled decoding is not supported (its cache restarts per tile).

Guarantee: exact (same operations as the non-streaming decode); `restore(snapshot())` is exact.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from specdec.adapters.diffusers_video import require_diffusers
from specdec.protocols import BlockDecoder


class WanBlockDecoder(BlockDecoder):
    """Streaming BlockDecoder over a diffusers `AutoencoderKLWan`.

    decode(latents [B, F_b, C, h, w]) -> frames [B, F_out, 3, H, W] in [-1, 1], H = 8 h, W = 8 w (Wan2.1 VAE).
    Call `reset()` before the first block of a new clip.
    """

    def __init__(self, vae):
        diffusers = require_diffusers()
        if not isinstance(vae, diffusers.AutoencoderKLWan):
            raise TypeError(f"vae must be a diffusers.AutoencoderKLWan, got {type(vae).__name__}")
        if getattr(vae, "use_tiling", False):
            raise ValueError("tiled decoding restarts the temporal cache per tile and cannot stream; "
                             "call vae.disable_tiling() first")
        self.vae = vae.eval()
        cfg = vae.config
        self.channels = cfg.z_dim
        # (mean, 1 / std) [1, C, 1, 1, 1]: the pipeline divides by 1 / std; the same ops give the same bits.
        self._mean = torch.tensor(cfg.latents_mean).view(1, cfg.z_dim, 1, 1, 1)
        self._inv_std = 1.0 / torch.tensor(cfg.latents_std).view(1, cfg.z_dim, 1, 1, 1)
        self.reset()

    def reset(self) -> None:
        """Start a new clip: empty feature cache, no frame decoded."""
        self._cache: list = [None] * self.vae._cached_conv_counts["decoder"]
        self._frames = 0

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """latents [B, F_b, C, h, w] of the next block -> frames [B, F_out, 3, H, W] in [-1, 1]; advances the
        cache (and the batch must stay the same until `reset`)."""
        if not isinstance(latents, Tensor) or latents.dim() != 5 or latents.shape[2] != self.channels:
            got = tuple(latents.shape) if isinstance(latents, Tensor) else type(latents).__name__
            raise ValueError(f"latents must be [B, F_b, {self.channels}, h, w] (the VAE's z_dim channels), got {got}")
        vae = self.vae
        z = latents.permute(0, 2, 1, 3, 4).to(vae.dtype)              # [B, C, F_b, h, w], the VAE's layout
        mean, inv_std = self._mean.to(z.device, z.dtype), self._inv_std.to(z.device, z.dtype)
        z = z / inv_std + mean
        x = vae.post_quant_conv(z)                                     # kernel 1 in time: frame-wise
        outs = []
        for i in range(x.shape[2]):
            outs.append(vae.decoder(x[:, :, i:i + 1], feat_cache=self._cache, feat_idx=[0],
                                    first_chunk=self._frames == 0))
            self._frames += 1
        out = torch.cat(outs, 2)
        if vae.config.patch_size is not None:
            from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify
            out = unpatchify(out, patch_size=vae.config.patch_size)
        return out.clamp(-1.0, 1.0).permute(0, 2, 1, 3, 4)           # [B, F_out, 3, H, W]

    def snapshot(self) -> Any:
        """(cached feature tensors, cloned; frames decoded so far)."""
        return ([c.clone() if isinstance(c, Tensor) else c for c in self._cache], self._frames)

    def restore(self, snapshot: Any) -> None:
        cache, frames = snapshot
        if len(cache) != len(self._cache):
            raise ValueError(f"snapshot holds {len(cache)} cache entries, this decoder {len(self._cache)}: "
                             "restore only snapshots taken from this decoder")
        # clone again, so that the snapshot stays valid for a second restore
        self._cache = [c.clone() if isinstance(c, Tensor) else c for c in cache]
        self._frames = frames
