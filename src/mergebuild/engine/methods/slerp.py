"""slerp: spherical interpolation between a and b over the whole tensor."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from mergebuild.engine.methods.base import Method, Params, Tiles, f32
from mergebuild.sd.blocks import BlockAlpha

if TYPE_CHECKING:
    import numpy as np
    import torch

PARALLEL = 1e-6  # sin Ω below this: a and b (anti)parallel, slerp ill-conditioned → lerp


class SlerpParams(Params):
    alpha: float | BlockAlpha = 0.5


def lerp(a: torch.Tensor, b: torch.Tensor, alpha: float) -> torch.Tensor:
    return f32(a).mul_(1.0 - alpha).add_(f32(b).mul_(alpha))


TILE = 1 << 18  # elements per tile of the final combination: one full-size tensor, the result
FILL_TILE = 1 << 16  # per tile cast into the output (split): its two float32 buffers stay in L2


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


def _cannot_overflow(found: tuple[float, float, float, float]) -> bool:
    """Whether no tile of a·cₐ + b·c_b can overflow float32, (cₐ, c_b, ‖a‖, ‖b‖) = `found`.

    |a·cₐ + b·c_b| ≤ ‖a‖·|cₐ| + ‖b‖·|c_b| (a norm bounds every element): far below the float32
    maximum (and cₐ, c_b themselves finite in float32), no tile can overflow; finite norms
    mean finite inputs. The lerp fallback cannot happen then, so the tiles need no check and
    may go out as they come."""
    import numpy as np

    ca, cb, na, nb = found
    bound = max(na * abs(ca) + nb * abs(cb), abs(ca), abs(cb))
    return 2.0 * bound < float(np.finfo(np.float32).max)


def _lincomb_half(
    loops: Any, ha: np.ndarray, hb: np.ndarray, ca: np.float32, cb: np.float32
) -> Callable[[int, int, np.ndarray], bool]:
    """Tiles.fill_half of a·cₐ + b·c_b over float16 bits (flat), one compiled loop a tile."""

    def fill_half(lo: int, hi: int, out: np.ndarray) -> bool:
        return bool(loops.lincomb(ha[lo:hi], hb[lo:hi], ca, cb, out))

    return fill_half


class Slerp(Method):
    name = "slerp"
    compiled_loops = True
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

    @classmethod
    def split(cls, params: SlerpParams, xs: list[torch.Tensor], ctx: object) -> Tiles | None:
        """a·f32(cₐ) + b·f32(c_b) tile by tile: `combine`'s ops on each slice (None: alpha 0
        or 1, or the lerp fallback — `compute` handles those on the whole tensor)."""
        import numpy as np
        import torch

        from mergebuild.engine.methods.reduce import half_bits, loops_for

        a, b = xs
        alpha = float(params.alpha)  # type: ignore[arg-type]
        if alpha in (0, 1) or a.device.type != "cpu":
            return None
        found = coefficients(a, b, alpha)
        if found is None:
            return None
        ca, cb = found[:2]
        fa, fb = a.reshape(-1), b.reshape(-1)
        size = min(fa.numel(), FILL_TILE)
        part, tmp = (torch.empty(size, dtype=torch.float32) for _ in range(2))
        loops = loops_for(fa)
        if loops is not None:  # the same two products and sum as one compiled loop
            res = torch.empty(size, dtype=torch.float32)
            ca32, cb32 = np.float32(ca), np.float32(cb)
        safe = _cannot_overflow(found)

        def fill(lo: int, hi: int) -> torch.Tensor | None:
            p = part[: hi - lo]
            if loops is not None:
                x, y = p.copy_(fa[lo:hi]), tmp[: hi - lo].copy_(fb[lo:hi])
                p = res[: hi - lo]
                loops.lincomb(x.numpy(), y.numpy(), ca32, cb32, p.numpy())
            else:
                p.copy_(fa[lo:hi]).mul_(ca).add_(tmp[: hi - lo].copy_(fb[lo:hi]).mul_(cb))
            if safe:
                return p
            if not math.isfinite(float(p.sum())) and not bool(torch.isfinite(p).all()):
                return None  # combine's None: the whole tensor is lerped instead
            return p

        fill_half = None
        ha, hb = half_bits(fa), half_bits(fb)
        if loops is not None and safe and ha is not None and hb is not None:
            fill_half = _lincomb_half(loops, ha, hb, ca32, cb32)
        return Tiles(FILL_TILE, tuple(a.shape), fill, may_restart=not safe, fill_half=fill_half)

    @classmethod
    def split_half(cls, params: SlerpParams, xs: list[np.ndarray], ctx: object) -> Tiles | None:
        """`compute` rounded to float16, from float16 numpy arrays (a pass without torch):
        alpha 0 / 1 as a's / b's bits, the lerp fallback and the slerp itself as `lincomb`
        tiles (None where a tile could overflow: the tensors go the usual way)."""
        import numpy as np

        from mergebuild.engine.methods.reduce import loops_for_size

        a, b = xs
        loops = loops_for_size(a.size)
        if loops is None:
            return None
        ha = np.ascontiguousarray(a).view(np.uint16).reshape(-1)
        hb = np.ascontiguousarray(b).view(np.uint16).reshape(-1)
        alpha = float(params.alpha)  # type: ignore[arg-type]
        if alpha in (0, 1):  # f32(a) or f32(b), rounded back: the bits, NaNs canonical
            src = ha if alpha == 0 else hb

            def copy(lo: int, hi: int, out: np.ndarray) -> bool:
                return bool(loops.copy_half(src[lo:hi], out))

            return Tiles(FILL_TILE, tuple(a.shape), lambda lo, hi: None, fill_half=copy)
        found = coefficients(a, b, alpha)  # type: ignore[arg-type]
        if found is None:  # lerp's a·f32(1 − α) + b·f32(α)
            ca, cb = np.float32(1.0 - alpha), np.float32(alpha)
        elif _cannot_overflow(found):
            ca, cb = np.float32(found[0]), np.float32(found[1])
        else:
            return None
        fill_half = _lincomb_half(loops, ha, hb, ca, cb)
        return Tiles(FILL_TILE, tuple(a.shape), lambda lo, hi: None, fill_half=fill_half)

    @staticmethod
    def compute(params: SlerpParams, xs: list[torch.Tensor]) -> torch.Tensor:
        a, b = xs
        alpha = float(params.alpha)  # type: ignore[arg-type]
        if alpha == 0:
            return f32(a)
        if alpha == 1:
            return f32(b)
        found = coefficients(a, b, alpha)
        if found is None:
            return lerp(a, b, alpha)
        out = combine(a, b, *found[:2])
        if out is None:
            return lerp(a, b, alpha)
        return out


def coefficients(
    a: torch.Tensor, b: torch.Tensor, alpha: float
) -> tuple[float, float, float, float] | None:
    """(cₐ, c_b) of the formula (float64) and ‖a‖, ‖b‖, or None where slerp falls back to
    the lerp."""
    from mergebuild.engine.methods.reduce import gram1

    aa, bb, ab = gram1(a, b)
    na, nb = math.sqrt(aa), math.sqrt(bb)
    if not (na > 0 and nb > 0 and math.isfinite(na) and math.isfinite(nb)):
        return None
    cos = min(1.0, max(-1.0, ab / (na * nb)))
    omega = math.acos(cos)
    sin = math.sin(omega)
    if not sin >= PARALLEL:
        return None
    length = (1.0 - alpha) * na + alpha * nb
    ca = math.sin((1.0 - alpha) * omega) / sin * length / na
    cb = math.sin(alpha * omega) / sin * length / nb
    return ca, cb, na, nb
