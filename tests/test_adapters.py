"""Janus, Emu3 and Chameleon adapters on tiny random-init transformers models (real classes, CPU, no downloads).

Each greedy run through `specdec.generate` must equal the model's own generation routine token for token (Janus:
`generate(generation_mode="image")`; Emu3: `generate` with the visual-token `prefix_allowed_tokens_fn` and its
negative-prompt CFG; Chameleon: a full-recompute loop, since transformers' generate cannot emit image tokens), also
speculatively with an unrelated smaller drafter and with the target as its own drafter (every draft accepted).
"""
from __future__ import annotations

import pytest
import torch

import specdec
from drafters import ModelDrafter

transformers = pytest.importorskip("transformers")


def spread(*weights, std=1.0):
    """Random inits give near-uniform, repetitive greedy outputs; larger embeddings and heads vary the tokens."""
    with torch.no_grad():
        for w in weights:
            w.normal_(std=std)


def greedy(s=1.0):
    return specdec.Sampling(temperature=0, cfg_scale=s)


# ------------------------------------------------------------------------------------------------------- Janus
def tiny_janus(seed=0, layers=2, hidden=64):
    from transformers import JanusConfig, JanusForConditionalGeneration

    torch.manual_seed(seed)
    cfg = JanusConfig(
        text_config=dict(model_type="llama", vocab_size=120, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256),
        vision_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=64, patch_size=16,
                           projection_dim=hidden, num_image_tokens=16, intermediate_size=64),
        vq_config=dict(embed_dim=8, num_embeddings=40, latent_channels=32, base_channels=32,
                       channel_multiplier=[1, 1, 2, 2, 4], num_res_blocks=1, projection_dim=hidden,
                       image_token_embed_dim=hidden, num_hidden_layers=2),
        image_token_id=119)
    model = JanusForConditionalGeneration(cfg).eval()
    gen = model.generation_config
    gen.bos_token_id, gen.pad_token_id = 1, 0
    gen.generation_kwargs = {"boi_token_id": 5}
    spread(model.model.generation_head.vision_head.weight, model.model.generation_embeddings.weight)
    return model


@torch.no_grad()
def janus_reference_no_cfg(model, ids, T):
    """Janus's image path without CFG as a plain loop, full recompute: prompt embeddings, then image tokens
    through generation_embeddings + aligner, logits from generation_head, argmax."""
    embeds = model.get_input_embeddings()(ids)
    out = []
    for _ in range(T):
        h = model.model.language_model(inputs_embeds=embeds).last_hidden_state[:, -1]
        nxt = model.model.generation_head(h).argmax(-1)
        out.append(nxt)
        embeds = torch.cat([embeds, model.prepare_embeddings_for_image_generation(nxt[:, None])], 1)
    return torch.stack(out, 1)


@pytest.fixture(scope="module")
def janus():
    from specdec.adapters.janus import JanusAdapter

    model = tiny_janus()
    return model, JanusAdapter(model), JanusAdapter(tiny_janus(seed=5, layers=1, hidden=32))


def test_janus_greedy_matches_generate_with_cfg(janus):
    model, target, drafter = janus
    ids = torch.tensor([[1, 10, 11, 12, 5], [1, 20, 21, 22, 5], [1, 7, 30, 31, 5]])
    ref = model.generate(ids, attention_mask=torch.ones_like(ids), generation_mode="image", guidance_scale=3.0,
                         do_sample=False)
    assert len(set(ref.flatten().tolist())) > 3          # the check is not vacuous
    out = specdec.generate(target, ids, sampling=greedy(3.0))
    assert torch.equal(out.tokens, ref)
    assert out.images.shape == (3, 3, 64, 64)
    spec = specdec.generate(target, ids, drafter=ModelDrafter(drafter, k=3), sampling=greedy(3.0), decode=False)
    assert torch.equal(spec.tokens, ref)
    # prompts without the image-start token get it appended (the processor's image-generation format)
    selfspec = specdec.generate(target, ids[:, :-1], drafter=ModelDrafter(target, k=4), sampling=greedy(3.0),
                                decode=False)
    assert torch.equal(selfspec.tokens, ref)
    assert selfspec.stats.acceptance_rate == 1.0


def test_janus_greedy_without_cfg_and_geometry(janus):
    model, target, drafter = janus
    ids = torch.tensor([[1, 10, 11, 12, 5], [1, 20, 21, 22, 5]])
    ref = janus_reference_no_cfg(model, ids, target.num_tokens)
    assert torch.equal(specdec.generate(target, ids, sampling=greedy(), decode=False).tokens, ref)
    spec = specdec.generate(target, ids, drafter=ModelDrafter(drafter, k=2), sampling=greedy(), decode=False)
    assert torch.equal(spec.tokens, ref)
    assert target.grid == (4, 4) and target.vocab_size == 40 and target.supports_cfg
    assert target.codebook.shape == (40, 8) and target.token_embeddings.shape == (40, 64)
    # the unconditional prompt is the prompt with everything but BOS and image-start padded
    assert target.uncond_prompts([torch.tensor([1, 10, 11, 5])])[0].tolist() == [1, 0, 0, 5]


# ------------------------------------------------------------------------------------------------------- Emu3
EMU_V, EMU_EOL, EMU_WRAP, EMU_EOF = 16, 40, 42, 43


def tiny_emu3(seed=0, layers=2, hidden=64):
    from transformers import Emu3Config, Emu3ForConditionalGeneration

    torch.manual_seed(seed)
    vmap = {f"<|visual token{k:06d}|>": 60 + k for k in range(EMU_V)}
    vmap.update({"<|extra_200|>": EMU_EOL, "<image>": 41, "<|image token|>": EMU_WRAP, "<|extra_201|>": EMU_EOF})
    cfg = Emu3Config(
        text_config=dict(vocab_size=100, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0,
                         bos_token_id=1, eos_token_id=2),
        vq_config=dict(codebook_size=EMU_V, embed_dim=4, latent_channels=4, base_channels=32,
                       channel_multiplier=[1, 2], num_res_blocks=1, attn_resolutions=[],
                       temporal_downsample_factor=4, hidden_size=64, num_attention_heads=1),
        vocabulary_map=vmap)
    model = Emu3ForConditionalGeneration(cfg).eval()
    spread(model.lm_head.weight, model.get_input_embeddings().weight)
    return model


@pytest.mark.parametrize("cfg_scale", [1.0, 2.0])
def test_emu3_greedy_matches_generate_with_forced_eol(cfg_scale):
    from specdec.adapters.emu3 import Emu3Adapter

    model = tiny_emu3()
    H, W = 3, 4
    ids = torch.tensor([[1, 10, 11, 12, EMU_WRAP], [1, 20, 21, 22, EMU_WRAP], [1, 7, 8, 9, EMU_WRAP]])
    neg = torch.tensor([1, 30, 31, EMU_WRAP])
    P = ids.shape[1]
    visual = list(range(60, 60 + EMU_V))

    def allowed(batch_id, input_ids):      # transformers' Emu3 recipe: visual tokens, EOL at each row end
        offset = input_ids.shape[0] - P + 1
        if offset % (W + 1) == 0:
            return [EMU_EOL]
        return [EMU_EOF] if offset > (W + 1) * H else visual

    kw = {}
    if cfg_scale != 1.0:
        negs = neg[None].repeat(3, 1)
        kw = dict(guidance_scale=cfg_scale, negative_prompt_ids=negs, negative_prompt_attention_mask=torch.ones_like(negs))
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=(W + 1) * H, do_sample=False,
                         prefix_allowed_tokens_fn=allowed, pad_token_id=0, **kw)
    seq = out[:, P:].view(3, H, W + 1)
    assert (seq[:, :, W] == EMU_EOL).all()
    ref = model.vocabulary_mapping.convert_bpe2img(seq).reshape(3, -1).long()
    assert len(set(ref.flatten().tolist())) > 3

    target = Emu3Adapter(model, (H, W), uncond_prompt=neg)
    plain = specdec.generate(target, ids, sampling=greedy(cfg_scale))
    assert torch.equal(plain.tokens, ref)
    assert plain.images.shape == (3, 3, 2 * H, 2 * W)
    drafter = Emu3Adapter(tiny_emu3(seed=3, layers=1, hidden=32), (H, W), uncond_prompt=neg)
    spec = specdec.generate(target, ids, drafter=ModelDrafter(drafter, k=3), sampling=greedy(cfg_scale),
                            decode=False)
    assert torch.equal(spec.tokens, ref)
    selfspec = specdec.generate(target, ids, drafter=ModelDrafter(target, k=5), sampling=greedy(cfg_scale),
                                decode=False)
    assert torch.equal(selfspec.tokens, ref)
    assert selfspec.stats.acceptance_rate == 1.0
    assert target.codebook.shape == (EMU_V, 4) and target.token_embeddings.shape == (EMU_V, 64)


# ------------------------------------------------------------------------------------------------------- Chameleon
CH_V = 24


def tiny_chameleon(seed=0, layers=2, hidden=64):
    from transformers import ChameleonConfig, ChameleonForConditionalGeneration

    torch.manual_seed(seed)
    letters = "ABCDEFGHIJ"
    vmap = {"IMGIMG" + "".join(letters[int(d)] for d in str(k)) + "Z": 60 + k for k in range(CH_V)}
    vmap.update({"<image>": 41, "<pad>": 1})
    cfg = ChameleonConfig(vocab_size=100, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                          vocabulary_map=vmap,
                          vq_config=dict(embed_dim=8, num_embeddings=CH_V, latent_channels=8, base_channels=32,
                                         channel_multiplier=[1, 2], num_res_blocks=1, resolution=32))
    model = ChameleonForConditionalGeneration(cfg).eval()
    spread(model.lm_head.weight)
    spread(model.get_input_embeddings().weight, std=0.1)
    return model


@torch.no_grad()
def chameleon_reference(model, ids, T, image_ids, cfg_scale=1.0, uncond=None):
    """Full recompute, logits = lm_head on the last hidden state restricted to image tokens, CFG mixed."""
    cond_seq = ids
    uncond_seq = None if uncond is None else uncond[None].expand(ids.shape[0], -1)
    out = []
    for _ in range(T):
        def last_logits(seq):
            return model.lm_head(model.model(input_ids=seq).last_hidden_state[:, -1])[:, image_ids]
        mixed = last_logits(cond_seq)
        if uncond_seq is not None:
            u = last_logits(uncond_seq)
            mixed = u + cfg_scale * (mixed - u)
        nxt = mixed.argmax(-1)
        out.append(nxt)
        cond_seq = torch.cat([cond_seq, image_ids[nxt][:, None]], 1)
        if uncond_seq is not None:
            uncond_seq = torch.cat([uncond_seq, image_ids[nxt][:, None]], 1)
    return torch.stack(out, 1)


@pytest.mark.parametrize("cfg_scale", [1.0, 2.5])
def test_chameleon_greedy_from_hidden_states(cfg_scale):
    from specdec.adapters.chameleon import ChameleonAdapter

    model = tiny_chameleon()
    uncond = torch.tensor([2, 3, 41])
    target = ChameleonAdapter(model, grid=(3, 3), uncond_prompt=uncond)
    ids = torch.tensor([[2, 10, 11, 41], [2, 20, 21, 41]])
    ref = chameleon_reference(model, ids, 9, target.image_token_ids, cfg_scale,
                              uncond if cfg_scale != 1.0 else None)
    assert len(set(ref.flatten().tolist())) > 3
    # transformers' own forward hides image tokens: that is why the adapter reads the hidden states
    assert (model(input_ids=ids).logits[:, -1, target.image_token_ids] == torch.finfo(torch.float32).min).all()
    plain = specdec.generate(target, ids, sampling=greedy(cfg_scale), decode=False)
    assert torch.equal(plain.tokens, ref)
    drafter = ChameleonAdapter(tiny_chameleon(seed=4, layers=1, hidden=32), grid=(3, 3), uncond_prompt=uncond)
    spec = specdec.generate(target, ids, drafter=ModelDrafter(drafter, k=3), sampling=greedy(cfg_scale),
                            decode=False)
    assert torch.equal(spec.tokens, ref)
    selfspec = specdec.generate(target, ids, drafter=ModelDrafter(target, k=3), sampling=greedy(cfg_scale),
                                decode=False)
    assert torch.equal(selfspec.tokens, ref) and selfspec.stats.acceptance_rate == 1.0
    with pytest.raises(ValueError, match="decode="):
        target.decode(plain.tokens)
    assert target.codebook.shape == (CH_V, 8)
    decoded = ChameleonAdapter(model, grid=(3, 3), decode=lambda t: torch.zeros(t.shape[0], 3, 48, 48))
    assert decoded.decode(plain.tokens).shape == (2, 3, 48, 48)


def test_emu3_ragged_prompts_and_compaction():
    """Rows with prompts of different lengths, drafts that leave EOL pad holes, and frequent cache compaction:
    each row's tokens equal the row generated alone by transformers."""
    from specdec.adapters.emu3 import Emu3Adapter

    model = tiny_emu3(seed=1)
    H, W = 3, 3
    prompts = [torch.tensor([1, 10, 11, 12, 13, EMU_WRAP]), torch.tensor([1, 20, EMU_WRAP]),
               torch.tensor([1, 7, 8, EMU_WRAP])]
    visual = list(range(60, 60 + EMU_V))
    refs = []
    for p in prompts:
        def allowed(batch_id, input_ids, P=p.numel()):
            offset = input_ids.shape[0] - P + 1
            return [EMU_EOL] if offset % (W + 1) == 0 else ([EMU_EOF] if offset > (W + 1) * H else visual)
        out = model.generate(p[None], attention_mask=torch.ones(1, p.numel(), dtype=torch.long),
                             max_new_tokens=(W + 1) * H, do_sample=False, prefix_allowed_tokens_fn=allowed,
                             pad_token_id=0)
        refs.append(model.vocabulary_mapping.convert_bpe2img(out[:, p.numel():].view(1, H, W + 1)).reshape(-1))
    ref = torch.stack(refs).long()
    target = Emu3Adapter(model, (H, W), compact_every=2)
    drafter = Emu3Adapter(tiny_emu3(seed=3, layers=1, hidden=32), (H, W), compact_every=3)
    for d in (None, ModelDrafter(drafter, k=2), ModelDrafter(drafter, k=4)):
        out = specdec.generate(target, prompts, drafter=d, sampling=greedy(), decode=False)
        assert torch.equal(out.tokens, ref)


def test_janus_ragged_prompts_match_rows_alone(janus):
    model, target, drafter = janus
    prompts = [torch.tensor([1, 10, 11, 12, 13, 14, 5]), torch.tensor([1, 20, 5]), torch.tensor([1, 7, 30, 5])]
    ref = torch.cat([model.generate(p[None], attention_mask=torch.ones(1, p.numel(), dtype=torch.long),
                                    generation_mode="image", guidance_scale=2.0, do_sample=False) for p in prompts])
    out = specdec.generate(target, prompts, drafter=ModelDrafter(drafter, k=3), sampling=greedy(2.0), decode=False)
    assert torch.equal(out.tokens, ref)
