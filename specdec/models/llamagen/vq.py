"""The LlamaGen VQ tokenizer (Sun et al., arXiv 2406.06525; the official `VQModel`), written for specdec.
Parameter names and shapes follow the public FoundationVision/LlamaGen code (tokenizer/tokenizer_image/
vq_model.py), so the official state dicts load as is."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# name -> channel multipliers of encoder and decoder (downsampling factor 2 ** (len - 1))
VQ_SIZES = {"VQ-16": (1, 1, 2, 2, 4), "VQ-8": (1, 2, 2, 4)}


@dataclass(frozen=True)
class VQConfig:
    codebook_size: int = 16384
    codebook_embed_dim: int = 8
    codebook_l2_norm: bool = True
    codebook_show_usage: bool = True         # the `codebook_used` buffer [65536] exists in the checkpoints
    ch_mult: tuple[int, ...] = VQ_SIZES["VQ-16"]
    z_channels: int = 256
    ch: int = 128                             # fixed upstream; smaller only for tests
    num_res_blocks: int = 2

    def __post_init__(self):
        if self.ch % 32 or self.z_channels < 1:
            raise ValueError(f"ch={self.ch} must be a multiple of 32 (GroupNorm with 32 groups)")

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @classmethod
    def named(cls, name: str, **kwargs) -> "VQConfig":
        if name not in VQ_SIZES:
            raise ValueError(f"unknown LlamaGen VQ model {name!r}; choose one of {sorted(VQ_SIZES)}")
        return cls(**{"ch_mult": VQ_SIZES[name], **kwargs})


def _norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, c, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.norm1 = _norm(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = _norm(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else None

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv2(F.silu(self.norm2(self.conv1(F.silu(self.norm1(x))))))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class AttnBlock(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.norm = _norm(c)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(c, c, 1) for _ in range(4))

    def forward(self, x: Tensor) -> Tensor:
        B, C, H, W = x.shape
        h = self.norm(x)
        q, k, v = (m(h).flatten(2).transpose(1, 2) for m in (self.q, self.k, self.v))   # [B, HW, C]
        y = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]
        return x + self.proj_out(y.transpose(1, 2).reshape(B, C, H, W))


class _Level(nn.Module):
    """One resolution level: `res` blocks, `attn` blocks (lowest resolution only), then the encoder's `downsample`
    or the decoder's `upsample` (None where the level keeps its resolution; the names are the checkpoints')."""

    def __init__(self, blocks: list[nn.Module], attn: list[nn.Module], downsample: nn.Module | None = None,
                 upsample: nn.Module | None = None):
        super().__init__()
        self.res = nn.ModuleList(blocks)
        self.attn = nn.ModuleList(attn)
        self.downsample = downsample
        self.upsample = upsample

    def run(self, h: Tensor) -> Tensor:
        for i, block in enumerate(self.res):
            h = block(h)
            if len(self.attn):
                h = self.attn[i](h)
        for resample in (self.downsample, self.upsample):
            if resample is not None:
                h = resample(h)
        return h


class _Resample(nn.Module):
    def __init__(self, c: int, up: bool):
        super().__init__()
        self.up = up
        self.conv = nn.Conv2d(c, c, 3, stride=1 if up else 2, padding=1 if up else 0)

    def forward(self, x: Tensor) -> Tensor:
        if self.up:
            return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Encoder(nn.Module):
    def __init__(self, cfg: VQConfig, in_channels: int = 3):
        super().__init__()
        ch, mult, n = cfg.ch, cfg.ch_mult, cfg.num_res_blocks
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        self.conv_blocks = nn.ModuleList()
        c = ch
        for i, m in enumerate(mult):
            blocks, attn = [], []
            for _ in range(n):
                blocks.append(ResnetBlock(c, ch * m))
                c = ch * m
                if i == len(mult) - 1:
                    attn.append(AttnBlock(c))
            down = _Resample(c, up=False) if i != len(mult) - 1 else None
            self.conv_blocks.append(_Level(blocks, attn, downsample=down))
        self.mid = nn.ModuleList([ResnetBlock(c, c), AttnBlock(c), ResnetBlock(c, c)])
        self.norm_out = _norm(c)
        self.conv_out = nn.Conv2d(c, cfg.z_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for level in self.conv_blocks:
            h = level.run(h)
        for m in self.mid:
            h = m(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg: VQConfig, out_channels: int = 3):
        super().__init__()
        ch, mult, n = cfg.ch, cfg.ch_mult, cfg.num_res_blocks
        c = ch * mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, c, 3, padding=1)
        self.mid = nn.ModuleList([ResnetBlock(c, c), AttnBlock(c), ResnetBlock(c, c)])
        self.conv_blocks = nn.ModuleList()
        for i in reversed(range(len(mult))):
            blocks, attn = [], []
            for _ in range(n + 1):
                blocks.append(ResnetBlock(c, ch * mult[i]))
                c = ch * mult[i]
                if i == len(mult) - 1:
                    attn.append(AttnBlock(c))
            up = _Resample(c, up=True) if i != 0 else None
            self.conv_blocks.append(_Level(blocks, attn, upsample=up))
        self.norm_out = _norm(c)
        self.conv_out = nn.Conv2d(c, out_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.conv_in(z)
        for m in self.mid:
            h = m(h)
        for level in self.conv_blocks:
            h = level.run(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class VectorQuantizer(nn.Module):
    def __init__(self, cfg: VQConfig):
        super().__init__()
        self.l2_norm = cfg.codebook_l2_norm
        self.embedding = nn.Embedding(cfg.codebook_size, cfg.codebook_embed_dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / cfg.codebook_size, 1.0 / cfg.codebook_size)
        if self.l2_norm:
            with torch.no_grad():
                self.embedding.weight.copy_(F.normalize(self.embedding.weight, dim=-1))
        if cfg.codebook_show_usage:
            self.register_buffer("codebook_used", torch.zeros(65536))

    def codebook(self) -> Tensor:
        """[V, D] the code vectors the decoder sees (l2-normalised when the model was trained so)."""
        w = self.embedding.weight
        return F.normalize(w, dim=-1) if self.l2_norm else w

    def lookup(self, codes: Tensor) -> Tensor:
        """codes [B, H, W] -> z_q [B, D, H, W]."""
        return self.codebook()[codes].permute(0, 3, 1, 2).contiguous()

    def quantize(self, z: Tensor) -> Tensor:
        """z [B, D, H, W] -> nearest codes [B, H, W] (cosine distance when l2-normalised)."""
        flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
        if self.l2_norm:
            flat = F.normalize(flat, dim=-1)
        emb = self.codebook()
        d = flat.pow(2).sum(1, keepdim=True) + emb.pow(2).sum(1) - 2 * flat @ emb.T
        return d.argmin(1).view(z.shape[0], z.shape[2], z.shape[3])


class LlamaGenVQ(nn.Module):
    """The LlamaGen VQ tokenizer (official `VQModel`). decode_code: codes [B, H, W] -> pixels [B, 3, 16H, 16W]
    (VQ-16) in about [-1, 1]."""

    def __init__(self, cfg: VQConfig = VQConfig()):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quantize = VectorQuantizer(cfg)
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.codebook_embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.codebook_embed_dim, cfg.z_channels, 1)

    def encode_code(self, x: Tensor) -> Tensor:
        """pixels [B, 3, H, W] in [-1, 1] -> codes [B, H/f, W/f]."""
        return self.quantize.quantize(self.quant_conv(self.encoder(x)))

    def decode_code(self, codes: Tensor) -> Tensor:
        return self.decoder(self.post_quant_conv(self.quantize.lookup(codes)))
