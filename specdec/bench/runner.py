"""Running a sweep: measure every pending configuration of a config and append one JSON row per finished one.

Each configuration builds its drafter and rule once (rules over one token table share a TokenGeometry and its
k-NN tables, prepared before any timing), runs `warmup` untimed generations, then is timed in `repeats`
interleaved rounds with plain AR on the same batches (AR, method, AR, method, ...; `specdec.bench.timing`): its
speedup compares runs made side by side, and a row whose speedup exceeds what its counts allow, or whose rounds
spread widely, says "unreliable: rerun on a quiet machine". Tokens, images and quality come from the method's last
round; every (generator, sampling, batch, images, seed, classes) group's AR tokens from its baseline row.

Multi-process: under `torchrun --nproc_per_node N` or `accelerate launch --multi_gpu --num_processes N` (on CPU too:
accelerate's PartialState then uses gloo) the pending configurations are split with
`PartialState.split_between_processes`; each process writes `<results>.part<rank>.jsonl` and the main process merges
the parts into the results file after `wait_for_everyone`. Note: `accelerate launch --cpu --num_processes N`
(accelerate 1.15) starts ONE process unless an MPI hostfile is given (it uses its simple launcher); it works, but
serially.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

from specdec import metrics
from specdec.bench.config import BenchConfig, BenchConfigError, config_key, family
from specdec.bench.generators import load_generator, load_scorer
from specdec.bench.methods import Method, build_method
from specdec.bench.results import (append_row, execution, finished_keys, merge_parts, part_files, part_path,
                                   read_rows, repair, restore_order, set_aside)
from specdec.bench.stale import card_weights
from specdec.bench.timing import Timing, count_bound, interleaved_rounds, reliability, step_costs
from specdec.compiled import STEP_COMPILE
from specdec.devices import use_device
from specdec.engine import generate
from specdec.plots import image_strip
from specdec.sampling import Sampling


class Abort(Exception):
    """Raised by `max_rows` to stop a sweep half-way (tests; a kill does the same)."""


# -- processes --------------------------------------------------------------------------------------------------------
@dataclass
class _Dist:
    """PartialState when launched with several processes, a trivial stand-in otherwise."""

    state: Any = None
    num_processes: int = 1
    process_index: int = 0

    @property
    def is_main(self) -> bool:
        return self.process_index == 0

    def wait(self):
        if self.state is not None:
            self.state.wait_for_everyone()

    def device(self, device: str) -> str:
        """A run's device for this process: several processes asked for "cuda" take one GPU each."""
        if self.state is None or device != "cuda":
            return device
        return f"cuda:{self.state.local_process_index}"

    def split(self, items: list) -> list:
        if self.state is None:
            return items
        with self.state.split_between_processes(items) as part:
            return list(part)


def processes() -> _Dist:
    """This process's place among the sweep's processes (one, unless launched by torchrun / accelerate)."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return _Dist()
    from accelerate import PartialState

    # on a CPU-only machine PartialState only goes multi-process (gloo) when told cpu=True
    state = PartialState(cpu=not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_CPU", "").lower()
                         in ("1", "true", "yes"))
    return _Dist(state, state.num_processes, state.process_index)


# -- measuring one configuration ----------------------------------------------------------------------------------
@dataclass
class _PerGenerator:
    """What a process keeps per generator across configurations."""

    bundle: Any
    geometries: dict = field(default_factory=dict)      # token-table name -> TokenGeometry (shared k-NN tables)
    step_costs: dict = field(default_factory=dict)      # (group, k) -> (t_step, t_verify) of the target
    real_feats: dict = field(default_factory=dict)      # class-id tuple -> held-out features [fd_real, D]
    baselines: dict = field(default_factory=dict)       # group -> _Measured of the plain-AR run


@dataclass
class _Measured:
    """One configuration's generations: N = images, T = tokens per image."""

    timing: Timing                # seconds per round, summed over the batches
    ar_timing: Timing             # plain AR on the same batches, in the same rounds (the method's own for AR)
    tokens: Tensor                # [N, T]
    images: Tensor | None         # [N, 3, H, W] in [-1, 1], None when the target cannot decode
    stats: list                   # SpecStats of every batch
    cond: Tensor                  # [N] class ids
    sampling: Sampling
    drafter: Any                  # None for plain AR
    rule: Any


def _cond_for(bundle, run: dict, n: int) -> Tensor:
    names = run["classes"] or list(bundle.classes[: run["n_classes"]])
    try:
        ids = [bundle.class_id(c) if not isinstance(c, int) else int(c) for c in names]
    except ValueError as e:
        raise BenchConfigError(str(e)) from e
    return torch.tensor([ids[i % len(ids)] for i in range(n)])


def _batches(run: dict, bundle) -> list[tuple[Tensor, int]]:
    """[(cond [b], seed)]: `images` images in batches of `batch`; batch i uses seed + 7919 * i."""
    cond = _cond_for(bundle, run, run["images"])
    return [(cond[i: i + run["batch"]], run["seed"] + 7919 * (i // run["batch"]))
            for i in range(0, run["images"], run["batch"])]


def _measure(gen: _PerGenerator, run: dict, repeats: int, warmup: int) -> _Measured:
    bundle = gen.bundle
    sampling = Sampling(**run["sampling"])          # the run holds the JSON form its key is hashed from
    method = Method(run["label"], run["drafter"], dict(run["drafter_params"]), run["rule"], dict(run["rule_params"]))
    drafter, rule = build_method(method, bundle, gen.geometries)
    rule.prepare(bundle.target.device)           # neighbour tables are built here, never inside a timed generation
    batches = _batches(run, bundle)
    compiled = execution(run)[1] in STEP_COMPILE     # the engine's chain step as one graph, for AR and the method

    # plain AR (no drafter: the engine samples p whatever the rule) interleaved with the method, round by round
    drafters = [drafter] if drafter is None else [None, drafter]
    for _ in range(warmup):        # untimed: first calls at a new shape are several times slower
        for d in drafters:
            generate(bundle.target, batches[0][0], drafter=d, rule=rule, sampling=sampling, seed=run["seed"],
                     decode=False, compiled=compiled)

    def all_batches(d):
        return lambda: [generate(bundle.target, c, drafter=d, rule=rule, sampling=sampling, seed=s, compiled=compiled)
                        for c, s in batches]
    timings, last = interleaved_rounds([all_batches(d) for d in drafters], repeats)
    results = last[-1]
    images = [res.images for res in results]
    return _Measured(timing=timings[-1], ar_timing=timings[0], tokens=torch.cat([res.tokens for res in results]),
                     images=torch.cat(images) if all(i is not None for i in images) else None,
                     stats=[res.stats for res in results], cond=torch.cat([c for c, _ in batches]),
                     sampling=sampling, drafter=drafter, rule=rule)


def _group(run: dict) -> str:
    return json.dumps([run["generator"], run["sampling"], run["batch"], run["images"], run["seed"], run["classes"],
                       run["n_classes"], *execution(run)], sort_keys=True)


def _baseline_run(run: dict) -> dict:
    b = {**run, "label": "AR", "drafter": None, "drafter_params": {}, "rule": "exact", "rule_params": {}}
    b["key"] = config_key(b)
    return b


def _per_position(stats: list) -> list[float]:
    """Acceptance rate at each draft position [k], pooled over batches."""
    k = max((len(s.accepted_per_position) for s in stats if s.accepted_per_position is not None), default=0)
    acc_pos = torch.zeros(k)
    dr_pos = torch.zeros(k)
    for s in stats:
        if s.accepted_per_position is not None and len(s.accepted_per_position):
            acc_pos[: len(s.accepted_per_position)] += s.accepted_per_position.float()
            dr_pos[: len(s.drafted_per_position)] += s.drafted_per_position.float()
    return [round(float(x), 4) for x in (acc_pos / dr_pos.clamp_min(1))]


def _feature_fd(gen: _PerGenerator, m: _Measured, fd_real: int) -> float | None:
    """Frechet distance in the bundle's feature space against real crops of the generated classes, in the same
    proportions as the generated images (their features are computed once per class set). None below
    metrics.FD_MIN_IMAGES images, where its seed noise exceeds the differences between methods."""
    if m.images is None or len(m.images) < metrics.FD_MIN_IMAGES:
        return None
    ids = tuple(sorted(set(m.cond.tolist())))
    if ids not in gen.real_feats:
        real_cond = torch.tensor(ids)[torch.arange(fd_real) % len(ids)]
        real = gen.bundle.heldout_images(fd_real, seed=0, classes=real_cond)
        gen.real_feats[ids] = metrics.extract_features(real, gen.bundle.features)
    return metrics.frechet_distance(metrics.extract_features(m.images, gen.bundle.features), gen.real_feats[ids])


def metric_names(scorers) -> dict:
    src = "specdec.metrics"
    return {"feature_fd": f"Frechet distance in the generator's feature net space vs held-out real images ({src})",
            "nll": f"mean per-token NLL (nats) of the samples under the target, no CFG ({src})",
            "tvd_vs_baseline": "total variation between token histograms of this run and the AR baseline",
            "distortion_bound": "per-step total-variation bound certified by the rule (null = none)",
            **{f"scores.{s.name}": f"user scorer {s.name}" for s in scorers}}


def distortion_bound(rule, one_hot_drafts: bool):
    """The rule's certified per-step TV bound (0 lossless, None no bound), as the rule declares it."""
    return 0.0 if rule is None else rule.distortion_bound(one_hot_drafts)


def _r6(x):
    return None if x is None else round(float(x), 6)


def measure_row(gen: _PerGenerator, run: dict, cfg: BenchConfig, scorers: list, image_dir: Path, rel_to: Path,
                dist: _Dist) -> dict:
    """Measure one configuration (and its group's baseline, once) -> the JSON row."""
    bundle = gen.bundle
    g = _group(run)
    if g not in gen.baselines:
        gen.baselines[g] = _measure(gen, _baseline_run(run), cfg.repeats, cfg.warmup)
    base = gen.baselines[g]
    is_base = run["drafter"] is None and run["rule"] == "exact"
    m = base if is_base else _measure(gen, run, cfg.repeats, cfg.warmup)

    n = m.tokens.shape[0]
    tf = sum(s.target_forwards for s in m.stats)
    committed = sum(s.committed for s in m.stats)
    drafted = sum(s.drafted for s in m.stats)
    accepted = sum(s.accepted for s in m.stats)
    acc_map = torch.cat([s.acceptance_map for s in m.stats]).float().mean(0)
    per_row = [s.forwards_per_row for s in m.stats]
    mal_se = None if any(f is None for f in per_row) else \
        metrics.mal_standard_error(torch.cat(per_row), m.stats[0].num_tokens - 1)
    b_tf = sum(s.target_forwards for s in base.stats)
    draft_s = sum(s.draft_s for s in m.stats)
    wall_s_gen = sum(s.wall_s for s in m.stats)
    nll = metrics.token_nll(bundle.target_gpt, m.tokens, m.cond).mean()
    tvd = metrics.token_histogram_tvd(m.tokens, base.tokens, bundle.target.vocab_size)
    one_hot = m.sampling.greedy or (m.drafter is not None and m.drafter.one_hot_drafts)
    scores = {s.name: float(s(m.images, m.cond)) if m.images is not None else None for s in scorers}

    image_path = None
    if m.images is not None and cfg.save_images:
        image_path = os.path.relpath(image_strip(m.images[: cfg.save_images], image_dir / f"{run['key']}.png"),
                                     rel_to)
    ar_wall, wall = m.ar_timing.median, m.timing.median
    speedup = ar_wall / wall if wall else None
    bound, note = 1.0, reliability(speedup, 1.0, m.timing) if is_base else None
    if m.drafter is not None:
        key = (g, m.drafter.k)
        if key not in gen.step_costs:             # the target's raw 1-token and (k+1)-token forwards, this batch
            gen.step_costs[key] = step_costs(bundle.target, m.cond[: run["batch"]], m.sampling, m.drafter.k + 1)
        bound = count_bound(committed / tf if tf else 0.0, *gen.step_costs[key])
        note = reliability(speedup, bound, m.timing, m.ar_timing)
    dev = bundle.target.device
    model = getattr(bundle.target, "model", None)
    dtype = next(model.parameters()).dtype if hasattr(model, "parameters") else torch.get_default_dtype()
    return {
        "key": run["key"], "config": {k_: v for k_, v in run.items() if k_ != "key"},
        "label": run["label"], "family": family(run), "is_baseline": is_base,
        "generator": run["generator"], "drafter": run["drafter"], "drafter_params": run["drafter_params"],
        "rule": run["rule"], "rule_params": run["rule_params"],
        "k": int(m.drafter.k) if m.drafter is not None else 0,     # draft tokens per step
        "sampling": run["sampling"], "batch": run["batch"], "images": n, "seed": run["seed"],
        "repeats": cfg.repeats, "device": str(dev), "dtype": str(dtype).replace("torch.", ""),
        "compile": execution(run)[1],
        "threads": torch.get_num_threads(), "num_processes": dist.num_processes,
        "process_index": dist.process_index,
        "mean_accepted_length": _r6(committed / tf if tf else 0.0),
        "mean_accepted_length_se": _r6(mal_se),
        "acceptance_rate": _r6(accepted / drafted if drafted else 0.0),
        "acceptance_per_position": _per_position(m.stats),
        "target_forwards_per_image": _r6(tf / n), "step_compression": _r6(b_tf / tf if tf else None),
        "wall_s": _r6(wall), "wall_per_image_s": _r6(wall / n), "wall_min_s": _r6(m.timing.min),
        "wall_max_s": _r6(m.timing.max), "wall_spread": _r6(m.timing.spread),
        "baseline_wall_per_image_s": _r6(ar_wall / n),
        "baseline_wall_spread": _r6(m.ar_timing.spread), "speedup": _r6(speedup), "speedup_bound": _r6(bound),
        "reliability": note,
        "draft_share": _r6(draft_s / wall_s_gen if wall_s_gen else 0.0),
        "feature_fd": _r6(_feature_fd(gen, m, cfg.fd_real)), "nll": _r6(nll), "tvd_vs_baseline": _r6(tvd),
        "distortion_bound": distortion_bound(m.rule, one_hot), "lossless": bool(m.rule.lossless),
        "scores": scores, "metric": metric_names(scorers),
        "grid": list(bundle.target.grid), "acceptance_map": [round(float(x), 3) for x in acc_map],
        "image_path": image_path, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        # which weights measured it (sha256 prefixes of the zoo cards; empty for generators without cards)
        "weights": card_weights(getattr(bundle, "cards", None) or {}),
    }


# -- a sweep ----------------------------------------------------------------------------------------------------------
@torch.no_grad()        # not torch.set_grad_enabled(False): that would leak into the caller
def run_bench(cfg: BenchConfig, out: str | Path, max_rows: int | None = None,
              on_row: Callable[[dict], None] | None = None, progress: bool = True,
              redo: set[str] | frozenset = frozenset()) -> list[dict]:
    """Run every pending configuration of cfg, appending one JSON line per finished one to `out`.

    max_rows: stop (raise Abort) after this many new rows in this process. on_row(row) is called after each row is
    written (raise in it to interrupt). redo: keys to measure again although `out` has their rows (a retrained
    drafter, a fixed bug): the old rows move to `<out stem>.replaced.jsonl` first and the new ones take their
    places in `out` at the end. Returns the rows this process wrote.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    dist = processes()
    order = [r.get("key") for r in read_rows(out)] if redo else []
    if dist.is_main:
        repair(out)
        set_aside(out, set(redo))
    dist.wait()
    try:
        return _run_pending(cfg, out, max_rows, on_row, progress, dist)
    finally:
        if redo and dist.is_main:
            restore_order(out, order)


def _run_pending(cfg: BenchConfig, out: Path, max_rows: int | None, on_row, progress: bool, dist: _Dist
                 ) -> list[dict]:
    done = finished_keys(out)
    # baselines first, so that a rerun of a half-finished sweep always has them early
    todo = sorted([r for r in cfg.runs if r["key"] not in done], key=lambda r: r["drafter"] is not None)
    mine = dist.split(todo)
    target = out if dist.num_processes == 1 else part_path(out, dist.process_index)
    if target != out:
        repair(target)
    image_dir = out.parent / f"{out.stem}_images"
    scorers = [load_scorer(s) for s in cfg.scorers]

    from tqdm.auto import tqdm

    bar = tqdm(total=len(cfg.runs), initial=len(cfg.runs) - len(todo), desc=f"configs[{dist.process_index}]",
               position=dist.process_index, disable=not progress, unit="cfg")
    per_generator: dict[tuple[str, ...], _PerGenerator] = {}      # (generator, dtype, compile, device) -> its state
    written = []
    try:
        for run in mine:
            dtype, compiled, device = execution(run)
            where = (run["generator"], dtype, compiled, dist.device(device))
            if where not in per_generator:
                per_generator[where] = _PerGenerator(load_generator(*where))
            use_device(per_generator[where].bundle.target.device)   # timing records and waits on this one's GPU
            row = measure_row(per_generator[where], run, cfg, scorers, image_dir, out.parent, dist)
            append_row(target, row)
            written.append(row)
            bar.update(1)
            if on_row is not None:
                on_row(row)
            if max_rows is not None and len(written) >= max_rows:
                raise Abort(f"stopped after {len(written)} rows (max_rows)")
    finally:
        bar.close()
    dist.wait()
    if dist.is_main and dist.num_processes > 1:
        merge_parts(out)
    elif dist.num_processes == 1 and part_files(out):
        merge_parts(out)                     # leftovers of an interrupted multi-process run
    dist.wait()
    return written
