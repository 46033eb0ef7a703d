"""Shared pieces of the task-vector methods (δᵢ = modelᵢ − base): parameters, reductions, TIES.

Whole-tensor reductions (dot products, norms) are float64 sums that must not depend on the
torch thread count (-j): torch's parallel reductions split work by thread. Here every
reduction walks the flattened tensor in fixed chunks of REDUCE_CHUNK elements, reduces each
chunk with numpy's pairwise float64 `np.add.reduce` (single-threaded, fixed order for a given
length) and adds the chunk results left to right, so the value is a function of the data only.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import Field

from mergebuild.engine.methods.base import Params, f32
from mergebuild.sd.blocks import BlockAlpha

if TYPE_CHECKING:
    import torch

REDUCE_CHUNK = 1 << 16
Weight = Annotated[float, Field(ge=0)]


class TaskVectorParams(Params):
    """`alpha` scales the merged task vector; `weights` (≥ 0, one per model) default to 1."""

    alpha: float | BlockAlpha = 1.0  # a plain float by the time `compute` sees it
    weights: list[Weight] | None = None


def n_models(n_inputs: int) -> int:
    """base_models methods get xs = [base, m1..mn]: the loader counts the base among inputs."""
    return n_inputs - 1


def weights_error(weights: list[float] | None, n: int) -> str | None:
    if weights is None:
        return None
    if len(weights) != n:
        return f"'weights' has {len(weights)} values for {n} models"
    if not any(w > 0 for w in weights):
        return "'weights' must have at least one value above 0"
    return None


def model_weights(weights: list[float] | None, n: int) -> list[float]:
    return [1.0] * n if weights is None else list(weights)


def delta(xs: list[torch.Tensor], i: int) -> torch.Tensor:
    """A new flat float32 δᵢ = xs[i] − xs[0] (one IEEE subtraction per element)."""
    return f32(xs[i]).reshape(-1).sub_(xs[0].reshape(-1))


def dot64(a: torch.Tensor, b: torch.Tensor) -> float:
    """Σ aⱼ·bⱼ in float64, chunked (see module doc); products of float32 values are exact."""
    import numpy as np
    import torch

    a, b = a.reshape(-1), b.reshape(-1)
    total = 0.0
    for lo in range(0, a.numel(), REDUCE_CHUNK):
        x = a[lo : lo + REDUCE_CHUNK].to(torch.float64).numpy()
        y = b[lo : lo + REDUCE_CHUNK].to(torch.float64).numpy()
        np.multiply(x, y, out=x)
        total += float(np.add.reduce(x))
    return total


def sqnorm64(a: torch.Tensor) -> float:
    return dot64(a, a)


def trim_threshold(absd: torch.Tensor, k: float) -> float | None:
    """sd-mecha's TIES threshold: the j-th smallest |δ| with j = max(⌊(1−k)·numel⌋, 1).

    Elements with |δ| ≥ threshold are kept (ties at the threshold included), so at least
    numel − j + 1 elements survive. None means "keep everything" (k = 1: the threshold would
    be min |δ|). `absd` is overwritten (numpy's in-place introselect: exact and
    deterministic, no index array, no second copy).
    """
    numel = absd.numel()
    j = max(int((1.0 - k) * numel), 1)
    if j == 1 or numel == 0:
        return None
    arr = absd.reshape(-1).numpy()
    arr.partition(j - 1)
    return float(arr[j - 1])


def ties_merge(
    base: torch.Tensor,
    deltas: Callable[[int], torch.Tensor],
    weights: list[float],
    k: float,
    vote: Literal["magnitude", "count"],
    scale: float,
) -> torch.Tensor:
    """base + scale · disjoint weighted mean of trimmed, sign-elected task vectors.

    `deltas(i)` returns a new flat float32 δᵢ (i = 1..n) and is called twice per model (it must
    return the same values). With τᵢ = wᵢ·trim(δᵢ): elected sign s = sign(Σ τᵢ) (magnitude) or
    sign(Σ sign τᵢ) (count); result = Σ_{sign τᵢ = s ≠ 0} τᵢ / Σ_{same i} wᵢ, 0 where none.
    Memory: per-model keep masks (1 byte per element) and a few float32 buffers, whatever n.
    """
    import torch

    shape, numel = base.shape, base.numel()
    keeps: list[torch.Tensor | None] = []
    votes = torch.zeros(numel, dtype=torch.float32)
    for i, w in enumerate(weights, start=1):
        if w == 0:  # contributes to nothing: neither the vote nor the mean
            keeps.append(None)
            continue
        d = deltas(i)
        thr = trim_threshold(d.abs(), k)  # on the unweighted δᵢ
        keep = None if thr is None else torch.ge(d.abs(), thr)
        keeps.append(keep)
        if keep is not None:
            d.masked_fill_(~keep, 0.0)
        if w != 1.0:
            d.mul_(w)
        votes.add_(d if vote == "magnitude" else d.sign_())
    sign = votes.sign_()
    del votes
    num = torch.zeros(numel, dtype=torch.float32)
    den = torch.zeros(numel, dtype=torch.float32)
    for i, (w, keep) in enumerate(zip(weights, keeps, strict=True), start=1):
        if w == 0:
            continue
        d = deltas(i)
        if keep is not None:
            d.masked_fill_(~keep, 0.0)
        if w != 1.0:
            d.mul_(w)
        agree = torch.eq(d.sign(), sign).logical_and_(sign != 0)
        num.add_(d.masked_fill_(~agree, 0.0))
        den.add_(agree.to(torch.float32).mul_(w))
    out = num.div_(den).masked_fill_(den == 0, 0.0)
    out.mul_(scale)
    return out.add_(base.reshape(-1)).reshape(shape)


def gram64(base: torch.Tensor, models: list[torch.Tensor]) -> list[list[float]]:
    """G[i][j] = Σ δᵢ·δⱼ in float64 with δᵢ = float32(modelᵢ − base), chunked (module doc).

    δ is the float32 difference the merge itself uses, so the statistics describe exactly the
    vectors that get added; no full-size copy is made.
    """
    import numpy as np
    import torch

    n = len(models)
    g = [[0.0] * n for _ in range(n)]
    b = base.reshape(-1)
    flat = [m.reshape(-1) for m in models]
    for lo in range(0, b.numel(), REDUCE_CHUNK):
        bc = b[lo : lo + REDUCE_CHUNK]
        ds = [f32(m[lo : lo + REDUCE_CHUNK]).sub_(bc).to(torch.float64).numpy() for m in flat]
        tmp = np.empty_like(ds[0]) if ds else None
        for i in range(n):
            for j in range(i, n):
                np.multiply(ds[i], ds[j], out=tmp)
                g[i][j] += float(np.add.reduce(tmp))
    for i in range(n):
        for j in range(i):
            g[i][j] = g[j][i]
    return g


def dist64(x: torch.Tensor, m: torch.Tensor) -> float:
    """‖x − m‖₂ with the difference and the sum of squares in float64, chunked."""
    import math

    import numpy as np
    import torch

    a, b = x.reshape(-1), m.reshape(-1)
    total = 0.0
    for lo in range(0, a.numel(), REDUCE_CHUNK):
        d = a[lo : lo + REDUCE_CHUNK].to(torch.float64).numpy()
        d -= b[lo : lo + REDUCE_CHUNK].to(torch.float64).numpy()
        np.multiply(d, d, out=d)
        total += float(np.add.reduce(d))
    return math.sqrt(total)
