"""specdec bench / report: resume, multi-process merge, report files, config validation. Tiny random generator,
CPU; no wall-clock assertions (only keys and deterministic counters are compared)."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
from pathlib import Path

import pytest
import torch

from specdec import bench, cli
from specdec.bench import Abort, BenchConfigError, load_config, parse_config, read_rows, run_bench

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = Path(__file__).parent / "fixtures" / "bench_small.jsonl"

SMALL = """
generator = "tiny-random"
repeats = 1
images = 2
n_classes = 2
fd_real = 8
save_images = 2
warmup = 0
scorers = ["specdec.bench:MeanBrightness"]

[sweep]
batch = [2]
cfg = [1.0]
seed = [0, 1]

[[method]]
label = "exact + model k={k}"
drafter = "model"
drafter_params = { k = [2, 3] }

[[method]]
label = "lantern + lookup"
drafter = "lookup"
rule = "lantern"
rule_params = { k = 4, delta = 0.1 }
"""
N_SMALL = 8     # 2 seeds x (AR + 2 model + 1 lookup)
COUNTERS = ("mean_accepted_length", "target_forwards_per_image", "acceptance_rate", "acceptance_per_position")


@pytest.fixture
def small_cfg(tmp_path):
    p = tmp_path / "small.toml"
    p.write_text(SMALL)
    return p


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _keys(rows):
    return [r["key"] for r in rows]


def test_rows_have_every_figure(small_cfg, tmp_path, one_thread):
    cfg = load_config(small_cfg)
    assert len(cfg.runs) == N_SMALL
    out = tmp_path / "res.jsonl"
    run_bench(cfg, out, progress=False)
    rows = read_rows(out)
    assert sorted(_keys(rows)) == sorted(r["key"] for r in cfg.runs)
    for r in rows:
        for f in ("mean_accepted_length", "acceptance_rate", "acceptance_per_position", "target_forwards_per_image",
                  "wall_per_image_s", "speedup", "draft_share", "feature_fd", "nll", "tvd_vs_baseline",
                  "distortion_bound", "metric", "device", "dtype", "batch", "sampling", "acceptance_map"):
            assert f in r, f
        assert len(r["acceptance_map"]) == 16 and r["grid"] == [4, 4]
        assert (tmp_path / r["image_path"]).is_file()
        assert "mean_brightness" in r["scores"] and "feature_fd" in r["metric"]
        assert r["weights"] == {}                 # tiny random generator: no zoo cards to name
        if r["is_baseline"]:
            assert r["mean_accepted_length"] == 1.0 and r["tvd_vs_baseline"] == 0.0 and r["speedup"] == 1.0
            assert r["distortion_bound"] == 0.0
        elif r["rule"] == "lantern":
            assert r["drafter"] == "lookup" and r["distortion_bound"] == 0.1    # one-hot drafts: delta
        else:
            assert r["distortion_bound"] == 0.0 and r["mean_accepted_length"] >= 1.0
            assert len(r["acceptance_per_position"]) == r["k"]


def test_resume_after_interruptions_runs_each_config_once(small_cfg, tmp_path, one_thread):
    cfg = load_config(small_cfg)
    out = tmp_path / "res.jsonl"
    with pytest.raises(Abort):
        run_bench(cfg, out, max_rows=3, progress=False)
    assert len(read_rows(out)) == 3

    # a callback that raises (a crash) after two more rows; then a torn half-written line (a kill mid-write)
    seen = []

    def crash(row):
        seen.append(row["key"])
        if len(seen) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_bench(cfg, out, on_row=crash, progress=False)
    with open(out, "a") as f:
        f.write('{"key": "torn')
    # a leftover part file of an interrupted multi-process run holds one more finished row
    first5 = _keys(read_rows(out))
    assert len(first5) == 5
    pending = [r for r in cfg.runs if r["key"] not in first5]
    fake = {"key": pending[0]["key"], "label": pending[0]["label"], "from_part": True}
    (tmp_path / "res.part1.jsonl").write_text(json.dumps(fake) + "\n")

    written = run_bench(cfg, out, progress=False)
    assert len(written) == N_SMALL - 6                       # nothing finished is repeated
    rows = read_rows(out)
    assert sorted(_keys(rows)) == sorted(r["key"] for r in cfg.runs)     # each exactly once
    assert _keys(rows)[:5] == first5 and any(r.get("from_part") for r in rows)
    assert not list(tmp_path.glob("res.part*.jsonl"))
    assert run_bench(cfg, out, progress=False) == []         # a finished sweep reruns nothing


def test_redo_measures_matching_rows_again_in_their_places_and_keeps_the_old(small_cfg, tmp_path, one_thread,
                                                                               capsys):
    out = tmp_path / "res.jsonl"
    run_bench(load_config(small_cfg), out, progress=False)
    before = read_rows(out)
    for r in before:                       # mark the old rows so the new ones can be told apart
        r["old"] = True
    out.write_text("".join(json.dumps(r) + "\n" for r in before))
    assert cli.main(["bench", str(small_cfg), "--out", str(out), "--redo", "lantern*", "--no-progress"]) == 0
    after = read_rows(out)
    assert _keys(after) == _keys(before)                              # same rows, same order
    redone = [r for r in after if "old" not in r]
    assert [r["label"] for r in redone] == ["lantern + lookup"] * 2   # both seeds, nothing else
    replaced = read_rows(tmp_path / "res.replaced.jsonl")
    assert sorted(_keys(replaced)) == sorted(_keys(redone)) and all(r["old"] for r in replaced)
    for new in redone:                                                # same counts: the same deterministic run
        old = next(r for r in replaced if r["key"] == new["key"])
        assert all(new[c] == old[c] for c in COUNTERS)
    capsys.readouterr()
    with pytest.raises(cli.UsageError, match="matches no configuration's label; labels: AR, exact"):
        cli.main(["bench", str(small_cfg), "--out", str(out), "--redo", "*eagle*"])
    assert cli.main(["bench", str(small_cfg), "--dry-run", "--redo", "exact*"]) == 0
    assert capsys.readouterr().out.count("(redo)") == 4


def test_stale_rows_are_those_whose_used_weights_changed(tmp_path):
    from specdec.bench.stale import changed_weights, installed_weights, stale_note
    old = {"target": "t1", "vq": "v1", "drafter": "d1", "eagle": "e1"}
    rows = [{"label": "AR", "drafter": None, "weights": old},
            {"label": "exact + eagle k=4", "drafter": "eagle", "weights": old},
            {"label": "exact + model k=4", "drafter": "model", "weights": old},
            {"label": "exact + jacobi", "drafter": "jacobi", "weights": None}]          # from before `weights`
    new_eagle = {**old, "eagle": "e2"}
    assert [changed_weights(r, new_eagle) for r in rows] == [{}, {"eagle": ("e1", "e2")}, {}, {}]
    note = stale_note(rows, new_eagle)
    assert note.startswith("note: 1 rows") and "eagle e1 -> e2" in note and "exact + eagle k=4" in note
    assert "AR" not in note.split(":", 2)[2]                  # the head did not make the AR row stale
    new_target = {**old, "target": "t2"}
    assert [bool(changed_weights(r, new_target)) for r in rows] == [True, True, True, False]
    assert stale_note(rows, old) is None
    gone = {k: v for k, v in old.items() if k != "drafter"}
    assert changed_weights(rows[2], gone) == {"drafter": ("d1", "")}
    for name, sha in (("target", "ab" * 32), ("eagle", "cd" * 32)):
        (tmp_path / f"{name}.json").write_text(json.dumps({"sha256": sha}))
    assert installed_weights(tmp_path) == {"eagle": "cd" * 6, "target": "ab" * 6}


def test_committed_results_describe_the_shipped_weights():
    """A retrained zoo model without its rows measured again fails here, not silently in the README's figures."""
    from specdec.bench.stale import installed_weights, stale_note
    installed = installed_weights()
    for path in sorted((ROOT / "docs" / "results").rglob("*.jsonl")):
        assert stale_note(read_rows(path), installed) is None, path.name


def test_bench_command_names_rows_measured_with_other_weights(small_cfg, tmp_path, one_thread, capsys,
                                                              monkeypatch):
    from specdec.bench import command
    out = tmp_path / "res.jsonl"
    run_bench(load_config(small_cfg), out, progress=False)
    rows = read_rows(out)
    for r in rows:
        r["weights"] = {"target": "old"}
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.setattr(command, "installed_weights", lambda: {"target": "new"})
    capsys.readouterr()
    assert cli.main(["bench", str(small_cfg), "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert f"note: {N_SMALL} rows were measured with other weights" in printed and "target old -> new" in printed
    monkeypatch.setattr(command, "installed_weights", lambda: {"target": "old"})
    assert cli.main(["bench", str(small_cfg), "--out", str(out), "--no-progress"]) == 0
    assert "note:" not in capsys.readouterr().out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_accelerate_run_merges_to_the_one_process_rows(small_cfg, tmp_path, one_thread):
    if shutil.which("accelerate") is None:
        pytest.skip("the `accelerate` launcher is not installed")
    one = tmp_path / "one.jsonl"
    run_bench(load_config(small_cfg), one, progress=False)

    two = tmp_path / "two" / "res.jsonl"
    # On CPU, accelerate 1.15 only starts N processes through its torch.distributed.run path (--multi_gpu);
    # `--cpu --num_processes N` starts one process unless an MPI hostfile is given. PartialState(cpu=True) then
    # runs gloo on CPU.
    cmd = ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
           "-m", "specdec.cli", "bench", str(small_cfg), "--out", str(two), "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    log = proc.stdout + proc.stderr
    if proc.returncode != 0:
        if "specdec" not in log.split("Traceback")[-1]:
            pytest.skip(f"accelerate cannot launch 2 processes on this machine: {log[-800:]}")
        pytest.fail(log[-3000:])
    rows_one, rows_two = read_rows(one), read_rows(two)
    assert sorted(_keys(rows_two)) == sorted(_keys(rows_one))          # same set, each once
    assert {r["process_index"] for r in rows_two} == {0, 1} and {r["num_processes"] for r in rows_two} == {2}
    assert not list(two.parent.glob("res.part*.jsonl"))
    by_key = {r["key"]: r for r in rows_one}
    for r in rows_two:
        for c in COUNTERS:
            assert r[c] == by_key[r["key"]][c], (r["label"], c)


def test_report_builds_every_file_from_the_fixture(tmp_path):
    from specdec.plots import _plt
    from specdec.report import make_report

    res = tmp_path / "r.jsonl"
    shutil.copy(FIXTURE, res)
    rows = read_rows(res)
    for r in rows[:4]:                                       # some rows have their saved images, others do not
        p = tmp_path / r["image_path"]
        p.parent.mkdir(exist_ok=True)
        _plt().imsave(p, torch.rand(8, 16, 3).numpy())
    files = make_report(res, tmp_path / "rep")
    names = {Path(f).name for f in files}
    assert {"pareto_fd.png", "pareto_nll.png", "mal_vs_k.png", "acceptance.png", "samples.png",
            "table.md"} <= names
    for f in files:
        assert Path(f).is_file() and Path(f).stat().st_size > 0
        if str(f).endswith(".png"):
            assert Path(f).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and Path(f).stat().st_size > 2000
    table = (tmp_path / "rep" / "table.md").read_text()
    assert table.count("\n| ") == len(rows) + 1 and "none" in table and "feature_fd" in table
    with pytest.raises(ValueError, match="labels"):
        make_report(res, tmp_path / "rep2", heatmaps=["no such method"])
    with pytest.raises(FileNotFoundError, match="not found"):
        make_report(tmp_path / "missing.jsonl", tmp_path / "rep3")


def _raw(**method):
    return {"generator": "tiny-random", "method": [{"label": "m", **method}]}


def test_bad_configs_give_clear_errors(tmp_path):
    with pytest.raises(BenchConfigError, match=r"unknown rule 'exactt'.*valid rules: bounded_lantern, exact"):
        parse_config(_raw(rule="exactt"))
    with pytest.raises(BenchConfigError, match=r"unknown drafter 'medusa'.*valid drafters: eagle, jacobi, jacobi_tree, lookup, model"):
        parse_config(_raw(drafter="medusa"))
    with pytest.raises(BenchConfigError, match=r"k must be an integer >= 1, got -2"):
        parse_config(_raw(drafter="model", drafter_params={"k": [2, -2]}))
    with pytest.raises(BenchConfigError, match=r"window must be an integer >= 2"):
        parse_config(_raw(drafter="jacobi", drafter_params={"window": 1}))
    with pytest.raises(BenchConfigError, match=r"delta must be in \[0, 1\]"):
        parse_config(_raw(drafter="model", rule="lantern", rule_params={"delta": 3.0}))
    with pytest.raises(BenchConfigError, match=r"unknown generator 'gpt5'; valid generators: tiny-random, video-zoo, zoo"):
        parse_config({**_raw(), "generator": "gpt5"})
    with pytest.raises(BenchConfigError, match=r"unknown \[sweep\] keys \['temp'\]; valid keys: batch, cfg"):
        parse_config({**_raw(), "sweep": {"temp": [1.0]}})
    with pytest.raises(BenchConfigError, match=r"temperature must be >= 0"):
        parse_config({**_raw(), "sweep": {"temperature": [-1.0]}})
    with pytest.raises(BenchConfigError, match=r"no \[\[method\]\]"):
        parse_config({"generator": "tiny-random"})
    with pytest.raises(BenchConfigError, match=r"not found.*presets: paper-gsd, paper-lantern, paper-sjd, video-speed, zoo-exact, zoo-full"):
        load_config(tmp_path / "missing.toml")
    with pytest.raises(BenchConfigError, match=r"unknown preset 'zoo'; valid presets: paper-gsd"):
        load_config(preset="zoo")
    with pytest.raises(BenchConfigError, match="cannot import scorer"):
        parse_config({**_raw(), "scorers": ["nope.nothing:fid"]})
    with pytest.raises(SystemExit, match="specdec bench: config file .* not found"):
        cli.main(["bench", str(tmp_path / "missing.toml")])


def test_presets_parse_and_cover_the_readme_table():
    for name in bench.preset_names():
        cfg = load_config(preset=name)
        timing = name not in ("zoo-quality", "zoo-throughput")     # one pass: quality, and batch 64
        assert cfg.runs and (cfg.repeats >= 3 or not timing) and any(r["drafter"] is None for r in cfg.runs), name
        assert len({r["key"] for r in cfg.runs}) == len(cfg.runs)
    assert set(bench.preset_names()) == {"zoo-quick", "zoo-exact", "zoo-full", "zoo-quality", "zoo-speed",
                                         "zoo-throughput", "paper-lantern", "paper-gsd", "paper-sjd", "video-speed"}
    video = load_config(preset="video-speed").runs
    assert {r["drafter_params"].get("coupling", "none") for r in video if r["drafter"] == "jacobi"} == \
        {"none", "maximal", "gumbel"}
    speed = load_config(preset="zoo-speed").runs
    assert {r["batch"] for r in speed} == {1, 8} and {r["sampling"]["cfg_scale"] for r in speed} == {1.0, 3.0}
    assert {r["drafter_params"].get("tree", "chain") for r in speed if r["drafter"] == "eagle"} == \
        {"chain", "static:binary-3", "dynamic"}
    assert {r["drafter_params"].get("coupling", "none") for r in speed if r["drafter"] == "jacobi"} == \
        {"none", "maximal"}                                                       # SJD and MC-SJD
    full = load_config(preset="zoo-full").runs
    fams = {bench.family(r) for r in full}
    quality = load_config(preset="zoo-quality")
    assert {bench.family(r) for r in quality.runs} == fams and quality.fd_real >= 2048
    assert {r["images"] for r in quality.runs} == {512}
    assert {"AR", "exact + model", "lantern + model", "bounded_lantern + model", "typical + model",
            "exact + jacobi", "grouped + jacobi", "lantern + jacobi", "exact + lookup"} <= fams
    exact_model = [r["drafter_params"] for r in full if bench.family(r) == "exact + model"]
    assert sorted(d["k"] for d in exact_model if d.get("drafts", "sample") == "sample") == [2, 4, 6, 8]
    assert [d["drafts"] for d in exact_model if "drafts" in d] == ["argmax"]      # LANTERN-argmax's baseline
    assert len([r for r in full if bench.family(r) == "exact + jacobi"]) == 3
    assert {r["sampling"]["cfg_scale"] for r in full} == {3.0} and {r["sampling"]["top_k"] for r in full} == {0}


def test_result_configs_parse_and_the_gpu_one_asks_for_cuda():
    """The TOML files the README's results come from stay valid configs (listing a GPU config needs no GPU)."""
    for path in sorted((ROOT / "docs" / "results").glob("*.toml")):
        cfg = load_config(path)
        assert cfg.runs and len({r["key"] for r in cfg.runs}) == len(cfg.runs), path.name
    gpu = load_config(ROOT / "docs" / "results" / "zoo-speed-gpu.toml").runs
    assert {r["device"] for r in gpu} == {"cuda"} and {r["compile"] for r in gpu} == {"off", "cuda-graphs"}
    assert {r["dtype"] for r in gpu} == {"bfloat16"} and {r["batch"] for r in gpu} == {1, 8}


def test_distortion_bound_follows_the_drafts_one_hot_flag():
    from drafters.jacobi import JacobiDrafter
    from drafters.lookup import LookupDrafter
    from drafters.model import ModelDrafter
    from specdec.certify import default_geometry
    from verifiers.bounded_lantern import BoundedLanternRule
    from verifiers.lantern import LanternRule

    model = object()                                             # the flag does not touch the model
    assert ModelDrafter(model, drafts="argmax").one_hot_drafts
    assert not ModelDrafter(model).one_hot_drafts
    assert LookupDrafter().one_hot_drafts and not JacobiDrafter().one_hot_drafts
    g = default_geometry(16)
    lantern = LanternRule(g, k=3, delta=0.2)
    assert bench.distortion_bound(lantern, one_hot_drafts=True) == 0.2
    assert bench.distortion_bound(lantern, one_hot_drafts=False) is None       # sampled drafts: no bound
    assert bench.distortion_bound(LanternRule(g, k=3, lam=2.0), one_hot_drafts=True) is None
    assert bench.distortion_bound(BoundedLanternRule(g, k=3, delta=0.1), one_hot_drafts=False) == 0.1
    assert bench.distortion_bound(None, one_hot_drafts=False) == 0.0
