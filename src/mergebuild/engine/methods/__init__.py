"""Merge methods, one module each, looked up by name.

Importing this package must stay light (no torch): the registry is consulted while validating
recipes and computing cache keys. Each method imports torch only inside `compute`.
"""

from __future__ import annotations

from mergebuild.engine.methods.add_difference import AddDifference
from mergebuild.engine.methods.base import Method
from mergebuild.engine.methods.copy import Copy
from mergebuild.engine.methods.linear import Linear
from mergebuild.engine.methods.weighted_sum import WeightedSum

REGISTRY: dict[str, type[Method]] = {m.name: m for m in (WeightedSum, AddDifference, Linear, Copy)}


def get_method(name: str) -> type[Method]:
    return REGISTRY[name]


__all__ = ["REGISTRY", "Method", "get_method"]
