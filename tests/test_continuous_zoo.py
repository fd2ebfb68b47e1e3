"""The continuous-token zoo (MAR, arXiv 2406.11838): the KL autoencoder on real crops, the MAR training loss
(masking, class dropout, the diffusion loss), and the training script's stages end to end on tiny sizes."""
from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from specdec import zoo
from specdec.models.mar import MAR, MARConfig
from specdec.models.mar import training
from specdec.models.mar.training import (TrainConfig, drop_labels, head_loss, mar_loss, mask_ratio, random_mask,
                                         train_class_rows)
from specdec.zoo import continuous, data
from specdec.zoo.continuous import KLAutoencoder, KLConfig, ae_loss, fit_scale, step_macs
from specdec.zoo.features import FeatureNet

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]
TINY_AE = KLConfig(channels=(8, 8, 16))


def tiny_mar(seed: int = 0) -> MAR:
    """mar_tiny (4 x 4 tokens of dim 16) with the zero-initialised head layers given a small spread, so that the
    loss depends on the backbone from the first step."""
    torch.manual_seed(seed)
    model = MAR(MARConfig.named("mar_tiny"))
    net = model.diffloss.net
    with torch.no_grad():
        for layer in [b.adaLN_modulation[-1] for b in net.res_blocks] + [net.final_layer.adaLN_modulation[-1],
                                                                          net.final_layer.linear]:
            layer.weight.normal_(std=0.05)
    return model


def structured_tokens(model: MAR, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens [n, L, D] = a per-class pattern + small noise, classes [n]: something a model can learn in steps."""
    g = torch.Generator().manual_seed(seed)
    cfg = model.cfg
    patterns = torch.randn(cfg.class_num, cfg.seq_len, cfg.token_dim, generator=g)
    labels = torch.randint(cfg.class_num, (n,), generator=g)
    return patterns[labels] + 0.1 * torch.randn(n, cfg.seq_len, cfg.token_dim, generator=g), labels


# ---- autoencoder -------------------------------------------------------------------------------------------------
def test_autoencoder_shapes_scale_and_loss_decreases():
    torch.manual_seed(0)
    ae = KLAutoencoder(TINY_AE)
    x, _ = data.batch("train", 8, seed=3)                        # real photo crops
    mean, logvar = ae.encode(x)
    assert mean.shape == logvar.shape == (8, 16, 12, 12)
    assert ae.decode(mean).shape == (8, 3, 48, 48)
    opt = torch.optim.Adam(ae.parameters(), lr=3e-3)
    losses = []
    for step in range(25):
        loss, parts = ae_loss(ae, x, torch.Generator().manual_seed(step))
        assert math.isfinite(parts["mse"]) and parts["kl"] >= 0
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-3:]) < 0.7 * sum(losses[:3]), losses
    # the fitted scale gives unit-std tokens (4608 pooled values per crop: sampling error ~1 %), and decode_tokens
    # undoes it exactly
    scale = fit_scale(ae, x, torch.Generator().manual_seed(1))
    scaled = KLAutoencoder(KLConfig(channels=TINY_AE.channels, scale=scale))
    scaled.load_state_dict(ae.state_dict())
    with torch.no_grad():
        tokens = scaled.encode_tokens(x, torch.Generator().manual_seed(2))
        assert abs(tokens.std().item() - 1.0) < 0.05
        assert torch.allclose(scaled.decode_tokens(scaled.encode_tokens(x)), ae.decode(ae.encode(x)[0]), atol=1e-5)
    with pytest.raises(ValueError, match="images must be"):
        ae.encode(torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError, match="scale"):
        KLConfig(scale=0.0)


# ---- MAR training loss -------------------------------------------------------------------------------------------
def test_mask_ratio_is_the_truncated_normal():
    g = torch.Generator().manual_seed(0)
    draws = torch.tensor([mask_ratio(g) for _ in range(2000)])
    assert draws.min() >= 0.7 and draws.max() <= 1.0
    # N(1, 0.25) truncated to [0.7, 1]: mean 1 - 0.25 (phi(0) - phi(-1.2)) / (Phi(0) - Phi(-1.2)) = 0.8671, std of
    # one draw ~0.08, so the mean of 2000 has s.e. ~0.002; 0.008 is 4 s.e.
    phi = lambda v: math.exp(-v * v / 2) / math.sqrt(2 * math.pi)
    expect = 1 - 0.25 * (phi(0) - phi(-1.2)) / (0.5 - 0.5 * math.erfc(1.2 / math.sqrt(2)))
    assert abs(draws.mean().item() - expect) < 0.008
    positions, visible = random_mask(3, 144, 0.8, g)
    assert positions.shape == (3, math.ceil(144 * 0.8))
    assert ((~visible).sum(1) == positions.shape[1]).all()
    assert (~visible).gather(1, positions).all()


def test_mar_loss_masks_only_masked_positions(monkeypatch):
    model = tiny_mar()
    tokens, labels = structured_tokens(model, 4)
    tokens.requires_grad_(True)
    seen = {}
    real_head_loss = training.head_loss

    def spy(head, x0, z, generator, *args, **kwargs):
        seen["x0"] = x0.detach().clone()
        return real_head_loss(head, x0, z, generator, *args, **kwargs)

    monkeypatch.setattr(training, "head_loss", spy)
    cfg = TrainConfig(diffusion_batch_mul=3, label_drop=0.0)
    loss, batch = mar_loss(model, tokens, labels, torch.Generator().manual_seed(5), cfg)
    assert math.isfinite(loss.item())
    b, n = batch.positions.shape
    assert n == math.ceil(model.cfg.seq_len * batch.ratio)
    # the head's targets are exactly the masked tokens, each diffusion_batch_mul times
    masked = tokens.detach().gather(1, batch.positions[..., None].expand(-1, -1, model.cfg.token_dim))
    assert torch.equal(seen["x0"], masked.reshape(b * n, -1).repeat(3, 1))
    # targets are detached; the conditioning must not see masked tokens: d loss / d token is zero exactly there
    loss.backward()
    per_token = tokens.grad.abs().sum(-1)                            # [B, L]
    assert (per_token[~batch.visible] == 0).all()
    assert (per_token[batch.visible] > 0).all()


def test_class_dropout_uses_the_fake_latent():
    model = tiny_mar()
    labels = torch.tensor([1, 2, 3])
    rows = train_class_rows(model, labels, torch.tensor([True, False, True]))
    assert torch.equal(rows[0], model.fake_latent[0]) and torch.equal(rows[2], model.fake_latent[0])
    assert torch.equal(rows[1], model.class_emb.weight[2])
    # dropped rows make the loss blind to the labels (same draws); kept rows do not
    tokens, _ = structured_tokens(model, 3)
    loss_of = lambda lab, drop: mar_loss(model, tokens, lab, torch.Generator().manual_seed(9),
                                         TrainConfig(label_drop=drop))[0].item()
    other = torch.tensor([7, 8, 9])
    assert loss_of(labels, 1.0) == loss_of(other, 1.0)
    assert loss_of(labels, 0.0) != loss_of(other, 0.0)
    # rate: 20000 Bernoulli(0.1) draws have s.d. 0.0021; 0.01 is ~4.7 s.d.
    assert abs(drop_labels(20000, 0.1, torch.Generator().manual_seed(0)).float().mean().item() - 0.1) < 0.01


def test_mar_loss_decreases_and_vlb_option():
    model = tiny_mar(1)
    tokens, labels = structured_tokens(model, 16, seed=1)
    cfg = TrainConfig()
    fixed = lambda: mar_loss(model, tokens, labels, torch.Generator().manual_seed(123), cfg)[0].item()
    before = fixed()
    opt = torch.optim.AdamW(training.param_groups(model, cfg.weight_decay), lr=3e-3, betas=(0.9, 0.95))
    for step in range(20):
        loss, _ = mar_loss(model, tokens, labels, torch.Generator().manual_seed(step), cfg)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
    after = fixed()
    assert math.isfinite(after) and after < 0.8 * before, (before, after)
    # the variance half of the head's output is trained only with vlb=True
    x0, z = tokens[:, 0].detach(), torch.randn(16, model.cfg.decoder_embed_dim)
    last = model.diffloss.net.final_layer.linear
    for vlb in (False, True):
        model.zero_grad()
        rows = head_loss(model.diffloss, x0, z, torch.Generator().manual_seed(0), vlb=vlb)
        assert rows.shape == (16,) and torch.isfinite(rows).all()
        rows.mean().backward()
        v_grad = last.weight.grad[model.cfg.token_dim:].abs().sum().item()
        assert (v_grad > 0) == vlb
    # the VLB's KL vanishes for the exact noise and the posterior variance (v = -1), and only then
    consts = training.training_constants(1000)
    g = torch.Generator().manual_seed(4)
    x0, noise = torch.randn(64, 16, generator=g), torch.randn(64, 16, generator=g)
    t = torch.randint(1, 1000, (64,), generator=g)
    x_t = training.q_sample(x0, t, noise, consts)
    v = -torch.ones(64, 16)
    exact = training.vlb_bits(x0, x_t, t, noise, v, consts).abs().max()
    assert exact < 1e-5 and (training.vlb_bits(x0, x_t, t, noise + 0.1, v, consts) > 10 * exact).all()


def test_step_macs_counts_both_parts():
    cfg = MARConfig.named("mar_tiny")
    one, two = step_macs(cfg, 4, 2), step_macs(cfg, 4, 4)
    assert two["backbone"] == one["backbone"] and two["head"] == 2 * one["head"]
    guided = step_macs(cfg, 4, 2, guided=True)
    assert guided == {k: 2 * v for k, v in one.items()}
    wider = step_macs(cfg.with_(diffloss_w=64), 4, 2)
    assert wider["head"] > 3 * one["head"]


# ---- the script's stages end to end ---------------------------------------------------------------------------------
def _script():
    spec = importlib.util.spec_from_file_location("train_continuous_zoo",
                                                  ROOT / "experiments" / "train_continuous_zoo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_script_stages_write_loadable_zoo(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    zoo.save_model(FeatureNet(), out, "features", {"config": {}})     # untrained: no shipped weights needed
    script = _script()
    args = ["--sizes", "tiny", "--out", str(out), "--work-dir", str(work), "--log", str(tmp_path / "log"),
            "--ae-minutes", "0.03", "--target-minutes", "0.03", "--drafter-minutes", "0.03", "--eval-per-class", "1",
            "--eval-rounds", "1", "--sampling-steps", "4", "--speed-rounds", "1", "--fd-samples", "10",
            "--fd-batch", "10", "--scale-images", "32",
            "--target-steps", "100000"]       # more than 0.03 min can hold whatever the machine's speed: stops early
    script.main(args)
    cards = {}
    for name in continuous.MODEL_NAMES:
        module, cards[name] = zoo.load_model(name, out)               # sha256 verified
        assert cards[name]["steps"] > 0
    assert cards["continuous_ae"]["config"]["scale"] == cards["continuous_ae"]["latent_scale"] > 0
    for name in continuous.MODEL_NAMES[1:]:
        card = cards[name]
        assert card["autoencoder_sha256"] == cards["continuous_ae"]["sha256"]
        assert card["head_variance"] == "large" and card["training"]["vlb"] is False
        assert card["metrics"]["figures"]["speed_batch1"]["target_head_ms"] > 0
    # a stopped stage resumes from its checkpoint: the rerun continues past the steps already done
    done = cards["continuous_target"]["steps"]
    assert not cards["continuous_target"]["complete"]                  # 0.03 min cannot hold 100000 steps
    script.main(args + ["--stages", "target"])
    assert json.loads((out / "continuous_target.json").read_text())["steps"] > done
    assert "continuous_target: resumed at step" in (tmp_path / "log").read_text()
    bundle = continuous.load(directory=out)
    assert continuous.available(out) and bundle.variance == "large" and bundle.class_id("coffee") == 1
    g = torch.Generator().manual_seed(0)
    for adapter in (bundle.target, bundle.drafter):
        tokens = adapter.sample(torch.tensor([0, 3]), num_iter=4, cfg=bundle.cfg_scale, generator=g)
        assert tokens.shape == (2, 144, 16) and torch.isfinite(tokens).all()
        images = adapter.decode(tokens)
        assert images.shape == (2, 3, 48, 48) and images.abs().max() <= 1
    # a corrupted weights file is refused by its sha256
    path = out / "continuous_drafter.safetensors"
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 1
    path.write_bytes(bytes(raw))
    with pytest.raises(zoo.ZooError, match="corrupt"):
        continuous.load(directory=out)


@pytest.mark.skipif(not continuous.available(), reason="the continuous zoo weights are not in the package")
def test_shipped_zoo_samples_are_on_the_token_scale():
    """Target-only and drafter-only samples of the shipped zoo at its defaults have tokens on the data's scale (unit
    std; the band < 3 is loose) and finite images. Without the head's x0 clamp the top step (abar_T ~ 2.4e-9)
    amplifies eps errors ~630 times and sampled tokens had std ~ 470."""
    bundle = continuous.load()
    assert bundle.clip_x0 == continuous.DEFAULT_CLIP_X0 and bundle.target.clip_x0 == bundle.drafter.clip_x0
    for adapter in (bundle.target, bundle.drafter):
        tokens = adapter.sample(torch.tensor([1, 7]), num_iter=bundle.num_iter, cfg=bundle.cfg_scale,
                                generator=torch.Generator().manual_seed(0))
        assert torch.isfinite(tokens).all() and 0.3 < tokens.std() < 3, float(tokens.std())
        images = adapter.decode(tokens)
        assert torch.isfinite(images).all() and (images.abs() > 0.99).float().mean() < 0.05
