"""Decoding methods by name: a drafter and an acceptance rule from the registry, built once.

A `Method` names a drafter (None = plain AR) and a rule with their parameters; `build_method` turns it into
objects for a bundle. Both are reusable across `specdec.generate` calls: a drafter's `start` resets it and rules
are stateless, so a method is built once per configuration, outside the timed region, and every timing round
reuses it (`specdec.bench.timing`).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from specdec.registry import make_drafter, make_rule


@dataclass(frozen=True)
class Method:
    """One decoding configuration: a drafter (None = plain AR) and a rule, by registry name."""

    label: str
    drafter: str | None = None
    drafter_params: dict = field(default_factory=dict)
    rule: str = "exact"
    rule_params: dict = field(default_factory=dict)


# the zoo drafter is distilled on the target's guided samples: it drafts unguided (see drafters/model.py)
MODEL_DRAFTER = {"k": 4, "draft_cfg": 1.0}
# `specdec demo`: plain AR, the lossless rule with the EAGLE head and the draft model, SJD, LANTERN and its bounded
# variant, and a training-free lookup
DEMO_METHODS = (
    Method("AR"),
    # MC-SJD: Jacobi iterates maximally coupled, fresh slots copied from the token above; the best lossless method
    # on the zoo at batch 1 (docs/results/zoo-mcsjd-bf16.jsonl), so the quick demo shows it too
    Method("exact + mc-sjd w=16", "jacobi", {"window": 16, "init": "repeat_vertical", "coupling": "maximal"}),
    Method("exact + eagle k=4", "eagle", {"k": 4}),
    Method("exact + model k=4", "model", MODEL_DRAFTER),
    Method("exact + jacobi w=16", "jacobi", {"window": 16, "init": "random"}),
    Method("lantern d=0.1 + model k=4", "model", MODEL_DRAFTER, "lantern", {"neighbours": 100, "delta": 0.1}),
    Method("bounded_lantern d=0.1 + model k=4", "model", MODEL_DRAFTER, "bounded_lantern",
           {"neighbours": 100, "delta": 0.1}),
    Method("exact + lookup k=4", "lookup", {"k": 4}),
)
QUICK_METHODS = DEMO_METHODS[:3]


def build_method(method: Method, bundle, geometries: dict | None = None):
    """(drafter or None, rule) for a method on a bundle (`specdec.protocols.Bundle`).

    geometries: a dict kept by the caller across the methods of one bundle, so that rules over the same token table
    share one TokenGeometry and its k-NN tables (see `specdec.registry.make_rule`)."""
    drafter = None
    if method.drafter is not None:
        drafter = make_drafter(method.drafter, bundle, **method.drafter_params)
    return drafter, make_rule(method.rule, bundle.target, geometries, **method.rule_params)


def available(methods, bundle) -> list[Method]:
    """Keep the methods whose rule and drafter exist in this install (optional pieces may be absent)."""
    keep = []
    for m in methods:
        try:
            build_method(m, bundle)
            keep.append(m)
        except (ImportError, AttributeError):
            continue
    return keep
