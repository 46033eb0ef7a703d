"""extract: SuperMerger's "extract" — the part of b − a and c − a they share (or not)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

from pydantic import Field

from mergebuild.engine.methods.base import Method, Params
from mergebuild.sd.blocks import BlockAlpha

if TYPE_CHECKING:
    import torch

EPS = 1e-8  # as torch's cosine_similarity: a norm below it counts as EPS

Unit = Annotated[float, Field(ge=0, le=1)]


class ExtractParams(Params):
    alpha: Unit | BlockAlpha = 0.5  # 0: b's difference, 1: c's
    beta: Unit | BlockAlpha = 0.0  # 0: keep what is shared, 1: keep what differs
    gamma: float = Field(1.0, ge=0, le=1000)  # sharpness of the similarity weighting


class Extract(Method):
    name = "extract"
    slots = ("a", "b", "c")
    Params = ExtractParams
    block_params = ("alpha", "beta")
    elementwise = False
    formula = "a + ((b−a)·(1−α) + (c−a)·α)·lerp(d, 1−d, β), d = ((cos + 1)/2)^γ per row"
    description = """Extract what two fine-tunes of a have in common — or what sets them apart —
and add it to a (SuperMerger's "extract" mode).

With u = b − a and v = c − a (float32), for every row r (along the last dim; a 1-D tensor
is one row): cos_r = ⟨u_r, v_r⟩ / (max(‖u_r‖, 1e-8)·max(‖v_r‖, 1e-8)) clamped to [−1, 1],
d_r = ((cos_r + 1) / 2)^γ and m_r = d_r + β·(1 − 2·d_r) (float64, then rounded to
float32). The result is a + (u·(1−α) + v·α)·m_r in float32.

beta 0 keeps rows where b and c changed a the same way (shared features), beta 1 rows where
they disagree; gamma > 1 sharpens the selection. alpha and beta are in [0, 1] and may be
block weights; gamma ≥ 0 is one number."""
    example = """shared:
  method: extract
  a: sd15
  b: anything
  c: insta
  alpha: 0.5
  beta: 0.0
  gamma: 2.0"""

    @staticmethod
    def compute(params: ExtractParams, xs: list[torch.Tensor]) -> torch.Tensor:
        import numpy as np
        import torch

        from mergebuild.engine.methods.reduce import gram

        a, b, c = xs
        alpha, beta = float(params.alpha), float(params.beta)  # type: ignore[arg-type]
        u = b.to(torch.float32) - a
        v = c.to(torch.float32) - a
        uu, vv, uv = gram(u, v, -1)
        cos = np.clip(uv / (np.maximum(np.sqrt(uu), EPS) * np.maximum(np.sqrt(vv), EPS)), -1, 1)
        d = ((cos + 1.0) / 2.0) ** params.gamma
        m = d + beta * (1.0 - 2.0 * d)
        shape = (*a.shape[:-1], 1) if a.dim() > 0 else ()
        mt = torch.from_numpy(m.astype(np.float32)).reshape(shape).to(a.device)
        mix = u.mul_(1.0 - alpha).add_(v.mul_(alpha))
        return mix.mul_(mt).add_(a)
