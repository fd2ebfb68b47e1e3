"""Random numbers without a global RNG.

`RowStreams` is counter-based: the uniform for (seed, row, token position, tag, slot) is a hash of those integers,
computed with int64 tensor ops on any device. So a row's draws depend only on its own seed and positions, never on
which other rows share its batch or how many steps earlier rows took, and nothing is stateful.

Why per position and not per step: a uniform drawn for a position that is later discarded (after the first
rejection) was never used for a committed decision, so reusing it when the position is verified again keeps the
test exact, while making the output a function of (seed, row) alone.
"""
from __future__ import annotations

import os
import zlib
from collections.abc import Sequence
from functools import lru_cache

import torch
from torch import Tensor

_MASK32 = (1 << 32) - 1
# multipliers below 2**31 so that (x < 2**32) * c never overflows int64
_M1, _M2, _M3 = 0x7FEB352D, 0x2C1B3C6D, 0x297A2D39


def _mix32(x: Tensor) -> Tensor:
    """A 32-bit avalanche hash (lowbias32-style) on int64 tensors holding values in [0, 2**32)."""
    x = x & _MASK32
    x = x ^ (x >> 16)
    x = (x * _M1) & _MASK32
    x = x ^ (x >> 15)
    x = (x * _M2) & _MASK32
    x = x ^ (x >> 16)
    x = (x * _M3) & _MASK32
    return x ^ (x >> 15)


def hash_uniform_key(*keys: Tensor | int) -> Tensor:
    """Fold integer keys (broadcast) into one 32-bit hash per element."""
    h = None
    for key in keys:
        key = torch.as_tensor(key, dtype=torch.long)
        h = _mix32(key) if h is None else _mix32(h.to(key.device) * 31 + _mix32(key + 0x9E3779B9))
    return h


def hash_uniform(*keys: Tensor | int) -> Tensor:
    """Uniform in (0, 1), float64, one per broadcast element of the integer keys."""
    h = hash_uniform_key(*keys)
    hi = _mix32(h + 0x632BE5AB)
    lo = _mix32(h + 0x85157AF5)
    bits = (hi >> 8) * (1 << 24) + (lo >> 8)          # 48 random bits
    return (bits.double() + 0.5) / float(1 << 48)


@torch.compiler.assume_constant_result      # a compiled step folds a tag's id in (dynamo cannot trace crc32)
def tag_id(tag: str) -> int:
    return _crc31(tag)


@lru_cache(maxsize=None)
def _crc31(tag: str) -> int:
    return zlib.crc32(tag.encode()) & 0x7FFFFFFF


_TAG_IDS: dict[tuple, Tensor] = {}


def tag_ids(tags: Sequence[str], device=None) -> Tensor:
    """The streams' ids of tags, LongTensor [len(tags)] on device. Kept per (tags, device) after the first call, so a
    decode step that draws the same tags every step makes no host-to-device copy (on a GPU, a blocking one); a
    compiled step holds them as constants."""
    if torch.compiler.is_compiling():
        return torch.tensor([tag_id(t) for t in tags], dtype=torch.long, device=device)
    key = (tuple(tags), str(device))
    if key not in _TAG_IDS:
        _TAG_IDS[key] = torch.tensor([tag_id(t) for t in tags], dtype=torch.long, device=device)
    return _TAG_IDS[key]


def fresh_seed() -> int:
    return int.from_bytes(os.urandom(4), "little") & 0x7FFFFFFF


class RowStreams:
    """Per-row counter-based streams. rows: LongTensor [B] of row identities (usually arange(B))."""

    def __init__(self, seed: int, rows: Tensor):
        self.seed = int(seed)
        self.rows = rows
        self._row_key = hash_uniform_key(self.seed, rows)      # [B], hashed once: the hot path mixes less

    def uniform_at(self, tag: str, positions: Tensor, slots: int | None = None) -> Tensor:
        """positions [B, n] -> float32 uniforms in (0, 1) [B, n] (or [B, n, slots] with an extra slot index).

        Two 32-bit mixes per draw on the hot path: one folds (position, tag[, slot]) into a key, one mixes it with
        the row's pre-hashed (seed, row) key. 24 bits reach the float32 result, all it can hold."""
        return self._uniforms(positions * 0x9E3779B1 + tag_id(tag), self._row_key[:, None], slots)

    def uniforms_at(self, tags: Sequence[str], positions: Tensor, slots: int | None = None) -> Tensor:
        """Several tags' uniforms in one pass: [len(tags), B, n(, slots)], entry t equal to uniform_at(tags[t], ...)
        bit for bit. A draw costs a fixed few dozen tensor ops whatever its size, so a step that needs several
        streams at the same positions pays that once."""
        return self.uniforms_by_id(tag_ids(tags, positions.device), positions, slots)

    def uniforms_by_id(self, ids: Tensor, positions: Tensor, slots: int | None = None) -> Tensor:
        """uniforms_at with the tags given by their ids [n_tags] (`tag_ids`), for a compiled step whose tags change
        from step to step (a tag's id is a host computation, which a graph cannot hold)."""
        key = positions[None] * 0x9E3779B1 + ids.view(-1, *([1] * positions.dim()))
        return self._uniforms(key, self._row_key[:, None], slots)

    def _uniforms(self, key: Tensor, row_key: Tensor, slots: int | None) -> Tensor:
        if slots is not None:
            key = key[..., None] * 0x85EBCA6B + torch.arange(slots, device=key.device)
            row_key = row_key[..., None]
        h = _mix32(row_key ^ _mix32(key))
        return ((h >> 8).float() + 0.5) * (1.0 / (1 << 24))

    def at(self, start: Tensor) -> "StepRandomness":
        """The randomness of a step whose first draft token sits at position start[b] of row b."""
        return StepRandomness(self, start)


class StepRandomness:
    """`Randomness` for one verification step: uniform(tag, n)[b, j] is keyed by token position start[b] + j."""

    def __init__(self, streams: RowStreams, start: Tensor):
        self.streams = streams
        self.start = start

    def uniform(self, tag: str, n: int) -> Tensor:
        positions = self.start[:, None] + torch.arange(n, device=self.start.device)
        return self.streams.uniform_at(tag, positions)

    def uniforms(self, tags: Sequence[str], n: int) -> Tensor:
        """[len(tags), B, n]: uniform(tag, n) for every tag, in one pass (`RowStreams.uniforms_at`)."""
        positions = self.start[:, None] + torch.arange(n, device=self.start.device)
        return self.streams.uniforms_at(tags, positions)


def draw_uniforms(rng, requests: Sequence[tuple[str, int]]) -> list[Tensor]:
    """[rng.uniform(tag, n) for tag, n in requests], in one pass where rng offers `uniforms` (the engine's
    randomness, counter-based: a stream's first n draws do not depend on how many are drawn), else one call per
    request in order (a generator-backed rng, whose draws depend on the order and the counts)."""
    if hasattr(rng, "uniforms"):
        both = rng.uniforms([tag for tag, _ in requests], max(n for _, n in requests))
        return [both[i, :, :n] for i, (_, n) in enumerate(requests)]
    return [rng.uniform(tag, n) for tag, n in requests]


class GeneratorRandomness:
    """`Randomness` from an explicit torch.Generator, for using a rule outside the engine (certify, tests)."""

    def __init__(self, generator: torch.Generator, batch: int, device=None):
        self.generator = generator
        self.batch = batch
        self.device = device if device is not None else generator.device

    def uniform(self, tag: str, n: int) -> Tensor:
        u = torch.rand(self.batch, n, generator=self.generator, device=self.device)
        return u.clamp(1e-7, 1 - 1e-7)


def sample_categorical(probs: Tensor, u: Tensor) -> Tensor:
    """Inverse-CDF sampling. probs [..., V] (need not be normalised, must have positive mass), u [...] in (0, 1)
    -> LongTensor [...]. Scaling u by the actual total keeps the pick on a token with positive mass."""
    cdf = probs.double().cumsum(-1)
    target = u.double() * cdf[..., -1]
    idx = torch.searchsorted(cdf, target[..., None], right=True)[..., 0]
    return idx.clamp_max(probs.shape[-1] - 1)
