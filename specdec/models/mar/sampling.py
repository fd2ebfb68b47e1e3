"""MAR's sampling schedule (Li et al., arXiv 2406.11838; the official `MAR.sample_tokens` of LTH14/mar): the order,
the mask schedule and the CFG schedule, as plain functions of (seq_len L, num_iter K).

Official semantics, and how they are expressed here:
* Order. Upstream draws a random permutation `orders` per image (np.random.shuffle) and, after step k, keeps
  unknown the positions orders[:mask_len_k] (`mask_by_order`): the END of its permutation is generated first.
  Here `order` is the GENERATION order (order[:, 0] is generated first), i.e. upstream's permutation flipped; a
  uniform permutation flipped is uniform, so the law is the same. Random orders come from a torch.Generator
  (upstream: numpy's global RNG, which is not reproduced). "raster" is arange(L): top-left first.
* Mask schedule (MaskGIT's cosine). Before step k there are m_k unknown tokens (m_0 = L); upstream computes
  mask_len = floor(L * cos(pi/2 * (k+1) / K)) in float64, clamps it to max(1, min(m_k - 1, mask_len)) ("mask out at
  least one for the next iteration"), predicts m_k - mask_len tokens, and at the LAST step predicts all m_k left.
  Quirk kept: when K > L a step can predict 0 tokens (m_k = 1 and mask_len clamps to 1); its backbone pass is skipped
  here (it changes nothing upstream either, apart from spending time).
* CFG schedule (Muse's linear): cfg_k = 1 + (s - 1) * (L - mask_len) / L with the CLAMPED mask_len of the step;
  "constant": cfg_k = s. Quirk kept: at the last step mask_len clamps to 1, so the final guidance is
  1 + (s - 1) (L - 1) / L, not s. (Upstream evaluates it in float32 from a float32 mask_len; here float64.)
* CFG rows are doubled whenever s != 1 (even at steps where cfg_k happens to be 1).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

ORDERS = ("random", "raster")
CFG_SCHEDULES = ("linear", "constant")


@dataclass(frozen=True)
class MaskSchedule:
    """The per-step plan shared by every row: counts[k] tokens are predicted at step k, those of generation rank
    starts[k] .. starts[k] + counts[k] - 1; mask_lens[k] is upstream's clamped mask_len (the CFG schedule's input)."""

    counts: tuple[int, ...]
    mask_lens: tuple[int, ...]
    seq_len: int

    @property
    def starts(self) -> tuple[int, ...]:
        out, done = [], 0
        for c in self.counts:
            out.append(done)
            done += c
        return tuple(out)

    def __len__(self) -> int:
        return len(self.counts)


def mask_schedule(seq_len: int, num_iter: int) -> MaskSchedule:
    """Upstream's cosine mask schedule for L = seq_len tokens in K = num_iter steps (see the module docstring)."""
    if isinstance(num_iter, bool) or not isinstance(num_iter, int) or num_iter < 1:
        raise ValueError(f"num_iter must be an integer >= 1 (AR steps), got {num_iter!r}")
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    counts, lens, unknown = [], [], seq_len
    for k in range(num_iter):
        raw = math.floor(seq_len * math.cos(math.pi / 2.0 * (k + 1) / num_iter))
        mask_len = max(1, min(unknown - 1, raw))
        n = unknown if k == num_iter - 1 else unknown - mask_len
        counts.append(n)
        lens.append(mask_len)
        unknown -= n
    return MaskSchedule(tuple(counts), tuple(lens), seq_len)


def cfg_schedule(cfg: float, mask_len: int, seq_len: int, kind: str = "linear") -> float:
    """The guidance scale of a step: linear 1 + (cfg - 1) (L - mask_len) / L, or constant cfg."""
    if kind == "linear":
        return 1.0 + (cfg - 1.0) * (seq_len - mask_len) / seq_len
    if kind == "constant":
        return float(cfg)
    raise ValueError(f"cfg schedule must be one of {CFG_SCHEDULES}, got {kind!r}")


def random_order(batch: int, seq_len: int, generator: torch.Generator | None = None, device=None) -> Tensor:
    """A uniform random generation order per row, LongTensor [B, L] (argsort of uniforms from `generator`)."""
    device = device if device is not None else (generator.device if generator is not None else None)
    return torch.rand(batch, seq_len, generator=generator, device=device).argsort(dim=1)


def raster_order(batch: int, seq_len: int, device=None) -> Tensor:
    """arange(L) per row: row-major, top-left first. LongTensor [B, L]."""
    return torch.arange(seq_len, device=device).expand(batch, seq_len).clone()


def make_order(order: str | Tensor, batch: int, seq_len: int, generator: torch.Generator | None = None,
               device=None) -> Tensor:
    """"random" / "raster" / an explicit LongTensor [B, L] (each row a permutation of 0..L-1) -> order [B, L]."""
    if isinstance(order, str):
        if order == "random":
            return random_order(batch, seq_len, generator, device)
        if order == "raster":
            return raster_order(batch, seq_len, device)
        raise ValueError(f"order must be one of {ORDERS} or a LongTensor [B, L], got {order!r}")
    if not isinstance(order, Tensor) or order.dtype != torch.long or tuple(order.shape) != (batch, seq_len):
        raise TypeError(f"an explicit order must be a LongTensor of shape ({batch}, {seq_len}), got "
                        f"{getattr(order, 'dtype', type(order).__name__)} {tuple(getattr(order, 'shape', ()))}")
    ref = torch.arange(seq_len, device=order.device)
    if not bool((order.sort(dim=1).values == ref).all()):
        raise ValueError("each row of an explicit order must be a permutation of 0..L-1")
    return order.to(device) if device is not None else order


def ranks(order: Tensor) -> Tensor:
    """order [B, L] (position generated at each rank) -> rank [B, L] (rank of each position): its inverse."""
    return torch.empty_like(order).scatter_(1, order, torch.arange(order.shape[1], device=order.device)
                                            .expand_as(order))
