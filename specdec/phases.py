"""Seconds spent in the phases of a decode loop (drafting, the target's forward), without extra host syncs.

On a CPU a phase is timed with the host clock. On a GPU the host clock would time kernel launches: the kernels run
later, and the loop's one sync per step hands their time to whichever phase happens to wait. So there each phase
boundary records a CUDA event in the stream, and the events are read once, after the loop (one sync in all).
"""
from __future__ import annotations

import time
from collections import defaultdict

import torch


class PhaseClock:
    """`mark()` at a phase boundary, `add(phase, start, end)` for the span between two marks (or `run(phase, fn,
    *args)` for one call), `seconds(phase)` at the end."""

    def __init__(self, device: torch.device | str):
        self.events = torch.device(device).type == "cuda"
        self._spans: dict[str, list] = defaultdict(list)        # GPU: (start, end) event pairs per phase
        self._seconds: dict[str, float] = defaultdict(float)    # CPU: summed host time per phase

    def mark(self):
        if self.events:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def add(self, phase: str, start, end) -> None:
        if self.events:
            self._spans[phase].append((start, end))
        else:
            self._seconds[phase] += end - start

    def run(self, phase: str, fn, *args):
        """fn(*args), its span added to `phase`."""
        start = self.mark()
        out = fn(*args)
        self.add(phase, start, self.mark())
        return out

    def seconds(self, phase: str) -> float:
        if self.events and self._spans[phase]:
            self._spans[phase][-1][1].synchronize()
            self._seconds[phase] += sum(a.elapsed_time(b) for a, b in self._spans.pop(phase)) / 1e3
        return self._seconds[phase]
