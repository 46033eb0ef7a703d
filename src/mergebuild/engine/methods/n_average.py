"""n_average: the weighted mean of any number of models, as a running mean (elementwise)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from mergebuild.engine.methods._taskvec import Weight, model_weights, weights_error
from mergebuild.engine.methods.base import Method, Params, f32

if TYPE_CHECKING:
    import torch


class NAverageParams(Params):
    weights: list[Weight] | None = None


class NAverage(Method):
    name = "n_average"
    inputs_form = "variadic"
    variadic = True  # the same, for loaders that predate inputs_form
    min_models = 1
    Params = NAverageParams
    formula = "Σ wᵢ·mᵢ / Σ wᵢ"
    description = """The (weighted) mean of any number of models: a model soup.

Computed as a running mean in float32 — out = m₁, then out += (mᵢ − out)·(wᵢ / (w₁+…+wᵢ)) —
so identical inputs give exactly that input, and a model of weight 0 changes nothing.
Models before the first non-zero weight are skipped. `weights` (≥ 0, at least one > 0, one
per model) default to 1. Elementwise (streams in tiles)."""
    example = """soup:
  method: n_average
  models: [anime, photo, painting]
  weights: [2, 1, 1]"""

    @classmethod
    def check(cls, params: NAverageParams, n_inputs: int) -> str | None:
        return weights_error(params.weights, n_inputs)

    @staticmethod
    def compute(params: NAverageParams, xs: list[torch.Tensor]) -> torch.Tensor:
        weights = model_weights(params.weights, len(xs))
        first = next(i for i, w in enumerate(weights) if w > 0)
        out = f32(xs[first])
        total = weights[first]
        for x, w in zip(xs[first + 1 :], weights[first + 1 :], strict=True):
            if w == 0:
                continue
            total += w
            d = f32(x).sub_(out)
            out.add_(d.mul_(w / total))
        return out
