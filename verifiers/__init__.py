"""Acceptance rules, one per file. Each states whether it is lossless and cites its paper."""
from verifiers.exact import ExactRule

__all__ = ["ExactRule"]
