"""Where the generative models run: names, parsing, availability, and the one default.

The zoo, the bench and the demos load on `DEFAULT_DEVICE` (the CPU: the embedded default must run anywhere) unless a
user asks for another; everything after loading follows the target's device (the engine allocates on it, rules
prepare their tables on it, metrics move images to the feature net's). Absolute timings only mean something on the
device a generator is deployed on, so `specdec bench --device cuda` and `specdec demo --device cuda` exist for that.

Names are torch's ("cpu", "cuda", "cuda:1", "mps"). `device_name` checks the spelling without touching the hardware (a
config written for a GPU can be listed on a laptop); `available_device` checks that the hardware is there, with the
fix in the error; `use_device` also makes a CUDA device the current one, which is what timing (CUDA events, the
synchronising clock) records and waits on.
"""
from __future__ import annotations

import torch

DEFAULT_DEVICE = "cpu"
DEVICE_TYPES = ("cpu", "cuda", "mps")


def device_name(value: str | torch.device | None) -> str:
    """"cuda" / "cuda:1" / torch.device / None (the default, cpu) -> its canonical name; ValueError naming the
    choices."""
    if value is None:
        return DEFAULT_DEVICE
    try:
        device = torch.device(value)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device must be one of {', '.join(DEVICE_TYPES)} (optionally with an index, e.g. cuda:1), "
                         f"got {value!r}") from e
    if device.type not in DEVICE_TYPES:
        raise ValueError(f"device must be one of {', '.join(DEVICE_TYPES)} (optionally with an index, e.g. cuda:1), "
                         f"got {value!r}")
    return str(device)


def available_device(value: str | torch.device | None) -> torch.device:
    """The torch.device for `value` after checking this machine has it; RuntimeError with the fix otherwise."""
    device = torch.device(device_name(value))
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"device {str(device)!r}: CUDA is not available here (no GPU, or a CPU-only torch "
                               f"build); run on the CPU (device cpu) or install a CUDA build of torch")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise RuntimeError(f"device {str(device)!r}: this machine has {torch.cuda.device_count()} CUDA "
                               f"device(s), indices 0..{torch.cuda.device_count() - 1}")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise RuntimeError(f"device {str(device)!r}: MPS is not available here; run on the CPU (device cpu)")
    return device


def same_device(requested: torch.device, actual: torch.device) -> bool:
    """Whether what runs on `actual` runs where `requested` asks: the same type, and the same index when the
    request names one ("cuda" is met by cuda:0 or cuda:1)."""
    return requested.type == actual.type and (requested.index is None or requested.index == actual.index)


def use_device(value: str | torch.device | None) -> torch.device:
    """`available_device`, and a CUDA device becomes the current one: events and synchronisation then refer to the
    GPU the models run on (cuda:1 under a second process), not to cuda:0."""
    device = available_device(value)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    return device
