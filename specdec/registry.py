"""Names -> classes for the command line and experiments (the engine itself never names a concrete rule/drafter).

Entries are import strings, resolved on use, so a missing optional piece fails only when asked for, with the list
of valid names.
"""
from __future__ import annotations

import importlib

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


def make_rule(name: str, target=None, **params):
    """Build a rule by name; geometry rules get their TokenGeometry from the target adapter."""
    cls = resolve("rule", name)
    if name in GEOMETRY_RULES:
        from specdec.geometry import TokenGeometry

        table = getattr(target, GEOMETRY_RULES[name], None) if target is not None else None
        if table is None:
            raise ValueError(f"rule {name!r} needs the target's {GEOMETRY_RULES[name]}, which this adapter lacks")
        return cls(TokenGeometry.from_vectors(table), **params)
    return cls(**params)


def make_drafter(name: str, draft_model=None, **params):
    cls = resolve("drafter", name)
    if name == "model":
        if draft_model is None:
            raise ValueError("drafter 'model' needs a draft model")
        return cls(draft_model, **params)
    return cls(**params)
