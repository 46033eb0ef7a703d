"""sum_twice: `(a·(1−α) + b·α)·(1−β) + c·β` — SuperMerger's "sum Twice"."""

from __future__ import annotations

from typing import TYPE_CHECKING

from mergebuild.engine.methods.base import Method, Params, f32
from mergebuild.sd.blocks import BlockAlpha

if TYPE_CHECKING:
    import torch


class SumTwiceParams(Params):
    alpha: float | BlockAlpha  # share of b in the first sum
    beta: float | BlockAlpha  # share of c in the second


class SumTwice(Method):
    name = "sum_twice"
    slots = ("a", "b", "c")
    Params = SumTwiceParams
    block_params = ("alpha", "beta")
    formula = "(a·(1−α) + b·α)·(1−β) + c·β"
    description = """Two weighted sums in a row, kept in float32 between them (SuperMerger's
"sum Twice"): first t = a·(1−α) + b·α, then t·(1−β) + c·β.

Unlike two separate weighted_sum nodes, the intermediate t is never rounded to fp16.
alpha 0 / 1 make t exactly a / b; beta 0 / 1 make the result exactly t / c. Both may be
block weights."""
    example = """twice:
  method: sum_twice
  a: anything
  b: insta
  c: nai_full
  alpha: 0.5
  beta: 0.25"""

    @staticmethod
    def compute(params: SumTwiceParams, xs: list[torch.Tensor]) -> torch.Tensor:
        a, b, c = xs
        alpha, beta = float(params.alpha), float(params.beta)  # type: ignore[arg-type]
        if beta == 1:
            return f32(c)
        if alpha == 0:
            t = f32(a)
        elif alpha == 1:
            t = f32(b)
        else:
            t = f32(a).mul_(1.0 - alpha).add_(f32(b).mul_(alpha))
        if beta == 0:
            return t
        return t.mul_(1.0 - beta).add_(f32(c).mul_(beta))
