"""Tiny random models for tests: real model classes, random weights, CPU (they live in `specdec.testing`)."""
from __future__ import annotations

from specdec.testing import perturbed_copy, tiny_gpt

__all__ = ["perturbed_copy", "tiny_gpt"]
