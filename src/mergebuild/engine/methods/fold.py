"""fold: `Σ wᵢ·mᵢ` over the leaf terms of a folded linear subgraph, one float32 sum.

What a `fold: true` node becomes (recipe/fold.py): every linear step under it collapses into
one weight per leaf term (an input model or a non-linear node's output), so merge order and
intermediate roundings no longer change the bytes. The first input supplies the key set and
the non-float tensors (as `a` does for every method); the graph orders the other terms by
content key before the node is keyed or run (graph.job_args), so the sum's order is canonical.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from mergebuild.engine.methods.base import Method, Params, f32
from mergebuild.sd.blocks import BlockAlpha

if TYPE_CHECKING:
    import torch

TILE = 1 << 18  # elements per tile of compute_half: its float32 accumulator stays in L2


class FoldParams(Params):
    # one per input; block weights per term resolve to a plain number per tensor
    weights: list[float | BlockAlpha]


class Fold(Method):
    name = "fold"
    inputs_form = "variadic"
    variadic = True
    min_models = 1
    Params = FoldParams
    # list parameters whose every item may be block weights (the loader canonicalises each)
    block_list_params: ClassVar[tuple[str, ...]] = ("weights",)
    formula = "Σ wᵢ·mᵢ, one float32 sum in content-key order (what `fold: true` computes)"
    description = """The folded form of a linear subgraph: one weight per model, summed once.

Written by `fold: true` on a linear merge (weighted_sum, add_difference, linear, copy,
triple_sum, sum_twice, n_average or an expression): the whole linear subgraph under the
node becomes one float32 Σ wᵢ·mᵢ with a single final rounding, so `(A + (B−C)) + (D−B)` and
`(A + (D−B)) + (B−C)` give the same bytes and share one cache entry. Terms after the first
are summed in content-key order (never recipe order); a weight of 0 skips its model. The
first model gives the key set and the non-float tensors. Weights may be block weights."""
    example = """folded:
  method: fold
  models: [anything, nai_full, gape]
  weights: [1.0, -1.0, 1.0]"""

    @classmethod
    def check(cls, params: FoldParams, n_inputs: int) -> str | None:
        if len(params.weights) != n_inputs:
            return f"'weights' has {len(params.weights)} values for {n_inputs} inputs"
        layouts = {w.layout for w in params.weights if isinstance(w, BlockAlpha) and w.layout}
        if len(layouts) > 1:
            return f"'weights' mix block weights of the {' and '.join(sorted(layouts))} layouts"
        return None

    @classmethod
    def compute_half(
        cls, params: FoldParams, xs: list[Any], out: Any, ctx: Any = None
    ) -> bool | None:
        """compute's float32 sum in compiled loops, a tile at a time: the first live term
        (x, or x·w), then + x·w for each next one (x·±1 is exact: compute's add_ and sub_),
        rounded once into the float16 output."""
        import numpy as np

        from mergebuild.engine.methods.reduce import loops_for_size

        loops = loops_for_size(out.size)
        if loops is None:
            return None
        live = [(x, np.float32(w)) for x, w in zip(xs, params.weights, strict=True) if w != 0]
        if not live:
            out[:] = 0  # compute's float32 zeros
            return False
        acc = np.empty(min(out.size, TILE), dtype=np.float32)
        bad = False
        for lo in range(0, out.size, TILE):
            hi = min(out.size, lo + TILE)
            part = acc[: hi - lo]
            loops.fold_first(live[0][0][lo:hi], live[0][1], part)
            for x, w in live[1:]:
                loops.fold_add(x[lo:hi], w, part)
            bad = loops.fold_round(part, out[lo:hi]) or bad
        return bad

    @staticmethod
    def compute(params: FoldParams, xs: list[torch.Tensor]) -> torch.Tensor:
        out = None
        for x, w in zip(xs, params.weights, strict=True):
            if w == 0:  # a model that cancels here (a block weighted 0): never 0·inf = NaN
                continue
            if out is None:
                out = f32(x) if w == 1 else f32(x).mul_(w)
            elif w == 1:  # x·1 and x·(−1) are exact: the same bits without the copy and multiply
                out.add_(x)
            elif w == -1:
                out.sub_(x)
            else:
                out.add_(f32(x).mul_(w))
        if out is None:
            import torch

            return torch.zeros(xs[0].shape, dtype=torch.float32)
        return out
