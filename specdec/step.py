"""A chain step's tensor work after the target's forward, as one function: probabilities, the non-finite flags,
the rule's verdict and the commit bookkeeping.

Why one function: at batch 1 on a small target this is a hundred-odd tiny tensor ops (the CFG mix and softmax, the
rule's gathers, scan, residual and inverse-CDF draw, the uniforms' hash, the scatter of the committed tokens and the
counters), each paying the framework's dispatch (a few microseconds on a CPU, a kernel launch on a GPU), which
together cost 0.68 ms of a 4.98 ms MC-SJD step on the zoo (experiments/step_phases.py). `generate(...,
compiled=True)` runs `chain_step` as one `torch.compile` graph (fullgraph, static shapes), so they become a few fused
kernels. The eager and compiled paths compute the same tokens (tests/test_compiled_step.py).

Notation as in specdec.engine: B rows, k drafts per step, V image vocabulary, T tokens per image.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from specdec.compiled import compile_step
from specdec.random import RowStreams, sample_categorical
from specdec.sampling import Sampling, nan_probs, nonfinite, to_probs


@dataclass
class Ledger:
    """The engine's running tensors, updated in place by every step.

    tokens [B, T + 2k + 1] committed tokens (garbage past n_done); from_draft [B, T + 2k + 1] committed from a
    draft; n_done [B] committed tokens per row; counters [4] (drafted, accepted, committed, steps); row_forwards [B]
    target forwards per row; accepted_at / drafted_at [k] acceptances and drafts per draft position; bad [3]
    non-finite flags (target logits, drafter's q, p after sampling); offsets arange(k + 1); rows arange(B)[:, None].
    """

    tokens: Tensor
    from_draft: Tensor
    n_done: Tensor
    counters: Tensor
    row_forwards: Tensor
    accepted_at: Tensor
    drafted_at: Tensor
    bad: Tensor
    offsets: Tensor
    rows: Tensor


def invalid_probs(q: Tensor | None, device=None) -> Tensor:
    """A 0-d bool tensor: the draft distribution q [B, k, V] holds NaN, inf or negative values (False, made on
    device, for None)."""
    if q is None or q.numel() == 0:
        return torch.zeros((), dtype=torch.bool, device=device)
    # two reductions: a min propagates NaN (NaN >= 0 is False), and a +inf makes the sum infinite
    return ~(q.amin() >= 0) | ~torch.isfinite(q.sum())


def checked_probs(sampling: Sampling, token_mask: Tensor | None, ledger: Ledger, cond: Tensor, uncond: Tensor | None,
                  draft_probs: Tensor | None) -> Tensor:
    """The target's p [B, n, V] from its logits cond / uncond [B, n, V], with the step's non-finite flags (target
    logits, the drafter's q [B, k, V] or None, p) or-ed into ledger.bad, on the device: read at the next sync."""
    p = to_probs(cond, uncond, sampling, token_mask)
    ledger.bad |= torch.stack([nonfinite(cond, uncond), invalid_probs(draft_probs, p.device), nan_probs(p)])
    return p


def judge(rule, sampling: Sampling, token_mask: Tensor | None, streams: RowStreams, ledger: Ledger, cond: Tensor,
          uncond: Tensor | None, draft_tokens: Tensor, draft_probs: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """The target's logits cond / uncond [B, k+1, V] and a chain draft (tokens [B, k], q [B, k, V] or None for
    one-hot) -> (p [B, k+1, V], n_accepted [B], next_token [B]); raises nothing, flags non-finite values in
    ledger.bad. k = 0 is plain AR: the bonus draw from p with the position's "sample" uniform."""
    p = checked_probs(sampling, token_mask, ledger, cond, uncond, draft_probs)
    k = draft_tokens.shape[1]
    n_done = ledger.n_done
    if k:
        q = draft_probs if draft_probs is not None else \
            torch.nn.functional.one_hot(draft_tokens, p.shape[-1]).to(p.dtype)
        verdict = rule.verify(draft_tokens, q, p, streams.at(n_done))
        return p, verdict.n_accepted, verdict.next_token
    u = streams.uniform_at("sample", n_done[:, None])[:, 0]
    return p, torch.zeros_like(n_done), sample_categorical(p[:, 0], u)


def commit(ledger: Ledger, draft_tokens: Tensor, n_accepted: Tensor, next_token: Tensor, num_tokens: int) -> None:
    """Write d_1..d_n then the correction / bonus at each active row's n_done, and count. Slots past it are
    garbage that later steps overwrite; a finished row rides along without counting."""
    k = draft_tokens.shape[1]
    n_done, offsets, rows = ledger.n_done, ledger.offsets, ledger.rows
    active = n_done < num_tokens
    segment = torch.cat([draft_tokens, next_token[:, None]], 1)
    segment.scatter_(1, n_accepted[:, None], next_token[:, None])
    write_at = n_done[:, None] + offsets
    ledger.tokens[rows, write_at] = segment
    in_image = active[:, None] & (write_at < num_tokens)
    ledger.from_draft[rows, write_at] = (offsets[None] < n_accepted[:, None]) & in_image
    committed = torch.minimum(n_accepted + 1, num_tokens - n_done) * active
    drafted_mask = in_image[:, :k]
    accepted_mask = drafted_mask & (offsets[None, :k] < n_accepted[:, None])
    ledger.counters += torch.stack([drafted_mask.sum(), accepted_mask.sum(), committed.sum(), active.any().long()])
    ledger.row_forwards += active
    ledger.accepted_at += accepted_mask.sum(0)
    ledger.drafted_at += drafted_mask.sum(0)
    ledger.n_done += torch.where(active, n_accepted + 1, 0)


def chain_step(rule, sampling: Sampling, token_mask: Tensor | None, streams: RowStreams, ledger: Ledger,
               cond: Tensor, uncond: Tensor | None, draft_tokens: Tensor, draft_probs: Tensor | None,
               num_tokens: int) -> tuple[Tensor, Tensor, Tensor]:
    """`judge` then `commit`: -> (p [B, k+1, V], n_accepted [B], next_token [B]); ledger updated in place."""
    p, n_accepted, next_token = judge(rule, sampling, token_mask, streams, ledger, cond, uncond, draft_tokens,
                                      draft_probs)
    commit(ledger, draft_tokens, n_accepted, next_token, num_tokens)
    return p, n_accepted, next_token


_COMPILED = None


def compiled_chain_step():
    """`chain_step` as one graph (compiled once per process; a graph per rule type, sampling, shapes and dtypes)."""
    global _COMPILED
    if _COMPILED is None:
        _COMPILED = compile_step(chain_step)
    return _COMPILED
