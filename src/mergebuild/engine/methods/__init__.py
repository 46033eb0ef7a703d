"""Merge methods, one module each, looked up by name.

Importing this package must stay light (no torch): the registry is consulted while validating
recipes and computing cache keys. Each method imports torch only inside `compute`.
"""

from __future__ import annotations

from mergebuild.engine.methods.add_difference import AddDifference
from mergebuild.engine.methods.add_perpendicular import AddPerpendicular
from mergebuild.engine.methods.base import Method
from mergebuild.engine.methods.copy import Copy
from mergebuild.engine.methods.dare import Dare
from mergebuild.engine.methods.dare_ties import DareTies
from mergebuild.engine.methods.della import Della
from mergebuild.engine.methods.geometric_median import GeometricMedian
from mergebuild.engine.methods.linear import Linear
from mergebuild.engine.methods.model_stock import ModelStock
from mergebuild.engine.methods.n_average import NAverage
from mergebuild.engine.methods.ties import Ties
from mergebuild.engine.methods.weighted_sum import WeightedSum

# The task-vector family (δᵢ = modelᵢ − base): see _taskvec.py.
TASK_VECTOR_METHODS: tuple[type[Method], ...] = (
    Ties,
    Dare,
    DareTies,
    Della,
    AddPerpendicular,
    ModelStock,
    GeometricMedian,
    NAverage,
)
REGISTRY: dict[str, type[Method]] = {
    m.name: m for m in (WeightedSum, AddDifference, Linear, Copy, *TASK_VECTOR_METHODS)
}


def get_method(name: str) -> type[Method]:
    return REGISTRY[name]


__all__ = ["REGISTRY", "Method", "get_method"]
