"""Reading LlamaGen's official checkpoint files and loading them with errors that name what does not fit."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from specdec.models.strict import load_strict

_IGNORED_SUFFIXES = (".kv_cache.k_cache", ".kv_cache.v_cache")
_IGNORED_KEYS = ("freqs_cis", "causal_mask")


def read_state_dict(path: str, trust_pickle: bool = False) -> dict[str, Tensor]:
    """A checkpoint file -> state dict: safetensors, or a torch .pt/.pth/.bin holding the weights directly or
    under "model" (DDP), "module" (DeepSpeed), "state_dict" or "ema"."""
    path = str(path)
    if not Path(path).is_file():
        raise FileNotFoundError(f"checkpoint file {path!r} not found; check the path (LlamaGen's released files are "
                                f"e.g. c2i_B_256.pt and vq_ds16_c2i.pt)")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        return load_file(path, device="cpu")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:   # pickled extras (e.g. an argparse Namespace) need the full unpickler
        if not trust_pickle:
            raise ValueError(
                f"{path} holds more than tensors ({type(err).__name__}: {str(err).splitlines()[0][:200]}); "
                "if you trust the file, pass trust_pickle=True to unpickle it fully") from err
        obj = torch.load(path, map_location="cpu", weights_only=False)
    if isinstance(obj, dict):
        for key in ("model", "module", "state_dict", "ema"):
            if key in obj and isinstance(obj[key], dict):
                return obj[key]
        if all(isinstance(v, Tensor) for v in obj.values()):
            return obj
    raise ValueError(f"{path}: no state dict found (expected a dict of tensors, or one under 'model', "
                     f"'module', 'state_dict' or 'ema'); top-level keys: {list(obj)[:10] if isinstance(obj, dict) else type(obj).__name__}")


def load_checked(module: nn.Module, state: dict[str, Tensor], what: str = "checkpoint") -> None:
    """load_state_dict(strict=True) with an error that names every missing, unexpected and mis-shaped key.
    Wrapper prefixes ("module.", "_orig_mod.") and inference-only buffers (KV caches) are ignored."""
    load_strict(module, state, what, "Check the model name, image size, vocabulary size, num_classes and model_type.",
                ignore=lambda key: key in _IGNORED_KEYS or key.endswith(_IGNORED_SUFFIXES))
