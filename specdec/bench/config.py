"""Bench configs: the TOML schema, its validation, and its expansion into configurations ("runs").

A config (TOML, or a preset from `specdec/presets/`) has top-level settings, a `[sweep]` table whose lists are
crossed, and `[[method]]` entries (label, drafter + drafter_params, rule + rule_params; a list-valued param is
crossed too):

    generator = "zoo"          # default generator (a [sweep] list overrides); see specdec.bench.generators
    repeats = 3                # timing repeats; the median is reported (one run is too noisy on a shared CPU)
    images = 8                 # images per configuration, generated in batches of `batch`
    classes = []               # class names (zoo) or ids; [] = the first `n_classes`
    n_classes = 4
    fd_real = 256              # held-out real images for the feature-space Frechet distance
    save_images = 4            # first images of each configuration saved as a PNG strip
    scorers = []               # "module:callable" user metrics (see specdec.bench.generators.Scorer)
    warmup = 1                 # untimed generations per configuration before its timed repeats

    [sweep]
    temperature = [1.0]
    top_k = [0]
    top_p = [1.0]
    cfg = [3.0]
    batch = [4]
    seed = [0]
    dtype = ["float32"]        # what the generative models compute in: float32, bfloat16, float16
    compile = ["off"]          # the target's decode step: off, on (torch.compile), freeze (+ weights pre-packed),
                               # cuda-graphs (mode reduce-overhead), freeze+step (freeze, and the engine's chain
                               # step compiled too); a chain drafter compiles by its own `compile`
    device = ["cpu"]           # where the generators run: cpu, cuda, cuda:1, mps

    [[method]]
    label = "exact + model k={k}"     # a str.format template over the params ({d[k]}, {r[neighbours]}), or a
    drafter = "model"                 # base name that the crossed params are appended to
    drafter_params = { k = [2, 4] }
    rule = "exact"

Every (generator, sampling, batch, seed) group gets a plain-AR baseline run automatically. A run is a JSON-ready
dict (label, generator, drafter, drafter_params, rule, rule_params, sampling, batch, images, seed, classes,
n_classes, dtype, compile, device, key). Its key is the sha1 of the canonical JSON of what is generated (not the
label, not the number of repeats; the dtype, compile and device only when they are not the defaults, so rows measured
before those existed keep their keys), so a rerun skips finished rows.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import tomllib
import warnings
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

import torch

from specdec.bench.generators import BenchConfigError, check_generator, load_scorer
from specdec.bench.results import EXECUTION_DEFAULTS, EXECUTION_KEYS, execution
from specdec.compiled import DEFAULT_COMPILE, TARGET_COMPILE
from specdec.devices import DEFAULT_DEVICE, device_name
from specdec.geometry import TokenGeometry
from specdec.precision import DEFAULT_DTYPE, as_dtype, dtype_name
from specdec.registry import DRAFTERS, RULES, geometry_source, resolve
from specdec.sampling import Sampling

__all__ = ["BenchConfig", "BenchConfigError", "config_key", "family", "load_config", "parse_config", "preset_names",
           "read_config"]

TOP_KEYS = {"name", "description", "generator", "repeats", "images", "classes", "n_classes", "fd_real",
            "save_images", "scorers", "warmup", "sweep", "method"}
SWEEP_KEYS = {"generator", "temperature", "top_k", "top_p", "cfg", "batch", "seed", "dtype", "compile", "device"}
METHOD_KEYS = {"label", "drafter", "drafter_params", "rule", "rule_params"}
SWEEP_DEFAULTS = {"temperature": [1.0], "top_k": [0], "top_p": [1.0], "cfg": [3.0], "batch": [4], "seed": [0],
                  "dtype": [DEFAULT_DTYPE], "compile": [DEFAULT_COMPILE],
                  "device": [DEFAULT_DEVICE]}


@dataclass(frozen=True)
class BenchConfig:
    name: str
    runs: tuple                      # expanded configurations (dicts), baselines included
    repeats: int = 3
    fd_real: int = 256
    save_images: int = 4
    warmup: int = 1
    scorers: tuple = ()


# -- reading ----------------------------------------------------------------------------------------------------------
def _preset_dir():
    return files("specdec.presets")


def preset_names() -> list[str]:
    return sorted(p.name[:-5] for p in _preset_dir().iterdir() if p.name.endswith(".toml"))


def read_config(path: str | None = None, preset: str | None = None) -> dict:
    """The raw dict of a TOML file or a preset (exactly one of them); `name` defaults to the file's stem."""
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


def load_config(path: str | None = None, preset: str | None = None) -> BenchConfig:
    return parse_config(read_config(path, preset))


# -- validation -------------------------------------------------------------------------------------------------------
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
    for key in ("neighbours", "k"):             # `k` is the rules' deprecated spelling of `neighbours`
        if key in rp:
            _check_int(rp[key], f"method {label!r}: rule param {key}" + (" (neighbours)" if key == "k" else ""), 1)
    try:
        cls = resolve("rule", rule)
        if geometry_source(cls) is not None:
            # an 8-token stand-in geometry: counts above 7 are clamped with a warning that says nothing here
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                cls(TokenGeometry.from_vectors(torch.randn(8, 2, generator=torch.Generator().manual_seed(0))),
                    **rp)
        else:
            cls(**rp)
        if drafter is not None:
            d_cls = resolve("drafter", drafter)
            d_cls(*([None] if getattr(d_cls, "needs_draft_model", False) else []), **dp)
    except (TypeError, ValueError) as e:
        raise BenchConfigError(f"method {label!r}: bad parameters ({e})") from e


# -- expansion --------------------------------------------------------------------------------------------------------
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
    """16 hex digits identifying what a run generates."""
    ident = {k: run[k] for k in ("generator", "drafter", "drafter_params", "rule", "rule_params", "sampling",
                                 "batch", "images", "seed", "classes")}
    # `neighbours` was called `k` before: hashing the old spelling gives both spellings of a configuration one key
    # and keeps rows written before the rename resumable
    ident["rule_params"] = {("k" if n == "neighbours" else n): v for n, v in run["rule_params"].items()}
    for name, value, default in zip(EXECUTION_KEYS, execution(run), EXECUTION_DEFAULTS):
        if value != default:
            ident[name] = value
    return hashlib.sha1(json.dumps(ident, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


def _samplings(sweep: dict) -> list[Sampling]:
    out = []
    for t, tk, tp, c in itertools.product(sweep["temperature"], sweep["top_k"], sweep["top_p"], sweep["cfg"]):
        try:
            out.append(Sampling(temperature=t, top_k=tk, top_p=tp, cfg_scale=c))       # checked, not coerced
        except (TypeError, ValueError) as e:
            raise BenchConfigError(f"[sweep]: {e}") from e
    return out


def _methods(raw: dict) -> list[tuple[str, str | None, dict, str, dict]]:
    """[(label, drafter, drafter_params, rule, rule_params)] with list-valued params crossed, AR first if absent."""
    methods = raw.get("method", [])
    if not isinstance(methods, list) or not methods:
        raise BenchConfigError("the config has no [[method]] entries; add at least one (label, drafter, rule)")
    expanded = []
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
    return expanded


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
        check_generator(g)
    for b in sweep["batch"]:
        _check_int(b, "batch", 1)
    for s in sweep["seed"]:
        _check_int(s, "seed", 0)
    try:
        sweep["dtype"] = [dtype_name(as_dtype(d)) for d in sweep["dtype"]]
    except ValueError as e:
        raise BenchConfigError(f"[sweep] {e}") from e
    for c in sweep["compile"]:
        if c not in TARGET_COMPILE:
            raise BenchConfigError(f"[sweep] compile must be one of {', '.join(TARGET_COMPILE)}, got {c!r}")
    try:
        sweep["device"] = [device_name(d) for d in sweep["device"]]     # spelling only: availability at load time
    except ValueError as e:
        raise BenchConfigError(f"[sweep] {e}") from e
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
    samplings = _samplings(sweep)
    methods = _methods(raw)

    runs, seen = [], set()
    for gen, samp, batch, seed, dtype, compiled, device in itertools.product(
            sweep["generator"], samplings, sweep["batch"], sweep["seed"], sweep["dtype"], sweep["compile"],
            sweep["device"]):
        for label, drafter, dp, rule, rp in methods:
            run = {"label": label, "generator": gen, "drafter": drafter, "drafter_params": dp, "rule": rule,
                   "rule_params": rp, "sampling": {"temperature": float(samp.temperature), "top_k": samp.top_k,
                                                   "top_p": float(samp.top_p), "cfg_scale": float(samp.cfg_scale)},
                   "batch": batch, "images": images or batch, "seed": seed, "classes": classes,
                   "n_classes": n_classes, "dtype": dtype, "compile": compiled, "device": device}
            run["key"] = config_key(run)
            if run["key"] not in seen:
                seen.add(run["key"])
                runs.append(run)
    return BenchConfig(name=raw.get("name", "bench"), runs=tuple(runs), repeats=repeats,
                       fd_real=raw.get("fd_real", 256), save_images=raw.get("save_images", 4),
                       warmup=raw.get("warmup", 1), scorers=scorers)
