"""generate(): prefill -> propose -> verify -> commit/rollback, batched, ragged per row.

The whole speculative loop is `generate` below. Rows advance independently: row b commits n_accepted[b] + 1 tokens
per step while row c commits another number, each row keeps its own cache length, and finished rows idle (they
still ride along in the batched forward, so shapes stay static). The loop syncs with the host once per step, to
decide whether any row is still running.

Token bookkeeping: the prefill samples image token 0. A step feeds [last committed token, d_1..d_k] to the target,
whose k+1 outputs are p_1..p_{k+1} for the k drafts and the bonus position. After the verdict the target keeps
the committed tokens except the newest one, which the next step feeds.
"""
from __future__ import annotations

import math
import time

import torch

from specdec.adapters.base import check_capacity
from specdec.phases import PhaseClock
from specdec.protocols import AcceptanceRule, ARModel, DecodeContext, Drafter, require
from specdec.random import RowStreams, fresh_seed, sample_categorical
from specdec.sampling import Sampling, nan_probs, nonfinite, to_probs
from specdec.step import Ledger, chain_step, checked_probs, commit, compiled_chain_step
from specdec.tree import DraftTree
from specdec.types import Draft, GenerationResult, SpecStats, Verdict


def _check_inputs(target: ARModel, drafter, rule, num_tokens: int) -> int:
    require(target, ARModel, "the target")
    k = 0
    if drafter is not None:
        require(drafter, Drafter, "the drafter")
        k = drafter.k
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ValueError(f"the drafter's k (draft tokens per step) must be an integer >= 1, got {k!r}")
    if rule is not None:
        require(rule, AcceptanceRule, "the rule")
    if drafter is not None and drafter.tree_size:
        if rule is not None and not rule.supports_trees:
            rule.verify_tree(None, None, None)            # raises, naming the rule
        if not target.supports_trees:
            target.forward_tree(None, None, None, None)   # raises, naming the adapter
    if not isinstance(num_tokens, int) or isinstance(num_tokens, bool) or num_tokens < 1:
        raise ValueError(f"num_tokens must be a positive integer, got {num_tokens!r}")
    return k


def _check_seed(seed) -> int:
    if seed is None:
        return fresh_seed()
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2 ** 63:
        raise ValueError(f"seed must be an integer in [0, 2**63), got {seed!r}")
    return seed


def generate(target: ARModel, cond, drafter: Drafter | None = None, rule: AcceptanceRule | None = None,
             sampling: Sampling = Sampling(), seed: int | None = None, num_tokens: int | None = None,
             progress: bool = False, decode: bool = True, compiled: bool = False) -> GenerationResult:
    """Generate num_tokens image tokens per row of cond, speculatively when a drafter is given.

    cond: the adapter's condition, one row per image (class ids [B] for class-conditional models).
    drafter=None is plain AR decoding through the same loop; rule=None is the exact (lossless) rule.
    compiled=True runs each chain step's tensor work after the target's forward (probabilities, the rule's test,
    the commit) as one torch.compile graph (`specdec.step`): the same tokens, less per-step overhead. It compiles
    once per process and rule type; tree steps stay eager.
    Returns GenerationResult(tokens [B, T], stats, images [B, 3, H, W] when the adapter decodes).
    """
    from verifiers.exact import ExactRule   # the default rule; the engine never names any other

    rule = rule if rule is not None else ExactRule()
    T = num_tokens if num_tokens is not None else target.num_tokens
    k = _check_inputs(target, drafter, rule, T)
    if k == 0:
        rule = ExactRule()      # nothing to judge without drafts: plain sampling from p, whatever rule was given
    # cache room: an active row holds at most T-2 generated tokens and appends k+1; a finished row is parked at
    # T-1 (see the rollback below) and still rides along, appending k+1
    capacity = T + max(k, drafter.tree_size if drafter is not None else 0)
    check_capacity(target, capacity)
    if T > math.prod(target.grid):
        raise ValueError(f"num_tokens={T} does not fit the target's grid {tuple(target.grid)} "
                         f"({math.prod(target.grid)} tokens); generate at most that many")
    decode = decode and target.can_decode
    if decode and T != math.prod(target.grid):
        raise ValueError(f"decoding pixels needs the whole grid {tuple(target.grid)} ({math.prod(target.grid)} "
                         f"tokens) but num_tokens={T}; pass decode=False to get the tokens only")
    seed = _check_seed(seed)
    token_mask = target.token_mask
    hidden = drafter is not None and drafter.needs_hidden
    if hidden and not target.hidden_size:
        raise ValueError(f"the drafter ({type(drafter).__name__}) reads the target's hidden states, which "
                         f"{type(target).__name__} does not expose (hidden_size 0); use a drafter that needs only "
                         f"tokens (model, jacobi, lookup)")

    t_wall = time.perf_counter()
    state, first = target.start(cond, sampling, capacity, hidden=True) if hidden else \
        target.start(cond, sampling, capacity)
    p0 = to_probs(first.cond[:, -1], None if first.uncond is None else first.uncond[:, -1], sampling, token_mask)
    B, V = p0.shape
    device = p0.device
    streams = RowStreams(seed, torch.arange(B, device=device))
    tokens = torch.zeros(B, T + 2 * k + 1, dtype=torch.long, device=device)   # a finished row may write past T
    n_done = torch.ones(B, dtype=torch.long, device=device)
    zero = torch.zeros(B, 1, dtype=torch.long, device=device)
    tokens[:, 0] = sample_categorical(p0, streams.uniform_at("sample", zero)[:, 0].float())
    # non-finite values found so far, kept on device and read at the one sync per step: [target logits,
    # drafter's q, p after sampling]
    no = torch.zeros((), dtype=torch.bool, device=device)
    bad = torch.stack([nonfinite(first.cond, first.uncond), no, nan_probs(p0)])

    ctx = DecodeContext(target, cond, sampling, tokens, n_done, T, tuple(target.grid), streams, token_mask, capacity,
                        first.hidden)
    if drafter is not None:
        drafter.start(ctx)
    ledger = Ledger(tokens, torch.zeros_like(tokens, dtype=torch.bool), n_done,
                    counters=torch.zeros(4, dtype=torch.long, device=device),   # drafted, accepted, committed, steps
                    row_forwards=torch.zeros(B, dtype=torch.long, device=device),
                    accepted_at=torch.zeros(k, dtype=torch.long, device=device),
                    drafted_at=torch.zeros(k, dtype=torch.long, device=device), bad=bad,
                    offsets=torch.arange(k + 1, device=device), rows=torch.arange(B, device=device)[:, None])
    step = compiled_chain_step() if compiled else chain_step
    clock = PhaseClock(device)               # host clock on a CPU, CUDA events on a GPU (read once, at the end)
    bar = _progress(progress, T)

    while True:
        active = n_done < T
        running, slowest, *flags = torch.cat([active.any()[None], n_done.min()[None], ledger.bad]).tolist()  # one sync
        if any(flags):
            raise _nonfinite_error(flags, target, drafter, sampling)
        if not running:
            break
        if bar:
            bar(min(slowest, T))

        t0 = clock.mark()
        draft = drafter.propose(k) if drafter is not None else Draft(tokens[:, :0])
        t1 = clock.mark()
        last = tokens.gather(1, (n_done - 1)[:, None])
        if isinstance(draft, DraftTree):
            # the accepted root-to-node path becomes the step's drafts, as if it had been a chain (eager)
            logits = target.forward_tree(state, draft, last[:, 0], n_done)
            p = checked_probs(sampling, token_mask, ledger, logits.cond, logits.uncond, draft.q)   # [B, 1+N, V]
            verdict = rule.verify_tree(draft, p, streams.at(n_done))
            path = draft.path(verdict.node, k)                                          # [B, k] nodes
            target.commit_tree(state, draft, path)
            if hidden:      # the root and the accepted path's nodes, a chain's [last, d_1..d_k]
                index = torch.cat([zero, path.clamp_min(-1) + 1], 1)
                logits.hidden = logits.hidden.gather(1, index[..., None].expand(-1, -1, logits.hidden.shape[-1]))
            draft = Draft(draft.tokens.gather(1, path.clamp_min(0)))
            commit(ledger, draft.tokens, verdict.n_accepted, verdict.next_token, T)
        else:
            logits = target.forward(state, torch.cat([last, draft.tokens], 1))
            p, n_acc, next_token = step(rule, sampling, token_mask, streams, ledger, logits.cond, logits.uncond,
                                        draft.tokens, draft.probs, T)
            verdict = Verdict(n_acc, next_token)
        t2 = clock.mark()
        target.rollback(state, ctx.park(n_done - 1))
        t3 = clock.mark()
        if drafter is not None:
            ctx.hidden = logits.hidden
            drafter.observe(verdict, p)
        t4 = clock.mark()
        clock.add("draft", t0, t1)
        clock.add("draft", t3, t4)
        clock.add("target", t1, t2)

    drafted, accepted, committed_total, steps = ledger.counters.tolist()
    forwards_per_row = ledger.row_forwards.cpu()            # one transfer; the total is its sum, on the host
    forwards = int(forwards_per_row.sum())
    out = tokens[:, :T].clone()
    stats = SpecStats(
        batch_size=B, num_tokens=T, target_forwards=forwards,
        draft_forwards=drafter.forwards if drafter is not None else 0,
        drafted=drafted, accepted=accepted, committed=committed_total, steps=steps,
        accepted_per_position=ledger.accepted_at.cpu(), drafted_per_position=ledger.drafted_at.cpu(),
        acceptance_map=ledger.from_draft[:, :T].cpu(), forwards_per_row=forwards_per_row,
        target_s=clock.seconds("target"), draft_s=clock.seconds("draft"))
    images = target.decode(out) if decode else None
    stats.wall_s = time.perf_counter() - t_wall
    if bar:
        bar(T, close=True)
    return GenerationResult(tokens=out, stats=stats, images=images, extras={"seed": seed})


def _nonfinite_error(flags: list[bool], target, drafter, sampling: Sampling) -> ValueError:
    """The error for the first set flag of [target logits, drafter q, p after sampling]: which model, what to try."""
    if flags[0]:
        return ValueError(f"the target ({type(target).__name__}) produced NaN or +inf logits; check its weights, "
                          f"the dtype (try float32) and the inputs")
    if flags[1]:
        return ValueError(f"the drafter ({type(drafter).__name__}) proposed a draft distribution q with NaN, inf "
                          f"or negative values; check the draft model's weights and dtype (try float32)")
    return ValueError(f"sampling turned the target's finite logits into NaN probabilities (temperature="
                      f"{sampling.temperature}, cfg_scale={sampling.cfg_scale}); use a larger temperature (0 for "
                      f"greedy) or a smaller cfg_scale")


def _progress(enabled: bool, total: int):
    """A minimal tqdm progress bar over the slowest row's committed tokens, or None."""
    if not enabled:
        return None
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc="tokens (slowest row)", leave=False)

    def update(n: int, close: bool = False):
        bar.update(max(0, n - bar.n))
        if close:
            bar.close()
    return update
