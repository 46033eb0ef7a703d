"""smooth_add: SuperMerger's "smoothAdd" — add b − c after a median and a gaussian filter."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field

from mergebuild.engine.methods.base import Method, Params, f32
from mergebuild.sd.blocks import BlockAlpha

if TYPE_CHECKING:
    import torch


class SmoothAddParams(Params):
    alpha: float | BlockAlpha = 1.0
    size: int = Field(3, ge=1, le=7)  # median window per dim
    sigma: float = Field(1.0, ge=0, le=8)  # gaussian standard deviation, in elements


class SmoothAdd(Method):
    name = "smooth_add"
    slots = ("a", "b", "c")
    Params = SmoothAddParams
    block_params = ("alpha",)
    elementwise = False
    formula = "a + α·gaussian_σ(median_size(b − c))"
    description = """Add difference with the difference smoothed first (SuperMerger's "smoothAdd"):
d = b − c in float32, then scipy.ndimage.median_filter(d, size) over every dimension, then
gaussian_filter(…, sigma) (both with 'reflect' edges, the defaults SuperMerger uses: size 3,
sigma 1), result a + α·smoothed in float32.

Smoothing removes isolated spikes from the transplanted difference; it needs the whole
tensor (neighbours along every dim). scipy's filters are single-threaded and run in a fixed
order, so results do not depend on -j. SuperMerger subtracts b − c in the models' own dtype
(fp16) before filtering; mergebuild subtracts in float32. alpha may be block weights;
alpha 0 gives exactly a."""
    example = """smooth:
  method: smooth_add
  a: anything
  b: nai_full
  c: sd15
  alpha: 0.5"""

    @staticmethod
    def compute(params: SmoothAddParams, xs: list[torch.Tensor]) -> torch.Tensor:
        import numpy as np
        import torch
        from scipy import ndimage

        a, b, c = xs
        alpha = float(params.alpha)  # type: ignore[arg-type]
        if alpha == 0:
            return f32(a)
        d = f32(b).sub_(c).cpu().numpy()
        if d.ndim == 0:
            d = d.reshape(1)
        d = ndimage.median_filter(d, size=params.size, mode="reflect")
        if params.sigma > 0:
            d = ndimage.gaussian_filter(d, sigma=params.sigma, mode="reflect")
        s = torch.from_numpy(np.ascontiguousarray(d, dtype=np.float32)).reshape(a.shape)
        s = s.to(a.device)
        return s.mul_(alpha).add_(a)
