"""train_difference: SuperMerger's "trainDifference" — add b − c scaled by how far b is from a."""

from __future__ import annotations

from typing import TYPE_CHECKING

from mergebuild.engine.methods.base import Method, Params, f32
from mergebuild.sd.blocks import BlockAlpha

if TYPE_CHECKING:
    import torch


class TrainDifferenceParams(Params):
    alpha: float | BlockAlpha = 1.0


class TrainDifference(Method):
    name = "train_difference"
    slots = ("a", "b", "c")
    Params = TrainDifferenceParams
    block_params = ("alpha",)
    version = 1
    formula = "a + 1.8·α·sign(b−c)·|b−c|·|b−a| / (|b−c| + |b−a|)"
    description = """Add the difference b − c to a as if a had been trained like b (SuperMerger's
"trainDifference"): each element of b − c is scaled by |b−a| / (|b−c| + |b−a|), so where a
already sits near b little is added, where a is far from b nearly all of it.

Per element, in float32: d = b − c; n = |b − a|; q = n / (|d| + n) (0 where both are 0);
result = a + (sign(d)·q·|d|)·f32(1.8·α). Where b == c (element or whole tensor) the result is
exactly a (SuperMerger skips a key whose b and c are equal, which gives the same). alpha may
be block weights; alpha 0 gives exactly a."""
    example = """trained:
  method: train_difference
  a: anything
  b: nai_full
  c: sd15
  alpha: 1.0"""

    @staticmethod
    def compute(params: TrainDifferenceParams, xs: list[torch.Tensor]) -> torch.Tensor:
        import torch

        a, b, c = xs
        alpha = float(params.alpha)  # type: ignore[arg-type]
        if alpha == 0:
            return f32(a)
        d = f32(b).sub_(c)
        n = f32(b).sub_(a).abs_()
        dabs = d.abs()
        s = dabs + n
        q = torch.where(s != 0, n / s, torch.zeros((), dtype=torch.float32))
        t = q.mul_(dabs).mul_(torch.sign(d)).mul_(alpha * 1.8)
        out = t.add_(a)
        return torch.where(d == 0, a.to(torch.float32), out)
