"""Offline photo classes for the embedded zoo: one real photo per class, crops of 48 x 48 pixels.

Every photo ships with scikit-image, scikit-learn or matplotlib, so nothing is downloaded. Each photo is resized to a
small pyramid (widths `LEVEL_WIDTHS`) so that a 48-pixel crop shows a recognisable part of the picture (a face, a
texture, a colour field) rather than a flat patch. The right `HELDOUT_FRACTION` of every level is held out: training
crops never touch it, evaluation crops (FID-style metrics, held-out NLL, PSNR) come only from it.

Batches are deterministic: the same (split, seed, batch_size) always gives the same crops, flips and levels.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

CROP = 48
HELDOUT_FRACTION = 0.25
# Widths of the resized copies of every photo. The smallest keeps the held-out strip >= CROP wide
# (0.25 * 208 = 52); the spread is the "random downscale" augmentation.
LEVEL_WIDTHS = (208, 256, 320)
SPLITS = ("train", "heldout")


def _skimage(name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        import skimage.data
        return getattr(skimage.data, name)()
    return load


def _sklearn(filename: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        from sklearn.datasets import load_sample_image
        return load_sample_image(filename)
    return load


def _grace_hopper() -> np.ndarray:
    import matplotlib.cbook as cbook
    import matplotlib.image as mimage
    with cbook.get_sample_data("grace_hopper.jpg") as f:
        return mimage.imread(f, format="jpg")


# name -> loader of an [H, W, 3] uint8 array. Order defines the class ids; never reorder (weights depend on it).
_SOURCES: dict[str, Callable[[], np.ndarray]] = {
    "astronaut": _skimage("astronaut"),
    "coffee": _skimage("coffee"),
    "chelsea": _skimage("chelsea"),
    "rocket": _skimage("rocket"),
    "hubble_deep_field": _skimage("hubble_deep_field"),
    "immunohistochemistry": _skimage("immunohistochemistry"),
    "retina": _skimage("retina"),
    "china": _sklearn("china.jpg"),
    "flower": _sklearn("flower.jpg"),
    "grace_hopper": _grace_hopper,
}
CLASS_NAMES: list[str] = list(_SOURCES)


def _to_tensor(img: np.ndarray) -> Tensor:
    """uint8 [H, W, C>=3] -> float [3, H, W] in [-1, 1]."""
    img = np.asarray(img)
    if img.dtype != np.uint8:  # matplotlib may hand back floats in [0, 1]
        img = (np.clip(img, 0, 1) * 255).round().astype(np.uint8) if img.max() <= 1.0 else img.astype(np.uint8)
    x = torch.from_numpy(np.array(img[..., :3], copy=True)).permute(2, 0, 1).float()
    return x / 127.5 - 1.0


@lru_cache(maxsize=None)
def photo_levels(name: str) -> tuple[Tensor, ...]:
    """The pyramid of one photo: one float tensor [3, H_l, W_l] in [-1, 1] per width in `LEVEL_WIDTHS`."""
    if name not in _SOURCES:
        raise ValueError(f"unknown photo class {name!r}; valid: {CLASS_NAMES}")
    x = _to_tensor(_SOURCES[name]())
    _, h, w = x.shape
    levels = []
    for width in LEVEL_WIDTHS:
        height = max(CROP, round(h * width / w))
        # antialias: a plain bilinear downscale by 2-5x aliases fine texture into noise
        y = F.interpolate(x[None], size=(height, width), mode="bilinear", antialias=True, align_corners=False)[0]
        levels.append(y.clamp(-1, 1).contiguous())
    return tuple(levels)


def _region(width: int, split: str) -> tuple[int, int]:
    """Column range [lo, hi) of a level that crops of `split` may cover."""
    cut = int(round(width * (1 - HELDOUT_FRACTION)))
    if split == "train":
        return 0, cut
    if split == "heldout":
        return cut, width
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def sample_crops(split: str, classes: Tensor, generator: torch.Generator) -> Tensor:
    """Random crops of the given classes.

    classes: LongTensor [B] class ids. Returns float [B, 3, 48, 48] in [-1, 1]. Level, position and a horizontal
    flip are drawn from `generator` (and only from it), so the output is a pure function of its state.
    """
    out = torch.empty(len(classes), 3, CROP, CROP)
    draws = torch.rand(len(classes), 4, generator=generator)   # level, x, y, flip
    for i, c in enumerate(classes.tolist()):
        levels = photo_levels(CLASS_NAMES[c])
        img = levels[min(int(draws[i, 0] * len(levels)), len(levels) - 1)]
        lo, hi = _region(img.shape[2], split)
        x0 = lo + int(draws[i, 1] * (hi - lo - CROP + 1))
        y0 = int(draws[i, 2] * (img.shape[1] - CROP + 1))
        crop = img[:, y0:y0 + CROP, x0:x0 + CROP]
        out[i] = crop.flip(-1) if draws[i, 3] < 0.5 else crop
    return out


def batch(split: str, batch_size: int, seed: int, index: int = 0) -> tuple[Tensor, Tensor]:
    """Batch number `index` of a seeded stream: (images [B, 3, 48, 48] in [-1, 1], class ids LongTensor [B]).

    Each batch has its own generator seeded from (seed, index), so training can resume at any step and get the
    same batch it would have got without the interruption.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(index))
    classes = torch.randint(len(CLASS_NAMES), (batch_size,), generator=g)
    return sample_crops(split, classes, g), classes


def batches(split: str, batch_size: int, seed: int, start: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
    """Endless iterator of `batch(split, batch_size, seed, i)` for i = start, start + 1, ..."""
    i = start
    while True:
        yield batch(split, batch_size, seed, i)
        i += 1


def fixed_set(split: str, n_per_class: int, seed: int) -> tuple[Tensor, Tensor]:
    """A class-balanced set: n_per_class crops of every class -> (images [N, 3, 48, 48], classes [N])."""
    g = torch.Generator().manual_seed(int(seed))
    classes = torch.arange(len(CLASS_NAMES)).repeat_interleave(n_per_class)
    return sample_crops(split, classes, g), classes


@dataclass(frozen=True)
class DataDescription:
    """What a model card records about the data a zoo model was trained on."""
    classes: tuple[str, ...] = tuple(CLASS_NAMES)
    crop: int = CROP
    level_widths: tuple[int, ...] = LEVEL_WIDTHS
    heldout: str = f"right {int(HELDOUT_FRACTION * 100)}% of every photo (all levels), never used for training"
    augment: str = "random level (downscale), random position, horizontal flip p=0.5"
    sources: str = "skimage.data, sklearn.datasets.load_sample_image, matplotlib sample_data (no download)"
