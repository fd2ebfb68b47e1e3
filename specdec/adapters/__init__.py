"""One adapter per generator family; each subclasses `specdec.protocols.ARModel`. Shared pieces: `base` (input
checks) and `cfg` (the conditional / unconditional rows of classifier-free guidance).

The transformers- and diffusers-based adapters are imported on first use, so `import specdec` stays light.
"""
import importlib

from specdec.protocols import ARModel
from specdec.adapters.gpt import GPTAdapter

_LAZY = {
    "HFCausalAdapter": "specdec.adapters.hf_causal",
    "LlamaGenAdapter": "specdec.adapters.llamagen",
    "JanusAdapter": "specdec.adapters.janus",
    "Emu3Adapter": "specdec.adapters.emu3",
    "ChameleonAdapter": "specdec.adapters.chameleon",
    "MARAdapter": "specdec.adapters.mar",                        # MAR, continuous tokens
    "TokenBlockGenerator": "specdec.adapters.video",             # any discrete ARModel, block by block (video)
    "FARBlockGenerator": "specdec.adapters.diffusers_video",     # diffusers' AnyFlow-FAR (extra: video)
    "WanBlockDecoder": "specdec.adapters.diffusers_vae",         # diffusers' Wan VAE, streaming (extra: video)
}

__all__ = ["ARModel", "GPTAdapter", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'specdec.adapters' has no attribute {name!r}")
