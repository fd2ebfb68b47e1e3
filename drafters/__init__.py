"""Drafters, one per file. Each cites its paper."""
from drafters.model import ModelDrafter

__all__ = ["ModelDrafter"]
