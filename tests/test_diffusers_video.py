"""The diffusers video adapter (AnyFlow-FAR + Wan VAE) on tiny random models: block-by-block generation through the
adapter reproduces the pipeline's own output bit for bit from the same noises; a block made by the small model
enters the large model's context exactly as the pipeline's conditioning prefix does; the streaming decoder's
snapshot / restore is exact; bad input fails with a message that names the fix."""
import sys

import pytest
import torch

pytest.importorskip("diffusers")

from diffusers import AnyFlowFARPipeline  # noqa: E402

from specdec.adapters.diffusers_vae import WanBlockDecoder  # noqa: E402
from specdec.adapters.diffusers_video import (FARBlockConfig, FARBlockGenerator, require_diffusers,  # noqa: E402
                                              tiny_components, tiny_transformer, TINY_TEXT_DIM)
from specdec.protocols import BlockDecoder, BlockGenerator  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

B, L = 2, 8
F, FB, H, W = 6, 2, 4, 4             # 3 blocks; with full_chunk_limit 2 the last block reads a compressed chunk
PIXEL_FRAMES = 4 * (F - 1) + 1       # Wan VAE: 4x in time, causal first frame
EXACT = dict(rtol=0.0, atol=0.0)     # same operations in the same order: the outputs must be identical


@pytest.fixture(scope="module")
def large():
    comp = tiny_components(seed=0, size="large")
    pipe = AnyFlowFARPipeline(tokenizer=None, text_encoder=None, **comp)
    pipe.set_progress_bar_config(disable=True)
    return comp, pipe


@pytest.fixture(scope="module")
def embeds():
    g = torch.Generator().manual_seed(1)
    return torch.randn(B, L, TINY_TEXT_DIM, generator=g), torch.randn(B, L, TINY_TEXT_DIM, generator=g)


def config(guidance: float) -> FARBlockConfig:
    return FARBlockConfig(num_frames=F, frames_per_block=FB, height=H, width=W, num_inference_steps=2,
                          guidance_scale=guidance)


def cond_for(embeds, guidance):
    return embeds if guidance > 1 else embeds[0]


def pipe_call(pipe, embeds, guidance, noises, output_type, **kw):
    """The pipeline's own generation from x_T = the blocks' noises, uniform chunks of FB latent frames."""
    neg = dict(negative_prompt_embeds=embeds[1]) if guidance > 1 else {}
    x_T = torch.cat(noises, 1).permute(0, 2, 1, 3, 4)          # [B, C, F, h, w], the pipeline's layout
    return pipe(prompt_embeds=embeds[0], guidance_scale=guidance, height=8 * H, width=8 * W,
                num_frames=PIXEL_FRAMES, num_inference_steps=2, latents=x_T, chunk_partition=[FB] * (F // FB),
                output_type=output_type, **neg, **kw).frames


def run_blocks(gen, cond, noise_seed, decoder=None):
    """Generate and commit every block -> (latents per block, noises per block, frames per block)."""
    state, g = gen.start(cond), torch.Generator().manual_seed(noise_seed)
    lats, noises, frames = [], [], []
    for b in range(gen.num_frames // gen.frames_per_block):
        noise = gen.block_noise(state, b, g)
        lat = gen.generate_block(state, b, noise)
        gen.commit_block(state, b, lat)
        lats.append(lat), noises.append(noise)
        if decoder is not None:
            frames.append(decoder.decode(lat))
    return lats, noises, frames


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_blocks_through_adapter_equal_pipeline_output(large, embeds, guidance):
    comp, pipe = large
    gen = FARBlockGenerator(comp["transformer"], comp["scheduler"], config(guidance))
    dec = WanBlockDecoder(comp["vae"])
    assert isinstance(gen, BlockGenerator) and isinstance(dec, BlockDecoder)
    lats, noises, frames = run_blocks(gen, cond_for(embeds, guidance), noise_seed=7, decoder=dec)

    ref_latents = pipe_call(pipe, embeds, guidance, noises, "latent").permute(0, 2, 1, 3, 4)
    torch.testing.assert_close(torch.cat(lats, 1), ref_latents, **EXACT)
    ref_video = pipe_call(pipe, embeds, guidance, noises, "pt")               # [B, 21, 3, 32, 32] in [0, 1]
    video = (torch.cat(frames, 1) / 2 + 0.5).clamp(0, 1)                       # the pipeline's postprocess
    assert [f.shape[1] for f in frames] == [4 * FB - 3, 4 * FB, 4 * FB]
    torch.testing.assert_close(video, ref_video, **EXACT)
    assert ref_video.std() > 1e-3                                              # not a constant clip
    # the blocks depend on their context: a later block differs from the same noise denoised without it
    fresh = FARBlockGenerator(comp["transformer"], comp["scheduler"], config(guidance))
    alone = fresh.generate_block(fresh.start(cond_for(embeds, guidance)), 0, noises[2])
    assert not torch.allclose(alone, lats[2], atol=1e-4)


def test_generate_block_only_reads_the_cache(large, embeds):
    comp, _ = large
    gen = FARBlockGenerator(comp["transformer"], comp["scheduler"], config(3.0))
    state, g = gen.start(embeds), torch.Generator().manual_seed(3)
    gen.commit_block(state, 0, gen.generate_block(state, 0, gen.block_noise(state, 0, g)))
    before = {k: {n: t.clone() for n, t in v.items()} for k, v in state.kv_cache.items()}
    noise = gen.block_noise(state, 1, g)
    first, second = gen.generate_block(state, 1, noise), gen.generate_block(state, 1, noise)
    torch.testing.assert_close(first, second, **EXACT)
    for k, v in state.kv_cache.items():
        for n, t in v.items():
            torch.testing.assert_close(t, before[k][n], **EXACT)
    assert state.committed == 1


def test_small_draft_enters_large_context_like_pipeline_prefix(large, embeds):
    """SDVG's accepted draft: the small model drafts block 0 from the large model's noise, the large model commits
    it and goes on. Its blocks 1, 2 must equal the pipeline's generation conditioned on that block as prefix."""
    comp, pipe = large
    cfg = config(3.0)
    target = FARBlockGenerator(comp["transformer"], comp["scheduler"], cfg)
    drafter = FARBlockGenerator(tiny_transformer(seed=1, size="small"), comp["scheduler"], cfg)
    assert drafter.channels == target.channels == comp["vae"].config.z_dim          # one latent space
    t_state, d_state, g = target.start(embeds), drafter.start(embeds), torch.Generator().manual_seed(11)
    noises = [target.block_noise(t_state, 0, g)]
    draft = drafter.generate_block(d_state, 0, noises[0])
    assert draft.shape == noises[0].shape
    assert not torch.allclose(draft, target.generate_block(t_state, 0, noises[0]), atol=1e-3)
    drafter.commit_block(d_state, 0, draft)
    target.commit_block(t_state, 0, draft)
    lats = []
    for b in (1, 2):
        noises.append(target.block_noise(t_state, b, g))
        lats.append(target.generate_block(t_state, b, noises[b]))
        target.commit_block(t_state, b, lats[-1])
    ref = pipe_call(pipe, embeds, 3.0, noises, "latent", video_latents=draft).permute(0, 2, 1, 3, 4)
    torch.testing.assert_close(ref[:, :FB], draft, **EXACT)
    torch.testing.assert_close(torch.cat(lats, 1), ref[:, FB:], **EXACT)
    # the drafter accepts the same noises and its own context the same way
    assert drafter.block_noise(d_state, 1, torch.Generator().manual_seed(0)).shape == noises[1].shape


def test_decoder_snapshot_restore_is_exact(large):
    comp, _ = large
    g = torch.Generator().manual_seed(5)
    blocks = [torch.randn(B, FB, 16, H, W, generator=g) for _ in range(3)]
    draft = torch.randn(B, FB, 16, H, W, generator=g)
    straight = WanBlockDecoder(comp["vae"])
    want = [straight.decode(z) for z in blocks]

    dec = WanBlockDecoder(comp["vae"])
    dec.decode(blocks[0])
    snap = dec.snapshot()
    rejected = dec.decode(draft)                      # advances the cache with the draft ...
    assert not torch.allclose(rejected, want[1], atol=1e-4)
    dec.restore(snap)                                 # ... and the restore undoes it
    torch.testing.assert_close(dec.decode(blocks[1]), want[1], **EXACT)
    dec.restore(snap)                                 # the snapshot survives a restore and a decode
    torch.testing.assert_close(dec.decode(blocks[1]), want[1], **EXACT)
    torch.testing.assert_close(dec.decode(blocks[2]), want[2], **EXACT)
    dec.reset()
    torch.testing.assert_close(dec.decode(blocks[0]), want[0], **EXACT)


def test_bad_input_names_the_fix(large, embeds, monkeypatch):
    comp, _ = large
    with pytest.raises(ValueError, match="must divide num_frames"):
        FARBlockConfig(num_frames=5, frames_per_block=2)
    with pytest.raises(ValueError, match="guidance_scale must be >= 1"):
        FARBlockConfig(guidance_scale=0.5)
    with pytest.raises(ValueError, match="multiple of the transformer's compressed_patch_size"):
        FARBlockGenerator(comp["transformer"], comp["scheduler"], FARBlockConfig(height=6, width=4))
    with pytest.raises(TypeError, match="AnyFlowFARTransformer3DModel"):
        FARBlockGenerator(comp["vae"], comp["scheduler"])
    with pytest.raises(TypeError, match="FlowMapEulerDiscreteScheduler"):
        FARBlockGenerator(comp["transformer"], None)
    gen = FARBlockGenerator(comp["transformer"], comp["scheduler"], config(3.0))
    with pytest.raises(ValueError, match="negative_prompt_embeds"):
        gen.start(embeds[0])
    with pytest.raises(ValueError, match=r"\[B, L, 32\]"):
        gen.start((embeds[0][..., :8], embeds[1][..., :8]))
    state = gen.start(embeds)
    noise = gen.block_noise(state, 0, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="next is block 0"):
        gen.generate_block(state, 1, noise)
    with pytest.raises(ValueError, match=r"noise must be a float tensor \[B, F_b, C, h, w\]"):
        gen.generate_block(state, 0, noise[:, :1])
    with pytest.raises(ValueError, match="next is block 0"):
        gen.commit_block(state, 2, noise)
    with pytest.raises(ValueError, match="z_dim channels"):
        WanBlockDecoder(comp["vae"]).decode(torch.zeros(B, FB, 4, H, W))
    with pytest.raises(TypeError, match="AutoencoderKLWan"):
        WanBlockDecoder(comp["transformer"])
    monkeypatch.setitem(sys.modules, "diffusers", None)           # as if diffusers were not installed
    with pytest.raises(ImportError, match=r"pip install -e '\.\[video\]'"):
        require_diffusers()
