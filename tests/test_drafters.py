"""Training-free drafters: SJD (drafters.jacobi) and grid lookup (drafters.lookup). CPU, tiny random targets,
deterministic counters only (no wall clock)."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import specdec
from drafters.jacobi import JacobiDrafter
from drafters.lookup import LookupDrafter
from specdec import Sampling
from specdec.protocols import DecodeContext
from specdec.random import RowStreams
from helpers import GREEDY, fit_of, perturbed_copy, tiny_gpt

@pytest.fixture(scope="module")
def enumerable():
    """V = 5, T = 4 on a (2, 2) grid: 625 sequences, sharpened so the joint law is far from uniform."""
    return tiny_gpt(vocab=5, grid=(2, 2), dim=32, heads=2, classes=2, sharpen=15.0)


def spy_tail(drafter):
    """Counts [drafted, accepted] draft tokens that came from the last pass's tail (not fresh slots)."""
    counts = torch.zeros(2, dtype=torch.long)
    propose, observe = drafter.propose, drafter.observe
    box = {}

    def p(k):
        ctx = drafter.ctx
        if drafter.prev_n is None:
            box["tail"] = torch.zeros(ctx.n_done.shape[0], k, dtype=torch.bool)
        else:
            box["tail"] = torch.arange(k)[None] + (ctx.n_done - drafter.prev_n)[:, None] <= k
        box["active"] = (ctx.n_done < ctx.num_tokens)[:, None]
        return propose(k)

    def o(verdict, target_probs):
        tail = box["tail"] & box["active"]
        acc = torch.arange(tail.shape[1])[None] < verdict.n_accepted[:, None]
        counts[0] += tail.sum()
        counts[1] += (tail & acc).sum()
        observe(verdict, target_probs)

    drafter.propose, drafter.observe = p, o
    return counts


# 1. Losslessness: sequence-level chi-square against the enumerated joint law -----------------------------------
@pytest.mark.parametrize("init,init_q,window", [("random", "onehot", 3), ("repeat_horizontal", "onehot", 3),
                                                ("repeat_vertical", "onehot", 4), ("random", "uniform", 3)])
def test_jacobi_is_exact(enumerable, init, init_q, window):
    """Tail drafts (stale context, q := p of the last pass) mixed with fresh one-hot/uniform drafts: the output law
    equals plain AR's (chi-square p > 0.001, TVD at the noise level of an exact sampler)."""
    drafter = JacobiDrafter(window, init, init_q=init_q)
    tail = spy_tail(drafter)
    fit, res = fit_of(enumerable, drafter, Sampling())
    assert fit.p_value > 1e-3, str(fit)
    assert fit.tvd < 2 * fit.tvd_noise + 1e-3, str(fit)
    assert 0.05 < res.stats.acceptance_rate < 0.95, res.stats.acceptance_rate
    assert tail[0] > 1000 and 0 < tail[1] < tail[0], tail    # the tail was drafted, and both kept and rejected


def test_jacobi_is_exact_with_cfg_and_top_k(enumerable):
    drafter = JacobiDrafter(3, "repeat_horizontal")
    fit, res = fit_of(enumerable, drafter, Sampling(cfg_scale=2.5, top_k=4))
    assert fit.p_value > 1e-3, str(fit)
    assert 0.05 < res.stats.acceptance_rate < 0.95


def test_lookup_is_exact(enumerable):
    fit, res = fit_of(enumerable, LookupDrafter(k=2), Sampling())
    assert fit.p_value > 1e-3, str(fit)
    assert fit.tvd < 2 * fit.tvd_noise + 1e-3, str(fit)
    assert 0.02 < res.stats.acceptance_rate < 0.95, res.stats.acceptance_rate


def test_model_drafter_argmax_drafts_are_exact(enumerable):
    """Deterministic drafts (x = argmax q, q reported one-hot) with the exact rule: still plain AR's law."""
    from drafters import ModelDrafter

    drafter = ModelDrafter(perturbed_copy(enumerable, noise=0.5), k=2, drafts="argmax")
    fit, res = fit_of(enumerable, drafter, Sampling(cfg_scale=2.0))
    assert fit.p_value > 1e-3, str(fit)
    assert fit.tvd < 2 * fit.tvd_noise + 1e-3, str(fit)
    assert 0.05 < res.stats.acceptance_rate < 0.95, res.stats.acceptance_rate
    with pytest.raises(ValueError, match="drafts must be 'sample'"):
        ModelDrafter(enumerable, k=2, drafts="greedy")


class _DraftWithAcceptUniform(JacobiDrafter):
    """Negative control: samples tail drafts with the rule's "accept" uniform instead of "sample"."""

    def propose(self, k):
        streams = self.ctx.streams
        plain = streams.uniform_at
        streams.uniform_at = lambda tag, pos, slots=None: plain("accept" if tag == "sample" else tag, pos, slots)
        try:
            return super().propose(k)
        finally:
            del streams.uniform_at


class _ShiftedQ(JacobiDrafter):
    """Negative control: the claimed q is the law of the neighbouring slot (an off-by-one tail index)."""

    def propose(self, k):
        draft = super().propose(k)
        if draft.probs is not None:
            draft.probs = torch.roll(draft.probs, 1, dims=1)
        return draft


@pytest.mark.parametrize("broken", [_DraftWithAcceptUniform, _ShiftedQ])
def test_exactness_test_catches_broken_jacobi(enumerable, broken):
    """The chi-square test above has power: reusing the accept uniform for the draft, or a mis-indexed q, fails."""
    fit, _ = fit_of(enumerable, broken(3, "random"), Sampling(), n=5000)
    assert fit.p_value < 1e-6, str(fit)


# 2. Greedy: speculative output == plain AR output, token for token ----------------------------------------------
@pytest.fixture(scope="module")
def greedy_ar(target):
    cond = torch.arange(5) % 3
    return {cfg: specdec.generate(target, cond, sampling=Sampling(temperature=0.0, cfg_scale=cfg), seed=0).tokens
            for cfg in (1.0, 3.0)}


@pytest.mark.parametrize("make,cfg", [(lambda: JacobiDrafter(16, "random"), 1.0),
                                      (lambda: JacobiDrafter(16, "random"), 3.0),
                                      (lambda: JacobiDrafter(5, "repeat_horizontal"), 1.0),
                                      (lambda: JacobiDrafter(7, "repeat_vertical"), 3.0),
                                      (lambda: JacobiDrafter(4, "random", init_q="uniform"), 1.0),
                                      (lambda: LookupDrafter(4), 1.0), (lambda: LookupDrafter(4), 3.0),
                                      (lambda: LookupDrafter(2, sources=("above", "left")), 1.0)])
def test_greedy_equals_ar(target, greedy_ar, make, cfg):
    cond = torch.arange(5) % 3
    spec = specdec.generate(target, cond, drafter=make(), sampling=Sampling(temperature=0.0, cfg_scale=cfg), seed=0)
    assert torch.equal(greedy_ar[cfg], spec.tokens)
    assert spec.stats.committed == 5 * (target.num_tokens - 1)


# 3. Jacobi reuses the tail ----------------------------------------------------------------------------------------
def test_jacobi_tail_is_accepted_on_a_peaked_target():
    """Peaked target (head x10), temperature 1, window 16: tail drafts get accepted, MAL > 1; counters are
    deterministic for the seed."""
    peaked = tiny_gpt(vocab=64, grid=(4, 4), sharpen=10.0)
    cond = torch.tensor([0, 1, 2, 0])
    runs = []
    for _ in range(2):
        drafter = JacobiDrafter(16, "random")
        tail = spy_tail(drafter)
        res = specdec.generate(peaked, cond, drafter=drafter, sampling=Sampling(), seed=0)
        runs.append((res.stats.as_dict(), tail.tolist(), res.tokens))
    (stats, tail, tokens), (stats2, tail2, tokens2) = runs
    assert tail[1] > 0, tail                       # accepted drafts that came from the last pass's tail
    assert stats["mean_accepted_length"] > 1.2, stats
    assert stats["target_forwards"] < 4 * (peaked.num_tokens - 1)
    for key in ("target_forwards", "accepted", "drafted", "committed"):
        assert stats[key] == stats2[key]
    assert tail == tail2 and torch.equal(tokens, tokens2)


def test_jacobi_greedy_converges_faster_than_ar(target):
    res = specdec.generate(target, torch.arange(4) % 3, drafter=JacobiDrafter(16, "repeat_horizontal"),
                           sampling=GREEDY, seed=0)
    assert res.stats.mean_accepted_length > 1.0


# 4. propose() on hand-built contexts --------------------------------------------------------------------------------
def _ctx(n_done, grid=(4, 4), V=32, k=8):
    B = len(n_done)
    T = 1
    for g in grid:
        T *= g
    tokens = torch.arange(T + 3 * k)[None].repeat(B, 1) + torch.arange(B)[:, None]   # token at t of row b: t + b
    return DecodeContext(SimpleNamespace(vocab_size=V), None, Sampling(), tokens % V, torch.tensor(n_done), T,
                         grid, RowStreams(0, torch.arange(B)))


def test_jacobi_tail_indexing_with_ragged_rows():
    """Rows that accepted a = 0, 2, 3 of k = 3 drafts: slot i takes output i + a + 1 of the last pass while that
    exists; the rest are fresh copies of the left neighbour (chained through this step's drafts)."""
    V, k = 32, 3
    drafter = JacobiDrafter(k + 1, "repeat_horizontal")
    ctx = _ctx([2, 5, 7], V=V)
    drafter.start(ctx)
    drafter.prev_n = ctx.n_done.clone()
    law = 20 + torch.arange(k + 1)[None] + torch.arange(3)[:, None]                 # output j of row b: 20 + j + b
    drafter.prev_p = torch.nn.functional.one_hot(law, V).float()
    ctx.n_done += torch.tensor([0, 2, 3]) + 1                                          # n_done = 3, 8, 11
    d = drafter.propose(k)
    # row 0: outputs 1, 2, 3 (all tail). row 1 (n=8): output 3, then copies of it (positions 9, 10 have a left).
    # row 2 (n=11): all fresh: pos 11 <- token 10 (= 12); pos 12 is column 0 -> above, token 8 (= 10); pos 13 <- 12.
    assert d.tokens.tolist() == [[21, 22, 23], [24, 24, 24], [12, 10, 10]]
    assert torch.equal(d.probs[0], drafter.prev_p[0, 1:])
    assert torch.equal(d.probs[1, 0], drafter.prev_p[1, 3])
    assert torch.equal(d.probs[2], torch.nn.functional.one_hot(d.tokens[2], V).float())


def test_jacobi_vertical_and_random_fresh_fill():
    V, k = 32, 6
    ctx = _ctx([2, 5], V=V)
    vert = JacobiDrafter(k + 1, "repeat_vertical")
    vert.start(ctx)
    d = vert.propose(k)
    assert d.probs is None                                      # first step: all fresh, one-hot
    # row 0: positions 2, 3 are on the first grid row -> left (chain: token 1 = 1); 4.. copy 4 back (0, 1, 1, 1)
    assert d.tokens[0].tolist() == [1, 1, 0, 1, 1, 1]
    # row 1 (tokens t + 1): positions 5..10 copy positions 1..6; 5, 6 committed (2, 3), then drafts
    assert d.tokens[1].tolist() == [2, 3, 4, 5, 2, 3]
    rnd = JacobiDrafter(k + 1, "random", init_q="uniform")
    rnd.start(ctx)
    d = rnd.propose(k)
    assert torch.allclose(d.probs, torch.full((2, k, V), 1 / V))
    again = JacobiDrafter(k + 1, "random")
    again.start(ctx)
    assert torch.equal(again.propose(k).tokens, d.tokens)       # keyed by (seed, row, position): reproducible


@pytest.mark.parametrize("init, grid", [("repeat_vertical", (4, 4)), ("repeat_horizontal", (3, 5)),
                                         ("previous_frame", (2, 3, 3))])
def test_jacobi_fresh_fill_equals_slot_by_slot_copies(init, grid):
    """The vectorised fresh fill (pointer doubling through chained copies) equals copying slot by slot, for random
    ragged rows and random fresh masks, windows shorter and longer than a grid row."""
    from drafters.lookup import neighbour, read_token
    gen = torch.Generator().manual_seed(0)
    for k in (1, 2, 5, 15):
        ctx = _ctx(torch.randint(0, 12, (6,), generator=gen).tolist(), grid=grid, V=97, k=k)
        ctx.tokens = torch.randint(0, 97, ctx.tokens.shape, generator=gen)
        drafter = JacobiDrafter(k + 1, init)
        drafter.start(ctx)
        pos = ctx.n_done[:, None] + torch.arange(k)
        fresh = torch.rand(6, k, generator=gen) < 0.6
        tail = torch.randint(0, 97, (6, k), generator=gen)
        expect = tail.clone()
        for j in range(k):
            t = pos[:, j]
            src = t - 1
            for name in reversed(drafter._sources()):
                p_s, ok = neighbour(name, t, drafter.dims)
                src = torch.where(ok, p_s, src)
            expect[:, j] = torch.where(fresh[:, j], read_token(ctx, expect, src), expect[:, j])
        got = torch.where(fresh, drafter._copied_tokens(pos, fresh, tail), tail)
        assert torch.equal(got, expect), (init, k)


def test_lookup_drafts_copy_neighbours_and_chain():
    ctx = _ctx([5, 4], grid=(3, 4))
    left = LookupDrafter(k=4)
    left.start(ctx)
    out = left.propose(4)
    assert out.probs is None
    # row 0 (token at t = t): 5, 6, 7 copy the left token 4 (chained); 8 is column 0 -> next source, above (4)
    assert out.tokens[0].tolist() == [4, 4, 4, 4]
    # row 1 (token = t + 1): position 4 is column 0 -> above (0 -> 1); 5, 6, 7 chain on it
    assert out.tokens[1].tolist() == [1, 1, 1, 1]
    above = LookupDrafter(k=6, sources=("above",))
    ctx = _ctx([4], grid=(3, 4))
    above.start(ctx)
    # positions 4..9 copy 0..5; 8 and 9 copy this step's own drafts at 4 and 5
    assert above.propose(6).tokens[0].tolist() == [0, 1, 2, 3, 0, 1]
    diag = LookupDrafter(k=2, sources=("above_left",))
    ctx = _ctx([5], grid=(3, 4))
    diag.start(ctx)
    assert diag.propose(2).tokens[0].tolist() == [0, 1]
    video = LookupDrafter(k=3, sources=("prev_frame", "left"))
    ctx = _ctx([5], grid=(2, 2, 2))
    video.start(ctx)
    # frame 1 is positions 4..7: 5, 6, 7 copy 1, 2, 3 of frame 0
    assert video.propose(3).tokens[0].tolist() == [1, 2, 3]


def test_lookup_policy_follows_acceptance():
    """After 'above' drafts are accepted and 'left' ones rejected, a row switches to 'above'."""
    ctx = _ctx([5, 5], grid=(3, 4))
    drafter = LookupDrafter(k=2)
    drafter.start(ctx)
    assert drafter.choice().tolist() == [0, 0]
    drafter._used = torch.tensor([[1, 1], [0, 0]])              # row 0 drafted from 'above', row 1 from 'left'
    drafter._n_before = ctx.n_done.clone()
    ctx.n_done += torch.tensor([3, 1])
    drafter.observe(specdec.Verdict(torch.tensor([2, 0]), torch.zeros(2, dtype=torch.long)), torch.zeros(2, 3, 32))
    assert drafter.choice().tolist() == [1, 1]                  # row 0 trusts 'above'; row 1 left 'left'


def test_lookup_accepts_on_a_repetitive_target():
    """A target restricted to 2 tokens produces repetitive grids: copies are accepted, greedy output unchanged."""
    rep = tiny_gpt(vocab=64, grid=(4, 4), sharpen=3.0)
    rep.token_mask = torch.zeros(64, dtype=torch.bool)
    rep.token_mask[:2] = True
    cond = torch.arange(4) % 3
    ar = specdec.generate(rep, cond, sampling=GREEDY, seed=0)
    res = specdec.generate(rep, cond, drafter=LookupDrafter(4), sampling=GREEDY, seed=0)
    assert torch.equal(ar.tokens, res.tokens)
    assert res.stats.mean_accepted_length > 1.5, res.stats.as_dict()


# 5. Batch independence ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("make", [lambda: JacobiDrafter(8, "random"), lambda: JacobiDrafter(6, "repeat_vertical"),
                                  lambda: LookupDrafter(3)])
def test_row_output_does_not_depend_on_its_batch(target, make):
    sampling = Sampling(temperature=1.0, cfg_scale=2.0)
    alone = specdec.generate(target, torch.tensor([1]), drafter=make(), sampling=sampling, seed=5)
    batch = specdec.generate(target, torch.tensor([1, 0, 2, 2, 0, 1]), drafter=make(), sampling=sampling, seed=5)
    assert torch.equal(alone.tokens[0], batch.tokens[0])


# 6. Bad input -----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("window", [1, 0, -3, 2.5, True])
def test_jacobi_window_too_small(window):
    with pytest.raises(ValueError, match="window"):
        JacobiDrafter(window)


def test_jacobi_bad_init():
    with pytest.raises(ValueError, match="repeat_horizontal"):
        JacobiDrafter(4, "repeat-left")
    with pytest.raises(ValueError, match="init_q"):
        JacobiDrafter(4, "random", init_q="gaussian")
    with pytest.raises(ValueError, match="init='random'"):
        JacobiDrafter(4, "repeat_vertical", init_q="uniform")
    assert JacobiDrafter(2).k == 1


def test_grid_must_match_the_generated_tokens(target):
    with pytest.raises(ValueError, match="grid"):
        specdec.generate(target, torch.tensor([0]), drafter=JacobiDrafter(4, "repeat_horizontal"), num_tokens=10)
    with pytest.raises(ValueError, match="grid"):
        specdec.generate(target, torch.tensor([0]), drafter=LookupDrafter(2), num_tokens=10)
    # random init does not read the grid
    specdec.generate(target, torch.tensor([0]), drafter=JacobiDrafter(4, "random"), num_tokens=10, sampling=GREEDY)


def test_lookup_bad_input(target):
    for k in (0, -1, 1.5):
        with pytest.raises(ValueError, match="k"):
            LookupDrafter(k)
    with pytest.raises(ValueError, match="above_left"):
        LookupDrafter(2, sources=("left", "diagonal"))
    with pytest.raises(ValueError, match="at least one"):
        LookupDrafter(2, sources=())
    with pytest.raises(ValueError, match="3-D"):
        specdec.generate(target, torch.tensor([0]), drafter=LookupDrafter(2, sources=("prev_frame",)))


def test_model_drafter_with_its_own_guidance_is_exact(enumerable):
    """draft_cfg=1.0: the drafter drafts unguided while the target samples with CFG; still plain AR's law."""
    from drafters import ModelDrafter

    drafter = ModelDrafter(perturbed_copy(enumerable, noise=0.5), k=2, draft_cfg=1.0)
    fit, res = fit_of(enumerable, drafter, Sampling(cfg_scale=2.0))
    assert fit.p_value > 1e-3, str(fit)
    assert fit.tvd < 2 * fit.tvd_noise + 1e-3, str(fit)
    assert 0.05 < res.stats.acceptance_rate < 0.95, res.stats.acceptance_rate


def test_drafter_without_unconditional_path_is_named(target):
    from drafters import ModelDrafter

    unguided = perturbed_copy(target, noise=0.1)
    unguided.supports_cfg = False
    with pytest.raises(ValueError, match="drafter's model .* draft_cfg=1.0"):
        specdec.generate(target, torch.tensor([0]), drafter=ModelDrafter(unguided, k=2),
                         sampling=Sampling(cfg_scale=3.0))
    res = specdec.generate(target, torch.tensor([0]), drafter=ModelDrafter(unguided, k=2, draft_cfg=1.0),
                           sampling=Sampling(cfg_scale=3.0), seed=0)
    assert res.stats.target_forwards_per_image < target.num_tokens - 1
    with pytest.raises(ValueError, match="draft_cfg"):
        ModelDrafter(unguided, k=2, draft_cfg=float("inf"))


def test_batched_uniforms_equal_separate_draws():
    """A step draws several streams at once (`uniforms_at`, `draw_uniforms`): bit for bit the separate draws, for the
    engine's counter-based streams (any count) and, call for call in order, for a generator-backed rng."""
    from specdec.random import GeneratorRandomness, draw_uniforms

    streams = RowStreams(11, torch.arange(3))
    pos = torch.randint(0, 500, (3, 6))
    tags = ("sample", "mc_keep/4", "mc_residual/4")
    both = streams.uniforms_at(tags, pos)
    assert all(torch.equal(both[i], streams.uniform_at(t, pos)) for i, t in enumerate(tags))
    assert torch.equal(streams.uniforms_at(tags, pos, slots=5)[2], streams.uniform_at(tags[2], pos, slots=5))
    requests = [("accept", 4), ("sample", 5), ("residual", 5)]
    step = streams.at(torch.tensor([3, 10, 40]))
    drawn = draw_uniforms(step, requests)
    assert all(torch.equal(u, step.uniform(tag, n)) for u, (tag, n) in zip(drawn, requests))
    drawn = draw_uniforms(GeneratorRandomness(torch.Generator().manual_seed(2), 3), requests)
    plain = GeneratorRandomness(torch.Generator().manual_seed(2), 3)
    assert all(torch.equal(u, plain.uniform(tag, n)) for u, (tag, n) in zip(drawn, requests))
