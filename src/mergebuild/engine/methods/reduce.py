"""Whole-tensor sums in float64 with a fixed summation order.

Why not `torch.sum`: its split of the work across threads (and its vectorisation) may differ
with the thread count or device, so the last bits of a norm could depend on `-j`. Here every
sum runs in numpy float64 over fixed blocks of rows, each block summed by `np.add.reduce`
(pairwise, deterministic for a given array), the block results added in order: the same
tensor gives the same bits on every run, whatever the chunking or thread count.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

BLOCK = 1 << 16  # elements converted to float64 at a time: bounded temporaries


def _f64(x: torch.Tensor) -> np.ndarray:
    import torch

    return x.to(torch.float64).cpu().numpy()  # a GPU tensor too: the sums stay on the CPU


def _rows(x: torch.Tensor, axis: int | None) -> torch.Tensor:
    """`x` as 2-D (rows, cols): the reduction runs over cols (axis -1 / None) or rows (0)."""
    if axis is None:
        return x.reshape(1, -1)
    if x.dim() <= 1:
        return x.reshape(-1, 1) if axis == 0 else x.reshape(1, -1)
    if axis == 0:
        return x.reshape(x.shape[0], -1)
    return x.reshape(-1, x.shape[-1])


def gram(
    x: torch.Tensor, y: torch.Tensor, axis: int | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(Σ x·x, Σ y·y, Σ x·y) in float64, each block of x and y converted once: over
    everything (axis None: 1-element arrays), over dim 0 (one value per position of the other
    dims) or over the last dim (one value per row)."""
    xr, yr = _rows(x, axis), _rows(y, axis)
    n_rows, n_cols = xr.shape

    def three(a: np.ndarray, b: np.ndarray, ax: int | None) -> tuple[Any, Any, Any]:
        return (
            np.add.reduce(a * a, axis=ax),
            np.add.reduce(b * b, axis=ax),
            np.add.reduce(a * b, axis=ax),
        )

    if axis == 0:  # sum over rows: blocks of whole rows, added in row order
        acc = [np.zeros(n_cols, dtype=np.float64) for _ in range(3)]
        step = max(1, BLOCK // max(n_cols, 1))
        for lo in range(0, n_rows, step):
            for i, v in enumerate(three(_f64(xr[lo : lo + step]), _f64(yr[lo : lo + step]), 0)):
                acc[i] += v
        return acc[0], acc[1], acc[2]
    out = [np.zeros(n_rows, dtype=np.float64) for _ in range(3)]
    if n_cols <= BLOCK:  # many short rows: each summed pairwise
        step = max(1, BLOCK // max(n_cols, 1))
        for lo in range(0, n_rows, step):
            for i, v in enumerate(three(_f64(xr[lo : lo + step]), _f64(yr[lo : lo + step]), 1)):
                out[i][lo : lo + step] = v
        return out[0], out[1], out[2]
    for r in range(n_rows):  # long rows (a whole tensor): blocks summed in order
        total = [0.0, 0.0, 0.0]
        for lo in range(0, n_cols, BLOCK):
            a, b = _f64(xr[r, lo : lo + BLOCK]), _f64(yr[r, lo : lo + BLOCK])
            for i, v in enumerate(three(a, b, None)):
                total[i] += float(v)
        for i in range(3):
            out[i][r] = total[i]
    return out[0], out[1], out[2]


def gram1(x: torch.Tensor, y: torch.Tensor) -> tuple[float, float, float]:
    """(‖x‖², ‖y‖², ⟨x, y⟩) over the whole tensors."""
    xx, yy, xy = gram(x, y)
    return float(xx[0]), float(yy[0]), float(xy[0])
