"""Block-level speculative routing for block-autoregressive video (SDVG). LOSSY, UNBOUNDED.

Hu & Zhang, "Speculative Decoding for Video Generation" (SDVG), arXiv 2604.17397.

Notation: p = target, q = drafter; B batch, F_b frames per block, N blocks per clip. A block is drafted whole by
the drafter with its own sampler, from the noises the target would have used; the decoded frames are scored
(higher is better) and

    block score s_b = min over the block's frames (or their mean)
    accept the draft  iff  s_b >= tau,   else the target regenerates the block from the same noises

tau is fixed (`threshold`, the paper's offline calibration) or a running quantile for a target acceptance rate
(SDVG's code): while fewer than `warmup_scores` scores have been seen, tau is the (1 - rate) quantile of a prior
N(prior_mean, prior_std^2) (SDVG: rate 0.72, prior N(0.566, 1.071^2) of ImageReward scores); afterwards it is the
(1 - rate) quantile, linearly interpolated, of every block score seen so far (a score joins the pool after its own
decision). Block 0 is force-rejected by default so that the target sets the composition of the clip; SDVG's code
then raises the rate of the other blocks to min(0.95, rate * N / (N - 1)) so that the clip's overall acceptance is
the target rate (here: `clip_blocks=N`, off by default).

What it guarantees: nothing about the output law. This is reward-gated routing, not verification: accepted blocks
follow the drafter's law restricted to high scores, so `lossless = False` and `distortion_bound` is None. Per-frame
scores are blind to motion. Report quality retention next to the speedup, and `RandomRouter` at equal acceptance
as the control that separates what the scorer selects from what mixing the two models does.

Each row of a batch gets its own verdict against the same tau (vectorised); the running pool takes all B scores.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from statistics import NormalDist

import torch
from torch import Tensor

AGGREGATIONS = ("min", "mean")
DEFAULT_ACCEPT_RATE = 0.72          # SDVG's code (REWARD_ACCEPT_RATE)
COMPENSATED_RATE_CAP = 0.95         # SDVG's code: the raised rate never exceeds this


def check_block_scores(scores: Tensor, who: str) -> None:
    """scores must be a floating tensor [B, F_b] with B, F_b >= 1; TypeError / ValueError naming `who`."""
    if not isinstance(scores, Tensor) or not scores.dtype.is_floating_point:
        raise TypeError(f"{who}: scores must be a floating tensor [B, F_b], got {type(scores).__name__} "
                        f"{getattr(scores, 'dtype', '')}")
    if scores.dim() != 2 or 0 in scores.shape:
        raise ValueError(f"{who}: scores must be [B, F_b] (one score per row and frame), got {tuple(scores.shape)}")


def _check_block(block: int) -> int:
    if isinstance(block, bool) or not isinstance(block, int) or block < 0:
        raise ValueError(f"block must be an integer >= 0 (the block's index in the clip), got {block!r}")
    return block


def _real(name: str, value, allow_none: bool = True) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")


@dataclass
class _Pool:
    """The running state: every block score decided so far (float64 [n]), or None before the first."""

    scores: Tensor | None = None

    def __len__(self) -> int:
        return 0 if self.scores is None else self.scores.numel()

    def add(self, s: Tensor) -> None:
        s = s.detach().double().reshape(-1)
        self.scores = s if self.scores is None else torch.cat([self.scores, s.to(self.scores.device)])


class _Routing:
    """What both routers share: the forced first block, the block score, and the (absent) guarantee."""

    lossless = False
    force_first_reject: bool
    aggregation: str

    def forces_reject(self, block: int) -> bool:
        """Whether block `block` goes to the target whatever its score."""
        return self.force_first_reject and _check_block(block) == 0

    def aggregate(self, scores: Tensor) -> Tensor:
        """Per-frame scores [B, F_b] -> block scores [B]."""
        return scores.amin(-1) if self.aggregation == "min" else scores.mean(-1)

    def distortion_bound(self, one_hot_drafts: bool = False) -> None:
        """None: routing on a score (or at random) bounds nothing about the output law."""
        return None


@dataclass(frozen=True)
class BlockRouter(_Routing):
    """SDVG's router. Give `threshold` (fixed tau) or `target_accept_rate` (running quantile; the default, 0.72,
    when neither is given), not both.

    prior_mean, prior_std: the warm-up prior of block scores (SDVG's ImageReward values; set them to your scorer's).
    warmup_scores: block scores seen before the empirical quantile replaces the prior (SDVG: 5).
    aggregation: "min" (SDVG: the worst frame) or "mean" over a block's frames.
    force_first_reject: block 0 always goes to the target (the loop then skips drafting it).
    clip_blocks: N blocks per clip; with force_first_reject and a running quantile, the rate used on blocks >= 1 is
        min(0.95, rate * N / (N - 1)) so that a clip's overall acceptance, block 0 included, is the target rate.
    """

    threshold: float | None = None
    target_accept_rate: float | None = None
    prior_mean: float = 0.566
    prior_std: float = 1.071
    warmup_scores: int = 5
    aggregation: str = "min"
    force_first_reject: bool = True
    clip_blocks: int | None = None
    _pool: _Pool = field(default_factory=_Pool, init=False, repr=False, compare=False)

    name = "sdvg"

    def __post_init__(self):
        _real("threshold", self.threshold)
        if self.threshold is not None and self.target_accept_rate is not None:
            raise ValueError("give threshold (a fixed tau) or target_accept_rate (a running quantile), not both")
        rate = self.target_accept_rate
        if rate is not None and (isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 < rate < 1):
            raise ValueError(f"target_accept_rate must be in (0, 1), got {rate!r}")
        _real("prior_mean", self.prior_mean, allow_none=False)
        _real("prior_std", self.prior_std, allow_none=False)
        if self.prior_std <= 0:
            raise ValueError(f"prior_std must be > 0, got {self.prior_std}")
        if isinstance(self.warmup_scores, bool) or not isinstance(self.warmup_scores, int) or self.warmup_scores < 1:
            raise ValueError(f"warmup_scores must be an integer >= 1, got {self.warmup_scores!r}")
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {self.aggregation!r}")
        n = self.clip_blocks
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 2):
            raise ValueError(f"clip_blocks must be None or the number of blocks per clip (>= 2), got {n!r}")

    @property
    def running(self) -> bool:
        """True for the running quantile, False for a fixed tau."""
        return self.threshold is None

    @property
    def quantile_rate(self) -> float:
        """The acceptance rate the running quantile aims at on the blocks it decides (see clip_blocks)."""
        rate = DEFAULT_ACCEPT_RATE if self.target_accept_rate is None else float(self.target_accept_rate)
        if self.clip_blocks is not None and self.force_first_reject:
            rate = min(COMPENSATED_RATE_CAP, rate * self.clip_blocks / (self.clip_blocks - 1))
        return rate

    def tau(self) -> Tensor | float:
        """The threshold the next decision uses: the fixed tau, the prior's quantile during the warm-up, or the
        empirical quantile of the pool (a 0-d float64 tensor on the pool's device)."""
        if not self.running:
            return float(self.threshold)
        rate = self.quantile_rate
        if len(self._pool) < self.warmup_scores:
            return self.prior_mean + self.prior_std * NormalDist().inv_cdf(1.0 - rate)
        return torch.quantile(self._pool.scores, 1.0 - rate)

    def decide(self, scores: Tensor, block: int, generator: torch.Generator | None = None) -> Tensor:
        """scores [B, F_b] (finite; higher is better) of block `block`'s drafts -> accept BoolTensor [B].
        Updates the running pool (not for a force-rejected block). `generator` is unused (same signature as
        RandomRouter)."""
        check_block_scores(scores, f"router {self.name!r}")
        if self.forces_reject(block):
            return torch.zeros(scores.shape[0], dtype=torch.bool, device=scores.device)
        if not bool(torch.isfinite(scores).all()):     # one sync per block: a NaN would poison the pool
            raise ValueError(f"router {self.name!r}: scores must be finite, got {scores.tolist()}")
        s = self.aggregate(scores)
        tau = self.tau()
        accept = s.double() >= (tau.to(s.device) if isinstance(tau, Tensor) else tau)
        if self.running:
            self._pool.add(s)
        return accept

    def reset(self) -> None:
        """Forget every score seen (a new calibration); fixed-tau routers have nothing to forget."""
        self._pool.scores = None


@dataclass(frozen=True)
class RandomRouter(_Routing):
    """The control: accepts each row's draft with probability accept_rate (from an explicit generator), whatever
    its score, with the same force_first_reject. Run it at the acceptance rate BlockRouter reached to see what the
    scorer's choice adds. `aggregation` only shapes the block scores recorded in results."""

    accept_rate: float
    force_first_reject: bool = True
    aggregation: str = "min"

    name = "random"

    def __post_init__(self):
        r = self.accept_rate
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 <= r <= 1:
            raise ValueError(f"accept_rate must be a number in [0, 1], got {r!r}")
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {self.aggregation!r}")

    def decide(self, scores: Tensor, block: int, generator: torch.Generator | None = None) -> Tensor:
        """scores [B, F_b] (only their shape is read) -> accept BoolTensor [B], row b accepted iff U_b < rate with
        U drawn from `generator` (required: no global RNG)."""
        check_block_scores(scores, f"router {self.name!r}")
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"RandomRouter.decide needs a torch.Generator, got {type(generator).__name__}")
        u = torch.rand(scores.shape[0], generator=generator, device=generator.device).to(scores.device)
        return (u < self.accept_rate) & ~torch.tensor(self.forces_reject(block), device=scores.device)

    def reset(self) -> None:
        """Nothing to forget: the router has no running state."""
