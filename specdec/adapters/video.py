"""Discrete block-autoregressive video: any token ARModel whose grid is (F, H, W) as a `BlockGenerator`, and a
per-frame token decoder as a `BlockDecoder`, for block-level routing (SDVG, Hu & Zhang, arXiv 2604.17397).

Tokens are laid out in raster order over (frame, row, column), so a block of F_b frames is a contiguous run of
n = F_b * H * W tokens. A block is sampled token by token from the model through `specdec.sampling.to_probs` (CFG
mix, temperature, top-k/p, the model's token mask) by inverse CDF with pre-drawn uniforms: the block's whole
randomness is its "noise" [B, n], so the target can regenerate a rejected draft from the same uniforms, and a
generator fed the uniforms of plain AR sampling reproduces it token for token.

Cache: the model's own cache holds the committed blocks. Drafting a block feeds its first n - 1 tokens after them;
committing the same tokens then only feeds the last one, while committing other tokens (another generator's
block) rolls the draft back and feeds the whole block in one forward.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor

from specdec.protocols import ARModel, BlockDecoder, BlockGenerator, require
from specdec.random import sample_categorical
from specdec.sampling import Sampling, to_probs
from specdec.types import Logits


def check_video_grid(model: ARModel, frames_per_block: int) -> tuple[int, int, int]:
    """The model's (F, H, W) after checking that it is a video grid matching num_tokens and that frames_per_block
    divides F; ValueError otherwise."""
    grid = tuple(model.grid)
    if len(grid) != 3:
        raise ValueError(f"a block generator needs a video grid (F, H, W); {type(model).__name__} has grid {grid}: "
                         f"wrap a model whose tokens are laid out frame by frame")
    if math.prod(grid) != model.num_tokens:
        raise ValueError(f"the grid {grid} holds {math.prod(grid)} tokens but the model has num_tokens="
                         f"{model.num_tokens}; fix the adapter's grid or num_tokens so that F * H * W == num_tokens")
    if isinstance(frames_per_block, bool) or not isinstance(frames_per_block, int) or frames_per_block < 1 \
            or grid[0] % frames_per_block:
        raise ValueError(f"frames_per_block must be a positive divisor of the clip's {grid[0]} frames, got "
                         f"{frames_per_block!r}")
    return grid


@dataclass
class TokenBlockState:
    """A batch of clips in progress.

    model_state: the ARModel's decode state (its cache holds the committed blocks' tokens, plus a draft's first
                 n - 1 tokens while `pending` is set)
    logits:      Logits [B, 1, V] predicting the first token of the next block
    batch:       B;  blocks_done: committed blocks;  pending: LongTensor [B, n], the last drafted block, or None
    """

    model_state: Any
    logits: Logits
    batch: int
    blocks_done: int = 0
    pending: Tensor | None = None


class TokenBlockGenerator(BlockGenerator):
    """model: an ARModel with grid (F, H, W); frames_per_block: F_b (divides F); sampling: how tokens are drawn.
    Latents of a block are token ids LongTensor [B, F_b, H, W]; its noise is uniforms [B, F_b * H * W]."""

    def __init__(self, model: ARModel, frames_per_block: int, sampling: Sampling = Sampling()):
        require(model, ARModel, "the block generator's model")
        if not isinstance(sampling, Sampling):
            raise TypeError(f"sampling must be a specdec.Sampling, got {type(sampling).__name__}")
        self.model = model
        self.num_frames, self.height, self.width = check_video_grid(model, frames_per_block)
        self.frames_per_block = frames_per_block
        self.num_blocks = self.num_frames // frames_per_block
        self.block_tokens = frames_per_block * self.height * self.width
        self.sampling = sampling

    @property
    def device(self) -> torch.device:
        return self.model.device

    def start(self, cond: Any) -> TokenBlockState:
        """Prefill the condition (class ids [B] for the project's GPT); nothing committed yet."""
        state, logits = self.model.start(cond, self.sampling, self.model.num_tokens)
        return TokenBlockState(state, logits, logits.cond.shape[0])

    def block_noise(self, state: TokenBlockState, block: int, generator: torch.Generator) -> Tensor:
        """Uniforms [B, n] in [0, 1) drawn from `generator` (on its device, then moved to the model's)."""
        u = torch.rand(state.batch, self.block_tokens, generator=generator, device=generator.device)
        return u.to(self.device)

    @torch.no_grad()
    def generate_block(self, state: TokenBlockState, block: int, noise: Tensor) -> Tensor:
        """Sample block `block` token by token, token j by inverse CDF at noise[:, j] -> ids [B, F_b, H, W].
        Leaves the committed context as it was (the draft's tokens stay in the cache only until the next call)."""
        self._check_order(state, block)
        if not isinstance(noise, Tensor) or tuple(noise.shape) != (state.batch, self.block_tokens):
            raise ValueError(f"noise must be uniforms [B, n] = [{state.batch}, {self.block_tokens}] (block_noise), "
                             f"got {tuple(noise.shape) if isinstance(noise, Tensor) else type(noise).__name__}")
        self._drop_pending(state)
        logits = state.logits
        tokens = []
        for j in range(self.block_tokens):
            p = to_probs(logits.cond[:, -1], None if logits.uncond is None else logits.uncond[:, -1],
                         self.sampling, self.model.token_mask)
            tokens.append(sample_categorical(p, noise[:, j]))
            if j < self.block_tokens - 1:        # the last token is fed when the block is committed
                logits = self.model.forward(state.model_state, tokens[-1][:, None])
        state.pending = torch.stack(tokens, 1)
        return state.pending.view(state.batch, self.frames_per_block, self.height, self.width)

    @torch.no_grad()
    def commit_block(self, state: TokenBlockState, block: int, latents: Tensor) -> None:
        """Append block `block`'s tokens latents [B, F_b, H, W] (drafted here or by another generator over the
        same vocabulary) to the context, and compute the logits of the next block's first token."""
        self._check_order(state, block)
        shape = (state.batch, self.frames_per_block, self.height, self.width)
        if not isinstance(latents, Tensor) or tuple(latents.shape) != shape or latents.dtype.is_floating_point:
            raise ValueError(f"latents must be token ids [B, F_b, H, W] = {list(shape)}, got "
                             f"{tuple(latents.shape) if isinstance(latents, Tensor) else type(latents).__name__}")
        tokens = latents.reshape(state.batch, self.block_tokens).to(self.device)
        last = block == self.num_blocks - 1
        if state.pending is not None and torch.equal(state.pending, tokens):
            feed = tokens[:, -1:]                # its first n - 1 tokens are already in the cache
        else:
            self._drop_pending(state)
            feed = tokens
        state.pending = None
        if not last:                              # after the last block nothing is predicted
            logits = self.model.forward(state.model_state, feed)
            state.logits = Logits(logits.cond[:, -1:], None if logits.uncond is None else logits.uncond[:, -1:])
        state.blocks_done += 1

    def _drop_pending(self, state: TokenBlockState) -> None:
        if state.pending is not None:
            keep = torch.full((state.batch,), state.blocks_done * self.block_tokens, dtype=torch.long,
                              device=self.device)
            self.model.rollback(state.model_state, keep)
            state.pending = None

    def _check_order(self, state: TokenBlockState, block: int) -> None:
        if block != state.blocks_done or block >= self.num_blocks:
            raise ValueError(f"blocks are generated and committed in order: expected block {state.blocks_done} of "
                             f"{self.num_blocks}, got {block!r}")


class TokenFrameDecoder(BlockDecoder):
    """A stateless decoder that decodes every frame of a block independently as an image of grid (H, W):
    `model` is anything with decode(tokens [N, H, W]) -> pixels [N, 3, h, w] (an image ARModel such as the zoo's
    GPTAdapter, whose decode also takes the grid; a VQ tokenizer's grid decoder), or such a function itself."""

    def __init__(self, model: Any):
        fn = getattr(model, "decode", model)
        if not callable(fn):
            raise TypeError(f"TokenFrameDecoder needs an object with decode(tokens [N, H, W]) or a function, got "
                            f"{type(model).__name__}")
        self._decode: Callable[[Tensor], Tensor | None] = fn

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """latents: ids [B, F_b, H, W] -> frames [B, F_b, 3, h, w]."""
        if not isinstance(latents, Tensor) or latents.dim() != 4:
            raise ValueError(f"latents must be token ids [B, F_b, H, W], got "
                             f"{tuple(latents.shape) if isinstance(latents, Tensor) else type(latents).__name__}")
        B, Fb, H, W = latents.shape
        pixels = self._decode(latents.reshape(B * Fb, H, W))
        if not isinstance(pixels, Tensor) or pixels.dim() != 4 or pixels.shape[0] != B * Fb:
            raise ValueError(f"the frame decoder must return pixels [N, 3, h, w] for N = {B * Fb} frames, got "
                             f"{tuple(pixels.shape) if isinstance(pixels, Tensor) else pixels!r} (an adapter built "
                             f"without a decoder returns None)")
        return pixels.reshape(B, Fb, *pixels.shape[1:])
