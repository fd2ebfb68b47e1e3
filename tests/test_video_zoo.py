"""The embedded video zoo (specdec.zoo.video): clip data, shipped weights and cards, deterministic counters of
token-level speculation for a seed, the block router on it, and `specdec demo --video --quick` end to end."""
from __future__ import annotations

import json

import pytest
import torch

import specdec
from drafters.jacobi import JacobiDrafter
from drafters.lookup import LookupDrafter
from specdec import Sampling, cli
from specdec.zoo import video
from helpers import assert_seed_figures


def test_clips_are_deterministic_real_and_move():
    a, ca = video.clip_batch("train", 6, seed=3, index=2)
    b, cb = video.clip_batch("train", 6, seed=3, index=2)
    assert torch.equal(a, b) and torch.equal(ca, cb)
    assert a.shape == (6, video.FRAMES, 3, video.FRAME, video.FRAME) and a.min() >= -1 and a.max() <= 1
    moved = (a[:, 1:] - a[:, :-1]).abs().mean((2, 3, 4))              # [6, F-1]
    assert bool((moved.sum(1) > 0).any())                              # at least one clip moves
    held, _ = video.clip_batch("heldout", 2, seed=3)
    assert not torch.equal(held, a[:2])


def test_filmstrip_round_trip():
    x = torch.rand(2, video.FRAMES, 3, video.FRAME, video.FRAME)
    assert torch.equal(video.strip_to_frames(video.filmstrip(x)), x)


@pytest.fixture(scope="module")
def bundle():
    if not video.available():
        pytest.fail("the video zoo's weights are not in the package: train them with experiments/train_video_zoo.py")
    return video.load()


def test_video_zoo_loads_with_cards(bundle):
    side = video.FRAME // 4
    assert bundle.target.grid == (video.FRAMES, side, side)
    assert bundle.target.num_tokens == video.FRAMES * side * side
    t_params = bundle.cards["video_target"]["params"]
    d_params = bundle.cards["video_drafter"]["params"]
    assert t_params >= 5 * d_params, (t_params, d_params)              # the drafter is >= 5x cheaper
    assert bundle.cards["video_target"]["metrics"]["heldout_nll_per_token"] < \
        bundle.cards["video_target"]["metrics"]["uniform_nll_per_token"] - 2.0
    strips = bundle.heldout_images(3, seed=0)
    assert strips.shape == (3, 3, video.FRAME, video.FRAMES * video.FRAME)
    assert bundle.features.features(strips).shape[0] == 3


# target forwards per clip and mean accepted length for 4 clips (classes 0-3), CFG 3, seed 0: deterministic on one CPU
# (`helpers.assert_seed_figures`)
VIDEO_FIGURES = {"sjd": (86.5, 3.3179), "mc_sjd": (71.5, 4.014), "mc_sjd_prev_frame": (61.5, 4.6667),
                 "lookup_prev_frame": (259.75, 1.1049)}


@pytest.mark.parametrize("name", sorted(VIDEO_FIGURES))
def test_video_forwards_for_a_seed(bundle, name):
    drafters = {"sjd": lambda: JacobiDrafter(16, "random"),
                "mc_sjd": lambda: JacobiDrafter(16, "random", coupling="maximal"),
                "mc_sjd_prev_frame": lambda: JacobiDrafter(16, "previous_frame", coupling="maximal"),
                "lookup_prev_frame": lambda: LookupDrafter(4, sources=("prev_frame",))}
    res = specdec.generate(bundle.target, torch.arange(4), drafter=drafters[name](),
                           sampling=Sampling(cfg_scale=3.0), seed=0, decode=False)
    fwd, mal = VIDEO_FIGURES[name]
    assert_seed_figures(res.stats, fwd, mal, what=name)


def test_demo_video_quick_writes_its_files(tmp_path, capsys):
    """In bfloat16 (--dtype): the float32 video path is covered by the per-seed forwards above."""
    out = tmp_path / "video"
    code = cli.main(["demo", "--video", "--quick", "--out", str(out), "--per-class", "1", "--classes", "0",
                     "--repeats", "1", "--threads", "1", "--dtype", "bfloat16"])
    assert code == 0
    table = json.loads((out / "table.json").read_text())
    assert table["meta"]["dtype"] == "bfloat16"
    rows = {r["method"]: r for r in table["rows"]}
    assert rows["AR"]["target_forwards_per_image"] == video.FRAMES * (video.FRAME // 4) ** 2 - 1
    for r in table["rows"]:
        assert r["lossless"] is True and {"method", "drafter", "rule", "mean_accepted_length", "speedup",
                                          "target_forwards_per_image", "feature_fd"} <= set(r)
    coupled = rows["exact + jacobi w=16 maximal"]
    assert coupled["target_forwards_per_image"] < rows["AR"]["target_forwards_per_image"] / 2
    gif = (out / "clips.gif").read_bytes()
    assert gif[:6] in (b"GIF89a", b"GIF87a") and len(gif) > 2000
    assert (out / "acceptance.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "clips.gif" in capsys.readouterr().out
