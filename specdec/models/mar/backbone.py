"""The MAR model (Li et al., "Autoregressive Image Generation without Vector Quantization", arXiv 2406.11838):
an MAE-style encoder / decoder over continuous tokens with `buffer_size` class-embedding slots in front, and the
DiffLoss head (`specdec.models.mar.diffloss`). Written for specdec; parameter names and shapes follow the public
LTH14/mar code (models/mar.py with timm's ViT `Block`), so the released state dicts load strict.

One backbone pass (`MAR.condition`), as the official `forward_mae_encoder` + `forward_mae_decoder`:
1. z_proj(tokens) [R, L, E]; the buffer slots hold the row's class embedding (`class_emb`, or `fake_latent` for the
   unconditional CFG rows); + encoder_pos_embed_learned; z_proj_ln.
2. The encoder sees the buffer and the VISIBLE tokens only (unknown tokens are dropped), in position order.
3. decoder_embed; every unknown position gets `mask_token`; + decoder_pos_embed_learned; the decoder attends over
   all buffer + L slots; decoder_norm; the buffer is dropped; + diffusion_pos_embed_learned -> z [R, L, C].
Rows may have different numbers of visible tokens (speculative rows advance independently): the encoder then pads
to the batch's largest count and hides padded keys, which equals the official computation row by row.

`causal=True` (NOT an official variant; same weights layout): attention follows the generation order (rank) -- a
slot attends to slots of lower or equal rank, buffer slots have rank -1 -- and the condition of the token at rank r
is read from the decoder slot of rank r - 1 (the last buffer slot for r = 0), plus that token's diffusion position
embedding. So z of a token depends only on the class and the visible tokens generated before it, whatever else is
visible: one pass with a whole drafted prefix visible gives every drafted token its sequential conditional (the
shape a prefix-truncating speculative rule needs). Exact for one token per AR step (num_iter = seq_len); with
several tokens per step a later token of the step sees mask tokens where the sequential model saw tokens.

Not reproduced: training (random masking ratio, label drop, dropouts, diffusion_batch_mul, gradient
checkpointing, the DiffLoss training loss).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from specdec.models.mar.config import MARConfig
from specdec.models.mar.diffloss import DiffLoss


class Attention(nn.Module):
    """timm's ViT attention (keys qkv, proj): fused qkv with bias, softmax(q k^T / sqrt(head_dim)) v."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """x [R, P, dim]; mask None or BoolTensor [R, 1, P, P] (True = may attend)."""
        r, p, dim = x.shape
        q, k, v = self.qkv(x).reshape(r, p, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(out.transpose(1, 2).reshape(r, p, dim))


class Mlp(nn.Module):
    """timm's Mlp (keys fc1, fc2) with exact GELU."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """timm's pre-norm ViT block (keys norm1, attn, norm2, mlp); no layer scale, no qk-norm (as MAR builds it)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, eps: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        x = x + self.attn(self.norm1(x), mask)
        return x + self.mlp(self.norm2(x))


def _rank_mask(rank: Tensor) -> Tensor:
    """rank [R, P] (buffer slots -1) -> causal BoolTensor [R, 1, P, P]: query i may attend key j iff
    rank_j <= rank_i."""
    return (rank[:, None, :] <= rank[:, :, None])[:, None]


class MAR(nn.Module):
    """MAR with the official key layout. R = model rows (B, or 2B with CFG), L = seq_len, P = buffer_size + L,
    D = token_dim, E / C = encoder / decoder width."""

    def __init__(self, cfg: MARConfig):
        super().__init__()
        self.cfg = cfg
        e, d, slots = cfg.encoder_embed_dim, cfg.decoder_embed_dim, cfg.buffer_size + cfg.seq_len
        self.class_emb = nn.Embedding(cfg.class_num, e)
        self.fake_latent = nn.Parameter(torch.zeros(1, e))
        self.z_proj = nn.Linear(cfg.token_dim, e)
        self.z_proj_ln = nn.LayerNorm(e, eps=1e-6)
        self.encoder_pos_embed_learned = nn.Parameter(torch.zeros(1, slots, e))
        self.encoder_blocks = nn.ModuleList([Block(e, cfg.encoder_num_heads, cfg.mlp_ratio, cfg.norm_eps)
                                             for _ in range(cfg.encoder_depth)])
        self.encoder_norm = nn.LayerNorm(e, eps=cfg.norm_eps)
        self.decoder_embed = nn.Linear(e, d)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, d))
        self.decoder_pos_embed_learned = nn.Parameter(torch.zeros(1, slots, d))
        self.decoder_blocks = nn.ModuleList([Block(d, cfg.decoder_num_heads, cfg.mlp_ratio, cfg.norm_eps)
                                             for _ in range(cfg.decoder_depth)])
        self.decoder_norm = nn.LayerNorm(d, eps=cfg.norm_eps)
        self.diffusion_pos_embed_learned = nn.Parameter(torch.zeros(1, cfg.seq_len, d))
        self.initialize_weights()
        self.diffloss = DiffLoss(cfg.token_dim, d, cfg.diffloss_d, cfg.diffloss_w, cfg.num_sampling_steps,
                                 cfg.diffusion_steps)

    def initialize_weights(self) -> None:
        """The official init: N(0, 0.02) embeddings and tokens, xavier-uniform linears, unit LayerNorms."""
        for p in (self.class_emb.weight, self.fake_latent, self.mask_token, self.encoder_pos_embed_learned,
                  self.decoder_pos_embed_learned, self.diffusion_pos_embed_learned):
            nn.init.normal_(p, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm) and m.weight is not None:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    # ---- conditions -------------------------------------------------------------------------------------------
    def class_rows(self, labels: Tensor, cfg: bool) -> Tensor:
        """labels LongTensor [B] -> class embeddings of the model rows [R, E]: the B conditional rows, then (CFG)
        B rows of `fake_latent` (the official unconditional embedding)."""
        rows = self.class_emb(labels)
        return torch.cat([rows, self.fake_latent.expand(len(labels), -1)]) if cfg else rows

    # ---- backbone ---------------------------------------------------------------------------------------------
    def encode(self, tokens: Tensor, visible: Tensor, class_rows: Tensor, rank: Tensor | None = None
               ) -> tuple[Tensor, Tensor, Tensor]:
        """tokens [R, L, D], visible BoolTensor [R, L], class_rows [R, E], rank LongTensor [R, L] (causal only)
        -> (encoded kept slots [R, n, E], their slot indices [R, n] into the P slots, valid BoolTensor [R, n])."""
        r, buf = tokens.shape[0], self.cfg.buffer_size
        x = self.z_proj(tokens.to(self.z_proj.weight.dtype))
        x = torch.cat([class_rows[:, None].to(x.dtype).expand(r, buf, -1), x], 1)
        x = self.z_proj_ln(x + self.encoder_pos_embed_learned)
        keep = torch.cat([visible.new_ones(r, buf), visible], 1)
        counts = keep.sum(1)
        n, least = torch.stack([counts.max(), counts.min()]).tolist()    # one host sync per pass
        # kept slots first, in slot order (a stable sort of the "dropped" flags): the official `nonzero` order
        slots = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices[:, :n]
        valid = torch.arange(n, device=x.device)[None] < counts[:, None]
        x = x.gather(1, slots[..., None].expand(-1, -1, x.shape[-1]))
        mask = None
        if rank is not None:
            mask = _rank_mask(self._slot_rank(rank).gather(1, slots))
        if least < n:
            keys = valid[:, None, None, :]
            mask = keys if mask is None else mask & keys
        for block in self.encoder_blocks:
            x = block(x, mask)
        return self.encoder_norm(x), slots, valid

    def decode(self, x: Tensor, slots: Tensor, valid: Tensor, rank: Tensor | None = None) -> Tensor:
        """Encoded kept slots [R, n, E] (from `encode`) -> decoder output of all P slots [R, P, C]."""
        x = self.decoder_embed(x)
        r, slots_total = x.shape[0], self.cfg.buffer_size + self.cfg.seq_len
        full = x.new_zeros(r, slots_total, x.shape[-1]).scatter(1, slots[..., None].expand_as(x), x)
        kept = torch.zeros(r, slots_total, dtype=torch.bool, device=x.device).scatter(1, slots, valid)
        x = torch.where(kept[..., None], full, self.mask_token.to(x.dtype)) + self.decoder_pos_embed_learned
        mask = None if rank is None else _rank_mask(self._slot_rank(rank))
        for block in self.decoder_blocks:
            x = block(x, mask)
        return self.decoder_norm(x)

    def condition(self, tokens: Tensor, visible: Tensor, class_rows: Tensor, positions: Tensor,
                  rank: Tensor | None = None) -> Tensor:
        """One backbone pass -> z [R, n, C] for the token positions [R, n] (LongTensor). rank [R, L]: the
        generation rank of every position, given only for a causal pass (see the module docstring)."""
        enc, slots, valid = self.encode(tokens, visible, class_rows, rank)
        dec = self.decode(enc, slots, valid, rank)
        buf = self.cfg.buffer_size
        if rank is None:
            src = positions + buf
        else:
            # the slot generated just before each predicted position; rank 0 reads the last buffer slot
            r = rank.gather(1, positions)
            order = torch.argsort(rank, dim=1)
            prev = order.gather(1, (r - 1).clamp_min(0))
            src = torch.where(r > 0, prev + buf, torch.full_like(prev, buf - 1))
        z = dec.gather(1, src[..., None].expand(-1, -1, dec.shape[-1]))
        pos = self.diffusion_pos_embed_learned[0]
        return z + pos[positions]

    def _slot_rank(self, rank: Tensor) -> Tensor:
        """rank [R, L] -> [R, P] with the buffer slots at -1."""
        return torch.cat([rank.new_full((rank.shape[0], self.cfg.buffer_size), -1), rank], 1)

    # ---- tokens <-> latent maps (official patchify / unpatchify) --------------------------------------------------
    def patchify(self, latents: Tensor) -> Tensor:
        """VAE latents [B, c, h, w] -> tokens [B, (h/p)(w/p), c p^2] (channel-major within a patch)."""
        b, c, h, w = latents.shape
        p = self.cfg.patch_size
        x = latents.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(b, (h // p) * (w // p), c * p * p)

    def unpatchify(self, tokens: Tensor) -> Tensor:
        """tokens [B, L, D] -> VAE latents [B, vae_embed_dim, side p, side p]."""
        b, p, c, side = tokens.shape[0], self.cfg.patch_size, self.cfg.vae_embed_dim, self.cfg.seq_side
        x = tokens.reshape(b, side, side, c, p, p).permute(0, 3, 1, 4, 2, 5)
        return x.reshape(b, c, side * p, side * p)
