"""Drafters, one per file. Each cites its paper."""
from drafters.dynamic_tree import DynamicTreeDrafter
from drafters.frozen_head import FrozenHeadDrafter
from drafters.jacobi import JacobiDrafter
from drafters.lookup import LookupDrafter
from drafters.model import ModelDrafter
from drafters.model_tree import TreeModelDrafter

__all__ = ["ModelDrafter", "TreeModelDrafter", "JacobiDrafter", "LookupDrafter", "DynamicTreeDrafter",
           "FrozenHeadDrafter"]
