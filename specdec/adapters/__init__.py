"""One adapter per generator family; each implements `specdec.adapters.base.ARModel`."""
from specdec.adapters.base import ARModel
from specdec.adapters.gpt import GPTAdapter

__all__ = ["ARModel", "GPTAdapter"]
