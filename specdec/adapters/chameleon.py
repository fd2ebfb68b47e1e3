"""Adapter for Chameleon-format image generators (transformers `ChameleonForConditionalGeneration`): Chameleon
(arXiv 2405.09818) and its image-generating descendants Anole and Lumina-mGPT, which share the format.

Image tokens are ordinary ids of the shared vocabulary ("IMGIMG..." names; `vocabulary_mapping.img2bpe` maps VQ
code k to its id). transformers' `forward` sets the image-token logits to the dtype minimum (text-only generation),
so the adapter computes them itself: the language model's hidden states through `lm_head`'s rows of the image
tokens. Everything else (ragged rows as holes in a `DynamicCache`, CFG with an unconditional prompt) is
`HFCausalAdapter`.

transformers ships Chameleon's VQ encoder but no decoder, so pixels need a decoder you supply:
`decode=callable(codes [B, T]) -> pixels [B, 3, H, W]` (e.g. Anole's or Lumina-mGPT's VQGAN decoder).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from specdec.adapters.hf_causal import HFCausalAdapter, additive_mask


class ChameleonAdapter(HFCausalAdapter):
    """ARModel over `ChameleonForConditionalGeneration`. grid: (H, W) image tokens (32 x 32 for 512 px);
    cond: prompt ids [B, P] (ending with the image-start token) or a list of 1-D tensors; uncond_prompt: prompt
    of the unconditional rows for CFG (None: no CFG); decode: your VQ decoder, codes [B, T] -> pixels."""

    def __init__(self, model, grid: tuple[int, ...] = (32, 32), uncond_prompt: Tensor | None = None,
                 decode: Callable[[Tensor], Tensor] | None = None, pad_id: int = 1, compact_every: int = 16):
        mapping = model.model.vocabulary_mapping
        img2bpe = mapping.img2bpe
        V = model.config.vq_config.num_embeddings
        missing = [k for k in range(V) if k not in img2bpe]
        if missing:
            raise ValueError(f"the vocabulary map lacks image tokens for VQ codes {missing[:8]}"
                             f"{' ...' if len(missing) > 8 else ''} (names 'IMGIMG<code in letters A-J>Z')")
        ids = torch.tensor([img2bpe[k] for k in range(V)], dtype=torch.long)
        super().__init__(model, ids, grid, uncond_prompt=uncond_prompt, pad_id=pad_id,
                         codebook=model.model.vqmodel.quantize.embedding.weight.detach(), decode=decode,
                         compact_every=compact_every)
        if self.num_tokens < 1:
            raise ValueError(f"grid {grid} has no tokens")
        self.can_decode = decode is not None     # generate() then returns tokens only instead of failing

    def _run(self, ids: Tensor, positions: Tensor, allowed: Tensor, cache) -> Tensor:
        head = self.model.lm_head.weight
        out = self.model.model(input_ids=ids, attention_mask=additive_mask(allowed, head.dtype),
                               position_ids=positions, past_key_values=cache, use_cache=True)
        self._last_hidden = out.last_hidden_state if self._keep_hidden else None
        logits = out.last_hidden_state @ head[self.image_token_ids].T              # rows [V, hidden]
        bias = self.model.lm_head.bias
        if bias is not None:
            logits = logits + bias[self.image_token_ids]
        return logits.float()

    @torch.no_grad()
    def decode(self, tokens: Tensor) -> Tensor:
        if self._decode is None:
            raise ValueError(
                "ChameleonAdapter cannot turn image tokens into pixels: transformers has no Chameleon VQ decoder. "
                "Pass decode=callable(codes [B, T]) -> pixels [B, 3, H, W] (e.g. the Anole / Lumina-mGPT VQGAN "
                "decoder), or call specdec.generate(..., decode=False) to get tokens only")
        return self._decode(tokens)
