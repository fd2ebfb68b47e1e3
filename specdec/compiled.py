"""Compiled decode steps: a model's per-step call as one torch.compile graph.

Small models spend most of a decode step in per-call overhead (Python, dispatch, dozens of tiny kernels); the
zoo drafter's step costs about twice its arithmetic. `compile_adapter(adapter)` wraps an adapter so that its
`forward` (one decode step: embed, every layer with the static KV cache, head, CFG split) is one compiled graph
(`torch.compile(fullgraph=True, dynamic=False)`: one graph per input shape, i.e. per batch size and per number of
tokens fed, compiled on first use). Use it for the target (its verify step feeds k + 1 tokens) and for the model a
`ModelDrafter` drafts with (it feeds 1 or 2 tokens):

    target = compile_adapter(bundle.target)
    drafter = ModelDrafter(compile_adapter(bundle.drafter_model), k=4)
    specdec.generate(target, cond, drafter=drafter, ...)          # same tokens as the eager adapters

On a GPU, `mode="reduce-overhead"` records each graph as a CUDA graph as well (captured once per shape and
replayed); the KV cache is updated in place at positions held in tensors, so every replay is the same graph.

Only adapters with a static cache (`specdec.adapters.static.StaticCacheAdapter`: the project's GPT, LlamaGen)
qualify: a transformers `DynamicCache` grows by one slot per token, a new shape every step.
"""
from __future__ import annotations

import torch
from torch import Tensor

from specdec.adapters.static import StaticCacheAdapter, StaticCacheState
from specdec.protocols import ARModel
from specdec.sampling import Sampling
from specdec.types import Logits

MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


class CompiledAdapter(ARModel):
    """An adapter whose decode step runs compiled; everything else is the wrapped adapter's (see module doc)."""

    def __init__(self, adapter: StaticCacheAdapter, mode: str | None = None):
        if not isinstance(adapter, StaticCacheAdapter):
            raise TypeError(f"compile_adapter needs an adapter with a static KV cache (GPTAdapter, LlamaGenAdapter); "
                            f"{type(adapter).__name__} keeps a cache that grows every step, so each step would be "
                            f"a new graph: run it uncompiled")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.inner = adapter
        for name in ("vocab_size", "num_tokens", "grid", "max_new_tokens", "supports_cfg", "codebook",
                     "token_embeddings", "token_mask", "can_decode"):
            setattr(self, name, getattr(adapter, name))
        self.model = adapter.model
        self._step = torch.compile(adapter.forward, fullgraph=True, dynamic=False, mode=mode)

    @property
    def device(self) -> torch.device:
        return self.inner.device

    def start(self, cond, sampling: Sampling, capacity: int) -> tuple[StaticCacheState, Logits]:
        return self.inner.start(cond, sampling, capacity)

    def forward(self, state: StaticCacheState, tokens: Tensor) -> Logits:
        return self._step(state, tokens)

    def rollback(self, state: StaticCacheState, keep: Tensor) -> None:
        self.inner.rollback(state, keep)

    def decode(self, tokens: Tensor) -> Tensor | None:
        return self.inner.decode(tokens)


def compile_adapter(adapter: StaticCacheAdapter, mode: str | None = None) -> CompiledAdapter:
    """`adapter` with its decode step compiled (mode: torch.compile's; "reduce-overhead" adds CUDA graphs)."""
    return CompiledAdapter(adapter, mode)
