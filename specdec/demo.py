"""`specdec demo`: plain AR against speculative decoding on the embedded zoo, in one process, one table, two figures.

Speed (the headline, the field's convention): latency of one image (batch 1), every method through the same
`specdec.generate`, after one untimed warm-up, timed in interleaved rounds (AR, A, B, AR, A, B, ...) so that load
from other processes hits all methods alike; min / median / max per method. A speedup larger than its counts allow
(MAL * t_step / t_verify, with the target's raw step costs measured here) or a large spread is flagged
"unreliable: rerun on a quiet machine". Beside it, throughput at the demo's batch (one interleaved pass).
Quality, on the batch: the samples' NLL under the target, and the feature-space Frechet distance against held-out
crops of the same classes, shown only from 200 images on (below that its noise exceeds the differences).
Writes into the output folder:
  table.json      the rows (MAL and its standard error over the images, acceptance, target forwards per image,
                  latency, speedup and its bound, throughput, NLL, FD) and the setup (sampling, seed, threads, device)
  samples.png     the images of every method, one row each (same seeds)
  acceptance.png  per-position share of tokens committed from drafts, one panel per speculative method
"""
from __future__ import annotations

import dataclasses
import json
import tempfile
from pathlib import Path

import torch

from specdec import metrics
from specdec.bench.methods import DEMO_METHODS, MODEL_DRAFTER, QUICK_METHODS, Method, available, build_method
from specdec.bench.results import format_table
from specdec.bench.timing import count_bound, interleaved_rounds, reliability, set_threads, step_costs
from specdec.compiled import DEFAULT_COMPILE, STEP_COMPILE, TARGET_COMPILE, compile_adapter
from specdec.plots import acceptance_heatmaps, image_grid
from specdec.devices import use_device
from specdec.precision import as_dtype, dtype_name
from specdec.sampling import Sampling


class DemoError(Exception):
    """A bad demo input (unknown class, unusable output folder): what is wrong and what to do."""


def check_out_dir(path: str | Path) -> Path:
    """The output folder, created if needed; DemoError when it cannot be created or written to."""
    out = Path(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DemoError(f"cannot create output folder {out}: {e.strerror}; pass --out with a writable path") from e
    try:        # a real write: permission bits say nothing to root, and read-only or virtual file systems exist
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as e:
        raise DemoError(f"output folder {out} is not writable ({e.strerror}); pass --out with a writable "
                        f"path") from e
    return out


def demo_dtype(dtype: str | None) -> str:
    """A demo's compute dtype by name (None: the default); DemoError naming the choices."""
    try:
        return dtype_name(as_dtype(dtype))
    except ValueError as e:
        raise DemoError(str(e)) from e


def demo_device(device: str | None) -> torch.device:
    """A demo's device by name (None: the default, cpu), checked against this machine; DemoError with the fix."""
    try:
        return use_device(device)
    except (RuntimeError, ValueError) as e:
        raise DemoError(str(e)) from e


# how each drafter compiles its own draft step when the demo runs compiled (drafters without one stay eager)
DRAFTER_COMPILE = {"model": "freeze", "eagle": "freeze", "jacobi": True}


def compiled_setup(bundle, methods: list[Method], compile: str | None):
    """The bundle with its target compiled as `compile` says (`specdec.compiled.TARGET_COMPILE`; None: off) and the
    methods with their drafters compiling their own steps -> (bundle, methods, compiled: whether the engine's chain
    step runs compiled too); DemoError naming the choices."""
    compile = compile or DEFAULT_COMPILE
    if compile not in TARGET_COMPILE:
        raise DemoError(f"unknown compile setting {compile!r}; valid: {', '.join(TARGET_COMPILE)}")
    how = TARGET_COMPILE[compile]
    if how is None:
        return bundle, methods, False
    try:
        bundle = dataclasses.replace(bundle, target=compile_adapter(bundle.target, *how))
    except (TypeError, ValueError) as e:
        raise DemoError(f"cannot compile the target: {e}") from e
    methods = [dataclasses.replace(m, drafter_params={**m.drafter_params, "compile": DRAFTER_COMPILE[m.drafter]})
               if m.drafter in DRAFTER_COMPILE else m for m in methods]
    return bundle, methods, compile in STEP_COMPILE


def prepare(out: str | Path, threads: int) -> tuple[Path, int]:
    """What every demo does first: a writable output folder, the torch threads set (the demos themselves run under
    torch.no_grad(), which does not leak into the caller). -> (the folder, the threads in use); DemoError."""
    out = check_out_dir(out)
    try:
        return out, set_threads(threads)
    except ValueError as e:
        raise DemoError(str(e)) from e


FD_MIN_IMAGES = metrics.FD_MIN_IMAGES


@torch.no_grad()
def run_demo(out: str | Path = "specdec-demo", quick: bool = False, classes: list[str] | None = None,
             per_class: int = 0, seed: int = 0, temperature: float = 1.0, top_k: int = 0, cfg: float = 3.0,
             repeats: int = 0, fd_real: int = 256, threads: int = 0, rule: str | None = None,
             rule_params: dict | None = None, dtype: str | None = None, device: str | None = None,
             compile: str | None = None) -> int:
    """Run the demo and print its table. classes: zoo class names (None: the first 3 quick / 6 full); per_class:
    0 = 2 quick / 4 full; repeats: latency rounds, 0 = 3 quick / 5 full; threads: 0 = the physical cores;
    rule: one more row with this rule (a name, `module:Class` or `file.py:Class`) and rule_params over the model
    drafter; dtype: what the zoo's generative models compute in (`specdec.precision`, default float32); device:
    where they run (`specdec.devices`, default cpu); compile: how the target's steps run (`compiled_setup`: "off",
    "on", "freeze", "cuda-graphs", "freeze+step"; drafters then compile their own). Raises DemoError for bad
    inputs."""
    import specdec.zoo

    out, threads = prepare(out, threads)
    dtype, device = demo_dtype(dtype), demo_device(device)
    try:
        bundle = specdec.zoo.load(device, dtype=dtype)
    except specdec.zoo.ZooError as e:
        raise DemoError(str(e)) from e
    try:
        class_ids = [bundle.class_id(n) for n in classes or bundle.classes[: (3 if quick else 6)]]
    except ValueError as e:
        raise DemoError(str(e)) from e
    names = [bundle.classes[i] for i in class_ids]
    per_class = per_class or (2 if quick else 4)
    cond = torch.tensor([c for c in class_ids for _ in range(per_class)])
    sampling = Sampling(temperature=temperature, top_k=top_k, cfg_scale=cfg)
    rounds = repeats or (3 if quick else 5)
    methods = available(QUICK_METHODS if quick else DEMO_METHODS, bundle)
    if rule is not None:
        methods.append(Method(f"{rule} + model k=4", "model", dict(MODEL_DRAFTER), rule,
                              dict(rule_params or {})))
    bundle, methods, compiled = compiled_setup(bundle, methods, compile)
    print(f"specdec demo: {len(methods)} methods, latency of 1 image ({rounds} interleaved rounds) and "
          f"{len(cond)} images ({', '.join(names)}), {sampling}, seed {seed}, {threads} threads", flush=True)

    rows, images, maps, t_step, fd_used = measure_methods(bundle, methods, cond, sampling, seed, rounds, fd_real,
                                                          compiled)
    maps = [m.reshape(bundle.target.grid) for m in maps]                                  # [H, W]
    meta = {"sampling": vars(sampling), "seed": seed, "classes": names, "device": str(bundle.target.device),
            "dtype": dtype, "compile": compile or DEFAULT_COMPILE, "threads": threads, "latency_batch": 1,
            "throughput_batch": len(cond),
            "target_step_s": t_step, "fd_real_images": fd_used,
            "fd_metric": f"Frechet distance in the zoo feature net's space (from {FD_MIN_IMAGES} images on)"}
    (out / "table.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    image_grid(images, [r["method"] for r in rows], out / "samples.png",
               columns=[bundle.classes[int(c)] for c in cond])
    acceptance_heatmaps(maps[1:], [r["method"] for r in rows[1:]], out / "acceptance.png")
    print(format_table(rows))
    for r in rows:
        if r["reliability"]:
            print(f"{r['method']}: {r['reliability']}")
    print(f"\nwrote {out / 'samples.png'}, {out / 'acceptance.png'}, {out / 'table.json'}")
    return 0


def measure_methods(bundle, methods: list[Method], cond: torch.Tensor, sampling: Sampling, seed: int, rounds: int,
                    fd_real: int, compiled: bool = False):
    """Every method through the same `specdec.generate` on `bundle` (a `specdec.protocols.Bundle`): latency of
    cond[:1] in `rounds` interleaved rounds after a warm-up, throughput of the whole batch cond [B] in one
    interleaved pass, quality of that batch. -> (rows: the table's dicts, images: decoded samples per method,
    maps: per-position share committed from drafts [T] per method, t_step: the target's raw step (s),
    fd_used: held-out images behind the Frechet distance, 0 when below FD_MIN_IMAGES). compiled: every generation
    runs the engine's chain step compiled (`generate(..., compiled=True)`)."""
    from specdec.engine import generate

    geometries: dict = {}            # rules over the codebook share one geometry and its k-NN tables
    try:
        built = [build_method(m, bundle, geometries) for m in methods]
    except (TypeError, ValueError) as e:
        raise DemoError(f"cannot build {methods[-1].label!r}: {e}") from e
    for _, rule in built:
        rule.prepare(bundle.target.device)

    def run(drafter, rule, c):
        return lambda: generate(bundle.target, c, drafter=drafter, rule=rule, sampling=sampling, seed=seed,
                                compiled=compiled)

    for drafter, rule in built:      # warm-up: first calls at a new shape are several times slower
        run(drafter, rule, cond[:1])()
    latency, single = interleaved_rounds([run(d, r, cond[:1]) for d, r in built], rounds)
    throughput, results = interleaved_rounds([run(d, r, cond) for d, r in built], 1)
    ks = {d.k for d, _ in built if d is not None}
    costs = {k: step_costs(bundle.target, cond[:1], sampling, k + 1) for k in ks}
    t_step = min(c[0] for c in costs.values()) if costs else 0.0

    real_feats = None
    if len(cond) >= FD_MIN_IMAGES:   # held-out crops of the same classes, in the same proportions as the samples
        real = bundle.heldout_images(fd_real, seed=0, classes=cond[torch.arange(fd_real) % len(cond)])
        real_feats = metrics.extract_features(real, bundle.features)
    rows, images, maps = [], [], []
    for method, (drafter, _), lat, one, thr, res in zip(methods, built, latency, single, throughput, results):
        st = res.stats
        speedup = latency[0].median / lat.median
        bound = count_bound(one.stats.mean_accepted_length, costs[drafter.k][0], costs[drafter.k][1]) \
            if drafter is not None else 1.0
        fd = None if real_feats is None else \
            metrics.frechet_distance(metrics.extract_features(res.images, bundle.features), real_feats)
        rows.append({"method": method.label, "drafter": method.drafter or "-", "rule": method.rule,
                     "k": drafter.k if drafter is not None else 0,        # draft tokens per step, as the bench's
                     "mean_accepted_length": st.mean_accepted_length,
                     "mean_accepted_length_se": metrics.mal_standard_error(st.forwards_per_row, st.num_tokens - 1),
                     "acceptance_rate": st.acceptance_rate,
                     "target_forwards_per_image": st.target_forwards_per_image,
                     "latency_s": lat.as_dict(), "speedup": speedup, "speedup_bound": bound,
                     "reliability": reliability(speedup, bound, lat, latency[0]),
                     "throughput_images_per_s": len(cond) / thr.median,
                     "throughput_speedup": throughput[0].median / thr.median,
                     "feature_fd": fd, "nll": float(metrics.token_nll(bundle.target_gpt, res.tokens, cond).mean()),
                     "images": len(cond), "rounds": rounds})
        images.append(res.images)
        maps.append(st.acceptance_map.float().mean(0))                              # [T]
    return rows, images, maps, t_step, fd_real if real_feats is not None else 0
