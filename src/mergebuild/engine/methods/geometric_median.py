"""geometric_median: the point minimising the summed distance to the models (Weiszfeld)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field

from mergebuild.engine.methods._taskvec import (
    REDUCE_CHUNK,
    Weight,
    model_weights,
    weights_error,
)
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
    return mean_and_distances(xs, coefs, with_distances=False)[0]


def mean_and_distances(
    xs: list[torch.Tensor], coefs: list[float], with_distances: bool = True
) -> tuple[torch.Tensor, list[float]]:
    """y = weighted_mean(xs, coefs) and ‖xᵢ − y‖ for every i (as `dist64`), in one pass.

    Why one pass: each REDUCE_CHUNK block of y is finished, then at once (still in cache) used
    for the distances, whose float64 block sums are the ones `dist64` adds, in the same order;
    the conversions go into reused buffers. Same bits as the two separate passes, one read of
    the inputs per Weiszfeld step instead of two.
    """
    import math

    import numpy as np
    import torch

    total = sum(coefs)
    flat = [x.reshape(-1) for x in xs]
    numel = flat[0].numel()
    out = torch.empty(numel, dtype=torch.float32)
    size = min(numel, REDUCE_CHUNK)
    tmp = torch.empty(size, dtype=torch.float32)
    y64, x64 = torch.empty(size, dtype=torch.float64), torch.empty(size, dtype=torch.float64)
    sums = [0.0] * len(xs)
    for lo in range(0, numel, REDUCE_CHUNK):
        hi = min(numel, lo + REDUCE_CHUNK)
        m = hi - lo
        y = out[lo:hi].zero_()
        for x, c in zip(flat, coefs, strict=True):
            if c != 0:
                y.add_(tmp[:m].copy_(x[lo:hi]).mul_(c / total))
        if not with_distances:
            continue
        yn = y64[:m].copy_(y).numpy()
        for i, x in enumerate(flat):
            d = x64[:m].copy_(x[lo:hi]).numpy()
            np.subtract(d, yn, out=d)
            np.multiply(d, d, out=d)
            sums[i] += float(np.add.reduce(d))
    return out, [math.sqrt(t) for t in sums]


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
        y, d = mean_and_distances(xs, weights)
        n = len(xs)

        def objective(d: list[float]) -> float:
            return sum(w * di for w, di in zip(weights, d, strict=True)) / n

        obj = objective(d)
        for _ in range(params.max_iter):
            beta = [w / max(di, params.eps) for w, di in zip(weights, d, strict=True)]
            y, d = mean_and_distances(xs, beta)
            prev, obj = obj, objective(d)
            if abs(prev - obj) <= params.tol * obj:
                break
        return y.reshape(xs[0].shape)
