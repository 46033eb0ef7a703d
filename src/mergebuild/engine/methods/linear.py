"""linear: `Σ weights[i] * inputs[i]`, summed left to right — any other + - * combination."""

from __future__ import annotations

from typing import TYPE_CHECKING

from mergebuild.engine.methods.base import Method, Params, f32

if TYPE_CHECKING:
    import torch


class LinearParams(Params):
    weights: list[float]


class Linear(Method):
    name = "linear"
    variadic = True
    Params = LinearParams
    summary = "sum of weights[i] * inputs[i]"
    formula = "Σ wᵢ·mᵢ (left to right)"
    description = """Any fixed linear combination of models, summed left to right in float32.

What an expression that is not a weighted sum or an add difference lowers to, e.g.
`a + (b - c) * 0.3 + (d - c) * 0.2`. `weights` gives one number per model (`models:` or
`inputs:`, same length); they need not sum to 1."""
    example = """combo:
  method: linear
  models: [anything, nai_full, sd15]
  weights: [1.0, 0.3, -0.3]"""

    @classmethod
    def check(cls, params: LinearParams, n_inputs: int) -> str | None:
        if len(params.weights) != n_inputs:
            return f"'weights' has {len(params.weights)} values for {n_inputs} inputs"
        return None

    @staticmethod
    def compute(params: LinearParams, xs: list[torch.Tensor]) -> torch.Tensor:
        out = f32(xs[0]).mul_(params.weights[0])
        for x, w in zip(xs[1:], params.weights[1:], strict=True):
            out.add_(f32(x).mul_(w))
        return out
