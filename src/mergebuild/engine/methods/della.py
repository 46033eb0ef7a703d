"""della: DELLA-merging (Deep et al. 2024) — magnitude-ranked drop, rescale, elect, fuse."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field

from mergebuild.engine.methods._taskvec import (
    Weight,
    delta,
    model_weights,
    n_models,
    ties_merge,
    weights_error,
)
from mergebuild.engine.methods.base import ComputeContext, Method, SeedParams, f32
from mergebuild.engine.methods.dare import stream_name
from mergebuild.sd.blocks import BlockAlpha

if TYPE_CHECKING:
    import numpy as np
    import torch

RANK_BLOCK = 1 << 18


class DellaParams(SeedParams):
    p: float = Field(0.9, ge=0, lt=1)  # mean drop probability
    eps: float = Field(0.1, ge=0, le=1)  # width of the keep-probability window
    vote: Literal["magnitude", "count"] = "magnitude"
    alpha: float | BlockAlpha = 1.0  # a plain float by the time `compute` sees it
    weights: list[Weight] | None = None


def magprune(
    d: torch.Tensor, p: float, eps: float, ctx: ComputeContext, stream: str
) -> torch.Tensor:
    """DELLA's MAGPRUNE on flat float32 `d`, in place: keep with qⱼ, scale kept by 1/qⱼ.

    qⱼ = clamp(1 − p + eps·(2rⱼ − N − 1)/(2N), 0, 1), rⱼ the 1-based rank of |dⱼ| ascending
    (ties by position: a stable sort, scipy's "ordinal"), N = numel — sd-mecha's window:
    keep probabilities from ≈1 − p − eps/2 (smallest) to ≈1 − p + eps/2 (largest). Element j
    is kept iff u < qⱼ, u the counter-based uniform of `stream` at index offset + j.
    """
    import numpy as np
    import torch

    from mergebuild.engine import rng

    n = d.numel()
    if n >= 2**32:
        raise ValueError(f"della: tensor of {n} elements is too large to rank")
    rank = ranks(d)
    for lo in range(0, n, RANK_BLOCK):
        hi = min(n, lo + RANK_BLOCK)
        r = rank[lo:hi].astype(np.float64)
        q = np.clip(1.0 - p + eps * (2.0 * r - n - 1.0) / (2.0 * n), 0.0, 1.0)
        u = rng.uniform(ctx.seed, ctx.node_key, stream, ctx.offset + lo, hi - lo).numpy()
        # kept: × 1/qⱼ (float64, rounded once to float32); dropped: × 0 (u < 0 never holds)
        factor = np.divide(1.0, q, out=np.zeros_like(q), where=u < q)
        d[lo:hi].mul_(torch.from_numpy(factor).to(torch.float32))
    return d


def ranks(d: torch.Tensor) -> np.ndarray:
    """1-based rank of |dⱼ| ascending, ties by position (scipy's "ordinal"), as int32.

    Sorts one int64 per element, (float32 bits of |dⱼ|) << 32 | j: the bits of non-negative
    floats order like the floats and the keys are unique, so numpy's fast unstable sort gives
    the one stable order (torch's stable argsort was 5x slower).
    """
    import numpy as np

    n = d.numel()
    keys = d.abs().numpy().view(np.int32).astype(np.int64)
    keys <<= 32
    for lo in range(0, n, RANK_BLOCK):  # blockwise: no second 8-byte-per-element array
        keys[lo : lo + RANK_BLOCK] |= np.arange(lo, min(n, lo + RANK_BLOCK), dtype=np.int64)
    keys.sort()
    keys &= 0xFFFFFFFF  # now the element index of each rank
    rank = np.empty(n, dtype=np.int32 if n < 2**31 else np.int64)
    for lo in range(0, n, RANK_BLOCK):
        hi = min(n, lo + RANK_BLOCK)
        rank[keys[lo:hi]] = np.arange(lo + 1, hi + 1, dtype=rank.dtype)
    return rank


class Della(Method):
    compiled_loops = True
    name = "della"
    inputs_form = "base_models"
    min_models = 1
    random = True
    needs_context = True
    elementwise = False
    Params = DellaParams
    block_params = ("alpha",)
    formula = "base + α·disjoint_mean(elect_sign(magprune_p,ε(mᵢ − base)))"
    description = """DELLA: like DARE, but large-magnitude elements are dropped less often.

(1) MAGPRUNE each δᵢ = mᵢ − base: rank |δᵢ| within the tensor (rank r = 1..N ascending, ties
by position), keep element j with probability qⱼ = clamp(1 − p + eps·(2r − N − 1)/(2N), 0, 1)
(sd-mecha's rank window, centred on 1 − p, total width eps) and scale kept elements by 1/qⱼ
(the paper's and mergekit's per-element rescale; sd-mecha instead divides the merged result
by 1 − p); (2) elect a sign per element (`vote`, default magnitude as in mergekit's della);
(3) disjoint weighted mean of the agreeing values (see `ties`). Result: base + alpha · that.
Masks come from counter-based uniforms (stream: seed, node key, tensor name + "#i").

Parameters: p in [0, 1) (default 0.9), eps in [0, 1] (default 0.1), vote, alpha (may vary
by block), weights (≥ 0, default 1), seed (default 0). Whole-tensor (a sort per model)."""
    example = """merged:
  method: della
  base: sd15
  models: [anime, photo, painting]
  p: 0.7
  eps: 0.2
  seed: 3"""

    @classmethod
    def check(cls, params: DellaParams, n_inputs: int) -> str | None:
        return weights_error(params.weights, n_models(n_inputs))

    @staticmethod
    def compute(params: DellaParams, xs: list[torch.Tensor], ctx: ComputeContext) -> torch.Tensor:
        assert isinstance(params.alpha, float | int)
        if params.alpha == 0:
            return f32(xs[0])
        weights = model_weights(params.weights, len(xs) - 1)
        pruned = {
            i: magprune(delta(xs, i), params.p, params.eps, ctx, stream_name(ctx.tensor, i))
            for i, w in enumerate(weights, start=1)
            if w != 0
        }
        return ties_merge(
            xs[0],
            lambda i, lo, hi, out: out.copy_(pruned[i][lo:hi]),
            weights,
            1.0,
            params.vote,
            float(params.alpha),
        )
