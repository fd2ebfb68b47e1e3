"""Timings a user can trust, on a quiet machine or a busy one.

* Interleaved rounds (AR, A, B, AR, A, B, ...): a burst of load from another process lands on every method of that
  round alike, instead of on all the repeats of one method.
* Every method keeps all its round times: min / median / max and the spread (max - min) / median.
* A speedup is checked against what its counts allow. A method that commits MAL tokens per target forward, where
  one forward of k + 1 tokens costs t_verify and plain AR's forward of 1 token costs t_step, is at most
  MAL * t_step / t_verify times faster than AR (its drafter only costs more). A speedup beyond that bound, or a
  large spread, is noise: the row is flagged "unreliable: rerun on a quiet machine".
* Threads are set explicitly (default: the physical cores) and recorded beside every figure.
"""
from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from specdec.protocols import ARModel
from specdec.sampling import Sampling

SPREAD_LIMIT = 0.25     # (max - min) / median of a method's rounds beyond which its timing is not trusted
BOUND_SLACK = 1.10      # a speedup may exceed its count bound by this factor (timer noise) before it is flagged
UNRELIABLE = "unreliable: rerun on a quiet machine"


@dataclass(frozen=True)
class Timing:
    """Wall-clock seconds of one method, one entry per round."""

    seconds: tuple[float, ...]

    @property
    def min(self) -> float:
        return min(self.seconds)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def max(self) -> float:
        return max(self.seconds)

    @property
    def spread(self) -> float:
        """(max - min) / median: 0 for identical rounds."""
        return (self.max - self.min) / self.median if self.median > 0 else 0.0

    def as_dict(self, per: int = 1) -> dict[str, float]:
        """min / median / max divided by `per` (e.g. images per call), and the spread."""
        return {"min_s": self.min / per, "median_s": self.median / per, "max_s": self.max / per,
                "spread": self.spread}


def synced_clock() -> float:
    """time.perf_counter() once the accelerator's queued work is done: a CUDA call returns before its kernels
    finish, so an unsynchronised clock would time the launches, not the work. On a CPU it is perf_counter."""
    if torch.cuda.is_initialized():         # False on a CPU-only build or before any CUDA work
        torch.cuda.synchronize()
    return time.perf_counter()


def interleaved_rounds(methods: Sequence[Callable[[], Any]], rounds: int,
                       clock: Callable[[], float] = synced_clock) -> tuple[list[Timing], list[Any]]:
    """Call methods[0], methods[1], ... once each per round, `rounds` rounds; time every call with `clock`.
    Returns (one Timing per method, the result of each method's last call)."""
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    seconds: list[list[float]] = [[] for _ in methods]
    last: list[Any] = [None] * len(methods)
    for _ in range(rounds):
        for i, method in enumerate(methods):
            t0 = clock()
            last[i] = method()
            seconds[i].append(clock() - t0)
    return [Timing(tuple(s)) for s in seconds], last


def count_bound(mean_accepted_length: float, t_step: float, t_verify: float) -> float:
    """The largest speedup over AR the counts allow: MAL * t_step / t_verify (see the module doc)."""
    return mean_accepted_length * t_step / t_verify if t_verify > 0 else float("inf")


def reliability(speedup: float, bound: float, *timings: Timing, spread_limit: float = SPREAD_LIMIT,
                slack: float = BOUND_SLACK) -> str | None:
    """None when the speedup can be trusted; else why not, starting with UNRELIABLE."""
    if speedup > bound * slack:
        return f"{UNRELIABLE} (speedup {speedup:.2f}x exceeds the {bound:.2f}x its counts allow)"
    worst = max((t.spread for t in timings), default=0.0)
    if worst > spread_limit:
        return f"{UNRELIABLE} (rounds spread {worst:.0%} around the median)"
    return None


@torch.no_grad()
def step_costs(target: ARModel, cond: Any, sampling: Sampling, n_tokens: int, rounds: int = 15,
               clock: Callable[[], float] = synced_clock) -> tuple[float, float]:
    """(t_step, t_verify): the target's raw forward time for 1 token and for n_tokens tokens at this batch and
    sampling (CFG rows included), measured in interleaved rounds on a cache half full, as in mid-generation.
    Median seconds per call."""
    capacity = target.num_tokens + n_tokens
    state, _ = target.start(cond, sampling, capacity)
    B = len(cond) if not isinstance(cond, torch.Tensor) else cond.shape[0]
    half = target.num_tokens // 2
    zeros = torch.zeros(B, max(half, n_tokens), dtype=torch.long, device=target.device)
    target.forward(state, zeros[:, :half])
    keep = torch.full((B,), half, dtype=torch.long, device=target.device)

    def call(n: int) -> Callable[[], None]:
        def run():
            target.forward(state, zeros[:, :n])
            target.rollback(state, keep)
        return run
    timings, _ = interleaved_rounds([call(1), call(n_tokens)], rounds + 2, clock)
    return (statistics.median(timings[0].seconds[2:]), statistics.median(timings[1].seconds[2:]))


def physical_cores() -> int:
    """Physical CPU cores (hyper-threads counted once) from /proc/cpuinfo; os.cpu_count() where unknown."""
    try:
        cores, phys = set(), None
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "physical id":
                    phys = value.strip()
                elif key == "core id":
                    cores.add((phys, value.strip()))
        if cores:
            return min(len(cores), os.cpu_count() or len(cores))
    except OSError:
        pass
    return os.cpu_count() or 1


def set_threads(threads: int | None) -> int:
    """Set torch's intra-op threads (None or 0: the physical cores) and return the number set."""
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 0):
        raise ValueError(f"threads must be a positive integer (0 = the physical cores), got {threads!r}")
    n = threads or physical_cores()
    torch.set_num_threads(n)
    return n
