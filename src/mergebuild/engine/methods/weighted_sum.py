"""weighted_sum: `a * (1 - alpha) + b * alpha` — the web UI's plain interpolation."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

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
    formula = "a·(1−α) + b·α"
    description = """Plain interpolation between two models (the web UI's "Weighted sum").

Use it to blend two models of the same family. alpha is the share of b: 0 keeps a exactly,
1 gives b exactly. alpha may be block weights (a preset, 26/20 values or a mapping), so
each UNet block, the text encoder and the VAE can take a different share.
Expression form: `a * 0.7 + b * 0.3` or `weighted_sum(a, b, 0.3)`."""
    example = """mix:
  method: weighted_sum
  a: anything
  b: insta
  alpha: 0.3"""

    @staticmethod
    def compute(params: WeightedSumParams, xs: list[torch.Tensor]) -> torch.Tensor:
        a, b = xs
        if params.alpha == 0:  # "kept from a" (e.g. a component left out) means exactly a
            return f32(a)
        if params.alpha == 1:
            return f32(b)
        out = f32(a).mul_(1.0 - params.alpha)
        return out.add_(f32(b).mul_(params.alpha))

    @classmethod
    def compute_half(
        cls, params: WeightedSumParams, xs: list[Any], out: Any, ctx: Any = None
    ) -> bool | None:
        """compute's float32 ops as one compiled loop: triple_sum's (_kernels.weighted3) with
        no third term, a weight-0 term skipped as compute keeps a or b exactly."""
        import numpy as np

        from mergebuild.engine.methods.reduce import loops_for_size

        loops = loops_for_size(out.size)
        if loops is None:
            return None
        alpha = float(params.alpha)  # type: ignore[arg-type]
        live = (1 if alpha != 1 else 0) | (2 if alpha != 0 else 0)
        wa, wb = np.float32(1.0 - alpha), np.float32(alpha)
        return bool(loops.weighted3(xs[0], xs[1], xs[1], wa, wb, np.float32(0), live, out))

    @classmethod
    def compute_many(
        cls, params: list[WeightedSumParams], xs: list[torch.Tensor]
    ) -> Iterator[torch.Tensor]:
        """a and b widened to float32 once for every member (exact), then each member's own
        two multiplies and add, in compute's order, so its bits."""
        import torch

        a32, b32 = f32(xs[0]), f32(xs[1])
        out, part = torch.empty_like(a32), torch.empty_like(a32)
        for p in params:
            if p.alpha == 0:
                yield a32
            elif p.alpha == 1:
                yield b32
            else:
                torch.mul(a32, 1.0 - p.alpha, out=out)
                yield out.add_(torch.mul(b32, p.alpha, out=part))
