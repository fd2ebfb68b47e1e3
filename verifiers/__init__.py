"""Acceptance rules, one per file. Each states whether it is lossless and cites its paper."""
from verifiers.bounded_lantern import BoundedLanternRule
from verifiers.cspd import CSpDRule
from verifiers.exact import ExactRule
from verifiers.gaussian_chain import GaussianChainRule
from verifiers.grouped import GroupedRule
from verifiers.lantern import LanternRule
from verifiers.spectr import SpecTrRule
from verifiers.typical import TypicalRule

__all__ = ["ExactRule", "LanternRule", "BoundedLanternRule", "GroupedRule", "TypicalRule", "SpecTrRule",
           "CSpDRule", "GaussianChainRule"]
