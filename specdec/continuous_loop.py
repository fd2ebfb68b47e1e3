"""Speculative decoding for continuous-token MAR generators (Li et al., arXiv 2406.11838): draft gamma AR steps
with a small MAR -> one target backbone pass -> verify every drafted token -> commit, through the MARAdapter hooks.

    result = generate_continuous(target, cond, drafter, rule, num_iter=16, cfg=3.0, gamma=4)
    result.tokens [B, L, D], result.images, result.stats, result.lossless

Both models share the generation's randomness per position ("trajectory alignment", CSpD arXiv 2411.11925): the
order, x_T and every head-step noise, plus one uniform per head step, drawn per image from (seed, image index), so
an image does not depend on its batch. Without a drafter the loop is target-only MAR (the official `sample_tokens`
semantics); given the same randomness it equals `MARAdapter.sample` bit for bit.

A round drafts G = min(gamma, steps left) AR steps; the target conditions the drafted positions in one backbone call
(`specdec.continuous_verify.draft_contexts`) and the rule decides every drafted token. A token is CHANGED when the
emitted value differs from the drafted one by more than `match_tol` in a coordinate. Policies:
  independent  every drafted step is committed, each token kept or replaced on its own (CSpD);
  truncate     the steps up to and including the first one with a changed token (in any image) are committed;
               the later ones are discarded and drafted again from the corrected context.
Prefill: the first int(prefill_ratio * num_iter) steps are target-only.

Guarantees. Lossless (`result.lossless`) when the rule is lossless, the policy truncates and every verified step
saw its sequential context ("per_step" contexts, or "union" on a causal model with one token per step, or G = 1):
each committed step then has exactly the target-only MAR law at the same schedule, since discarded steps' noises
and uniforms were read by no committed decision. Up to `match_tol`: a kept token may differ from the target's
value by that much per coordinate (the float rounding of a batched backbone pass, ~1e-6; 0 makes the check
bitwise). Committing the batch's common number of steps is also exact (fewer steps is always allowed); it costs
nothing in practice: with a distinct drafter the first drafted step changes in every image with probability one,
because MAR's last head step is noiseless and the token is the TARGET's mean at the verified x_{S-1}, not the
drafter's. So the exact rule commits one AR step per target pass (gamma = 1 is its best setting; such a round
drafts no tokens, only the drafter's conditions) and can save only head work: each token's chain of S head steps
is speculated in windows of `head_window` transitions, so S sequential target head calls become about
S / (accepted run + 1) calls of window + 1 states each: the same head arithmetic or more (a saving where calls
are latency-bound, none on a compute-bound CPU). The drafter may be a MAR (its head proposes) or chain-only
(`drafters.FrozenHeadDrafter`: the target's reused prediction, no network). CSpD is lossy, without a bound.
"""
from __future__ import annotations

import math
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from specdec.adapters.mar import HeadChain, MARAdapter, MARNoise
from specdec.continuous_verify import CONTEXTS, draft_contexts, verify_tokens
from specdec.models.mar import ORDERS, cfg_schedule, mask_schedule
from specdec.protocols import AcceptanceRule, ContinuousRule
from specdec.random import hash_uniform, hash_uniform_key, tag_id

POLICIES = ("independent", "truncate")
DEFAULT_GAMMA = 1               # when the rule carries no gamma (the exact rule: see the module docstring)
DEFAULT_PREFILL_RATIO = 0.0     # when the rule carries no prefill_ratio
HOOKS = ("prepare", "condition", "head_chain", "head_transition", "write", "token_dim", "num_steps", "num_tokens")


def _int(name: str, value, lo: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ValueError(f"{name} must be an integer >= {lo}, got {value!r}")


@dataclass(frozen=True)
class LoopConfig:
    """num_iter: AR steps K; cfg: guidance scale s (CFG rows iff s != 1) on the `cfg_kind` schedule; temperature:
    the heads' tau (> 0 with a drafter); gamma: AR steps drafted per round (None: the rule's `gamma`, else
    DEFAULT_GAMMA); policy: one of POLICIES or "auto" (truncate for a lossless rule, independent otherwise);
    prefill_ratio in [0, 1) (None: the rule's, else DEFAULT_PREFILL_RATIO); contexts: one of
    `specdec.continuous_verify.CONTEXTS` or "auto" (lossless rule: "union" on a causal target with one token per
    drafted step, else "per_step"; lossy rule: "pre_draft"); order: "random" or "raster"; match_tol: a token
    differing from its draft by at most this per coordinate counts as unchanged; head_window: head transitions
    verified per target head call by a rule with target_at_draft_states (None: the whole chain at once; after a
    rejection the drafter's head proposes the next window); seed: the images' randomness."""

    num_iter: int = 16
    cfg: float = 1.0
    temperature: float = 1.0
    gamma: int | None = None
    policy: str = "auto"
    prefill_ratio: float | None = None
    contexts: str = "auto"
    order: str = "random"
    cfg_kind: str = "linear"
    match_tol: float = 1e-4
    head_window: int | None = 4
    seed: int = 0

    def __post_init__(self):
        _int("num_iter", self.num_iter, 1)
        _int("seed", self.seed, 0)
        if self.head_window is not None:
            _int("head_window (head transitions verified per target head call)", self.head_window, 1)
        if self.gamma is not None:
            _int("gamma (AR steps drafted per round)", self.gamma, 1)
        for name in ("cfg", "temperature", "match_tol"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"{name} must be a finite number, got {v!r}")
        if self.temperature < 0 or self.match_tol < 0:
            raise ValueError(f"temperature and match_tol must be >= 0, got {self.temperature}, {self.match_tol}")
        p = self.prefill_ratio
        if p is not None and (isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p < 1):
            raise ValueError(f"prefill_ratio must be in [0, 1) (the share of AR steps the target makes alone; "
                             f"CSpD uses 0.15), got {p!r}")
        for name, valid in (("policy", POLICIES), ("contexts", CONTEXTS)):
            if getattr(self, name) not in (*valid, "auto"):
                raise ValueError(f"{name} must be one of {valid} or 'auto', got {getattr(self, name)!r}")
        if self.order not in ORDERS:
            raise ValueError(f"order must be one of {ORDERS}, got {self.order!r}")
        cfg_schedule(self.cfg, 0, 1, self.cfg_kind)                 # validates the kind


@dataclass(frozen=True)
class Plan:
    """What a run resolved from its config and rule: gamma, prefill (target-only schedule steps), policy,
    contexts, and whether the output law is the target-only law (see the module docstring)."""

    gamma: int
    prefill: int
    policy: str
    contexts: str
    lossless: bool


@dataclass(frozen=True)
class LoopRandomness:
    """order LongTensor [B, L] (generation order), noise (x_T [B, L, D], steps [B, L, S, D]), uniforms float64
    [B, L, S] (one per head step and position): everything random an image reads, a function of (seed, image)."""

    order: Tensor
    noise: MARNoise
    uniforms: Tensor


@dataclass
class ContinuousStats:
    """Counters of one generation (whole batch; a backbone pass or head call covers every image, so per-call counts
    are per-image counts). first_rejected [B, L]: per token, the first rejected transition of its verified window
    (`window` = none; -1 = made by the target alone); *_s: seconds (adapter timers, CUDA-synchronised)."""

    images: int
    tokens_per_image: int
    target_forwards: int = 0        # target backbone passes
    target_rows: int = 0            # backbone rows per image over those passes (G per "per_step" pass)
    target_head_calls: int = 0      # sequential target head evaluations (a whole chain counts S)
    drafter_forwards: int = 0
    drafter_head_calls: int = 0
    rounds: int = 0
    drafted: int = 0                # tokens drafted and verified (one-step rounds of the exact rule draft none)
    accepted: int = 0               # of those, committed unchanged
    transitions_drafted: int = 0    # head transitions verified (CSpD: tokens), continuations included
    transitions_accepted: int = 0
    fallbacks: int = 0              # residual loops that took their fallback
    window: int = 0
    first_rejected: Tensor | None = None
    seconds: dict = field(default_factory=lambda: {"target_backbone_s": 0.0, "target_head_s": 0.0,
                                                   "drafter_backbone_s": 0.0, "drafter_head_s": 0.0})
    wall_s: float = 0.0

    @property
    def target_forwards_per_image(self) -> float:
        return float(self.target_forwards)

    @property
    def mean_accepted_length(self) -> float:
        """Committed tokens per target backbone pass (target-only MAR: L / K)."""
        return self.tokens_per_image / max(self.target_forwards, 1)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def transition_acceptance(self) -> float:
        """Accepted / verified head transitions (CSpD: tokens), the continuations of rejected chains included."""
        return self.transitions_accepted / self.transitions_drafted if self.transitions_drafted else 0.0


@dataclass(frozen=True)
class ContinuousResult:
    """tokens [B, L, D]; images [B, 3, H, W] in [-1, 1] or None; stats; plan (lossless among it)."""

    tokens: Tensor
    images: Tensor | None
    stats: ContinuousStats
    plan: Plan

    @property
    def lossless(self) -> bool:
        return self.plan.lossless


def _continuous(model, role: str) -> None:
    if hasattr(model, "vocab_size") or not all(hasattr(model, h) for h in HOOKS):
        what = "a discrete-token ARModel" if hasattr(model, "vocab_size") else type(model).__name__
        raise TypeError(f"{role} is {what}, not a continuous-token adapter: continuous rules run on MAR-style "
                        f"adapters (specdec.adapters.mar.MARAdapter, hooks {', '.join(HOOKS)}); for discrete "
                        f"models use specdec.generate with a discrete rule")


def check_models(target, drafter, rule) -> None:
    """Clear errors for a discrete model or rule, mismatched token spaces, or a rule without a drafter."""
    _continuous(target, "the target")
    if rule is not None and not isinstance(rule, ContinuousRule):
        kind = "a discrete AcceptanceRule" if isinstance(rule, AcceptanceRule) or hasattr(rule, "geometry_source") \
            else type(rule).__name__
        raise TypeError(f"the rule ({type(rule).__name__}) is {kind}, not a ContinuousRule: it decides over [V] "
                        f"token probabilities; use verifiers.CSpDRule or verifiers.GaussianChainRule here")
    if getattr(drafter, "chain_only", False):
        if not getattr(rule, "target_at_draft_states", False):
            raise ValueError(f"the {drafter.name} drafter proposes head transitions only (no tokens): it needs a "
                             f"rule that verifies them, verifiers.GaussianChainRule(), not {rule!r}")
        return
    if drafter is None:
        if rule is not None:
            raise ValueError(f"rule {rule.name!r} given without a drafter; pass a drafter MARAdapter, or no rule "
                             f"for target-only MAR")
        return
    _continuous(drafter, "the drafter")
    if rule is None:
        raise ValueError("a drafter needs a rule: verifiers.GaussianChainRule() (exact) or verifiers.CSpDRule()")
    for name, what in (("token_dim", "token dims"), ("num_tokens", "tokens per image"),
                       ("num_steps", "head steps (the shared per-step noises need the same S)")):
        if getattr(drafter, name) != getattr(target, name):
            raise ValueError(f"drafter and target differ in {what}: {getattr(drafter, name)} vs "
                             f"{getattr(target, name)}; both must share the target's latent space and schedule")


def draw_randomness(target: MARAdapter, batch: int, seed: int, order: str = "random") -> LoopRandomness:
    """Each image's randomness from its own generator seeded by (seed, image index), moved to the target's device."""
    L, S, D = target.num_tokens, target.num_steps, target.token_dim
    orders, x_T, steps = [], [], []
    for b in range(batch):
        g = torch.Generator().manual_seed(int(hash_uniform_key(seed, b)))
        orders.append(torch.rand(L, generator=g).argsort() if order == "random" else torch.arange(L))
        x_T.append(torch.randn(L, D, generator=g))
        steps.append(torch.randn(L, S, D, generator=g))
    rows, pos, step = torch.arange(batch)[:, None, None], torch.arange(L)[None, :, None], torch.arange(S)
    u = hash_uniform(seed, rows, pos, step, tag_id("continuous-uniform"))
    dev = target.device
    return LoopRandomness(torch.stack(orders).to(dev), MARNoise(torch.stack(x_T).to(dev),
                                                                torch.stack(steps).to(dev)), u.to(dev))


def plan_run(config: LoopConfig, target: MARAdapter, rule, has_drafter: bool, chain_only: bool = False) -> Plan:
    """Resolve gamma, prefill, policy and contexts (see LoopConfig) and decide `lossless`. chain_only: the drafter
    proposes head transitions only (`drafters.FrozenHeadDrafter`)."""
    if not has_drafter:
        return Plan(1, config.num_iter, "truncate", "pre_draft", True)
    gamma = config.gamma if config.gamma is not None else getattr(rule, "gamma", DEFAULT_GAMMA)
    if chain_only and gamma != 1:
        raise ValueError(f"a chain-only drafter drafts no AR steps: gamma must be 1, got {gamma}")
    ratio = config.prefill_ratio if config.prefill_ratio is not None else \
        getattr(rule, "prefill_ratio", DEFAULT_PREFILL_RATIO)
    prefill = int(ratio * config.num_iter)
    counts = mask_schedule(target.num_tokens, config.num_iter).counts[prefill:]
    one_each = max(counts, default=0) <= 1
    policy = config.policy if config.policy != "auto" else ("truncate" if rule.lossless else "independent")
    contexts = config.contexts
    if contexts == "auto":
        contexts = ("union" if target.causal and one_each else "per_step") if rule.lossless else "pre_draft"
    exact_contexts = contexts == "per_step" or gamma == 1 or (contexts == "union" and target.causal and one_each)
    return Plan(gamma, prefill, policy, contexts, bool(rule.lossless) and policy == "truncate" and exact_contexts)


class _Run:
    """One generation's state: the committed MARState, the drafter's, the shared randomness and the counters."""

    def __init__(self, target, drafter, rule, cond: Tensor, config: LoopConfig, plan: Plan):
        self.target, self.drafter, self.rule, self.config, self.plan = target, drafter, rule, config, plan
        self.rnd = draw_randomness(target, len(cond), config.seed, config.order)
        self.state = target.prepare(cond, config.cfg, order=self.rnd.order)
        self.chain_only = getattr(drafter, "chain_only", False)
        self.dstate = None if drafter is None or self.chain_only else \
            drafter.prepare(cond, config.cfg, order=self.rnd.order)
        self.generator = torch.Generator(device=target.device).manual_seed(
            int(hash_uniform_key(config.seed, tag_id("continuous-residual"))))
        schedule = mask_schedule(target.num_tokens, config.num_iter)
        # (first rank, count, guidance, target-only?) of every step that predicts tokens
        self.steps = [(s, c, cfg_schedule(config.cfg, m, target.num_tokens, config.cfg_kind) if self.state.cfg
                       else 1.0, i < plan.prefill)
                      for i, (s, c, m) in enumerate(zip(schedule.starts, schedule.counts, schedule.mask_lens)) if c]
        B, L = self.state.batch, target.num_tokens
        self.stats = ContinuousStats(B, L, first_rejected=torch.full((B, L), -1, dtype=torch.long,
                                                                     device=target.device))
        # accepted tokens, then TokenVerdict.counts: target / drafter head calls, transitions drafted / accepted,
        # fallbacks (summed on the device: no host sync per round)
        self.counts = torch.zeros(6, dtype=torch.long, device=target.device)

    @contextmanager
    def charge(self, role: str, adapter: MARAdapter):
        """Add the adapter's backbone / head seconds spent inside the block to `role`'s."""
        b0, h0 = adapter.timing.backbone_s, adapter.timing.head_s
        yield
        self.stats.seconds[f"{role}_backbone_s"] += adapter.timing.backbone_s - b0
        self.stats.seconds[f"{role}_head_s"] += adapter.timing.head_s - h0

    def target_step(self, k: int) -> int:
        start, count, cfg_k, _ = self.steps[k]
        positions = self.state.order[:, start:start + count]
        x_T, noises = self.rnd.noise.at(positions)
        with self.charge("target", self.target):
            z = self.target.condition(self.state, positions)
            out = self.target.head_chain(z, x_T, noises, self.config.temperature, cfg_k, record=False)
        self.target.write(self.state, positions, out.tokens)
        self.stats.target_forwards += 1
        self.stats.target_rows += 1
        self.stats.target_head_calls += self.target.num_steps
        return 1

    def draft(self, steps: list, chains_needed: bool) -> tuple[list[Tensor], HeadChain | None, Tensor]:
        """The drafter's G steps from the committed context -> (positions per step, chains [B, N, ...] recorded
        (None when not chains_needed: only the conditions), the drafter's conditions [R, N, C'])."""
        d, ds = self.drafter, self.dstate
        if self.chain_only:                                    # nothing to draft but the head's transitions
            return [self.state.order[:, s:s + c] for s, c, _, _ in steps], None, None
        ds.tokens.copy_(self.state.tokens)
        ds.mask.copy_(self.state.mask)
        groups, chains, zs = [], [], []
        with self.charge("drafter", d):
            for start, count, cfg_k, _ in steps:
                positions = ds.order[:, start:start + count]
                x_T, noises = self.rnd.noise.at(positions)
                zs.append(d.condition(ds, positions))
                groups.append(positions)
                if chains_needed:
                    chains.append(d.head_chain(zs[-1], x_T, noises, self.config.temperature, cfg_k))
                    d.write(ds, positions, chains[-1].tokens)
        self.stats.drafter_forwards += len(steps)
        self.stats.drafter_head_calls += len(chains) * d.num_steps
        chain = HeadChain(*(torch.cat([getattr(c, f) for c in chains], 1)
                            for f in ("tokens", "means", "logvars", "states"))) if chains else None
        return groups, chain, torch.cat(zs, 1)

    def spec_round(self, k: int) -> int:
        """Draft, verify and commit from step k; -> the number of AR steps committed (>= 1)."""
        steps = self.steps[k:k + self.plan.gamma]                      # prefill steps all come before k
        # a one-step round of the exact rule commits that step whatever its draft: no drafted tokens are needed,
        # the drafter's head only proposes transitions
        groups, chain, zq = self.draft(steps, not (self.rule.target_at_draft_states and len(steps) == 1))
        positions, B = torch.cat(groups, 1), self.state.batch
        sizes = [g.shape[1] for g in groups]
        guidance = torch.cat([torch.full((B, n), s[2], device=positions.device) for n, s in zip(sizes, steps)], 1) \
            if self.state.cfg else 1.0
        x_T, noises = self.rnd.noise.at(positions)
        u = self.rnd.uniforms.gather(1, positions[..., None].expand(-1, -1, self.rnd.uniforms.shape[2]))
        helper = self.charge("drafter", self.drafter) if self.drafter is not self.target and not self.chain_only \
            else nullcontext()
        with self.charge("target", self.target), helper:        # the drafter's head helps finish rejected chains
            drafted = self.state.tokens if self.chain_only else self.dstate.tokens
            z = draft_contexts(self.target, self.state, drafted, groups, self.plan.contexts)
            verdict = verify_tokens(self.target, self.rule, z, guidance, chain, x_T, noises, u,
                                    self.config.temperature, self.generator, self.drafter, zq,
                                    self.config.head_window)
        drafted = verdict.tokens if chain is None else chain.tokens
        changed = ((verdict.tokens - drafted).abs().amax(-1) > self.config.match_tol) | (chain is None)  # [B, N]
        commit = len(steps)
        if self.plan.policy == "truncate":
            ends = torch.tensor(sizes).cumsum(0).tolist()
            step_changed = torch.stack([changed[:, e - n:e].any(1) for e, n in zip(ends, sizes)], 1)   # [B, G]
            first = torch.where(step_changed.any(1), step_changed.int().argmax(1), len(steps))
            commit = min(int(first.min()) + 1, len(steps))                        # the batch's common prefix
        n = sum(sizes[:commit])
        tokens = torch.where(changed[..., None], verdict.tokens, drafted)[:, :n]
        self.target.write(self.state, positions[:, :n], tokens)
        st = self.stats
        st.first_rejected.scatter_(1, positions[:, :n], verdict.first_rejected[:, :n])
        st.window, st.rounds = verdict.window, st.rounds + 1
        st.target_forwards += 1
        st.target_rows += len(steps) if self.plan.contexts == "per_step" else 1
        st.drafted += changed.numel() if chain is not None else 0
        self.counts += torch.cat([(~changed[:, :n]).sum()[None], verdict.counts])
        return commit


def generate_continuous(target: MARAdapter, cond: Tensor, drafter: MARAdapter | None = None,
                        rule: ContinuousRule | None = None, config: LoopConfig | None = None, decode: bool = True,
                        **overrides) -> ContinuousResult:
    """Generate one image per class id in cond [B] with target-only MAR (drafter None) or speculatively.
    config: a LoopConfig; overrides: its fields by name (num_iter=, cfg=, temperature=, gamma=, policy=,
    prefill_ratio=, contexts=, order=, seed=, ...). -> ContinuousResult."""
    config = replace(config or LoopConfig(), **overrides)
    check_models(target, drafter, rule)
    if drafter is not None and config.temperature <= 0:
        raise ValueError(f"speculative decoding needs temperature > 0 (the heads' transitions must be Gaussians), "
                         f"got {config.temperature}; use drafter=None for deterministic chains")
    plan = plan_run(config, target, rule, drafter is not None, getattr(drafter, "chain_only", False))
    t0 = time.perf_counter()
    with torch.no_grad():
        run = _Run(target, drafter, rule, cond, config, plan)
        k = 0
        while k < len(run.steps):
            k += run.target_step(k) if drafter is None or run.steps[k][3] else run.spec_round(k)
        images = target.decode(run.state.tokens) if decode and getattr(target, "can_decode", False) else None
    st, (accepted, t_head, d_head, drafted, passed, fallbacks) = run.stats, run.counts.tolist()
    st.accepted, st.transitions_drafted, st.transitions_accepted, st.fallbacks = accepted, drafted, passed, fallbacks
    st.target_head_calls, st.drafter_head_calls = st.target_head_calls + t_head, st.drafter_head_calls + d_head
    run.stats.wall_s = time.perf_counter() - t0
    return ContinuousResult(run.state.tokens, images, run.stats, plan)
