"""Names -> classes for the command line, bench configs and experiments (the engine never names a concrete rule or
drafter).

A name is a built-in name ("exact", "lantern", "model", ...), or the user's own class as `module:Class` (an
importable module) or `path/to/file.py:Class` (a file, loaded as is): a rule or drafter written in the user's own
file works in `specdec certify`, `specdec bench` configs and the demo without touching the package.

What a class needs to be built is declared on the class: a rule whose `geometry_source` is "codebook" or
"token_embeddings" gets a TokenGeometry over that table of the target first; a drafter whose `needs_draft_model`
is True gets the bundle's draft model first. Built-in entries are import strings resolved on use, so a missing
optional piece fails only when asked for, with the list of valid names.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from pathlib import Path

from specdec.geometry import TokenGeometry

RULES = {
    "exact": "verifiers.exact:ExactRule",
    "lantern": "verifiers.lantern:LanternRule",
    "bounded_lantern": "verifiers.bounded_lantern:BoundedLanternRule",
    "grouped": "verifiers.grouped:GroupedRule",
    "typical": "verifiers.typical:TypicalRule",
    "spectr": "verifiers.spectr:SpecTrRule",
}

# continuous-token rules (specdec.protocols.ContinuousRule), for specdec.continuous_loop
CONTINUOUS_RULES = {
    "cspd": "verifiers.cspd:CSpDRule",
    "gaussian_chain": "verifiers.gaussian_chain:GaussianChainRule",
}

DRAFTERS = {
    "model": "drafters.model:ModelDrafter",
    "model_tree": "drafters.model_tree:TreeModelDrafter",
    "model_tree_dynamic": "drafters.dynamic_tree:DynamicTreeDrafter",
    "eagle": "drafters.eagle:eagle",
    "jacobi": "drafters.jacobi:JacobiDrafter",
    "jacobi_tree": "drafters.jacobi_tree:JacobiTreeDrafter",
    "lookup": "drafters.lookup:LookupDrafter",
}

SOURCES = ("codebook", "token_embeddings")


def _load_file(path: Path):
    """Import a user's .py file once (keyed by its resolved path) and return the module."""
    name = "specdec_user_" + hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[name]
            raise
    return sys.modules[name]


def resolve(kind: str, name: str):
    """The class for a built-in name, `module:Class` or `file.py:Class`; ValueError saying what is wrong."""
    table = {"rule": RULES, "drafter": DRAFTERS, "continuous_rule": CONTINUOUS_RULES}[kind]
    if not isinstance(name, str) or not name:
        raise ValueError(f"a {kind} name must be a non-empty string, got {name!r}")
    spec = table.get(name, name)
    if ":" not in spec:
        raise ValueError(f"unknown {kind} {name!r}; valid {kind}s: {', '.join(sorted(table))}, or your own class "
                         f"as 'module:Class' or 'path/to/file.py:Class'")
    return load_object(kind, spec, name)


def load_object(kind: str, spec: str, name: str | None = None):
    """The object named by `module:attr` or `path/to/file.py:attr`; ValueError saying what is wrong."""
    name = spec if name is None else name
    where, _, attr = spec.rpartition(":")
    try:
        if where.endswith(".py") or "/" in where or "\\" in where:
            path = Path(where)
            if not path.is_file():
                raise ValueError(f"{kind} {name!r}: file {where!r} not found")
            module = _load_file(path)
        else:
            module = importlib.import_module(where)
    except ImportError as e:
        raise ValueError(f"{kind} {name!r}: cannot import {where!r} ({e}); check the module name and that it is "
                         f"on the Python path") from e
    cls = getattr(module, attr, None)
    if cls is None:
        raise ValueError(f"{kind} {name!r}: {where!r} has no attribute {attr!r}")
    if not callable(cls):
        raise ValueError(f"{kind} {name!r}: {attr!r} is not a class")
    return cls


def geometry_source(cls) -> str | None:
    """Which table of the target a rule class is built over ("codebook", "token_embeddings") or None."""
    source = getattr(cls, "geometry_source", None)
    if source is not None and source not in SOURCES:
        raise ValueError(f"{cls.__name__}.geometry_source must be one of {SOURCES} or None, got {source!r}")
    return source


def make_rule(name: str, target=None, geometries: dict | None = None, **params):
    """Build a rule by name; geometry rules get their TokenGeometry from the target adapter.

    geometries: a dict the caller keeps across calls for ONE target (table name -> TokenGeometry), so that every
    rule over the same table shares one geometry and the k-NN tables it caches are computed once."""
    cls = resolve("rule", name)
    source = geometry_source(cls)
    if source is None:
        return cls(**params)
    geometry = None if geometries is None else geometries.get(source)
    if geometry is None:
        table = getattr(target, source, None) if target is not None else None
        if table is None:
            raise ValueError(f"rule {name!r} needs the target's {source}, which this adapter lacks")
        geometry = TokenGeometry.from_vectors(table)
        if geometries is not None:
            geometries[source] = geometry
    return cls(geometry, **params)


def make_continuous_rule(name: str, **params):
    """Build a continuous-token rule by name ("cspd", "gaussian_chain"), `module:Class` or `file.py:Class`."""
    return resolve("continuous_rule", name)(**params)


def make_drafter(name: str, draft_model=None, **params):
    """Build a drafter by name; one that declares `needs_draft_model` gets the draft model first. draft_model: the
    model itself, or a bundle (`specdec.protocols.Bundle`) whose attribute named by the drafter's
    `draft_model_source` (default "drafter_model") is passed."""
    cls = resolve("drafter", name)
    if getattr(cls, "needs_draft_model", False):
        source = getattr(cls, "draft_model_source", "drafter_model")
        if draft_model is not None and hasattr(draft_model, "drafter_model"):       # a bundle
            bundle = draft_model
            draft_model = getattr(bundle, source, None)
            if draft_model is None:
                raise ValueError(f"drafter {name!r} needs the bundle's {source}, which {type(bundle).__name__} "
                                 f"does not have")
        if draft_model is None:
            raise ValueError(f"drafter {name!r} needs a draft model")
        return cls(draft_model, **params)
    return cls(**params)
