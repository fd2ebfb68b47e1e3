"""Compute precision of the generative models: names, parsing, and the one default.

Weights are stored in float16 (zoo) or whatever a checkpoint holds; the models compute in `DEFAULT_DTYPE` unless a
user asks for another. bfloat16 is how real image generators run on accelerators, and on CPUs with AVX512-BF16 it
changes the regime speculative decoding lives in: a float32 matrix product with a few rows costs in proportion to the
rows, a bfloat16 one hardly more than one row, so verifying k + 1 tokens gets close to the price of one decode step.
Sampling stays in float32 whatever the models compute in (`specdec.sampling.to_probs` upcasts the logits).

Losslessness is unchanged in kind: the exact rule emits the law of the target's verify-pass logits. At reduced
precision those differ from a one-token decode step's by rounding (the same batch-shape effect every GPU kernel
has); both are the target at that precision.
"""
from __future__ import annotations

import torch

DEFAULT_DTYPE = "float32"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def as_dtype(value: str | torch.dtype | None) -> torch.dtype:
    """"bfloat16" / torch.bfloat16 / None (the default, float32) -> torch.dtype; ValueError naming the choices."""
    if value is None:
        value = DEFAULT_DTYPE
    if isinstance(value, torch.dtype) and value in DTYPES.values():
        return value
    if isinstance(value, str) and value.removeprefix("torch.") in DTYPES:
        return DTYPES[value.removeprefix("torch.")]
    raise ValueError(f"dtype must be one of {', '.join(DTYPES)} (a name or the torch.dtype), got {value!r}")


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> "bfloat16"."""
    return str(dtype).removeprefix("torch.")
