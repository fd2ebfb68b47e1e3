"""Adapter for LlamaGen (arXiv 2406.06525) checkpoints: class-to-image (c2i) and text-to-image (t2i) GPTs.

`from_checkpoint` builds `specdec.models.llamagen.LlamaGenGPT` (+ the VQ tokenizer) and loads the official files.
Decoding uses a `StaticKVCache` with per-row write pointers: rollback moves the pointer. CFG follows LlamaGen's
`generate`: rows are doubled, the second half gets the null condition (class `num_classes`, or the learnt null
caption with the same padding mask), and the engine mixes `uncond + s * (cond - uncond)` in `specdec.sampling`.
(LlamaGen guides only when cfg_scale > 1; here any cfg_scale != 1 guides. `cfg_interval` is not reproduced.)

cond: c2i -> class ids LongTensor [B]. t2i -> caption features FloatTensor [B, L, caption_dim] (L =
cls_token_num, left-padded as LlamaGen's sample_t2i does), or a tuple (features, mask [B, L]) with 1 = real token.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from specdec.adapters.base import check_capacity, check_cfg, check_class_ids
from specdec.adapters.cfg import CFGRows
from specdec.adapters.static import StaticCacheAdapter, StaticCacheState
from specdec.models.llamagen import (GPT_SIZES, LlamaGenConfig, LlamaGenGPT, LlamaGenVQ, VQ_SIZES, VQConfig,
                                     load_checked, read_state_dict)
from specdec.sampling import Sampling
from specdec.types import Logits

IMAGE_SIZES = (256, 384, 512)


class LlamaGenAdapter(StaticCacheAdapter):
    """ARModel over a `LlamaGenGPT`, with its `LlamaGenVQ` for decoding (optional)."""

    supports_trees = True           # LlamaGenGPT.step_tree verifies a draft tree in one forward

    def __init__(self, model: LlamaGenGPT, vq: LlamaGenVQ | None = None):
        self.model = model.eval()
        self.vq = None if vq is None else vq.eval()
        self.can_decode = vq is not None     # without a VQ decoder generate() returns tokens only
        cfg = model.cfg
        side = cfg.grid_side
        self.grid = (side, side)
        self.num_tokens = cfg.block_size
        self.vocab_size = cfg.vocab_size
        self.supports_cfg = model.has_null
        self.hidden_size = model.cfg.dim            # start(..., hidden=True) returns the last hidden states
        self.output_embeddings = model.output.weight.detach()
        # past the image only overshooting draft slots are fed; their outputs are never committed
        self.max_new_tokens = cfg.block_size + max(cfg.block_size, 64)
        self.token_embeddings = model.tok_embeddings.weight.detach()
        self.codebook = None
        if vq is not None:
            if vq.cfg.codebook_size != cfg.vocab_size:
                raise ValueError(f"the VQ codebook has {vq.cfg.codebook_size} codes but the GPT predicts "
                                 f"{cfg.vocab_size} tokens; use the tokenizer the GPT was trained with")
            self.codebook = vq.quantize.codebook().detach()

    @property
    def device(self) -> torch.device:
        return self.model.output.weight.device

    def _condition(self, cond: Any) -> tuple[Tensor, Tensor | None]:
        cfg = self.model.cfg
        if cfg.model_type == "c2i":
            return check_class_ids(cond, cfg.num_classes).to(self.device), None
        mask = None
        if isinstance(cond, (tuple, list)) and len(cond) == 2:
            cond, mask = cond
        if not isinstance(cond, Tensor) or cond.dim() != 3 or cond.shape[1:] != (cfg.cls_token_num,
                                                                                  cfg.caption_dim):
            raise TypeError(f"a t2i LlamaGen takes caption features FloatTensor [B, {cfg.cls_token_num}, "
                            f"{cfg.caption_dim}] (optionally as (features, mask [B, {cfg.cls_token_num}])); got "
                            f"{type(cond).__name__} {tuple(getattr(cond, 'shape', ()))}")
        if mask is not None:
            mask = torch.as_tensor(mask, device=self.device).bool()
            if mask.shape != cond.shape[:2]:
                raise ValueError(f"caption mask must have shape {tuple(cond.shape[:2])}, got {tuple(mask.shape)}")
        return cond.to(self.device, self.model.output.weight.dtype), mask

    @torch.no_grad()
    def start(self, cond: Any, sampling: Sampling, capacity: int,
              hidden: bool = False) -> tuple[StaticCacheState, Logits]:
        cond, mask = self._condition(cond)
        check_cfg(self, sampling)
        check_capacity(self, capacity)
        rows = CFGRows(cond.shape[0], sampling.uses_cfg)
        cond = rows.stack(cond, self.model.null_condition)
        mask = None if mask is None else rows.double(mask)     # the null caption keeps the prompt's padding
        cache = self.model.new_cache(cond.shape[0], capacity)
        cache.keep_hidden = hidden
        state = StaticCacheState(rows.batch, rows.cfg, cache, self.model.cfg.prefix_len)
        logits = self.model.prefill(cond, cache, mask)[:, None]
        return state, state.split(logits, None if cache.hidden is None else cache.hidden[:, -1:])

    @torch.no_grad()
    def decode(self, tokens: Tensor) -> Tensor | None:
        """tokens [B, T] -> pixels [B, 3, 16H, 16W] in [-1, 1] (None without a VQ model)."""
        if self.vq is None:
            return None
        codes = tokens.to(self.vq.post_quant_conv.weight.device).view(tokens.shape[0], *self.grid)
        return self.vq.decode_code(codes).clamp(-1, 1)


def from_checkpoint(gpt_path: str, vq_path: str | None = None, model: str = "GPT-B", image_size: int = 256,
                    *, model_type: str = "c2i", num_classes: int = 1000, cls_token_num: int | None = None,
                    vocab_size: int = 16384, vq_model: str = "VQ-16", codebook_embed_dim: int = 8,
                    dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                    trust_pickle: bool = False, vq_config: dict | None = None, **config) -> LlamaGenAdapter:
    """Build a LlamaGen GPT (and VQ tokenizer) and load official checkpoint files (.pt with a "model" key, or
    safetensors). model: one of GPT_SIZES; image_size: 256 | 384 | 512 (grid = image_size / VQ downsampling);
    cls_token_num: 1 for c2i, 120 for t2i by default. Extra keyword arguments go to `LlamaGenConfig` (they
    override the named size too), vq_config to `VQConfig`."""
    if model not in GPT_SIZES:
        raise ValueError(f"unknown LlamaGen model {model!r}; choose one of {list(GPT_SIZES)}")
    if vq_model not in VQ_SIZES:
        raise ValueError(f"unknown LlamaGen VQ model {vq_model!r}; choose one of {list(VQ_SIZES)}")
    if image_size not in IMAGE_SIZES:
        raise ValueError(f"image_size must be one of {IMAGE_SIZES} (LlamaGen's released resolutions), "
                         f"got {image_size!r}")
    vq_cfg = VQConfig.named(vq_model, codebook_size=vocab_size, codebook_embed_dim=codebook_embed_dim,
                            **(vq_config or {}))
    side = image_size // vq_cfg.downsample
    if cls_token_num is None:
        cls_token_num = 1 if model_type == "c2i" else 120
    cfg = LlamaGenConfig.named(model, vocab_size=vocab_size, block_size=side * side, num_classes=num_classes,
                               cls_token_num=cls_token_num, model_type=model_type, **config)
    gpt = LlamaGenGPT(cfg)
    load_checked(gpt, read_state_dict(gpt_path, trust_pickle),
                 f"GPT checkpoint {gpt_path} (built as {model}, {model_type}, image_size={image_size})")
    gpt.to(device=device, dtype=dtype)
    vq = None
    if vq_path is not None:
        vq = LlamaGenVQ(vq_cfg)
        load_checked(vq, read_state_dict(vq_path, trust_pickle), f"VQ checkpoint {vq_path} (built as {vq_model})")
        vq.to(device=device)
    return LlamaGenAdapter(gpt, vq)
