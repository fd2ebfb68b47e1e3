"""A small Llama-style class-conditional image-token decoder (the LlamaGen c2i setting, in miniature).

One file, read top to bottom: RMSNorm, rotary embeddings, attention with a `StaticKVCache`, SwiGLU MLP, blocks,
the model. Position 0 holds the class embedding (index `num_classes` is the null class used for classifier-free
guidance); positions 1.. hold image tokens. The output at position t predicts image token t.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from specdec.cache import StaticKVCache


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = 512          # image tokens
    num_classes: int = 10          # + 1 null class for CFG
    dim: int = 256
    n_layers: int = 6
    n_heads: int = 8
    mlp_ratio: float = 8 / 3
    max_len: int = 160             # class prefix + image tokens + draft slack
    rope_base: float = 10000.0
    norm_eps: float = 1e-5

    def __post_init__(self):
        if self.dim % self.n_heads:
            raise ValueError(f"dim={self.dim} must be divisible by n_heads={self.n_heads}")
        for name in ("vocab_size", "num_classes", "dim", "n_layers", "n_heads", "max_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"GPTConfig.{name} must be >= 1, got {getattr(self, name)}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def hidden(self) -> int:
        return int(self.mlp_ratio * self.dim + 31) // 32 * 32


@dataclass
class StepInputs:
    """What every layer of one forward shares: positions [B, n], rotary tables, the cache, its mask and the cache
    slots [B, n] the inputs are written to (the positions, but for a draft tree's nodes)."""

    positions: Tensor
    cos: Tensor
    sin: Tensor
    cache: StaticKVCache | None
    mask: Tensor | None
    slots: Tensor | None = None


class RMSNorm(nn.Module):
    """RMS normalisation computed in float32 whatever the activations' dtype (also used by models.llamagen)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def rotary_tables(positions: Tensor, head_dim: int, base: float, dtype) -> tuple[Tensor, Tensor]:
    """cos, sin [B, 1, n, head_dim/2] for logical positions [B, n] (per row, so ragged rows stay exact).
    Computed once per forward and shared by every layer: small models are dominated by per-call overhead."""
    half = head_dim // 2
    freqs = base ** (-torch.arange(half, device=positions.device, dtype=torch.float32) / half)
    angles = positions[:, None, :, None].float() * freqs
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x [B, heads, n, head_dim] by the tables of `rotary_tables`."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1)


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias=False)
        self.proj = nn.Linear(cfg.dim, cfg.dim, bias=False)

    def forward(self, x: Tensor, inputs: "StepInputs", layer: int) -> Tensor:
        B, n, _ = x.shape
        q, k, v = self.qkv(x).view(B, n, 3, self.cfg.n_heads, self.cfg.head_dim).permute(2, 0, 3, 1, 4)
        q, k = rotary(q, inputs.cos, inputs.sin), rotary(k, inputs.cos, inputs.sin)
        if inputs.cache is None:       # training: causal, or the given mask over the n inputs themselves
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=inputs.mask, is_causal=inputs.mask is None)
        else:
            k_all, v_all = inputs.cache.write(layer, k, v, inputs.slots)
            y = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=inputs.mask)
        return self.proj(y.transpose(1, 2).reshape(B, n, -1))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.gate_up = nn.Linear(cfg.dim, 2 * cfg.hidden, bias=False)
        self.down = nn.Linear(cfg.hidden, cfg.dim, bias=False)

    def forward(self, x, inputs: "StepInputs", layer: int):
        x = x + self.attn(self.attn_norm(x), inputs, layer)
        gate, up = self.gate_up(self.mlp_norm(x)).chunk(2, -1)
        return x + self.down(F.silu(gate) * up)


def run_blocks(blocks: nn.ModuleList, norm: RMSNorm, cfg: GPTConfig, x: Tensor, positions: Tensor,
               cache: StaticKVCache | None, slots: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
    """x [B, n, dim] at logical positions [B, n] through `blocks` and the final norm (cache None: over x itself,
    causal or as `mask` [n, n] allows; else written to `slots`, default the positions, attending what `mask`
    allows, default the causal prefix)."""
    cos, sin = rotary_tables(positions, cfg.head_dim, cfg.rope_base, x.dtype)
    if mask is None and cache is not None:
        mask = cache.attention_mask(positions)
    inputs = StepInputs(positions, cos, sin, cache, mask, positions if slots is None else slots)
    for i, block in enumerate(blocks):
        x = block(x, inputs, i)
    return norm(x)


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.cls_emb = nn.Embedding(cfg.num_classes + 1, cfg.dim)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.apply(self._init)

    @staticmethod
    def _init(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)

    @property
    def null_class(self) -> int:
        return self.cfg.num_classes

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def new_cache(self, batch: int, max_len: int | None = None, device=None, dtype=None) -> StaticKVCache:
        p = self.head.weight
        return StaticKVCache(self.cfg.n_layers, batch, self.cfg.n_heads, max_len or self.cfg.max_len,
                             self.cfg.head_dim, device=device or p.device, dtype=dtype or p.dtype)

    def trunk(self, x: Tensor, positions: Tensor, cache: StaticKVCache | None, slots: Tensor | None = None,
              mask: Tensor | None = None) -> Tensor:
        x = run_blocks(self.blocks, self.norm, self.cfg, x, positions, cache, slots, mask)
        if cache is not None and cache.keep_hidden:
            cache.hidden = x
        return x

    def forward_train(self, tokens: Tensor, classes: Tensor) -> Tensor:
        """Teacher forcing. tokens [B, T] image ids, classes [B] -> logits [B, T, V] (logits[:, t] predicts t)."""
        B, T = tokens.shape
        x = torch.cat([self.cls_emb(classes)[:, None], self.tok_emb(tokens[:, :-1])], 1)
        positions = torch.arange(T, device=tokens.device).expand(B, T)
        return self.head(self.trunk(x, positions, None))

    def prefill(self, classes: Tensor, cache: StaticKVCache) -> Tensor:
        """Write the class prefix of every row at position 0; returns logits [B, V] for image token 0."""
        positions = torch.zeros(classes.shape[0], 1, dtype=torch.long, device=classes.device)
        cache.set_lengths(torch.zeros_like(cache.lengths))
        h = self.trunk(self.cls_emb(classes)[:, None], positions, cache)
        cache.advance(1)
        return self.head(h[:, 0])

    def step_tree(self, tokens: Tensor, cache: StaticKVCache, positions: Tensor, slots: Tensor,
                  allowed: Tensor, base: Tensor | None = None) -> Tensor:
        """A forward over (part of) a draft tree whose slots start at base [B] (default slots[:, 0]; see
        `specdec.tree.verify_inputs`): tokens, positions, slots [B, n], allowed [B, n, m] over the tree's m slots ->
        logits [B, n, V]. Writes K/V to the slots; the cache's lengths do not move (an accepted path is committed
        with `StaticKVCache.move` and `set_lengths`)."""
        base = slots[:, 0] if base is None else base
        h = self.trunk(self.tok_emb(tokens), positions, cache, slots, cache.tree_mask(base, allowed))
        return self.head(h)

    def step(self, tokens: Tensor, cache: StaticKVCache) -> Tensor:
        """Append image tokens [B, n] at each row's own write pointer; returns logits [B, n, V]."""
        positions = cache.positions(tokens.shape[1])
        h = self.trunk(self.tok_emb(tokens), positions, cache)
        cache.advance(tokens.shape[1])
        return self.head(h)
