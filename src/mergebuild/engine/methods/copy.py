"""copy: `a` unchanged (cast to the node's dtype) — convert, prune or re-type a model."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from mergebuild.engine.methods.base import Method, Params, f32

if TYPE_CHECKING:
    import torch


class Copy(Method):
    name = "copy"
    slots = ("a",)
    Params = Params
    summary = "a"
    formula = "a"
    description = """The input unchanged, cast to the node's dtype.

Use it to convert a model (fp32 → fp16), to prune it through an output's options, or to
give an included recipe's output another dtype."""
    example = """half:
  method: copy
  a: anything
  dtype: fp16"""

    @staticmethod
    def compute(params: Params, xs: list[torch.Tensor]) -> torch.Tensor:
        return f32(xs[0])

    @classmethod
    def compute_half(cls, params: Params, xs: list[Any], out: Any, ctx: Any = None) -> bool | None:
        """float16 to float16: the bits as they are, NaNs canonical (one compiled loop)."""
        return copy_half(xs[0], out)


def copy_half(a: Any, out: Any) -> bool | None:
    """`out` (float16 bits) = `a` (float16 bits), NaNs canonical; whether it holds Inf/NaN
    (None: the compiled loops are unavailable, compute runs)."""
    from mergebuild.engine.methods.reduce import loops_for_size

    loops = loops_for_size(out.size)
    return None if loops is None else bool(loops.copy_half(a, out))
