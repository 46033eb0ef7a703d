"""Merge methods, one module each, looked up by name.

Importing this package must stay light (no torch): the registry is consulted while validating
recipes and computing cache keys. Each method imports torch only inside `compute`.
"""

from __future__ import annotations

from mergebuild.engine.methods.add_cosine_a import AddCosineA
from mergebuild.engine.methods.add_cosine_b import AddCosineB
from mergebuild.engine.methods.add_difference import AddDifference
from mergebuild.engine.methods.add_perpendicular import AddPerpendicular
from mergebuild.engine.methods.bake_lora import BakeLora
from mergebuild.engine.methods.base import ComputeContext, Method
from mergebuild.engine.methods.copy import Copy
from mergebuild.engine.methods.dare import Dare
from mergebuild.engine.methods.dare_ties import DareTies
from mergebuild.engine.methods.della import Della
from mergebuild.engine.methods.extract import Extract
from mergebuild.engine.methods.extract_lora import ExtractLora
from mergebuild.engine.methods.fold import Fold
from mergebuild.engine.methods.geometric_median import GeometricMedian
from mergebuild.engine.methods.linear import Linear
from mergebuild.engine.methods.merge_loras import MergeLoras
from mergebuild.engine.methods.model_stock import ModelStock
from mergebuild.engine.methods.n_average import NAverage
from mergebuild.engine.methods.slerp import Slerp
from mergebuild.engine.methods.smooth_add import SmoothAdd
from mergebuild.engine.methods.sum_twice import SumTwice
from mergebuild.engine.methods.ties import Ties
from mergebuild.engine.methods.train_difference import TrainDifference
from mergebuild.engine.methods.triple_sum import TripleSum
from mergebuild.engine.methods.weighted_sum import WeightedSum

REGISTRY: dict[str, type[Method]] = {}


def register(*methods: type[Method]) -> None:
    """Add methods to the registry; a second method under a taken name is a bug."""
    for m in methods:
        if m.name in REGISTRY and REGISTRY[m.name] is not m:
            raise TypeError(f"two merge methods are named '{m.name}'")
        REGISTRY[m.name] = m


register(WeightedSum, AddDifference, Linear, Copy)  # the web UI's and the expression forms
register(TripleSum, SumTwice, TrainDifference, AddCosineA, AddCosineB, SmoothAdd, Extract)
register(Slerp)
register(Fold)  # what `fold: true` turns a linear subgraph into (recipe/fold.py)
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
register(*TASK_VECTOR_METHODS)
register(BakeLora, ExtractLora, MergeLoras)  # LoRA / LyCORIS files in recipes (mergebuild/lora/)


def get_method(name: str) -> type[Method]:
    return REGISTRY[name]


__all__ = ["REGISTRY", "ComputeContext", "Method", "get_method", "register"]
