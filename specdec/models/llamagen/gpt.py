"""The LlamaGen GPT (Sun et al., "Autoregressive Model Beats Diffusion: Llama for Scalable Image Generation",
arXiv 2406.06525), written for specdec and decoding with a `specdec.cache.StaticKVCache` (per-row write pointers,
ragged rows). Parameter names and shapes follow the public FoundationVision/LlamaGen code
(autoregressive/models/gpt.py), so the official state dicts load as is.

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


def _repeat_heads(x: Tensor, n: int) -> Tensor:
    """[B, H, S, D] -> [B, H * n, S, D], each head n times in a row (= repeat_interleave(n, 1), a view + copy)."""
    B, H, S, D = x.shape
    return x[:, :, None].expand(B, H, n, S, D).reshape(B, H * n, S, D)


class Attention(nn.Module):
    def __init__(self, cfg: LlamaGenConfig):
        super().__init__()
        self.cfg = cfg
        self.wqkv = nn.Linear(cfg.dim, (cfg.n_head + 2 * cfg.kv_heads) * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.dim, cfg.dim, bias=False)

    def forward(self, x: Tensor, rot: Tensor, slots: Tensor, allowed: Tensor,
                cache: StaticKVCache | None, layer: int) -> Tensor:
        """x [B, n, dim], rot: the rotation of each input's position, slots [B, n]: where its K/V are cached (its
        position, but for a draft tree's nodes)."""
        cfg = self.cfg
        B, n, _ = x.shape
        kv = cfg.kv_heads * cfg.head_dim
        q, k, v = self.wqkv(x).split([cfg.dim, kv, kv], -1)
        q = apply_rope(q.view(B, n, cfg.n_head, cfg.head_dim), rot).transpose(1, 2)
        k = apply_rope(k.view(B, n, cfg.kv_heads, cfg.head_dim), rot).transpose(1, 2)
        v = v.view(B, n, cfg.kv_heads, cfg.head_dim).transpose(1, 2)
        if cache is not None:
            k, v = cache.write(layer, k, v, slots)
        if cfg.kv_heads != cfg.n_head:      # grouped-query attention: each K/V head serves n_head/kv_heads queries
            k, v = _repeat_heads(k, cfg.n_head // cfg.kv_heads), _repeat_heads(v, cfg.n_head // cfg.kv_heads)
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

    def _trunk(self, h: Tensor, positions: Tensor, allowed: Tensor, cache: StaticKVCache | None,
               slots: Tensor | None = None) -> Tensor:
        # table length from shapes (the cache size, or the sequence itself), not positions.max(): no host sync
        length = cache.max_len if cache is not None else positions.shape[1]
        rot = self.rope(length, h.device)[positions]
        slots = positions if slots is None else slots
        for i, layer in enumerate(self.layers):
            h = layer(h, rot, slots, allowed, cache, i)
        h = self.norm(h)
        if cache is not None and cache.keep_hidden:
            cache.hidden = h
        return self.output(h).float()

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
        cache.prefix_valid = None if prefix_mask is None else prefix_mask.bool()   # hidden in later steps too
        logits = self._trunk(h, positions, self._allowed(positions, cache.max_len, prefix_mask), cache)
        cache.advance(P)
        return logits[:, -1]

    def step_tree(self, tokens: Tensor, cache: StaticKVCache, positions: Tensor, slots: Tensor, allowed: Tensor,
                  base: Tensor | None = None) -> Tensor:
        """A forward over (part of) a draft tree whose slots start at base [B] (see `specdec.tree.verify_inputs`):
        tokens, positions (sequence positions: the 2-D RoPE of root + depth), slots [B, n], allowed [B, n, m] ->
        logits [B, n, V]. The cache's lengths do not move; padded caption slots stay hidden."""
        base = slots[:, 0] if base is None else base
        mask = cache.tree_mask(base, allowed)
        if cache.prefix_valid is not None:
            P = cache.prefix_valid.shape[1]
            mask[:, :, :, :P] &= cache.prefix_valid[:, None, None, :]
        return self._trunk(self.tok_embeddings(tokens), positions, mask, cache, slots)

    def step(self, tokens: Tensor, cache: StaticKVCache) -> Tensor:
        """Append image tokens [B, n] at each row's write pointer; returns logits [B, n, V]."""
        positions = cache.positions(tokens.shape[1])
        allowed = self._allowed(positions, cache.max_len, cache.prefix_valid)
        logits = self._trunk(self.tok_embeddings(tokens), positions, allowed, cache)
        cache.advance(tokens.shape[1])
        return logits
