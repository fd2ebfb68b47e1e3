"""Timing rules (specdec.bench.timing) with a fake clock: interleaving order, spread, the unreliable flag."""
from __future__ import annotations

import pytest
import torch

from specdec import Sampling
from specdec.bench.timing import (UNRELIABLE, Timing, count_bound, interleaved_rounds, physical_cores, reliability,
                                  set_threads, step_costs)


class FakeClock:
    """Time advances only when a method 'works': method i costs costs[i][round] seconds."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def methods_with_costs(clock: FakeClock, costs: list[list[float]], log: list):
    def make(i):
        calls = iter(costs[i])

        def run():
            log.append(i)
            clock.now += next(calls)
            return i
        return run
    return [make(i) for i in range(len(costs))]


def test_rounds_interleave_methods_and_keep_every_time():
    clock, log = FakeClock(), []
    costs = [[1.0, 1.2, 0.9], [0.5, 3.0, 0.5], [0.2, 0.2, 0.2]]
    timings, last = interleaved_rounds(methods_with_costs(clock, costs, log), rounds=3, clock=clock)
    assert log == [0, 1, 2, 0, 1, 2, 0, 1, 2]                  # AR, A, B, AR, A, B, ...
    assert [t.seconds for t in timings] == [pytest.approx(tuple(c)) for c in costs]
    assert last == [0, 1, 2]
    assert (timings[0].median, timings[0].min, timings[0].max) == pytest.approx((1.0, 0.9, 1.2))
    assert timings[1].spread == pytest.approx((3.0 - 0.5) / 0.5)
    assert timings[2].spread == pytest.approx(0.0, abs=1e-9)
    assert timings[1].as_dict(per=2)["median_s"] == pytest.approx(0.25)
    with pytest.raises(ValueError, match="rounds"):
        interleaved_rounds([lambda: None], rounds=0)


def test_unreliable_when_speedup_beats_the_counts_or_rounds_spread():
    steady, noisy = Timing((1.0, 1.01, 0.99)), Timing((1.0, 2.5, 0.9))
    bound = count_bound(2.0, t_step=0.010, t_verify=0.011)        # 1.82x at most
    assert bound == pytest.approx(2.0 * 10 / 11)
    assert reliability(1.5, bound, steady, steady) is None
    flagged = reliability(7.89, bound, steady, steady)             # the demo's 7.89x at MAL 2.04 on a busy machine
    assert flagged.startswith(UNRELIABLE) and "exceeds" in flagged
    assert reliability(1.5, bound, steady, noisy).startswith(UNRELIABLE)
    assert reliability(bound * 1.05, bound, steady) is None        # within the slack
    assert count_bound(1.0, 0.01, 0.0) == float("inf")


def test_step_costs_and_threads(target):
    calls = iter(range(10_000))
    t_step, t_verify = step_costs(target, torch.tensor([0, 1]), Sampling(cfg_scale=2.0), 5,
                                  clock=lambda: float(next(calls)))
    assert (t_step, t_verify) == (1.0, 1.0)                       # each timed call spans one clock tick
    t_step, t_verify = step_costs(target, torch.tensor([0]), Sampling(), 5, rounds=3)
    assert t_step > 0 and t_verify > 0
    assert physical_cores() >= 1
    n = torch.get_num_threads()
    try:
        assert set_threads(1) == 1 and torch.get_num_threads() == 1
        with pytest.raises(ValueError, match="threads"):
            set_threads(-2)
    finally:
        torch.set_num_threads(n)
