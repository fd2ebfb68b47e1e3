"""Draft trees (specdec.tree): ancestors, paths, and one verification forward over a tree equal to separate
forwards over every root-to-node path, at batch > 1 with a different tree and prefix length per row."""
from __future__ import annotations

import pytest
import torch

from specdec.tree import DraftTree, chain, verify_inputs
from helpers import tiny_gpt


def random_tree(B: int, N: int, V: int, seed: int) -> DraftTree:
    g = torch.Generator().manual_seed(seed)
    parents = torch.stack([torch.tensor([int(torch.randint(-1, i, (1,), generator=g)) for i in range(N)])
                           for _ in range(B)])
    tokens = torch.randint(V, (B, N), generator=g)
    count = torch.randint(1, N + 1, (B,), generator=g)
    return DraftTree(tokens, parents, count)


def brute_ancestors(parents: torch.Tensor) -> torch.Tensor:
    B, N = parents.shape
    out = torch.zeros(B, N, N, dtype=torch.bool)
    for b in range(B):
        for i in range(N):
            j = i
            while j >= 0:
                out[b, i, j] = True
                j = int(parents[b, j])
    return out


def test_ancestors_depth_and_paths_match_a_brute_force_walk():
    tree = random_tree(B=5, N=13, V=7, seed=0)
    tree.check()
    anc = brute_ancestors(tree.parents)
    assert torch.equal(tree.ancestors(), anc)
    assert torch.equal(tree.depth(), anc.sum(-1))
    node = torch.tensor([12, 0, -1, 7, 3])
    paths = tree.path(node, max_depth=13)
    for b in range(5):
        expect, j = [], int(node[b])
        while j >= 0:
            expect.insert(0, j)
            j = int(tree.parents[b, j])
        assert paths[b, :len(expect)].tolist() == expect and (paths[b, len(expect):] == -1).all()
    c = chain(torch.tensor([[4, 5, 6]]))
    assert c.depth().tolist() == [[1, 2, 3]] and c.parents.tolist() == [[-1, 0, 1]]


def test_bad_trees_are_named():
    with pytest.raises(ValueError, match="topological order"):
        DraftTree(torch.zeros(1, 3, dtype=torch.long), torch.tensor([[-1, 2, 0]]), torch.tensor([3])).check()
    with pytest.raises(ValueError, match=r"\[B, N\]"):
        DraftTree(torch.zeros(1, 3, dtype=torch.long), torch.tensor([-1, 0, 1]), torch.tensor([3]))


@torch.no_grad()
def test_tree_forward_equals_path_forwards_and_a_committed_path_equals_a_chain():
    torch.manual_seed(0)
    adapter = tiny_gpt(vocab=11, grid=(6, 6), dim=32, layers=2, heads=2, sharpen=2.0)
    model = adapter.model
    B, N, V = 3, 9, 11
    g = torch.Generator().manual_seed(1)
    classes = torch.tensor([0, 2, 1])
    n_done = torch.tensor([5, 9, 2])                                        # ragged committed lengths
    committed = torch.randint(V, (B, 12), generator=g)
    cache = model.new_cache(B, 64)
    model.prefill(classes, cache)
    model.step(committed[:, :11], cache)                                    # then each row keeps its own prefix
    cache.set_lengths(1 + n_done - 1)                                       # all but the newest committed token
    last = committed.gather(1, (n_done - 1)[:, None])[:, 0]
    tree = random_tree(B, N, V, seed=3)
    slot0 = cache.lengths.clone()
    tokens, positions, slots, allowed = verify_inputs(tree, n_done, last, slot0)
    logits = model.step_tree(tokens, cache, positions + 1, slots, allowed)   # +1: the class token holds position 0
    anc = brute_ancestors(tree.parents)
    for b in range(B):
        prefix = committed[b, : int(n_done[b])]
        for i in range(-1, N):
            path = [] if i < 0 else [int(tree.tokens[b, j]) for j in range(N) if anc[b, i, j]]
            seq = torch.cat([prefix, torch.tensor(path, dtype=torch.long), torch.zeros(1, dtype=torch.long)])
            fresh = model.forward_train(seq[None], classes[b:b + 1])[0, len(seq) - 1]
            assert torch.allclose(logits[b, 1 + i], fresh, atol=1e-4), (b, i)

    # commit the path to one node per row: afterwards the cache is that of a chain over prefix + path
    node = torch.tensor([N - 1, 0, 4])
    path = tree.path(node, max_depth=N)                                     # [B, N] node indices, -1 padded
    depth = (path >= 0).sum(1)
    src = slot0[:, None] + 1 + path.clamp_min(0)
    dst = slot0[:, None] + 1 + torch.arange(N)
    keep = path >= 0
    cache.move(torch.where(keep, src, dst), dst)                            # padding copies onto itself
    cache.set_lengths(slot0 + 1 + depth)
    nxt = torch.randint(V, (B, 1), generator=g)
    cached = model.step(nxt, cache)[:, 0]
    for b in range(B):
        toks = [int(tree.tokens[b, j]) for j in path[b].tolist() if j >= 0]
        seq = torch.cat([committed[b, : int(n_done[b])], torch.tensor(toks, dtype=torch.long), nxt[b],
                         torch.zeros(1, dtype=torch.long)])
        fresh = model.forward_train(seq[None], classes[b:b + 1])[0, len(seq) - 1]
        assert torch.allclose(cached[b], fresh, atol=1e-4), b
