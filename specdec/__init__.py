"""specdec: speculative and accelerated decoding for autoregressive image and video generators."""
from specdec.engine import generate
from specdec.protocols import AcceptanceRule, ARModel, DecodeContext, Drafter
from specdec.sampling import Sampling
from specdec.types import Draft, GenerationResult, Logits, SpecStats, Verdict

__all__ = ["generate", "Sampling", "Draft", "Verdict", "SpecStats", "GenerationResult", "Logits",
           "DecodeContext", "Drafter", "ARModel", "AcceptanceRule", "zoo"]
__version__ = "0.1.0"


def __getattr__(name):
    # the zoo loads weights; import it only when asked for
    if name == "zoo":
        import importlib
        return importlib.import_module("specdec.zoo")
    raise AttributeError(name)
