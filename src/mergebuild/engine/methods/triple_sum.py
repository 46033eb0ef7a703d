"""triple_sum: `a·(1−α−β) + b·α + c·β` — SuperMerger's "Triple sum" of three models."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from mergebuild.engine.methods.base import Method, Params, f32
from mergebuild.sd.blocks import BlockAlpha

if TYPE_CHECKING:
    import torch


class TripleSumParams(Params):
    alpha: float | BlockAlpha  # share of b
    beta: float | BlockAlpha  # share of c


def weighted(pairs: list[tuple[torch.Tensor, float]]) -> torch.Tensor:
    """Σ x·w left to right in float32, skipping weight-0 terms (an inf in an input that takes
    no part must not turn the result into NaN); a lone weight-1 term is the input exactly."""
    import torch

    live = [(x, w) for x, w in pairs if w != 0]
    if not live:
        return torch.zeros_like(pairs[0][0], dtype=torch.float32)
    x0, w0 = live[0]
    out = f32(x0) if w0 == 1 else f32(x0).mul_(w0)
    for x, w in live[1:]:
        out.add_(f32(x).mul_(w))
    return out


class TripleSum(Method):
    name = "triple_sum"
    slots = ("a", "b", "c")
    Params = TripleSumParams
    block_params = ("alpha", "beta")
    formula = "a·(1−α−β) + b·α + c·β"
    description = """Blend three models in one step (SuperMerger's "Triple sum").

alpha is the share of b, beta the share of c, a keeps the rest (1 − alpha − beta). Computed
in float32 left to right: a·(1−α−β), then + b·α, then + c·β; a term whose weight is 0 is
skipped. Both alpha and beta may be block weights."""
    example = """trio:
  method: triple_sum
  a: anything
  b: insta
  c: nai_full
  alpha: 0.3
  beta: 0.2"""

    @staticmethod
    def compute(params: TripleSumParams, xs: list[torch.Tensor]) -> torch.Tensor:
        a, b, c = xs
        alpha, beta = float(params.alpha), float(params.beta)  # type: ignore[arg-type]
        return weighted([(a, 1.0 - alpha - beta), (b, alpha), (c, beta)])

    @classmethod
    def compute_half(
        cls, params: TripleSumParams, xs: list[Any], out: Any, ctx: Any = None
    ) -> bool | None:
        """`weighted`'s ops as one compiled loop (_kernels.weighted3), the same weights."""
        import numpy as np

        from mergebuild.engine.methods.reduce import loops_for_size

        loops = loops_for_size(out.size)
        if loops is None:
            return None
        alpha, beta = float(params.alpha), float(params.beta)  # type: ignore[arg-type]
        ws = (1.0 - alpha - beta, alpha, beta)
        live = sum(1 << i for i, w in enumerate(ws) if w != 0)
        w32 = [np.float32(w) for w in ws]
        return bool(loops.weighted3(*xs, *w32, live, out))
