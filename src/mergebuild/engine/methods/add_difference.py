"""add_difference: `a + (b - c) * alpha` — transplant what distinguishes b from c onto a."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from mergebuild.engine.methods.base import Method, Params, f32
from mergebuild.sd.blocks import BlockAlpha

if TYPE_CHECKING:
    import torch


class AddDifferenceParams(Params):
    alpha: float | BlockAlpha  # a plain float by the time `compute` sees it


class AddDifference(Method):
    name = "add_difference"
    slots = ("a", "b", "c")
    Params = AddDifferenceParams
    block_params = ("alpha",)
    summary = "a + (b - c) * alpha"
    version = 2  # 2: alpha 0 gives exactly a (an inf in b or c no longer makes NaN)
    formula = "a + (b − c)·α"
    description = """Transplant what distinguishes b from its base c onto a
(the web UI's "Add difference").

Typical use: a = your model, b = an inpainting or style fine-tune, c = the model b was
trained from. alpha scales the transplanted difference; 0 keeps a exactly. alpha may be
block weights. Expression form: `a + (b - c) * 0.5`."""
    example = """styled:
  method: add_difference
  a: anything
  b: nai_full
  c: sd15
  alpha: 0.5"""

    @staticmethod
    def compute(params: AddDifferenceParams, xs: list[torch.Tensor]) -> torch.Tensor:
        a, b, c = xs
        if params.alpha == 0:  # "kept from a" (e.g. a block weighted 0) means exactly a
            return f32(a)
        out = f32(b)
        out.sub_(c)
        out.mul_(params.alpha)
        return out.add_(a)

    @classmethod
    def compute_many(
        cls, params: list[AddDifferenceParams], xs: list[torch.Tensor]
    ) -> Iterator[torch.Tensor]:
        """b − c and float32 a once for every member: the same float32 values `compute` forms
        (widening is exact), then each member's own multiply and add, in compute's order, so
        its bits."""
        import torch

        a, b, c = xs
        a32 = f32(a)
        diff: torch.Tensor | None = None
        for p in params:
            if p.alpha == 0:
                yield a32
                continue
            if diff is None:
                diff = f32(b).sub_(c)
                out = torch.empty_like(diff)
            yield torch.mul(diff, p.alpha, out=out).add_(a32)

    @classmethod
    def compute_half(
        cls, params: AddDifferenceParams, xs: list[Any], out: Any, ctx: Any = None
    ) -> bool | None:
        """compute's float32 ops in one compiled loop: a sweep of one member."""
        flags = cls.compute_many_half([params], xs, out.reshape(1, -1))
        return None if flags is None else flags[0]

    @classmethod
    def compute_many_half(
        cls, params: list[AddDifferenceParams], xs: list[Any], outs: Any
    ) -> list[bool] | None:
        """Every member from one read of the float16 tile, compute's float32 ops in one
        compiled loop (_kernels.add_difference_many)."""
        import numpy as np

        from mergebuild.engine.methods.reduce import loops_for_size

        loops = loops_for_size(outs.size)
        if loops is None:
            return None
        alphas = np.array([float(p.alpha) for p in params], dtype=np.float32)
        live = np.array([p.alpha != 0 for p in params], dtype=np.uint8)
        flags = np.zeros(len(params), dtype=np.bool_)
        loops.add_difference_many(*xs, alphas, live, outs, flags)
        return [bool(f) for f in flags]
