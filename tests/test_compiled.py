"""The compiled decode step (specdec.compiled): same tokens as the eager adapters, one graph per shape."""
from __future__ import annotations

import pytest
import torch

import specdec
from drafters import ModelDrafter
from specdec import Sampling
from specdec.compiled import compile_adapter, compile_step
from helpers import perturbed_copy, tiny_gpt


@pytest.fixture(scope="module")
def compiled(target):
    draft = perturbed_copy(target, 0.3)
    return draft, compile_adapter(target), compile_adapter(draft)


def test_compiled_tokens_equal_eager_and_graphs_are_reused(target, compiled):
    from torch._dynamo.utils import counters

    draft, c_target, c_draft = compiled
    sampling, cond = Sampling(cfg_scale=3.0), torch.tensor([0, 1, 2])
    graphs = []
    for seed in (4, 5):
        eager = specdec.generate(target, cond, drafter=ModelDrafter(draft, k=3), sampling=sampling, seed=seed)
        fast = specdec.generate(c_target, cond, drafter=ModelDrafter(c_draft, k=3), sampling=sampling, seed=seed)
        whole = specdec.generate(target, cond, drafter=ModelDrafter(draft, k=3, compile=True), sampling=sampling,
                                 seed=seed)
        assert torch.equal(eager.tokens, fast.tokens) and torch.equal(eager.tokens, whole.tokens)
        assert fast.stats.target_forwards == eager.stats.target_forwards
        assert 0 < fast.stats.acceptance_rate < 1
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[1] == graphs[0]          # the second generation replays the graphs of the first


def test_compile_refuses_a_growing_cache_and_unknown_modes(target):
    class Growing:
        pass
    with pytest.raises(TypeError, match="static KV cache"):
        compile_adapter(Growing())
    with pytest.raises(ValueError, match="mode"):
        compile_adapter(target, mode="fastest")
    with pytest.raises(TypeError, match="static KV cache"):
        ModelDrafter(Growing(), k=2, compile=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_path_equals_eager():
    target = tiny_gpt(vocab=64, grid=(4, 4), sharpen=3.0)
    draft = perturbed_copy(target, 0.3)
    target.model.cuda()
    draft.model.cuda()
    c_target, c_draft = compile_adapter(target, "reduce-overhead"), compile_adapter(draft, "reduce-overhead")
    cond = torch.tensor([0, 1])
    eager = specdec.generate(target, cond, drafter=ModelDrafter(draft, k=3), seed=1)
    for _ in range(2):       # the second run replays the captured graphs
        fast = specdec.generate(c_target, cond, drafter=ModelDrafter(c_draft, k=3), seed=1)
        assert torch.equal(eager.tokens, fast.tokens)


def test_compiled_target_serves_eagle_chains_and_trees_with_the_eager_tokens():
    """The target's chain step and its tree verification compiled with frozen weights, the drafter eager and
    compiled with frozen weights: eager tokens. (A target compiled without freezing is
    test_compiled_tokens_equal_eager_and_graphs_are_reused's, EAGLE's plainly compiled drafts test_eagle's: one
    configuration here keeps the suite's compile time down.)"""
    from drafters.eagle import eagle
    from specdec.testing import tiny_random_bundle

    b = tiny_random_bundle()
    fast_target = compile_adapter(b.target, freeze=True)
    assert fast_target.hidden_size == b.target.hidden_size and fast_target.supports_trees
    sampling, cond = Sampling(cfg_scale=3.0), torch.tensor([0, 1])
    for tree in ("chain", "static:binary-3"):
        eager = specdec.generate(b.target, cond, drafter=eagle(b.eagle_head, tree=tree, k=3), sampling=sampling,
                                 seed=2)
        for compile_drafter in (False, "freeze"):
            fast = specdec.generate(fast_target, cond, drafter=eagle(b.eagle_head, tree=tree, k=3,
                                                                     compile=compile_drafter),
                                    sampling=sampling, seed=2)
            assert torch.equal(eager.tokens, fast.tokens), (tree, compile_drafter)
            assert fast.stats.target_forwards == eager.stats.target_forwards
        assert eager.stats.mean_accepted_length > 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_target_serves_eagle_with_the_eager_tokens():
    """The EAGLE drafter copies the target's hidden states out of each replay (observe) before the next one
    overwrites the graph's output buffers."""
    from drafters.eagle import eagle
    from specdec.testing import tiny_random_bundle

    b = tiny_random_bundle()
    b.target_gpt.cuda()
    b.eagle_head.cuda()
    from specdec.adapters.gpt import GPTAdapter
    target = GPTAdapter(b.target_gpt, grid=b.target.grid)
    fast = compile_adapter(target, "reduce-overhead")
    cond, sampling = torch.tensor([0, 1]), Sampling(cfg_scale=3.0)
    for tree in ("chain", "static:binary-3"):
        eager = specdec.generate(target, cond, drafter=eagle(b.eagle_head, tree=tree, k=3), sampling=sampling,
                                 seed=3)
        for _ in range(2):
            out = specdec.generate(fast, cond, drafter=eagle(b.eagle_head, tree=tree, k=3, compile=True),
                                   sampling=sampling, seed=3)
            assert torch.equal(eager.tokens, out.tokens), tree


def _frozen_apply(module, x):
    return module(x)


def _plain_apply(module, x):                # its own code object: dynamo caches graphs per code object
    return module(x)


def test_freeze_folds_the_weights_into_the_graph():
    """compile_step(freeze=True) makes a model's parameters constants of the graph (folded and pre-packed for the
    CPU's matrix kernels): a weight changed after the first call leaves the frozen graph's output as it was, while
    the unfrozen graph reads the new weight. Before the weights were frozen for real, torch.compile's `options` left
    them graph inputs and this failed. The global inductor flag the freezing needs is restored after each call."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(8, 16, bias=True)
    x = torch.randn(3, 8)
    frozen, plain = compile_step(_frozen_apply, freeze=True), compile_step(_plain_apply)
    with torch.no_grad():
        before = frozen(lin, x)
        torch.testing.assert_close(plain(lin, x), before)
        lin.weight.mul_(2)
        assert torch.equal(frozen(lin, x), before)
        torch.testing.assert_close(plain(lin, x), lin(x))
    assert torch._inductor.config.freezing is False
