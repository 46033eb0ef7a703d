"""copy: `a` unchanged (cast to the node's dtype) — convert, prune or re-type a model."""

from __future__ import annotations

from typing import TYPE_CHECKING

from mergebuild.engine.methods.base import Method, Params, f32

if TYPE_CHECKING:
    import torch


class Copy(Method):
    name = "copy"
    slots = ("a",)
    Params = Params
    summary = "a"
    formula = "a"
    description = """The input unchanged, cast to the node's dtype.

Use it to convert a model (fp32 → fp16), to prune it through an output's options, or to
give an included recipe's output another dtype."""
    example = """half:
  method: copy
  a: anything
  dtype: fp16"""

    @staticmethod
    def compute(params: Params, xs: list[torch.Tensor]) -> torch.Tensor:
        return f32(xs[0])
