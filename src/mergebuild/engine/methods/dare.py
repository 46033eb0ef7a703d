"""dare: DARE (Yu et al. 2023) — randomly drop task-vector elements, rescale the rest, add."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field

from mergebuild.engine.methods._taskvec import (
    Weight,
    delta,
    model_weights,
    n_models,
    weights_error,
)
from mergebuild.engine.methods.base import ComputeContext, Method, SeedParams, f32
from mergebuild.sd.blocks import BlockAlpha

if TYPE_CHECKING:
    import torch


class DareParams(SeedParams):
    p: float = Field(0.9, ge=0, lt=1)  # drop probability
    alpha: float | BlockAlpha = 1.0  # a plain float by the time `compute` sees it
    weights: list[Weight] | None = None


def stream_name(tensor: str, i: int) -> str:
    """Model i's mask has its own stream: the tensor name + '#' + the model's 1-based index."""
    return f"{tensor}#{i}"


class Dare(Method):
    name = "dare"
    compiled_loops = True
    inputs_form = "base_models"
    min_models = 1
    random = True
    needs_context = True
    Params = DareParams
    block_params = ("alpha",)
    formula = "base + α·Σ wᵢ·mask_p(mᵢ − base)/(1 − p)"
    description = """DARE (drop and rescale): most of a fine-tune's delta is redundant; dropping a
random fraction p of each task vector δᵢ = mᵢ − base and scaling the rest by 1/(1 − p) keeps
its expected value while reducing interference between models.

Element j of δᵢ is kept iff u < 1 − p, u the counter-based uniform of stream
(seed, node key, tensor name + "#i") at index j (engine/rng.py): masks do not depend on tile
size, chunking, -j or cache state. Result: base + alpha · Σ wᵢ · kept(δᵢ) / (1 − p) (task
arithmetic on the sparsified vectors, like mergekit's dare_linear without normalisation).

Parameters: p in [0, 1) (default 0.9), alpha (default 1, may vary by block), weights (≥ 0,
one per model, default 1), seed (default 0). Elementwise (streams in tiles)."""
    example = """merged:
  method: dare
  base: sd15
  models: [anime, photo]
  p: 0.9
  weights: [0.5, 0.5]
  seed: 42"""

    @classmethod
    def check(cls, params: DareParams, n_inputs: int) -> str | None:
        return weights_error(params.weights, n_models(n_inputs))

    @staticmethod
    def compute(params: DareParams, xs: list[torch.Tensor], ctx: ComputeContext) -> torch.Tensor:
        import torch

        from mergebuild.engine import rng

        assert isinstance(params.alpha, float | int)
        base = xs[0]
        if params.alpha == 0:  # "kept from base" (e.g. a block weighted 0) means exactly base
            return f32(base)
        keep = 1.0 - params.p
        # the executor hands an elementwise method tiles: gate on the whole tensor's size
        from mergebuild.engine.methods import reduce

        loops = reduce.loops_for(base, minimum=0 if ctx.numel >= reduce.COMPILED_MIN else None)
        acc = torch.zeros(base.numel(), dtype=torch.float32)
        for i, w in enumerate(model_weights(params.weights, len(xs) - 1), start=1):
            if w == 0:
                continue
            d = delta(xs, i)
            stream = stream_name(ctx.tensor, i)
            rng.drop_(d, ctx.seed, ctx.node_key, stream, ctx.offset, keep, loops)
            if w != 1.0:
                d.mul_(w)
            acc.add_(d)
        acc.mul_(float(params.alpha) / keep)
        return acc.add_(base.reshape(-1)).reshape(base.shape)
