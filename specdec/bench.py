"""`specdec bench`: speedup-vs-quality sweeps over generators x methods x sampling x seeds, as JSON lines.

A config (TOML, or a preset from `specdec/presets/`) has top-level settings, a `[sweep]` table whose lists are
crossed, and `[[method]]` entries (label, drafter + drafter_params, rule + rule_params; a list-valued param is
crossed too):

    generator = "zoo"          # default generator (a [sweep] list overrides); see GENERATORS
    repeats = 3                # timing repeats; the median is reported (DESIGN.md "Measuring")
    images = 8                 # images per configuration, generated in batches of `batch`
    classes = []               # class names (zoo) or ids; [] = the first `n_classes`
    n_classes = 4
    fd_real = 256              # held-out real images for the feature-space Frechet distance
    save_images = 4            # first images of each configuration saved as a PNG strip
    scorers = []               # "module:callable" user metrics (see Scorer)

    [sweep]
    temperature = [1.0]
    top_k = [0]
    top_p = [1.0]
    cfg = [3.0]
    batch = [4]
    seed = [0]

    [[method]]
    label = "exact + model"
    drafter = "model"
    drafter_params = { k = [2, 4] }
    rule = "exact"

Every (generator, sampling, batch, seed) group gets a plain-AR baseline row automatically. Each configuration has a
stable key (sha1 of the canonical JSON of what is generated: generator, drafter, rule, params, sampling, batch,
images, seed, classes; not the label, not the number of repeats), so a rerun skips finished rows.

Multi-process: under `torchrun --nproc_per_node N` or `accelerate launch --multi_gpu --num_processes N` (on CPU too:
accelerate's PartialState then uses gloo) the pending configurations are split with
`PartialState.split_between_processes`; each process writes `<results>.part<rank>.jsonl` and the main process merges
the parts into the results file after `wait_for_everyone`. Every process times its own baselines in memory, so
speedups always compare runs made in the same process. Note: `accelerate launch --cpu --num_processes N` (accelerate
1.15) starts ONE process unless an MPI hostfile is given (it uses its simple launcher); it works, but serially.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib
import itertools
import json
import math
import os
import sys
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol, runtime_checkable

import torch
from torch import Tensor

from specdec import metrics
from specdec.cli import Method, run_method
from specdec.sampling import Sampling

# ------------------------------------------------------------------------------------------------------------------
# generators: name -> () -> bundle (.target, .drafter_model, .features, .classes, .target_gpt, .class_id,
# .heldout_images)


class FakeFeatureNet(torch.nn.Module):
    """A fixed random projection of 4x4-pooled pixels: .features(images [N, 3, H, W]) -> [N, dim]."""

    def __init__(self, dim: int = 16, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.proj = torch.nn.Parameter(torch.randn(48, dim, generator=g) / math.sqrt(48), requires_grad=False)

    def features(self, images: Tensor) -> Tensor:
        pooled = torch.nn.functional.adaptive_avg_pool2d(images.float(), 4).flatten(1)        # [N, 48]
        return torch.tanh(pooled @ self.proj)


@dataclass
class TinyBundle:
    """A stand-in for the zoo bundle, built from tiny random models (tests, CI, smoke runs)."""

    target: Any
    drafter_model: Any
    tokenizer: Any
    features: Any
    classes: list
    target_gpt: Any
    pixels: int = 8

    def class_id(self, name) -> int:
        if isinstance(name, int) or (isinstance(name, str) and name.isdigit()):
            i = int(name)
            if 0 <= i < len(self.classes):
                return i
        if name in self.classes:
            return self.classes.index(name)
        raise ValueError(f"unknown class {name!r}; valid classes: {', '.join(self.classes)}")

    def heldout_images(self, n: int, seed: int = 0, classes: Tensor | None = None) -> Tensor:
        """Random stand-ins for real crops (classes accepted and ignored: a random bundle has no photos)."""
        g = torch.Generator().manual_seed(10_000 + seed)
        return (torch.rand(n, 3, self.pixels, self.pixels, generator=g) * 2 - 1)


def tiny_random_bundle(vocab: int = 64, grid=(4, 4), classes: int = 3, seed: int = 0) -> TinyBundle:
    """Random target (2 layers, width 64) and a noisy copy as drafter; decode = a fixed linear map to 8x8 pixels."""
    from specdec.adapters import GPTAdapter
    from specdec.models.gpt import GPT, GPTConfig

    g = torch.Generator().manual_seed(seed)
    T = grid[0] * grid[1]
    cfg = GPTConfig(vocab_size=vocab, num_classes=classes, dim=64, n_layers=2, n_heads=4, max_len=T + 40)
    torch.manual_seed(seed)
    target_model = GPT(cfg)
    draft_model = GPT(cfg)
    draft_model.load_state_dict(target_model.state_dict())
    with torch.no_grad():
        target_model.head.weight.mul_(3.0)       # random heads give near-uniform p otherwise
        for p in draft_model.parameters():
            p.add_(0.3 * p.std() * torch.randn(p.shape, generator=g))
        draft_model.head.weight.mul_(3.0)
    code = torch.randn(vocab, 3, generator=g)                       # token -> colour
    codebook = torch.randn(vocab, 8, generator=g)
    pixels = 8

    def decode(tokens: Tensor) -> Tensor:
        img = code[tokens.cpu()].reshape(tokens.shape[0], grid[0], grid[1], 3).permute(0, 3, 1, 2)
        img = torch.nn.functional.interpolate(img, size=(pixels, pixels), mode="bilinear", align_corners=False)
        return torch.tanh(img)

    target = GPTAdapter(target_model, grid=tuple(grid), codebook=codebook, decode=decode)
    drafter = GPTAdapter(draft_model, grid=tuple(grid), codebook=codebook, decode=decode)
    return TinyBundle(target, drafter, None, FakeFeatureNet(), [f"c{i}" for i in range(classes)], target_model,
                      pixels)


def _zoo_bundle():
    import specdec

    return specdec.zoo.load()


GENERATORS: dict[str, Callable[[], Any]] = {"zoo": _zoo_bundle, "tiny-random": tiny_random_bundle}
_BUNDLES: dict[str, Any] = {}


def load_generator(name: str):
    if name not in GENERATORS:
        raise BenchConfigError(f"unknown generator {name!r}; valid generators: {', '.join(sorted(GENERATORS))}")
    if name not in _BUNDLES:
        try:
            _BUNDLES[name] = GENERATORS[name]()
        except Exception as e:   # e.g. the zoo's weights are not trained/installed yet
            raise BenchConfigError(f"generator {name!r} could not be loaded: {e}") from e
    return _BUNDLES[name]


# ------------------------------------------------------------------------------------------------------------------
# user metrics


@runtime_checkable
class Scorer(Protocol):
    """A user metric: `name`, and `__call__(images [N, 3, H, W] in [-1, 1], cond) -> float`.

    Config: `scorers = ["my_pkg.metrics:clip_score"]`; the object is called as is, or instantiated first when it
    is a class. Wrap torchmetrics' FrechetInceptionDistance (with local weights) or a CLIP score this way.
    """

    name: str

    def __call__(self, images: Tensor, cond) -> float: ...


class MeanBrightness:
    """A trivial example scorer (`specdec.bench:MeanBrightness`): mean pixel value in [-1, 1]."""

    name = "mean_brightness"

    def __call__(self, images: Tensor, cond) -> float:
        return float(images.float().mean())


def load_scorer(spec: str) -> Scorer:
    if ":" not in spec:
        raise BenchConfigError(f"scorer {spec!r} must be 'module:callable'")
    module, attr = spec.split(":", 1)
    try:
        obj = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise BenchConfigError(f"cannot import scorer {spec!r}: {e}") from e
    if isinstance(obj, type):
        obj = obj()
    if not callable(obj):
        raise BenchConfigError(f"scorer {spec!r} is not callable")
    if not getattr(obj, "name", None):
        try:
            obj.name = attr
        except AttributeError:
            pass
    return obj


# ------------------------------------------------------------------------------------------------------------------
# config


class BenchConfigError(ValueError):
    """A bad bench config: what is wrong and the valid choices."""


TOP_KEYS = {"name", "description", "generator", "repeats", "images", "classes", "n_classes", "fd_real",
            "save_images", "scorers", "warmup", "sweep", "method"}
SWEEP_KEYS = {"generator", "temperature", "top_k", "top_p", "cfg", "batch", "seed"}
METHOD_KEYS = {"label", "drafter", "drafter_params", "rule", "rule_params"}
SWEEP_DEFAULTS = {"temperature": [1.0], "top_k": [0], "top_p": [1.0], "cfg": [3.0], "batch": [4], "seed": [0]}


@dataclass(frozen=True)
class BenchConfig:
    name: str
    runs: tuple                      # expanded configurations (dicts), baselines included
    repeats: int = 3
    fd_real: int = 256
    save_images: int = 4
    warmup: int = 1
    scorers: tuple = ()


def _preset_dir():
    from importlib.resources import files

    return files("specdec.presets")


def preset_names() -> list[str]:
    return sorted(p.name[:-5] for p in _preset_dir().iterdir() if p.name.endswith(".toml"))


def read_config(path: str | None = None, preset: str | None = None) -> dict:
    if (path is None) == (preset is None):
        raise BenchConfigError("give a config file or --preset NAME (one of them); presets: "
                               + ", ".join(preset_names()))
    if preset is not None:
        if preset not in preset_names():
            raise BenchConfigError(f"unknown preset {preset!r}; valid presets: {', '.join(preset_names())}")
        text, name = (_preset_dir() / f"{preset}.toml").read_text(), preset
    else:
        p = Path(path)
        if not p.is_file():
            raise BenchConfigError(f"config file {str(p)!r} not found; pass a TOML file or --preset NAME "
                                   f"(presets: {', '.join(preset_names())})")
        text, name = p.read_text(), p.stem
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise BenchConfigError(f"config {name!r} is not valid TOML: {e}") from e
    raw.setdefault("name", name)
    return raw


def _as_list(v) -> list:
    return list(v) if isinstance(v, (list, tuple)) else [v]


def _cross(params: dict) -> list[dict]:
    keys = sorted(params)
    return [dict(zip(keys, vals)) for vals in itertools.product(*[_as_list(params[k]) for k in keys])]


def _check_int(v, what: str, lo: int):
    if not isinstance(v, int) or isinstance(v, bool) or v < lo:
        raise BenchConfigError(f"{what} must be an integer >= {lo}, got {v!r}")


def _validate_method(label: str, drafter: str | None, dp: dict, rule: str, rp: dict) -> None:
    """Names through the registry (lists the valid names), parameters by building the rule/drafter on stand-ins."""
    from specdec.registry import DRAFTERS, GEOMETRY_RULES, RULES, resolve

    for kind, name, table in (("rule", rule, RULES), ("drafter", drafter, DRAFTERS)):
        if name is None:
            continue
        try:
            resolve(kind, name)
        except ValueError as e:
            raise BenchConfigError(f"method {label!r}: {e}") from e
        except ImportError as e:
            raise BenchConfigError(f"method {label!r}: {kind} {name!r} is registered but not importable ({e}); "
                                   f"valid {kind}s: {', '.join(sorted(table))}") from e
    for key in ("k", "window"):
        if key in dp:
            _check_int(dp[key], f"method {label!r}: drafter param {key}", 2 if key == "window" else 1)
    if "k" in rp:
        _check_int(rp["k"], f"method {label!r}: rule param k (neighbours)", 1)
    try:
        cls = resolve("rule", rule)
        if rule in GEOMETRY_RULES:
            import warnings

            from specdec.geometry import TokenGeometry

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                cls(TokenGeometry.from_vectors(torch.randn(8, 2, generator=torch.Generator().manual_seed(0))),
                    **rp)
        else:
            cls(**rp)
        if drafter is not None and drafter != "model":
            resolve("drafter", drafter)(**dp)
        elif drafter == "model":
            resolve("drafter", drafter)(None, **dp)
    except (TypeError, ValueError) as e:
        raise BenchConfigError(f"method {label!r}: bad parameters ({e})") from e


def _label(base: str, dp: dict, rp: dict, crossed: set) -> str:
    if "{" in base:
        return base.format(**{**rp, **dp}, d=dp, r=rp)
    parts = [f"{k}={v}" for k, v in sorted(dp.items()) if ("d", k) in crossed]
    parts += [(f"{k}={v}" if k not in dp else f"rule.{k}={v}") for k, v in sorted(rp.items()) if ("r", k) in crossed]
    return f"{base} {' '.join(parts)}" if parts else base


def family(run: dict) -> str:
    """Method family for plots: 'rule + drafter' ('AR' for the baseline)."""
    if run["drafter"] is None:
        return "AR"
    return f"{run['rule']} + {run['drafter']}"


def config_key(run: dict) -> str:
    ident = {k: run[k] for k in ("generator", "drafter", "drafter_params", "rule", "rule_params", "sampling",
                                 "batch", "images", "seed", "classes")}
    return hashlib.sha1(json.dumps(ident, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


def parse_config(raw: dict) -> BenchConfig:
    """Validate a raw config dict and expand it into runs. Raises BenchConfigError with the valid choices."""
    unknown = set(raw) - TOP_KEYS
    if unknown:
        raise BenchConfigError(f"unknown config keys {sorted(unknown)}; valid keys: {', '.join(sorted(TOP_KEYS))}")
    sweep = dict(raw.get("sweep", {}))
    bad = set(sweep) - SWEEP_KEYS
    if bad:
        raise BenchConfigError(f"unknown [sweep] keys {sorted(bad)}; valid keys: {', '.join(sorted(SWEEP_KEYS))}")
    sweep.setdefault("generator", raw.get("generator", "zoo"))
    for k, v in SWEEP_DEFAULTS.items():
        sweep.setdefault(k, v)
    sweep = {k: _as_list(v) for k, v in sweep.items()}
    for g in sweep["generator"]:
        if g not in GENERATORS:
            raise BenchConfigError(f"unknown generator {g!r}; valid generators: {', '.join(sorted(GENERATORS))}")
    for b in sweep["batch"]:
        _check_int(b, "batch", 1)
    for s in sweep["seed"]:
        _check_int(s, "seed", 0)
    repeats = raw.get("repeats", 3)
    _check_int(repeats, "repeats", 1)
    images = raw.get("images", 0)
    _check_int(images, "images (0 = one batch)", 0)
    for key, lo in (("fd_real", 2), ("save_images", 0), ("warmup", 0), ("n_classes", 1)):
        if key in raw:
            _check_int(raw[key], key, lo)
    classes = list(raw.get("classes", []))
    n_classes = raw.get("n_classes", 4)
    scorers = tuple(_as_list(raw.get("scorers", [])))
    for s in scorers:
        load_scorer(s)

    samplings = []
    for t, tk, tp, c in itertools.product(sweep["temperature"], sweep["top_k"], sweep["top_p"], sweep["cfg"]):
        try:
            s = Sampling(temperature=float(t), top_k=int(tk), top_p=float(tp), cfg_scale=float(c))
        except ValueError as e:
            raise BenchConfigError(f"[sweep]: {e}") from e
        samplings.append(s)

    methods = raw.get("method", [])
    if not isinstance(methods, list) or not methods:
        raise BenchConfigError("the config has no [[method]] entries; add at least one (label, drafter, rule)")
    expanded: list[tuple[str, str | None, dict, str, dict]] = []
    for i, m in enumerate(methods):
        bad = set(m) - METHOD_KEYS
        if bad:
            raise BenchConfigError(f"[[method]] #{i + 1}: unknown keys {sorted(bad)}; valid keys: "
                                   f"{', '.join(sorted(METHOD_KEYS))}")
        drafter = m.get("drafter") or None
        rule = m.get("rule", "exact")
        base = m.get("label") or (f"{rule} + {drafter}" if drafter else "AR")
        dps, rps = m.get("drafter_params", {}), m.get("rule_params", {})
        crossed = {("d", k) for k, v in dps.items() if isinstance(v, list) and len(v) > 1}
        crossed |= {("r", k) for k, v in rps.items() if isinstance(v, list) and len(v) > 1}
        for dp in _cross(dps):
            for rp in _cross(rps):
                label = _label(base, dp, rp, crossed)
                _validate_method(label, drafter, dp, rule, rp)
                expanded.append((label, drafter, dp, rule, rp))
    if not any(d is None and r == "exact" for _, d, _, r, _ in expanded):
        expanded.insert(0, ("AR", None, {}, "exact", {}))

    runs, seen = [], set()
    for gen, samp, batch, seed in itertools.product(sweep["generator"], samplings, sweep["batch"], sweep["seed"]):
        for label, drafter, dp, rule, rp in expanded:
            run = {"label": label, "generator": gen, "drafter": drafter, "drafter_params": dp, "rule": rule,
                   "rule_params": rp, "sampling": {"temperature": samp.temperature, "top_k": samp.top_k,
                                                   "top_p": samp.top_p, "cfg_scale": samp.cfg_scale},
                   "batch": batch, "images": images or batch, "seed": seed, "classes": classes,
                   "n_classes": n_classes}
            run["key"] = config_key(run)
            if run["key"] not in seen:
                seen.add(run["key"])
                runs.append(run)
    return BenchConfig(name=raw.get("name", "bench"), runs=tuple(runs), repeats=repeats,
                       fd_real=raw.get("fd_real", 256), save_images=raw.get("save_images", 4),
                       warmup=raw.get("warmup", 1), scorers=scorers)


def load_config(path: str | None = None, preset: str | None = None) -> BenchConfig:
    return parse_config(read_config(path, preset))


# ------------------------------------------------------------------------------------------------------------------
# metrics (specdec.metrics; each row names what it used)


def feature_vectors(bundle, images: Tensor) -> Tensor:
    return metrics.extract_features(images, bundle.features)


def frechet_distance(a: Tensor, b: Tensor) -> float:
    return float(metrics.frechet_distance(a, b))


def token_nll(bundle, tokens: Tensor, cond: Tensor) -> float:
    """Mean per-token NLL (nats) of the samples under the target's conditional model (no CFG, temperature 1)."""
    return float(metrics.token_nll(bundle.target_gpt, tokens, cond).mean())


def token_histogram_tvd(a: Tensor, b: Tensor, vocab_size: int) -> float:
    return float(metrics.token_histogram_tvd(a, b, vocab_size))


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


# ------------------------------------------------------------------------------------------------------------------
# running


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

    def split(self, items: list) -> list:
        if self.state is None:
            return items
        with self.state.split_between_processes(items) as part:
            return list(part)


def _dist() -> _Dist:
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return _Dist()
    from accelerate import PartialState

    # on a CPU-only machine PartialState only goes multi-process (gloo) when told cpu=True
    state = PartialState(cpu=not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_CPU", "").lower()
                         in ("1", "true", "yes"))
    return _Dist(state, state.num_processes, state.process_index)


def read_rows(path: Path) -> list[dict]:
    """Rows of a JSONL file; a torn last line (a kill mid-write) is ignored."""
    rows = []
    if Path(path).is_file():
        for line in Path(path).read_text().splitlines():
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def _part_files(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f"{out.stem}.part*.jsonl"))


def _append(path: Path, row: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _repair_tail(path: Path) -> None:
    """Drop a torn last line so appends start on a fresh line."""
    if path.is_file() and path.stat().st_size:
        text = path.read_text()
        if not text.endswith("\n"):
            path.write_text(text[: text.rfind("\n") + 1])


def merge_parts(out: Path) -> int:
    """Append rows of the part files whose keys are not in `out` yet; delete the parts. Returns rows added."""
    _repair_tail(out)
    done = {r.get("key") for r in read_rows(out)}
    added = 0
    for part in _part_files(out):
        for row in read_rows(part):
            if row.get("key") not in done:
                _append(out, row)
                done.add(row.get("key"))
                added += 1
        part.unlink()
    return added


class Abort(Exception):
    """Raised by `max_rows` to stop a sweep half-way (tests; a kill does the same)."""


@dataclass
class _Ctx:
    bundle: Any
    real_feats: dict = field(default_factory=dict)      # class-id tuple -> held-out features
    warmed: set = field(default_factory=set)
    baselines: dict = field(default_factory=dict)


def _cond_for(bundle, run: dict, n: int) -> Tensor:
    names = run["classes"] or list(bundle.classes[: run["n_classes"]])
    try:
        ids = [bundle.class_id(c) if not isinstance(c, int) else int(c) for c in names]
    except ValueError as e:
        raise BenchConfigError(str(e)) from e
    return torch.tensor([ids[i % len(ids)] for i in range(n)])


def _batches(run: dict, bundle):
    """[(cond [b], seed)]: `images` images in batches of `batch`; batch i uses seed + 7919 * i."""
    cond = _cond_for(bundle, run, run["images"])
    return [(cond[i: i + run["batch"]], run["seed"] + 7919 * (i // run["batch"]))
            for i in range(0, run["images"], run["batch"])]


def _method(run: dict) -> Method:
    return Method(run["label"], run["drafter"], dict(run["drafter_params"]), run["rule"], dict(run["rule_params"]))


def _measure(ctx: _Ctx, run: dict, repeats: int, warmup: int):
    """Median wall (summed over batches), tokens, images, stats of every batch."""
    import specdec
    from specdec.cli import build

    bundle = ctx.bundle
    sampling = Sampling(**run["sampling"])
    method = _method(run)
    batches = _batches(run, bundle)
    for _ in range(warmup):        # untimed: first calls at a new shape are several times slower
        drafter, rule = build(method, bundle)
        specdec.generate(bundle.target, batches[0][0], drafter=drafter, rule=rule, sampling=sampling,
                         seed=run["seed"], decode=False)
    wall, tokens, images, stats = 0.0, [], [], []
    for cond, seed in batches:
        w, res = run_method(bundle, method, cond, sampling, seed, repeats)
        wall += w
        tokens.append(res.tokens)
        images.append(res.images)
        stats.append(res.stats)
    imgs = torch.cat(images) if all(i is not None for i in images) else None
    return wall, torch.cat(tokens), imgs, stats, torch.cat([b[0] for b in batches])


def _group(run: dict) -> str:
    return json.dumps([run["generator"], run["sampling"], run["batch"], run["images"], run["seed"], run["classes"],
                       run["n_classes"]], sort_keys=True)


def _baseline_run(run: dict) -> dict:
    b = {**run, "label": "AR", "drafter": None, "drafter_params": {}, "rule": "exact", "rule_params": {}}
    b["key"] = config_key(b)
    return b


def _save_strip(images: Tensor, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from specdec.plots import to_uint8

    pix = to_uint8(images)                                  # [N, H, W, 3]
    strip = torch.cat(list(pix), dim=1).numpy()             # one row: [H, N * W, 3]
    path.parent.mkdir(parents=True, exist_ok=True)
    plt.imsave(path, strip)


def measure_row(ctx: _Ctx, run: dict, cfg: BenchConfig, scorers: list, image_dir: Path, rel_to: Path,
                dist: _Dist) -> dict:
    from specdec.cli import build

    bundle = ctx.bundle
    g = _group(run)
    if g not in ctx.baselines:
        base = _baseline_run(run)
        ctx.baselines[g] = (base, *_measure(ctx, base, cfg.repeats, cfg.warmup))
    _, b_wall, b_tokens, _, b_stats, _ = ctx.baselines[g]
    is_base = run["drafter"] is None and run["rule"] == "exact"
    if is_base:
        wall, tokens, images, stats, cond = ctx.baselines[g][1:]
    else:
        wall, tokens, images, stats, cond = _measure(ctx, run, cfg.repeats, cfg.warmup)

    n = tokens.shape[0]
    tf = sum(s.target_forwards for s in stats)
    committed = sum(s.committed for s in stats)
    drafted = sum(s.drafted for s in stats)
    accepted = sum(s.accepted for s in stats)
    k = max((len(s.accepted_per_position) for s in stats if s.accepted_per_position is not None), default=0)
    acc_pos = torch.zeros(k)
    dr_pos = torch.zeros(k)
    for s in stats:
        if s.accepted_per_position is not None and len(s.accepted_per_position):
            acc_pos[: len(s.accepted_per_position)] += s.accepted_per_position.float()
            dr_pos[: len(s.drafted_per_position)] += s.drafted_per_position.float()
    acc_map = torch.cat([s.acceptance_map for s in stats]).float().mean(0)
    b_tf = sum(s.target_forwards for s in b_stats)
    draft_s = sum(s.draft_s for s in stats)
    wall_s_gen = sum(s.wall_s for s in stats)

    fd = None
    if images is not None:
        # real crops of the same classes in the same proportions as the generated images
        ids = tuple(sorted(set(cond.tolist())))
        if ids not in ctx.real_feats:
            real_cond = torch.tensor(ids)[torch.arange(cfg.fd_real) % len(ids)]
            ctx.real_feats[ids] = feature_vectors(bundle, bundle.heldout_images(cfg.fd_real, seed=0,
                                                                                classes=real_cond))
        fd = frechet_distance(feature_vectors(bundle, images), ctx.real_feats[ids])
    nll = token_nll(bundle, tokens, cond)
    tvd = token_histogram_tvd(tokens, b_tokens, bundle.target.vocab_size)
    sampling = Sampling(**run["sampling"])
    drafter, rule = build(_method(run), bundle)
    one_hot = sampling.greedy or (drafter is not None and drafter.one_hot_drafts)
    scores = {}
    for s in scorers:
        scores[s.name] = float(s(images, cond)) if images is not None else None

    image_path = None
    if images is not None and cfg.save_images:
        p = image_dir / f"{run['key']}.png"
        _save_strip(images[: cfg.save_images], p)
        image_path = os.path.relpath(p, rel_to)
    dev = getattr(bundle.target, "device", torch.device("cpu"))
    model = getattr(bundle.target, "model", None)
    dtype = next(model.parameters()).dtype if hasattr(model, "parameters") else torch.get_default_dtype()
    r4 = lambda x: None if x is None else round(float(x), 6)   # noqa: E731
    return {
        "key": run["key"], "config": {k_: v for k_, v in run.items() if k_ != "key"},
        "label": run["label"], "family": family(run), "is_baseline": is_base,
        "generator": run["generator"], "drafter": run["drafter"], "drafter_params": run["drafter_params"],
        "rule": run["rule"], "rule_params": run["rule_params"],
        "k": int(getattr(drafter, "k", 0)) if drafter is not None else 0,     # draft tokens per step
        "sampling": run["sampling"], "batch": run["batch"], "images": n, "seed": run["seed"],
        "repeats": cfg.repeats, "device": str(dev), "dtype": str(dtype).replace("torch.", ""),
        "threads": torch.get_num_threads(), "num_processes": dist.num_processes,
        "process_index": dist.process_index,
        "mean_accepted_length": r4(committed / tf if tf else 0.0),
        "acceptance_rate": r4(accepted / drafted if drafted else 0.0),
        "acceptance_per_position": [round(float(x), 4) for x in (acc_pos / dr_pos.clamp_min(1))],
        "target_forwards_per_image": r4(tf / n), "step_compression": r4(b_tf / tf if tf else None),
        "wall_s": r4(wall), "wall_per_image_s": r4(wall / n), "baseline_wall_per_image_s": r4(b_wall / n),
        "speedup": r4(b_wall / wall if wall else None),
        "draft_share": r4(draft_s / wall_s_gen if wall_s_gen else 0.0),
        "feature_fd": r4(fd), "nll": r4(nll), "tvd_vs_baseline": r4(tvd),
        "distortion_bound": distortion_bound(rule, one_hot), "lossless": bool(getattr(rule, "lossless", False)),
        "scores": scores, "metric": metric_names(scorers),
        "grid": list(bundle.target.grid), "acceptance_map": [round(float(x), 3) for x in acc_map],
        "image_path": image_path, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def run_bench(cfg: BenchConfig, out: str | Path, max_rows: int | None = None,
              on_row: Callable[[dict], None] | None = None, progress: bool = True) -> list[dict]:
    """Run every pending configuration of cfg, appending one JSON line per finished one to `out`.

    max_rows: stop (raise Abort) after this many new rows in this process. on_row(row) is called after each row is
    written (raise in it to interrupt). Returns the rows this process wrote.
    """
    torch.set_grad_enabled(False)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    dist = _dist()
    if dist.is_main:
        _repair_tail(out)
    dist.wait()
    done = {r.get("key") for r in read_rows(out)}
    for part in _part_files(out):
        done |= {r.get("key") for r in read_rows(part)}
    # baselines first, so that a rerun of a half-finished sweep always has them early
    todo = sorted([r for r in cfg.runs if r["key"] not in done], key=lambda r: r["drafter"] is not None)
    mine = dist.split(todo)
    target = out if dist.num_processes == 1 else out.parent / f"{out.stem}.part{dist.process_index}.jsonl"
    if target != out:
        _repair_tail(target)
    image_dir = out.parent / f"{out.stem}_images"
    scorers = [load_scorer(s) for s in cfg.scorers]

    from tqdm.auto import tqdm

    bar = tqdm(total=len(cfg.runs), initial=len(cfg.runs) - len(todo), desc=f"configs[{dist.process_index}]",
               position=dist.process_index, disable=not progress, unit="cfg")
    ctxs: dict[str, _Ctx] = {}
    written = []
    try:
        for run in mine:
            if run["generator"] not in ctxs:
                ctxs[run["generator"]] = _Ctx(load_generator(run["generator"]))
            row = measure_row(ctxs[run["generator"]], run, cfg, scorers, image_dir, out.parent, dist)
            _append(target, row)
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
    elif dist.num_processes == 1 and _part_files(out):
        merge_parts(out)                     # leftovers of an interrupted multi-process run
    dist.wait()
    return written


def summary_rows(rows: list[dict]) -> list[dict]:
    """Rows in the shape `specdec.cli.format_table` prints."""
    out = []
    for r in rows:
        out.append({"method": r["label"][:36], "rule": r["rule"], "k": int(r.get("k") or 0),
                    "mean_accepted_length": r["mean_accepted_length"] or 0.0,
                    "target_forwards_per_image": r["target_forwards_per_image"] or 0.0,
                    "speedup": r["speedup"] or 0.0,
                    "feature_fd": r["feature_fd"] if r["feature_fd"] is not None else float("nan"),
                    "nll": r["nll"] if r["nll"] is not None else float("nan")})
    return out


# ------------------------------------------------------------------------------------------------------------------
# command line


def bench_cmd(args) -> int:
    from specdec.cli import format_table

    try:
        cfg = load_config(args.config, args.preset)
        if args.repeats:
            cfg = BenchConfig(**{**cfg.__dict__, "repeats": args.repeats})
    except BenchConfigError as e:
        raise SystemExit(f"specdec bench: {e}")
    out = Path(args.out) if args.out else Path("specdec-bench") / f"{cfg.name}.jsonl"
    if args.dry_run:
        for r in cfg.runs:
            print(r["key"], r["generator"], r["label"], json.dumps(r["sampling"]), f"batch={r['batch']}",
                  f"seed={r['seed']}")
        print(f"{len(cfg.runs)} configurations")
        return 0
    try:
        run_bench(cfg, out, max_rows=args.max_rows or None, progress=not args.no_progress)
    except Abort as e:
        print(f"specdec bench: {e}; rerun to continue", file=sys.stderr)
        return 0
    except BenchConfigError as e:
        raise SystemExit(f"specdec bench: {e}")
    if _dist().is_main:
        rows = [r for r in read_rows(out) if r.get("key") in {x["key"] for x in cfg.runs}]
        print(format_table(summary_rows(rows)))
        print(f"\n{len(rows)} rows in {out}")
    return 0


def report_cmd(args) -> int:
    from specdec.report import make_report

    try:
        files = make_report(args.results, args.out, heatmaps=args.heatmaps.split(",") if args.heatmaps else None)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"specdec report: {e}")
    for f in files:
        print(f"wrote {f}")
    return 0


def add_subcommands(subparsers) -> None:
    """Register `bench` and `report` on the argparse subparsers of `specdec.cli.main`."""
    b = subparsers.add_parser("bench", help="speedup-vs-quality sweep -> JSON lines (resumable, multi-process)")
    b.add_argument("config", nargs="?", default=None, help="TOML config (or use --preset)")
    b.add_argument("--preset", default=None, help="a built-in config: " + ", ".join(preset_names()))
    b.add_argument("--out", default="", help="results JSONL (default: specdec-bench/<config name>.jsonl)")
    b.add_argument("--repeats", type=int, default=0, help="override the config's timing repeats")
    b.add_argument("--max-rows", type=int, default=0, help="stop after this many new rows (resume later)")
    b.add_argument("--dry-run", action="store_true", help="list the configurations and exit")
    b.add_argument("--no-progress", action="store_true")
    b.set_defaults(func=bench_cmd)

    r = subparsers.add_parser("report", help="plots + Markdown table from bench JSON lines")
    r.add_argument("results", help="a results JSONL written by `specdec bench`")
    r.add_argument("--out", default="specdec-report", help="output folder")
    r.add_argument("--heatmaps", default="", help="comma-separated labels or keys for acceptance heatmaps "
                                                   "(default: the fastest configuration of each family)")
    r.set_defaults(func=report_cmd)


def main(argv=None) -> int:
    """`python -m specdec.bench bench|report ...` (the same as `specdec bench|report` once cli.main wires it)."""
    ap = argparse.ArgumentParser(prog="specdec")
    add_subcommands(ap.add_subparsers(dest="command", required=True))
    args = ap.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
