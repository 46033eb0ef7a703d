"""add_perpendicular: add only the part of (b − c) that is orthogonal to (a − c)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from mergebuild.engine.methods._taskvec import TILE, gram64
from mergebuild.engine.methods.base import Method, Params, f32
from mergebuild.sd.blocks import BlockAlpha

if TYPE_CHECKING:
    import torch


class AddPerpendicularParams(Params):
    alpha: float | BlockAlpha = 1.0  # a plain float by the time `compute` sees it


class AddPerpendicular(Method):
    name = "add_perpendicular"
    slots = ("a", "b", "c")
    elementwise = False
    Params = AddPerpendicularParams
    block_params = ("alpha",)
    formula = "a + α·((b − c) − proj_(a − c)(b − c))"
    description = """Add what b learned from c without repeating what a already learned from c.

With Δa = a − c and Δb = b − c (float32 differences), per tensor:
out = a + alpha · (Δb − Δa · ⟨Δa, Δb⟩ / ⟨Δa, Δa⟩). The dot products are float64 sums in a fixed
chunked order (independent of -j). When Δa is zero (a == c for that tensor) the projection is
zero and the result is plain add_difference a + alpha·(b − c) (sd-mecha returns a there).
Parameters: alpha (default 1, may vary by block). Whole-tensor."""
    example = """merged:
  method: add_perpendicular
  a: anime
  b: photo
  c: sd15
  alpha: 1.0"""

    @staticmethod
    def compute(params: AddPerpendicularParams, xs: list[torch.Tensor]) -> torch.Tensor:
        import torch

        assert isinstance(params.alpha, float | int)
        a, b, c = xs
        if params.alpha == 0:
            return f32(a)
        g = gram64(c, [a, b])
        coef = g[0][1] / g[0][0] if g[0][0] > 0 else 0.0
        out = torch.empty(a.numel(), dtype=torch.float32)
        fa, fb, fc = a.reshape(-1), b.reshape(-1), c.reshape(-1)
        for lo in range(0, a.numel(), TILE):  # tiles: no full-size temporaries
            hi = min(a.numel(), lo + TILE)
            db = f32(fb[lo:hi]).sub_(fc[lo:hi])
            if coef != 0.0:
                db.sub_(f32(fa[lo:hi]).sub_(fc[lo:hi]).mul_(coef))
            out[lo:hi] = db.mul_(float(params.alpha)).add_(fa[lo:hi])
        return out.reshape(a.shape)
