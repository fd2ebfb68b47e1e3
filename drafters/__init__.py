"""Drafters, one per file. Each cites its paper."""
from drafters.jacobi import JacobiDrafter
from drafters.lookup import LookupDrafter
from drafters.model import ModelDrafter

__all__ = ["ModelDrafter", "JacobiDrafter", "LookupDrafter"]
