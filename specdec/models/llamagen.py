"""LlamaGen (Sun et al., "Autoregressive Model Beats Diffusion: Llama for Scalable Image Generation",
arXiv 2406.06525): the GPT and the VQ tokenizer, written for specdec, loading the official checkpoints.

Parameter names and shapes follow the public FoundationVision/LlamaGen code (autoregressive/models/gpt.py,
tokenizer/tokenizer_image/vq_model.py), so `model.load_state_dict(official["model"])` works as is; the modules
themselves are our own and decode with a `specdec.cache.StaticKVCache` (per-row write pointers, ragged rows).

Behaviour reproduced from the official model because the checkpoints were trained with it:
* 2-D RoPE: the head dim is split in halves, the first half rotated by the token's row, the second by its column,
  adjacent channel pairs (x[2i], x[2i+1]) rotate together. The rotation table has `cls_token_num` all-zero rows
  in front, so the condition tokens' queries and keys are ZERO vectors (they still contribute their values).
  The table is indexed by the absolute sequence position: image token j of a c2i model sits at position 1 + j.
* c2i: one class token (`LabelEmbedder`), null class = `num_classes` (exists when class_dropout_prob > 0).
  t2i: `cls_token_num` caption tokens (T5 features through `CaptionEmbedder`'s MLP), null caption =
  the learnt `uncond_embedding`; left-padded caption slots are hidden from every query except themselves.
* SwiGLU hidden size find_multiple(int(2 * 4 * dim / 3) * ffn_dim_multiplier, multiple_of); RMSNorm in float32.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from specdec.cache import StaticKVCache
from specdec.models.gpt import RMSNorm

# name -> (n_layer, n_head, dim), as released
GPT_SIZES = {
    "GPT-B": (12, 12, 768), "GPT-L": (24, 16, 1024), "GPT-XL": (36, 20, 1280), "GPT-XXL": (48, 24, 1536),
    "GPT-XXXL": (48, 40, 2560), "GPT-1B": (22, 32, 2048), "GPT-3B": (24, 32, 3200), "GPT-7B": (32, 32, 4096),
}
# name -> channel multipliers of encoder and decoder (downsampling factor 2 ** (len - 1))
VQ_SIZES = {"VQ-16": (1, 1, 2, 2, 4), "VQ-8": (1, 2, 2, 4)}


def _multiple(n: int, k: int) -> int:
    return n if n % k == 0 else n + k - n % k


@dataclass(frozen=True)
class LlamaGenConfig:
    """The official `ModelArgs` fields that shape the weights or the computation (dropouts are inference-off)."""

    dim: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_kv_head: int | None = None
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    num_classes: int = 1000
    caption_dim: int = 2048
    caption_token_num: int = 120      # rows of CaptionEmbedder.uncond_embedding (fixed at 120 upstream)
    class_dropout_prob: float = 0.1   # > 0 means the c2i table has the null-class row used by CFG
    model_type: str = "c2i"
    vocab_size: int = 16384
    cls_token_num: int = 1
    block_size: int = 256             # image tokens per image: (image_size / downsample) ** 2

    def __post_init__(self):
        if self.model_type not in ("c2i", "t2i"):
            raise ValueError(f"model_type must be 'c2i' or 't2i', got {self.model_type!r}")
        if self.dim % self.n_head:
            raise ValueError(f"dim={self.dim} must be divisible by n_head={self.n_head}")
        kv = self.kv_heads
        if self.n_head % kv:
            raise ValueError(f"n_head={self.n_head} must be a multiple of n_kv_head={kv}")
        if (self.dim // self.n_head) % 4:
            raise ValueError(f"head dim {self.dim // self.n_head} must be divisible by 4 for the 2-D RoPE")
        side = math.isqrt(self.block_size)
        if side * side != self.block_size:
            raise ValueError(f"block_size={self.block_size} must be a square (grid side ** 2)")
        for name in ("vocab_size", "num_classes", "cls_token_num", "n_layer", "multiple_of"):
            if getattr(self, name) < 1:
                raise ValueError(f"LlamaGenConfig.{name} must be >= 1, got {getattr(self, name)}")

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head if self.n_kv_head is not None else self.n_head

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_head

    @property
    def hidden(self) -> int:
        h = int(2 * 4 * self.dim / 3)
        if self.ffn_dim_multiplier is not None:
            h = int(self.ffn_dim_multiplier * h)
        return _multiple(h, self.multiple_of)

    @property
    def grid_side(self) -> int:
        return math.isqrt(self.block_size)

    @property
    def prefix_len(self) -> int:
        """Condition tokens in front of the image: c2i feeds exactly one class token whatever cls_token_num is."""
        return 1 if self.model_type == "c2i" else self.cls_token_num

    @classmethod
    def named(cls, name: str, **kwargs) -> "LlamaGenConfig":
        if name not in GPT_SIZES:
            raise ValueError(f"unknown LlamaGen model {name!r}; choose one of {sorted(GPT_SIZES)}")
        n_layer, n_head, dim = GPT_SIZES[name]
        return cls(**{"n_layer": n_layer, "n_head": n_head, "dim": dim, **kwargs})


# ----------------------------------------------------------------------------------------------- GPT modules
class LabelEmbedder(nn.Module):
    """Class id -> one condition token. Row `num_classes` (present when dropout_prob > 0) is the null class."""

    def __init__(self, num_classes: int, dim: int, dropout_prob: float):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), dim)
        self.num_classes = num_classes

    def forward(self, labels: Tensor) -> Tensor:
        return self.embedding_table(labels)[:, None]


class CaptionMLP(nn.Module):
    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.fc1 = nn.Linear(d_in, d_out, bias=False)
        self.fc2 = nn.Linear(d_out, d_out, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class CaptionEmbedder(nn.Module):
    """T5 features [B, L, caption_dim] -> condition tokens [B, L, dim]; `uncond_embedding` is the null caption."""

    def __init__(self, caption_dim: int, dim: int, token_num: int):
        super().__init__()
        self.cap_proj = CaptionMLP(caption_dim, dim)
        self.register_buffer("uncond_embedding", torch.randn(token_num, caption_dim) / caption_dim ** 0.5)

    def forward(self, caption: Tensor) -> Tensor:
        return self.cap_proj(caption)


def rope_table(cfg: LlamaGenConfig, length: int, device=None) -> Tensor:
    """cos/sin table [length, head_dim // 2, 2] indexed by sequence position (zeros for the condition tokens
    and for any position past the image, which only overshooting draft slots reach)."""
    quarter = cfg.head_dim // 4
    inv = 1.0 / (cfg.rope_base ** (torch.arange(0, 2 * quarter, 2, device=device)[:quarter].float()
                                   / (cfg.head_dim // 2)))
    side = cfg.grid_side
    ang = torch.arange(side, device=device).float()[:, None] * inv                 # [side, quarter]
    grid = torch.cat([ang[:, None].expand(side, side, quarter), ang[None].expand(side, side, quarter)], -1)
    table = torch.stack([grid.cos(), grid.sin()], -1).flatten(0, 1)                 # [side*side, hd/2, 2]
    out = torch.zeros(max(length, cfg.cls_token_num + cfg.block_size), cfg.head_dim // 2, 2, device=device)
    out[cfg.cls_token_num: cfg.cls_token_num + cfg.block_size] = table
    return out[:length]


def apply_rope(x: Tensor, rot: Tensor) -> Tensor:
    """x [B, n, heads, head_dim]; rot [B, n, head_dim // 2, 2] -> rotated x (pairs of adjacent channels)."""
    xs = x.float().unflatten(-1, (-1, 2))
    cos, sin = rot[:, :, None, :, 0], rot[:, :, None, :, 1]
    out = torch.stack([xs[..., 0] * cos - xs[..., 1] * sin, xs[..., 1] * cos + xs[..., 0] * sin], -1)
    return out.flatten(-2).type_as(x)


class Attention(nn.Module):
    def __init__(self, cfg: LlamaGenConfig):
        super().__init__()
        self.cfg = cfg
        self.wqkv = nn.Linear(cfg.dim, (cfg.n_head + 2 * cfg.kv_heads) * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.dim, cfg.dim, bias=False)

    def forward(self, x: Tensor, rot: Tensor, positions: Tensor, allowed: Tensor,
                cache: StaticKVCache | None, layer: int) -> Tensor:
        cfg = self.cfg
        B, n, _ = x.shape
        kv = cfg.kv_heads * cfg.head_dim
        q, k, v = self.wqkv(x).split([cfg.dim, kv, kv], -1)
        q = apply_rope(q.view(B, n, cfg.n_head, cfg.head_dim), rot).transpose(1, 2)
        k = apply_rope(k.view(B, n, cfg.kv_heads, cfg.head_dim), rot).transpose(1, 2)
        v = v.view(B, n, cfg.kv_heads, cfg.head_dim).transpose(1, 2)
        if cache is not None:
            k, v = cache.write(layer, k, v, positions)
        if cfg.kv_heads != cfg.n_head:
            k = k.repeat_interleave(cfg.n_head // cfg.kv_heads, 1)
            v = v.repeat_interleave(cfg.n_head // cfg.kv_heads, 1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        return self.wo(y.transpose(1, 2).reshape(B, n, cfg.dim))


class FeedForward(nn.Module):
    def __init__(self, cfg: LlamaGenConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.hidden, bias=False)
        self.w3 = nn.Linear(cfg.dim, cfg.hidden, bias=False)
        self.w2 = nn.Linear(cfg.hidden, cfg.dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, cfg: LlamaGenConfig):
        super().__init__()
        self.attention = Attention(cfg)
        self.feed_forward = FeedForward(cfg)
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)

    def forward(self, x, rot, positions, allowed, cache, layer):
        x = x + self.attention(self.attention_norm(x), rot, positions, allowed, cache, layer)
        return x + self.feed_forward(self.ffn_norm(x))


class LlamaGenGPT(nn.Module):
    """The LlamaGen transformer (official name `Transformer`). Sequence: P condition tokens (P = 1 for c2i,
    cls_token_num for t2i) then image tokens; the output at position P - 1 + j predicts image token j."""

    def __init__(self, cfg: LlamaGenConfig):
        super().__init__()
        self.cfg = cfg
        if cfg.model_type == "c2i":
            self.cls_embedding = LabelEmbedder(cfg.num_classes, cfg.dim, cfg.class_dropout_prob)
        else:
            self.cls_embedding = CaptionEmbedder(cfg.caption_dim, cfg.dim, cfg.caption_token_num)
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self._rope: Tensor | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The official initialisation: N(0, 0.02) for linears and embeddings, zero output head."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
        nn.init.zeros_(self.output.weight)

    @property
    def has_null(self) -> bool:
        """Is there an unconditional input (needed for classifier-free guidance)?"""
        return self.cfg.model_type == "t2i" or self.cfg.class_dropout_prob > 0

    @property
    def null_class(self) -> int:
        return self.cfg.num_classes

    def rope(self, length: int, device) -> Tensor:
        if self._rope is None or self._rope.shape[0] < length or self._rope.device != torch.device(device):
            self._rope = rope_table(self.cfg, max(length, self.cfg.cls_token_num + 2 * self.cfg.block_size + 64),
                                    device)
        return self._rope

    def embed_condition(self, cond: Tensor) -> Tensor:
        """c2i: class ids [B] -> [B, 1, dim]; t2i: caption features [B, L, caption_dim] -> [B, L, dim]."""
        return self.cls_embedding(cond)[:, : self.cfg.cls_token_num]

    def null_condition(self, cond: Tensor) -> Tensor:
        """The unconditional input with cond's shape: class `num_classes`, or the learnt null caption."""
        if self.cfg.model_type == "c2i":
            return torch.full_like(cond, self.cfg.num_classes)
        return torch.zeros_like(cond) + self.cls_embedding.uncond_embedding.to(cond.dtype)

    def _trunk(self, h: Tensor, positions: Tensor, allowed: Tensor, cache: StaticKVCache | None) -> Tensor:
        # table length from shapes (the cache size, or the sequence itself), not positions.max(): no host sync
        length = cache.max_len if cache is not None else positions.shape[1]
        rot = self.rope(length, h.device)[positions]
        for i, layer in enumerate(self.layers):
            h = layer(h, rot, positions, allowed, cache, i)
        return self.output(self.norm(h)).float()

    @staticmethod
    def _allowed(q_pos: Tensor, n_slots: int, prefix_valid: Tensor | None) -> Tensor:
        """[B, 1, n, S]: causal over logical positions; padded condition slots are seen only by themselves."""
        slots = torch.arange(n_slots, device=q_pos.device)
        allowed = slots[None, None] <= q_pos[:, :, None]
        if prefix_valid is not None:
            P = prefix_valid.shape[1]
            col_ok = torch.ones(q_pos.shape[0], n_slots, dtype=torch.bool, device=q_pos.device)
            col_ok[:, :P] = prefix_valid.bool()
            allowed = (allowed & col_ok[:, None]) | (slots[None, None] == q_pos[:, :, None])
        return allowed[:, None]

    def forward(self, idx: Tensor, cond: Tensor, prefix_mask: Tensor | None = None) -> Tensor:
        """Full recompute without a cache. idx [B, n] image tokens, cond as in `embed_condition`,
        prefix_mask [B, P] (t2i caption padding, 1 = real) -> logits [B, n + 1, V] (logits[:, j] predicts
        image token j)."""
        h = torch.cat([self.embed_condition(cond), self.tok_embeddings(idx)], 1)
        B, L = h.shape[:2]
        positions = torch.arange(L, device=h.device).expand(B, L)
        logits = self._trunk(h, positions, self._allowed(positions, L, prefix_mask), None)
        return logits[:, self.cfg.prefix_len - 1:]

    # ---- cached decoding (per-row write pointers) -------------------------------------------------------------
    def new_cache(self, batch: int, capacity: int, device=None, dtype=None) -> StaticKVCache:
        """A cache for the condition plus `capacity` image tokens per row."""
        p = self.output.weight
        return StaticKVCache(self.cfg.n_layer, batch, self.cfg.kv_heads, self.cfg.prefix_len + capacity,
                             self.cfg.head_dim, device=device or p.device, dtype=dtype or p.dtype)

    def prefill(self, cond: Tensor, cache: StaticKVCache, prefix_mask: Tensor | None = None) -> Tensor:
        """Write the condition tokens of every row; returns logits [B, V] for image token 0."""
        h = self.embed_condition(cond)
        B, P = h.shape[:2]
        cache.set_lengths(torch.zeros_like(cache.lengths))
        positions = torch.arange(P, device=h.device).expand(B, P)
        cache.prefix_valid = prefix_mask     # padded caption slots stay hidden in later steps
        logits = self._trunk(h, positions, self._allowed(positions, cache.max_len, prefix_mask), cache)
        cache.advance(P)
        return logits[:, -1]

    def step(self, tokens: Tensor, cache: StaticKVCache) -> Tensor:
        """Append image tokens [B, n] at each row's write pointer; returns logits [B, n, V]."""
        positions = cache.positions(tokens.shape[1])
        allowed = self._allowed(positions, cache.max_len, getattr(cache, "prefix_valid", None))
        logits = self._trunk(self.tok_embeddings(tokens), positions, allowed, cache)
        cache.advance(tokens.shape[1])
        return logits


# ------------------------------------------------------------------------------------------------ VQ tokenizer
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
    """One resolution level: `res` blocks, `attn` blocks (lowest resolution only), and a resampler."""

    def __init__(self, blocks: list[nn.Module], attn: list[nn.Module]):
        super().__init__()
        self.res = nn.ModuleList(blocks)
        self.attn = nn.ModuleList(attn)

    def run(self, h: Tensor) -> Tensor:
        for i, block in enumerate(self.res):
            h = block(h)
            if len(self.attn):
                h = self.attn[i](h)
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
            level = _Level(blocks, attn)
            if i != len(mult) - 1:
                level.downsample = _Resample(c, up=False)
            self.conv_blocks.append(level)
        self.mid = nn.ModuleList([ResnetBlock(c, c), AttnBlock(c), ResnetBlock(c, c)])
        self.norm_out = _norm(c)
        self.conv_out = nn.Conv2d(c, cfg.z_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for level in self.conv_blocks:
            h = level.run(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
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
            level = _Level(blocks, attn)
            if i != 0:
                level.upsample = _Resample(c, up=True)
            self.conv_blocks.append(level)
        self.norm_out = _norm(c)
        self.conv_out = nn.Conv2d(c, out_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.conv_in(z)
        for m in self.mid:
            h = m(h)
        for level in self.conv_blocks:
            h = level.run(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
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


# ----------------------------------------------------------------------------------------- checkpoint loading
_IGNORED_SUFFIXES = (".kv_cache.k_cache", ".kv_cache.v_cache")
_IGNORED_KEYS = ("freqs_cis", "causal_mask")


def read_state_dict(path: str, trust_pickle: bool = False) -> dict[str, Tensor]:
    """A checkpoint file -> state dict: safetensors, or a torch .pt/.pth/.bin holding the weights directly or
    under "model" (DDP), "module" (DeepSpeed), "state_dict" or "ema"."""
    path = str(path)
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        return load_file(path, device="cpu")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:   # pickled extras (e.g. an argparse Namespace) need the full unpickler
        if not trust_pickle:
            raise ValueError(
                f"{path} holds more than tensors ({type(err).__name__}: {str(err).splitlines()[0][:200]}); "
                "if you trust the file, pass trust_pickle=True to unpickle it fully") from err
        obj = torch.load(path, map_location="cpu", weights_only=False)
    if isinstance(obj, dict):
        for key in ("model", "module", "state_dict", "ema"):
            if key in obj and isinstance(obj[key], dict):
                return obj[key]
        if all(isinstance(v, Tensor) for v in obj.values()):
            return obj
    raise ValueError(f"{path}: no state dict found (expected a dict of tensors, or one under 'model', "
                     f"'module', 'state_dict' or 'ema'); top-level keys: {list(obj)[:10] if isinstance(obj, dict) else type(obj).__name__}")


def load_checked(module: nn.Module, state: dict[str, Tensor], what: str = "checkpoint") -> None:
    """load_state_dict(strict=True) with an error that names every missing, unexpected and mis-shaped key.
    Wrapper prefixes ("module.", "_orig_mod.") and inference-only buffers (KV caches) are ignored."""
    clean = {}
    for key, value in state.items():
        for prefix in ("module.", "_orig_mod."):
            if key.startswith(prefix):
                key = key[len(prefix):]
        if key in _IGNORED_KEYS or key.endswith(_IGNORED_SUFFIXES):
            continue
        clean[key] = value
    own = module.state_dict()
    order = lambda k: (k.count("."), k)     # top-level tensors (embeddings, head) first, then per-layer ones
    missing = sorted(set(own) - set(clean), key=order)
    unexpected = sorted(set(clean) - set(own), key=order)
    shapes = [f"{k}: checkpoint {tuple(clean[k].shape)} vs model {tuple(own[k].shape)}"
              for k in sorted(set(own) & set(clean), key=order) if tuple(clean[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        def show(items):
            return ", ".join(items[:12]) + (f", ... ({len(items)} in all)" if len(items) > 12 else "")
        parts = []
        if shapes:
            parts.append(f"shape mismatch: {show(shapes)}")
        if missing:
            parts.append(f"missing keys: {show(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {show(unexpected)}")
        raise ValueError(f"the {what} does not fit the architecture ({type(module).__name__}). "
                         + "; ".join(parts)
                         + ". Check the model name, image size, vocabulary size, num_classes and model_type.")
    module.load_state_dict(clean, strict=True)
