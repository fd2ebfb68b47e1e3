"""EAGLE feature drafting: hidden states from every adapter, the head's features, losslessness, bad input."""
from __future__ import annotations

import pytest
import torch

import specdec
from drafters.eagle import EagleDrafter, EagleDynamicTreeDrafter, EagleTreeDrafter, eagle
from specdec import Sampling
from specdec.models.eagle import EagleConfig, EagleHead
from helpers import GREEDY, fit_of, tiny_gpt


def head_for(target, seed: int = 0, layers: int = 1) -> EagleHead:
    torch.manual_seed(seed)
    cfg = target.model.cfg
    return EagleHead(EagleConfig(dim=cfg.dim, n_heads=cfg.n_heads, n_layers=layers)).eval()


def gpt_features(gpt, cls: int, tokens: torch.Tensor) -> torch.Tensor:
    """Teacher-forced target features h_0..h_{n-1} [n, H] of tokens x_0..x_{n-1} for one row (no cache)."""
    x = torch.cat([gpt.cls_emb(torch.tensor([cls]))[:, None], gpt.tok_emb(tokens[None, :-1])], 1)
    return gpt.trunk(x, torch.arange(x.shape[1])[None], None)[0]


@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
def test_hidden_states_of_the_own_gpt_equal_a_teacher_forced_trunk(cfg_scale):
    target = tiny_gpt(vocab=16, grid=(3, 3), dim=32, heads=2, classes=3)
    state, first = target.start(torch.tensor([0, 2]), Sampling(cfg_scale=cfg_scale), 12, hidden=True)
    tokens = torch.tensor([[3, 5, 7, 1], [2, 2, 9, 4]])
    out = target.forward(state, tokens)
    assert first.hidden.shape == (2, 1, 32) and out.hidden.shape == (2, 4, 32)
    for b, c in enumerate([0, 2]):
        ref = gpt_features(target.model, c, torch.cat([tokens[b], tokens[b, :1]]))     # h_0..h_4
        torch.testing.assert_close(torch.cat([first.hidden[b], out.hidden[b]]), ref, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(out.hidden[b] @ target.output_embeddings.T, out.cond[b], atol=1e-4, rtol=1e-4)
    plain, _ = target.start(torch.tensor([0]), Sampling(), 12)
    assert target.forward(plain, tokens[:1]).hidden is None          # only on request


def test_hidden_states_of_llamagen_and_transformers_feed_their_heads():
    from helpers import tiny_hf_target
    from specdec.adapters.llamagen import LlamaGenAdapter
    from specdec.models.llamagen import LlamaGenConfig, LlamaGenGPT

    torch.manual_seed(0)
    lg = LlamaGenAdapter(LlamaGenGPT(LlamaGenConfig(dim=32, n_layer=2, n_head=2, vocab_size=24, num_classes=3,
                                                    block_size=9)))
    hf = tiny_hf_target()
    for target, cond in ((lg, torch.tensor([0, 1])), (hf, torch.tensor([0, 1]))):
        state, first = target.start(cond, Sampling(cfg_scale=2.0), 8, hidden=True)
        out = target.forward(state, torch.tensor([[1, 2], [3, 0]]))
        assert out.hidden.shape == (2, 2, target.hidden_size) and first.hidden.shape == (2, 1, target.hidden_size)
        torch.testing.assert_close((out.hidden @ target.output_embeddings.T).float(), out.cond, atol=1e-4,
                                   rtol=1e-4)


class CheckedEagle(EagleDrafter):
    """Compares every catch-up feed with a teacher-forced recompute: target features from the trunk without a
    cache, then the head over all committed pairs without a cache."""

    checked = 0

    def feed_root(self):
        logits = super().feed_root()
        gpt, head = self.ctx.target.model, self.model.head
        for b in range(self.ctx.n_done.shape[0]):
            n = int(self.ctx.n_done[b])
            if n > self.ctx.num_tokens - 1:
                continue
            tokens = self.ctx.tokens[b, :n]
            feats = gpt_features(gpt, int(self.ctx.cond[b]), torch.cat([tokens, tokens[:1]]))[:n]
            pred = head(feats[None], gpt.tok_emb(tokens)[None], torch.arange(n)[None])[0, -1]
            torch.testing.assert_close(logits.cond[b, 0], pred @ gpt.head.weight.T, atol=1e-4, rtol=1e-4)
            CheckedEagle.checked += 1
        return logits


@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
def test_the_head_reads_the_targets_true_features_of_every_committed_token(cfg_scale):
    target = tiny_gpt(vocab=16, grid=(4, 4), dim=32, heads=2, classes=3, sharpen=4.0)
    CheckedEagle.checked = 0
    res = specdec.generate(target, torch.tensor([0, 1, 2]), drafter=CheckedEagle(head_for(target), k=3),
                           sampling=Sampling(cfg_scale=cfg_scale), seed=3)
    assert CheckedEagle.checked >= res.stats.steps


@pytest.mark.parametrize("make", [lambda h: EagleDrafter(h, k=3, drafts="argmax"),
                                  lambda h: EagleTreeDrafter(h, "binary-3", drafts="argmax"),
                                  lambda h: EagleDynamicTreeDrafter(h, top_k=3, depth=3, total_tokens=9)])
def test_greedy_eagle_decoding_equals_greedy_ar(target, make):
    cond = torch.tensor([0, 1, 2, 1])
    ar = specdec.generate(target, cond, sampling=GREEDY, seed=0)
    spec = specdec.generate(target, cond, drafter=make(head_for(target)), sampling=GREEDY)
    assert torch.equal(ar.tokens, spec.tokens)


def test_a_static_eagle_chain_tree_drafts_what_the_eagle_chain_drafts(target):
    """The tree path (parent features by slot) and the chain path (previous slot) give the same argmax drafts."""
    cond = torch.tensor([0, 1, 2])
    s = Sampling(cfg_scale=2.0)
    chain = specdec.generate(target, cond, drafter=EagleDrafter(head_for(target), k=3, drafts="argmax"),
                             sampling=s, seed=5)
    tree = specdec.generate(target, cond, drafter=EagleTreeDrafter(head_for(target), "chain-3", drafts="argmax"),
                            sampling=s, seed=5)
    assert torch.equal(chain.tokens, tree.tokens)
    assert torch.equal(chain.stats.acceptance_map, tree.stats.acceptance_map)


@pytest.mark.parametrize("tree,drafts", [("chain", None), ("static:binary-2", None), ("dynamic", None),
                                         ("dynamic", "sample")])
def test_eagle_decoding_is_exact(tree, drafts):
    """Sequence-level chi-square against the enumerated joint law (V = 5, T = 4), with CFG."""
    target = tiny_gpt(vocab=5, grid=(2, 2), dim=32, heads=2, classes=2, sharpen=15.0)
    params = {"top_k": 2, "total_tokens": 5, "k": 2} if tree == "dynamic" else {"k": 3}
    drafter = eagle(head_for(target, seed=1), tree=tree, drafts=drafts, **params)
    fit, res = fit_of(target, drafter, Sampling(cfg_scale=2.0), n=12000)
    assert fit.p_value > 1e-3, str(fit)
    assert fit.tvd < 2 * fit.tvd_noise + 1e-3, str(fit)
    assert res.stats.accepted > 0


@pytest.mark.parametrize("tree", ["chain", "static:binary-2", "dynamic"])
def test_compiled_eagle_drafts_what_the_eager_one_drafts(target, tree):
    """A chain's draft token and a tree's level feeds, compiled: the same drafts, token for token."""
    cond, s = torch.tensor([0, 1, 2]), Sampling(cfg_scale=2.0)
    head = head_for(target)
    params = {"top_k": 2, "total_tokens": 5, "k": 2, "drafts": "sample"} if tree == "dynamic" else {"k": 3}
    eager = specdec.generate(target, cond, drafter=eagle(head, tree=tree, **params), sampling=s, seed=7)
    fast = specdec.generate(target, cond, drafter=eagle(head, tree=tree, compile=True, **params), sampling=s,
                            seed=7)
    assert torch.equal(eager.tokens, fast.tokens) and 0 < eager.stats.acceptance_rate < 1
    assert fast.stats.target_forwards == eager.stats.target_forwards


def test_eagle_bad_input_is_named(target):
    other = tiny_gpt(vocab=64, grid=(4, 4), dim=48, heads=2, classes=3)
    with pytest.raises(ValueError, match="hidden size 64"):
        specdec.generate(target, torch.tensor([0]), drafter=EagleDrafter(head_for(other)))
    with pytest.raises(ValueError, match="'chain', 'static:<shape>'"):
        eagle(head_for(target), tree="banyan")
    with pytest.raises(TypeError, match="EagleHead"):
        EagleDrafter(target)

    blind = type(target)(target.model, grid=target.grid)
    blind.hidden_size = 0                   # an adapter that cannot expose its hidden states
    with pytest.raises(ValueError, match="does not expose"):
        specdec.generate(blind, torch.tensor([0]), drafter=EagleDrafter(head_for(target)))


def test_eagle_from_the_registry_and_a_bench_config():
    from specdec.registry import make_drafter
    from specdec.testing import tiny_random_bundle

    bundle = tiny_random_bundle()
    for tree in ("chain", "static:spine-3", "dynamic"):
        drafter = make_drafter("eagle", bundle, tree=tree, k=3, top_k=3, total_tokens=12)
        res = specdec.generate(bundle.target, torch.tensor([0, 1]), drafter=drafter, sampling=Sampling(cfg_scale=3.0),
                               seed=0, decode=False)
        assert res.tokens.shape == (2, 16)


def test_unrolled_training_forward_equals_drafting_context():
    """The training-time test's masked forward gives, at every depth, exactly what drafting computes: the true pairs
    up to the last committed one, then the head's own chain of predictions, one autoregressive call per draft."""
    from specdec.models.eagle import unrolled, unrolled_mask

    torch.manual_seed(0)
    head = EagleHead(EagleConfig(dim=32, n_heads=4, n_layers=2, max_len=16)).eval()
    n, levels = 7, 3
    h, emb = torch.randn(2, n, 32), torch.randn(2, n, 32)
    with torch.no_grad():
        preds = unrolled(head, h, emb, levels)                          # [L, B, n, H]
        assert preds.shape == (levels, 2, n, 32)
        for last_true in range(n):
            feats, out = list(h[:, :last_true + 1].unbind(1)), []
            for depth in range(levels):
                t = last_true + depth
                if t >= n:
                    break
                y = head(torch.stack(feats, 1), emb[:, :t + 1], torch.arange(t + 1).expand(2, -1))[:, -1]
                torch.testing.assert_close(preds[depth, :, t], y, rtol=1e-5, atol=1e-5)
                feats.append(y)                                        # the next draft reads this prediction
    mask = unrolled_mask(n, levels)
    assert mask.shape == (levels * n, levels * n) and mask.any(-1).all()   # no row without a key
    assert torch.equal(mask[:n, :n], torch.ones(n, n).tril().bool()) and not mask[:n, n:].any()
    with pytest.raises(ValueError, match="levels >= 1"):
        unrolled(head, h, emb, 0)
