"""LlamaGen (Sun et al., "Autoregressive Model Beats Diffusion: Llama for Scalable Image Generation",
arXiv 2406.06525), written for specdec and loading the official checkpoints: the GPT (`gpt`), the VQ tokenizer
(`vq`) and checkpoint reading (`checkpoint`). Every public name is importable from here."""
from specdec.models.llamagen.checkpoint import load_checked, read_state_dict
from specdec.models.llamagen.gpt import (GPT_SIZES, Attention, CaptionEmbedder, CaptionMLP, FeedForward,
                                         LabelEmbedder, LlamaGenConfig, LlamaGenGPT, TransformerBlock, apply_rope,
                                         rope_table)
from specdec.models.llamagen.vq import (VQ_SIZES, AttnBlock, Decoder, Encoder, LlamaGenVQ, ResnetBlock,
                                        VectorQuantizer, VQConfig)

__all__ = ["GPT_SIZES", "VQ_SIZES", "Attention", "AttnBlock", "CaptionEmbedder", "CaptionMLP", "Decoder", "Encoder",
           "FeedForward", "LabelEmbedder", "LlamaGenConfig", "LlamaGenGPT", "LlamaGenVQ", "ResnetBlock",
           "TransformerBlock", "VQConfig", "VectorQuantizer", "apply_rope", "load_checked", "read_state_dict",
           "rope_table"]
