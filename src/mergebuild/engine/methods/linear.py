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
