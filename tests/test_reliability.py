"""Bad or unusual input: a clear error naming the problem and the fix, never silent garbage or a traceback."""
from __future__ import annotations

import json

import pytest
import torch

import specdec
from drafters import ModelDrafter
from specdec import Sampling, cli
from specdec.bench import parse_config, read_rows, run_bench
from specdec.registry import make_rule, resolve
from helpers import perturbed_copy

USER_RULE = '''
import torch
from specdec.protocols import AcceptanceRule
from specdec.types import Verdict
from verifiers._kit import accept_run, correction_uniform, residual_sample, token_probs


class HalfwayRule(AcceptanceRule):
    """The exact rule, written in a user's own file."""
    lossless = True
    name = "halfway"

    def __init__(self, scale: float = 1.0):
        self.scale = scale

    def verify(self, draft_tokens, draft_probs, target_probs, rng):
        k = draft_tokens.shape[1]
        n = accept_run(rng, token_probs(target_probs, draft_tokens), token_probs(draft_probs, draft_tokens))
        return Verdict(n, residual_sample(target_probs, draft_probs, n, correction_uniform(rng, n, k)))
'''


# -- silent garbage -----------------------------------------------------------------------------------------------------
def test_nan_drafter_weights_are_named_even_with_the_exact_rule(target):
    broken = perturbed_copy(target, 0.1)
    with torch.no_grad():
        for p in broken.model.parameters():
            p.fill_(float("nan"))
    with pytest.raises(ValueError, match=r"the drafter \(ModelDrafter\).*NaN"):
        specdec.generate(target, torch.tensor([0, 1]), drafter=ModelDrafter(broken, k=4),
                         sampling=Sampling(cfg_scale=3.0), seed=0)


@pytest.mark.parametrize("kwargs,error,message", [
    (dict(temperature=1e-38), ValueError, "temperature"),
    (dict(cfg_scale=float("inf")), ValueError, "cfg_scale"),
    (dict(top_k=2.5), TypeError, "top_k must be an integer"),
    (dict(top_k=True), TypeError, "top_k must be an integer"),
    (dict(temperature="1"), TypeError, "temperature must be a number"),
])
def test_sampling_refuses_values_without_finite_probabilities(kwargs, error, message):
    with pytest.raises(error, match=message):
        Sampling(**kwargs)


def test_seeds_and_grids_are_checked_up_front(target):
    for seed in (-1, 2 ** 70, 1.5, True):
        with pytest.raises(ValueError, match="seed"):
            specdec.generate(target, torch.tensor([0]), seed=seed)
    with pytest.raises(ValueError, match="grid"):
        specdec.generate(target, torch.tensor([0]), num_tokens=target.num_tokens + 3)


# -- the command line -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv,message", [
    (["certify", "exact", "--zoo", "-1"], "--zoo must be in"),
    (["certify", "exact", "--zoo", "100000"], "--zoo must be in"),
    (["certify", "lantern", "--params", "delta=0.1"], "--params is not JSON"),
    (["certify", "lantern", "--params", "[0.1]"], "JSON object"),
    (["certify", "lantern", "--params", '{"delt": 0.1}'], "does not take these parameters"),
    (["certify", "exact", "--vocab", "1"], "--vocab must be >= 2"),
    (["certify", "exact", "--samples", "0"], "--samples must be >= 100"),
    (["certify", "no_such_rule"], "unknown rule 'no_such_rule'"),
    (["certify", "no_such_module:Rule"], "cannot import 'no_such_module'"),
    (["certify", "missing/file.py:Rule"], "not found"),
    (["demo", "--per-class", "-1"], "--per-class must be >= 0"),
    (["demo", "--repeats", "-1"], "--repeats must be >= 0"),
    (["bench", "--preset", "zoo-quick", "--threads", "-1"], "--threads must be >= 0"),
])
def test_cli_errors_are_one_line_with_exit_status_2(argv, message, capsys):
    assert cli.entry(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and "Traceback" not in err


def test_bench_out_is_checked_before_anything_is_measured(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert cli.entry(["bench", "--preset", "zoo-quick", "--out", str(blocker / "res.jsonl")]) == 2
    assert "cannot write results" in capsys.readouterr().err
    assert cli.entry(["bench", "--preset", "zoo-quick", "--out", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err


def test_report_on_rows_that_are_not_bench_rows(tmp_path, capsys):
    path = tmp_path / "other.jsonl"
    path.write_text('{"key": "a", "x": 1}\n')
    assert cli.entry(["report", str(path), "--out", str(tmp_path / "r")]) == 2
    assert "not a `specdec bench` row" in capsys.readouterr().err


def test_ctrl_c_says_how_to_continue(monkeypatch, capsys):
    def interrupted(argv=None):
        raise KeyboardInterrupt
    monkeypatch.setattr(cli, "main", interrupted)
    assert cli.entry(["bench", "--preset", "zoo-quick"]) == 130
    assert "rerun the same command to continue" in capsys.readouterr().err


# -- results files --------------------------------------------------------------------------------------------------
def test_a_corrupt_line_is_moved_aside_and_its_configuration_rerun(tmp_path):
    cfg = parse_config({"generator": "tiny-random", "repeats": 1, "images": 2, "n_classes": 2, "fd_real": 4,
                        "save_images": 0, "warmup": 0, "sweep": {"batch": [2], "cfg": [1.0]},
                        "method": [{"label": "exact + model", "drafter": "model", "drafter_params": {"k": 2}}]})
    out = tmp_path / "res.jsonl"
    run_bench(cfg, out, progress=False)
    rows = read_rows(out)
    assert len(rows) == 2
    lines = out.read_text().splitlines()
    out.write_text(lines[0] + "\n" + lines[1][: len(lines[1]) // 2] + "\n")     # a half-written row
    run_bench(cfg, out, progress=False)
    assert sorted(r["key"] for r in read_rows(out)) == sorted(r["key"] for r in rows)
    assert all(json.loads(line) for line in out.read_text().splitlines())       # valid JSON lines again
    assert (tmp_path / "res.jsonl.rejected").read_text() == lines[1][: len(lines[1]) // 2] + "\n"


# -- user rules -----------------------------------------------------------------------------------------------------
def test_a_rule_in_the_users_own_file_works_everywhere(tmp_path, capsys):
    path = tmp_path / "my_rules.py"
    path.write_text(USER_RULE)
    spec = f"{path}:HalfwayRule"
    assert resolve("rule", spec).__name__ == "HalfwayRule"
    rule = make_rule(spec, scale=0.5)
    assert rule.scale == 0.5 and rule.lossless
    assert make_rule("verifiers.exact:ExactRule").name == "exact"            # module:Class
    assert cli.entry(["certify", spec, "--samples", "2000"]) == 0
    assert "lossless" in capsys.readouterr().out
    cfg = parse_config({"generator": "tiny-random", "method": [{"label": "mine", "drafter": "lookup",
                                                                   "rule": spec}]})
    assert any(r["rule"] == spec for r in cfg.runs)
    with pytest.raises(ValueError, match="has no attribute 'Nope'"):
        resolve("rule", f"{path}:Nope")


def test_a_vacuous_certificate_says_so():
    from specdec.certify import certify, default_geometry
    from verifiers import GroupedRule, LanternRule

    report = certify(GroupedRule(default_geometry(8)), V=8, n_pairs=3, n_samples=20_000)
    assert report.vacuous and report.verdict.startswith("vacuous") and "--zoo" in report.verdict
    lantern = certify(LanternRule(default_geometry(8), neighbours=4, delta=0.2), V=8, n_pairs=3, n_samples=20_000)
    assert not lantern.vacuous and lantern.verdict.startswith("lossy")


def test_stats_print_as_one_readable_line(target):
    res = specdec.generate(target, torch.tensor([0, 1]), drafter=ModelDrafter(perturbed_copy(target, 0.3), k=3),
                           seed=0)
    text = repr(res.stats)
    assert text.startswith("SpecStats(batch=2") and "MAL=" in text and "<[2, 16] bool>" in text
    assert "\n" not in text and "tensor(" not in text


def test_default_neighbour_counts_are_clamped_quietly():
    import warnings

    from verifiers import LanternRule

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert LanternRule(torch.randn(8, 2)).neighbours == 7          # the default 1000, never chosen by the user
    with pytest.warns(UserWarning, match="neighbours = 50 asked for"):
        LanternRule(torch.randn(8, 2), neighbours=50)


def test_prompt_ids_outside_the_vocabulary_and_missing_checkpoints():
    from transformers import LlamaConfig, LlamaForCausalLM

    from specdec.adapters.hf_causal import HFCausalAdapter
    from specdec.adapters.llamagen import from_checkpoint

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64))
    adapter = HFCausalAdapter(model, torch.arange(8, 40), grid=(2, 2))
    with pytest.raises(ValueError, match=r"prompt ids \[57\] lie outside the model's vocabulary \[0, 40\)"):
        specdec.generate(adapter, torch.tensor([[1, 57]]))
    with pytest.raises(FileNotFoundError, match="checkpoint file 'nowhere/c2i_B_256.pt' not found"):
        from_checkpoint("nowhere/c2i_B_256.pt")


def test_bench_sweep_values_are_checked_not_coerced():
    from specdec.bench import BenchConfigError

    for sweep, message in (({"top_k": [2.5]}, "top_k must be an integer"), ({"temperature": ["1"]}, "a number")):
        with pytest.raises(BenchConfigError, match=message):
            parse_config({"generator": "tiny-random", "sweep": sweep,
                          "method": [{"label": "a", "drafter": "lookup"}]})
    run = parse_config({"generator": "tiny-random", "sweep": {"temperature": [1]},
                        "method": [{"label": "a", "drafter": "lookup"}]}).runs[0]
    assert run["sampling"]["temperature"] == 1.0 and isinstance(run["sampling"]["temperature"], float)


def test_the_demo_takes_a_users_rule(tmp_path, capsys, monkeypatch):
    import specdec.demo
    monkeypatch.setattr(specdec.demo, "QUICK_METHODS", specdec.demo.QUICK_METHODS[:1])   # AR, then the user's row
    path = tmp_path / "my_rules.py"
    path.write_text(USER_RULE)
    out = tmp_path / "demo"
    assert cli.entry(["demo", "--quick", "--out", str(out), "--per-class", "1", "--repeats", "1",
                      "--rule", f"{path}:HalfwayRule", "--params", '{"scale": 0.5}']) == 0
    rows = json.loads((out / "table.json").read_text())["rows"]
    assert rows[-1]["method"] == f"{path}:HalfwayRule + model k=4" and rows[-1]["mean_accepted_length"] > 1
    assert cli.entry(["demo", "--quick", "--out", str(out), "--rule", f"{path}:HalfwayRule",
                      "--params", '{"nope": 1}']) == 2
    assert "cannot build" in capsys.readouterr().err


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_per_step_checks_flag_exactly_the_bad_values(dtype):
    """The engine's on-device checks (one reduction per tensor): logits with NaN or +inf are flagged, -inf (a mask)
    is not; a draft q with NaN, +inf or a negative value is flagged; probabilities with a NaN are flagged."""
    from specdec.step import invalid_probs
    from specdec.sampling import nan_probs, nonfinite
    logits = torch.randn(2, 3, 50).to(dtype)
    assert not nonfinite(logits, None) and not nonfinite(logits.masked_fill(logits < 0, float("-inf")), logits)
    for bad in (float("nan"), float("inf")):
        broken = logits.clone()
        broken[1, 2, 7] = bad
        assert nonfinite(logits, broken) and nonfinite(broken, None)
    q = torch.rand(2, 3, 50).softmax(-1)
    assert not invalid_probs(q) and not invalid_probs(None)
    for bad in (float("nan"), float("inf"), -1e-3):
        broken = q.clone()
        broken[0, 1, 3] = bad
        assert invalid_probs(broken)
    assert not nan_probs(q)
    q[1, 0, 0] = float("nan")
    assert nan_probs(q)
