"""A drafter's rank acceptance profile: how often the r-th sibling it draws is the one the target accepts, the
number an optimal static tree is built from (`specdec.tree.optimal_shape`, after Sequoia, Chen et al. arXiv
2402.12374).

Measured with star trees: R siblings under the root and nothing below them, R = 1 .. ranks, each decoded over the
same images with the same seed. A(R), the accepted drafts per target forward, is the chance that one of R siblings
is accepted, so a[r] = A(r + 1) - A(r) is the chance that the sibling of rank r is the accepted one. Each A(R) is
an estimate, so the differences are smoothed into the non-increasing profile the model assumes (pool adjacent
violators: a least-squares fit) and cut at the first rank worth nothing. Counts only, no timing. With the exact
rule (recursive rejection) A(R) is the drafter's acceptance against p; with a relaxed tree rule it is that rule's,
and the shapes built from it are the best for that rule.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import Tensor

from specdec.sampling import Sampling
from specdec.tree import expected_accepted, optimal_shape


@dataclass(frozen=True)
class RankAcceptance:
    """profile: a[r], non-increasing, what `optimal_shape` takes; cumulative: the measured A(R) for R = 1 ..
    ranks (A(R) - A(R - 1) before smoothing is the raw a[R - 1]); images: rows decoded per star tree."""
    profile: tuple[float, ...]
    cumulative: tuple[float, ...]
    images: int


def non_increasing(values: list[float]) -> list[float]:
    """The least-squares non-increasing fit of a sequence (pool adjacent violators)."""
    blocks: list[list[float]] = []                  # [mean, weight] of each pooled block
    for v in values:
        blocks.append([float(v), 1.0])
        while len(blocks) > 1 and blocks[-2][0] < blocks[-1][0]:
            (m2, w2), (m1, w1) = blocks.pop(), blocks.pop()
            blocks.append([(m1 * w1 + m2 * w2) / (w1 + w2), w1 + w2])
    return [m for m, w in blocks for _ in range(int(w))]


def rank_acceptance(target, drafter_for_shape: Callable, cond: Tensor, sampling: Sampling, ranks: int = 8,
                    seed: int = 0, rule=None, progress: Callable[[str], None] | None = None) -> RankAcceptance:
    """Measure a drafter's rank acceptance profile on a target.

    drafter_for_shape: child-rank paths -> a tree drafter drawing that static shape (e.g. `lambda paths:
    EagleTreeDrafter(head, shape=paths)`); its siblings' kind ("sample", "argmax") is the one the profile
    describes. cond: [B] class ids decoded per star tree (more rows, less noise: A(R) is a mean over target
    forwards of a 0/1 outcome, its standard error at most 0.5 / sqrt(forwards)). rule: the tree rule the shapes
    will be verified with (default: the exact rule). progress: called with one line per star tree."""
    from specdec.engine import generate
    if isinstance(ranks, bool) or not isinstance(ranks, int) or ranks < 1:
        raise ValueError(f"ranks must be an int >= 1, got {ranks!r}")
    cumulative = []
    for width in range(1, ranks + 1):
        drafter = drafter_for_shape([(r,) for r in range(width)])
        result = generate(target, cond, drafter=drafter, rule=rule, sampling=sampling, seed=seed, decode=False)
        stats = result.stats
        cumulative.append(stats.accepted / max(stats.target_forwards, 1))
        if progress is not None:
            progress(f"{width} sibling(s): accepted {cumulative[-1]:.4f} per forward")
    raw = [b - a for a, b in zip([0.0] + cumulative, cumulative)]
    profile = []
    for a in non_increasing(raw):
        if a <= 0.0:
            break                                    # ranks from here on add nothing measurable
        profile.append(a)
    if not profile:
        raise ValueError("the drafter's first sibling was never accepted: no tree can help it (check that the "
                         "drafter and the target share a vocabulary, and the guidance scale it was trained at)")
    return RankAcceptance(tuple(profile), tuple(cumulative), int(cond.shape[0]))


@dataclass(frozen=True)
class StepCost:
    """What one speculative step costs on a device, in raw target forwards of one token (t_step).

    verify: {tokens fed in one verification forward: its cost}, measured points (1 token costs 1.0); linear
    between them, the last segment's slope beyond. draft_call: one drafter call, one tree level or the catch-up
    feed, measured through the loop. feeds: drafter calls per step besides the levels (EAGLE's catch-up feed: 1).
    fixed, per_node: what else a step costs through the loop (sampling, the rule, the tree's bookkeeping), as
    fixed + per_node * nodes. ar_token: what AR pays per token through its loop (1.0 plus its own bookkeeping)."""
    verify: dict[int, float]
    draft_call: float
    feeds: int = 1
    fixed: float = 0.0
    per_node: float = 0.0
    ar_token: float = 1.0

    def verify_steps(self, tokens: int) -> float:
        points = sorted(self.verify.items())
        if len(points) < 2:
            raise ValueError(f"StepCost.verify needs at least 2 measured sizes, got {self.verify}")
        for (x0, y0), (x1, y1) in zip(points, points[1:]):      # the segment holding tokens, else the last one
            if tokens <= x1:
                break
        return y0 + (y1 - y0) * (tokens - x0) / (x1 - x0)

    def step(self, nodes: int, depth: int) -> float:
        """A step verifying `nodes` drafts (nodes + 1 tokens with the root) drafted `depth` levels deep."""
        return (self.verify_steps(nodes + 1) + self.draft_call * (depth + self.feeds) + self.fixed
                + self.per_node * nodes)

    def speedup(self, mal: float, nodes: int, depth: int) -> float:
        """Predicted latency speedup over AR of a shape accepting `mal` tokens per step."""
        return mal * self.ar_token / self.step(nodes, depth)


@dataclass(frozen=True)
class ShapeChoice:
    """A shape and what the positional model and the cost model predict for it: MAL, the step's cost in raw target
    steps, and the speedup over AR (`StepCost.speedup`)."""
    paths: list[tuple[int, ...]]
    nodes: int
    depth: int
    mal: float
    cost: float
    speedup: float


def shape_choice(profile, cost: StepCost, nodes: int, max_depth: int | None = None) -> ShapeChoice:
    """The optimal shape of `nodes` nodes (depth <= max_depth) and its predictions on the device `cost` describes."""
    paths = optimal_shape(profile, nodes, max_depth)
    depth, mal = max(map(len, paths)), 1.0 + expected_accepted(paths, profile)
    return ShapeChoice(paths, nodes, depth, mal, cost.step(nodes, depth), cost.speedup(mal, nodes, depth))


def fastest_shapes(profile, cost: StepCost, max_nodes: int = 64, max_depth: int = 12,
                   top: int = 5) -> list[ShapeChoice]:
    """The optimal shapes (`optimal_shape`) of 1 .. max_nodes nodes and depth 1 .. max_depth, ranked by predicted
    speedup over AR on the device `cost` describes, best first (Sequoia's hardware-aware choice): where verifying
    many tokens costs about one step (a GPU at small batch) big, deep trees come out ahead; where it costs in
    proportion to the tokens (a CPU) small, shallow ones do."""
    choices: dict[tuple, ShapeChoice] = {}
    for nodes in range(1, max_nodes + 1):
        for depth_cap in range(1, max_depth + 1):
            try:
                choice = shape_choice(profile, cost, nodes, depth_cap)
            except ValueError:
                continue                                   # too few ranks for so many nodes this shallow
            choices.setdefault(tuple(choice.paths), choice)
    return sorted(choices.values(), key=lambda c: -c.speedup)[:top]
