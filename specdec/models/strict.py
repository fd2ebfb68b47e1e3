"""Strict state-dict loading whose error names every key that does not fit (shared by the checkpoint loaders)."""
from __future__ import annotations

from typing import Callable

from torch import Tensor, nn

_WRAPPERS = ("module.", "_orig_mod.")


def load_strict(module: nn.Module, state: dict[str, Tensor], what: str, hint: str,
                ignore_prefixes: tuple[str, ...] = (), ignore: Callable[[str], bool] | None = None) -> None:
    """load_state_dict(strict=True) that first names EVERY mis-shaped, missing and unexpected key in one ValueError
    (`what` names the file's role, `hint` says what to check). Wrapper prefixes ("module.", "_orig_mod.") are
    stripped; keys under ignore_prefixes, and keys for which ignore(key) is true, are dropped."""
    clean = {}
    for key, value in state.items():
        for prefix in _WRAPPERS:
            if key.startswith(prefix):
                key = key[len(prefix):]
        if (ignore_prefixes and key.startswith(ignore_prefixes)) or (ignore is not None and ignore(key)):
            continue
        clean[key] = value
    own = module.state_dict()
    order = lambda k: (k.count("."), k)
    missing = sorted(set(own) - set(clean), key=order)
    unexpected = sorted(set(clean) - set(own), key=order)
    shapes = [f"{k}: checkpoint {tuple(clean[k].shape)} vs model {tuple(own[k].shape)}"
              for k in sorted(set(own) & set(clean), key=order) if tuple(clean[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        def show(items):
            return ", ".join(items[:12]) + (f", ... ({len(items)} in all)" if len(items) > 12 else "")
        parts = [f"{name}: {show(items)}" for name, items in
                 (("shape mismatch", shapes), ("missing keys", missing), ("unexpected keys", unexpected)) if items]
        raise ValueError(f"the {what} does not fit the architecture ({type(module).__name__}). " + "; ".join(parts)
                         + f". {hint}")
    module.load_state_dict(clean, strict=True)
