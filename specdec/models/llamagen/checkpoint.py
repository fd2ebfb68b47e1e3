"""Reading LlamaGen's official checkpoint files and loading them with errors that name what does not fit."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

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
    clean = {}
    for key, value in state.items():
        for prefix in ("module.", "_orig_mod."):
            if key.startswith(prefix):
                key = key[len(prefix):]
        if key in _IGNORED_KEYS or key.endswith(_IGNORED_SUFFIXES):
            continue
        clean[key] = value
    own = module.state_dict()
    order = lambda k: (k.count("."), k)     # top-level tensors (embeddings, head) first, then per-layer ones
    missing = sorted(set(own) - set(clean), key=order)
    unexpected = sorted(set(clean) - set(own), key=order)
    shapes = [f"{k}: checkpoint {tuple(clean[k].shape)} vs model {tuple(own[k].shape)}"
              for k in sorted(set(own) & set(clean), key=order) if tuple(clean[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        def show(items):
            return ", ".join(items[:12]) + (f", ... ({len(items)} in all)" if len(items) > 12 else "")
        parts = []
        if shapes:
            parts.append(f"shape mismatch: {show(shapes)}")
        if missing:
            parts.append(f"missing keys: {show(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {show(unexpected)}")
        raise ValueError(f"the {what} does not fit the architecture ({type(module).__name__}). "
                         + "; ".join(parts)
                         + ". Check the model name, image size, vocabulary size, num_classes and model_type.")
    module.load_state_dict(clean, strict=True)
