"""`specdec demo --continuous`: target-only MAR, CSpD and the exact rule on the continuous-token zoo
(`specdec.zoo.continuous`), every method through the same loop (`specdec.continuous_loop.generate_continuous`).

Rows: target-only MAR at the zoo's K AR steps (the baseline) and, full demo, at K/2 (fewer steps: the cheap way to
be faster, which a speculative method has to beat); CSpD (arXiv 2411.11925) with the paper's test (T = 1) and the
released code's relaxed one (T = 42), pre-fill 0.15, `independent` policy, pre-draft contexts; the exact rule over
Gaussian transitions (arXiv 2501.05370) with `truncate` and per-step contexts. Lossy rows say so (`lossless`).
Speed as in the image demo: latency of one image (generation only, decoding excluded, the same for all) after a
warm-up, in interleaved rounds, min / median / max; throughput at the demo's batch in one interleaved pass.
Quality: the Frechet distance of the zoo feature net's features against held-out crops, from 200 images on.
Writes into the output folder:
  table.json    the rows (the image demo's fields: method, drafter, rule, k = gamma, mean_accepted_length,
                target_forwards_per_image, speedup, feature_fd, ...; plus lossless, head and backbone seconds)
  samples.png   the images of every method, one row each (same seeds)
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from drafters.frozen_head import FrozenHeadDrafter
from specdec import metrics
from specdec.bench.timing import Timing, interleaved_rounds, reliability
from specdec.continuous_loop import ContinuousResult, LoopConfig, generate_continuous
from specdec.demo import DemoError, demo_device, prepare
from specdec.devices import same_device
from specdec.plots import image_grid
from specdec.registry import make_continuous_rule


@dataclass(frozen=True)
class ContinuousMethod:
    """label; rule: a continuous rule name (None: target-only); params: the rule's; loop: LoopConfig overrides
    (gamma, num_iter, ...; num_iter given as a fraction of the baseline's with `steps_ratio`); drafter: "zoo" (the
    zoo's drafter MAR) or "frozen_head" (`drafters.FrozenHeadDrafter`, no network; drafter_params its own)."""

    label: str
    rule: str | None = None
    params: dict = field(default_factory=dict)
    loop: dict = field(default_factory=dict)
    steps_ratio: float = 1.0
    drafter: str = "zoo"
    drafter_params: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.drafter not in DRAFTERS:
            raise ValueError(f"drafter must be one of {DRAFTERS}, got {self.drafter!r}")

    @property
    def drafter_label(self) -> str:
        if self.rule is None:
            return "-"
        return "zoo drafter" if self.drafter == "zoo" else \
            f"frozen head ({self.drafter_params.get('predict', FrozenHeadDrafter.predict)})"


CSPD = dict(prefill_ratio=0.15)
DRAFTERS = ("zoo", "frozen_head")


def frozen_method(window: int = 4) -> ContinuousMethod:
    """The exact rule with the frozen drafter, `window` head transitions per target head call."""
    return ContinuousMethod(f"exact frozen w={window}", "gaussian_chain", loop=dict(gamma=1, head_window=window),
                            drafter="frozen_head")


DEMO_METHODS = (
    ContinuousMethod("MAR target-only"),
    ContinuousMethod("MAR target-only, half the steps", steps_ratio=0.5),
    ContinuousMethod("CSpD T=1 g=4", "cspd", dict(CSPD, inner_temperature=1.0, gamma=4)),
    ContinuousMethod("CSpD T=1 g=8", "cspd", dict(CSPD, inner_temperature=1.0, gamma=8)),
    ContinuousMethod("CSpD T=42 g=4", "cspd", dict(CSPD, inner_temperature=42.0, gamma=4)),
    ContinuousMethod("CSpD T=42 g=8", "cspd", dict(CSPD, inner_temperature=42.0, gamma=8)),
    ContinuousMethod("exact g=1", "gaussian_chain", loop=dict(gamma=1)),
    ContinuousMethod("exact g=2", "gaussian_chain", loop=dict(gamma=2)),
    frozen_method(4),
)
QUICK_METHODS = tuple(DEMO_METHODS[i] for i in (0, 2, 4, 6, 8))


def build(method: ContinuousMethod, bundle, base: LoopConfig):
    """-> (drafter or None, rule or None, LoopConfig) of a method on `bundle`."""
    rule = None if method.rule is None else make_continuous_rule(method.rule, **method.params)
    config = replace(base, num_iter=max(1, round(base.num_iter * method.steps_ratio)), **method.loop)
    if rule is None:
        return None, None, config
    return (bundle.drafter if method.drafter == "zoo" else FrozenHeadDrafter(**method.drafter_params)), rule, config


def run_methods(bundle, built: list, cond: torch.Tensor, rounds: int) -> tuple[list[Timing], list[ContinuousResult]]:
    """Warm each method up on one image, then time `rounds` interleaved rounds on cond [B] (generation only)."""
    calls = [lambda d=d, r=r, c=c: generate_continuous(bundle.target, cond, d, r, c, decode=False)
             for d, r, c in built]
    for d, r, c in built:
        generate_continuous(bundle.target, cond[:1], d, r, c, decode=False)
    return interleaved_rounds(calls, rounds)


def stats_fields(res: ContinuousResult) -> dict:
    """The counters of a result, per image where it says so."""
    st, n = res.stats, res.stats.images
    return {"mean_accepted_length": st.mean_accepted_length, "acceptance_rate": st.acceptance_rate,
            "transition_acceptance": st.transition_acceptance,
            "target_forwards_per_image": st.target_forwards_per_image,
            "target_backbone_rows_per_image": float(st.target_rows),
            "target_head_calls_per_image": float(st.target_head_calls), "rounds_per_image": float(st.rounds),
            "fallbacks": st.fallbacks, "gamma": res.plan.gamma, "policy": res.plan.policy,
            "contexts": res.plan.contexts,
            **{k: v / n for k, v in st.seconds.items()}}


def measure_continuous(bundle, methods, cond: torch.Tensor, base: LoopConfig, rounds: int, fd_real: int):
    """Latency (cond[:1]), throughput (cond) and quality (cond, FD from FD_MIN_IMAGES images) of every method.
    -> (rows, images per method [B, 3, H, W], fd_used: held-out images behind the FD, 0 when none)."""
    try:
        built = [build(m, bundle, base) for m in methods]
    except (TypeError, ValueError) as e:
        raise DemoError(f"cannot build a continuous method: {e}") from e
    latency, single = run_methods(bundle, built, cond[:1], rounds)
    throughput, results = interleaved_rounds(
        [lambda d=d, r=r, c=c: generate_continuous(bundle.target, cond, d, r, c, decode=False) for d, r, c in built],
        1)
    images = [bundle.target.decode(res.tokens) for res in results]
    real = None
    if len(cond) >= metrics.FD_MIN_IMAGES:
        held = bundle.heldout_images(fd_real, seed=0, classes=cond[torch.arange(fd_real) % len(cond)])
        real = metrics.extract_features(held, bundle.features)
    rows = []
    for m, (d, rule, config), lat, one, thr, res, pics in zip(methods, built, latency, single, throughput, results,
                                                             images):
        speedup = latency[0].median / lat.median
        target_s = one.stats.seconds["target_backbone_s"] + one.stats.seconds["target_head_s"]
        bound = latency[0].median / target_s if target_s > 0 else float("inf")   # a method waits for its target
        fd = None if real is None or pics is None else \
            metrics.frechet_distance(metrics.extract_features(pics, bundle.features), real)
        rows.append({"method": m.label, "drafter": m.drafter_label,
                     "rule": "target-only" if rule is None else getattr(rule, "label", rule.name),
                     "k": 0 if rule is None else one.plan.gamma,
                     **stats_fields(one), "num_iter": config.num_iter,
                     "latency_s": lat.as_dict(), "speedup": speedup, "speedup_bound": bound,
                     "reliability": reliability(speedup, bound, lat, latency[0]),
                     "throughput_images_per_s": len(cond) / thr.median,
                     "throughput_speedup": throughput[0].median / thr.median, "feature_fd": fd, "nll": None,
                     "lossless": res.lossless, "images": len(cond), "rounds": rounds})
    return rows, images, fd_real if real is not None else 0


def format_rows(rows: list[dict]) -> str:
    """One line per method: rule, gamma, MAL, target passes and head calls per image, speedup (range), token and
    transition acceptance, FD, lossless."""
    head = (f"{'method':32s} {'rule':22s} {'g':>2s} {'MAL':>6s} {'pass/img':>8s} {'head/img':>8s} {'speedup':>8s} "
            f"{'range':>11s} {'acc':>5s} {'trans':>5s} {'FD':>7s} lossless")
    base = rows[0]["latency_s"]["median_s"]
    lines = [head, "-" * len(head)]
    for r in rows:
        fd = "-" if r["feature_fd"] is None else f"{r['feature_fd']:.2f}"
        span = f"{base / r['latency_s']['max_s']:.2f}-{base / r['latency_s']['min_s']:.2f}"
        flag = "!" if r["reliability"] else " "
        lines.append(f"{r['method']:32s} {r['rule']:22s} {r['k']:2d} {r['mean_accepted_length']:6.2f} "
                     f"{r['target_forwards_per_image']:8.1f} {r['target_head_calls_per_image']:8.1f} "
                     f"{r['speedup']:6.2f}x{flag} {span:>11s} {r['acceptance_rate']:5.2f} "
                     f"{r['transition_acceptance']:5.2f} {fd:>7s} {r['lossless']}")
    return "\n".join(lines)


@torch.no_grad()
def run_continuous_demo(out: str | Path = "specdec-demo-continuous", quick: bool = False,
                        classes: list | None = None, per_class: int = 0, seed: int = 0, temperature: float = 1.0,
                        cfg: float = 3.0, repeats: int = 0, fd_real: int = 256, threads: int = 0,
                        bundle=None, device: str | None = None) -> int:
    """Run the continuous demo and print its table; arguments as `specdec.demo.run_demo` (bundle: a continuous
    bundle to use instead of the zoo's). Raises DemoError."""
    out, threads = prepare(out, threads)
    requested, device = device, demo_device(device)
    if bundle is not None and requested is not None and not same_device(device, bundle.target.device):
        raise DemoError(f"device {requested!r} was asked for, but the given bundle is on {bundle.target.device}: "
                        f"load the bundle on {device} (specdec.zoo.continuous.load({str(device)!r})) or leave the "
                        f"device out to run where the bundle is")
    if bundle is None:
        import specdec.zoo
        from specdec.zoo import continuous
        if not continuous.available():
            raise DemoError("the continuous zoo's weights are not installed: reinstall specdec or train them with "
                            "`python experiments/train_continuous_zoo.py`")
        try:
            bundle = continuous.load(device)
        except specdec.zoo.ZooError as e:
            raise DemoError(str(e)) from e
    try:
        ids = [bundle.class_id(c) for c in classes or bundle.classes[: (2 if quick else 4)]]
        base = LoopConfig(num_iter=bundle.num_iter, cfg=cfg, temperature=temperature, seed=seed)
    except ValueError as e:
        raise DemoError(str(e)) from e
    cond = torch.tensor(ids).repeat_interleave(per_class or 2)
    rounds = repeats or (2 if quick else 3)
    methods = QUICK_METHODS if quick else DEMO_METHODS
    print(f"specdec demo --continuous: {len(methods)} methods, latency of 1 image ({rounds} interleaved rounds) "
          f"and {len(cond)} images, K={base.num_iter} AR steps, cfg {cfg}, temperature {temperature}, seed {seed}, "
          f"{threads} threads", flush=True)
    rows, images, fd_used = measure_continuous(bundle, methods, cond, base, rounds, fd_real)
    meta = {"seed": seed, "cfg": cfg, "temperature": temperature, "num_iter": base.num_iter,
            "classes": [bundle.classes[i] for i in ids], "device": str(bundle.target.device), "dtype": "float32",
            "threads": threads, "latency_batch": 1, "throughput_batch": len(cond), "fd_real_images": fd_used,
            "head_steps": bundle.target.num_steps, "tokens_per_image": bundle.target.num_tokens,
            "fd_metric": f"Frechet distance in the zoo feature net's space (from {metrics.FD_MIN_IMAGES} images on)"}
    (out / "table.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    if all(p is not None for p in images):
        image_grid(images, [r["method"] for r in rows], out / "samples.png",
                   columns=[bundle.classes[int(c)] for c in cond])
    print(format_rows(rows))
    for r in rows:
        if r["reliability"]:
            print(f"{r['method']}: {r['reliability']}")
    print(f"\nwrote {out / 'samples.png'}, {out / 'table.json'}")
    return 0
