"""dare_ties: DARE's random drop, then TIES' sign election and disjoint mean, then rescale."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field

from mergebuild.engine.methods._taskvec import (
    TILE,
    TileDeltas,
    Weight,
    model_weights,
    n_models,
    ties_tiles,
    weights_error,
)
from mergebuild.engine.methods.base import ComputeContext, Method, SeedParams, Tiles, f32
from mergebuild.engine.methods.dare import stream_name
from mergebuild.sd.blocks import BlockAlpha

if TYPE_CHECKING:
    import torch


class DareTiesParams(SeedParams):
    p: float = Field(0.9, ge=0, lt=1)  # drop probability
    k: float = Field(1.0, gt=0, le=1)  # TIES trim after the drop (1: no trim)
    vote: Literal["magnitude", "count"] = "magnitude"
    alpha: float | BlockAlpha = 1.0  # a plain float by the time `compute` sees it
    weights: list[Weight] | None = None


class DareTies(Method):
    name = "dare_ties"
    compiled_loops = True
    inputs_form = "base_models"
    min_models = 1
    random = True
    needs_context = True
    elementwise = False
    Params = DareTiesParams
    block_params = ("alpha",)
    formula = "base + α·ties(mask_p(mᵢ − base))/(1 − p)"
    description = """DARE + TIES in sd-mecha's order (add_ties_with_dare): drop → TIES → rescale.

(1) drop: element j of δᵢ = mᵢ − base is kept iff u < 1 − p, with the same counter-based
masks as `dare` (stream: seed, node key, tensor name + "#i"); (2) TIES on the dropped
vectors: trim to the top-k fraction (k = 1, the default, keeps all), elect a sign per element
(`vote`), disjoint weighted mean of the agreeing values (see `ties`); (3) divide by 1 − p.
Result: base + alpha · that.

Parameters: p in [0, 1) (default 0.9), k in (0, 1] (default 1), vote (magnitude|count),
alpha (may vary by block), weights (≥ 0, default 1), seed (default 0). Whole-tensor."""
    example = """merged:
  method: dare_ties
  base: sd15
  models: [anime, photo, painting]
  p: 0.8
  seed: 7"""

    @classmethod
    def check(cls, params: DareTiesParams, n_inputs: int) -> str | None:
        return weights_error(params.weights, n_models(n_inputs))

    @classmethod
    def split(
        cls, params: DareTiesParams, xs: list[torch.Tensor], ctx: ComputeContext
    ) -> Tiles | None:
        from mergebuild.engine import rng
        from mergebuild.engine.methods import reduce

        assert isinstance(params.alpha, float | int)
        if params.alpha == 0:
            return None
        keep = 1.0 - params.p

        deltas = TileDeltas(xs, TILE)
        loops = reduce.loops_for(xs[0])

        def dropped(i: int, lo: int, hi: int, out: torch.Tensor) -> torch.Tensor:
            """δᵢ[lo:hi] with DARE's mask: counter-based, so any range can be recomputed."""
            d = deltas(i, lo, hi, out)
            stream = stream_name(ctx.tensor, i)
            return rng.drop_(d, ctx.seed, ctx.node_key, stream, ctx.offset + lo, keep, loops)

        dropped.base = deltas.base  # type: ignore[attr-defined]  # ties_tiles reuses it
        # ties_tiles' float16 tiles: the inputs' bits and DARE's mask, in one compiled loop
        dropped.bits = deltas.bits  # type: ignore[attr-defined]
        if keep < 1.0:  # (drop_ leaves δ as it is at keep 1)
            dropped.mask = (  # type: ignore[attr-defined]
                lambda i: rng.stream_key(ctx.seed, ctx.node_key, stream_name(ctx.tensor, i)),
                ctx.offset,
                rng.keep_limit(keep),
            )
        weights = model_weights(params.weights, len(xs) - 1)
        return ties_tiles(xs[0], dropped, weights, params.k, params.vote, params.alpha / keep)

    @staticmethod
    def compute(
        params: DareTiesParams, xs: list[torch.Tensor], ctx: ComputeContext
    ) -> torch.Tensor:
        tiles = DareTies.split(params, xs, ctx)
        out = f32(xs[0]) if tiles is None else tiles.whole()
        assert out is not None
        return out
