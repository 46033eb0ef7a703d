"""model_stock: Model Stock (Jang et al. 2024) — move from base towards the mean of the models."""

from __future__ import annotations

from typing import TYPE_CHECKING

from mergebuild.engine.methods._taskvec import TILE, delta, gram64
from mergebuild.engine.methods.base import Method, Params, f32

if TYPE_CHECKING:
    import torch


class ModelStockParams(Params):
    pass


def stock_t(g: list[list[float]]) -> float:
    """t = n·cosθ / (1 + (n − 1)·cosθ), cosθ the mean cosine over all pairs i < j.

    A pair with a zero vector has cosine 0. cos is clamped to [−1, 1] against rounding; the
    denominator is ≥ 0 in exact arithmetic (Gram matrices are positive semi-definite) and t is
    0 (keep base) when it is not > 0.
    """
    import math

    n = len(g)
    cos = []
    for i in range(n):
        for j in range(i + 1, n):
            norm = math.sqrt(g[i][i]) * math.sqrt(g[j][j])
            cos.append(0.0 if norm == 0 else max(-1.0, min(1.0, g[i][j] / norm)))
    c = math.fsum(cos) / len(cos)
    den = 1.0 + (n - 1) * c
    return n * c / den if den > 0 else 0.0


class ModelStock(Method):
    name = "model_stock"
    inputs_form = "base_models"
    min_models = 2
    elementwise = False
    Params = ModelStockParams
    formula = "base + t·mean(mᵢ − base), t = n·cosθ/(1 + (n−1)·cosθ)"
    description = """Model Stock: fine-tunes of one base lie on a thin shell around it; their
mean is pulled back towards the base by how aligned their task vectors are.

Per tensor, δᵢ = mᵢ − base, cosθ = the mean of cos(δᵢ, δⱼ) over all pairs i < j, computed on
the whole flattened tensor (mergekit's default; sd-mecha 1.1.8 averages cosines of
consecutive pairs only, per row of the last dimension, with an eps clamp),
t = n·cosθ / (1 + (n − 1)·cosθ), out = base + t · (Σ δᵢ)/n. Needs n ≥ 2 models; no
parameters. A zero task vector has cosine 0 with everything. Dot products are float64 sums in a
fixed chunked order (independent of -j). Whole-tensor."""
    example = """merged:
  method: model_stock
  base: sd15
  models: [anime_v1, anime_v2, anime_v3]"""

    @staticmethod
    def compute(params: ModelStockParams, xs: list[torch.Tensor]) -> torch.Tensor:
        import torch

        base, models = xs[0], xs[1:]
        t = stock_t(gram64(base, models))
        if t == 0.0:
            return f32(base)
        out = torch.empty(base.numel(), dtype=torch.float32)
        for lo in range(0, base.numel(), TILE):  # tiles: no full-size temporaries
            hi = min(base.numel(), lo + TILE)
            acc = torch.zeros(hi - lo, dtype=torch.float32)
            for i in range(1, len(xs)):
                acc.add_(delta(xs, i, lo, hi))
            out[lo:hi] = acc.mul_(t / len(models)).add_(base.reshape(-1)[lo:hi])
        return out.reshape(base.shape)
