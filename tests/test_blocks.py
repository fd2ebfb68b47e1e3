"""Block-level routing for block-autoregressive video (SDVG, arXiv 2604.17397): the block loop, the token block
generator, the routers and the scorers, on tiny random GPTs over a (F, H, W) = (4, 2, 2) video grid."""
from __future__ import annotations

import math

import pytest
import torch

import specdec
from specdec import Sampling
from specdec.adapters.video import TokenBlockGenerator, TokenFrameDecoder
from specdec.blocks import draft_only, generate_blocks, quality_retention, score_clip, target_only
from specdec.protocols import BlockDecoder
from specdec.random import RowStreams
from specdec.scorers import ClassScorer, load_scorer
from specdec.zoo.features import FeatureConfig, FeatureNet
from helpers import perturbed_copy, tiny_gpt
from verifiers.router import BlockRouter, RandomRouter

GRID = (4, 2, 2)            # F frames of H x W tokens: 16 tokens per clip
V = 16
COND = torch.tensor([0, 1, 2, 1])
SEED = 7


@pytest.fixture(scope="module")
def models():
    target = tiny_gpt(vocab=V, grid=GRID, sharpen=3.0)
    return target, perturbed_copy(target, 0.8)


def pair(models, frames_per_block=1, sampling=Sampling()):
    target, drafter = models
    return TokenBlockGenerator(target, frames_per_block, sampling), TokenBlockGenerator(drafter, frames_per_block,
                                                                                         sampling)


class Colours:
    """A per-frame decoder: a fixed colour per token. tokens [N, H*W] -> pixels [N, 3, H, W]."""

    def __init__(self):
        self.code = torch.randn(V, 3, generator=torch.Generator().manual_seed(3))

    def decode(self, tokens):
        N = tokens.shape[0]
        return torch.tanh(self.code[tokens]).reshape(N, GRID[1], GRID[2], 3).permute(0, 3, 1, 2)


class RunningSumDecoder(BlockDecoder):
    """A streaming decoder: frames depend on a per-row cache (the running sum of all decoded token ids)."""

    def __init__(self):
        self.cache = None

    def decode(self, latents):
        B, Fb = latents.shape[:2]
        sums = latents.reshape(B, Fb, -1).sum(-1).double()                     # [B, F_b]
        base = torch.zeros(B, dtype=torch.double) if self.cache is None else self.cache
        running = base[:, None] + sums.cumsum(1)
        self.cache = running[:, -1].clone()
        return torch.sin(running)[:, :, None, None, None].expand(B, Fb, 3, 2, 2).float()

    def snapshot(self):
        return None if self.cache is None else self.cache.clone()

    def restore(self, snapshot):
        self.cache = snapshot


class UpsamplingDecoder(RunningSumDecoder):
    """Like a causal video VAE with temporal compression: block 0 gives one pixel frame per latent frame, later
    blocks two (so F_out differs from F_b and between blocks)."""

    def decode(self, latents):
        first = self.cache is None
        frames = super().decode(latents)
        return frames if first else frames.repeat_interleave(2, 1)


class ForgetfulDecoder(RunningSumDecoder):
    """The same decoder with a broken restore: a rejected draft's decode stays in its cache."""

    def restore(self, snapshot):
        pass


def constant(value):
    def scorer(frames, cond):
        return torch.full(frames.shape[:2], float(value))
    return scorer


def row_zero_wins(frames, cond):
    """Row 0 scores 1, every other row 0."""
    return (torch.arange(frames.shape[0]) == 0).float()[:, None].expand(frames.shape[:2]).clone()


TAU = dict(threshold=0.5)           # with the constant scorers: 1 accepts, 0 rejects


# -- the token block generator ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("sampling", [Sampling(), Sampling(cfg_scale=3.0, top_k=8)], ids=["plain", "cfg-topk"])
def test_token_block_generator_with_ar_uniforms_reproduces_plain_ar_sampling(models, sampling):
    """Fed the uniforms the engine's plain AR loop draws (stream "sample", one per token position), block by
    block, the generator must emit specdec.generate's tokens exactly."""
    target = models[0]
    ref = specdec.generate(target, COND, sampling=sampling, seed=SEED, decode=False).tokens
    gen = TokenBlockGenerator(target, 2, sampling)
    state = gen.start(COND)
    u = RowStreams(SEED, torch.arange(4)).uniform_at("sample", torch.arange(16).expand(4, -1))
    out = []
    for block in range(gen.num_blocks):
        lat = gen.generate_block(state, block, u[:, 8 * block: 8 * block + 8])
        assert lat.shape == (4, 2, 2, 2)
        gen.commit_block(state, block, lat)
        out.append(lat.reshape(4, -1))
    assert torch.equal(torch.cat(out, 1), ref)


def test_token_block_generator_commits_another_generators_block(models):
    """Committing the drafter's block to the target must equal a target that generated those tokens itself:
    its next block (same noise) is the same as after teacher-forcing them token by token."""
    tgt, dft = pair(models, 2)
    t_state, d_state = tgt.start(COND), dft.start(COND)
    g = torch.Generator().manual_seed(1)
    noise0, noise1 = tgt.block_noise(t_state, 0, g), tgt.block_noise(t_state, 1, g)
    draft = dft.generate_block(d_state, 0, noise0)
    tgt.generate_block(t_state, 0, noise0)                      # a pending draft of its own, then discarded
    tgt.commit_block(t_state, 0, draft)
    after = tgt.generate_block(t_state, 1, noise1)
    fresh = tgt.start(COND)                                     # reference: feed the draft's tokens one by one
    toks = draft.reshape(4, -1)
    logits = None
    for j in range(toks.shape[1]):
        logits = tgt.model.forward(fresh.model_state, toks[:, j:j + 1])
    fresh.logits, fresh.blocks_done = logits, 1
    assert torch.equal(tgt.generate_block(fresh, 1, noise1), after)


# -- the loop: exactness at the two extremes --------------------------------------------------------------------------
def test_accept_all_returns_the_drafter_clip_exactly(models):
    tgt, dft = pair(models)
    res = generate_blocks(tgt, dft, BlockRouter(**TAU, force_first_reject=False), constant(1.0),
                          TokenFrameDecoder(Colours()), COND, seed=SEED)
    ref = draft_only(dft, TokenFrameDecoder(Colours()), COND, seed=SEED)
    assert torch.equal(res.latents, ref.latents) and torch.equal(res.frames, ref.frames)
    assert res.accepted.all() and res.counts.target_computed == 0 and res.counts.acceptance_rate == 1.0
    assert not torch.equal(res.latents, target_only(tgt, TokenFrameDecoder(Colours()), COND, seed=SEED).latents)


def test_reject_all_returns_the_target_clip_exactly(models):
    tgt, dft = pair(models)
    res = generate_blocks(tgt, dft, BlockRouter(**TAU), constant(0.0), TokenFrameDecoder(Colours()), COND,
                          seed=SEED)
    ref = target_only(tgt, TokenFrameDecoder(Colours()), COND, seed=SEED)
    assert torch.equal(res.latents, ref.latents) and torch.equal(res.frames, ref.frames)
    assert not res.accepted.any()
    B, N = res.accepted.shape
    assert (res.counts.drafted, res.counts.target_generated, res.counts.target_computed) == (B * (N - 1), B * N,
                                                                                             B * N)


def test_mixed_verdicts_are_taken_per_row(models):
    """Row 0 always accepted, the others always rejected: row 0 is the drafter-only clip, the others the
    target-only clips (rows do not interact), and the target computed whole batches."""
    tgt, dft = pair(models)
    dec = TokenFrameDecoder(Colours())
    res = generate_blocks(tgt, dft, BlockRouter(**TAU, force_first_reject=False), row_zero_wins, dec, COND, SEED)
    assert torch.equal(res.latents[0], draft_only(dft, dec, COND, seed=SEED).latents[0])
    assert torch.equal(res.latents[1:], target_only(tgt, dec, COND, seed=SEED).latents[1:])
    assert res.accepted[0].all() and not res.accepted[1:].any()
    assert res.counts.target_computed == 4 * 4 and res.counts.target_generated == 3 * 4


def test_first_block_force_rejected_and_not_drafted(models):
    tgt, dft = pair(models)
    dec = TokenFrameDecoder(Colours())
    res = generate_blocks(tgt, dft, BlockRouter(**TAU), constant(1.0), dec, COND, seed=SEED)
    assert not res.accepted[:, 0].any() and res.accepted[:, 1:].all()
    assert torch.isnan(res.scores[:, 0]).all() and torch.isfinite(res.scores[:, 1:]).all()
    assert res.counts.drafted == 4 * 3 and res.counts.target_computed == 4
    assert torch.equal(res.latents[:, :1], target_only(tgt, dec, COND, seed=SEED).latents[:, :1])


# -- the streaming decoder's cache ------------------------------------------------------------------------------------
@pytest.mark.parametrize("decoder", [RunningSumDecoder, UpsamplingDecoder])
@pytest.mark.parametrize("scorer", [constant(0.0), row_zero_wins], ids=["reject-all", "mixed"])
def test_decoder_cache_is_restored_exactly_after_a_rejection(models, scorer, decoder):
    """After the run, the decoder's cache must be that of decoding the committed latents alone, and its frames
    those of a fresh decoder fed the committed clip block by block; a decoder whose restore is broken fails the
    same comparison (the check has teeth)."""
    tgt, dft = pair(models)
    dec = decoder()
    res = generate_blocks(tgt, dft, BlockRouter(**TAU, force_first_reject=False), scorer, dec, COND, SEED)
    replay = decoder()
    frames = torch.cat([replay.decode(b) for b in res.latents.split(1, 1)], 1)
    assert res.block_frames == ([1, 2, 2, 2] if decoder is UpsamplingDecoder else [1, 1, 1, 1])
    assert res.frame_scores.shape[1] == res.frames.shape[1] == sum(res.block_frames)
    assert torch.equal(dec.cache, replay.cache) and torch.equal(res.frames, frames)
    assert torch.equal(dec.cache, res.latents.reshape(4, -1).sum(-1).double())
    broken = generate_blocks(tgt, dft, BlockRouter(**TAU, force_first_reject=False), scorer, ForgetfulDecoder(),
                             COND, SEED)
    assert not torch.equal(broken.frames, res.frames)


# -- routers ----------------------------------------------------------------------------------------------------------
def test_running_quantile_reaches_its_target_rate_over_200_blocks():
    """Scores ~ N(3, 0.5^2), far above the default prior N(0.566, 1.071^2) whose 0.28-quantile (tau = -0.06)
    would accept ~100 %. Over 200 blocks the empirical quantile must bring acceptance to 0.72 within 0.10:
    3 binomial sd (sqrt(0.72 * 0.28 / 200) = 0.032) plus the warm-up's 5 prior-threshold blocks (<= 0.007)."""
    g = torch.Generator().manual_seed(11)
    scores = 3 + 0.5 * torch.randn(200, 1, 1, generator=g)
    router = BlockRouter(target_accept_rate=0.72)
    acc = torch.stack([router.decide(scores[i], i + 1, g) for i in range(200)])
    assert abs(acc.float().mean().item() - 0.72) < 0.10
    prior_only = BlockRouter(threshold=float(BlockRouter().tau()))
    assert torch.stack([prior_only.decide(scores[i], i + 1) for i in range(200)]).float().mean() > 0.95
    router.reset()
    assert router.tau() == pytest.approx(0.566 + 1.071 * -0.5828, abs=1e-3)     # back to the prior


def test_router_compensates_the_forced_block_and_aggregates_min_or_mean():
    assert BlockRouter(target_accept_rate=0.72, clip_blocks=9).quantile_rate == pytest.approx(0.81)
    assert BlockRouter(target_accept_rate=0.9, clip_blocks=3).quantile_rate == 0.95          # the cap
    s = torch.tensor([[0.9, 0.1], [0.6, 0.5]])
    assert BlockRouter(threshold=0.4).decide(s, 1).tolist() == [False, True]
    assert BlockRouter(threshold=0.4, aggregation="mean").decide(s, 1).tolist() == [True, True]
    assert not BlockRouter(threshold=-1.0).decide(s, 0).any()                                # forced
    router = BlockRouter()
    assert router.lossless is False and router.distortion_bound() is None


def test_random_router_accepts_at_its_rate():
    """2000 rows at rate 0.3: the empirical rate within 4 sd (sqrt(0.3 * 0.7 / 2000) = 0.010) of 0.3."""
    router = RandomRouter(0.3)
    g = torch.Generator().manual_seed(5)
    acc = router.decide(torch.zeros(2000, 3), 1, g)
    assert abs(acc.float().mean().item() - 0.3) < 0.041
    assert not router.decide(torch.zeros(50, 3), 0, g).any()
    with pytest.raises(TypeError, match="torch.Generator"):
        router.decide(torch.zeros(2, 3), 1)


def test_end_to_end_with_the_class_scorer_and_quality_retention(models):
    tgt, dft = pair(models)
    net = FeatureNet(FeatureConfig(num_classes=3, channels=(8, 8), feature_dim=8, image_size=16)).eval()
    scorer = load_scorer("class", features_net=net, image_size=16)
    dec = TokenFrameDecoder(Colours())
    res = generate_blocks(tgt, dft, BlockRouter(target_accept_rate=0.5, warmup_scores=2), scorer, dec, COND, SEED)
    c = res.counts
    assert c.accepted + c.target_generated == c.blocks == 16 and c.drafted == 12
    base = target_only(tgt, dec, COND, seed=SEED)
    spec_scores, base_scores = score_clip(scorer, res.frames, COND, 1), score_clip(scorer, base.frames, COND, 1)
    assert spec_scores.shape == (4, 4) and ((spec_scores >= 0) & (spec_scores <= 1)).all()
    assert torch.equal(score_clip(scorer, res.frames, COND, res.block_frames), spec_scores)
    with pytest.raises(ValueError, match="block_frames"):
        score_clip(scorer, res.frames, COND, [1, 2])
    assert quality_retention(spec_scores, base_scores) == pytest.approx(
        (spec_scores.mean() / base_scores.mean()).item())


def test_class_scorer_gives_a_probability_per_frame():
    net = FeatureNet(FeatureConfig(num_classes=3, channels=(8, 8), feature_dim=8, image_size=16)).eval()
    scorer = ClassScorer(net, 16)
    frames = torch.rand(2, 3, 3, 6, 6) * 2 - 1                 # resized to 16 x 16
    per_class = torch.stack([scorer(frames, torch.full((2,), c)) for c in range(3)])
    assert per_class.shape == (3, 2, 3)
    assert torch.allclose(per_class.sum(0), torch.ones(2, 3), atol=1e-5)


# -- bad input --------------------------------------------------------------------------------------------------------
def test_video_grid_errors(models):
    target = tiny_gpt(vocab=V, grid=GRID)
    with pytest.raises(ValueError, match="divisor"):
        TokenBlockGenerator(target, 3)
    target.num_tokens = 15
    with pytest.raises(ValueError, match="F \\* H \\* W == num_tokens"):
        TokenBlockGenerator(target, 1)
    with pytest.raises(ValueError, match="video grid"):
        TokenBlockGenerator(tiny_gpt(vocab=V, grid=(4, 4)), 1)
    tgt, _ = pair(models)
    state = tgt.start(COND)
    with pytest.raises(ValueError, match="in order"):
        tgt.generate_block(state, 1, torch.rand(4, 4))


def test_router_config_errors():
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="finite"):
            BlockRouter(threshold=bad)
    with pytest.raises(ValueError, match="not both"):
        BlockRouter(threshold=0.1, target_accept_rate=0.5)
    with pytest.raises(ValueError, match="target_accept_rate"):
        BlockRouter(target_accept_rate=1.0)
    with pytest.raises(ValueError, match="aggregation"):
        BlockRouter(aggregation="max")
    with pytest.raises(ValueError, match="finite"):
        BlockRouter(threshold=0.0).decide(torch.tensor([[float("nan")]]), 1)


@pytest.mark.parametrize("scorer, match", [
    (lambda f, c: torch.zeros(f.shape[0]), "returned shape"),
    (lambda f, c: torch.full(f.shape[:2], float("nan")), "non-finite"),
], ids=["wrong-shape", "nan"])
def test_bad_scorer_output_is_a_clear_error(models, scorer, match):
    tgt, dft = pair(models)
    with pytest.raises(ValueError, match=f"scorer .*{match}"):
        generate_blocks(tgt, dft, BlockRouter(**TAU), scorer, TokenFrameDecoder(Colours()), COND, SEED)


def test_load_scorer_resolves_and_checks_user_callables(tmp_path):
    path = tmp_path / "my_scores.py"
    path.write_text("import torch\n"
                    "def flat(frames, cond):\n    return torch.zeros(frames.shape[0])\n"
                    "def good(frames, cond):\n    return frames.mean((2, 3, 4))\n")
    frames = torch.rand(2, 3, 3, 4, 4)
    assert load_scorer(f"{path}:good")(frames, None).shape == (2, 3)
    with pytest.raises(ValueError, match="my_scores.py:flat.*returned shape"):
        load_scorer(f"{path}:flat")(frames, None)
    with pytest.raises(ValueError, match="unknown scorer"):
        load_scorer("imagereward")
    with pytest.raises(ValueError, match="features_net"):
        load_scorer("class")


def test_mismatched_generators_are_clear_errors(models):
    target, drafter = models
    tgt = TokenBlockGenerator(target, 1)
    with pytest.raises(ValueError, match="same blocks"):
        generate_blocks(tgt, TokenBlockGenerator(drafter, 2), BlockRouter(**TAU), constant(1.0),
                        TokenFrameDecoder(Colours()), COND, SEED)
    small = TokenBlockGenerator(tiny_gpt(vocab=V, grid=(4, 1, 2)), 1)
    with pytest.raises(ValueError, match="block noise"):
        generate_blocks(tgt, small, BlockRouter(**TAU), constant(1.0), TokenFrameDecoder(Colours()), COND, SEED)


def test_quality_retention_needs_a_positive_baseline():
    assert quality_retention(torch.tensor([0.4, 0.5]), torch.tensor([0.5, 0.5])) == pytest.approx(0.9)
    with pytest.raises(ValueError, match="<= 0"):
        quality_retention(torch.tensor([0.1]), torch.tensor([-0.2]))
    with pytest.raises(ValueError, match="finite"):
        quality_retention(torch.tensor([math.nan]), torch.tensor([0.5]))


# -- a real streaming decoder: the diffusers adapter (AnyFlow-FAR + Wan VAE), tiny random models -----------------------
@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_routing_over_the_diffusers_video_adapter_and_the_wan_vae():
    """Continuous latents, 4 x temporal upsampling in the VAE (5, 8, 8 pixel frames per block): row 0 always
    accepted, row 1 always rejected -> row 0 is the drafter-only clip, row 1 the target-only clip, frames
    included (the VAE cache restored around every rejection)."""
    pytest.importorskip("diffusers")
    from specdec.adapters.diffusers_vae import WanBlockDecoder
    from specdec.adapters.diffusers_video import (FARBlockConfig, FARBlockGenerator, tiny_components,
                                                  tiny_transformer, TINY_TEXT_DIM)
    comp = tiny_components(seed=0, size="large")
    cfg = FARBlockConfig(num_frames=6, frames_per_block=2, height=4, width=4, num_inference_steps=2,
                         guidance_scale=1.0)
    tgt = FARBlockGenerator(comp["transformer"], comp["scheduler"], cfg)
    dft = FARBlockGenerator(tiny_transformer(seed=1, size="small"), comp["scheduler"], cfg)
    emb = torch.randn(2, 8, TINY_TEXT_DIM, generator=torch.Generator().manual_seed(1))
    res = generate_blocks(tgt, dft, BlockRouter(**TAU, force_first_reject=False), row_zero_wins,
                          WanBlockDecoder(comp["vae"]), emb, SEED)
    alone_t = target_only(tgt, WanBlockDecoder(comp["vae"]), emb, SEED)
    alone_d = draft_only(dft, WanBlockDecoder(comp["vae"]), emb, SEED)
    assert res.block_frames == [5, 8, 8]
    assert torch.equal(res.latents[0], alone_d.latents[0]) and torch.equal(res.frames[0], alone_d.frames[0])
    assert torch.equal(res.latents[1], alone_t.latents[1]) and torch.equal(res.frames[1], alone_t.frames[1])
    assert not torch.equal(alone_t.frames[0], alone_d.frames[0])
