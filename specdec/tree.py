"""Draft trees: many candidate continuations verified in one target forward (SpecInfer, Miao et al. arXiv
2305.09781; Medusa arXiv 2401.10774; EAGLE-2 arXiv 2406.16858).

A batch of trees in one padded layout, N node slots per row:

    tokens  LongTensor [B, N]  the drafted token of each node
    parents LongTensor [B, N]  the parent node, -1 for a child of the root (the root is the last committed token)
    count   LongTensor [B]     real nodes of the row; slots >= count[b] are padding (parent -1, never accepted)

Nodes are topologically ordered (parents[b, i] < i), so one pass over the nodes in index order sees every parent
before its children. depth[b, i] = 1 for a root child. The verification forward feeds [root, node_0 .. node_{N-1}]:
the root sits at logical position n - 1 (n = committed tokens) and node i at n - 1 + depth[i]; each node attends the
committed prefix, the root and its own ancestors (`attention`). Its output is the target's law of the token AFTER the
node, i.e. of the node's children. After a verdict the accepted root-to-node path (`path`) is committed: its K/V rows
are moved behind the prefix in a static cache, which is then as if the path had been fed as a chain.
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class DraftTree:
    """A batch of draft trees (see the module doc). q: FloatTensor [B, N, V], the law node i was drawn from given
    its parent's context and its earlier siblings (sequential q), or None for deterministic (one-hot) drafts.
    max_depth, max_children: static bounds of the tree's shape (default N), so verification loops a known number
    of times without reading the tree on the host; max_children may be a tuple of one bound per depth (entry d:
    the most children of any node at depth d, 0 = the root), so a static shape's narrow deep levels test only the
    siblings they have. pool: 0, or (siblings drawn i.i.d. only) a static bound on the
    nodes of one depth: a lossless rule may then pool the children of every sibling that drew the accepted token
    (`verifiers._tree.tree_walk`). reach: the `ancestors()` table [B, N, N] when the drafter knows it already (a
    static shape's, expanded), else built on first use; either way it is computed at most once per tree, so a
    tree's parents must not change after it is built."""

    tokens: Tensor
    parents: Tensor
    count: Tensor
    q: Tensor | None = None
    max_depth: int = 0
    max_children: int | tuple[int, ...] = 0
    pool: int = 0
    reach: Tensor | None = None

    def __post_init__(self):
        if self.tokens.dim() != 2 or self.parents.shape != self.tokens.shape:
            raise ValueError(f"tree tokens and parents must both be [B, N], got {tuple(self.tokens.shape)} and "
                             f"{tuple(self.parents.shape)}")
        if self.count.shape != self.tokens.shape[:1]:
            raise ValueError(f"tree count must be [B] = [{self.tokens.shape[0]}], got {tuple(self.count.shape)}")
        self.max_depth = self.max_depth or self.size
        self.max_children = self.max_children or self.size

    @property
    def size(self) -> int:
        """N, node slots per row."""
        return self.tokens.shape[1]

    def check(self) -> None:
        """ValueError unless every parent precedes its child (topological order) and lies in [-1, node). One host
        sync: call it when a tree is built by code you do not trust, not per step."""
        idx = torch.arange(self.size, device=self.parents.device)
        bad = (self.parents >= idx) | (self.parents < -1)
        if bool(bad.any()):
            b, i = (int(v) for v in bad.nonzero()[0])
            raise ValueError(f"draft tree row {b}: node {i} has parent {int(self.parents[b, i])}; parents must be "
                             f"-1 (the root) or an earlier node (topological order)")
        if bool(((self.count < 0) | (self.count > self.size)).any()):
            raise ValueError(f"draft tree counts must lie in [0, {self.size}]")

    def ancestors(self) -> Tensor:
        """BoolTensor [B, N, N]: [b, i, j] is True when node j is node i or one of its ancestors. Built once, by
        pointer doubling: log2(N) rounds of `reach |= reach[reach's parents]`, no Python loop over nodes."""
        if self.reach is None:
            self.reach = self._ancestors()
        return self.reach

    def _ancestors(self) -> Tensor:
        B, N = self.parents.shape
        dev = self.parents.device
        eye = torch.eye(N, dtype=torch.bool, device=dev).expand(B, N, N)
        parent = torch.zeros(B, N, N + 1, dtype=torch.bool, device=dev)           # column N stands for the root
        parent.scatter_(2, torch.where(self.parents < 0, N, self.parents)[..., None], True)
        reach = eye | parent[..., :N]                                             # self and parent
        jump = self.parents.clone()                                               # 2^r-th ancestor (-1: none)
        for _ in range(max(1, (N - 1).bit_length())):
            up = jump.clamp_min(0)
            rows = torch.arange(B, device=dev)[:, None]
            inherited = reach[rows, up] & (jump >= 0)[..., None]                  # what the 2^r-th ancestor reaches
            reach = reach | inherited
            jump = torch.where(jump >= 0, jump.gather(1, up), jump)
        return reach

    def depth(self) -> Tensor:
        """LongTensor [B, N]: 1 for a root child, parent's depth + 1 below it."""
        return self.ancestors().sum(-1)

    def valid(self) -> Tensor:
        """BoolTensor [B, N]: real nodes (not padding)."""
        return torch.arange(self.size, device=self.count.device)[None] < self.count[:, None]

    def path(self, node: Tensor, max_depth: int) -> Tensor:
        """The root-to-node path of node [B] (-1: the root itself, an empty path) as node indices LongTensor
        [B, max_depth], shallowest first, padded with -1 after the path's end."""
        B = node.shape[0]
        anc = self.ancestors()                                                    # [B, N, N]
        on_path = anc.gather(1, node.clamp_min(0)[:, None, None].expand(B, 1, self.size))[:, 0]
        on_path = on_path & (node >= 0)[:, None]                                  # [B, N]
        depth = self.depth()
        slot = torch.where(on_path, depth - 1, max_depth)                         # depth d sits in column d - 1
        out = torch.full((B, max_depth + 1), -1, dtype=torch.long, device=node.device)
        idx = torch.arange(self.size, device=node.device).expand(B, -1)
        out.scatter_(1, slot.clamp_max(max_depth), torch.where(on_path, idx, -1))
        return out[:, :max_depth]


def chain(tokens: Tensor, q: Tensor | None = None) -> DraftTree:
    """A chain of k drafts [B, k] as a tree: node i is the child of node i - 1."""
    B, k = tokens.shape
    parents = (torch.arange(k, device=tokens.device) - 1).expand(B, k).clone()
    return DraftTree(tokens, parents, torch.full((B,), k, dtype=torch.long, device=tokens.device), q, k, 1)


def verify_inputs(tree: DraftTree, n_done: Tensor, last: Tensor, slot0: Tensor) -> tuple[Tensor, Tensor, Tensor,
                                                                                             Tensor]:
    """What one verification forward over [root, nodes] needs, for a cache whose row b holds its committed prefix
    in slots [0, slot0[b]) (slot0 = the root's slot):

      tokens    [B, 1 + N]   the root (last committed token, last [B]) then the nodes
      positions [B, 1 + N]   logical positions: n - 1 for the root, n - 1 + depth for a node
      slots     [B, 1 + N]   cache slots the inputs are written to: slot0 + 0 .. N (one per input)
      allowed   [B, 1 + N, 1 + N]  which of this forward's inputs each input attends (root: itself; node: the root,
                                   its ancestors and itself); every input also attends its row's prefix
    """
    B, N = tree.tokens.shape
    dev = tree.tokens.device
    depth = tree.depth()
    tokens = torch.cat([last[:, None], tree.tokens], 1)
    positions = (n_done - 1)[:, None] + torch.cat([torch.zeros(B, 1, dtype=torch.long, device=dev), depth], 1)
    slots = slot0[:, None] + torch.arange(1 + N, device=dev)
    allowed = torch.zeros(B, 1 + N, 1 + N, dtype=torch.bool, device=dev)
    allowed[:, :, 0] = True                                                       # everyone sees the root
    allowed[:, 1:, 1:] = tree.ancestors()
    return tokens, positions, slots, allowed


def static_shape(spec, rank_acceptance=None) -> list[tuple[int, ...]]:
    """A static tree shape as child-rank paths, shallowest first (path (0, 1): the second child of the first child
    of the root). spec: a list of paths, or a preset name: "chain-K" (K nodes in a line), "binary-D" (every node
    has 2 children, depth D), "spine-D" (the best path to depth D plus the runner-up at every level: 2D nodes),
    "seqs-KxL" (K drafts of L tokens that part at the root: SpecTr's k-SEQ setting, K L nodes), "optimal-N" /
    "optimal-NxD" (the N-node tree, depth <= D, with the most expected accepted drafts for a drafter's
    rank_acceptance profile: `optimal_shape`)."""
    if isinstance(spec, str):
        kind, sizes = shape_preset(spec)
        n, length = sizes[0], sizes[-1]
        if kind == "optimal":
            if rank_acceptance is None:
                raise ValueError(f"tree shape {spec!r} is chosen from the drafter's rank acceptance profile, and none "
                                 f"was given: pass rank_acceptance (measured by specdec.tree_profile."
                                 f"rank_acceptance; the zoo's EAGLE head carries its own) or use a fixed shape")
            return optimal_shape(rank_acceptance, n, length if len(sizes) == 2 else None)
        if kind == "seqs":
            paths = [(r,) + (0,) * d for d in range(length) for r in range(n)]
        elif kind == "chain":
            paths = [(0,) * d for d in range(1, n + 1)]
        elif kind == "spine":
            paths = [(0,) * (d - 1) + (r,) for d in range(1, n + 1) for r in (0, 1)]
        else:
            paths = [tuple((i >> j) & 1 for j in range(d)) for d in range(1, n + 1) for i in range(2 ** d)]
    else:
        paths = [tuple(int(r) for r in path) for path in spec]
    paths = sorted(set(paths), key=lambda path: (len(path), path))
    known = set(paths)
    for path in paths:
        if not path or min(path) < 0:
            raise ValueError(f"tree path {list(path)} must be a non-empty list of child ranks >= 0")
        if len(path) > 1 and path[:-1] not in known:
            raise ValueError(f"tree path {list(path)} has no parent {list(path[:-1])} in the shape")
        if path[-1] > 0 and path[:-1] + (path[-1] - 1,) not in known:
            raise ValueError(f"tree path {list(path)}: its elder sibling {list(path[:-1] + (path[-1] - 1,))} is "
                             f"missing (siblings are drawn in rank order)")
    return paths


def shape_preset(spec: str) -> tuple[str, list[int]]:
    """A preset shape's name -> (kind, sizes): "binary-3" -> ("binary", [3]), "optimal-30x6" -> ("optimal", [30, 6]).
    Raises ValueError naming the presets for anything else."""
    kind, _, size = spec.partition("-")
    two = kind == "seqs" or (kind == "optimal" and "x" in size)
    sizes = size.split("x") if two else [size]                    # seqs-KxL, optimal-NxD: two sizes
    if kind not in ("chain", "binary", "spine", "seqs", "optimal") or len(sizes) != (2 if two else 1) \
            or not all(s.isdigit() and int(s) >= 1 for s in sizes):
        raise ValueError(f"unknown tree shape {spec!r}; use chain-K, binary-D, spine-D, seqs-KxL, optimal-N, "
                         f"optimal-NxD or a list of child-rank paths such as [[0], [1], [0, 0]]")
    return kind, [int(s) for s in sizes]


def _checked_profile(rank_acceptance) -> tuple[float, ...]:
    try:
        profile = tuple(float(a) for a in rank_acceptance)
    except (TypeError, ValueError):
        raise TypeError(f"rank_acceptance must be a sequence of probabilities, got {rank_acceptance!r}") from None
    if not profile or not all(0.0 < a <= 1.0 for a in profile) or sum(profile) > 1.0 + 1e-6 \
            or any(b > a + 1e-12 for a, b in zip(profile, profile[1:])):
        raise ValueError(f"rank_acceptance must be non-empty, each in (0, 1], non-increasing and sum to at most 1 "
                         f"(the chance that the r-th sibling drawn is the one accepted), got {profile}; "
                         f"specdec.tree_profile.rank_acceptance measures one")
    return profile


def expected_accepted(paths, rank_acceptance) -> float:
    """Expected accepted drafts per step of a shape under the positional model of `optimal_shape`: the sum over
    nodes of prod_i rank_acceptance[r_i] (0 for a node whose rank is beyond the profile). MAL = 1 + this."""
    profile = _checked_profile(rank_acceptance)
    total = 0.0
    for path in paths:
        value = 1.0
        for r in path:
            value *= profile[r] if r < len(profile) else 0.0
        total += value
    return total


def best_first_nodes(profile_at, nodes: int, max_depth: int | None = None) -> list[tuple[tuple[int, ...], float]]:
    """The (at most) `nodes` most valuable nodes of the unbounded draft tree as (child-rank path, value), best
    first. profile_at(path) -> the non-increasing rank acceptance of the children of the node at `path` (() is the
    root); a node's value is its parent's times profile_at(parent)[rank], the probability that it is reached and
    accepted. As no node is worth more than its parent or its elder sibling, a best-first walk of the frontier finds
    them (ties to the shallower, then lower-ranked path). max_depth caps the depth."""
    root = profile_at(())
    frontier, chosen = [(-root[0], 1, (0,))], []
    while frontier and len(chosen) < nodes:
        negative, depth, path = heapq.heappop(frontier)
        value, rank = -negative, path[-1]
        chosen.append((path, value))
        if max_depth is None or depth < max_depth:                       # its first child
            heapq.heappush(frontier, (-value * profile_at(path)[0], depth + 1, path + (0,)))
        siblings = profile_at(path[:-1])
        if rank + 1 < len(siblings) and siblings[rank] > 0:               # its next younger sibling
            heapq.heappush(frontier, (-value / siblings[rank] * siblings[rank + 1], depth, path[:-1] + (rank + 1,)))
    return chosen


def optimal_shape(rank_acceptance, nodes: int, max_depth: int | None = None) -> list[tuple[int, ...]]:
    """The static shape of `nodes` nodes (depth <= max_depth) with the most expected accepted drafts, after Sequoia
    (Chen et al., arXiv 2402.12374). Positional model: at any node, the r-th sibling drawn is the accepted one with
    probability rank_acceptance[r] whatever its depth and ancestors, so a node at child-rank path (r_1 .. r_d) is
    reached and accepted with probability prod_i a[r_i], and a shape's expected accepted drafts is the sum over its
    nodes (`expected_accepted`). As the profile is non-increasing, no node is worth more than its parent or its
    elder sibling: the `nodes` most valuable nodes of the unbounded tree form a valid shape, found best-first
    (`best_first_nodes`, with the same profile at every node). max_depth caps the draft calls per
    step, the drafter's share of a step's time. -> child-rank paths, as `static_shape`."""
    profile = _checked_profile(rank_acceptance)
    if isinstance(nodes, bool) or not isinstance(nodes, int) or nodes < 1:
        raise ValueError(f"nodes must be an int >= 1, got {nodes!r}")
    if max_depth is not None and (isinstance(max_depth, bool) or not isinstance(max_depth, int) or max_depth < 1):
        raise ValueError(f"max_depth must be None or an int >= 1, got {max_depth!r}")
    chosen = [path for path, _ in best_first_nodes(lambda path: profile, nodes, max_depth)]
    if len(chosen) < nodes:
        raise ValueError(f"a tree of depth <= {max_depth} with at most {len(profile)} children per node has fewer "
                         f"than {nodes} nodes; raise max_depth or measure more ranks")
    return static_shape(chosen)


def shape_widths(paths: list[tuple[int, ...]]) -> tuple[int, ...]:
    """The most children of any node at each depth of a shape (entry 0: the root's): the per-depth sibling bounds
    verification walks (`DraftTree.max_children`)."""
    widths = [1] * max(map(len, paths))
    for path in paths:
        widths[len(path) - 1] = max(widths[len(path) - 1], path[-1] + 1)
    return tuple(widths)


def shape_ancestors(parents: list[int]) -> Tensor:
    """BoolTensor [N, N] of a static shape's parent list (topologically ordered): [i, j] is True when node j is node
    i or one of its ancestors; expanded over the batch it is every step's `DraftTree.reach`."""
    reach = torch.eye(len(parents), dtype=torch.bool)
    for i, parent in enumerate(parents):                # parents precede children: one pass builds every row
        if parent >= 0:
            reach[i] |= reach[parent]
    return reach


def shape_parents(paths: list[tuple[int, ...]]) -> tuple[list[int], list[int], list[int]]:
    """(parent index, child rank, depth) of every node of a shape from `static_shape`."""
    index = {path: i for i, path in enumerate(paths)}
    return ([index[p[:-1]] if len(p) > 1 else -1 for p in paths], [p[-1] for p in paths], [len(p) for p in paths])
