"""Reading MAR's released files (Li et al., arXiv 2406.11838; LTH14/mar) and loading them strict, with errors that
name every key that does not fit.

File layouts, as the official training writes them:
* MAR: `checkpoint-last.pth` = {"model": state dict, "model_ema": EMA state dict, "optimizer", "epoch", "scaler",
  "args": argparse.Namespace}. The official evaluation and demo sample with "model_ema" (the default here).
* KL-16 VAE: `kl16.ckpt` = {"model": state dict}. Upstream loads it non-strict and prints the mismatches; here it
  loads strict, after dropping keys under `ignore_prefixes` (default "loss.": an LDM training-loss module, should a
  file carry one).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import Tensor, nn

from specdec.models.mar.backbone import MAR
from specdec.models.mar.config import MARConfig, VAEConfig
from specdec.models.mar.vae import KLVAE
from specdec.models.strict import load_strict

def read_checkpoint(path: str | Path, key: str | None = "model_ema", trust_pickle: bool = False
                    ) -> dict[str, Tensor]:
    """A MAR or VAE file -> its state dict. key: which entry of the checkpoint dict ("model_ema", "model"), or None
    for a file that is a state dict itself (also any .safetensors file). argparse.Namespace (the "args" entry) is
    allow-listed for the weights-only unpickler; anything else needs trust_pickle=True (only for trusted files)."""
    path = str(path)
    if not Path(path).is_file():
        raise FileNotFoundError(f"checkpoint file {path!r} not found; MAR's released files are "
                                f"pretrained_models/mar/<size>/checkpoint-last.pth and pretrained_models/vae/kl16.ckpt")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        return load_file(path, device="cpu")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        if not trust_pickle:
            raise ValueError(f"{path} holds more than tensors and argparse arguments ({type(err).__name__}: "
                             f"{str(err).splitlines()[0][:200]}); if you trust the file, pass trust_pickle=True"
                             ) from err
        obj = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a dict, got {type(obj).__name__}")
    if key is None:
        if all(isinstance(v, Tensor) for v in obj.values()):
            return obj
        raise ValueError(f"{path} is not a plain state dict (top-level keys {sorted(obj)[:10]}); pass key='model' "
                         f"or key='model_ema'")
    if key not in obj or not isinstance(obj[key], dict):
        found = [k for k, v in obj.items() if isinstance(v, dict)]
        raise ValueError(f"{path} has no state dict under {key!r}; its dict entries are {found} (MAR checkpoints "
                         f"have 'model' and 'model_ema', the VAE 'model')")
    return obj[key]


def load_mar(model: MAR, state: dict[str, Tensor]) -> MAR:
    """Load an official MAR state dict into `model` (strict); returns the model."""
    load_strict(model, state, "MAR checkpoint",
                "Check the size name (mar_base / mar_large / mar_huge), diffloss_d / diffloss_w (6/1024, 8/1280, "
                "12/1536 as released), buffer_size (64), img_size / vae_stride / patch_size and class_num")
    return model


def load_vae(vae: KLVAE, state: dict[str, Tensor], ignore_prefixes: tuple[str, ...] = ("loss.",)) -> KLVAE:
    """Load an official KL-16 VAE state dict into `vae` (strict after dropping ignore_prefixes); returns it."""
    load_strict(vae, state, "VAE checkpoint",
                "Check embed_dim (16), ch_mult ((1, 1, 2, 2, 4)) and the attention resolutions", ignore_prefixes)
    return vae


def mar_from_file(size: str, path: str | Path, key: str = "model_ema", trust_pickle: bool = False,
                  **overrides) -> MAR:
    """Build MARConfig.named(size, **overrides) and load the released file into it (eval mode)."""
    model = MAR(MARConfig.named(size, **overrides))
    return load_mar(model, read_checkpoint(path, key, trust_pickle)).eval()


def vae_from_file(path: str | Path, cfg: VAEConfig = VAEConfig(), trust_pickle: bool = False) -> KLVAE:
    """Build the KL-16 VAE and load kl16.ckpt (its "model" entry) into it (eval mode)."""
    return load_vae(KLVAE(cfg), read_checkpoint(path, "model", trust_pickle)).eval()
