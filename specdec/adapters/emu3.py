"""Adapter for Emu3 image generation (transformers `Emu3ForConditionalGeneration`).

Wang et al., "Emu3: Next-Token Prediction is All You Need", arXiv 2409.18869. Emu3's visual tokens live inside its
shared text vocabulary (`vocabulary_mapping.img2bpe`: VQ code k -> model id), and the image is written row by row
with an end-of-line token (`<|extra_200|>`) after each of the H rows of W tokens, which transformers' recipe forces
with `prefix_allowed_tokens_fn`.

The engine sees only the H*W visual tokens (ids 0..V-1 = VQ codes; logits restricted to the visual tokens). The
adapter writes the EOL tokens into the model's input stream itself: engine token j owns a "group" of stream slots
[token j] or [token j, EOL] when j ends a row, and the logits returned for j are those of the group's last slot
(after an EOL, the prediction of the next row's first token). Rows of one batch feed different numbers of EOLs in
a step, so the shorter rows' groups are followed by pad slots that are marked as holes at once; rollback drops
whole groups. Positions stay each row's logical stream positions.

CFG as Emu3 does it: unconditional rows run the negative prompt (`uncond_prompt`); the engine mixes
`uncond + s * (cond - uncond)` on the visual-token logits, which equals transformers'
`UnbatchedClassifierFreeGuidanceLogitsProcessor` (it mixes full-vocabulary log-softmaxes; restricted to the visual
tokens the two differ by a per-row constant, which changes neither argmax nor softmax).

cond: prompt ids [B, P] (or a list of 1-D tensors) ending where the first visual token follows, i.e. the processor's
output with `return_for_image_generation=True` ("...<|image start|>H*W<|image token|>").
"""
from __future__ import annotations

import torch
from torch import Tensor

from specdec.adapters.hf_causal import HFCausalAdapter, HFState
from specdec.types import Logits


class Emu3Adapter(HFCausalAdapter):
    """ARModel over `Emu3ForConditionalGeneration`. grid = (H, W) in visual tokens (from the processor's
    `image_sizes`); uncond_prompt = negative prompt ids [P'] for CFG."""

    def __init__(self, model, grid: tuple[int, int], uncond_prompt: Tensor | None = None, pad_id: int = 0,
                 compact_every: int = 16):
        mapping = model.vocabulary_mapping
        V = model.config.vq_config.codebook_size
        img2bpe = mapping.img2bpe
        missing = [k for k in range(V) if k not in img2bpe]
        if missing:
            raise ValueError(f"the vocabulary map lacks visual tokens for VQ codes {missing[:8]}"
                             f"{' ...' if len(missing) > 8 else ''}; expected '<|visual token{{k:06d}}|>' for "
                             f"k < {V}")
        if mapping.eol_token_id is None:
            raise ValueError("the vocabulary map has no end-of-line token '<|extra_200|>'")
        if len(grid) != 2 or min(grid) < 1:
            raise ValueError(f"grid must be (height, width) in visual tokens, got {grid}")
        ids = torch.tensor([img2bpe[k] for k in range(V)], dtype=torch.long)
        super().__init__(model, ids, grid, uncond_prompt=uncond_prompt, pad_id=pad_id,
                         codebook=model.model.vqmodel.quantize.embedding.weight.detach(),
                         compact_every=compact_every)
        self.eol_id = int(mapping.eol_token_id)
        W = self.grid[1]
        # the stream holds W + 1 slots per W engine tokens; keep the prompt's room out of it as well
        self.max_new_tokens = self.max_new_tokens * W // (W + 1)

    supports_trees = False         # a tree would need end-of-line slots inside its block

    def _slots(self, k: Tensor) -> Tensor:
        """Stream slots taken by the first k engine tokens: k tokens + one EOL per completed row (rollback drops
        whole groups)."""
        return k + k // self.grid[1]

    @torch.no_grad()
    def forward(self, state: HFState, tokens: Tensor) -> Logits:
        tokens = state.double(tokens)
        R, n = tokens.shape
        W = self.grid[1]
        device = tokens.device
        index = state.generated[:, None] + torch.arange(n, device=device)        # engine index of each token
        eol_after = (index % W == W - 1).long()
        size = 1 + eol_after                                                      # group size in the stream
        offset = size.cumsum(1) - size                                            # stream slot of each token
        length = size.sum(1)                                                      # [R] real slots per row
        L = n + (n + W - 1) // W        # static: the most EOLs n tokens can cross; no host sync for max()
        stream = torch.full((R, L), self.eol_id, dtype=torch.long, device=device)
        stream.scatter_(1, offset, self.image_token_ids[tokens])
        old_pos = state.holes.next_pos
        positions, allowed = state.holes.extend(L)
        # pad slots (past a row's own groups) are holes from the start; they sit after every real slot of the
        # call, so causality already hides them from this call's real queries
        state.holes.valid[:, -L:] = torch.arange(L, device=device)[None] < length[:, None]
        state.holes.next_pos = old_pos + length
        state.generated = state.generated + n
        logits = self._run(stream, positions, allowed, state.cache)               # [R, L, V]
        last = offset + eol_after                                                 # last slot of each group
        logits = logits.gather(1, last[..., None].expand(-1, -1, logits.shape[-1]))
        return state.split(logits)

    @torch.no_grad()
    def decode(self, tokens: Tensor) -> Tensor:
        """tokens [B, H*W] VQ codes -> pixels [B, 3, H*f, W*f] in [-1, 1] with Emu3's VQ decoder."""
        codes = tokens.to(self.device).view(tokens.shape[0], *self.grid)
        return self.model.model.vqmodel.decode(codes).clamp(-1, 1)
