"""What a sweep runs on and what it measures besides the built-in metrics: the generator registry and user scorers.

A generator is a name -> a function of `dtype` (what the generative models compute in, `specdec.precision`) and
`device` (where they run, `specdec.devices`) returning a bundle (`specdec.protocols.Bundle`: .target,
.drafter_model, .features, .classes, .target_gpt, .class_id, .heldout_images). Bundles are loaded once per process,
dtype and device; a compiled target (`compile`) wraps the loaded bundle's.
A scorer is a user metric named in a config as "module:callable".
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Protocol, runtime_checkable

import torch
from torch import Tensor

from specdec.compiled import DEFAULT_COMPILE, TARGET_COMPILE, compile_adapter
from specdec.devices import DEFAULT_DEVICE, use_device
from specdec.precision import DEFAULT_DTYPE
from specdec.registry import load_object
from specdec.testing import tiny_random_bundle


class BenchConfigError(ValueError):
    """A bad bench config: what is wrong and the valid choices."""


def _zoo_bundle(dtype, device):
    import specdec.zoo       # loads weights: only when a sweep asks for the zoo

    return specdec.zoo.load(device, dtype=dtype)


def _video_zoo_bundle(dtype, device):
    from specdec.zoo import video     # the video zoo (clips of 8 frames; decode gives filmstrips)

    return video.load(device, dtype=dtype)


def _tiny_random_bundle(dtype, device):
    return tiny_random_bundle(dtype=dtype, device=device)


GENERATORS: dict[str, Callable[[str, torch.device], Any]] = {"zoo": _zoo_bundle, "video-zoo": _video_zoo_bundle,
                                                             "tiny-random": _tiny_random_bundle}
_BUNDLES: dict[tuple, Any] = {}      # (name, dtype, TARGET_COMPILE[compile], device) -> bundle


def check_generator(name: str) -> None:
    if name not in GENERATORS:
        raise BenchConfigError(f"unknown generator {name!r}; valid generators: {', '.join(sorted(GENERATORS))}")


def load_generator(name: str, dtype: str = DEFAULT_DTYPE, compile: str = DEFAULT_COMPILE,
                   device: str = DEFAULT_DEVICE):
    """The bundle of a registered generator computing in `dtype` on `device`, its target's decode step run as
    `compile` says (`specdec.compiled.TARGET_COMPILE`), loaded on first use and kept for the rest of the process."""
    check_generator(name)
    eager = (name, dtype, None, device)
    if eager not in _BUNDLES:
        try:
            where = use_device(device)
        except (RuntimeError, ValueError) as e:
            raise BenchConfigError(str(e)) from e
        try:
            _BUNDLES[eager] = GENERATORS[name](dtype, where)
        except Exception as e:   # e.g. the zoo's weights are not trained/installed yet
            raise BenchConfigError(f"generator {name!r} could not be loaded in {dtype} on {device}: {e}") from e
    how = TARGET_COMPILE[compile]           # settings that compile the target alike share one compiled target
    if (name, dtype, how, device) not in _BUNDLES:
        bundle = _BUNDLES[eager]
        try:
            target = compile_adapter(bundle.target, *how)
        except TypeError as e:
            raise BenchConfigError(f"generator {name!r} cannot run compiled: {e}") from e
        _BUNDLES[name, dtype, how, device] = dataclasses.replace(bundle, target=target)
    return _BUNDLES[name, dtype, how, device]


@runtime_checkable
class Scorer(Protocol):
    """A user metric: `name`, and `__call__(images [N, 3, H, W] in [-1, 1], cond [N]) -> float`.

    Config: `scorers = ["my_pkg.metrics:clip_score"]`; the object is called as is, or instantiated first when it
    is a class. Wrap torchmetrics' FrechetInceptionDistance (with local weights) or a CLIP score this way.
    """

    name: str

    def __call__(self, images: Tensor, cond) -> float: ...


class MeanBrightness:
    """A trivial example scorer (`specdec.bench:MeanBrightness`): mean pixel value in [-1, 1]."""

    name = "mean_brightness"

    def __call__(self, images: Tensor, cond) -> float:
        return float(images.float().mean())


def load_scorer(spec: str) -> Scorer:
    """"module:callable" or "file.py:callable" -> the scorer (a class is instantiated); BenchConfigError when it
    cannot be loaded."""
    if not isinstance(spec, str) or ":" not in spec:
        raise BenchConfigError(f"scorer {spec!r} must be 'module:callable' or 'path/to/file.py:callable'")
    attr = spec.rpartition(":")[2]
    try:
        obj = load_object("scorer", spec)
    except ValueError as e:
        raise BenchConfigError(f"cannot import scorer {spec!r}: {e}") from e
    if isinstance(obj, type):
        obj = obj()
    if not callable(obj):
        raise BenchConfigError(f"scorer {spec!r} is not callable")
    if not getattr(obj, "name", None):      # a plain function: named after its attribute
        try:
            obj.name = attr
        except AttributeError:
            pass
    return obj
