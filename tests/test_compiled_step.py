"""The compiled chain step (`generate(..., compiled=True)`, specdec.step) and the compiled Jacobi window
(`JacobiDrafter(compile=True)`): the eager path's tokens and counts, one set of graphs reused across generations,
and the bench's `freeze+step` setting reaching the engine."""
from __future__ import annotations

import pytest
import torch

import specdec
from drafters import ModelDrafter
from drafters.jacobi import JacobiDrafter
from specdec import Sampling
from helpers import perturbed_copy
from verifiers.bounded_lantern import BoundedLanternRule


def _same_generation(a, b) -> None:
    assert torch.equal(a.tokens, b.tokens)
    for name in ("target_forwards", "drafted", "accepted", "committed", "steps"):
        assert getattr(a.stats, name) == getattr(b.stats, name), name
    assert torch.equal(a.stats.acceptance_map, b.stats.acceptance_map)
    assert torch.equal(a.stats.accepted_per_position, b.stats.accepted_per_position)


CASES = {    # (target, whether the drafter compiles its own step) -> (drafter, rule)
    "ar": lambda t, compile: (None, None),
    "exact + mc-sjd": lambda t, compile: (JacobiDrafter(5, "repeat_vertical", coupling="maximal", compile=compile),
                                          None),
    "bounded lantern + model": lambda t, compile: (ModelDrafter(perturbed_copy(t, 0.3), k=3),
                                                   BoundedLanternRule(torch.randn(64, 4), 8, delta=0.2)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_compiled_step_equals_eager_and_reuses_its_graphs(target, case):
    """Ragged rows (batch 3), CFG 3, top-k: the compiled path commits the eager path's tokens, with the same
    forwards and acceptances; a second generation (another seed) compiles nothing new."""
    from torch._dynamo.utils import counters

    sampling, cond = Sampling(cfg_scale=3.0, top_k=40), torch.tensor([0, 1, 2])
    graphs = []
    for seed in (11, 12):
        torch.manual_seed(seed)         # the same draft model and rule for both paths
        eager_drafter, rule = CASES[case](target, False)
        torch.manual_seed(seed)
        drafter, _ = CASES[case](target, True)
        eager = specdec.generate(target, cond, drafter=eager_drafter, rule=rule, sampling=sampling, seed=seed)
        fast = specdec.generate(target, cond, drafter=drafter, rule=rule, sampling=sampling, seed=seed,
                                compiled=True)
        _same_generation(eager, fast)
        if drafter is not None:
            assert 0 < fast.stats.acceptance_rate < 1
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[1] == graphs[0]


def test_compiled_jacobi_window_without_the_compiled_step(target):
    """JacobiDrafter(compile=True) alone (the engine's step eager) drafts the eager drafter's tokens."""
    sampling, cond = Sampling(cfg_scale=3.0, top_k=40), torch.tensor([2, 1, 0])     # the window graph above
    eager = specdec.generate(target, cond, drafter=JacobiDrafter(5, "repeat_vertical", coupling="maximal"),
                             sampling=sampling, seed=5)
    fast = specdec.generate(target, cond, sampling=sampling, seed=5,
                            drafter=JacobiDrafter(5, "repeat_vertical", coupling="maximal", compile=True))
    _same_generation(eager, fast)


def test_jacobi_compile_flag_is_checked():
    with pytest.raises(ValueError, match="compile must be False or True"):
        JacobiDrafter(8, compile="freeze")


def test_bench_freeze_step_compiles_the_engine_step(monkeypatch, tmp_path):
    """compile = "freeze+step" in a sweep: the target compiled as for "freeze" (stubbed here: compiling it is the
    slow part, tested in test_compiled.py) and every generation of the row, AR's and the method's, run with
    compiled=True; "freeze" leaves the engine's step eager. A Jacobi drafter compiles by its own `compile`."""
    from specdec.bench import generators, runner
    import tomllib

    from specdec.bench.config import parse_config

    seen = []
    real = runner.generate

    def spy(*args, compiled=False, **kwargs):       # runs eager: the compiled path's tokens are tested above
        seen.append(compiled)
        return real(*args, **kwargs)

    monkeypatch.setattr(runner, "generate", spy)
    monkeypatch.setattr(generators, "compile_adapter", lambda adapter, *how: adapter)
    for setting, expected in (("freeze+step", {True}), ("freeze", {False})):
        seen.clear()
        cfg = parse_config(tomllib.loads(f"""
            generator = "tiny-random"
            images = 2
            repeats = 1
            fd_real = 2
            [sweep]
            batch = [2]
            compile = ["{setting}"]
            [[method]]
            label = "exact + jacobi"
            drafter = "jacobi"
            drafter_params = {{ window = 4, coupling = "maximal" }}
            rule = "exact"
            """))
        rows = runner.run_bench(cfg, tmp_path / f"{setting}.jsonl", progress=False)
        assert set(seen) == expected and len(seen) >= 4
        assert rows[0]["compile"] == setting


def test_step_tags_are_made_once_not_every_step(target):
    """A step's stream ids come from a cache (fixed tags) or a table made 64 steps at a time (MC-SJD's per-step tags),
    so a decode step makes no host-to-device copy for them (a blocking one on a GPU); the ids are the tags' own."""
    from specdec.random import tag_id, tag_ids

    assert tag_ids(("accept", "sample")) is tag_ids(("accept", "sample"))
    assert tag_ids(("accept", "sample")).tolist() == [tag_id("accept"), tag_id("sample")]
    drafter = JacobiDrafter(5, "repeat_vertical", coupling="maximal")
    specdec.generate(target, torch.tensor([0]), drafter=drafter, seed=1)
    for step in (0, 1, 63, 64, 130):
        drafter.step = step
        ids = drafter._coupling_ids(torch.device("cpu"))
        assert ids.tolist() == [tag_id(t) for t in ("sample", f"mc_keep/{step}", f"mc_residual/{step}")]


def test_compiled_step_still_flags_nan_logits(target):
    """The compiled step updates the non-finite flags in place like the eager one: logits that turn NaN at the third
    decode step (after a clean prefill) are named at the next step's sync, not sampled from (the shapes of the AR
    case above: its graph is reused)."""
    forward, calls = target.forward, []

    def poisoned(state, tokens):
        out = forward(state, tokens)
        calls.append(1)
        if len(calls) == 3:
            out.cond = torch.full_like(out.cond, float("nan"))
        return out

    target.forward = poisoned
    try:
        with pytest.raises(ValueError, match=r"the target \(GPTAdapter\) produced NaN"):
            specdec.generate(target, torch.tensor([0, 1, 2]), sampling=Sampling(cfg_scale=3.0, top_k=40), seed=0,
                             compiled=True)
    finally:
        del target.forward
    assert len(calls) == 3              # flagged at the sync right after the poisoned step
