"""Adapter for Janus / Janus-Pro image generation (transformers `JanusForConditionalGeneration`).

Chen et al., "Janus-Pro", arXiv 2501.17811. Janus generates images with a path separate from text: image tokens
enter the language model through `generation_embeddings` + `generation_aligner` (the model's
`prepare_embeddings_for_image_generation`) and leave it through `generation_head`, not `lm_head`. So the adapter
feeds `inputs_embeds` for image tokens and computes logits from the language model's hidden states.

CFG is reproduced from transformers' `generate(generation_mode="image")`: the unconditional row of each prompt is
the same prompt with every token except BOS and the image-start token replaced by the pad token (same length, same
attention mask), and the engine mixes `uncond + s * (cond - uncond)`. (transformers' loop always doubles rows and
only mixes when guidance_scale > 1; here cfg_scale == 1 runs the conditional rows alone.)

cond: prompt ids LongTensor [B, P] or a list of 1-D LongTensors (e.g. the processor's output for
`generation_mode="image"`); the image-start token is appended to a prompt that does not end with it.
"""
from __future__ import annotations

import torch
from torch import Tensor

from specdec.adapters.base import check_capacity, check_cfg
from specdec.adapters.hf_causal import HFCausalAdapter, HFState, additive_mask, left_pad
from specdec.cache import HoleMask
from specdec.sampling import Sampling
from specdec.types import Logits


class JanusAdapter(HFCausalAdapter):
    """ARModel over `JanusForConditionalGeneration` in image mode. Engine ids are VQ codes 0..V-1 directly."""

    def __init__(self, model, bos_token_id: int | None = None, boi_token_id: int | None = None,
                 pad_token_id: int | None = None, compact_every: int = 16):
        gen = model.generation_config
        self.model = model.eval()
        self.bos_id = bos_token_id if bos_token_id is not None else gen.bos_token_id
        kwargs = getattr(gen, "generation_kwargs", None) or {}
        self.boi_id = boi_token_id if boi_token_id is not None else kwargs.get("boi_token_id")
        self.pad_id = pad_token_id if pad_token_id is not None else gen.pad_token_id
        missing = [n for n, v in (("bos_token_id", self.bos_id), ("boi_token_id", self.boi_id),
                                  ("pad_token_id", self.pad_id)) if v is None]
        if missing:
            raise ValueError(f"Janus needs {', '.join(missing)} (from model.generation_config, "
                             "generation_kwargs['boi_token_id'] for the image-start token); pass them explicitly")
        vq = model.model.vqmodel
        side = vq.quantize.quant_state_dims
        self.grid = (int(side[0]), int(side[1]))
        self.num_tokens = self.grid[0] * self.grid[1]
        self.vocab_size = vq.config.num_embeddings
        self.image_token_ids = torch.arange(self.vocab_size)
        self.supports_cfg = True
        self.class_prompts = None
        self.uncond_prompt = None
        self.compact_every = compact_every
        self._decode = None
        text = model.config.get_text_config()
        self.max_new_tokens = getattr(text, "max_position_embeddings", None) or 1 << 30
        with torch.no_grad():
            # VQ codes as the decoder sees them (get_codebook_entry l2-normalises), and the LM inputs of image tokens
            self.codebook = torch.nn.functional.normalize(vq.quantize.embedding.weight.detach(), dim=-1)
            ids = torch.arange(self.vocab_size, device=self.device)
            self.token_embeddings = model.prepare_embeddings_for_image_generation(ids).detach()

    @property
    def device(self) -> torch.device:
        return self.model.model.generation_head.vision_head.weight.device

    def prompts(self, cond) -> list[Tensor]:
        prompts = super().prompts(cond)
        return [p if p.numel() and int(p[-1]) == self.boi_id else torch.cat([p, p.new_tensor([self.boi_id])])
                for p in prompts]

    def uncond_prompts(self, prompts: list[Tensor]) -> list[Tensor]:
        """transformers' Janus CFG: keep BOS and image-start, replace everything else by the pad token."""
        return [torch.where((p == self.bos_id) | (p == self.boi_id), p, torch.full_like(p, self.pad_id))
                for p in prompts]

    def _lm(self, positions: Tensor, allowed: Tensor, cache, **inputs) -> Tensor:
        lm = self.model.model.language_model
        dtype = self.model.model.generation_head.vision_head.weight.dtype
        out = lm(attention_mask=additive_mask(allowed, dtype), position_ids=positions, past_key_values=cache,
                 use_cache=True, **inputs)
        return self.model.model.generation_head(out.last_hidden_state).float()

    def _run(self, ids: Tensor, positions: Tensor, allowed: Tensor, cache) -> Tensor:
        """The prompt: text ids through the language model's own embeddings."""
        return self._lm(positions, allowed, cache, input_ids=ids)

    def _run_image_tokens(self, tokens: Tensor, positions: Tensor, allowed: Tensor, cache) -> Tensor:
        """Image tokens enter through the generation embeddings, not the text embedding table."""
        embeds = self.model.prepare_embeddings_for_image_generation(tokens)
        return self._lm(positions, allowed, cache, inputs_embeds=embeds)

    @torch.no_grad()
    def decode(self, tokens: Tensor) -> Tensor:
        """tokens [B, T] -> pixels [B, 3, H, W] in [-1, 1] through Janus's own VQ decoder (channels first;
        `decode_image_tokens` returns the same pixels channels last)."""
        return self.model.model.vqmodel.decode(tokens.to(self.device)).clamp(-1, 1)
