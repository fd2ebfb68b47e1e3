"""Token geometry: nearest neighbours between image tokens in a vector space.

LANTERN (arXiv 2410.03355) measures closeness in the VQ **codebook** [V, D]; GSD (arXiv 2508.07747) in the LM
**input-embedding** table [V, D]. Both come in as a plain [V, D] matrix.

`neighbours(count)` is computed in row chunks (chunked distance + top-k), so no V x V matrix is ever held: at
V = 16384 a chunk of 512 rows costs 512 x 16384 floats (32 MB). Results are cached per count in memory, keyed by a hash
of the vectors and the metric (`key`), so a disk cache can be added later without changing callers.
"""
from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass, field

import torch
from torch import Tensor

_METRICS = ("l2", "cosine")


@dataclass(frozen=True, eq=False)
class TokenGeometry:
    """vectors: FloatTensor [V, D] (float32, CPU); metric: "l2" (Euclidean) or "cosine" (1 - cos similarity).

    Build with `TokenGeometry.from_vectors(vectors, metric)`. With metric="cosine" the rows are l2-normalised once,
    so `squared_distance` is the squared Euclidean distance of unit vectors (= 2 - 2 cos).
    """

    vectors: Tensor
    metric: str = "l2"
    key: str = ""
    chunk_rows: int = 512
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self):
        v = self.vectors
        if not isinstance(v, Tensor) or v.dim() != 2:
            raise ValueError(f"token vectors must be a 2-D tensor [V, D], got "
                             f"{tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__}")
        if v.shape[0] < 2 or v.shape[1] < 1:
            raise ValueError(f"token vectors need at least 2 tokens and 1 dimension, got shape {tuple(v.shape)}")
        if not torch.isfinite(v).all():
            raise ValueError("token vectors contain NaN or inf; check the codebook / embedding weights")
        if self.metric not in _METRICS:
            raise ValueError(f"metric must be one of {_METRICS}, got {self.metric!r}")
        if not isinstance(self.chunk_rows, int) or self.chunk_rows < 1:
            raise ValueError(f"chunk_rows must be a positive integer, got {self.chunk_rows!r}")

    @classmethod
    def from_vectors(cls, vectors: Tensor, metric: str = "l2", chunk_rows: int = 512) -> "TokenGeometry":
        if not isinstance(vectors, Tensor):
            vectors = torch.as_tensor(vectors)
        if vectors.dim() != 2:
            raise ValueError(f"token vectors must be a 2-D tensor [V, D], got shape {tuple(vectors.shape)}")
        v = vectors.detach().float().cpu().contiguous()
        if metric == "cosine" and torch.isfinite(v).all():
            v = torch.nn.functional.normalize(v, dim=1)
        key = hashlib.sha1(v.numpy().tobytes() + metric.encode()).hexdigest()[:16] if torch.isfinite(v).all() \
            else ""
        return cls(v, metric, key, chunk_rows)

    @classmethod
    def coerce(cls, geometry, source: str = "codebook") -> "TokenGeometry":
        """A TokenGeometry, or a raw [V, D] tensor (as in `LanternRule(adapter.codebook)`) turned into one."""
        if isinstance(geometry, Tensor):
            return cls.from_vectors(geometry)
        if not isinstance(geometry, cls):
            raise TypeError(f"geometry must be a specdec.geometry.TokenGeometry "
                            f"(TokenGeometry.from_vectors({source})), got {type(geometry).__name__}")
        return geometry

    @property
    def size(self) -> int:
        """V, the number of tokens."""
        return self.vectors.shape[0]

    def check_vocab(self, vocab_size: int, who: str = "rule") -> None:
        if vocab_size != self.size:
            raise ValueError(f"{who}: the token geometry has {self.size} tokens but the distributions have "
                             f"V = {vocab_size}; build the geometry from the target's own codebook/embeddings")

    def clamp_neighbours(self, count: int, who: str = "rule", word: str = "neighbours", stacklevel: int = 2,
                         quiet: bool = False) -> int:
        """A neighbour count (neighbours per token) validated (>= 1) and clamped to V - 1 with a warning (none when
        quiet: a default the user never chose).

        word: the parameter name the caller spelled, echoed in the messages; stacklevel: as for `warnings.warn`,
        counted from the caller of this method (a rule's __post_init__ passes the depth of its constructor)."""
        if not isinstance(count, int) or isinstance(count, bool) or count < 1:
            raise ValueError(f"{who}: {word} (neighbours per token) must be an integer >= 1, got {count!r}")
        if count > self.size - 1:
            if quiet:
                return self.size - 1
            warnings.warn(f"{who}: {word} = {count} asked for, but the geometry has only {self.size} tokens (at most "
                          f"{self.size - 1} neighbours per token); using {word} = {self.size - 1}",
                          stacklevel=stacklevel + 1)
            return self.size - 1
        return count

    def _pair_distance(self, a: Tensor, b: Tensor) -> Tensor:
        """a [n, D], b [m, D] -> distances [n, m] in the metric (L2 distance, or 1 - cos for cosine)."""
        if self.metric == "cosine":
            return 1.0 - a @ b.T
        return torch.cdist(a, b)

    @torch.no_grad()
    def neighbours(self, count: int, device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
        """The `count` nearest other tokens of every token, nearest first, self excluded.

        Returns (idx LongTensor [V, count], dist FloatTensor [V, count]) on `device` (default CPU; a copy per device
        is cached, so rules on a GPU do not re-upload the table each step). Raises ValueError unless
        1 <= count <= V - 1.
        """
        if device is not None and torch.device(device) != torch.device("cpu"):
            key = (count, str(torch.device(device)))
            if key not in self._cache:
                idx, dist = self.neighbours(count)
                self._cache[key] = (idx.to(device), dist.to(device))
            return self._cache[key]
        V = self.size
        if not isinstance(count, int) or isinstance(count, bool) or not 1 <= count <= V - 1:
            raise ValueError(f"the neighbour count must be an integer in [1, V-1] = [1, {V - 1}], got {count!r}")
        if count in self._cache:
            return self._cache[count]
        # a larger cached count already holds the answer (neighbours sorted nearest first)
        larger = [c for c in self._cache if isinstance(c, int) and c > count]
        if larger:
            idx, dist = self._cache[min(larger)]
            out = (idx[:, :count].contiguous(), dist[:, :count].contiguous())
            self._cache[count] = out
            return out
        idx_parts, dist_parts = [], []
        for start in range(0, V, self.chunk_rows):
            rows = self.vectors[start:start + self.chunk_rows]
            d = self._pair_distance(rows, self.vectors)
            own = torch.arange(start, start + rows.shape[0])
            d[torch.arange(rows.shape[0]), own] = float("inf")          # exclude self
            dist, idx = torch.topk(d, count, dim=1, largest=False, sorted=True)
            idx_parts.append(idx)
            dist_parts.append(dist)
        out = (torch.cat(idx_parts), torch.cat(dist_parts))
        self._cache[count] = out
        return out

    def prepare(self, device: torch.device | str = "cpu", count: int | None = None) -> None:
        """Build and cache, ahead of decoding, the vectors on `device` and (when count is given) the count-nearest
        neighbour table there, so that the first decode step pays nothing for them."""
        self._vectors_on(torch.device(device))
        if count is not None:
            self.neighbours(count, device)

    def _vectors_on(self, device: torch.device) -> Tensor:
        vec = self.vectors
        if device != vec.device:
            key = ("vectors", str(device))
            if key not in self._cache:
                self._cache[key] = vec.to(device)
            vec = self._cache[key]
        return vec

    def radius(self, count: int, device: torch.device | str | None = None) -> Tensor:
        """FloatTensor [V]: the distance from every token to its count-th nearest other token (its neighbourhood
        radius): u is among the `count` nearest neighbours of v iff distance(u, v) <= radius[v] (up to exact
        ties)."""
        return self.neighbours(count, device)[1][:, -1]

    def cross_distance(self, a: Tensor, b: Tensor) -> Tensor:
        """Distances in the metric between two token sets: a LongTensor [..., M], b LongTensor [..., N] (same
        leading shape, any device) -> FloatTensor [..., M, N] on a's device. No [V, V] matrix is formed."""
        vec = self._vectors_on(a.device)
        va, vb = vec[a], vec[b]                                                   # [..., M, D], [..., N, D]
        if self.metric == "cosine":
            return 1.0 - va @ vb.transpose(-1, -2)
        sq = va.pow(2).sum(-1)[..., :, None] + vb.pow(2).sum(-1)[..., None, :] - 2 * va @ vb.transpose(-1, -2)
        return sq.clamp_min(0).sqrt()

    def squared_distance(self, a: Tensor, b: Tensor) -> Tensor:
        """Squared Euclidean distance between gathered token pairs: a, b LongTensors of one broadcast shape
        (any device) -> FloatTensor of that shape, on a's device. Unit vectors when metric == "cosine"."""
        vec = self._vectors_on(a.device)
        return (vec[a] - vec[b]).pow(2).sum(-1)
