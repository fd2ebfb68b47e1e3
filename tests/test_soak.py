"""Long runs: memory stays flat over 500 images, and after thousands of accept / reject cycles every adapter's
cache still equals a recompute from scratch (own GPT, transformers with holes and compaction, LlamaGen)."""
from __future__ import annotations

import os

import pytest
import torch

import specdec
from drafters import ModelDrafter
from specdec import Sampling
from verifiers import BoundedLanternRule, ExactRule, LanternRule, TypicalRule
from helpers import perturbed_copy, tiny_gpt


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads the resident set size from /proc")
def test_500_images_with_mixed_rules_keep_memory_flat(target):
    drafter = ModelDrafter(perturbed_copy(target, 0.4), k=3)
    codebook = torch.randn(target.vocab_size, 4, generator=torch.Generator().manual_seed(0))
    rules = [ExactRule(), LanternRule(codebook, neighbours=8, delta=0.1),
             BoundedLanternRule(codebook, neighbours=8, delta=0.1), TypicalRule()]
    cond = torch.arange(10) % 3
    rss = []
    for i in range(50):                                         # 50 x 10 = 500 images
        specdec.generate(target, cond, drafter=drafter, rule=rules[i % len(rules)],
                         sampling=Sampling(cfg_scale=1.0 + (i % 2)), seed=i)
        rss.append(_rss_bytes())
    after_warmup = max(rss[5:10])
    assert max(rss[10:]) < 1.05 * after_warmup, [r // 2 ** 20 for r in rss]


def _check_cache_after_long_run(target, cond, drafter_model, min_steps=2000):
    """Generate with many rejections; then the live cache, rolled back 3 tokens, must give the logits a fresh
    prefill + one forward over the committed tokens gives."""
    captured = {}
    forward = target.forward

    def capture(state, tokens):
        captured.setdefault("state", state)
        return forward(state, tokens)

    sampling = Sampling(cfg_scale=2.0)
    target.forward = capture
    try:
        res = specdec.generate(target, cond, drafter=ModelDrafter(drafter_model, k=2), sampling=sampling, seed=3,
                               decode=False)
    finally:
        del target.forward
    assert res.stats.steps >= min_steps and 0.1 < res.stats.acceptance_rate < 0.95, res.stats
    T = target.num_tokens
    state = captured["state"]
    target.rollback(state, torch.full((len(cond),), T - 4))
    live = target.forward(state, res.tokens[:, T - 4:T - 1])
    fresh_state, _ = target.start(cond, sampling, T + 4)
    fresh = target.forward(fresh_state, res.tokens[:, :T - 1])
    for a, b in ((live.cond, fresh.cond[:, T - 4:]), (live.uncond, fresh.uncond[:, T - 4:])):
        assert torch.allclose(a, b, atol=2e-4), (a - b).abs().max()


def test_own_gpt_cache_after_thousands_of_cycles():
    target = tiny_gpt(vocab=16, grid=(64, 64), dim=32, layers=1, heads=2, sharpen=20.0)
    unrelated = tiny_gpt(vocab=16, grid=(64, 64), dim=32, layers=1, heads=2, sharpen=20.0, seed=5)
    _check_cache_after_long_run(target, torch.tensor([0, 1]), unrelated)


def test_transformers_cache_with_holes_and_compaction_after_thousands_of_cycles():
    from transformers import LlamaConfig, LlamaForCausalLM

    from specdec.adapters.hf_causal import HFCausalAdapter

    def llama(seed):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(LlamaConfig(vocab_size=24, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                             num_attention_heads=2, num_key_value_heads=2,
                                             max_position_embeddings=4200))
        with torch.no_grad():
            model.lm_head.weight.mul_(30.0)
        return model

    prompts = lambda c: [torch.tensor([1] * (1 + int(x)) + [2 + int(x)]) for x in c]      # noqa: E731 ragged
    kwargs = dict(grid=(64, 64), uncond_prompt=torch.tensor([1, 6]), class_prompts=prompts)
    target = HFCausalAdapter(llama(0), torch.arange(8, 24), compact_every=16, **kwargs)
    draft_model = llama(0)
    with torch.no_grad():
        for p in draft_model.parameters():
            p.add_(0.5 * p.std() * torch.randn_like(p))
    _check_cache_after_long_run(target, torch.tensor([0, 1]), HFCausalAdapter(draft_model, torch.arange(8, 24),
                                                                               **kwargs))


def test_llamagen_cache_after_thousands_of_cycles():
    from specdec.adapters.llamagen import LlamaGenAdapter
    from specdec.models.llamagen import LlamaGenConfig, LlamaGenGPT

    def gpt(seed):
        torch.manual_seed(seed)
        cfg = LlamaGenConfig(vocab_size=16, block_size=64 * 64, n_layer=1, n_head=2, dim=32, num_classes=3,
                             class_dropout_prob=0.1)
        model = LlamaGenGPT(cfg)
        with torch.no_grad():
            model.output.weight.normal_(0.0, 1.0)          # LlamaGen starts its head at zero: a uniform p
        return model

    target = LlamaGenAdapter(gpt(0))
    draft = gpt(0)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(0.7 * p.std() * torch.randn_like(p))
    _check_cache_after_long_run(target, torch.tensor([0, 1]), LlamaGenAdapter(draft))
