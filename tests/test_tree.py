"""Draft trees (specdec.tree): ancestors, paths, and one verification forward over a tree equal to separate
forwards over every root-to-node path, at batch > 1 with a different tree and prefix length per row."""
from __future__ import annotations

import pytest
import torch

from specdec.tree import DraftTree, chain, verify_inputs
from helpers import tiny_gpt, tiny_hf_target


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


def test_a_chain_verified_as_a_tree_equals_the_chain_rule():
    from specdec.random import RowStreams
    from verifiers import ExactRule

    g = torch.Generator().manual_seed(0)
    B, k, V = 64, 4, 6
    p = torch.softmax(torch.randn(B, k + 1, V, generator=g) * 2, -1)
    q = torch.softmax(torch.randn(B, k, V, generator=g) * 2, -1)
    x = torch.multinomial(q.reshape(-1, V), 1, generator=g).reshape(B, k)
    streams = RowStreams(7, torch.arange(B))
    start = torch.randint(1, 20, (B,), generator=g)
    rule = ExactRule()
    want = rule.verify(x, q, p, streams.at(start))
    got = rule.verify_tree(chain(x, q), p, streams.at(start))
    assert torch.equal(got.n_accepted, want.n_accepted) and torch.equal(got.next_token, want.next_token)
    assert torch.equal(got.node, want.n_accepted - 1)
    assert 0 < float(want.n_accepted.float().mean()) < k


class FixedShapeTreeDrafter:
    """A training-free tree drafter for tests: a fixed tree shape; at every node the children are drawn from a fixed
    law q0 without replacement (sequential q: q0 with the earlier siblings removed), or are q0's top tokens in order
    (deterministic, one-hot q)."""

    def __init__(self, parents: list[int], q0: torch.Tensor, deterministic: bool = False):
        from specdec.protocols import Drafter
        from specdec.tree import DraftTree

        self.__class__ = type("FixedShapeTree", (FixedShapeTreeDrafter, Drafter), {})
        self.parents, self.q0, self.deterministic = torch.tensor(parents), q0, deterministic
        self.tree_size = len(parents)
        anc = brute_ancestors(self.parents[None])[0]
        self.k = int(anc.sum(-1).max())
        self.K = int(max((self.parents == p).sum() for p in set(parents)))
        self.rank = torch.tensor([int((self.parents[:i] == self.parents[i]).sum()) for i in range(len(parents))])
        self.one_hot_drafts = deterministic
        self.forwards = 0
        self._tree = DraftTree

    def start(self, ctx):
        self.ctx = ctx

    def propose(self, k):
        n = self.ctx.n_done
        B, N, V = n.shape[0], self.tree_size, self.q0.shape[0]
        tokens = torch.zeros(B, N, dtype=torch.long)
        q = torch.zeros(B, N, V)
        u = self.ctx.streams.uniform_at("tree_draft", n[:, None] * 0 + torch.arange(N)[None] + 1000 * n[:, None])
        order = self.q0.argsort(descending=True)
        for i in range(N):
            earlier = [j for j in range(i) if self.parents[j] == self.parents[i]]
            law = self.q0.clone().expand(B, V).clone()
            for j in earlier:
                law[torch.arange(B), tokens[:, j]] = 0
            law = law / law.sum(-1, keepdim=True)
            if self.deterministic:
                tokens[:, i] = order[int(self.rank[i])]
                q[:, i] = torch.nn.functional.one_hot(tokens[:, i], V).float()
            else:
                tokens[:, i] = torch.searchsorted(law.cumsum(-1), (u[:, i] * law.sum(-1))[:, None])[:, 0].clamp_max(V - 1)
                q[:, i] = law
        return self._tree(tokens, self.parents.expand(B, N).clone(), torch.full((B,), N), q, self.k, self.K)

    def observe(self, verdict, target_probs):
        pass


SHAPES = {"binary": [-1, -1, 0, 0, 1, 2], "wide": [-1, -1, -1, 0, 0, 3], "chain-ish": [-1, 0, 1, -1]}


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("deterministic", [False, True])
def test_tree_decoding_is_exact(shape, deterministic):
    """Sequence-level chi-square against the enumerated joint law (V = 5, T = 4), with CFG and top-k."""
    from specdec import Sampling
    from helpers import fit_of

    target = tiny_gpt(vocab=5, grid=(2, 2), dim=32, heads=2, classes=2, sharpen=15.0)
    q0 = torch.tensor([0.05, 0.6, 0.2, 0.1, 0.05])          # peaked: removing a sibling changes q a lot
    drafter = FixedShapeTreeDrafter(SHAPES[shape], q0, deterministic)
    fit, res = fit_of(target, drafter, Sampling(cfg_scale=2.0, top_k=4), n=20000)
    assert fit.p_value > 1e-3, str(fit)
    assert fit.tvd < 2 * fit.tvd_noise + 1e-3, str(fit)
    assert res.stats.mean_accepted_length > 1.05


def test_greedy_tree_decoding_equals_greedy_ar(target):
    import specdec
    from helpers import GREEDY

    cond = torch.tensor([0, 1, 2, 1])
    ar = specdec.generate(target, cond, sampling=GREEDY, seed=0)
    q0 = torch.softmax(torch.randn(64, generator=torch.Generator().manual_seed(0)), 0)
    tree = specdec.generate(target, cond, drafter=FixedShapeTreeDrafter(SHAPES["binary"], q0, True),
                            sampling=GREEDY, seed=0)
    assert torch.equal(ar.tokens, tree.tokens)


def test_chain_only_rules_and_adapters_refuse_trees(target):
    import specdec
    from verifiers import TypicalRule

    drafter = FixedShapeTreeDrafter(SHAPES["binary"], torch.full((64,), 1 / 64))
    with pytest.raises(ValueError, match="'typical' .* verifies chains of drafts only"):
        specdec.generate(target, torch.tensor([0]), drafter=drafter, rule=TypicalRule())


@pytest.mark.parametrize("shape", ["spine-2", "binary-2", [[0], [1], [2], [0, 0]]])
@pytest.mark.parametrize("drafts", ["sample", "argmax"])
def test_a_draft_model_tree_is_exact(shape, drafts):
    from drafters.model_tree import TreeModelDrafter
    from specdec import Sampling
    from helpers import fit_of, perturbed_copy

    target = tiny_gpt(vocab=5, grid=(2, 2), dim=32, heads=2, classes=2, sharpen=15.0)
    drafter = TreeModelDrafter(perturbed_copy(target, 0.8), shape=shape, drafts=drafts)
    fit, res = fit_of(target, drafter, Sampling(cfg_scale=2.0), n=20000)
    assert fit.p_value > 1e-3, str(fit)
    assert fit.tvd < 2 * fit.tvd_noise + 1e-3, str(fit)
    assert res.stats.mean_accepted_length > 1.2


def test_model_tree_greedy_equals_ar_and_beats_its_chain(target):
    import specdec
    from drafters import ModelDrafter
    from drafters.model_tree import TreeModelDrafter
    from specdec import Sampling
    from helpers import GREEDY, perturbed_copy

    cond = torch.tensor([0, 1, 2, 1])
    draft = perturbed_copy(target, 0.6)
    ar = specdec.generate(target, cond, sampling=GREEDY, seed=0)
    tree = specdec.generate(target, cond, drafter=TreeModelDrafter(draft, "spine-3", "argmax"), sampling=GREEDY)
    assert torch.equal(ar.tokens, tree.tokens)
    s = Sampling(cfg_scale=3.0)
    chain = specdec.generate(target, cond, drafter=ModelDrafter(draft, k=3), sampling=s, seed=1)
    tree = specdec.generate(target, cond, drafter=TreeModelDrafter(draft, "binary-3"), sampling=s, seed=1)
    assert tree.stats.mean_accepted_length > chain.stats.mean_accepted_length


@pytest.mark.parametrize("rule_name, shape", [("exact", [[0], [1], [2], [0, 0], [0, 1]]),
                                               ("spectr", [[0], [1], [2], [0, 0], [0, 1]]), ("spectr", "seqs-3x2")])
def test_iid_sibling_trees_are_exact_under_recursive_rejection_and_spectr(rule_name, shape):
    from drafters.model_tree import TreeModelDrafter
    from specdec import Sampling
    from specdec.registry import make_rule
    from helpers import fit_of, perturbed_copy

    target = tiny_gpt(vocab=5, grid=(2, 2), dim=32, heads=2, classes=2, sharpen=15.0)
    drafter = TreeModelDrafter(perturbed_copy(target, 0.8), shape=shape, drafts="iid")
    fit, res = fit_of(target, drafter, Sampling(cfg_scale=2.0), n=20000, rule=make_rule(rule_name))
    assert fit.p_value > 1e-3, str(fit)
    assert fit.tvd < 2 * fit.tvd_noise + 1e-3, str(fit)
    assert res.stats.mean_accepted_length > 1.2


def test_spectr_accepts_at_least_as_often_as_recursive_rejection_with_k_iid_drafts():
    from specdec.random import RowStreams
    from specdec.tree import DraftTree
    from verifiers import ExactRule, SpecTrRule
    from verifiers.spectr import rho_star

    g = torch.Generator().manual_seed(0)
    B, V = 20000, 6
    p = torch.softmax(torch.randn(V, generator=g) * 1.5, 0)
    q = torch.softmax(torch.randn(V, generator=g) * 1.5, 0)
    for k in (1, 2, 4):
        x = torch.multinomial(q, B * k, replacement=True, generator=g).reshape(B, k)
        tree = DraftTree(x, torch.full((B, k), -1), torch.full((B,), k), q.expand(B, k, V).clone(), 1, k)
        probs = p.expand(B, 1 + k, V)
        streams = RowStreams(1, torch.arange(B))
        exact = ExactRule().verify_tree(tree, probs, streams.at(torch.zeros(B, dtype=torch.long)))
        spectr = SpecTrRule().verify_tree(tree, probs, streams.at(torch.zeros(B, dtype=torch.long)))
        rho = float(rho_star(p[None], q[None], torch.tensor([k]))[0])
        beta = float(torch.minimum(q, p / rho).sum())
        predicted = 1 - (1 - beta) ** k                                # SpecTr's acceptance probability
        got = float((spectr.n_accepted > 0).float().mean())
        assert abs(got - predicted) < 4 * (predicted * (1 - predicted) / B) ** 0.5 + 1e-3, (k, got, predicted)
        if k >= 2:
            assert got >= float((exact.n_accepted > 0).float().mean()) - 0.01, k
    assert SpecTrRule().lossless and SpecTrRule().distortion_bound(False) == 0.0


def test_k_draft_shapes_part_at_the_root_and_run_as_chains():
    from specdec.tree import shape_parents, static_shape

    paths = static_shape("seqs-3x2")                 # SpecTr's k-SEQ setting: 3 drafts of 2 tokens
    assert paths == [(0,), (1,), (2,), (0, 0), (1, 0), (2, 0)]
    assert shape_parents(paths) == ([-1, -1, -1, 0, 1, 2], [0, 1, 2, 0, 0, 0], [1, 1, 1, 2, 2, 2])
    assert static_shape("seqs-1x3") == static_shape("chain-3")
    for bad in ("seqs-0x2", "seqs-3", "seqs-3x", "seqs-ax2"):
        with pytest.raises(ValueError, match="seqs-KxL"):
            static_shape(bad)
    from drafters.model_tree import TreeModelDrafter
    # i.i.d. siblings may repeat a token, and a lossless rule pools the repeats' children: at most a level's width
    assert [TreeModelDrafter(None, shape, drafts).pool for shape, drafts in
            (("seqs-3x2", "iid"), ("binary-3", "iid"), ("binary-3", "sample"), ("seqs-3x2", "argmax"))] == [3, 8, 0, 0]


def test_a_tree_larger_than_the_cache_room_is_refused(target):
    import specdec
    from drafters.model_tree import TreeModelDrafter
    from helpers import perturbed_copy

    big = TreeModelDrafter(perturbed_copy(target, 0.3), shape="binary-5")          # 62 nodes
    with pytest.raises(ValueError, match="needs room for"):
        specdec.generate(target, torch.tensor([0]), drafter=big)
    with pytest.raises(ValueError, match="unknown tree shape"):
        TreeModelDrafter(target, shape="bushy-3")
    with pytest.raises(ValueError, match="elder sibling"):
        TreeModelDrafter(target, shape=[[0], [2]])


@pytest.mark.parametrize("drafts", ["sample", "argmax"])
def test_trees_on_a_transformers_target_are_exact(drafts):
    """Tree nodes as slots of the transformers cache (holes for the rejected ones, compaction every 3 steps)."""
    from drafters.model_tree import TreeModelDrafter
    from specdec import Sampling
    from helpers import fit_of

    target = tiny_hf_target()
    draft = tiny_gpt(vocab=5, grid=(2, 2), dim=32, heads=2, classes=2, sharpen=6.0, seed=4)
    fit, res = fit_of(target, TreeModelDrafter(draft, "binary-2", drafts), Sampling(cfg_scale=2.0), n=12000)
    assert fit.p_value > 1e-3, str(fit)
    assert fit.tvd < 2 * fit.tvd_noise + 1e-3, str(fit)
    assert res.stats.mean_accepted_length > 1.1


def test_greedy_trees_on_a_transformers_target_equal_its_own_generate():
    import specdec
    from drafters.model_tree import TreeModelDrafter
    from helpers import GREEDY

    target = tiny_hf_target(scale=2.0)
    target.grid, target.num_tokens = (4, 4), 16
    draft = tiny_gpt(vocab=5, grid=(4, 4), dim=32, heads=2, classes=2, sharpen=6.0, seed=4)
    cond = torch.tensor([0, 1, 1])
    ar = specdec.generate(target, cond, sampling=GREEDY)
    every_token = [[0], [1], [2], [3], [4], [0, 0], [0, 1]]              # depth 1 holds all 5 tokens: always hit
    tree = specdec.generate(target, cond, drafter=TreeModelDrafter(draft, every_token, "argmax"), sampling=GREEDY)
    assert torch.equal(ar.tokens, tree.tokens) and tree.stats.target_forwards < ar.stats.target_forwards
    out = target.model.generate(torch.tensor([[1, 2]]), max_new_tokens=16, min_new_tokens=16, do_sample=False,
                                bad_words_ids=[[i] for i in range(7)])
    assert torch.equal(out[0, 2:], ar.tokens[0] + 7)


def test_trees_on_llamagen_are_exact():
    """LlamaGen's 2-D RoPE at root + depth, nodes in tree slots of its static cache."""
    from drafters.model_tree import TreeModelDrafter
    from specdec import Sampling
    from specdec.adapters.llamagen import LlamaGenAdapter
    from specdec.models.llamagen import LlamaGenConfig, LlamaGenGPT
    from helpers import fit_of

    torch.manual_seed(2)
    model = LlamaGenGPT(LlamaGenConfig(vocab_size=4, block_size=4, n_layer=1, n_head=2, dim=32, num_classes=3))
    with torch.no_grad():
        model.output.weight.normal_(0.0, 3.0)
    target = LlamaGenAdapter(model)
    draft = tiny_gpt(vocab=4, grid=(2, 2), dim=32, heads=2, classes=3, sharpen=6.0, seed=4)
    fit, res = fit_of(target, TreeModelDrafter(draft, "binary-2"), Sampling(cfg_scale=2.0), n=12000)
    assert fit.p_value > 1e-3, str(fit)
    assert fit.tvd < 2 * fit.tvd_noise + 1e-3, str(fit)
    assert res.stats.mean_accepted_length > 1.1


@torch.no_grad()
def test_llamagen_tree_forward_equals_path_forwards():
    from specdec.models.llamagen import LlamaGenConfig, LlamaGenGPT

    torch.manual_seed(0)
    model = LlamaGenGPT(LlamaGenConfig(vocab_size=9, block_size=36, n_layer=2, n_head=2, dim=32, num_classes=3))
    with torch.no_grad():
        model.output.weight.normal_(0.0, 1.0)
    B, N, V = 3, 8, 9
    g = torch.Generator().manual_seed(1)
    classes, n_done = torch.tensor([0, 2, 1]), torch.tensor([5, 9, 2])
    committed = torch.randint(V, (B, 12), generator=g)
    cache = model.new_cache(B, 64)
    model.prefill(classes, cache)
    model.step(committed[:, :11], cache)
    cache.set_lengths(1 + n_done - 1)
    last = committed.gather(1, (n_done - 1)[:, None])[:, 0]
    tree = random_tree(B, N, V, seed=5)
    slot0 = cache.lengths.clone()
    tokens, positions, slots, allowed = verify_inputs(tree, n_done, last, slot0)
    logits = model.step_tree(tokens, cache, positions + 1, slots, allowed)       # +1: the class token
    anc = brute_ancestors(tree.parents)
    for b in range(B):
        for i in range(-1, N):
            path = [] if i < 0 else [int(tree.tokens[b, j]) for j in range(N) if anc[b, i, j]]
            seq = torch.cat([committed[b, : int(n_done[b])], torch.tensor(path, dtype=torch.long)])
            fresh = model(seq[None], classes[b:b + 1])[0, len(seq)]
            assert torch.allclose(logits[b, 1 + i], fresh, atol=1e-4), (b, i)


@torch.no_grad()
def test_transformers_tree_forward_equals_path_forwards():
    from specdec import Sampling

    target = tiny_hf_target(scale=1.0)
    target.grid, target.num_tokens = (6, 6), 36
    B, N, V = 3, 8, 5
    g = torch.Generator().manual_seed(1)
    cond, n_done = torch.tensor([0, 1, 1]), torch.tensor([5, 9, 2])
    committed = torch.randint(V, (B, 12), generator=g)
    sampling = Sampling(cfg_scale=2.0)
    state, _ = target.start(cond, sampling, 40)
    target.forward(state, committed[:, :11])
    target.rollback(state, n_done - 1)                                          # ragged prefixes as holes
    last = committed.gather(1, (n_done - 1)[:, None])[:, 0]
    tree = random_tree(B, N, V, seed=6)
    logits = target.forward_tree(state, tree, last, n_done)
    anc = brute_ancestors(tree.parents)
    for b in range(B):
        for i in range(-1, N):
            path = [] if i < 0 else [int(tree.tokens[b, j]) for j in range(N) if anc[b, i, j]]
            seq = torch.cat([committed[b, : int(n_done[b])], torch.tensor(path, dtype=torch.long)])
            fresh_state, _ = target.start(cond[b:b + 1], sampling, 40)
            fresh = target.forward(fresh_state, seq[None])
            for got, want in ((logits.cond, fresh.cond), (logits.uncond, fresh.uncond)):
                assert torch.allclose(got[b, 1 + i], want[0, -1], atol=1e-4), (b, i)


def _one_level_trees(q: torch.Tensor, B: int, k: int, g: torch.Generator):
    """B single-node trees: the root's k children drawn without replacement from q (sequential q)."""
    from specdec.tree import DraftTree

    V = q.shape[0]
    x = torch.stack([torch.multinomial(q, k, replacement=False, generator=g) for _ in range(B)])
    laws, law = [], q.expand(B, V).clone()
    for r in range(k):
        laws.append(law / law.sum(-1, keepdim=True))
        law = law.scatter(1, x[:, r:r + 1], 0.0)
    return DraftTree(x, torch.full((B, k), -1), torch.full((B,), k), torch.stack(laws, 1), 1, k)


def test_bounded_lantern_on_trees_emits_its_relaxed_target_within_delta():
    from specdec.certify import default_geometry
    from specdec.random import RowStreams
    from verifiers import BoundedLanternRule, ExactRule, LanternRule

    g = torch.Generator().manual_seed(0)
    V, B, k, delta = 6, 60000, 3, 0.15
    p = torch.softmax(torch.randn(V, generator=g) * 1.5, 0)
    q = torch.softmax(torch.randn(V, generator=g) * 1.5, 0)
    tree = _one_level_trees(q, B, k, g)
    probs = p.expand(B, 1 + k, V)
    at = RowStreams(3, torch.arange(B)).at(torch.zeros(B, dtype=torch.long))
    rule = BoundedLanternRule(default_geometry(V), neighbours=3, delta=delta)
    verdict = rule.verify_tree(tree, probs, at)
    emitted = torch.where(verdict.n_accepted > 0, tree.tokens.gather(1, verdict.node.clamp_min(0)[:, None])[:, 0],
                          verdict.next_token)
    hist = torch.bincount(emitted, minlength=V).double() / B
    p_tilde = rule.relaxed_target(p[None, None], q[None, None])[0, 0].double()
    assert 0.5 * float((hist - p_tilde).abs().sum()) < 0.01                      # the law is p~ (noise ~0.004)
    assert 0.5 * float((p_tilde - p.double()).abs().sum()) <= delta + 1e-6      # within delta of p
    # (its acceptance over several siblings is not always above the exact rule's: p~ is shaped by the first child's
    # q, and later siblings are drawn without the tokens it favours)
    exact = ExactRule().verify_tree(tree, probs, at)
    lantern = LanternRule(default_geometry(V), neighbours=3, lam=3.0).verify_tree(tree, probs, at)
    assert float((lantern.n_accepted > 0).float().mean()) > float((exact.n_accepted > 0).float().mean())


@pytest.mark.parametrize("top_k,depth,total", [(2, 3, 5), (3, 3, 12)])
def test_dynamic_trees_with_sampled_siblings_are_exact(top_k, depth, total):
    """Children drawn without replacement, the budget cutting inside sibling groups (candidates 10 / 30 > kept):
    sequence-level chi-square against the enumerated joint law (V = 5, T = 4), with CFG."""
    from drafters import DynamicTreeDrafter
    from specdec import Sampling
    from helpers import fit_of, perturbed_copy

    small = tiny_gpt(vocab=5, grid=(2, 2), dim=32, heads=2, classes=2, sharpen=15.0)
    drafter = DynamicTreeDrafter(perturbed_copy(small, 0.8), top_k=top_k, depth=depth, total_tokens=total,
                                 drafts="sample")
    fit, res = fit_of(small, drafter, Sampling(cfg_scale=2.0), n=12000)
    assert fit.p_value > 1e-3, str(fit)
    assert fit.tvd < 2 * fit.tvd_noise + 1e-3, str(fit)
    assert res.stats.mean_accepted_length > 1.2


def test_dynamic_trees_are_exact_and_greedy_equals_ar(target):
    import specdec
    from drafters import DynamicTreeDrafter
    from specdec import Sampling
    from helpers import GREEDY, fit_of, perturbed_copy

    small = tiny_gpt(vocab=5, grid=(2, 2), dim=32, heads=2, classes=2, sharpen=15.0)
    drafter = DynamicTreeDrafter(perturbed_copy(small, 0.8), top_k=2, depth=3, total_tokens=5)
    fit, res = fit_of(small, drafter, Sampling(cfg_scale=2.0), n=12000)
    assert fit.p_value > 1e-3, str(fit)
    assert fit.tvd < 2 * fit.tvd_noise + 1e-3, str(fit)
    assert res.stats.mean_accepted_length > 1.2
    cond = torch.tensor([0, 1, 2, 1])
    draft = perturbed_copy(target, 0.6)
    ar = specdec.generate(target, cond, sampling=GREEDY, seed=0)
    dyn = specdec.generate(target, cond, drafter=DynamicTreeDrafter(draft, top_k=4, depth=4, total_tokens=20),
                           sampling=GREEDY)
    assert torch.equal(ar.tokens, dyn.tokens) and dyn.stats.target_forwards < ar.stats.target_forwards
    with pytest.raises(ValueError, match="cache room"):
        specdec.generate(target, cond, drafter=DynamicTreeDrafter(draft, top_k=4, depth=4, total_tokens=8))


@pytest.mark.parametrize("rule_name", ["exact", "spectr"])
def test_pooled_iid_siblings_test_every_duplicates_children(rule_name):
    from specdec.random import RowStreams
    from specdec.registry import make_rule
    from specdec.tree import DraftTree

    # V = 4: y = 0, w = 2, z = 3. Two i.i.d. root drafts both drew y; below them one draft each: w under node 0,
    # z under node 1. p is one-hot: y at the root, z after y. Standing on node 0 alone, w is rejected (depth 1);
    # pooling the duplicates' children also tests z, which the residual (or rho* = 1.5 for SpecTr) accepts surely.
    B, V = 64, 4
    tokens = torch.tensor([[0, 0, 2, 3]]).expand(B, -1).clone()
    parents = torch.tensor([[-1, -1, 0, 1]]).expand(B, -1).clone()
    q = torch.tensor([[.5, .5, 0, 0], [.5, .5, 0, 0], [0, 0, .5, .5], [0, 0, .5, .5]]).expand(B, -1, -1).clone()
    p = torch.tensor([[1., 0, 0, 0], [0, 0, 0, 1], [0, 0, 0, 1], [.25] * 4, [.25] * 4]).expand(B, -1, -1)
    at = RowStreams(0, torch.arange(B)).at(torch.zeros(B, dtype=torch.long))
    rule = make_rule(rule_name)
    alone = rule.verify_tree(DraftTree(tokens, parents, torch.full((B,), 4), q, 2, 2), p, at)
    pooled = rule.verify_tree(DraftTree(tokens, parents, torch.full((B,), 4), q, 2, 2, pool=2), p, at)
    assert (alone.n_accepted == 1).all() and (alone.next_token == 3).all()
    assert (pooled.n_accepted == 2).all() and (pooled.node == 3).all()    # the path root -> node 1 -> node 3


# ---- optimal static shapes (specdec.tree.optimal_shape) and the rank acceptance profile (specdec.tree_profile) ----
def valid_shapes(max_nodes: int, max_rank: int):
    """Every valid child-rank shape (parents and elder siblings present) of 1 .. max_nodes nodes, ranks < max_rank."""
    from specdec.tree import static_shape

    seen, frontier = set(), {frozenset([(0,)])}
    while frontier:
        seen |= frontier
        grown = set()
        for shape in frontier:
            if len(shape) == max_nodes:
                continue
            for path in shape:
                for new in (path + (0,), path[:-1] + (path[-1] + 1,)):
                    if new not in shape and new[-1] < max_rank:
                        grown.add(shape | {new})
        frontier = grown - seen
    for shape in seen:
        static_shape(sorted(shape))                      # every enumerated shape is valid
    return seen


def test_optimal_shapes_are_the_best_of_every_shape_under_the_positional_model():
    from specdec.tree import expected_accepted, optimal_shape

    profile = (0.55, 0.2, 0.1)
    shapes = valid_shapes(6, 3)
    for nodes in range(1, 7):
        best = max(expected_accepted(sorted(s), profile) for s in shapes if len(s) == nodes)
        got = optimal_shape(profile, nodes)
        assert len(got) == nodes
        assert expected_accepted(got, profile) == pytest.approx(best, abs=1e-12), nodes
    for nodes, depth in ((4, 2), (5, 2), (6, 3)):      # with a depth cap: the best of the shapes within it
        best = max(expected_accepted(sorted(s), profile) for s in shapes
                   if len(s) == nodes and max(map(len, s)) <= depth)
        got = optimal_shape(profile, nodes, depth)
        assert max(map(len, got)) <= depth
        assert expected_accepted(got, profile) == pytest.approx(best, abs=1e-12), (nodes, depth)
    # a drafter whose second sibling is never accepted gets a chain; a flat one a wide first level
    assert optimal_shape((0.6,), 5) == [(0,) * d for d in range(1, 6)]
    assert sorted(p for p in optimal_shape((0.2,) * 5, 5)) == [(r,) for r in range(5)]


def test_optimal_shape_presets_need_a_valid_profile():
    from specdec.tree import optimal_shape, static_shape

    profile = [0.6, 0.15, 0.05]
    assert static_shape("optimal-7", profile) == optimal_shape(profile, 7)
    assert static_shape("optimal-7x2", profile) == optimal_shape(profile, 7, 2)
    with pytest.raises(ValueError, match="rank acceptance profile"):
        static_shape("optimal-7")
    for bad in ([], [0.2, 0.3], [0.7, 0.5], [0.0], [1.2], [0.5, -0.1]):
        with pytest.raises(ValueError, match="non-increasing"):
            optimal_shape(bad, 3)
    with pytest.raises(TypeError, match="sequence of probabilities"):
        optimal_shape(0.5, 3)
    with pytest.raises(ValueError, match="fewer than 7 nodes"):
        optimal_shape([0.6, 0.2], 7, max_depth=2)        # at most 2 + 4 nodes
    with pytest.raises(ValueError, match="optimal-N"):
        static_shape("optimal-", profile)
    with pytest.raises(ValueError, match="nodes must be"):
        optimal_shape(profile, 0)
    # a bench config checks a drafter's parameters without its model: the preset's syntax only, the profile comes
    # with the model; a model without one is refused when the drafter is built
    from drafters.eagle import eagle
    from drafters.model_tree import TreeModelDrafter
    eagle(None, tree="static:optimal-6x3")
    with pytest.raises(ValueError, match="unknown tree shape"):
        eagle(None, tree="static:optimal-6y3")
    with pytest.raises(ValueError, match="rank acceptance profile"):
        TreeModelDrafter(tiny_gpt(), shape="optimal-6")
    assert TreeModelDrafter(tiny_gpt(), shape="optimal-6", rank_acceptance=profile).shape == optimal_shape(profile, 6)


def test_non_increasing_fit_pools_violators():
    from specdec.tree_profile import non_increasing

    assert non_increasing([0.5, 0.1, 0.2, 0.05]) == pytest.approx([0.5, 0.15, 0.15, 0.05])
    assert non_increasing([0.1, 0.3]) == pytest.approx([0.2, 0.2])
    assert non_increasing([0.4, 0.2]) == [0.4, 0.2]


def test_rank_acceptance_of_a_drafter_equal_to_the_target_is_one_at_the_first_rank():
    from drafters.model_tree import TreeModelDrafter
    from specdec import Sampling
    from specdec.tree_profile import rank_acceptance

    target = tiny_gpt(seed=3)
    same = rank_acceptance(target, lambda paths: TreeModelDrafter(target, shape=paths), torch.arange(4) % 2,
                           Sampling(cfg_scale=2.0), ranks=3)
    assert same.profile == pytest.approx((1.0,)) and same.cumulative == pytest.approx((1.0, 1.0, 1.0))
    other = tiny_gpt(seed=4)
    got = rank_acceptance(target, lambda paths: TreeModelDrafter(other, shape=paths), torch.arange(8) % 2,
                          Sampling(), ranks=4)
    assert 1 <= len(got.profile) <= 4 and got.images == 8
    assert all(a > 0 for a in got.profile) and list(got.profile) == sorted(got.profile, reverse=True)
    assert sum(got.profile) <= max(got.cumulative) + 1e-9 <= 1.0
    with pytest.raises(ValueError, match="ranks must be"):
        rank_acceptance(target, None, torch.arange(2), Sampling(), ranks=0)


def test_per_depth_sibling_bounds_give_the_verdicts_of_one_bound():
    """A static shape's narrow deep levels test only the siblings they have (max_children per depth); the verdicts
    equal those of the one-bound walk over every rank, draw for draw, for the lossless and the relaxed tree rules."""
    from drafters.model_tree import TreeModelDrafter
    from specdec.random import GeneratorRandomness
    from verifiers._tree import recursive_select, tree_walk
    from verifiers.lantern import LanternRule

    drafter = TreeModelDrafter(None, [[0], [1], [2], [0, 0], [0, 1], [1, 0], [0, 0, 0]])
    assert drafter.max_children == (3, 2, 1)
    B, V, N = 64, 12, drafter.tree_size
    g = torch.Generator().manual_seed(5)
    q = torch.softmax(torch.randn(B, N, V, generator=g) * 2, -1)
    tokens = torch.distributions.Categorical(q).sample()
    probs = torch.softmax(torch.randn(B, N + 1, V, generator=g) * 2, -1)
    parents = drafter.parents.expand(B, N)
    valid = torch.ones(B, N, dtype=torch.bool)
    lantern = LanternRule(torch.randn(V, 4, generator=g), k=3, delta=0.2)
    tree = DraftTree(tokens, parents, torch.full((B,), N), q, 3, drafter.max_children)
    for name, walk in (("exact", lambda bound: tree_walk(tokens, parents, valid, q, probs,
                                                         GeneratorRandomness(torch.Generator().manual_seed(1), B),
                                                         3, bound, recursive_select)),
                       ("lantern", lambda bound: lantern.verify_tree(
                           DraftTree(tokens, parents, torch.full((B,), N), q, 3, bound), probs,
                           GeneratorRandomness(torch.Generator().manual_seed(1), B)))):
        narrow, wide = walk(drafter.max_children), walk(3)
        assert bool((wide.n_accepted > 0).any()) and bool((wide.n_accepted < 3).any())      # both ways taken
        for field in ("n_accepted", "node", "next_token"):
            assert torch.equal(getattr(narrow, field), getattr(wide, field)), (name, field)
    assert tree.max_children == (3, 2, 1)


def test_step_costs_interpolate_and_the_fastest_shapes_follow_the_device():
    from specdec.tree import expected_accepted, optimal_shape
    from specdec.tree_profile import StepCost, fastest_shapes

    cost = StepCost({1: 1.0, 5: 1.4, 17: 2.6}, draft_call=0.1)
    assert [cost.verify_steps(n) for n in (1, 3, 5, 11, 17, 29)] == pytest.approx([1.0, 1.2, 1.4, 2.0, 2.6, 3.8])
    assert cost.step(4, 3) == pytest.approx(1.4 + 0.1 * 4)                   # 5 tokens, 3 levels + the feed
    loop = StepCost({1: 1.0, 5: 1.4, 17: 2.6}, draft_call=0.1, fixed=0.3, per_node=0.02, ar_token=1.1)
    assert loop.step(4, 3) == pytest.approx(1.4 + 0.1 * 4 + 0.3 + 0.02 * 4)
    assert loop.speedup(2.0, 4, 3) == pytest.approx(2.0 * 1.1 / loop.step(4, 3))
    with pytest.raises(ValueError, match="at least 2"):
        StepCost({1: 1.0}, 0.1).verify_steps(3)
    profile = (0.6, 0.1, 0.05)
    free = fastest_shapes(profile, StepCost({1: 1.0, 2: 1.0}, 0.0), max_nodes=20, max_depth=8, top=3)
    assert free[0].nodes == 20 and free[0].speedup == pytest.approx(free[0].mal)     # verification free: biggest
    assert [c.speedup for c in free] == sorted((c.speedup for c in free), reverse=True)
    linear = fastest_shapes(profile, StepCost({1: 1.0, 2: 2.0}, 0.0), max_nodes=20, max_depth=8, top=1)[0]
    assert linear.nodes == 1 and linear.speedup == pytest.approx(1.6 / 2)           # each token a step: one draft
    for c in free + [linear]:
        assert c.paths == optimal_shape(profile, c.nodes, c.depth)
        assert c.mal == pytest.approx(1 + expected_accepted(c.paths, profile))


@pytest.mark.parametrize("one_hot", [False, True])
def test_the_vectorised_thin_tail_gives_the_verdicts_of_the_level_by_level_walk(one_hot):
    """Below a static shape's last branching level every node has at most one child: recursive rejection walks that
    chain in one vectorised pass. Its verdicts equal the level-by-level walk's, draw for draw, on shapes with long
    spines (a Jacobi tree, a spine with side chains), ragged padding and laws close enough to accept deep runs."""
    from drafters.jacobi_tree import JacobiTreeDrafter
    from specdec.random import GeneratorRandomness
    from specdec.tree import shape_parents, shape_widths, static_shape
    from verifiers._tree import recursive_select, tree_walk

    side = static_shape([(0,) * d for d in range(1, 9)] + [(1,), (1, 0), (1, 0, 0), (0, 1), (0, 1, 0)])
    jacobi = JacobiTreeDrafter(10, branch=3, branch_depth=2, tails=3)
    shapes = [(jacobi.parents.tolist(), jacobi.max_children), (shape_parents(side)[0], shape_widths(side))]
    g = torch.Generator().manual_seed(7)
    for parents_list, widths in shapes:
        B, V, N = 256, 6, len(parents_list)
        depth = max(len(widths), 1)
        base = torch.softmax(torch.randn(B, 1, V, generator=g) * 3, -1)
        q = torch.softmax(base.log() + 0.3 * torch.randn(B, N, V, generator=g), -1)
        tokens = torch.distributions.Categorical(q).sample()
        probs = torch.softmax(base.log() + 0.3 * torch.randn(B, N + 1, V, generator=g), -1)
        parents = torch.tensor(parents_list).expand(B, N)
        valid = torch.arange(N)[None] < torch.randint(N // 2, N + 1, (B, 1), generator=g)     # ragged rows
        law = None if one_hot else q

        def walk(select):
            return tree_walk(tokens, parents, valid, law, probs, GeneratorRandomness(torch.Generator().manual_seed(3),
                                                                                     B), depth, widths, select)
        fast, loop = walk(recursive_select), walk(lambda *args: recursive_select(*args))
        assert int(fast.n_accepted.max()) > max(i for i, w in enumerate(widths) if w > 1) + 2   # deep runs tested
        for field in ("n_accepted", "node", "next_token"):
            assert torch.equal(getattr(fast, field), getattr(loop, field)), field
