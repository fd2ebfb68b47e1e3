"""The embedded default model zoo: models trained in this repository on real photos, shipped as safetensors.

    bundle = specdec.zoo.load()
    bundle.target, bundle.drafter_model      # ARModel adapters (specdec.adapters.gpt.GPTAdapter)
    bundle.tokenizer, bundle.features        # VQTokenizer, FeatureNet
    bundle.classes, bundle.class_id("coffee")

Every weights file `<name>.safetensors` has a JSON card `<name>.json` beside it (architecture config, data, steps,
seed, wall time, held-out metrics, sha256 of the weights). Loading checks the sha256 first, so a truncated or
corrupted file fails with a message naming it instead of producing silent garbage. `experiments/train_zoo.py`
writes both.
"""
from __future__ import annotations

import hashlib
import json
import dataclasses
from dataclasses import dataclass, fields
from importlib import resources
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from specdec.precision import as_dtype
from specdec.zoo.data import CLASS_NAMES
from specdec.zoo.features import FeatureConfig, FeatureNet
from specdec.zoo.vq import VQConfig, VQTokenizer

MODEL_NAMES = ("vq", "features", "target", "drafter")
OPTIONAL_MODELS = ("eagle",)      # loaded when the weights folder has them
GENERATIVE_MODELS = ("target", "drafter", "eagle")      # what `load(dtype=...)` casts
DRAFT_ROOM = 64      # cache slots added to the trained max_len (rotary positions: no weight depends on it) for trees
__all__ = ["load", "ZooBundle", "ZooError", "heldout_images", "weights_dir", "MODEL_NAMES", "OPTIONAL_MODELS"]


class ZooError(RuntimeError):
    """A zoo weights file or card is missing, corrupt, or does not fit the architecture."""


def weights_dir() -> Path:
    """The package's weights folder (works from an installed wheel as well as the source tree)."""
    return Path(str(resources.files("specdec.zoo") / "weights"))


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ---- writing (used by experiments/train_zoo.py) ---------------------------------------------------------------------
def save_model(module: nn.Module, directory: Path, name: str, card: dict[str, Any],
               half: bool = False) -> dict[str, Any]:
    """Write `<name>.safetensors` (float16 floats when `half`, to keep the zoo small) and `<name>.json`.

    Returns the card as written (with `weights`, `dtype`, `bytes`, `sha256` and `params` added).
    """
    from safetensors.torch import save_file
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: (v.detach().half() if half and v.is_floating_point() else v.detach()).contiguous().cpu()
             for k, v in module.state_dict().items()}
    path = directory / f"{name}.safetensors"
    save_file(state, str(path))
    path.chmod(0o644)   # safetensors writes 0600; the package data must be readable by every user
    card = dict(card, name=name, weights=path.name, dtype="float16" if half else "float32",
                bytes=path.stat().st_size, sha256=sha256_file(path),
                params=sum(p.numel() for p in module.parameters()))
    write_card(name, card, directory)
    return card


def write_card(name: str, card: dict[str, Any], directory: Path | None = None) -> None:
    """Write `<name>.json` (a card's measured figures change; its weights and their hash do not)."""
    directory = Path(directory) if directory is not None else weights_dir()
    (directory / f"{name}.json").write_text(json.dumps(card, indent=2, sort_keys=True) + "\n")


# ---- reading --------------------------------------------------------------------------------------------------------
def read_card(name: str, directory: Path | None = None) -> dict[str, Any]:
    directory = Path(directory) if directory is not None else weights_dir()
    path = directory / f"{name}.json"
    if not path.is_file():
        raise ZooError(f"zoo card {path} is missing: reinstall specdec or run `python experiments/train_zoo.py`")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ZooError(f"zoo card {path} is not valid JSON ({e}): reinstall specdec or retrain the zoo") from e


def load_state(name: str, directory: Path | None = None) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Verified float32 state dict and card of one zoo model."""
    from safetensors.torch import load_file
    directory = Path(directory) if directory is not None else weights_dir()
    card = read_card(name, directory)
    path = directory / card.get("weights", f"{name}.safetensors")
    if not path.is_file():
        raise ZooError(f"zoo weights {path} are missing: reinstall specdec or run `python experiments/train_zoo.py`")
    digest = sha256_file(path)
    if digest != card.get("sha256"):
        raise ZooError(f"zoo weights {path} are corrupt or do not belong to their card (sha256 {digest[:12]}... "
                       f"!= {str(card.get('sha256'))[:12]}... in {name}.json): reinstall specdec or retrain "
                       f"with `python experiments/train_zoo.py --stages {name}`")
    try:
        state = load_file(str(path))
    except Exception as e:   # safetensors raises several types for a malformed header
        raise ZooError(f"zoo weights {path} cannot be read ({e}): reinstall specdec or retrain the zoo") from e
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}, card


def _config(cls, raw: dict[str, Any]):
    """Rebuild a frozen config dataclass from a JSON dict (lists back to tuples, unknown keys rejected)."""
    known = {f.name for f in fields(cls)}
    unknown = set(raw) - known
    if unknown:
        raise ZooError(f"card config has fields {sorted(unknown)} unknown to {cls.__name__}: specdec is older "
                       f"than the weights; upgrade specdec or retrain the zoo")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})


def load_model(name: str, directory: Path | None = None, device: str | torch.device = "cpu",
               dtype: str | torch.dtype | None = None, draft_room: int = DRAFT_ROOM) -> tuple[nn.Module, dict]:
    """One zoo model in eval mode, weights verified and loaded -> (module, card). dtype: what it computes in
    (`specdec.precision`; default float32); draft_room: cache slots beyond the trained length, for draft trees."""
    from specdec.models.eagle import EagleConfig, EagleHead
    from specdec.models.gpt import GPT, GPTConfig
    from specdec.models.mar import MAR, MARConfig
    from specdec.zoo.autoencoder import KLAutoencoder, KLConfig
    factories: dict[str, tuple[type, Callable]] = {
        "vq": (VQConfig, VQTokenizer), "features": (FeatureConfig, FeatureNet),
        "target": (GPTConfig, GPT), "drafter": (GPTConfig, GPT), "eagle": (EagleConfig, EagleHead),
        "video_target": (GPTConfig, GPT), "video_drafter": (GPTConfig, GPT),      # specdec.zoo.video
        "continuous_ae": (KLConfig, KLAutoencoder),                                # specdec.zoo.continuous
        "continuous_target": (MARConfig, MAR), "continuous_drafter": (MARConfig, MAR),
    }
    if name not in factories:
        raise ValueError(f"unknown zoo model {name!r}; valid: {list(factories)}")
    state, card = load_state(name, directory)
    config_cls, model_cls = factories[name]
    config = _config(config_cls, card["config"])
    if config_cls is GPTConfig:
        # rotary positions: no weight depends on max_len, which only sizes the cache; leave room for draft trees
        config = dataclasses.replace(config, max_len=config.max_len + _checked_room(draft_room))
    module = model_cls(config)
    try:
        module.load_state_dict(state)
    except RuntimeError as e:
        raise ZooError(f"zoo weights {name}.safetensors do not fit the architecture in {name}.json ({e}); "
                       f"retrain the zoo") from e
    return module.to(device=device, dtype=as_dtype(dtype)).eval().requires_grad_(False), card


def _checked_room(draft_room: int) -> int:
    if isinstance(draft_room, bool) or not isinstance(draft_room, int) or draft_room < 0:
        raise ValueError(f"draft_room must be a non-negative int (cache slots for draft-tree nodes), "
                         f"got {draft_room!r}")
    return draft_room


@dataclass(frozen=True)
class ZooBundle:
    """The embedded default models. target / drafter_model are ARModel adapters over target_gpt / drafter_gpt."""
    target: Any
    drafter_model: Any
    tokenizer: VQTokenizer
    features: FeatureNet
    classes: tuple[str, ...]
    target_gpt: nn.Module
    drafter_gpt: nn.Module
    cards: dict[str, dict[str, Any]]
    eagle_head: Any = None          # EagleHead trained on the target (drafter "eagle"), when the zoo ships one

    def class_id(self, name_or_id: str | int) -> int:
        """'coffee' or 1 -> 1; anything else raises ValueError listing the valid names."""
        if isinstance(name_or_id, str):
            if name_or_id in self.classes:
                return self.classes.index(name_or_id)
        elif isinstance(name_or_id, int) and not isinstance(name_or_id, bool) and 0 <= name_or_id < len(self.classes):
            return name_or_id
        valid = ", ".join(f"{i}={n}" for i, n in enumerate(self.classes))
        raise ValueError(f"unknown zoo class {name_or_id!r}; valid classes: {valid}")

    def heldout_images(self, n: int, seed: int = 0, classes: Tensor | None = None) -> Tensor:
        """n real held-out crops [n, 3, 48, 48] in [-1, 1] (see the module-level `heldout_images`)."""
        return heldout_images(n, seed, classes)[0]


def load(device: str | torch.device = "cpu", directory: str | Path | None = None,
         dtype: str | torch.dtype | None = None, draft_room: int = DRAFT_ROOM) -> ZooBundle:
    """Load and verify the whole zoo. `directory` overrides the package's weights folder (tests, retraining);
    dtype: what the generative models (target, drafter, EAGLE head) compute in, "float32" (default) or "bfloat16"
    (`specdec.precision`); the tokenizer and the feature net stay float32. draft_room: cache slots the target and
    the drafter keep beyond the image for a draft tree's nodes (default 64; a bigger tree needs more)."""
    from specdec.adapters.gpt import GPTAdapter
    directory = Path(directory) if directory is not None else None
    models, cards = {}, {}
    for name in MODEL_NAMES + OPTIONAL_MODELS:
        if name in OPTIONAL_MODELS and not ((directory or weights_dir()) / f"{name}.json").is_file():
            models[name] = None
            continue
        generative = name in GENERATIVE_MODELS
        models[name], cards[name] = load_model(name, directory, device, dtype if generative else None, draft_room)
    if models["eagle"] is not None and "tree_profile" in cards["eagle"]:     # its optimal-N trees' profile
        models["eagle"].rank_acceptance = tuple(cards["eagle"]["tree_profile"]["rank_acceptance"])
    classes = tuple(cards["target"].get("data", {}).get("classes", CLASS_NAMES))
    tok: VQTokenizer = models["vq"]
    codebook = tok.codebook.detach()
    for name in ("target", "drafter"):
        if models[name].cfg.vocab_size != tok.config.codebook_size:
            raise ZooError(f"{name} vocabulary {models[name].cfg.vocab_size} != tokenizer codebook "
                           f"{tok.config.codebook_size}: the zoo files come from different trainings; retrain")
    adapters = {name: GPTAdapter(models[name], grid=tok.config.grid, codebook=codebook, decode=tok.decode)
                for name in ("target", "drafter")}
    return ZooBundle(target=adapters["target"], drafter_model=adapters["drafter"], tokenizer=tok,
                     features=models["features"], classes=classes, target_gpt=models["target"],
                     drafter_gpt=models["drafter"], cards=cards, eagle_head=models["eagle"])


def heldout_images(n: int, seed: int = 0, classes: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """n real crops from the held-out strip of the photos -> (images [n, 3, 48, 48] in [-1, 1], class ids [n]).

    classes: optional LongTensor [n] to draw crops of given classes (e.g. matching generated samples);
    otherwise classes cycle 0, 1, 2, ... so every class is equally represented.
    """
    from specdec.zoo.data import sample_crops
    if classes is None:
        classes = torch.arange(n) % len(CLASS_NAMES)
    classes = torch.as_tensor(classes, dtype=torch.long)
    if classes.shape != (n,):
        raise ValueError(f"classes must be [n={n}], got {tuple(classes.shape)}")
    g = torch.Generator().manual_seed(int(seed))
    return sample_crops("heldout", classes, g), classes
