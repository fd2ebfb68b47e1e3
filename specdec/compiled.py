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

import functools

import torch
import torch._inductor.config as inductor_config
from torch import Tensor

from specdec.adapters.static import StaticCacheAdapter, StaticCacheState
from specdec.protocols import ARModel
from specdec.sampling import Sampling
from specdec.types import Logits

MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
RECOMPILE_LIMIT = 64         # graphs of one code object (models x shapes) before dynamo gives up
DEFAULT_COMPILE = "off"
# how a bench run (`compile` in a config's [sweep]) runs the target's decode step: (mode, freeze), None = eager
TARGET_COMPILE = {"off": None, "on": (None, False), "freeze": (None, True), "cuda-graphs": ("reduce-overhead", False),
                  "freeze+step": (None, True)}
# the settings that also run the engine's chain step (probabilities, the rule's test, the commit) as one compiled
# graph: `generate(..., compiled=True)`, `specdec.step`
STEP_COMPILE = frozenset({"freeze+step"})


class CompiledAdapter(ARModel):
    """An adapter whose decode step runs compiled; everything else is the wrapped adapter's (see module doc)."""

    def __init__(self, adapter: StaticCacheAdapter, mode: str | None = None, freeze: bool = False):
        if not isinstance(adapter, StaticCacheAdapter):
            raise TypeError(f"compile_adapter needs an adapter with a static KV cache (GPTAdapter, LlamaGenAdapter); "
                            f"{type(adapter).__name__} keeps a cache that grows every step, so each step would be "
                            f"a new graph: run it uncompiled")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.inner = adapter
        for name in ("vocab_size", "num_tokens", "grid", "max_new_tokens", "supports_cfg", "codebook",
                     "token_embeddings", "output_embeddings", "hidden_size", "supports_trees", "token_mask",
                     "can_decode"):
            setattr(self, name, getattr(adapter, name, None))
        self.hidden_size = self.hidden_size or 0
        self.supports_trees = bool(self.supports_trees)
        self.model = adapter.model
        self._step = compile_step(adapter.forward, mode, freeze)
        self._tree_part = compile_step(adapter.forward_tree_part, mode, freeze)

    @property
    def device(self) -> torch.device:
        return self.inner.device

    def start(self, cond, sampling: Sampling, capacity: int,
              hidden: bool = False) -> tuple[StaticCacheState, Logits]:
        """As the wrapped adapter's; hidden=True (feature drafters such as EAGLE) makes the compiled step return the
        last hidden states too (one more graph, compiled on first use)."""
        if hidden:
            return self.inner.start(cond, sampling, capacity, hidden=True)
        return self.inner.start(cond, sampling, capacity)

    def forward(self, state: StaticCacheState, tokens: Tensor) -> Logits:
        return self._step(state, tokens)

    def forward_tree_part(self, state: StaticCacheState, tokens: Tensor, positions: Tensor, slots: Tensor,
                          allowed: Tensor, base: Tensor) -> Logits:
        """The wrapped adapter's forward over tree nodes, compiled: one graph per number of nodes fed (the mask is
        an input, so every tree of a size, static or dynamic, replays the same graph)."""
        return self._tree_part(state, tokens, positions, slots, allowed, base)

    # a draft tree's verification: the wrapped adapter's (inputs built eagerly), through the compiled part above
    forward_tree = StaticCacheAdapter.forward_tree

    def commit_tree(self, state: StaticCacheState, tree, path: Tensor) -> None:
        self.inner.commit_tree(state, tree, path)

    def rollback(self, state: StaticCacheState, keep: Tensor) -> None:
        self.inner.rollback(state, keep)

    def decode(self, tokens: Tensor) -> Tensor | None:
        return self.inner.decode(tokens)


def compile_step(fn, mode: str | None = None, freeze: bool = False):
    """fn as one static-shape graph (fullgraph, dynamic=False); freeze: inductor's freezing (see compile_adapter).
    torch.compile takes a mode or options, not both: freezing goes in with the mode's own options.

    Every model compiled in a process is a new graph of the same code (an adapter's forward, draft_token), and dynamo
    caps those at `recompile_limit` (8) before a fullgraph compile fails: the cap is raised to RECOMPILE_LIMIT."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    if not freeze:
        return torch.compile(fn, fullgraph=True, dynamic=False, mode=mode)
    options = dict(torch._inductor.list_mode_options(mode) if mode else {}, freezing=True)
    compiled = torch.compile(fn, fullgraph=True, dynamic=False, options=options)

    @functools.wraps(fn)
    def frozen(*args, **kwargs):
        # dynamo decides while tracing whether parameters become graph constants (`is_parameter_freezing`), from the
        # global inductor config: torch.compile's `options` reach inductor only, after the parameters were already
        # made graph inputs, and freezing then has nothing to fold or pre-pack. A graph may be traced at any call (a
        # new shape), so every call runs with the flag set; setting it costs a few microseconds.
        before = inductor_config.freezing
        inductor_config.freezing = True
        try:
            return compiled(*args, **kwargs)
        finally:
            inductor_config.freezing = before
    return frozen


def compile_adapter(adapter: StaticCacheAdapter, mode: str | None = None, freeze: bool = False) -> CompiledAdapter:
    """`adapter` with its decode step compiled (mode: torch.compile's; "reduce-overhead" adds CUDA graphs).

    freeze=True: inductor's freezing, which treats the weights as constants and pre-packs them for the CPU's matrix
    kernels once. The compiled step keeps the weights it saw: changing the model's weights afterwards needs a new
    compile_adapter. The zoo target's raw one-token step at batch 1 (bfloat16, 2 CPU threads) takes 2.44 ms frozen,
    3.03 ms compiled with the weights as inputs and 5.05 ms eager (experiments/freeze_costs.py)."""
    return CompiledAdapter(adapter, mode, freeze)
