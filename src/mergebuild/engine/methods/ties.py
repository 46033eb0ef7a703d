"""ties: TIES-merging (Yadav et al. 2023) — trim, elect sign, disjoint mean of task vectors."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field

from mergebuild.engine.methods._taskvec import (
    TILE,
    TaskVectorParams,
    TileDeltas,
    model_weights,
    n_models,
    ties_tiles,
    weights_error,
)
from mergebuild.engine.methods.base import Method, Tiles, f32

if TYPE_CHECKING:
    import torch


class TiesParams(TaskVectorParams):
    k: float = Field(0.2, gt=0, le=1)  # fraction of each task vector kept (by magnitude)
    vote: Literal["magnitude", "count"] = "magnitude"


class Ties(Method):
    name = "ties"
    compiled_loops = True
    inputs_form = "base_models"
    min_models = 1
    elementwise = False
    Params = TiesParams
    block_params = ("alpha",)
    formula = "base + α·disjoint_mean(elect_sign(top_k(mᵢ − base)))"
    description = """TIES-merging: combine several fine-tunes of one base without their task
vectors (δᵢ = mᵢ − base) cancelling each other out.

Per tensor: (1) trim — keep the elements of each δᵢ with |δᵢ| ≥ the j-th smallest |δᵢ|,
j = max(⌊(1 − k)·numel⌋, 1) (sd-mecha's rule: ties at the threshold are kept, k = 1 keeps all);
(2) elect a sign per element — `vote: magnitude` (TIES paper, mergekit) is sign(Σ wᵢ·δᵢ),
`vote: count` (sd-mecha's default) is sign(Σ sign δᵢ) over the trimmed values; (3) disjoint
mean — Σ wᵢ·δᵢ over the models whose trimmed δᵢ has the elected sign, divided by the sum of
their weights (mergekit's normalisation; with the default weights 1 this is their count);
0 where no model agrees. Result: base + alpha · that.

Parameters: k in (0, 1] (default 0.2), vote (magnitude|count), alpha (default 1, may vary by
block), weights (≥ 0, one per model, default 1). Whole-tensor: the threshold is an exact
order statistic (an exact selection over the tiles of one δᵢ at a time)."""
    example = """merged:
  method: ties
  base: sd15
  models: [anime, photo, painting]
  k: 0.2
  vote: magnitude
  alpha: 1.0"""

    @classmethod
    def check(cls, params: TiesParams, n_inputs: int) -> str | None:
        return weights_error(params.weights, n_models(n_inputs))

    @classmethod
    def split(cls, params: TiesParams, xs: list[torch.Tensor], ctx: object) -> Tiles | None:
        assert isinstance(params.alpha, float | int)
        if params.alpha == 0:  # "kept from base" (e.g. a block weighted 0) means exactly base
            return None
        weights = model_weights(params.weights, len(xs) - 1)
        return ties_tiles(
            xs[0], TileDeltas(xs, TILE), weights, params.k, params.vote, float(params.alpha)
        )

    @staticmethod
    def compute(params: TiesParams, xs: list[torch.Tensor]) -> torch.Tensor:
        tiles = Ties.split(params, xs, None)
        out = f32(xs[0]) if tiles is None else tiles.whole()
        assert out is not None
        return out
