"""The frozen drafter over a diffusion head's chain (drafters.frozen_head; De Bortoli et al., arXiv 2501.05370):
proposals from the target's reused prediction, exact with the Gaussian-transition rule.

Test models: the tiny MARs of test_continuous_loop. Statistical threshold (test_frozen_drafter_keeps_the_target
_law): the two-sample energy distance of whole images between 300 frozen-drafter and 300 target-only images
(independent seeds) must not exceed the 99th percentile of its 100-permutation null (1 % false alarm at this fixed
seed); the same threshold rejects the shifted drafter's own law (test_continuous_loop), so it can fail.
"""
from __future__ import annotations

import pytest
import torch

from drafters import FrozenHeadDrafter
from specdec.adapters.mar import MARAdapter
from specdec.continuous import energy_test
from specdec.continuous_loop import generate_continuous
from specdec.models.mar.diffloss import DiffLoss
from test_continuous_loop import CFG, pair, tiny_model  # noqa: F401  (pair is a fixture)
from verifiers import CSpDRule, GaussianChainRule

torch.set_num_threads(1)


@pytest.mark.parametrize("variance", ["large", "small", "learned"])
@pytest.mark.parametrize("predict", ["x0", "eps"])
@pytest.mark.parametrize("clip", [None, 0.5])
def test_reusing_a_prediction_at_its_own_state_gives_the_heads_transition(variance, predict, clip):
    head = tiny_model(3).diffloss
    g = torch.Generator().manual_seed(0)
    N, S = 64, head.num_steps
    x, t = 2 * torch.randn(N, head.token_dim, generator=g), torch.randint(0, S, (N,), generator=g)
    c = torch.randn(N, head.net.cond_embed.out_features, generator=g)
    mean, logvar = head.transition(x, t, c, 1.0, variance, clip)
    again = head.reuse(x, t, mean, logvar, x, t, predict, variance, clip)
    torch.testing.assert_close(again[0], mean, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(again[1], logvar, rtol=1e-4, atol=1e-4)


class ConstantX0(DiffLoss):
    """A head whose x0 prediction is the same at every state and step (eps chosen so): the frozen x0 drafter then
    proposes exactly the target's means."""

    def predict(self, x, t, c, cfg_k=1.0, times=None):
        _, v = super().predict(x, t, c, cfg_k, times)
        at = lambda name: self.const(name)[t][:, None] if isinstance(t, torch.Tensor) else self.const(name)[t]
        return (at("recip") * x - 0.3) / at("recipm1"), v


def test_a_prediction_that_never_changes_is_always_accepted():
    model = tiny_model(4)
    model.diffloss.__class__ = ConstantX0
    target = MARAdapter(model, variance="large")
    cond = torch.tensor([0, 1, 2])
    ref = generate_continuous(target, cond, seed=9, **CFG)
    res = generate_continuous(target, cond, FrozenHeadDrafter("x0"), GaussianChainRule(), head_window=4, seed=9,
                              **CFG)
    torch.testing.assert_close(res.tokens, ref.tokens, rtol=1e-4, atol=1e-4)
    st = res.stats
    assert st.transition_acceptance == 1.0 and st.fallbacks == 0 and res.lossless
    # S = 10: one call at x_T, then windows of 4 + the bonus: x_1 -> x_6 -> token (3 calls per AR step, not 10)
    assert st.target_head_calls == 4 * 3 and st.drafter_head_calls == 0 and st.drafter_forwards == 0


@pytest.mark.parametrize("predict,window", [("x0", 4), ("eps", 2)])
def test_frozen_drafter_keeps_the_target_law(pair, predict, window):          # noqa: F811
    target, _ = pair
    n = 300
    cond = torch.arange(n) % 3
    flat = lambda r: r.tokens.reshape(n, -1)
    ref = flat(generate_continuous(target, cond, seed=100, **CFG))
    res = generate_continuous(target, cond, FrozenHeadDrafter(predict), GaussianChainRule(), head_window=window,
                              seed=300, **CFG)
    st = res.stats
    assert res.lossless and st.fallbacks == 0                    # the schedule's shared variance: reflection only
    assert 0 < st.transition_acceptance < 1                       # both paths run
    assert st.drafter_head_calls == 0 and st.drafter_forwards == 0
    stat, null = energy_test(flat(res), ref, torch.Generator().manual_seed(0), 32, 100)
    assert stat <= float(null.quantile(0.99)), f"energy distance {stat:.4f} > null 99%"


def test_learned_variance_goes_through_the_residual_loop(pair):              # noqa: F811
    target, _ = pair
    learned = MARAdapter(target.model, variance="learned")
    res = generate_continuous(learned, torch.tensor([0, 1]), FrozenHeadDrafter(), GaussianChainRule(), seed=2,
                              **CFG)
    assert res.lossless and res.stats.fallbacks == 0 and bool(torch.isfinite(res.tokens).all())


def test_bad_inputs(pair):                                                     # noqa: F811
    target, _ = pair
    cond = torch.tensor([0, 1])
    with pytest.raises(ValueError, match="predict"):
        FrozenHeadDrafter("v")
    with pytest.raises(ValueError, match="GaussianChainRule"):
        generate_continuous(target, cond, FrozenHeadDrafter(), CSpDRule(), **CFG)
    with pytest.raises(ValueError, match="GaussianChainRule"):
        generate_continuous(target, cond, FrozenHeadDrafter(), **CFG)
    with pytest.raises(ValueError, match="gamma must be 1"):
        generate_continuous(target, cond, FrozenHeadDrafter(), GaussianChainRule(), gamma=2, **CFG)
    with pytest.raises(ValueError, match="predict"):
        target.model.diffloss.reuse(*(torch.zeros(2, 16),) * 1, torch.zeros(2, dtype=torch.long),
                                    *(torch.zeros(2, 16),) * 3, torch.zeros(2, dtype=torch.long), predict="v")
