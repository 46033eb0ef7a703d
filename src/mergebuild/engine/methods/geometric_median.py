"""geometric_median: the point minimising the summed distance to the models (Weiszfeld)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field

from mergebuild.engine.methods._taskvec import Weight, dist64, model_weights, weights_error
from mergebuild.engine.methods.base import Method, Params

if TYPE_CHECKING:
    import torch


class GeometricMedianParams(Params):
    weights: list[Weight] | None = None
    eps: float = Field(1e-6, gt=0)  # distances below this count as eps (no division by 0)
    max_iter: int = Field(100, ge=0, le=10_000)
    tol: float = Field(1e-6, ge=0)  # stop when the objective moves by ≤ tol·objective


def weighted_mean(xs: list[torch.Tensor], coefs: list[float]) -> torch.Tensor:
    """Σ cᵢ·xᵢ / Σ cᵢ in float32: each xᵢ scaled by cᵢ/Σc (float64 ratio), summed in order."""
    import torch

    total = sum(coefs)
    out = torch.zeros(xs[0].numel(), dtype=torch.float32)
    for x, c in zip(xs, coefs, strict=True):
        if c != 0:
            out.add_(x.reshape(-1).to(torch.float32).mul(c / total))
    return out


class GeometricMedian(Method):
    name = "geometric_median"
    inputs_form = "variadic"
    variadic = True  # the same, for loaders that predate inputs_form
    min_models = 1
    elementwise = False
    Params = GeometricMedianParams
    formula = "argmin_y Σ wᵢ·‖mᵢ − y‖ (Weiszfeld, per tensor)"
    description = """A robust average: the geometric median of the models' tensors, which an
outlier model pulls far less than the mean.

Per tensor (whole, flattened), Weiszfeld's iteration as sd-mecha runs it: start at the
weighted mean; repeat up to max_iter times: dᵢ = ‖mᵢ − y‖, y ← Σ βᵢmᵢ / Σ βᵢ with
βᵢ = wᵢ / max(dᵢ, eps); stop when the objective Σ wᵢ·dᵢ / n changed by ≤ tol × its new value.
Distances are float64 sums in a fixed chunked order (independent of -j); y is float32.

Parameters: weights (≥ 0, default 1), eps (default 1e-6), max_iter (default 100),
tol (default 1e-6; sd-mecha's ftol default 1e-20 runs until max_iter). Whole-tensor."""
    example = """robust:
  method: geometric_median
  models: [anime, photo, painting, outlier]
  max_iter: 50"""

    @classmethod
    def check(cls, params: GeometricMedianParams, n_inputs: int) -> str | None:
        return weights_error(params.weights, n_inputs)

    @staticmethod
    def compute(params: GeometricMedianParams, xs: list[torch.Tensor]) -> torch.Tensor:
        weights = model_weights(params.weights, len(xs))
        y = weighted_mean(xs, weights)
        n = len(xs)

        def objective(d: list[float]) -> float:
            return sum(w * di for w, di in zip(weights, d, strict=True)) / n

        d = [dist64(x, y) for x in xs]
        obj = objective(d)
        for _ in range(params.max_iter):
            beta = [w / max(di, params.eps) for w, di in zip(weights, d, strict=True)]
            y = weighted_mean(xs, beta)
            d = [dist64(x, y) for x in xs]
            prev, obj = obj, objective(d)
            if abs(prev - obj) <= params.tol * obj:
                break
        return y.reshape(xs[0].shape)
