"""Jacobi drafting with a tree at the window's head (proactive drafting, after SJD-PAC arXiv 2603.18599): the shape,
exactness with the exact rule (sequence-level chi-square against an enumerable target, with a negative control that
the test catches), greedy output equal to greedy AR, the zoo's figures for a seed, and clear errors."""
from __future__ import annotations

import pytest
import torch

import specdec
from drafters.jacobi_tree import JacobiTreeDrafter, branch_paths
from specdec import Sampling
from specdec.tree import DraftTree
from helpers import GREEDY, assert_seed_figures, fit_of, tiny_gpt, tiny_hf_target


@pytest.fixture(scope="module")
def image_target():
    """V = 5, T = 4 on a (2, 2) grid: 625 sequences, sharpened so the joint law is far from uniform."""
    return tiny_gpt(vocab=5, grid=(2, 2), dim=32, heads=2, classes=2, sharpen=15.0)


def test_the_shape_is_the_spine_plus_a_full_tree_at_its_head():
    drafter = JacobiTreeDrafter(window=6, branch=3, branch_depth=2, tails=2)
    k = 5
    # spine 5 + the 3-ary tree of depth 2 (3 + 9 nodes, 2 on the spine) + 2 copies below each of its 8 off-spine leaves
    assert drafter.tree_size == k + (3 + 9 - 2) + 8 * 2
    paths = branch_paths(k, 3, 2, 2)
    parents = drafter.parents.tolist()
    assert all(p < i for i, p in enumerate(parents))                          # topological
    assert [paths[i] for i in drafter.spine.tolist()] == [(0,) * d for d in range(1, k + 1)]
    assert drafter.max_children == (3, 3, 1, 1, 1)
    assert drafter.k == k                                                     # the tree's depth: the spine's
    # the spine's group comes first at every branched depth, its first child the spine's node
    for d, groups in enumerate(drafter.groups, start=1):
        assert groups[0, 0] == drafter.spine[d - 1]
        assert all(len(paths[i]) == d for i in groups.flatten().tolist())
    assert all(len(paths[i]) > 2 and paths[i] != (0,) * len(paths[i]) for i in drafter.copy_nodes.tolist())
    # the static ancestry the drafter hands its trees is the one a tree would build from its parents
    tree = DraftTree(torch.zeros(2, drafter.tree_size, dtype=torch.long), drafter.parents.expand(2, -1),
                     torch.full((2,), drafter.tree_size), reach=drafter.reach.expand(2, -1, -1))
    assert torch.equal(tree.ancestors(), tree._ancestors())


@pytest.mark.parametrize("window,init,init_q,coupling,branch,depth,tails",
                         [(3, "random", "onehot", "maximal", 2, 2, 0),
                          (4, "repeat_vertical", "onehot", "maximal", 3, 1, 2),
                          (3, "random", "onehot", "none", 2, 1, 0),
                          (4, "random", "uniform", "gumbel", 2, 1, 1)])
def test_jacobi_trees_are_exact(image_target, window, init, init_q, coupling, branch, depth, tails):
    """Chi-square p > 0.001 and TVD at the noise level of an exact sampler (20k sequences of 625 outcomes)."""
    drafter = JacobiTreeDrafter(window, init, init_q, coupling, branch=branch, branch_depth=depth, tails=tails)
    fit, res = fit_of(image_target, drafter, Sampling())
    assert fit.p_value > 1e-3, str(fit)
    assert fit.tvd < 2 * fit.tvd_noise + 1e-3, str(fit)
    assert res.stats.mean_accepted_length > 1.2, res.stats.mean_accepted_length


def test_jacobi_trees_are_exact_with_cfg_and_top_k(image_target):
    """top_k = 2 of V = 5 leaves a sibling nothing of L_d often: the uniform fallback is exercised."""
    drafter = JacobiTreeDrafter(3, "random", coupling="maximal", branch=3, branch_depth=2)
    fit, _ = fit_of(image_target, drafter, Sampling(cfg_scale=2.5, top_k=2))
    assert fit.p_value > 1e-3, str(fit)
    assert fit.tvd < 2 * fit.tvd_noise + 1e-3, str(fit)


def test_jacobi_trees_are_exact_on_transformers_and_llamagen_targets():
    """The same tree through a transformers Llama (tree nodes as cache slots, holes compacted every 3 steps) and
    through LlamaGen (2-D RoPE at root + depth, static cache)."""
    from specdec.adapters.llamagen import LlamaGenAdapter
    from specdec.models.llamagen import LlamaGenConfig, LlamaGenGPT

    torch.manual_seed(2)
    model = LlamaGenGPT(LlamaGenConfig(vocab_size=4, block_size=4, n_layer=1, n_head=2, dim=32, num_classes=3))
    with torch.no_grad():
        model.output.weight.normal_(0.0, 3.0)
    for target in (tiny_hf_target(), LlamaGenAdapter(model)):
        drafter = JacobiTreeDrafter(3, "random", coupling="maximal", branch=2, branch_depth=1, tails=1)
        fit, res = fit_of(target, drafter, Sampling(cfg_scale=2.0), n=12000)
        assert fit.p_value > 1e-3, (type(target).__name__, str(fit))
        assert fit.tvd < 2 * fit.tvd_noise + 1e-3, (type(target).__name__, str(fit))
        assert res.stats.mean_accepted_length > 1.2, res.stats.mean_accepted_length


class _SiblingsClaimTheirParentsLaw(JacobiTreeDrafter):
    """Negative control: siblings drawn without replacement but reported with the undiminished L_d."""

    def propose(self, k):
        tree = super().propose(k)
        spine_q = tree.q[:, self.spine]
        for d, groups in enumerate(self.groups, start=1):
            nodes = groups[:, 1:].flatten()
            tree.q[:, nodes] = spine_q[:, d - 1, None]
        return tree


def test_the_exactness_test_catches_siblings_that_misreport_their_law(image_target):
    drafter = _SiblingsClaimTheirParentsLaw(3, "random", coupling="maximal", branch=3, branch_depth=1)
    fit, _ = fit_of(image_target, drafter, Sampling(), n=10000)
    assert fit.p_value < 1e-6, str(fit)


@pytest.mark.parametrize("init,grid", [("repeat_vertical", (4, 4)), ("previous_frame", (2, 2, 4))])
def test_greedy_jacobi_trees_equal_greedy_ar(init, grid):
    target = tiny_gpt(vocab=64, grid=grid)
    cond = torch.arange(4) % 3
    for cfg in (1.0, 3.0):
        sampling = Sampling(temperature=0.0, cfg_scale=cfg)
        ar = specdec.generate(target, cond, sampling=sampling, seed=0).tokens
        drafter = JacobiTreeDrafter(6, init, coupling="maximal", branch=2, branch_depth=2, tails=2)
        spec = specdec.generate(target, cond, drafter=drafter, sampling=sampling, seed=0)
        assert torch.equal(ar, spec.tokens)
    assert GREEDY.temperature == 0.0


def test_the_zoo_jacobi_tree_for_a_seed():
    """Target forwards per image and MAL (4 images of classes 0-3, CFG 3, seed 0) of MC-SJD's chain and of the same
    chain with 3 candidates at the window's first position and 4 copies of the spine below each (`helpers.
    assert_seed_figures` for other CPUs; the tree's wider products also round differently with the thread count:
    two threads give 49.75 / 2.8744, inside its tolerance)."""
    from specdec.registry import make_drafter

    bundle = specdec.zoo.load()
    for name, (fwd, mal) in ZOO_FIGURES.items():
        drafter = JacobiTreeDrafter(16, "repeat_vertical", coupling="maximal", branch=3, branch_depth=1, tails=4) \
            if name != "chain" else make_drafter("jacobi", bundle, window=16, init="repeat_vertical",
                                                 coupling="maximal")
        res = specdec.generate(bundle.target, torch.arange(4), drafter=drafter, sampling=Sampling(cfg_scale=3.0),
                               seed=0, decode=False)
        assert_seed_figures(res.stats, fwd, mal, what=name)


ZOO_FIGURES = {"chain": (48.75, 2.9333), "3x1+4": (48.5, 2.9485)}


def test_bad_parameters_and_chain_only_rules_are_named(image_target):
    with pytest.raises(ValueError, match="branch .* must be an integer >= 2.*use JacobiDrafter"):
        JacobiTreeDrafter(4, branch=1)
    with pytest.raises(ValueError, match=r"branch_depth must be an integer in \[1, window - 1 = 3\]"):
        JacobiTreeDrafter(4, branch=2, branch_depth=4)
    with pytest.raises(ValueError, match="tails .* must be an integer >= 0"):
        JacobiTreeDrafter(4, tails=-1)
    with pytest.raises(ValueError, match="unknown Jacobi coupling"):
        JacobiTreeDrafter(4, coupling="gibbs")
    from verifiers import TypicalRule
    with pytest.raises(ValueError, match="'typical' .* verifies chains of drafts only"):
        specdec.generate(image_target, torch.tensor([0]), drafter=JacobiTreeDrafter(3), rule=TypicalRule())


def test_the_registry_builds_it():
    from specdec.registry import make_drafter

    drafter = make_drafter("jacobi_tree", None, window=8, branch=2, branch_depth=1, tails=3)
    assert isinstance(drafter, JacobiTreeDrafter) and drafter.tree_size == 7 + 1 + 3
