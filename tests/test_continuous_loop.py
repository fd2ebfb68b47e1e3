"""The speculative loop for continuous-token MAR (specdec.continuous_loop; MAR arXiv 2406.11838, CSpD arXiv
2411.11925, the exact rule over Gaussian transitions arXiv 2501.05370), on tiny random MARs.

Test models: mar_tiny whose head predicts eps = x_t + 0.002 * (the random MLP's output), so that chains stay at
unit scale (a random head's eps error is amplified ~30x by the cosine schedule's clipped top step); the drafter is
the same model whose head adds a constant 0.1 to eps at the five lowest noise levels: its token law is clearly
different, while its chains pass most transitions (so acceptance, reflection and continuation paths all run).

Statistical threshold (test_exact_rule_has_the_target_only_law): two-sample energy distance of whole images
(16 tokens x 16 dims, sliced over 32 directions) between 300 exact-rule and 300 target-only images (independent
seeds); it must not exceed the 99th percentile of its null from 100 label permutations (1 % false alarm at this
fixed seed). The same threshold must reject the drafter's own law (so the test can fail).
"""
from __future__ import annotations

import copy
import json

import pytest
import torch

import specdec
from specdec.adapters.mar import MARAdapter
from specdec.cli import UsageError, main
from specdec.continuous_demo import run_continuous_demo
from specdec.continuous import energy_test
from specdec.continuous_loop import LoopConfig, Plan, draw_randomness, generate_continuous, plan_run
from specdec.continuous_verify import draft_contexts, step_visibility
from specdec.models.mar import KLVAE, MAR, MARConfig, VAEConfig, mask_schedule
from specdec.models.mar.diffloss import DiffLoss, SimpleMLPAdaLN
from specdec.testing import FakeFeatureNet, tiny_gpt
from verifiers import CSpDRule, ExactRule, GaussianChainRule

torch.set_num_threads(1)
CFG = dict(num_iter=4, cfg=2.0)
EPS_SCALE, SHIFT, LOW_T = 0.002, 0.1, 4


class ResidualEps(SimpleMLPAdaLN):
    """eps = x_t + EPS_SCALE * MLP: a random head whose chains keep unit scale."""

    def forward_embedded(self, x, y):
        out = super().forward_embedded(x, y)
        d = self.in_channels
        return torch.cat([x + EPS_SCALE * out[:, :d], out[:, d:]], 1)


class ShiftedHead(DiffLoss):
    """The drafter's head: eps + shift at respaced steps t <= low_t."""

    shift, low_t = SHIFT, LOW_T

    def predict(self, x, t, c, cfg_k=1.0, times=None):
        eps, v = super().predict(x, t, c, cfg_k, times)
        low = (t <= self.low_t).float()[:, None] if isinstance(t, torch.Tensor) else float(t <= self.low_t)
        return eps + self.shift * low, v


def tiny_model(seed=0, **overrides) -> MAR:
    torch.manual_seed(seed)
    model = MAR(MARConfig.named("mar_tiny", **overrides))
    net = model.diffloss.net
    with torch.no_grad():
        for layer in [b.adaLN_modulation[-1] for b in net.res_blocks] + [net.final_layer.adaLN_modulation[-1],
                                                                          net.final_layer.linear]:
            layer.weight.normal_(std=0.05)
            layer.bias.normal_(std=0.05)
    head = ResidualEps(net.in_channels, net.cond_embed.out_features, net.cond_embed.in_features, len(net.res_blocks))
    head.load_state_dict(net.state_dict())
    model.diffloss.net = head
    return model.eval()


def shifted_copy(model: MAR, shift: float = SHIFT, low_t: int = LOW_T) -> MAR:
    other = copy.deepcopy(model)
    other.diffloss.__class__ = ShiftedHead
    other.diffloss.shift, other.diffloss.low_t = shift, low_t
    return other


@pytest.fixture(scope="module")
def pair():
    target = tiny_model()
    return MARAdapter(target, variance="large"), MARAdapter(shifted_copy(target), variance="large")


class TokenShiftDrafter(MARAdapter):
    """The target itself, except that the tokens it drafts at `shifted` positions [B, n] are moved by 0.5: every
    transition of those chains passes, yet the token differs from the target's (a changed step)."""

    shifted: torch.Tensor

    def condition(self, state, positions, visible=None):
        self.last_positions = positions
        return super().condition(state, positions, visible)

    def head_chain(self, z, x_T, noises, *args, **kwargs):
        out = super().head_chain(z, x_T, noises, *args, **kwargs)
        hit = (self.last_positions[..., None] == self.shifted[:, None, :]).any(-1)[..., None]      # [B, n, 1]
        tokens = out.tokens + 0.5 * hit
        return type(out)(tokens, torch.cat([out.means[:, :, :-1], tokens[:, :, None]], 2), out.logvars, out.states)


def _reference(target, cond, seed, **kw):
    rnd = draw_randomness(target, len(cond), seed, kw.pop("order", "random"))
    return target.sample(cond, noise=rnd.noise, order=rnd.order, **kw), rnd


# ---- target-only and drafter = target ------------------------------------------------------------------------------
def test_target_only_is_mar_sample_bit_for_bit(pair):
    target, _ = pair
    cond = torch.tensor([0, 1, 2])
    res = generate_continuous(target, cond, seed=3, **CFG)
    ref, _ = _reference(target, cond, 3, **CFG)
    assert torch.equal(res.tokens, ref) and res.lossless
    st = res.stats
    assert st.target_forwards == 4 and st.mean_accepted_length == 16 / 4 and st.target_head_calls == 4 * 10
    assert st.drafted == 0 and bool((st.first_rejected == -1).all())
    fewer = generate_continuous(target, cond[:2], seed=3, **CFG).tokens       # an image ignores its batch-mates
    torch.testing.assert_close(fewer, res.tokens[:2], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("gamma,prefill", [(1, 0.0), (2, 0.0), (4, 0.0), (2, 0.25)])
def test_drafter_equal_to_target_accepts_everything_bit_for_bit(pair, gamma, prefill):
    target, _ = pair
    cond = torch.tensor([0, 1, 2])
    ref, _ = _reference(target, cond, 4, **CFG)
    same = MARAdapter(target.model, variance="large")
    for rule, kw in ((GaussianChainRule(), {}), (CSpDRule(), dict(contexts="per_step", policy="truncate"))):
        res = generate_continuous(target, cond, same, rule, gamma=gamma, prefill_ratio=prefill, seed=4, **CFG, **kw)
        assert torch.equal(res.tokens, ref), rule.name
        st, pre = res.stats, int(prefill * 4)
        drafted = st.first_rejected[st.first_rejected >= 0]
        assert bool((drafted == st.window).all()) and st.accepted == st.drafted
        assert st.transitions_accepted == st.transitions_drafted > 0 and st.transition_acceptance == 1.0
        assert st.target_forwards == pre + -(-(4 - pre) // gamma)                    # every round commits gamma
        assert st.mean_accepted_length == 16 / st.target_forwards
    assert res.lossless is False                    # CSpD is lossy even where it happens to agree


# ---- contexts and truncation against step-by-step recomputation ------------------------------------------------
def test_batched_contexts_equal_step_by_step(pair):
    target, _ = pair
    g = torch.Generator().manual_seed(0)
    state = target.prepare(torch.tensor([1, 2]), 2.0, g)
    target.write(state, state.order[:, :3], torch.randn(2, 3, 16, generator=g))
    drafted = state.tokens.clone()
    groups = [state.order[:, 3:5], state.order[:, 5:9], state.order[:, 9:10]]
    for gr in groups:
        drafted.scatter_(1, gr[..., None].expand(-1, -1, 16), torch.randn(2, gr.shape[1], 16, generator=g))
    z = draft_contexts(target, state, drafted, groups, "per_step")
    view = copy.copy(state)
    view.tokens = drafted
    seq = [target.condition(view, gr, vis) for gr, vis in zip(groups, step_visibility(~state.mask, groups))]
    torch.testing.assert_close(z, torch.cat(seq, 1), rtol=1e-5, atol=1e-5)
    pre = draft_contexts(target, state, drafted, groups, "pre_draft")
    torch.testing.assert_close(pre[:, :2], z[:, :2], rtol=1e-5, atol=1e-5)     # step 0: the committed context
    assert not torch.allclose(pre[:, 2:], z[:, 2:], atol=1e-4)                     # later steps: not the same
    # causal raster, one token per step: one pass over the union equals the per-step contexts
    causal = MARAdapter(target.model, causal=True)
    cstate = causal.prepare(torch.tensor([1, 2]), 2.0, order="raster")
    causal.write(cstate, torch.arange(3).expand(2, 3), torch.randn(2, 3, 16, generator=g))
    cdrafted = cstate.tokens.clone()
    cdrafted[:, 3:7] = torch.randn(2, 4, 16, generator=g)
    singles = [torch.full((2, 1), p) for p in range(3, 7)]
    torch.testing.assert_close(draft_contexts(causal, cstate, cdrafted, singles, "union"),
                               draft_contexts(causal, cstate, cdrafted, singles, "per_step"), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(draft_contexts(target, state, drafted, groups, "union"), z, atol=1e-4)


def test_truncation_recomputes_the_changed_step(pair):
    target, _ = pair
    cond = torch.tensor([0, 1])
    ref, rnd = _reference(target, cond, 5, **CFG)
    drafter = TokenShiftDrafter(target.model, variance="large")
    starts, counts = mask_schedule(16, 4).starts, mask_schedule(16, 4).counts
    drafter.shifted = rnd.order[:, starts[1]:starts[1] + counts[1]]                 # AR step 1 drafts wrong tokens
    res = generate_continuous(target, cond, drafter, GaussianChainRule(), gamma=4, seed=5, **CFG)
    torch.testing.assert_close(res.tokens, ref, rtol=1e-5, atol=1e-5)            # the target-only sample
    st = res.stats
    assert st.target_forwards == 2 and st.rounds == 2                    # steps 0-1, then 2-3 (drafted again)
    assert bool((st.first_rejected[st.first_rejected >= 0] == st.window).all())   # every transition passed
    assert st.drafted == (16 + 16 - starts[2]) * 2 and st.accepted == 2 * (16 - counts[1])
    wrong = generate_continuous(target, cond, drafter, GaussianChainRule(), gamma=4, policy="independent", seed=5,
                                **CFG)
    assert not torch.allclose(wrong.tokens, ref, atol=1e-3) and not wrong.lossless


@pytest.mark.parametrize("causal", [False, True], ids=["masked", "causal_raster"])
def test_gamma_rounds_equal_one_step_rounds(pair, causal):
    """With a distinct drafter every round changes its first step: gamma > 1 (batched contexts, truncation) must
    commit exactly what step-by-step speculation (gamma = 1) commits."""
    target, drafter = pair
    kw = dict(CFG, num_iter=16, order="raster") if causal else CFG
    if causal:
        target, drafter = MARAdapter(target.model, causal=True, variance="large"), \
            MARAdapter(drafter.model, causal=True, variance="large")
    cond = torch.tensor([0, 1, 2])
    one = generate_continuous(target, cond, drafter, GaussianChainRule(), gamma=1, seed=6, **kw)
    many = generate_continuous(target, cond, drafter, GaussianChainRule(), gamma=3, seed=6, **kw)
    assert many.lossless and many.plan.contexts == ("union" if causal else "per_step")
    # equal up to the float rounding of the batched (padded) backbone pass, amplified along the head chains
    torch.testing.assert_close(many.tokens, one.tokens, rtol=1e-4, atol=1e-4)
    assert torch.equal(many.stats.first_rejected, one.stats.first_rejected)
    assert many.stats.target_forwards == one.stats.target_forwards == kw["num_iter"]
    assert 0 < one.stats.transition_acceptance < 1


def test_plan_says_when_the_output_is_lossless(pair):
    target, _ = pair
    causal = MARAdapter(target.model, causal=True)
    exact, cspd = GaussianChainRule(), CSpDRule()
    plan = lambda t, r, **kw: plan_run(LoopConfig(**{**CFG, **kw}), t, r, True)
    assert plan(target, exact, gamma=2) == Plan(2, 0, "truncate", "per_step", True)
    assert plan(target, cspd) == Plan(8, 0, "independent", "pre_draft", False)         # the rule's gamma, prefill
    assert plan(target, cspd, num_iter=20).prefill == 3                                  # int(0.15 * 20)
    assert not plan(target, exact, gamma=2, policy="independent").lossless
    assert not plan(target, exact, gamma=2, contexts="pre_draft").lossless
    assert plan(target, exact, gamma=1, contexts="pre_draft").lossless                  # one step: the same context
    assert not plan(target, exact, gamma=2, contexts="union").lossless                  # bidirectional
    assert plan(causal, exact, gamma=2, num_iter=16).contexts == "union"                # one token per step
    assert plan(causal, exact, gamma=2).contexts == "per_step"                           # 4 tokens per step


# ---- the law ----------------------------------------------------------------------------------------------------
def test_exact_rule_has_the_target_only_law(pair):
    target, drafter = pair
    n = 300
    cond = torch.arange(n) % 3
    flat = lambda r: r.tokens.reshape(n, -1)
    # independent seeds: with the same seed the exact rule's sample is coupled to the target-only one (shared noises)
    ref = flat(generate_continuous(target, cond, seed=100, **CFG))
    exact = generate_continuous(target, cond, drafter, GaussianChainRule(), gamma=2, seed=300, **CFG)
    own = flat(generate_continuous(drafter, cond, seed=300, **CFG))
    hist = torch.bincount(exact.stats.first_rejected.flatten(), minlength=10)
    assert exact.stats.window == 9 and hist[9] > 0 and hist[:9].sum() > 0     # chains both pass and get corrected
    assert exact.stats.fallbacks == 0                                     # shared variance: reflection, no loop

    def threshold_and_stat(x):
        stat, null = energy_test(x, ref, torch.Generator().manual_seed(0), 32, 100)
        return stat, float(null.quantile(0.99))
    stat, limit = threshold_and_stat(flat(exact))
    assert stat <= limit, f"exact rule: energy distance {stat:.4f} > null 99% {limit:.4f}"
    stat, limit = threshold_and_stat(own)
    assert stat > limit, f"the drafter's law should be detected: {stat:.4f} <= {limit:.4f}"


def test_cspd_prefill_policies_and_fallbacks(pair):
    target, drafter = pair
    cond = torch.tensor([0, 1, 2, 0])
    rows = {}
    for T in (1.0, 42.0):
        res = generate_continuous(target, cond, drafter, CSpDRule(inner_temperature=T, gamma=2, prefill_ratio=0.25),
                                  seed=7, **CFG)
        assert not res.lossless and res.plan.contexts == "pre_draft" and res.plan.policy == "independent"
        first = mask_schedule(16, 4).counts[0]
        rnd = draw_randomness(target, 4, 7)
        made_alone = res.stats.first_rejected.gather(1, rnd.order[:, :first])
        assert bool((made_alone == -1).all()) and bool((res.stats.first_rejected >= 0).sum() == 4 * (16 - first))
        assert res.stats.target_forwards == 1 + 2 and res.stats.window == 1
        rows[T] = res.stats.acceptance_rate
    assert rows[42.0] > rows[1.0]                                         # the relaxed test accepts more
    # the last step's means 1 sigma apart (|z| = 4 x 0.25 in 16 dims): one residual try often fails
    near = MARAdapter(shifted_copy(target.model, shift=0.25, low_t=0), variance="large")
    res = generate_continuous(target, cond, near, CSpDRule(max_tries=1, gamma=2), seed=7, **CFG)
    assert res.stats.fallbacks > 0 and bool(torch.isfinite(res.tokens).all())
    assert bool((res.tokens.abs().sum(-1) > 0).all())                     # never a zero vector


# ---- bad input -----------------------------------------------------------------------------------------------------
def test_bad_inputs(pair):
    target, drafter = pair
    cond = torch.tensor([0, 1])
    gpt = tiny_gpt()
    with pytest.raises(TypeError, match="discrete-token ARModel"):
        generate_continuous(gpt, cond, drafter, CSpDRule())
    with pytest.raises(TypeError, match="discrete AcceptanceRule"):
        generate_continuous(target, cond, drafter, ExactRule())
    with pytest.raises(TypeError):                                        # and the discrete engine refuses MAR
        specdec.generate(target, cond)
    with pytest.raises(ValueError, match="token dims"):
        generate_continuous(target, cond, MARAdapter(tiny_model(vae_embed_dim=8)), GaussianChainRule())
    with pytest.raises(ValueError, match="head steps"):
        generate_continuous(target, cond, MARAdapter(tiny_model(num_sampling_steps=5)), GaussianChainRule())
    for bad in (dict(gamma=0), dict(prefill_ratio=1.0), dict(prefill_ratio=-0.1), dict(policy="greedy"),
                dict(contexts="all"), dict(num_iter=0)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            generate_continuous(target, cond, drafter, GaussianChainRule(), **bad)
    with pytest.raises(ValueError, match="temperature > 0"):
        generate_continuous(target, cond, drafter, GaussianChainRule(), temperature=0.0)
    with pytest.raises(ValueError, match="needs a rule"):
        generate_continuous(target, cond, drafter)
    with pytest.raises(ValueError, match="without a drafter"):
        generate_continuous(target, cond, rule=GaussianChainRule())
    assert LoopConfig(gamma=3).gamma == 3


# ---- the demo --------------------------------------------------------------------------------------------------
class TinyContinuousBundle:
    """The continuous zoo's shape on the tiny pair: a decoding target, the shifted drafter, a feature net."""

    classes, num_iter, cfg_scale = ("a", "b", "c"), 4, 2.0

    def __init__(self, target: MAR):
        vae = KLVAE(VAEConfig.tiny())
        self.target = MARAdapter(target, vae, variance="large")
        self.drafter = MARAdapter(shifted_copy(target), vae, variance="large")
        self.features = FakeFeatureNet()

    def class_id(self, name):
        return self.classes.index(name) if isinstance(name, str) else int(name)


def test_continuous_demo_rows_and_cli(pair, tmp_path, monkeypatch):
    bundle = TinyContinuousBundle(pair[0].model)
    assert run_continuous_demo(tmp_path, quick=True, per_class=1, repeats=1, threads=1, cfg=2.0, bundle=bundle) == 0
    rows = json.loads((tmp_path / "table.json").read_text())["rows"]
    assert (tmp_path / "samples.png").stat().st_size > 0
    fields = {"method", "drafter", "rule", "k", "mean_accepted_length", "target_forwards_per_image", "speedup",
              "feature_fd", "lossless", "latency_s", "throughput_images_per_s", "target_head_s"}
    assert all(fields <= set(r) for r in rows)
    # MAR, CSpD T=1 / 42, exact with the drafter MAR, exact with the frozen drafter
    assert [r["lossless"] for r in rows] == [True, False, False, True, True]
    assert rows[-1]["drafter"] == "frozen head (x0)" and rows[-1]["target_head_calls_per_image"] < 4 * 10
    assert rows[0]["mean_accepted_length"] == 4.0 and rows[1]["mean_accepted_length"] > 4.0
    from specdec.zoo import continuous
    monkeypatch.setattr(continuous, "available", lambda directory=None: False)
    with pytest.raises(UsageError, match="continuous zoo"):
        main(["demo", "--continuous", "--quick", "--out", str(tmp_path / "cli")])
    with pytest.raises(UsageError, match="two different demos"):
        main(["demo", "--continuous", "--video", "--out", str(tmp_path / "cli")])


def test_continuous_demo_refuses_a_device_its_bundle_is_not_on(tmp_path):
    """A given bundle stays where it is: asking for another device names the mismatch and the fix, before any
    work (a bundle that claims to be on a GPU stands in for one on a CPU-only machine)."""
    from types import SimpleNamespace

    from specdec.demo import DemoError
    elsewhere = SimpleNamespace(target=SimpleNamespace(device=torch.device("cuda", 0)))
    with pytest.raises(DemoError, match=r"given bundle is on cuda:0.*load the bundle on cpu"):
        run_continuous_demo(tmp_path, quick=True, bundle=elsewhere, device="cpu")
