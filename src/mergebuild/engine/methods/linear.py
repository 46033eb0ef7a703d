"""linear: `Σ weights[i] * inputs[i]`, summed left to right — any other + - * combination."""

from __future__ import annotations

from typing import TYPE_CHECKING

from mergebuild.engine.methods.base import Method, Params

if TYPE_CHECKING:
    import torch


class LinearParams(Params):
    weights: list[float]


class Linear(Method):
    name = "linear"
    variadic = True
    Params = LinearParams
    summary = "sum of weights[i] * inputs[i]"

    @classmethod
    def check(cls, params: LinearParams, n_inputs: int) -> str | None:
        if len(params.weights) != n_inputs:
            return f"'weights' has {len(params.weights)} values for {n_inputs} inputs"
        return None

    @staticmethod
    def compute(params: LinearParams, xs: list[torch.Tensor]) -> torch.Tensor:
        out = xs[0].mul(params.weights[0])
        for x, w in zip(xs[1:], params.weights[1:], strict=True):
            out.add_(x.mul(w))
        return out
