"""Compute precision (specdec.precision): parsing, the tiny bundle, zoo and bench in bfloat16. Deterministic
figures only (keys, dtypes, counts); no wall-clock assertions."""
from __future__ import annotations

import pytest
import torch

import specdec
from drafters.eagle import eagle
from drafters.model import ModelDrafter
from specdec import Sampling
from specdec.bench import BenchConfigError, parse_config, read_rows, run_bench
from specdec.bench.config import config_key
from specdec.precision import DEFAULT_DTYPE, as_dtype, dtype_name
from specdec.testing import tiny_random_bundle

SWEEP = {"generator": "tiny-random", "repeats": 1, "images": 2, "fd_real": 8, "save_images": 0, "warmup": 0,
         "method": [{"label": "exact + model", "drafter": "model", "drafter_params": {"k": 2}}]}


def test_dtype_names_parse_and_bad_names_say_the_choices():
    assert as_dtype(None) is torch.float32 and DEFAULT_DTYPE == "float32"
    assert as_dtype("bfloat16") is torch.bfloat16 and as_dtype("torch.float16") is torch.float16
    assert as_dtype(torch.bfloat16) is torch.bfloat16 and dtype_name(torch.bfloat16) == "bfloat16"
    for bad in ("bf16", torch.int8, 3):
        with pytest.raises(ValueError, match="float32, bfloat16, float16"):
            as_dtype(bad)


def test_tiny_bundle_in_bfloat16_holds_the_float32_weights_rounded():
    full, half = tiny_random_bundle(), tiny_random_bundle(dtype="bfloat16")
    for a, b in ((full.target_gpt, half.target_gpt), (full.eagle_head, half.eagle_head)):
        for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
            assert y.dtype is torch.bfloat16, name
            assert torch.equal(x.to(torch.bfloat16), y), name
    assert half.target.token_embeddings.dtype is torch.bfloat16        # adapters built after the cast


@pytest.mark.parametrize("drafter", ["model", "eagle"])
def test_speculative_decoding_runs_in_bfloat16_with_float32_probabilities(drafter):
    b = tiny_random_bundle(dtype="bfloat16")
    d = ModelDrafter(b.drafter_model, k=3) if drafter == "model" else eagle(b.eagle_head, k=3)
    res = specdec.generate(b.target, torch.tensor([0, 1, 2]), drafter=d, sampling=Sampling(cfg_scale=3.0), seed=0)
    again = specdec.generate(b.target, torch.tensor([0, 1, 2]), drafter=d, sampling=Sampling(cfg_scale=3.0), seed=0)
    assert torch.equal(res.tokens, again.tokens)                       # explicit randomness, same seed
    assert res.tokens.min() >= 0 and res.tokens.max() < b.target.vocab_size
    assert res.stats.mean_accepted_length > 1.0 and res.images.dtype is torch.float32
    logits = b.target.forward(b.target.start(torch.tensor([0]), Sampling(), 8)[0], torch.tensor([[1, 2]]))
    assert logits.cond.dtype is torch.bfloat16                          # the model computes in bf16 ...
    assert specdec.sampling.to_probs(logits.cond, None, Sampling()).dtype is torch.float32   # ... sampling does not


def test_zoo_loads_its_generative_models_in_bfloat16_and_keeps_the_rest_float32():
    bundle = specdec.zoo.load(dtype="bfloat16")
    for module in (bundle.target_gpt, bundle.drafter_gpt, bundle.eagle_head):
        assert next(module.parameters()).dtype is torch.bfloat16
    for module in (bundle.tokenizer, bundle.features):
        assert next(module.parameters()).dtype is torch.float32
    res = specdec.generate(bundle.target, torch.tensor([1]), drafter=eagle(bundle.eagle_head, k=4),
                           sampling=Sampling(cfg_scale=3.0), seed=0)
    assert res.images.shape == (1, 3, 48, 48) and torch.isfinite(res.images).all()
    assert res.stats.mean_accepted_length > 1.5          # the head still drafts the bf16 target well


def test_bench_sweeps_dtypes_with_stable_float32_keys(tmp_path):
    cfg = parse_config({**SWEEP, "sweep": {"batch": [2], "cfg": [1.0], "dtype": ["float32", "bfloat16"]}})
    assert [r["dtype"] for r in cfg.runs] == ["float32", "float32", "bfloat16", "bfloat16"]
    old_style = {k: v for k, v in cfg.runs[1].items() if k not in ("key", "dtype")}
    assert config_key(old_style) == cfg.runs[1]["key"]                # rows from before the dtype keep their key
    assert len({r["key"] for r in cfg.runs}) == 4
    run_bench(cfg, tmp_path / "res.jsonl", progress=False)
    rows = read_rows(tmp_path / "res.jsonl")
    assert sorted((r["dtype"], r["is_baseline"]) for r in rows) == [
        ("bfloat16", False), ("bfloat16", True), ("float32", False), ("float32", True)]
    for r in rows:          # each method timed against the AR baseline of its own dtype
        assert r["config"]["dtype"] == r["dtype"] and r["speedup"] > 0
    from specdec.bench.results import summary_rows
    assert sorted(m["method"] for m in summary_rows(rows)) == [
        "AR [bfloat16]", "AR [float32]", "exact + model [bfloat16]", "exact + model [float32]"]
    assert [m["method"] for m in summary_rows(rows[:1])] == [rows[0]["label"]]     # one way: labels as they are
    with pytest.raises(BenchConfigError, match=r"\[sweep\] dtype must be one of"):
        parse_config({**SWEEP, "sweep": {"dtype": ["bf16"]}})


def test_bench_runs_a_compiled_target_with_the_eager_counts(tmp_path):
    """compile changes how the target's step runs, not what it computes: same MAL and forwards (float32)."""
    method = {"label": "exact + eagle", "drafter": "eagle", "drafter_params": {"k": 3, "compile": "freeze"}}
    cfg = parse_config({**SWEEP, "method": [method], "sweep": {"batch": [2], "compile": ["off", "freeze"]}})
    assert [r["compile"] for r in cfg.runs] == ["off", "off", "freeze", "freeze"]
    run_bench(cfg, tmp_path / "res.jsonl", progress=False)
    rows = {(r["compile"], r["is_baseline"]): r for r in read_rows(tmp_path / "res.jsonl")}
    assert len(rows) == 4
    for base in (True, False):
        off, frozen = rows["off", base], rows["freeze", base]
        assert off["mean_accepted_length"] == frozen["mean_accepted_length"]
        assert off["target_forwards_per_image"] == frozen["target_forwards_per_image"]
    assert rows["off", False]["mean_accepted_length"] > 1
    with pytest.raises(BenchConfigError, match=r"\[sweep\] compile must be one of off, on, freeze"):
        parse_config({**SWEEP, "sweep": {"compile": ["fast"]}})
    with pytest.raises(ValueError, match="compile must be False, True or 'freeze'"):
        ModelDrafter(None, k=2, compile="fast")


def test_bench_and_demo_commands_take_a_dtype(tmp_path, capsys):
    from specdec import cli
    toml = tmp_path / "c.toml"
    toml.write_text('generator = "tiny-random"\n[[method]]\nlabel = "AR"\n')
    assert cli.main(["bench", str(toml), "--dry-run", "--dtype", "bfloat16", "--compile", "freeze"]) == 0
    assert "1 configurations" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.main(["bench", str(toml), "--dry-run", "--dtype", "bf16"])
    assert "invalid choice" in capsys.readouterr().err
    with pytest.raises(cli.UsageError, match="float32 only"):
        cli.main(["demo", "--continuous", "--quick", "--dtype", "bfloat16", "--out", str(tmp_path / "d")])


def test_continuous_zoo_networks_in_bfloat16_keep_float32_chains():
    """MAR networks compute in bf16; the head's transition means, the chain and the autoencoder stay float32, and
    the exact rule still runs (its law is the bf16 target's)."""
    from specdec.continuous_loop import generate_continuous
    from specdec.zoo import continuous
    from verifiers.gaussian_chain import GaussianChainRule
    if not continuous.available():
        pytest.skip("the continuous zoo weights are not in the package")
    bundle = continuous.load(dtype="bfloat16")
    for adapter in (bundle.target, bundle.drafter):
        assert next(adapter.model.parameters()).dtype is torch.bfloat16
    assert next(bundle.autoencoder.parameters()).dtype is torch.float32
    res = generate_continuous(bundle.target, torch.tensor([1]), bundle.drafter, GaussianChainRule(),
                              num_iter=bundle.num_iter, cfg=bundle.cfg_scale, seed=0)
    assert res.tokens.dtype is torch.float32 and torch.isfinite(res.tokens).all()
    assert 0.3 < res.tokens.std() < 3 and torch.isfinite(res.images).all()
