"""slerp: spherical interpolation between a and b over the whole tensor."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from mergebuild.engine.methods.base import Method, Params, f32
from mergebuild.sd.blocks import BlockAlpha

if TYPE_CHECKING:
    import torch

PARALLEL = 1e-6  # sin Ω below this: a and b (anti)parallel, slerp ill-conditioned → lerp


class SlerpParams(Params):
    alpha: float | BlockAlpha = 0.5


def lerp(a: torch.Tensor, b: torch.Tensor, alpha: float) -> torch.Tensor:
    return f32(a).mul_(1.0 - alpha).add_(f32(b).mul_(alpha))


TILE = 1 << 18  # elements per tile of the final combination: one full-size tensor, the result


def combine(a: torch.Tensor, b: torch.Tensor, ca: float, cb: float) -> torch.Tensor | None:
    """a·f32(ca) + b·f32(cb) in float32, tile by tile (the same ops as on whole tensors,
    without two full-size temporaries); None if any value is not finite."""
    import math

    import torch

    fa, fb = a.reshape(-1), b.reshape(-1)
    out = torch.empty(fa.numel(), dtype=torch.float32, device=a.device)
    tmp = torch.empty(min(fa.numel(), TILE), dtype=torch.float32, device=a.device)
    for lo in range(0, fa.numel(), TILE):
        hi = min(fa.numel(), lo + TILE)
        part = out[lo:hi]
        part.copy_(fa[lo:hi]).mul_(ca).add_(tmp[: hi - lo].copy_(fb[lo:hi]).mul_(cb))
        # a float32 sum is finite iff every element is (or it overflows: then look closer)
        if not math.isfinite(float(part.sum())) and not bool(torch.isfinite(part).all()):
            return None
    return out.reshape(a.shape)


class Slerp(Method):
    name = "slerp"
    slots = ("a", "b")
    Params = SlerpParams
    block_params = ("alpha",)
    elementwise = False
    formula = "(sin((1−α)Ω)·â + sin(αΩ)·b̂)/sin Ω · ((1−α)‖a‖ + α‖b‖), cos Ω = ⟨â, b̂⟩"
    description = """Spherical interpolation: walk along the arc between a and b (each tensor seen
as one vector) instead of the straight line, and scale to the interpolated norm.

Ω is the angle between a and b; ‖a‖, ‖b‖ and ⟨a, b⟩ are float64 sums in a fixed order over
the whole tensor. The result is a·f32(cₐ) + b·f32(c_b) in float32, with
cₐ = sin((1−α)Ω)/sin Ω · L/‖a‖, c_b = sin(αΩ)/sin Ω · L/‖b‖, L = (1−α)‖a‖ + α‖b‖
(float64). Falls back to the plain lerp a·(1−α) + b·α when a or b is all zeros, when they
are parallel or antiparallel (sin Ω < 1e-6), or when anything is not finite. alpha 0 / 1
give exactly a / b; alpha may be block weights."""
    example = """arc:
  method: slerp
  a: anything
  b: insta
  alpha: 0.3"""

    @staticmethod
    def compute(params: SlerpParams, xs: list[torch.Tensor]) -> torch.Tensor:

        from mergebuild.engine.methods.reduce import gram1

        a, b = xs
        alpha = float(params.alpha)  # type: ignore[arg-type]
        if alpha == 0:
            return f32(a)
        if alpha == 1:
            return f32(b)
        aa, bb, ab = gram1(a, b)
        na, nb = math.sqrt(aa), math.sqrt(bb)
        if not (na > 0 and nb > 0 and math.isfinite(na) and math.isfinite(nb)):
            return lerp(a, b, alpha)
        cos = min(1.0, max(-1.0, ab / (na * nb)))
        omega = math.acos(cos)
        sin = math.sin(omega)
        if not sin >= PARALLEL:
            return lerp(a, b, alpha)
        length = (1.0 - alpha) * na + alpha * nb
        ca = math.sin((1.0 - alpha) * omega) / sin * length / na
        cb = math.sin(alpha * omega) / sin * length / nb
        out = combine(a, b, ca, cb)
        if out is None:
            return lerp(a, b, alpha)
        return out
