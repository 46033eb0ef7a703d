"""add_cosine_a: SuperMerger's "cosineA" — keep a's structure where a and b agree, take b's
where they differ, decided column by column from their cosine similarity."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import model_validator

from mergebuild.engine.methods.base import Method, Params, Tiles, f32
from mergebuild.sd.blocks import BlockAlpha

if TYPE_CHECKING:
    import numpy as np
    import torch


class CosineParams(Params):
    alpha: float | BlockAlpha = 0.0
    sim_min: float = 0.0  # similarity mapped to 0 (SuperMerger: the model's 1st percentile)
    sim_max: float = 1.0  # similarity mapped to 1 (SuperMerger: the model's 99th percentile)

    @model_validator(mode="after")
    def _range(self) -> CosineParams:
        if not self.sim_max > self.sim_min:
            raise ValueError(
                f"sim_max ({self.sim_max:g}) must be greater than sim_min ({self.sim_min:g})"
            )
        return self


def column_cosines(
    a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """cos_j over dim 0 for every position j of the other dims (0 where a column is all
    zeros), each column's squared norms in a and b and its ⟨a, b⟩; float64, fixed order.
    a, b: tensors, or float16 numpy arrays (a pass without torch: the same sums)."""
    import numpy as np

    from mergebuild.engine.methods.reduce import column_gram_half, gram

    if isinstance(a, np.ndarray):
        rows = a.shape[0] if a.ndim else 1
        aa, bb, ab = column_gram_half(
            np.ascontiguousarray(a).view(np.uint16).reshape(rows, -1),
            np.ascontiguousarray(b).view(np.uint16).reshape(rows, -1),
        )
    else:
        aa, bb, ab = gram(a, b, 0)
    den = np.sqrt(aa) * np.sqrt(bb)
    with np.errstate(divide="ignore", invalid="ignore"):
        cos = np.where(den > 0, ab / np.where(den > 0, den, 1.0), 0.0)
    return cos, aa, bb, ab


def a_share(combined: np.ndarray, params: CosineParams, alpha: float) -> np.ndarray:
    """k per column (float64): the share of a in the blend, 1 − k b's."""
    import numpy as np

    return np.clip((combined - params.sim_min) / (params.sim_max - params.sim_min) - alpha, 0, 1)


BLEND_TILE = 1 << 18  # elements per block of rows in the blend


def blend(
    a: torch.Tensor, b: torch.Tensor, combined: np.ndarray, params: CosineParams, alpha: float
) -> torch.Tensor:
    """k = clip((s − sim_min)/(sim_max − sim_min) − alpha, 0, 1) per column (float64);
    result = a·f32(k) + b·f32(1 − k) in float32, k broadcast along dim 0."""
    import numpy as np
    import torch

    k = a_share(combined, params, alpha)
    shape = (1, *a.shape[1:]) if a.dim() > 1 else (1,) * a.dim()
    kt = torch.from_numpy(k.astype(np.float32)).reshape(shape).to(a.device)
    rest = torch.from_numpy((1.0 - k).astype(np.float32)).reshape(shape).to(a.device)
    out = torch.empty(a.shape, dtype=torch.float32, device=a.device)
    if a.dim() == 0 or a.shape[0] == 0:
        return out.copy_(a).mul_(kt).add_(b.to(torch.float32) * rest)
    # by blocks of rows (dim 0): the same elementwise ops as on the whole tensor, without its
    # two full-size float32 temporaries
    rows = max(1, BLEND_TILE // max(1, math.prod(a.shape[1:])))
    tmp = torch.empty((min(rows, a.shape[0]), *a.shape[1:]), dtype=torch.float32, device=a.device)
    for lo in range(0, a.shape[0], rows):
        hi = min(a.shape[0], lo + rows)
        part = out[lo:hi].copy_(a[lo:hi]).mul_(kt)
        part.add_(tmp[: hi - lo].copy_(b[lo:hi]).mul_(rest))
    return out


FILL_TILE = 1 << 16  # elements per tile of blend_tiles: its float32 buffers stay in L2


def blend_tiles(
    a: torch.Tensor, b: torch.Tensor, combined: np.ndarray, params: CosineParams, alpha: float
) -> Tiles | None:
    """`blend` as Tiles of whole rows (dim 0): the same k, the same ops on each element, cast
    into the output tile by tile (None where `blend` is used as is: 0-d, empty, not CPU)."""
    import numpy as np
    import torch

    from mergebuild.engine.methods.reduce import half_bits, loops_for

    if a.dim() == 0 or a.numel() == 0 or a.device.type != "cpu":
        return None
    k = a_share(combined, params, alpha)
    cols = math.prod(a.shape[1:])
    kt = torch.from_numpy(k.astype(np.float32)).reshape(1, cols)
    rest = torch.from_numpy((1.0 - k).astype(np.float32)).reshape(1, cols)
    a2, b2 = a.reshape(a.shape[0], cols), b.reshape(a.shape[0], cols)
    rows = max(1, FILL_TILE // cols)
    size = min(rows, a.shape[0])
    part, tmp, res = (torch.empty((size, cols), dtype=torch.float32) for _ in range(3))
    loops = loops_for(a)
    ka, kb = kt.reshape(-1).numpy(), rest.reshape(-1).numpy()

    def fill(lo: int, hi: int) -> torch.Tensor:
        r0, r1 = lo // cols, hi // cols
        if loops is not None:  # the same two products and sum as one compiled loop
            x, y, p = part[: r1 - r0], tmp[: r1 - r0], res[: r1 - r0]
            x.copy_(a2[r0:r1])
            y.copy_(b2[r0:r1])
            loops.blend_rows(x.numpy(), y.numpy(), ka, kb, p.numpy())
            return p.reshape(-1)
        p = part[: r1 - r0].copy_(a2[r0:r1]).mul_(kt)
        return p.add_(tmp[: r1 - r0].copy_(b2[r0:r1]).mul_(rest)).reshape(-1)

    ha, hb = half_bits(a2), half_bits(b2)
    half = None
    if loops is not None and ha is not None and hb is not None:
        half = _blend_half(loops, ha, hb, ka, kb)
    return Tiles(rows * cols, tuple(a.shape), fill, fill_half=half)


def _blend_half(
    loops: Any, ha: np.ndarray, hb: np.ndarray, ka: np.ndarray, kb: np.ndarray
) -> Callable[[int, int, np.ndarray], bool]:
    """Tiles.fill_half of the blend: float16 a, b as bits (rows × cols), whole rows a tile."""
    cols = ha.shape[1]

    def fill_half(lo: int, hi: int, out: np.ndarray) -> bool:
        r0, r1 = lo // cols, hi // cols
        return bool(loops.blend_rows(ha[r0:r1], hb[r0:r1], ka, kb, out.reshape(r1 - r0, cols)))

    return fill_half


def blend_tiles_half(
    a: np.ndarray, b: np.ndarray, combined: np.ndarray, params: CosineParams, alpha: float
) -> Tiles | None:
    """`blend_tiles` of float16 numpy arrays, float16 tiles only (fill_half; `fill` says
    start over): a pass without torch. None where the compiled loops do not load."""
    import numpy as np

    from mergebuild.engine.methods.reduce import loops_for_size

    loops = loops_for_size(a.size)
    if loops is None:
        return None
    k = a_share(combined, params, alpha)
    cols = math.prod(a.shape[1:])
    ka, kb = k.astype(np.float32).reshape(-1), (1.0 - k).astype(np.float32).reshape(-1)
    ha = np.ascontiguousarray(a).view(np.uint16).reshape(a.shape[0], cols)
    hb = np.ascontiguousarray(b).view(np.uint16).reshape(a.shape[0], cols)
    rows = max(1, FILL_TILE // cols)
    half = _blend_half(loops, ha, hb, ka, kb)
    return Tiles(rows * cols, tuple(a.shape), lambda lo, hi: None, fill_half=half)


class CosineBlend(Method):
    """The blend both cosine methods share; each subclass says how it measures similarity
    (its `similarity(params, xs)` → (combined similarity per column, alpha))."""

    compiled_loops = True

    similarity: ClassVar[Callable[[CosineParams, list[torch.Tensor]], tuple[np.ndarray, float]]]

    @classmethod
    def split(cls, params: CosineParams, xs: list[torch.Tensor], ctx: object) -> Tiles | None:
        if xs[0].dim() == 0 or xs[0].numel() == 0 or xs[0].device.type != "cpu":
            return None
        combined, alpha = cls.similarity(params, xs)
        return blend_tiles(xs[0], xs[1], combined, params, alpha)

    @classmethod
    def split_half(cls, params: CosineParams, xs: list[np.ndarray], ctx: object) -> Tiles | None:
        if xs[0].ndim == 0 or xs[0].size == 0:
            return None
        combined, alpha = cls.similarity(params, xs)  # type: ignore[arg-type]
        return blend_tiles_half(xs[0], xs[1], combined, params, alpha)

    @classmethod
    def compute(cls, params: CosineParams, xs: list[torch.Tensor]) -> torch.Tensor:
        if xs[0].numel() == 0:  # no columns to measure (a (0, n) shape cannot be split in rows)
            return f32(xs[0])
        combined, alpha = cls.similarity(params, xs)
        return blend(*xs, combined, params, alpha)


class AddCosineA(CosineBlend):
    name = "add_cosine_a"
    slots = ("a", "b")
    Params = CosineParams
    block_params = ("alpha",)
    elementwise = False
    formula = "a·k + b·(1−k), k = clip(norm((cosⱼ + mean cos)/2) − |α|, 0, 1) per column j"
    description = """Favour a's structure with details from b (SuperMerger's "cosineA").

For each column j (a position of every dim but the first), cosⱼ is the cosine similarity of
a and b along dim 0 (0 for an all-zero column); s = (cosⱼ + mean of cos over non-zero
columns) / 2 — SuperMerger's "combined similarity" of the column-normalised tensors. Then
k = clip((s − sim_min) / (sim_max − sim_min) − |alpha|, 0, 1) and the result is
a·k + b·(1 − k): where a and b agree, a is kept; the more they differ, the more of b.
Sums are float64 in a fixed order, the blend float32.

Difference from SuperMerger: it normalises s by the 1st/99th percentiles of all keys'
similarities (a pass over the whole model before merging); mergebuild streams one key at a
time, so that range is given as sim_min / sim_max (default 0..1, which is sd-mecha's
add_cosine_a). SuperMerger also leaves VAE keys alone: use an output's options for that.
alpha may be block weights."""
    example = """cos_a:
  method: add_cosine_a
  a: anything
  b: insta
  alpha: 0.0
  sim_min: 0.9"""

    @staticmethod
    def similarity(params: CosineParams, xs: list[torch.Tensor]) -> tuple[np.ndarray, float]:
        """(combined similarity per column, |alpha|): the whole-tensor statistics."""
        import numpy as np

        a, b = xs
        cos, aa, bb, _ = column_cosines(a, b)
        na, nb = np.count_nonzero(aa > 0), np.count_nonzero(bb > 0)
        mean = float(np.add.reduce(cos)) / np.sqrt(na * nb) if na and nb else 0.0
        return (cos + mean) / 2.0, abs(float(params.alpha))  # type: ignore[arg-type]
