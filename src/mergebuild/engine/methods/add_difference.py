"""add_difference: `a + (b - c) * alpha` — transplant what distinguishes b from c onto a."""

from __future__ import annotations

from typing import TYPE_CHECKING

from mergebuild.engine.methods.base import Method, Params, f32
from mergebuild.sd.blocks import BlockAlpha

if TYPE_CHECKING:
    import torch


class AddDifferenceParams(Params):
    alpha: float | BlockAlpha  # a plain float by the time `compute` sees it


class AddDifference(Method):
    name = "add_difference"
    slots = ("a", "b", "c")
    Params = AddDifferenceParams
    block_params = ("alpha",)
    summary = "a + (b - c) * alpha"

    @staticmethod
    def compute(params: AddDifferenceParams, xs: list[torch.Tensor]) -> torch.Tensor:
        a, b, c = xs
        out = f32(b)
        out.sub_(c)
        out.mul_(params.alpha)
        return out.add_(a)
