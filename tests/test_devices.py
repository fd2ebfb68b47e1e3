"""Where generators run (specdec.devices): parsing, availability errors, the bench's device sweep and the demos'
--device. Deterministic figures only (keys, devices, counts); the CUDA runs are skipped without a GPU."""
from __future__ import annotations

import pytest
import torch

from specdec import cli
from specdec.bench import BenchConfigError, parse_config, read_rows, run_bench
from specdec.bench.config import config_key
from specdec.bench.results import execution, execution_tag, summary_rows
from specdec.devices import DEFAULT_DEVICE, available_device, device_name, use_device
from specdec.testing import tiny_random_bundle

SWEEP = {"generator": "tiny-random", "repeats": 1, "images": 2, "fd_real": 8, "save_images": 0, "warmup": 0,
         "method": [{"label": "exact + model", "drafter": "model", "drafter_params": {"k": 2}}]}
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error a machine without CUDA gives")
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_device_names_parse_and_bad_names_say_the_choices():
    assert DEFAULT_DEVICE == "cpu" and device_name(None) == "cpu"
    assert device_name("cuda") == "cuda" and device_name("cuda:1") == "cuda:1"
    assert device_name(torch.device("cpu")) == "cpu"
    for bad in ("gpu", "meta", "cuda:x", 3.5):
        with pytest.raises(ValueError, match="device must be one of cpu, cuda, mps"):
            device_name(bad)
    assert available_device(None) == torch.device("cpu") and use_device("cpu") == torch.device("cpu")


@NO_CUDA
def test_asking_for_cuda_without_it_names_the_fix():
    for check in (available_device, use_device):
        with pytest.raises(RuntimeError, match="CUDA is not available here.*device cpu"):
            check("cuda")


def test_bench_device_sweep_keeps_cpu_keys_and_lists_without_the_hardware():
    cfg = parse_config({**SWEEP, "sweep": {"batch": [2], "device": ["cpu", "cuda"]}})
    assert [r["device"] for r in cfg.runs] == ["cpu", "cpu", "cuda", "cuda"]     # listed, nothing loaded
    old_style = {k: v for k, v in cfg.runs[1].items() if k not in ("key", "device")}
    assert config_key(old_style) == cfg.runs[1]["key"]             # rows from before the device keep their key
    assert len({r["key"] for r in cfg.runs}) == 4                  # a GPU row never resumes as a CPU one
    assert execution(cfg.runs[2]) == ("float32", "off", "cuda")
    with pytest.raises(BenchConfigError, match=r"\[sweep\] device must be one of cpu, cuda, mps"):
        parse_config({**SWEEP, "sweep": {"device": ["gpu"]}})


def test_rows_name_their_device_when_a_file_mixes_devices():
    rows = [{"label": "AR", "rule": "exact", "device": device, "dtype": "float32", "compile": "off",
             "mean_accepted_length": 1.0, "target_forwards_per_image": 16.0, "speedup": 1.0, "feature_fd": None,
             "nll": None} for device in ("cpu", "cuda:0")]
    assert [execution_tag(r) for r in rows] == ["", "on cuda:0"]
    assert [m["method"] for m in summary_rows(rows)] == ["AR [float32]", "AR [on cuda:0]"]


@NO_CUDA
def test_bench_and_demo_refuse_a_missing_device_with_the_fix(tmp_path, capsys):
    cfg = parse_config({**SWEEP, "sweep": {"batch": [2], "device": ["cuda"]}})
    with pytest.raises(BenchConfigError, match="CUDA is not available here"):
        run_bench(cfg, tmp_path / "res.jsonl", progress=False)
    assert read_rows(tmp_path / "res.jsonl") == []
    toml = tmp_path / "c.toml"
    toml.write_text('generator = "tiny-random"\n[[method]]\nlabel = "AR"\n')
    assert cli.main(["bench", str(toml), "--dry-run", "--device", "cuda"]) == 0
    assert "1 configurations" in capsys.readouterr().out
    with pytest.raises(cli.UsageError, match="CUDA is not available here"):
        cli.main(["bench", str(toml), "--device", "cuda", "--out", str(tmp_path / "r.jsonl")])
    for flags in ([], ["--video"], ["--continuous"]):
        with pytest.raises(cli.UsageError, match="CUDA is not available here"):
            cli.main(["demo", "--quick", "--device", "cuda", "--out", str(tmp_path / "d"), *flags])


def test_tiny_bundle_on_the_cpu_by_name_is_the_default_bundle():
    a, b = tiny_random_bundle(), tiny_random_bundle(device="cpu")
    for (name, x), (_, y) in zip(a.target_gpt.state_dict().items(), b.target_gpt.state_dict().items()):
        assert torch.equal(x, y), name
    assert b.target.device == torch.device("cpu") and b.target.codebook.device == torch.device("cpu")


@CUDA
def test_bench_runs_on_cuda_with_rows_that_say_so(tmp_path):
    cfg = parse_config({**SWEEP, "sweep": {"batch": [2], "device": ["cpu", "cuda"]}})
    run_bench(cfg, tmp_path / "res.jsonl", progress=False)
    rows = read_rows(tmp_path / "res.jsonl")
    assert sorted(r["device"] for r in rows) == ["cpu", "cpu", "cuda:0", "cuda:0"]
    for r in rows:
        assert r["speedup"] > 0 and r["mean_accepted_length"] >= 1
    assert {m["method"] for m in summary_rows(rows)} >= {"AR [on cuda:0]", "exact + model [on cuda:0]"}


@CUDA
def test_demos_run_on_cuda(tmp_path):
    assert cli.main(["demo", "--quick", "--device", "cuda", "--per-class", "1", "--out", str(tmp_path / "i")]) == 0
    assert cli.main(["demo", "--quick", "--video", "--device", "cuda", "--per-class", "1",
                     "--out", str(tmp_path / "v")]) == 0


def test_phase_clock_sums_the_spans_of_each_phase():
    from specdec.phases import PhaseClock
    clock = PhaseClock("cpu")
    assert not clock.events
    clock.add("draft", 1.0, 1.5)
    clock.add("target", 2.0, 4.0)
    clock.add("draft", 5.0, 5.25)
    assert clock.seconds("draft") == 0.75 and clock.seconds("target") == 2.0 and clock.seconds("other") == 0.0
    start = clock.mark()
    assert clock.mark() >= start                   # the host clock on a CPU
    assert clock.run("sum", sum, [1, 2]) == 3 and clock.seconds("sum") >= 0.0


@CUDA
def test_phase_clock_times_gpu_work_with_events():
    import specdec
    from drafters.model import ModelDrafter
    from specdec import Sampling
    from specdec.phases import PhaseClock
    clock = PhaseClock("cuda")
    x = torch.randn(2048, 2048, device="cuda")
    a = clock.mark()
    for _ in range(20):
        x = x @ x / 2048
    clock.add("matmul", a, clock.mark())
    assert clock.events and clock.seconds("matmul") > 0
    b = tiny_random_bundle(device="cuda")
    res = specdec.generate(b.target, torch.arange(2, device="cuda"), drafter=ModelDrafter(b.drafter_model, k=2),
                           sampling=Sampling(), seed=0)
    assert 0 < res.stats.draft_s and 0 < res.stats.target_s
    assert res.stats.draft_s + res.stats.target_s <= res.stats.wall_s


def test_a_device_request_is_met_by_the_same_type_and_any_index_it_leaves_open():
    from specdec.devices import same_device
    cuda, cuda0, cuda1, cpu = (torch.device(d) for d in ("cuda", "cuda:0", "cuda:1", "cpu"))
    assert same_device(cuda, cuda0) and same_device(cuda, cuda1) and same_device(cuda0, cuda0)
    assert not same_device(cuda0, cuda1) and not same_device(cpu, cuda0) and not same_device(cuda, cpu)
    assert same_device(cpu, cpu)
