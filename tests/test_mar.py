"""MAR (arXiv 2406.11838): the official key layout loads strict, errors name keys, the order / mask / CFG schedules
follow the official sample_tokens, injected noises make the head deterministic, batched transitions equal single
ones, CFG rows follow the official layout, the causal raster variant, and bad inputs are refused."""
from __future__ import annotations

import argparse
import math

import pytest
import torch
import torch.nn.functional as F

from specdec.adapters.mar import MARAdapter, MARNoise
from specdec.models.mar import (KLVAE, MAR, MARConfig, VAEConfig, cfg_schedule, cosine_betas, load_mar, load_vae,
                                mar_from_file, mask_schedule, random_order, read_checkpoint, respaced_schedule,
                                space_timesteps)

torch.set_num_threads(1)


def tiny_mar(seed=0, **overrides) -> MAR:
    """mar_tiny with the zero-initialised head layers given a small spread, so eps and v depend on everything."""
    torch.manual_seed(seed)
    model = MAR(MARConfig.named("mar_tiny", **overrides))
    net = model.diffloss.net
    with torch.no_grad():
        for layer in [b.adaLN_modulation[-1] for b in net.res_blocks] + [net.final_layer.adaLN_modulation[-1],
                                                                          net.final_layer.linear]:
            layer.weight.normal_(std=0.05)
            layer.bias.normal_(std=0.05)
    return model.eval()


@pytest.fixture(scope="module")
def mar():
    return MARAdapter(tiny_mar(), KLVAE(VAEConfig.tiny()))


# ---- the official layout, written out independently of the model code ------------------------------------------
def official_mar_keys(cfg: MARConfig) -> dict[str, tuple]:
    """Names and shapes of LTH14/mar's MAR state dict (models/mar.py + timm Block + models/diffloss.py)."""
    e, d, w, t, p = cfg.encoder_embed_dim, cfg.decoder_embed_dim, cfg.diffloss_w, cfg.token_dim, \
        cfg.buffer_size + cfg.seq_len
    keys = {"class_emb.weight": (cfg.class_num, e), "fake_latent": (1, e), "z_proj.weight": (e, t),
            "z_proj.bias": (e,), "z_proj_ln.weight": (e,), "z_proj_ln.bias": (e,),
            "encoder_pos_embed_learned": (1, p, e), "encoder_norm.weight": (e,), "encoder_norm.bias": (e,),
            "decoder_embed.weight": (d, e), "decoder_embed.bias": (d,), "mask_token": (1, 1, d),
            "decoder_pos_embed_learned": (1, p, d), "decoder_norm.weight": (d,), "decoder_norm.bias": (d,),
            "diffusion_pos_embed_learned": (1, cfg.seq_len, d)}
    for name, dim, depth in (("encoder_blocks", e, cfg.encoder_depth), ("decoder_blocks", d, cfg.decoder_depth)):
        hid = int(dim * cfg.mlp_ratio)
        for i in range(depth):
            b = f"{name}.{i}."
            keys.update({b + "norm1.weight": (dim,), b + "norm1.bias": (dim,), b + "attn.qkv.weight": (3 * dim, dim),
                         b + "attn.qkv.bias": (3 * dim,), b + "attn.proj.weight": (dim, dim),
                         b + "attn.proj.bias": (dim,), b + "norm2.weight": (dim,), b + "norm2.bias": (dim,),
                         b + "mlp.fc1.weight": (hid, dim), b + "mlp.fc1.bias": (hid,),
                         b + "mlp.fc2.weight": (dim, hid), b + "mlp.fc2.bias": (dim,)})
    n = "diffloss.net."
    keys.update({n + "time_embed.mlp.0.weight": (w, 256), n + "time_embed.mlp.0.bias": (w,),
                 n + "time_embed.mlp.2.weight": (w, w), n + "time_embed.mlp.2.bias": (w,),
                 n + "cond_embed.weight": (w, d), n + "cond_embed.bias": (w,), n + "input_proj.weight": (w, t),
                 n + "input_proj.bias": (w,), n + "final_layer.linear.weight": (2 * t, w),
                 n + "final_layer.linear.bias": (2 * t,), n + "final_layer.adaLN_modulation.1.weight": (2 * w, w),
                 n + "final_layer.adaLN_modulation.1.bias": (2 * w,)})
    for i in range(cfg.diffloss_d):
        b = f"{n}res_blocks.{i}."
        keys.update({b + "in_ln.weight": (w,), b + "in_ln.bias": (w,), b + "mlp.0.weight": (w, w),
                     b + "mlp.0.bias": (w,), b + "mlp.2.weight": (w, w), b + "mlp.2.bias": (w,),
                     b + "adaLN_modulation.1.weight": (3 * w, w), b + "adaLN_modulation.1.bias": (3 * w,)})
    return keys


def official_vae_keys(cfg: VAEConfig) -> dict[str, tuple]:
    """Names and shapes of LTH14/mar's AutoencoderKL state dict (models/vae.py)."""
    keys = {}

    def conv(name, c_out, c_in, k):
        keys.update({name + ".weight": (c_out, c_in, k, k), name + ".bias": (c_out,)})

    def norm(name, c):
        keys.update({name + ".weight": (c,), name + ".bias": (c,)})

    def res(name, c_in, c_out):
        norm(name + ".norm1", c_in), conv(name + ".conv1", c_out, c_in, 3)
        norm(name + ".norm2", c_out), conv(name + ".conv2", c_out, c_out, 3)
        if c_in != c_out:
            conv(name + ".nin_shortcut", c_out, c_in, 1)

    def attn(name, c):
        norm(name + ".norm", c)
        for part in ("q", "k", "v", "proj_out"):
            conv(f"{name}.{part}", c, c, 1)

    ch, mult, n = cfg.ch, cfg.ch_mult, len(cfg.ch_mult)
    conv("encoder.conv_in", ch, 3, 3)
    res_now, c_in = cfg.resolution, ch
    for i in range(n):
        c_out = ch * mult[i]
        for j in range(cfg.num_res_blocks):
            res(f"encoder.down.{i}.block.{j}", c_in, c_out)
            c_in = c_out
            if res_now in cfg.encoder_attn_resolutions:
                attn(f"encoder.down.{i}.attn.{j}", c_out)
        if i != n - 1:
            conv(f"encoder.down.{i}.downsample.conv", c_out, c_out, 3)
            res_now //= 2
    for part in ("encoder", "decoder"):
        c = ch * mult[-1]
        res(f"{part}.mid.block_1", c, c), attn(f"{part}.mid.attn_1", c), res(f"{part}.mid.block_2", c, c)
    norm("encoder.norm_out", ch * mult[-1])
    conv("encoder.conv_out", 2 * cfg.embed_dim, ch * mult[-1], 3)
    c_in = ch * mult[-1]
    conv("decoder.conv_in", c_in, cfg.embed_dim, 3)
    res_now = cfg.resolution // 2 ** (n - 1)
    for i in reversed(range(n)):
        c_out = ch * mult[i]
        for j in range(cfg.num_res_blocks + 1):
            res(f"decoder.up.{i}.block.{j}", c_in, c_out)
            c_in = c_out
            if res_now in cfg.decoder_attn_resolutions:
                attn(f"decoder.up.{i}.attn.{j}", c_out)
        if i != 0:
            conv(f"decoder.up.{i}.upsample.conv", c_out, c_out, 3)
            res_now *= 2
    norm("decoder.norm_out", ch * mult[0])
    conv("decoder.conv_out", 3, ch * mult[0], 3)
    conv("quant_conv", 2 * cfg.embed_dim, 2 * cfg.embed_dim, 1)
    conv("post_quant_conv", cfg.embed_dim, cfg.embed_dim, 1)
    return keys


def random_state(keys: dict[str, tuple], seed=1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g) * 0.02 for k, s in keys.items()}


@pytest.mark.parametrize("size", ["mar_tiny", "mar_base"])
def test_official_layout_loads_strict(size):
    cfg = MARConfig.named(size) if size == "mar_tiny" else MARConfig.named(size, encoder_depth=1, decoder_depth=1,
                                                                           diffloss_d=1, class_num=7)
    state = random_state(official_mar_keys(cfg))
    model = load_mar(MAR(cfg), state)
    own = model.state_dict()
    assert set(own) == set(state)
    for k in ("fake_latent", "encoder_blocks.0.attn.qkv.weight", "diffloss.net.res_blocks.0.adaLN_modulation.1.bias"):
        assert torch.equal(own[k], state[k])


def test_released_sizes_match_paper_parameter_counts():
    # README: MAR-B 208M, MAR-L 479M, MAR-H 943M (rounded up); counted from the independent key list
    for size, millions in (("mar_base", 208), ("mar_large", 479), ("mar_huge", 943)):
        n = sum(math.prod(s) for s in official_mar_keys(MARConfig.named(size)).values())
        assert math.ceil(n / 1e6) == millions, size


@pytest.mark.parametrize("cfg", [VAEConfig.tiny(), VAEConfig.tiny(ch_mult=(1, 2), decoder_attn_resolutions=(8,))])
def test_vae_official_layout_loads_strict(cfg):
    state = random_state(official_vae_keys(cfg))
    vae = load_vae(KLVAE(cfg), {**state, "loss.logvar": torch.zeros(())})      # loss.* ignored, as documented
    assert set(vae.state_dict()) == set(state)
    assert torch.equal(vae.state_dict()["decoder.conv_out.weight"], state["decoder.conv_out.weight"])


def test_wrong_checkpoints_name_their_keys(tmp_path):
    cfg = MARConfig.named("mar_tiny")
    state = random_state(official_mar_keys(cfg))
    bad = dict(state)
    del bad["decoder_norm.bias"]
    bad["diffloss.net.extra.weight"] = torch.zeros(3)
    bad["mask_token"] = torch.zeros(1, 1, cfg.decoder_embed_dim + 1)
    with pytest.raises(ValueError) as err:
        load_mar(MAR(cfg), bad)
    msg = str(err.value)
    for part in ("decoder_norm.bias", "diffloss.net.extra.weight", "mask_token", "missing", "unexpected", "shape"):
        assert part in msg
    # a wrong size (the diffloss width) names the head's keys
    with pytest.raises(ValueError, match="diffloss.net.input_proj.weight"):
        load_mar(MAR(cfg.with_(diffloss_w=48)), state)
    # the official file layout: {"model", "model_ema", "args": Namespace}; EMA by default, wrapper prefixes dropped
    path = tmp_path / "checkpoint-last.pth"
    ema = {"module." + k: v + 1 for k, v in state.items()}
    torch.save({"model": state, "model_ema": ema, "epoch": 3, "args": argparse.Namespace(model="mar_tiny")}, path)
    model = mar_from_file("mar_tiny", path)
    assert torch.equal(model.fake_latent, state["fake_latent"] + 1)
    assert torch.equal(load_mar(MAR(cfg), read_checkpoint(path, "model")).fake_latent, state["fake_latent"])
    with pytest.raises(ValueError, match="model_ema"):
        read_checkpoint(path, "ema")


# ---- schedules --------------------------------------------------------------------------------------------------
def official_loop(seq_len: int, num_iter: int, official_order: torch.Tensor, cfg: float):
    """The official sample_tokens mask bookkeeping (mask_by_order on upstream's permutation), B rows, no model:
    -> per step (positions predicted as a set per row, cfg_iter)."""
    b = official_order.shape[0]
    mask = torch.ones(b, seq_len)
    out = []
    for step in range(num_iter):
        ratio = math.cos(math.pi / 2.0 * (step + 1) / num_iter)
        mask_len = torch.tensor([float(math.floor(seq_len * ratio))])
        mask_len = torch.maximum(torch.tensor([1.0]), torch.minimum(mask.sum(-1, keepdim=True) - 1, mask_len))
        nxt = torch.zeros(b, seq_len).scatter(1, official_order[:, :int(mask_len[0])], 1.0).bool()
        pred = mask.bool() if step >= num_iter - 1 else mask.bool() ^ nxt
        mask = nxt.float()
        cfg_iter = 1 + (cfg - 1) * (seq_len - mask_len[0].item()) / seq_len
        out.append(([set(torch.nonzero(r).flatten().tolist()) for r in pred], cfg_iter))
    return out


@pytest.mark.parametrize("seq_len,num_iter", [(16, 4), (16, 1), (16, 16), (16, 23), (256, 64), (9, 5)])
def test_mask_and_cfg_schedule_match_official(seq_len, num_iter):
    order = random_order(3, seq_len, torch.Generator().manual_seed(seq_len + num_iter))
    sched = mask_schedule(seq_len, num_iter)
    ref = official_loop(seq_len, num_iter, order.flip(1), cfg=3.0)     # upstream generates its permutation's end first
    assert len(sched) == num_iter and sum(sched.counts) == seq_len
    for (start, count, mask_len), (sets, cfg_iter) in zip(zip(sched.starts, sched.counts, sched.mask_lens), ref):
        for row in range(3):
            assert set(order[row, start:start + count].tolist()) == sets[row]
        assert cfg_schedule(3.0, mask_len, seq_len) == pytest.approx(cfg_iter, abs=1e-12)


def test_schedule_hand_computed():
    # L = 16, K = 4: floor(16 cos(pi/8 k')) = 14, 11, 6, 0 -> clamped 14, 11, 6, 1 -> 2, 3, 5, 6 tokens
    sched = mask_schedule(16, 4)
    assert sched.counts == (2, 3, 5, 6) and sched.mask_lens == (14, 11, 6, 1) and sched.starts == (0, 2, 5, 10)
    # linear CFG 1 + (s - 1)(L - mask_len)/L with s = 3: the last step stays below s (official quirk)
    assert [cfg_schedule(3.0, m, 16) for m in sched.mask_lens] == [1.25, 1.625, 2.25, 2.875]
    assert cfg_schedule(3.0, 14, 16, "constant") == 3.0
    # K > L: steps whose clamped mask_len equals the one unknown token predict nothing
    assert mask_schedule(4, 6).counts == (1, 1, 1, 0, 0, 1)


def test_adapter_loop_follows_the_schedule(mar, monkeypatch):
    seen = []
    chain, cond = mar.head_chain, mar.condition
    monkeypatch.setattr(mar, "condition", lambda s, p, v=None: (seen.append((p.clone(), (~s.mask).clone())),
                                                                  cond(s, p, v))[1])
    monkeypatch.setattr(mar, "head_chain", lambda z, *a, **k: (seen.append(a[3]), chain(z, *a, **k))[1])
    g = torch.Generator().manual_seed(3)
    order = random_order(2, 16, torch.Generator().manual_seed(3))
    tokens = mar.sample(torch.tensor([1, 4]), num_iter=4, cfg=3.0, generator=g, order=order)
    steps, cfgs = seen[0::2], seen[1::2]
    done = 0
    for pos, vis in steps:
        assert torch.equal(pos, order[:, done:done + pos.shape[1]])
        assert torch.equal(vis.sum(1), torch.full((2,), done))         # visible = exactly the earlier steps' tokens
        done += pos.shape[1]
    assert [p.shape[1] for p, _ in steps] == [2, 3, 5, 6]
    assert cfgs == [1.25, 1.625, 2.25, 2.875]
    assert tokens.shape == (2, 16, 16) and bool(torch.isfinite(tokens).all())


def test_orders():
    g = lambda s: torch.Generator().manual_seed(s)
    a, b = random_order(4, 16, g(0)), random_order(4, 16, g(0))
    assert torch.equal(a, b) and not torch.equal(a, random_order(4, 16, g(1)))
    assert torch.equal(a.sort(1).values, torch.arange(16).expand(4, 16))
    assert len({tuple(r) for r in a.tolist()}) == 4
    m = MARAdapter(tiny_mar())
    assert torch.equal(m.prepare(torch.tensor([0, 1]), order="raster").order, torch.arange(16).expand(2, 16))
    state = m.prepare(torch.tensor([0, 1]), generator=g(5))
    assert torch.equal(state.order.gather(1, state.rank), torch.arange(16).expand(2, 16))


def test_diffusion_constants():
    steps = space_timesteps(1000, 100)
    assert len(steps) == 100 and steps[:7] == [0, 10, 20, 30, 40, 50, 61] and steps[-1] == 999
    betas = cosine_betas(1000)
    f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    assert betas[0].item() == pytest.approx(1 - f(0.001) / f(0.0), rel=1e-12) and betas[-1].item() == 0.999
    sch = respaced_schedule(1000, 100)
    # respaced beta of the second kept step: 1 - abar(10) / abar(0)
    abar = torch.cumprod(1 - betas, 0)
    assert sch["betas"][1].item() == pytest.approx(1 - (abar[10] / abar[0]).item(), rel=1e-10)
    # at t = 0 the posterior mean is x0_hat itself (coef1 = 1, coef2 = 0)
    assert sch["coef1"][0].item() == pytest.approx(1.0, abs=1e-12) and abs(sch["coef2"][0].item()) < 1e-12


# ---- the head -----------------------------------------------------------------------------------------------------
def _step_inputs(mar, b=2, n=3, cfg=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    state = mar.prepare(torch.arange(b), cfg, g)
    pos = state.order[:, :n]
    noise = mar.draw_noise(b, g)
    x_T, steps = noise.at(pos)
    return state, pos, mar.condition(state, pos), x_T, steps


def test_injected_noise_determinism(mar):
    state, pos, z, x_T, steps = _step_inputs(mar)
    tau = 0.9
    out = mar.head_chain(z, x_T, steps, tau, 2.0)
    again = mar.head_chain(z, x_T, steps, tau, 2.0)
    assert torch.equal(out.tokens, again.tokens)
    assert torch.equal(out.tokens, out.means[:, :, -1]) and torch.equal(out.states[:, :, 0], x_T)
    # noise s enters step s: x_{next} = mean + tau * sigma * noise
    nxt = out.means[:, :, :-1] + torch.exp(0.5 * out.logvars[:, :, :-1]) * steps[:, :, :-1] * tau
    torch.testing.assert_close(out.states[:, :, 1:], nxt)
    # the last step's noise is never used; any other noise changes the token
    changed = steps.clone()
    changed[:, :, -1] += 1.0
    assert torch.equal(mar.head_chain(z, x_T, changed, tau, 2.0).tokens, out.tokens)
    changed[:, :, -2] += 1.0
    assert not torch.allclose(mar.head_chain(z, x_T, changed, tau, 2.0).tokens, out.tokens)
    # the whole generation is a function of (order, noise)
    noise = mar.draw_noise(2, torch.Generator().manual_seed(9))
    kw = dict(num_iter=4, cfg=2.0, order=state.order, noise=noise)
    a = mar.sample(torch.tensor([0, 1]), generator=torch.Generator().manual_seed(1), **kw)
    b = mar.sample(torch.tensor([0, 1]), generator=torch.Generator().manual_seed(2), **kw)
    assert torch.equal(a, b)
    c = mar.sample(torch.tensor([0, 1]), **{**kw, "noise": MARNoise(noise.x_T + 0.1, noise.steps)})
    assert not torch.allclose(a, c)


def test_empty_step_and_half_precision(mar):
    state, pos, z, x_T, steps = _step_inputs(mar)
    z0 = mar.condition(state, pos[:, :0])
    out = mar.head_chain(z0, x_T[:, :0], steps[:, :0], 1.0, 2.0)
    assert z0.shape == (4, 0, 32) and out.tokens.shape == (2, 0, 16) and out.means.shape == (2, 0, 10, 16)
    half = MARAdapter(tiny_mar().to(torch.bfloat16), KLVAE(VAEConfig.tiny()).to(torch.bfloat16))
    tokens = half.sample(torch.tensor([1, 2]), num_iter=3, cfg=2.0, generator=torch.Generator().manual_seed(0))
    assert tokens.dtype == torch.float32 and half.decode(tokens).shape == (2, 3, 16, 16)
    assert half.model.diffloss.const("recipm1").dtype == torch.float32


def test_head_transition_batched_equals_single_and_chain(mar):
    state, pos, z, x_T, steps = _step_inputs(mar)
    out = mar.head_chain(z, x_T, steps, 1.0, 2.5)
    S = mar.num_steps
    t = torch.arange(S - 1, -1, -1)
    mean, logvar = mar.head_transition(z, out.states, t, 2.5)          # every state of the chain in one call
    torch.testing.assert_close(mean, out.means, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logvar, out.logvars, rtol=1e-5, atol=1e-5)
    for s in (0, 4, S - 1):
        m1, l1 = mar.head_transition(z, out.states[:, :, s:s + 1], t[s:s + 1], 2.5)
        torch.testing.assert_close(m1[:, :, 0], mean[:, :, s], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(l1[:, :, 0], logvar[:, :, s], rtol=1e-5, atol=1e-6)
    # per-position steps [B, n, M] and per-image guidance [B]
    tt = torch.randint(0, S, (2, 3, 4))
    x = torch.randn(2, 3, 4, 16)
    mean, _ = mar.head_transition(z, x, tt, torch.tensor([1.5, 2.5]))
    m1, _ = mar.head_transition(z[[0, 2]], x[:1, :, :1], tt[:1, :, :1], 1.5)
    torch.testing.assert_close(m1[0, :, 0], mean[0, :, 0], rtol=1e-5, atol=1e-6)


def test_cfg_rows_and_guidance(mar):
    b, n = 2, 3
    state, pos, z, x_T, steps = _step_inputs(mar, b, n)
    assert z.shape == (2 * b, n, mar.model.cfg.decoder_embed_dim)
    model = mar.model
    tokens, vis = state.tokens, ~state.mask
    z_cond = model.condition(tokens, vis, model.class_emb(torch.arange(b)), pos)
    z_unc = model.condition(tokens, vis, model.fake_latent.expand(b, -1), pos)
    torch.testing.assert_close(z, torch.cat([z_cond, z_unc]))            # [cond rows; fake_latent rows]
    x = torch.randn(b, n, 2, 16)
    t = torch.tensor([7, 2])
    m = {k: mar.head_transition(z, x, t, k) for k in (0.0, 1.0, 3.0)}
    m_cond = mar.head_transition(z_cond, x, t)
    m_unc = mar.head_transition(z_unc, x, t)
    torch.testing.assert_close(m[1.0][0], m_cond[0], rtol=1e-5, atol=1e-5)   # k = 1: the conditional head
    torch.testing.assert_close(m[0.0][0], m_unc[0], rtol=1e-5, atol=1e-5)    # k = 0: the unconditional eps
    torch.testing.assert_close(m[3.0][0], m_unc[0] + 3.0 * (m_cond[0] - m_unc[0]), rtol=1e-4, atol=1e-4)
    for k in m:                                                          # variance: the conditional row's, unguided
        torch.testing.assert_close(m[k][1], m_cond[1], rtol=1e-5, atol=1e-6)


def test_fixed_variance_is_shared_between_heads(mar):
    other = MARAdapter(tiny_mar(seed=1))
    _, _, z, x_T, steps = _step_inputs(mar)
    _, _, z2, _, _ = _step_inputs(other)
    x, t = torch.randn(2, 3, 2, 16), torch.tensor([5, 0])
    for variance in ("small", "large"):
        assert torch.equal(mar.head_transition(z, x, t, 2.0, variance)[1], other.head_transition(z2, x, t, 2.0,
                                                                                                 variance)[1])
    assert not torch.allclose(mar.head_transition(z, x, t, 2.0)[1], other.head_transition(z2, x, t, 2.0)[1])


# ---- the backbone -------------------------------------------------------------------------------------------------
def official_condition(model: MAR, tokens, mask, class_rows):
    """forward_mae_encoder + forward_mae_decoder as upstream writes them (nonzero gathers, equal counts per row)."""
    r, buf = tokens.shape[0], model.cfg.buffer_size
    x = model.z_proj(tokens)
    x = torch.cat([torch.zeros(r, buf, x.shape[-1]), x], 1)
    mwb = torch.cat([torch.zeros(r, buf), mask.float()], 1)
    x[:, :buf] = class_rows[:, None]
    x = model.z_proj_ln(x + model.encoder_pos_embed_learned)
    x = x[(1 - mwb).nonzero(as_tuple=True)].reshape(r, -1, x.shape[-1])
    for blk in model.encoder_blocks:
        x = blk(x)
    x = model.decoder_embed(model.encoder_norm(x))
    pad = model.mask_token.repeat(r, mwb.shape[1], 1).clone()
    pad[(1 - mwb).nonzero(as_tuple=True)] = x.reshape(-1, x.shape[-1])
    x = pad + model.decoder_pos_embed_learned
    for blk in model.decoder_blocks:
        x = blk(x)
    return model.decoder_norm(x)[:, buf:] + model.diffusion_pos_embed_learned


def test_backbone_matches_official_and_ragged_rows(mar):
    model = mar.model
    g = torch.Generator().manual_seed(4)
    tokens = torch.randn(3, 16, 16, generator=g)
    rows = model.class_emb(torch.tensor([1, 2, 3]))
    mask = random_order(3, 16, g) < 10                                   # 10 unknown, 6 visible per row
    with torch.no_grad():
        ref = official_condition(model, tokens, mask, rows)
        z = model.condition(tokens, ~mask, rows, torch.arange(16).expand(3, 16))
        torch.testing.assert_close(z, ref, rtol=1e-5, atol=1e-5)
        ragged = mask.clone()
        ragged[1, :12] = False                                           # row 1 sees more tokens: padded encoder
        z = model.condition(tokens, ~ragged, rows, torch.arange(16).expand(3, 16))
        for r in range(3):
            one = model.condition(tokens[r:r + 1], ~ragged[r:r + 1], rows[r:r + 1], torch.arange(16)[None])
            torch.testing.assert_close(z[r:r + 1], one, rtol=1e-5, atol=1e-5)


def test_block_is_the_standard_vit_block(mar):
    blk = mar.model.encoder_blocks[0]
    x = torch.randn(2, 5, 32)
    h = blk.norm1(x)
    q, k, v = blk.attn.qkv(h).reshape(2, 5, 3, 2, 16).permute(2, 0, 3, 1, 4)
    att = torch.softmax(q @ k.transpose(-1, -2) / 4.0, -1) @ v
    y = x + blk.attn.proj(att.transpose(1, 2).reshape(2, 5, 32))
    y = y + blk.mlp.fc2(F.gelu(blk.mlp.fc1(blk.norm2(y))))
    with torch.no_grad():
        torch.testing.assert_close(blk(x), y, rtol=1e-5, atol=1e-5)


def test_causal_raster(mar):
    causal = MARAdapter(mar.model, causal=True)
    g = torch.Generator().manual_seed(6)
    state = causal.prepare(torch.tensor([1, 2]), 2.0, g, order="raster")
    causal.write(state, torch.arange(16).expand(2, 16), torch.randn(2, 16, 16, generator=g))
    pos = torch.tensor([[5, 6, 7], [5, 6, 7]])
    prefix = torch.arange(16).expand(2, 16) < 5
    # one pass with everything visible gives each position its sequential conditional (prefix before it only)
    z_all = causal.condition(state, pos, torch.ones(2, 16, dtype=torch.bool))
    for j, p in enumerate((5, 6, 7)):
        z_seq = causal.condition(state, pos[:, j:j + 1], torch.arange(16).expand(2, 16) < p)
        torch.testing.assert_close(z_all[:, j:j + 1], z_seq, rtol=1e-5, atol=1e-5)
    # the bidirectional model does see later tokens (so the check above can fail)
    assert not torch.allclose(mar.condition(state, pos, torch.ones(2, 16, dtype=torch.bool)),
                              mar.condition(state, pos, prefix), atol=1e-4)
    tokens = causal.sample(torch.tensor([3, 4]), num_iter=16, cfg=2.0, generator=g, order="raster")
    assert tokens.shape == (2, 16, 16) and bool(torch.isfinite(tokens).all())
    assert causal.timing.backbone_calls >= 16 and causal.timing.head_s > 0


def test_decode_encode_shapes(mar):
    tokens = torch.randn(2, 16, 16) * 0.2
    images = mar.decode(tokens)
    assert images.shape == (2, 3, 16, 16) and images.abs().max() <= 1
    assert mar.encode(images).shape == (2, 16, 16)
    m = MAR(MARConfig.named("mar_tiny", patch_size=2, img_size=32))       # patchify / unpatchify are inverse
    lat = torch.randn(2, 16, 8, 8)
    assert m.patchify(lat).shape == (2, 16, 64) and torch.equal(m.unpatchify(m.patchify(lat)), lat)
    assert MARAdapter(m).decode(torch.zeros(1, 16, 64)) is None


def test_bad_inputs(mar):
    state, pos, z, x_T, steps = _step_inputs(mar)
    with pytest.raises(ValueError, match="tokens"):
        mar.write(state, pos, torch.zeros(2, 3, 8))
    for bad in (0, -1, True, 2.5):
        with pytest.raises(ValueError, match="num_iter"):
            mar.sample(torch.tensor([0]), num_iter=bad)
    with pytest.raises(ValueError, match="noises"):
        mar.head_chain(z, x_T, steps[:, :, :-1])
    with pytest.raises(ValueError, match="x_T"):
        mar.head_chain(z, x_T[..., :8], steps)
    with pytest.raises(ValueError, match="unconditional"):
        mar.head_chain(z[:2], x_T, steps, 1.0, 3.0)
    with pytest.raises(ValueError, match="z must be"):
        mar.head_chain(z[:1], x_T, steps)
    with pytest.raises(ValueError, match="variance"):
        mar.head_chain(z, x_T, steps, variance="tiny")
    with pytest.raises(ValueError, match="temperature"):
        mar.head_chain(z, x_T, steps, float("nan"))
    with pytest.raises(ValueError, match="t must"):
        mar.head_transition(z, x_T[:, :, None], torch.tensor([mar.num_steps]))
    with pytest.raises(ValueError, match="class ids"):
        mar.prepare(torch.tensor([10]))
    with pytest.raises(ValueError, match="order"):
        mar.prepare(torch.tensor([1]), order="spiral")
    with pytest.raises(ValueError, match="permutation"):
        mar.prepare(torch.tensor([1]), order=torch.zeros(1, 16, dtype=torch.long))
    with pytest.raises(ValueError, match="positions"):
        mar.condition(state, torch.tensor([[16, 0], [1, 2]]))
    with pytest.raises(ValueError, match="cfg schedule"):
        mar.sample(torch.tensor([1]), num_iter=2, cfg_kind="cosine")
    with pytest.raises(ValueError, match="unknown MAR size"):
        MARConfig.named("mar_giant")
    with pytest.raises(ValueError, match="num_sampling_steps"):
        MARConfig.named("mar_tiny", num_sampling_steps=1)
    with pytest.raises(ValueError, match="VAE"):
        MARAdapter(mar.model, KLVAE(VAEConfig.tiny(ch_mult=(1, 2))))


def test_x0_clip_option(mar):
    """clip_x0=c clamps x0_hat to [-c, c] before the posterior mean, in chains and transitions alike; None is the
    official sampler, bit for bit; the clipped chain stays Gaussian: x_{s+1} = mean + sigma * noise."""
    state, pos, z, x_T, steps = _step_inputs(mar)
    assert mar.clip_x0 is None                                          # official default
    plain = mar.head_chain(z, x_T, steps, 1.0, 2.0)
    wide = MARAdapter(mar.model, clip_x0=1e30).head_chain(z, x_T, steps, 1.0, 2.0)
    for field in ("tokens", "means", "logvars", "states"):             # a clamp that never binds changes no bit
        assert torch.equal(getattr(wide, field), getattr(plain, field))
    c = 0.25
    clipped = MARAdapter(mar.model, clip_x0=c)
    out = clipped.head_chain(z, x_T, steps, 1.0, 2.0)
    assert not torch.allclose(out.tokens, plain.tokens)                # the clamp binds on this head
    S = mar.num_steps
    dl = mar.model.diffloss
    t = torch.arange(S - 1, -1, -1)
    coef1, coef2 = dl.const("coef1")[t][:, None], dl.const("coef2")[t][:, None]
    x0 = (out.means - coef2 * out.states) / coef1                      # the x0 the posterior mean was built from
    assert x0.abs().max() <= c * (1 + 1e-4) + 1e-5 and out.tokens.abs().max() <= c
    assert (x0.abs() > c * 0.999).any()                                # ... and it was clamped somewhere
    nxt = out.means[:, :, :-1] + torch.exp(0.5 * out.logvars[:, :, :-1]) * steps[:, :, :-1]
    torch.testing.assert_close(out.states[:, :, 1:], nxt)
    mean, logvar = clipped.head_transition(z, out.states, t, 2.0)      # the transitions the exact rule sees
    torch.testing.assert_close(mean, out.means, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logvar, out.logvars, rtol=1e-5, atol=1e-5)
    assert torch.equal(logvar, mar.head_transition(z, out.states, t, 2.0)[1])   # same states: the same variance
    for bad in (0.0, -1.0, float("inf"), "1"):
        with pytest.raises(ValueError, match="clip_x0"):
            MARAdapter(mar.model, clip_x0=bad)


def test_time_table_cache_follows_the_weights():
    head = MAR(MARConfig.named("mar_tiny")).diffloss
    with torch.no_grad():
        first = head.time_table()
        assert head.time_table() is first                                  # cached without autograd
        head.net.time_embed.mlp[0].bias.add_(1.0)                          # an in-place update (optimiser, load)
        again = head.time_table()
    assert again is not first and not torch.equal(again, first)
    torch.testing.assert_close(again, head.net.time_embed(head.const("timestep_map")).detach())
    assert head.time_table().requires_grad                                 # with autograd: never the cache
