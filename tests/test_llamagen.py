"""LlamaGen: own GPT + VQ with the official key layout, the adapter, greedy/speculative equality, exactness."""
from __future__ import annotations

import pytest
import torch

import specdec
from drafters import ModelDrafter
from specdec.adapters.llamagen import LlamaGenAdapter, from_checkpoint
from specdec.models.llamagen import LlamaGenConfig, LlamaGenGPT, LlamaGenVQ, VQConfig
from helpers import fit_of


def tiny(seed=0, model_type="c2i", vocab=48, side=4, dim=64, layers=2, heads=4, kv=None, cls=1, classes=5):
    torch.manual_seed(seed)
    cfg = LlamaGenConfig(dim=dim, n_layer=layers, n_head=heads, n_kv_head=kv, multiple_of=32, vocab_size=vocab,
                         num_classes=classes, block_size=side * side, cls_token_num=cls, model_type=model_type,
                         caption_dim=24, caption_token_num=cls if model_type == "t2i" else 120)
    model = LlamaGenGPT(cfg)
    with torch.no_grad():   # the official init zeroes the head: give it a spread so argmax has no ties
        model.output.weight.normal_(std=1.0)
    return model.eval()


def tiny_vq(vocab=48):
    torch.manual_seed(0)
    return LlamaGenVQ(VQConfig(codebook_size=vocab, ch=32, ch_mult=(1, 1, 2, 2, 4), z_channels=32,
                               num_res_blocks=1)).eval()


@torch.no_grad()
def reference_greedy(model: LlamaGenGPT, cond, cfg_scale: float, T: int, mask=None):
    """LlamaGen's decoding semantics as a plain loop: full recompute every step (no cache), CFG rows doubled with
    the null condition, logits mixed uncond + s * (cond - uncond), argmax."""
    B = cond.shape[0]
    if cfg_scale != 1.0:
        cond = torch.cat([cond, model.null_condition(cond)])
        mask = None if mask is None else torch.cat([mask, mask])
    seq = torch.zeros(cond.shape[0], 0, dtype=torch.long)
    for _ in range(T):
        logits = model(seq, cond, mask)[:, -1]
        if cfg_scale != 1.0:
            c, u = logits[:B], logits[B:]
            logits = u + cfg_scale * (c - u)
        nxt = logits.argmax(-1)
        seq = torch.cat([seq, (torch.cat([nxt, nxt]) if cfg_scale != 1.0 else nxt)[:, None]], 1)
    return seq[:B]


@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
def test_c2i_greedy_matches_reference_and_speculative(cfg_scale):
    target = LlamaGenAdapter(tiny(0, kv=2))
    cond = torch.tensor([0, 3, 4])
    greedy = specdec.Sampling(temperature=0, cfg_scale=cfg_scale)
    ref = reference_greedy(target.model, cond, cfg_scale, target.num_tokens)
    plain = specdec.generate(target, cond, sampling=greedy)
    assert torch.equal(plain.tokens, ref)

    drafter = LlamaGenAdapter(tiny(7, dim=32, layers=1, heads=2))          # unrelated, smaller
    spec = specdec.generate(target, cond, drafter=ModelDrafter(drafter, k=3), sampling=greedy)
    assert torch.equal(spec.tokens, ref)
    assert spec.stats.target_forwards < plain.stats.target_forwards or spec.stats.accepted == 0

    self_spec = specdec.generate(target, cond, drafter=ModelDrafter(target, k=4), sampling=greedy)
    assert torch.equal(self_spec.tokens, ref)
    assert self_spec.stats.acceptance_rate == 1.0


def test_t2i_greedy_with_padded_captions():
    model = tiny(1, model_type="t2i", cls=5)
    torch.manual_seed(3)
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]).bool()
    feats = torch.randn(2, 5, 24) * mask[..., None]
    target = LlamaGenAdapter(model)
    for s in (1.0, 2.5):
        ref = reference_greedy(model, feats, s, target.num_tokens, mask)
        out = specdec.generate(target, (feats, mask), drafter=ModelDrafter(target, k=3),
                               sampling=specdec.Sampling(temperature=0, cfg_scale=s))
        assert torch.equal(out.tokens, ref)
        assert out.stats.acceptance_rate == 1.0


def test_sampling_is_exact_with_cfg():
    """Speculative sampling with an unrelated drafter reproduces the joint law of plain AR sampling."""
    target = LlamaGenAdapter(tiny(2, vocab=4, side=2, dim=32, layers=1, heads=2))
    drafter = LlamaGenAdapter(tiny(9, vocab=4, side=2, dim=32, layers=1, heads=2))
    sampling = specdec.Sampling(temperature=1.0, cfg_scale=2.0)
    report, out = fit_of(target, ModelDrafter(drafter, k=2), sampling, n=20000, seed=0)
    assert report.p_value > 1e-3, str(report)
    assert 0 < out.stats.acceptance_rate < 1


def _official_state(model):
    """What an official checkpoint holds: our state dict IS the official key layout (names and shapes)."""
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_official_key_layout_and_strict_load(tmp_path):
    model = tiny(0)
    state = _official_state(model)
    expected = {"cls_embedding.embedding_table.weight", "tok_embeddings.weight", "norm.weight", "output.weight",
                "layers.0.attention.wqkv.weight", "layers.0.attention.wo.weight",
                "layers.0.feed_forward.w1.weight", "layers.0.feed_forward.w2.weight",
                "layers.0.feed_forward.w3.weight", "layers.0.attention_norm.weight", "layers.0.ffn_norm.weight"}
    assert expected <= set(state)
    assert state["cls_embedding.embedding_table.weight"].shape == (5 + 1, 64)    # + the null class
    # real sizes: GPT-B's SwiGLU width and the VQ-16 codebook
    assert LlamaGenConfig.named("GPT-B").hidden == 2048
    vq_keys = LlamaGenVQ(VQConfig()).state_dict()
    assert vq_keys["quantize.embedding.weight"].shape == (16384, 8)
    assert "decoder.conv_blocks.0.upsample.conv.weight" in vq_keys and "encoder.conv_blocks.0.downsample.conv.weight" in vq_keys
    assert vq_keys["quantize.codebook_used"].shape == (65536,)

    fresh = LlamaGenGPT(model.cfg)
    fresh.load_state_dict(state, strict=True)
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, state[k])


def test_from_checkpoint_roundtrip_and_errors(tmp_path):
    small = dict(dim=64, n_layer=2, n_head=4, multiple_of=32)
    cfg = LlamaGenConfig(vocab_size=48, num_classes=5, block_size=16, **small)
    torch.manual_seed(0)
    gpt = LlamaGenGPT(cfg)
    vq = tiny_vq(48)
    torch.save({"model": gpt.state_dict(), "steps": 10}, tmp_path / "gpt.pt")
    from safetensors.torch import save_file
    save_file(vq.state_dict(), str(tmp_path / "vq.safetensors"))

    # GPT-B-sized names are validated; a tiny config passes through **config overrides
    with pytest.raises(ValueError, match="GPT-B"):
        from_checkpoint(tmp_path / "gpt.pt", model="GPT-Q")
    with pytest.raises(ValueError, match="256"):
        from_checkpoint(tmp_path / "gpt.pt", image_size=300)
    with pytest.raises(ValueError) as err:                           # real GPT-B: nothing fits
        from_checkpoint(tmp_path / "gpt.pt", model="GPT-B", vocab_size=48, num_classes=5)
    assert "shape mismatch" in str(err.value) and "tok_embeddings.weight" in str(err.value)
    assert "missing keys" in str(err.value) and "layers.11" in str(err.value)

    bad = dict(gpt.state_dict())
    bad["tok_embeddings.weight"] = torch.zeros(10, 64)
    bad["layers.0.extra.weight"] = torch.zeros(1)
    del bad["norm.weight"]
    with pytest.raises(ValueError) as err:
        from specdec.models.llamagen import load_checked
        load_checked(LlamaGenGPT(cfg), bad)
    msg = str(err.value)
    assert "tok_embeddings.weight: checkpoint (10, 64) vs model (48, 64)" in msg
    assert "missing keys: norm.weight" in msg and "unexpected keys: layers.0.extra.weight" in msg


def test_from_checkpoint_loads_and_decodes(tmp_path):
    """The real loading path (files, named sizes with overrides) and VQ decoding to pixels of the right shape."""
    small = dict(n_layer=2, n_head=4, dim=64, multiple_of=32)
    torch.manual_seed(0)
    gpt = LlamaGenGPT(LlamaGenConfig(vocab_size=48, num_classes=5, block_size=16, **small))
    vq = tiny_vq(48)
    torch.save({"model": gpt.state_dict()}, tmp_path / "gpt.pt")
    torch.save({"model": vq.state_dict()}, tmp_path / "vq.pt")
    adapter = from_checkpoint(tmp_path / "gpt.pt", tmp_path / "vq.pt", model="GPT-B", image_size=256,
                              vocab_size=48, num_classes=5, vq_config=dict(ch=32, z_channels=32, num_res_blocks=1),
                              **small)
    assert adapter.grid == (16, 16) and adapter.num_tokens == 256
    for k, v in gpt.state_dict().items():
        assert torch.equal(adapter.model.state_dict()[k], v)
    assert adapter.codebook.shape == (48, 8)
    assert torch.allclose(adapter.codebook.norm(dim=-1), torch.ones(48), atol=1e-5)
    tokens = torch.randint(0, 48, (2, 256))
    images = adapter.decode(tokens)
    assert images.shape == (2, 3, 256, 256) and images.abs().max() <= 1
    with pytest.raises(ValueError, match="image_size"):
        from_checkpoint(tmp_path / "gpt.pt", model="GPT-B", image_size=300)
