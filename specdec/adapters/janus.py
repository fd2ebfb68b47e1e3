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

from specdec.adapters.hf_causal import HFCausalAdapter, additive_mask


class JanusAdapter(HFCausalAdapter):
    """ARModel over `JanusForConditionalGeneration` in image mode. Engine ids are VQ codes 0..V-1 directly: they
    index the generation head's outputs and the generation embeddings, so `image_token_ids` is 0..V-1."""

    def __init__(self, model, bos_token_id: int | None = None, boi_token_id: int | None = None,
                 pad_token_id: int | None = None, compact_every: int = 16):
        gen = model.generation_config
        kwargs = getattr(gen, "generation_kwargs", None) or {}
        bos = bos_token_id if bos_token_id is not None else gen.bos_token_id
        boi = boi_token_id if boi_token_id is not None else kwargs.get("boi_token_id")
        pad = pad_token_id if pad_token_id is not None else gen.pad_token_id
        missing = [n for n, v in (("bos_token_id", bos), ("boi_token_id", boi), ("pad_token_id", pad)) if v is None]
        if missing:
            raise ValueError(f"Janus needs {', '.join(missing)} (from model.generation_config, "
                             "generation_kwargs['boi_token_id'] for the image-start token); pass them explicitly")
        model = model.eval()
        vq = model.model.vqmodel
        side = vq.quantize.quant_state_dims
        V = vq.config.num_embeddings
        with torch.no_grad():
            # VQ codes as the decoder sees them (get_codebook_entry l2-normalises), and the LM inputs of image tokens
            codebook = torch.nn.functional.normalize(vq.quantize.embedding.weight.detach(), dim=-1)
            codes = torch.arange(V, device=model.model.generation_head.vision_head.weight.device)
            embeddings = model.prepare_embeddings_for_image_generation(codes).detach()
        super().__init__(model, torch.arange(V), (int(side[0]), int(side[1])), pad_id=pad, codebook=codebook,
                         compact_every=compact_every, token_embeddings=embeddings)
        self.bos_id, self.boi_id = bos, boi
        self.supports_cfg = True        # the unconditional rows are derived from each prompt (uncond_prompts)

    @property
    def _head(self) -> Tensor:
        """Image logits come from the generation head, not `lm_head`."""
        return self.model.model.generation_head.vision_head.weight

    output_embeddings = None        # image logits come from an MLP generation head, not a linear layer

    def prompts(self, cond) -> list[Tensor]:
        prompts = super().prompts(cond)
        return [p if p.numel() and int(p[-1]) == self.boi_id else torch.cat([p, p.new_tensor([self.boi_id])])
                for p in prompts]

    def uncond_prompts(self, prompts: list[Tensor]) -> list[Tensor]:
        """transformers' Janus CFG: keep BOS and image-start, replace everything else by the pad token."""
        return [torch.where((p == self.bos_id) | (p == self.boi_id), p, torch.full_like(p, self.pad_id))
                for p in prompts]

    def _lm(self, positions: Tensor, allowed: Tensor, cache, **inputs) -> Tensor:
        out = self.model.model.language_model(attention_mask=additive_mask(allowed, self._head.dtype),
                                              position_ids=positions, past_key_values=cache, use_cache=True,
                                              **inputs)
        self._last_hidden = out.last_hidden_state if self._keep_hidden else None
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
