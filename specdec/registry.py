"""Names -> classes for the command line and experiments (the engine itself never names a concrete rule/drafter).

Entries are import strings, resolved on use, so a missing optional piece fails only when asked for, with the list
of valid names.
"""
from __future__ import annotations

import importlib

from specdec.geometry import TokenGeometry

RULES = {
    "exact": "verifiers.exact:ExactRule",
    "lantern": "verifiers.lantern:LanternRule",
    "bounded_lantern": "verifiers.bounded_lantern:BoundedLanternRule",
    "grouped": "verifiers.grouped:GroupedRule",
    "typical": "verifiers.typical:TypicalRule",
}

DRAFTERS = {
    "model": "drafters.model:ModelDrafter",
    "jacobi": "drafters.jacobi:JacobiDrafter",
    "lookup": "drafters.lookup:LookupDrafter",
}

# rules whose constructor takes a TokenGeometry first, and which table of the adapter it is built from
GEOMETRY_RULES = {"lantern": "codebook", "bounded_lantern": "codebook", "grouped": "token_embeddings"}


def resolve(kind: str, name: str):
    table = {"rule": RULES, "drafter": DRAFTERS}[kind]
    if name not in table:
        raise ValueError(f"unknown {kind} {name!r}; valid {kind}s: {', '.join(sorted(table))}")
    module, attr = table[name].split(":")
    return getattr(importlib.import_module(module), attr)


def make_rule(name: str, target=None, geometries: dict | None = None, **params):
    """Build a rule by name; geometry rules get their TokenGeometry from the target adapter.

    geometries: a dict the caller keeps across calls for ONE target (table name -> TokenGeometry), so that every
    rule over the same table shares one geometry and the k-NN tables it caches are computed once."""
    cls = resolve("rule", name)
    if name not in GEOMETRY_RULES:
        return cls(**params)
    source = GEOMETRY_RULES[name]
    geometry = None if geometries is None else geometries.get(source)
    if geometry is None:
        table = getattr(target, source, None) if target is not None else None
        if table is None:
            raise ValueError(f"rule {name!r} needs the target's {source}, which this adapter lacks")
        geometry = TokenGeometry.from_vectors(table)
        if geometries is not None:
            geometries[source] = geometry
    return cls(geometry, **params)


def make_drafter(name: str, draft_model=None, **params):
    cls = resolve("drafter", name)
    if name == "model":
        if draft_model is None:
            raise ValueError("drafter 'model' needs a draft model")
        return cls(draft_model, **params)
    return cls(**params)
