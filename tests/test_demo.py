"""`specdec demo` end to end on the embedded zoo (small settings), and its bad-input errors."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from specdec import cli


def test_demo_quick_writes_its_files(tmp_path, capsys):
    out = tmp_path / "demo"
    code = cli.main(["demo", "--quick", "--out", str(out), "--per-class", "1", "--fd-real", "32", "--seed", "1",
                     "--repeats", "1"])
    assert code == 0
    table = json.loads((out / "table.json").read_text())
    rows = {r["method"]: r for r in table["rows"]}
    assert rows["AR"]["mean_accepted_length"] == 1.0
    assert rows["AR"]["target_forwards_per_image"] == 143          # 144 tokens, the first from the prefill
    assert list(rows) == ["AR", "exact + mc-sjd w=16", "exact + eagle k=4"]   # the best lossless method first
    spec = rows["exact + mc-sjd w=16"]
    assert 1.0 < spec["mean_accepted_length"] <= 5.0
    assert spec["target_forwards_per_image"] < 143
    assert rows["AR"]["mean_accepted_length_se"] == 0.0 and 0.0 < spec["mean_accepted_length_se"] < 1.0
    for name in ("samples.png", "acceptance.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000
    printed = capsys.readouterr().out
    assert "speedup" in printed and str(out / "samples.png") in printed


def test_demo_unknown_class(tmp_path):
    with pytest.raises(SystemExit, match="unknown zoo class 'unicorn'.*valid classes"):
        cli.main(["demo", "--quick", "--out", str(tmp_path), "--classes", "unicorn"])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses Linux permissions and sysfs")
def test_demo_unwritable_output(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    if os.geteuid() == 0:           # root ignores permission bits; sysfs takes no new files, not even from root
        locked = Path("/sys")
    with pytest.raises(SystemExit, match="not writable"):
        cli.main(["demo", "--quick", "--out", str(locked)])


def test_demo_output_under_a_file(tmp_path):
    """An output folder that cannot be created (a file stands in the way) is a clear error, not a traceback."""
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(SystemExit, match="cannot create output folder"):
        cli.main(["demo", "--quick", "--out", str(blocker / "demo")])


def test_console_script_help():
    res = subprocess.run([sys.executable, "-m", "specdec.cli", "--help"], capture_output=True, text=True)
    assert res.returncode == 0
    for command in ("demo", "certify", "bench", "report"):
        assert command in res.stdout


def test_demo_compile_setting_compiles_target_drafters_and_step(monkeypatch):
    """--compile: the target compiled as the bench's setting says (stubbed: compiling is tested elsewhere), drafters
    that have a compiled path asked to use it, the engine's step compiled for freeze+step only; a bad setting or a
    demo without it fails with the choices."""
    from specdec import demo
    from specdec.bench.methods import DEMO_METHODS
    from specdec.testing import tiny_random_bundle

    wrapped = []
    monkeypatch.setattr(demo, "compile_adapter", lambda adapter, *how: wrapped.append(how) or adapter)
    bundle = tiny_random_bundle()
    same, methods, compiled = demo.compiled_setup(bundle, list(DEMO_METHODS), None)
    assert same is bundle and methods == list(DEMO_METHODS) and not compiled and not wrapped
    _, methods, compiled = demo.compiled_setup(bundle, list(DEMO_METHODS), "freeze+step")
    assert compiled and wrapped == [(None, True)]
    params = {m.label: m.drafter_params for m in methods}
    assert params["exact + mc-sjd w=16"]["compile"] is True and params["exact + eagle k=4"]["compile"] == "freeze"
    assert "compile" not in params["exact + lookup k=4"]
    assert not demo.compiled_setup(bundle, list(DEMO_METHODS), "freeze")[2]
    with pytest.raises(demo.DemoError, match="valid: off"):
        demo.compiled_setup(bundle, list(DEMO_METHODS), "fastest")
    with pytest.raises(SystemExit, match="--compile applies to the image demo only"):
        cli.main(["demo", "--video", "--compile", "freeze"])
