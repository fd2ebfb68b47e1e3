"""Every protocol of the toolkit in one place: what the engine asks of a generator, a drafter, a rule, a source
of randomness, and what the bench asks of a bundle of models.

Notation: p = target distribution, q = draft distribution, both after `specdec.sampling` (CFG mix, temperature,
top-k, top-p, token mask). B = batch, k = draft tokens per step, V = image-token vocabulary, T = tokens per image.

Optional capabilities are class attributes with their default, declared here once. A class that subclasses the
protocol explicitly (every adapter, drafter and rule in this project does) inherits the defaults, so callers read
`target.token_mask` or `drafter.one_hot_drafts` directly and never probe with `getattr`. A duck-typed object works
too, as long as it defines every member; `require` says which ones it lacks.

Wave 2 extends these shapes (draft trees on `AcceptanceRule` and `ARModel`, continuous per-position distributions,
block generators for video, hidden states for learned drafters) by adding members with defaults here, so existing
implementations keep working unchanged. Block generators (video) have their own small protocols at the end.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from specdec.random import RowStreams
from specdec.sampling import Sampling, to_probs
from specdec.types import Draft, Logits, TreeVerdict, Verdict


@runtime_checkable
class Randomness(Protocol):
    """Where a rule gets its uniforms: `uniform(tag, n) -> [B, n]` in the open interval (0, 1).

    Each tag is an independent stream; the engine's implementation keys draws by (seed, row, token position, tag)
    so that a row's output does not depend on its batch. `specdec.random.GeneratorRandomness` wraps a
    `torch.Generator` for standalone use.
    """

    def uniform(self, tag: str, n: int) -> Tensor: ...


@runtime_checkable
class ARModel(Protocol):
    """The adapter a generator is wrapped in. The engine speaks image-vocabulary ids 0..V-1 only; an adapter maps
    them to its model's own ids, restricts the model's logits to the image vocabulary, and hides its prompt format,
    CFG doubling (`specdec.adapters.cfg`) and cache layout."""

    vocab_size: int                          # image-token vocabulary seen by rules (V)
    num_tokens: int                          # tokens per image (T)
    grid: tuple[int, ...]                    # (H, W) or (F, H, W), raster order
    max_new_tokens: int                      # context limit for generated tokens (draft slack included)
    device: torch.device                     # where the model's weights (and its caches) live
    supports_cfg: bool = False               # has an unconditional path
    codebook: Tensor | None = None           # [V, D] VQ code vectors (LANTERN geometry), if known
    token_embeddings: Tensor | None = None   # [V, D] LM input embeddings of the image tokens (GSD geometry)
    output_embeddings: Tensor | None = None  # [V, hidden] rows of a bias-free output head: logits = hidden @ it.T
    token_mask: Tensor | None = None         # BoolTensor [V] on the model's device: tokens that may be sampled
    can_decode: bool = True                  # decode() returns pixels (False: generate() returns tokens only)
    hidden_size: int = 0                     # > 0: start(..., hidden=True) makes every Logits carry the last
                                             # hidden states [B, n, hidden_size] (feature drafters read them)

    def start(self, cond: Any, sampling: Sampling, capacity: int) -> tuple[Any, Logits]:
        """Prefill the condition (doubling rows for CFG when sampling.cfg_scale != 1).
        cond [B, ...]; capacity = generated tokens the cache must hold. Returns (state, logits [B, 1, V] for
        image token 0). An adapter with hidden_size > 0 also takes hidden=True (keyword): every Logits it returns
        for this state then carries `hidden`; the engine asks for it only when the drafter needs_hidden."""
        ...

    def forward(self, state: Any, tokens: Tensor) -> Logits:
        """Append tokens [B, n] (image ids) after each row's own length; logits [B, n, V] predict the next."""
        ...

    def rollback(self, state: Any, keep: Tensor) -> None:
        """Per row: keep the first keep[b] generated tokens in the cache, drop the rest. keep: LongTensor [B]."""
        ...

    def decode(self, tokens: Tensor) -> Tensor | None:
        """tokens [B, T] -> pixels [B, 3, H, W] in [-1, 1], or None when the adapter cannot decode."""
        ...

    supports_trees: bool = False    # forward_tree / commit_tree are implemented

    def forward_tree(self, state: Any, tree, last: Tensor, n_done: Tensor) -> Logits:
        """Verify a draft tree (specdec.tree.DraftTree, N nodes) in one forward: feeds [last, nodes] after each
        row's committed prefix (n_done [B] committed tokens, last [B] the newest) -> Logits [B, 1 + N, V]."""
        raise ValueError(f"{type(self).__name__} cannot verify draft trees; use a chain drafter")

    def commit_tree(self, state: Any, tree, path: Tensor) -> None:
        """After forward_tree: keep the accepted root-to-node path (node indices [B, D], -1 padded) as if it had been
        fed as a chain after `last`; `rollback` then sets the lengths."""
        raise ValueError(f"{type(self).__name__} cannot verify draft trees; use a chain drafter")


@dataclass
class DecodeContext:
    """What a drafter may read about the generation in progress (updated in place by the engine).

    tokens:   LongTensor [B, T + 2k + 1] committed image tokens (valid up to n_done[b])
    n_done:   LongTensor [B] committed tokens per row
    cond:     the condition passed to generate()
    streams:  counter-based per-row random streams (drafters use their own tags)
    token_mask: BoolTensor [V] of samplable tokens (the target's), or None
    capacity: generated tokens a drafter's own cache must hold (finished rows parked at T-1)
    hidden:   FloatTensor [B, k+1, H] or None: the target's last hidden states at the last verification's inputs
              [last, d_1..d_k] (a tree's accepted path, as a chain), [B, 1, H] after the prefill; set only for a
              drafter that needs_hidden. Row b's first n_accepted[b] + 1 are states of committed tokens.
    """

    target: ARModel
    cond: Any
    sampling: Sampling
    tokens: Tensor
    n_done: Tensor
    num_tokens: int
    grid: tuple[int, ...]
    streams: RowStreams
    token_mask: Tensor | None = None
    capacity: int = 0
    hidden: Tensor | None = None

    def park(self, keep: Tensor) -> Tensor:
        """Clamp per-row cache lengths [B] so finished rows stay parked at T-1 (their outputs are ignored)."""
        return keep.clamp_max(self.num_tokens - 1)

    def probs(self, logits: Logits) -> Tensor:
        """Raw logits [B, n, V] -> probabilities [B, n, V] exactly as the target's p is made."""
        return to_probs(logits.cond, logits.uncond, self.sampling, self.token_mask)


@runtime_checkable
class Drafter(Protocol):
    """Proposes k tokens per step (transformers' candidate-generator shape: propose, then observe the verdict)."""

    k: int                          # draft tokens per step
    one_hot_drafts: bool = False    # every q it returns is one-hot (deterministic drafts); LANTERN's delta bounds
                                    # the emitted law only then, so reports read it to state a rule's bound
    forwards: int = 0               # drafter model calls made in the current generation (0: training-free)
    needs_draft_model: bool = False  # the registry builds it as cls(draft_model, **params)
    draft_model_source: str = "drafter_model"   # with needs_draft_model: the Bundle attribute it is built on
    tree_size: int = 0              # > 0: propose() returns a specdec.tree.DraftTree of this many nodes (k: its
                                    # depth); 0: a chain of k tokens
    needs_hidden: bool = False      # reads the target's last hidden states (ctx.hidden; the target must have
                                    # hidden_size > 0)

    def start(self, ctx: DecodeContext) -> None:
        """Called once per generate() after the prefill; keep ctx, it is updated in place."""
        ...

    def propose(self, k: int) -> Draft:
        """Draft [B, k] tokens for positions n_done .. n_done+k-1 with their q [B, k, V] (None = one-hot)."""
        ...

    def observe(self, verdict: Verdict, target_probs: Tensor) -> None:
        """Called after each verification with target_probs [B, k+1, V]; ctx.n_done is already updated."""
        ...


@runtime_checkable
class AcceptanceRule(Protocol):
    """Decides how many drafts each row keeps, and the token committed after them. A pure, batched function of
    tensors and its randomness: no Python loop over rows or vocabulary, no host sync, no global RNG."""

    lossless: bool = False          # True only if the emitted law equals p exactly, for every drafter
    name: str = "rule"              # registry name, used in reports
    geometry_source: str | None = None  # "codebook" / "token_embeddings": built over that table of the target

    def verify(self, draft_tokens: Tensor, draft_probs: Tensor, target_probs: Tensor,
               rng: Randomness) -> Verdict:
        """draft_tokens [B, k], draft_probs [B, k, V], target_probs [B, k+1, V] -> Verdict(n_accepted [B],
        next_token [B])."""
        ...

    supports_trees: bool = False    # verify_tree is implemented (a chain-only rule refuses a draft tree)

    def verify_tree(self, tree, target_probs: Tensor, rng: Randomness) -> "TreeVerdict":
        """tree: specdec.tree.DraftTree of N nodes; target_probs [B, 1 + N, V] (row 0: the root's output) ->
        TreeVerdict(n_accepted [B], node [B], next_token [B]). Default: refuse, naming the rule."""
        raise ValueError(f"rule {self.name!r} ({type(self).__name__}) verifies chains of drafts only; use a chain "
                         f"drafter, or a rule that verifies trees (exact)")

    def prepare(self, device) -> None:
        """Precompute what verify() needs that does not depend on the step (e.g. neighbour tables), so that the
        first decode step pays nothing extra; callers that time generations call it outside the timed region.
        Default: nothing to precompute."""

    def distortion_bound(self, one_hot_drafts: bool) -> float | None:
        """The per-token total-variation bound between the emitted law and p that the rule guarantees when the
        drafter's q is one-hot (one_hot_drafts=True) or arbitrary: 0.0 for a lossless rule, None for no bound."""
        return 0.0 if self.lossless else None


@runtime_checkable
class Bundle(Protocol):
    """A generator and what the bench and the demo measure it with (the zoo, or a stand-in of tiny models)."""

    target: ARModel                 # the generator
    drafter_model: ARModel          # a smaller generator over the same vocabulary (for ModelDrafter)
    features: Any                   # .features(images [N, 3, H, W]) -> [N, D] (feature-space Frechet distance)
    classes: list                   # class names, index = class id
    target_gpt: Any                 # the target's raw model: forward_train(tokens [B, T], cond [B]) -> logits
    eagle_head: Any = None          # a specdec.models.eagle.EagleHead trained on this target (for the eagle drafter)

    def class_id(self, name: Any) -> int:
        """A class name (or id, or its decimal string) -> class id; ValueError listing the valid names."""
        ...

    def heldout_images(self, n: int, seed: int = 0, classes: Tensor | None = None) -> Tensor:
        """n real images [n, 3, H, W] in [-1, 1] not seen in training, of the given class ids [n] when given."""
        ...


# ---- blocks (video): block-autoregressive generators, their decoders, scorers and routers ------------------------
# F = frames per clip, F_b = frames per block, N = F / F_b blocks, B = batch. A block's latents are whatever the
# generator's frames are made of: token ids [B, F_b, h, w] for a discrete generator, float latents
# [B, F_b, C, h, w] for a diffusion one. The block loop (specdec.blocks) pre-samples each block's noise from the
# TARGET's `block_noise` and hands the same tensor to the drafter and (after a rejection) to the target, so that
# both start from the same randomness. A decoder may return another number of pixel frames per block, F_out
# (a causal video VAE with temporal compression); scorers score each of them.

@runtime_checkable
class BlockDecoder(Protocol):
    """A (possibly streaming) decoder from block latents to pixels. A streaming decoder keeps a cache across blocks
    (e.g. a causal video VAE's temporal cache); the block loop snapshots it before decoding a draft and restores it
    when the draft is rejected."""

    def decode(self, latents: Tensor) -> Tensor:
        """latents of one block -> frames [B, F_out, 3, H, W] in [-1, 1]; advances the cache, if any."""
        ...

    def snapshot(self) -> Any:
        """A copy of the decoder's cache that `restore` puts back exactly (None for a stateless decoder)."""
        return None

    def restore(self, snapshot: Any) -> None:
        """Put back a cache taken by `snapshot`."""

    def reset(self) -> None:
        """Drop the cache: the next block decoded starts a new clip (the block loop calls it first)."""


@runtime_checkable
class BlockGenerator(Protocol):
    """A generator that makes a clip block by block, each block conditioned on the committed ones."""

    num_frames: int                 # F
    frames_per_block: int           # F_b (divides F)
    device: torch.device

    def start(self, cond: Any) -> Any:
        """Begin clips for condition cond [B, ...]; returns the state that holds the committed blocks."""
        ...

    def block_noise(self, state: Any, block: int, generator: torch.Generator) -> Tensor:
        """Everything random that generating block `block` consumes, pre-sampled with `generator` (on the model's
        device): e.g. uniforms [B, tokens per block] for a discrete generator, x_T and per-step noises for a
        diffusion one. Two generators that share a router must produce the same shape."""
        ...

    def generate_block(self, state: Any, block: int, noise: Tensor) -> Tensor:
        """Generate block `block` after the committed blocks [0, block), consuming only `noise` -> its latents.
        Does not commit it."""
        ...

    def commit_block(self, state: Any, block: int, latents: Tensor) -> None:
        """Append block `block` (made by this generator or by another sharing its latent space) to the context."""
        ...


@runtime_checkable
class BlockScorer(Protocol):
    """Scores decoded frames for the router: higher is better."""

    def __call__(self, frames: Tensor, cond: Any) -> Tensor:
        """frames [B, F_out, 3, H, W] in [-1, 1], the clip's condition -> finite scores [B, F_out]."""
        ...


@runtime_checkable
class Router(Protocol):
    """Decides per row whether a drafted block is kept (verifiers.router: BlockRouter, the RandomRouter control).
    Lossy and unbounded by design: whatever it lets through is the drafter's."""

    name: str
    lossless: bool

    def forces_reject(self, block: int) -> bool:
        """Block `block` goes to the target whatever its score (it is then not drafted)."""
        ...

    def aggregate(self, scores: Tensor) -> Tensor:
        """Per-frame scores [B, F_out] -> block scores [B] (recorded in results)."""
        ...

    def decide(self, scores: Tensor, block: int, generator: torch.Generator) -> Tensor:
        """scores [B, F_out] -> accept BoolTensor [B]."""
        ...


def require(obj: Any, protocol: type, role: str) -> None:
    """Raise TypeError naming the members `obj` lacks to serve as `role` (e.g. "the drafter")."""
    if isinstance(obj, protocol):
        return
    missing = [m for m in _members(protocol) if not hasattr(obj, m)]
    raise TypeError(f"{role} ({type(obj).__name__}) does not implement specdec.protocols.{protocol.__name__}: "
                    f"missing {', '.join(missing)}; subclass specdec.protocols.{protocol.__name__} to inherit the "
                    f"optional members' defaults")


def _members(protocol: type) -> list[str]:
    names = []
    for cls in protocol.__mro__:
        if cls is Protocol or cls is object or cls.__name__ == "Generic":
            continue
        names += [n for n in {**getattr(cls, "__annotations__", {}), **vars(cls)}
                  if not n.startswith("_") and n not in names]
    return names


# ---- continuous tokens: rules over per-position Gaussian transition chains (specdec.continuous) ------------------
# B = batch, n = token positions verified together, m = transitions in the verified window, D = token dimension.
# Beside AcceptanceRule: a continuous rule never sees [V] vectors, only the heads' chains.
from typing import TYPE_CHECKING  # noqa: E402

if TYPE_CHECKING:
    from specdec.continuous import ChainVerdict, GaussianChain


@runtime_checkable
class ContinuousRule(Protocol):
    """Decides, at B x n positions at once, what a continuous-token generator commits given the drafter's and the
    target's Gaussian transition chains. A pure, batched function of tensors, its uniforms and a generator (for
    residual proposals): no Python loop over rows or positions, no global RNG."""

    lossless: bool = False                  # True only if the emitted token law equals the target's exactly
    name: str = "continuous_rule"           # registry name, used in reports
    target_at_draft_states: bool = False    # True: `target` holds the target head's means at the drafter's own
                                            # states (one batched call over them); False: the target's own rollout
                                            # from the same x_T and noises

    def verify(self, draft: "GaussianChain", target: "GaussianChain", u: Tensor,
               generator: torch.Generator) -> "ChainVerdict":
        """draft, target: chains [B, n, m, D] with the same noises; u [B, n, m] uniforms in (0, 1), one per
        transition -> ChainVerdict (state [B, n, D], first_rejected [B, n], fallbacks [B, n])."""
        ...
