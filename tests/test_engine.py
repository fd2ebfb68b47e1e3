"""The core engine: lossless, batched, CFG-aware speculative decoding (deterministic counters only)."""
from __future__ import annotations

import math

import pytest
import torch

import specdec
from drafters import ModelDrafter
from specdec import Sampling
from helpers import GREEDY, fit_of, perturbed_copy, tiny_gpt

@pytest.fixture(scope="module")
def unrelated():
    return tiny_gpt(vocab=64, grid=(4, 4), dim=32, layers=1, seed=7, sharpen=3.0)


# 1. Drafter identical to the target ---------------------------------------------------------------------------
@pytest.mark.parametrize("sampling", [GREEDY, Sampling(temperature=1.0), Sampling(temperature=1.0, cfg_scale=3.0),
                                      Sampling(temperature=0.8, top_k=10, top_p=0.9)])
@pytest.mark.parametrize("k", [2, 4])
def test_oracle_drafter_accepts_everything_and_matches_ar(target, sampling, k):
    cond = torch.tensor([0, 1, 2, 1])
    ar = specdec.generate(target, cond, sampling=sampling, seed=11)
    spec = specdec.generate(target, cond, drafter=ModelDrafter(target, k=k), sampling=sampling, seed=11)
    assert torch.equal(ar.tokens, spec.tokens)
    T = target.num_tokens
    steps = math.ceil((T - 1) / (k + 1))          # token 0 comes from the prefill
    assert spec.stats.acceptance_rate == 1.0
    assert spec.stats.target_forwards_per_image == steps
    assert spec.stats.mean_accepted_length == pytest.approx((T - 1) / steps)
    assert ar.stats.mean_accepted_length == 1.0
    assert ar.stats.target_forwards_per_image == T - 1
    # every full step commits k+1: all but the last step
    assert spec.stats.accepted_per_position.tolist() == [len(cond) * (steps - (j >= (T - 1) % (k + 1) > 0))
                                                          for j in range(k)]


# 2. Greedy speculative == greedy AR -----------------------------------------------------------------------------
@pytest.mark.parametrize("k", [1, 3, 8])
@pytest.mark.parametrize("cfg", [1.0, 3.0])
@pytest.mark.parametrize("batch", [1, 5])
def test_greedy_speculative_equals_greedy_ar(target, unrelated, k, cfg, batch):
    cond = torch.arange(batch) % 3
    sampling = Sampling(temperature=0.0, cfg_scale=cfg)
    ar = specdec.generate(target, cond, sampling=sampling, seed=0)
    spec = specdec.generate(target, cond, drafter=ModelDrafter(unrelated, k=k), sampling=sampling, seed=0)
    assert torch.equal(ar.tokens, spec.tokens)
    assert spec.stats.committed == batch * (target.num_tokens - 1)


def test_greedy_ar_matches_a_plain_recompute_loop(target):
    """Plain AR through the loop equals argmax decoding by full recomputation (no cache)."""
    cond = torch.tensor([2, 0])
    out = specdec.generate(target, cond, sampling=GREEDY).tokens
    model = target.model
    seq = torch.zeros(2, 0, dtype=torch.long)
    for _ in range(target.num_tokens):
        padded = torch.cat([seq, torch.zeros(2, 1, dtype=torch.long)], 1)
        logits = model.forward_train(padded, cond)[:, -1]
        seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, seq)


# 3. Exactness under sampling --------------------------------------------------------------------------------------
SAMPLINGS = {
    "plain": Sampling(),
    "temperature": Sampling(temperature=0.7),
    "top_k": Sampling(top_k=3),
    "top_p": Sampling(top_p=0.85),
    "cfg": Sampling(cfg_scale=2.5),
}


@pytest.fixture(scope="module")
def enumerable():
    """V = 5, T = 4: 625 sequences; the drafter is a noisy copy so drafts are accepted about half the time."""
    target = tiny_gpt(vocab=5, grid=(4,), dim=32, heads=2, classes=2, sharpen=25.0)
    return target, perturbed_copy(target, noise=0.8)


@pytest.mark.parametrize("name", list(SAMPLINGS))
def test_speculative_sampling_is_exact(enumerable, name):
    """Chi-square goodness of fit against the enumerated joint law: p > 0.001; TVD below 2x the noise level of
    an exact sampler with as many samples (both measured)."""
    target, drafter = enumerable
    sampling = SAMPLINGS[name]
    fit, res = fit_of(target, ModelDrafter(drafter, k=2), sampling, n=24000, seed=1234)
    assert fit.p_value > 1e-3, str(fit)
    assert fit.tvd < 2 * fit.tvd_noise + 1e-3, str(fit)
    # the test means something only if drafts were both accepted and rejected
    assert 0.1 < res.stats.acceptance_rate < 0.95, res.stats.acceptance_rate


# 5. Batch independence -------------------------------------------------------------------------------------------
def test_row_output_does_not_depend_on_its_batch(target, unrelated):
    sampling = Sampling(temperature=1.0, cfg_scale=2.0)
    alone = specdec.generate(target, torch.tensor([1]), drafter=ModelDrafter(unrelated, k=3), sampling=sampling,
                             seed=5)
    batch = specdec.generate(target, torch.tensor([1, 0, 2, 2, 0, 1]), drafter=ModelDrafter(unrelated, k=3),
                             sampling=sampling, seed=5)
    assert torch.equal(alone.tokens[0], batch.tokens[0])


def test_rows_accept_different_numbers_in_the_same_step(target):
    """Ragged acceptance: no throttling to the slowest row."""
    from specdec.protocols import DecodeContext

    drafter = ModelDrafter(perturbed_copy(target, noise=0.5), k=4)
    seen = []
    original = drafter.observe

    def spy(verdict, target_probs):
        seen.append(verdict.n_accepted.clone())
        original(verdict, target_probs)

    drafter.observe = spy
    res = specdec.generate(target, torch.tensor([0, 1, 2, 0, 1, 2]), drafter=drafter, sampling=Sampling(), seed=3)
    assert any(len(set(n.tolist())) > 1 for n in seen)
    # the drafter read the generation through a DecodeContext that the engine kept up to date in place
    ctx = drafter.ctx
    assert isinstance(ctx, DecodeContext) and ctx.target is target and ctx.num_tokens == target.num_tokens
    assert torch.equal(ctx.tokens[:, :target.num_tokens], res.tokens)
    assert bool((ctx.n_done >= target.num_tokens).all())


# 6. KV cache integrity --------------------------------------------------------------------------------------------
def test_cache_matches_fresh_forward_after_many_rollbacks(target):
    """After many accept/reject cycles, the target's cached logits for the committed prefix equal a fresh forward."""
    drafter = ModelDrafter(perturbed_copy(target, noise=0.6), k=3)
    cond = torch.tensor([0, 1, 2, 1, 0])
    captured = {}
    original_forward = target.forward

    def capture(state, tokens):
        captured["state"] = state
        return original_forward(state, tokens)

    target.forward = capture
    try:
        res = specdec.generate(target, cond, drafter=drafter, sampling=Sampling(cfg_scale=2.0), seed=9)
    finally:
        del target.forward
    state = captured["state"]
    lengths = state.cache.lengths.clone()
    # re-run the committed tokens through the live (rolled-back) cache and through a fresh model call
    T = target.num_tokens
    keep = torch.full((len(cond),), T - 4)
    target.rollback(state, keep)
    cached = target.forward(state, res.tokens[:, T - 4:T - 1]).cond
    fresh = target.model.forward_train(res.tokens, cond)[:, T - 3:]
    assert torch.allclose(cached, fresh, atol=1e-4)
    assert lengths.min() >= 1


def test_hf_adapter_cache_with_holes_and_compaction():
    """The transformers path: holes plus compaction keep greedy spec identical to greedy AR."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from specdec.adapters.hf_causal import HFCausalAdapter

    def llama(hidden, layers, seed):
        torch.manual_seed(seed)
        return LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=hidden, intermediate_size=2 * hidden,
                                            num_hidden_layers=layers, num_attention_heads=4,
                                            num_key_value_heads=4, max_position_embeddings=128))

    ids = torch.arange(8, 40)
    prompts = lambda c: [torch.tensor([1] * (1 + int(x)) + [2 + int(x)]) for x in c]   # ragged prompts
    target = HFCausalAdapter(llama(64, 2, 0), ids, grid=(5, 5), uncond_prompt=torch.tensor([1, 6]),
                             class_prompts=prompts, compact_every=2)
    drafter = HFCausalAdapter(llama(32, 1, 1), ids, grid=(5, 5), uncond_prompt=torch.tensor([1, 6]),
                              class_prompts=prompts, compact_every=3)
    cond = torch.tensor([0, 1, 2])
    for sampling in (GREEDY, Sampling(temperature=0.0, cfg_scale=2.0)):
        ar = specdec.generate(target, cond, sampling=sampling)
        spec = specdec.generate(target, cond, drafter=ModelDrafter(drafter, k=3), sampling=sampling)
        assert torch.equal(ar.tokens, spec.tokens)
    # against transformers' own greedy generate for row 0 (no CFG)
    out = target.model.generate(prompts([0])[0][None], max_new_tokens=25, min_new_tokens=25, do_sample=False,
                                bad_words_ids=[[i] for i in range(8)])
    ar = specdec.generate(target, cond[:1], sampling=GREEDY)
    assert torch.equal(out[0, 2:], ar.tokens[0] + 8)


# 7. Bad input -------------------------------------------------------------------------------------------------------
def test_mismatched_vocab(target):
    other = tiny_gpt(vocab=32, grid=(4, 4))
    with pytest.raises(ValueError, match="vocabulary"):
        specdec.generate(target, torch.tensor([0]), drafter=ModelDrafter(other, k=2))


def test_bad_k(target):
    with pytest.raises(ValueError, match="k"):
        ModelDrafter(target, k=0)


def test_nonfinite_logits(target):
    broken = tiny_gpt(vocab=64, grid=(4, 4), seed=3)
    with torch.no_grad():
        broken.model.head.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        specdec.generate(broken, torch.tensor([0, 1]))


def test_wrong_cond_shape(target):
    with pytest.raises(TypeError, match="shape"):
        specdec.generate(target, torch.tensor([[0, 1]]))
    with pytest.raises(ValueError, match="class ids"):
        specdec.generate(target, torch.tensor([5]))


def test_cfg_without_unconditional_path():
    from transformers import LlamaConfig, LlamaForCausalLM

    from specdec.adapters.hf_causal import HFCausalAdapter

    model = LlamaForCausalLM(LlamaConfig(vocab_size=20, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=4))
    adapter = HFCausalAdapter(model, torch.arange(4, 20), grid=(2, 2))
    with pytest.raises(ValueError, match="unconditional"):
        specdec.generate(adapter, torch.tensor([[1, 2]]), sampling=Sampling(cfg_scale=3.0))


def test_num_tokens_beyond_context(target):
    with pytest.raises(ValueError, match="context"):
        specdec.generate(target, torch.tensor([0]), num_tokens=500)


def test_bad_sampling_values():
    with pytest.raises(ValueError, match="top_p"):
        Sampling(top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        Sampling(temperature=-1)


def test_stats_are_returned_as_data(target, unrelated):
    res = specdec.generate(target, torch.tensor([0, 1]), drafter=ModelDrafter(unrelated, k=3), seed=0)
    d = res.stats.as_dict()
    assert d["committed"] == 2 * (target.num_tokens - 1)
    assert res.stats.acceptance_map.shape == (2, target.num_tokens)
    assert int(res.stats.acceptance_map.sum()) == res.stats.accepted
    assert res.stats.draft_forwards > 0 and len(d["acceptance_per_position"]) == 3


def test_per_row_forwards_and_the_standard_error_of_mal(target, unrelated):
    from specdec.metrics import mal_standard_error

    res = specdec.generate(target, torch.tensor([0, 1, 2, 1]), drafter=ModelDrafter(unrelated, k=3), seed=0)
    st, c = res.stats, target.num_tokens - 1
    assert st.forwards_per_row.shape == (4,) and int(st.forwards_per_row.sum()) == st.target_forwards
    # a row's forwards: its committed tokens less those from drafts, plus at most its last, window-cut forward
    own = c - st.acceptance_map.sum(1)
    assert ((st.forwards_per_row - own) >= 0).all() and ((st.forwards_per_row - own) <= 1).all()
    # the delta-method standard error of the ratio MAL = n c / sum f, by hand for f = (10, 20, 30, 40), c = 60
    f = torch.tensor([10, 20, 30, 40])
    mal = 4 * 60 / 100
    se = math.sqrt(sum((60 - mal * x) ** 2 for x in (10, 20, 30, 40)) / (4 * 3)) / 25
    assert mal_standard_error(f, 60) == pytest.approx(se)
    assert mal_standard_error(torch.full((5,), 7), 21) == 0.0          # no spread, no error
    assert mal_standard_error(torch.tensor([9]), 21) is None           # one image has no spread
