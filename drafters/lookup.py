"""Spatial / temporal lookup drafting: copy already generated neighbours on the token grid. Training-free.

The image analogue of prompt-lookup / n-gram drafting for LLMs (Saxena, "Prompt Lookup Decoding", 2023; He et al.,
REST, arXiv 2311.08252): image token maps are locally repetitive (flat regions, textures, static video background),
so the token to the left, above, above-left or at the same place in the previous frame is a cheap guess.

Notation: p = target distribution, q = draft distribution (both after specdec.sampling), x = draft token,
k = draft tokens per step, B batch, V vocabulary, t = token position in raster order.

Guarantee: LOSSLESS with a lossless rule, for any choice of source. Drafts are deterministic functions of the
committed tokens and of verdicts of earlier steps (which decided positions < n_done only), so q is one-hot
(Draft.probs = None): the exact rule accepts x with probability p(x) and otherwise samples p with x removed, which
commits a token of law p (Leviathan et al., arXiv 2211.17192, with q = one_hot(x)). A relaxed rule gives its
one-hot-draft bound (LANTERN: TV <= delta per token).

Source policy, per row and per step: each named source keeps an exponentially decayed count of its verified and
accepted drafts for that row; a step uses the source with the best smoothed acceptance (hits+1)/(tries+2), ties going
to the earlier name in `sources`. A slot whose chosen source does not exist (first row, first column, first frame)
takes the first available source in `sources` order, and failing all, the previous token in raster order ("prev").
A source position that is itself a draft of this step (it is >= n_done) reads that draft: drafts chain.
"""
from __future__ import annotations

import torch
from torch import Tensor

from specdec.protocols import Drafter
from specdec.types import Draft, Verdict

SOURCES = ("left", "above", "above_left", "prev_frame")


def grid_dims(grid: tuple[int, ...], num_tokens: int, who: str) -> tuple[int, int, int]:
    """(F, H, W) of a 1-, 2- or 3-D raster grid, checked against the number of tokens per image."""
    grid = tuple(int(g) for g in grid)
    if not 1 <= len(grid) <= 3 or any(g < 1 for g in grid):
        raise ValueError(f"{who} needs a token grid (W,), (H, W) or (F, H, W) of positive sizes; got {grid}")
    prod = 1
    for g in grid:
        prod *= g
    if prod != num_tokens:
        raise ValueError(f"{who}: the target's grid {grid} holds {prod} tokens but the generation has {num_tokens}; "
                         f"give the adapter the grid of the tokens actually generated (raster order), or generate "
                         f"num_tokens={prod}")
    full = (1,) * (3 - len(grid)) + grid
    return full[0], full[1], full[2]


def neighbour(name: str, t: Tensor, dims: tuple[int, int, int]) -> tuple[Tensor, Tensor]:
    """Position of the `name` neighbour of positions t (any shape), and whether it exists. Positions past the image
    (rows overshooting T ride along for a step) wrap like the raster, which keeps every source position < t."""
    F, H, W = dims
    col = t % W
    row = (t // W) % H
    frame = t // (H * W)
    if name == "left":
        return t - 1, col > 0
    if name == "above":
        return t - W, row > 0
    if name == "above_left":
        return t - W - 1, (row > 0) & (col > 0)
    if name == "prev_frame":
        return t - H * W, frame > 0
    if name == "prev":
        return t - 1, t > 0
    raise ValueError(f"unknown neighbour {name!r}")


def read_token(ctx, window: Tensor, src: Tensor) -> Tensor:
    """The token at positions src [B] (each < the slot being drafted): committed (ctx.tokens) when src < n_done,
    else this step's own draft window [B, k] at src - n_done. -> LongTensor [B]."""
    n = ctx.n_done
    committed = ctx.tokens.gather(1, src.clamp_min(0)[:, None])[:, 0]
    drafted = window.gather(1, (src - n).clamp(0, window.shape[1] - 1)[:, None])[:, 0]
    return torch.where(src < n, committed, drafted)


class LookupDrafter(Drafter):
    """Copies k tokens per step from grid neighbours of the already generated image (one-hot q, lossless).

    k: draft tokens per step (>= 1). sources: neighbour names, tried in order (see the module docstring); valid:
    "left", "above", "above_left", and for a 3-D grid (F, H, W) "prev_frame". decay: per-step decay of the
    acceptance counts that choose the source (0 < decay <= 1).
    """

    one_hot_drafts = True

    def __init__(self, k: int = 4, sources: tuple[str, ...] = ("left", "above", "above_left"), decay: float = 0.9):
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ValueError(f"k (draft tokens per step) must be an integer >= 1, got {k!r}")
        if isinstance(sources, str):
            sources = (sources,)
        sources = tuple(sources)
        if not sources:
            raise ValueError(f"sources must name at least one neighbour out of {SOURCES}")
        bad = [s for s in sources if s not in SOURCES]
        if bad:
            raise ValueError(f"unknown lookup source(s) {bad}; valid sources are {SOURCES}")
        if len(set(sources)) != len(sources):
            raise ValueError(f"sources lists a neighbour twice: {sources}")
        if not 0 < decay <= 1:
            raise ValueError(f"decay must be in (0, 1], got {decay}")
        self.k = k
        self.sources = sources
        self.decay = float(decay)
        self.forwards = 0           # no model calls

    def start(self, ctx) -> None:
        self.dims = grid_dims(ctx.grid, ctx.num_tokens, "LookupDrafter")
        if "prev_frame" in self.sources and len(ctx.grid) != 3:
            raise ValueError(f"the 'prev_frame' source needs a 3-D grid (F, H, W); the target's grid is "
                             f"{tuple(ctx.grid)}")
        self.ctx = ctx
        B = ctx.n_done.shape[0]
        S = len(self.sources) + 1                     # + "prev", the last resort
        dev = ctx.n_done.device
        self.hits = torch.zeros(B, S, device=dev)
        self.tries = torch.zeros(B, S, device=dev)
        # ties go to the earlier source: a bias far below any real difference of smoothed rates
        self._order_bias = -1e-6 * torch.arange(S - 1, dtype=torch.float, device=dev)
        self._used = None
        self._n_before = None

    def choice(self) -> Tensor:
        """LongTensor [B]: the index (into `sources`) each row drafts from next."""
        rate = (self.hits[:, :-1] + 1) / (self.tries[:, :-1] + 2)
        return (rate + self._order_bias).argmax(1)

    @torch.no_grad()
    def propose(self, k: int) -> Draft:
        ctx = self.ctx
        n = ctx.n_done
        B = n.shape[0]
        S = len(self.sources)
        chosen = self.choice()                                                     # [B]
        rank = torch.arange(S, device=n.device)[:, None].expand(S, B)
        rank = torch.where(rank == chosen[None], -1, rank)                          # chosen first, then in order
        window = torch.zeros(B, k, dtype=torch.long, device=n.device)
        used = torch.zeros(B, k, dtype=torch.long, device=n.device)
        for j in range(k):                          # slots chain (a source may be the previous slot): loop over k
            t = n + j
            cand = [neighbour(s, t, self.dims) for s in self.sources]
            pos = torch.stack([c[0] for c in cand])                                # [S, B]
            ok = torch.stack([c[1] for c in cand])
            best = torch.where(ok, rank, S + 1).argmin(0)                          # [B]
            none = ~ok.any(0)
            src = torch.where(none, t - 1, pos.gather(0, best[None])[0])
            used[:, j] = torch.where(none, S, best)
            window[:, j] = read_token(ctx, window, src)
        self._used = used[:, :k]
        self._n_before = n.clone()
        return Draft(window)

    def observe(self, verdict: Verdict, target_probs: Tensor) -> None:
        """Credit each source with the drafts it made that the rule decided (accepted ones and the first
        rejection); rows that did not advance (finished) are not counted."""
        if self._used is None:
            return
        k = self._used.shape[1]
        a = verdict.n_accepted[:, None]
        j = torch.arange(k, device=a.device)[None]
        moved = (self.ctx.n_done != self._n_before)[:, None]
        decided = ((j <= a) & moved).float()
        accepted = ((j < a) & moved).float()
        onehot = torch.nn.functional.one_hot(self._used, self.hits.shape[1]).float()   # [B, k, S+1]
        self.hits.mul_(self.decay).add_((accepted[..., None] * onehot).sum(1))
        self.tries.mul_(self.decay).add_((decided[..., None] * onehot).sum(1))
