"""weighted_sum: `a * (1 - alpha) + b * alpha` — the web UI's plain interpolation."""

from __future__ import annotations

from typing import TYPE_CHECKING

from mergebuild.engine.methods.base import Method, Params, f32
from mergebuild.sd.blocks import BlockAlpha

if TYPE_CHECKING:
    import torch


class WeightedSumParams(Params):
    alpha: float | BlockAlpha  # a plain float by the time `compute` sees it


class WeightedSum(Method):
    name = "weighted_sum"
    slots = ("a", "b")
    Params = WeightedSumParams
    block_params = ("alpha",)
    summary = "a * (1 - alpha) + b * alpha"
    version = 2  # 2: alpha 0 / 1 give exactly a / b (an inf elsewhere no longer makes NaN)

    @staticmethod
    def compute(params: WeightedSumParams, xs: list[torch.Tensor]) -> torch.Tensor:
        a, b = xs
        if params.alpha == 0:  # "kept from a" (e.g. a component left out) means exactly a
            return f32(a)
        if params.alpha == 1:
            return f32(b)
        out = f32(a).mul_(1.0 - params.alpha)
        return out.add_(f32(b).mul_(params.alpha))
