"""EAGLE's draft head: a single decoder layer that predicts the target's next feature (Li et al., "EAGLE: Speculative
Sampling Requires Rethinking Feature Uncertainty", arXiv 2401.15077; trees as in EAGLE-2, arXiv 2406.16858).

The target's feature h_t is its last hidden state at the input position before image token t (the vector its output
head turns into the logits of token t). The head reads pairs: pair t = (h_t, embedding of token x_t), fused by one
linear layer, through `n_layers` causal decoder layers (the project's GPT blocks, rotary positions, static cache)
and a final RMSNorm, and predicts h_{t+1}. The target's own output head turns that into the draft law of token
t+1, and its own input embeddings embed the tokens: the head owns neither, so it stays small (one layer) and is
tied to the target it was trained on (the hidden size is checked).

Drafting feeds true features for committed tokens and the head's own predictions for drafted ones, exactly as in
training (`experiments/train_eagle.py` teaches the head on the target's features with a small input noise, so its
own predictions are inputs it can use). `unrolled` goes further, as EAGLE-3's training-time test (Li et al.,
arXiv 2503.01840): it runs the head on its own predicted features in the very context drafting gives them, so the
second and later draft tokens are trained, not only the first.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from specdec.cache import StaticKVCache
from specdec.models.gpt import Block, GPTConfig, RMSNorm, run_blocks


@dataclass(frozen=True)
class EagleConfig:
    dim: int = 384                 # the target's hidden size (H)
    n_heads: int = 6
    n_layers: int = 1
    mlp_ratio: float = 8 / 3
    max_len: int = 160             # pairs the cache holds by default (rotary positions: no weight depends on it)
    rope_base: float = 10000.0
    norm_eps: float = 1e-5

    def __post_init__(self):
        for name in ("dim", "n_heads", "n_layers", "max_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"EagleConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.dim % self.n_heads:
            raise ValueError(f"dim={self.dim} must be divisible by n_heads={self.n_heads}")

    @property
    def blocks(self) -> GPTConfig:
        """The decoder layers' configuration (vocabulary and classes unused: the head embeds nothing itself)."""
        return GPTConfig(vocab_size=1, num_classes=1, dim=self.dim, n_layers=self.n_layers, n_heads=self.n_heads,
                         mlp_ratio=self.mlp_ratio, max_len=self.max_len, rope_base=self.rope_base,
                         norm_eps=self.norm_eps)


class EagleHead(nn.Module):
    """(features [B, n, H], token embeddings [B, n, H]) -> predicted next features [B, n, H].

    rank_acceptance: the head's measured rank acceptance profile with siblings drawn without replacement
    (`specdec.tree_profile`), from which its "optimal-N" draft trees are built; None until measured (the zoo sets
    it from the head's card)."""

    rank_acceptance: tuple[float, ...] | None = None

    def __init__(self, cfg: EagleConfig):
        super().__init__()
        self.cfg = cfg
        self.fuse = nn.Linear(2 * cfg.dim, cfg.dim)
        self.blocks = nn.ModuleList(Block(cfg.blocks) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
        nn.init.zeros_(self.fuse.bias)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def new_cache(self, batch: int, max_len: int | None = None, device=None, dtype=None) -> StaticKVCache:
        p = self.fuse.weight
        b = self.cfg.blocks
        return StaticKVCache(b.n_layers, batch, b.n_heads, max_len or b.max_len, b.head_dim,
                             device=device or p.device, dtype=dtype or p.dtype)

    def forward(self, features: Tensor, embeddings: Tensor, positions: Tensor, cache: StaticKVCache | None = None,
                slots: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        """Pairs at logical positions [B, n]. cache None: over the n pairs themselves (training), causal or as `mask`
        [n, n] allows; else K/V are written to `slots` (default: the positions) and attention follows `mask`
        (default: the causal prefix)."""
        x = self.fuse(torch.cat([features, embeddings.to(features.dtype)], -1))
        return run_blocks(self.blocks, self.norm, self.cfg.blocks, x, positions, cache, slots, mask)


def unrolled_mask(n: int, levels: int, device=None) -> Tensor:
    """Boolean [levels * n, levels * n] attention mask (True: attend) over `levels` copies of n pairs, copy l
    holding pair t as drafted l tokens after the last committed pair t - l (copy 0: true features, causal). Copy l
    pair t sees what drafting shows it: the true pairs j <= t - l and its own chain, the copy-m pair t - l + m for
    1 <= m <= l. Pairs t < l have no such chain (their rows are well defined but meaningless: leave them out)."""
    t = torch.arange(n, device=device)
    level = torch.arange(levels, device=device)
    row_l, row_t = level[:, None, None, None], t[None, :, None, None]        # [L, n, 1, 1]
    col_m, col_j = level[None, None, :, None], t[None, None, None, :]        # [1, 1, L, n]
    true_context = (col_m == 0) & (col_j <= row_t - row_l)
    own_chain = (col_m >= 1) & (col_m <= row_l) & (col_j == row_t - row_l + col_m)
    return (true_context | own_chain).reshape(levels * n, levels * n)


def unrolled(head: EagleHead, features: Tensor, embeddings: Tensor, levels: int) -> Tensor:
    """Training-time test: features h_0..h_{n-1} [B, n, H] and embeddings of x_0..x_{n-1} [B, n, H] -> predictions
    [levels, B, n, H], level l at pair t being the head's prediction of h_{t+1} when pair t is its (l+1)-th draft,
    its input feature the level-(l-1) prediction of h_t. One forward over all levels gives the result; the levels'
    input features come from cheaper forwards before it, without gradient (the chain is not differentiated
    through, which about halves the cost of a training step). Level 0 is the plain teacher-forced forward. Pairs t < l
    at level l are meaningless (see `unrolled_mask`)."""
    if levels < 1:
        raise ValueError(f"unrolled needs levels >= 1 (draft depths to train), got {levels}")
    B, n, H = features.shape
    positions = torch.arange(n, device=features.device).repeat(levels).expand(B, -1)
    mask = unrolled_mask(n, levels, features.device)
    inputs = [features]
    for level in range(1, levels + 1):
        with torch.set_grad_enabled(torch.is_grad_enabled() and level == levels):
            out = head(torch.cat(inputs, 1), embeddings.repeat(1, level, 1), positions[:, :level * n],
                       mask=mask[:level * n, :level * n]).view(B, level, n, H)
        if level < levels:        # copy `level` reads the previous copy's prediction of h_t at pair t
            inputs.append(torch.cat([features[:, :1], out[:, level - 1, :-1]], 1))
    return out.transpose(0, 1)
