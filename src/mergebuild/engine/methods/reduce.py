"""Whole-tensor sums in float64 with a fixed summation order.

Why not `torch.sum`: its split of the work across threads (and its vectorisation) may differ
with the thread count or device, so the last bits of a norm could depend on `-j`. Here every
sum runs in numpy float64 over fixed blocks of rows, each block summed by `np.add.reduce`
(pairwise, deterministic for a given array), the block results added in order: the same
tensor gives the same bits on every run, whatever the chunking or thread count.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

BLOCK = 1 << 16  # elements converted to float64 at a time: bounded temporaries


def _f64(x: torch.Tensor) -> np.ndarray:
    import torch

    return x.to(torch.float64).cpu().numpy()  # a GPU tensor too: the sums stay on the CPU


class Widen:
    """float64 copies of CPU blocks into buffers reused block after block.

    Why: `x.to(float64)` costs ~2.6 ns per element from float16 (torch's direct half → double
    conversion is not vectorised) plus a fresh allocation per block; through float32 it is
    ~0.6 ns. Both conversions are exact, so the float64 values, and every sum, are the same.
    """

    def __init__(self, size: int, count: int = 2) -> None:
        import torch

        self.f32 = torch.empty(size, dtype=torch.float32)
        self.f64 = [torch.empty(size, dtype=torch.float64) for _ in range(count)]
        self.prod = np.empty(size, dtype=np.float64)

    def __call__(self, which: int, x: torch.Tensor) -> np.ndarray:
        """x (flat, CPU, at most `size` elements) as float64, in buffer `which` (< count)."""
        import torch

        n = x.numel()
        out = self.f64[which][:n]
        if x.dtype in (torch.float16, torch.bfloat16):
            out.copy_(self.f32[:n].copy_(x))
        else:
            out.copy_(x)
        return out.numpy()


def _rows(x: torch.Tensor, axis: int | None) -> torch.Tensor:
    """`x` as 2-D (rows, cols): the reduction runs over cols (axis -1 / None) or rows (0)."""
    if axis is None:
        return x.reshape(1, -1)
    if x.dim() <= 1:
        return x.reshape(-1, 1) if axis == 0 else x.reshape(1, -1)
    if axis == 0:
        return x.reshape(x.shape[0], -1)
    return x.reshape(-1, x.shape[-1])


class Products:
    """Σ-ready float64 products x·x, y·y, x·y of CPU blocks, one at a time in reused buffers.

    Why: the float64 products of two float16 values are exact, and so are their float32
    products (11-bit significands give at most 22 bits; the smallest, 2⁻⁴⁸, is a normal
    float32). For float16 inputs the products are taken in float32 (half the bytes through
    the cache) and widened after: the same float64 values as widening first, so every sum
    keeps its bits, ~20% faster. Other dtypes are widened first (bfloat16 products can
    overflow or underflow float32)."""

    def __init__(self, size: int) -> None:
        import torch

        self.widen = Widen(size)
        self.h32 = [torch.empty(size, dtype=torch.float32) for _ in range(3)]

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> Iterator[np.ndarray]:
        """x·x, y·y, x·y of flat CPU blocks of at most `size` elements, each valid until the
        next is asked for."""
        import torch

        n = x.numel()
        if x.dtype == torch.float16 and y.dtype == torch.float16:
            a, b, p = (t[:n] for t in self.h32)
            a.copy_(x)
            b.copy_(y)
            out = self.widen.f64[0][:n]
            for u, v in ((a, a), (b, b), (a, b)):
                yield out.copy_(torch.mul(u, v, out=p)).numpy()
            return
        a64, b64 = self.widen(0, x), self.widen(1, y)
        prod = self.widen.prod[:n]
        for u, v in ((a64, a64), (b64, b64), (a64, b64)):
            yield np.multiply(u, v, out=prod)


def gram(
    x: torch.Tensor, y: torch.Tensor, axis: int | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(Σ x·x, Σ y·y, Σ x·y) in float64, each block of x and y converted once: over
    everything (axis None: 1-element arrays), over dim 0 (one value per position of the other
    dims) or over the last dim (one value per row)."""
    xr, yr = _rows(x, axis), _rows(y, axis)
    n_rows, n_cols = xr.shape
    if axis is None:
        hx, hy = half_bits(xr), half_bits(yr)
        if hx is not None and hy is not None:  # the way a pass on numpy arrays sums them
            return tuple(np.array([v]) for v in gram1_half(hx.reshape(-1), hy.reshape(-1)))  # type: ignore[return-value]

    def three(a: np.ndarray, b: np.ndarray, ax: int | None) -> tuple[Any, Any, Any]:
        return (
            np.add.reduce(a * a, axis=ax),
            np.add.reduce(b * b, axis=ax),
            np.add.reduce(a * b, axis=ax),
        )

    if axis == 0:  # sum over rows: blocks of whole rows, added in row order
        acc = [np.zeros(n_cols, dtype=np.float64) for _ in range(3)]
        step = max(1, BLOCK // max(n_cols, 1))
        if xr.device.type != "cpu" or yr.device.type != "cpu" or n_rows * n_cols == 0:
            for lo in range(0, n_rows, step):
                for i, v in enumerate(three(_f64(xr[lo : lo + step]), _f64(yr[lo : lo + step]), 0)):
                    acc[i] += v
            return acc[0], acc[1], acc[2]
        hx, hy = half_bits(xr), half_bits(yr)
        if hx is not None and hy is not None:  # the way a pass on numpy arrays sums them
            return column_gram_half(hx, hy)
        if n_cols > 1 and compiled_ok(xr, yr):  # one column: numpy sums it pairwise
            _column_sums(xr, yr, step, acc)
            return acc[0], acc[1], acc[2]
        products = Products(min(step, n_rows) * n_cols)
        for lo in range(0, n_rows, step):
            rows = min(step, n_rows - lo)
            xs, ys = xr[lo : lo + rows].reshape(-1), yr[lo : lo + rows].reshape(-1)
            # the same products and np.add.reduce over rows as three(), in reused buffers
            for i, p in enumerate(products(xs, ys)):
                acc[i] += np.add.reduce(p.reshape(rows, n_cols), axis=0)
        return acc[0], acc[1], acc[2]
    out = [np.zeros(n_rows, dtype=np.float64) for _ in range(3)]
    if n_cols <= BLOCK:  # many short rows: each summed pairwise
        step = max(1, BLOCK // max(n_cols, 1))
        for lo in range(0, n_rows, step):
            for i, v in enumerate(three(_f64(xr[lo : lo + step]), _f64(yr[lo : lo + step]), 1)):
                out[i][lo : lo + step] = v
        return out[0], out[1], out[2]
    products = Products(BLOCK) if xr.device.type == "cpu" and yr.device.type == "cpu" else None
    compiled = compiled_ok(xr, yr)
    for r in range(n_rows):  # long rows (a whole tensor): blocks summed in order
        total = [0.0, 0.0, 0.0]
        start = _block_sums(xr[r], yr[r], total) if compiled else 0
        for lo in range(start, n_cols, BLOCK):
            if products is None:
                a, b = _f64(xr[r, lo : lo + BLOCK]), _f64(yr[r, lo : lo + BLOCK])
                for i, v in enumerate(three(a, b, None)):
                    total[i] += float(v)
                continue
            # the same products and the same np.add.reduce of each block, in reused buffers
            for i, p in enumerate(products(xr[r, lo : lo + BLOCK], yr[r, lo : lo + BLOCK])):
                total[i] += float(np.add.reduce(p))
        for i in range(3):
            out[i][r] = total[i]
    return out[0], out[1], out[2]


def column_gram_half(hx: np.ndarray, hy: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`gram(x, y, 0)` of float16 x, y given as their bits (uint16, 2-D rows × cols, C order),
    without torch: the same sums in the same order, so the same bits either way.

    Why a path of its own: a float16 pass on numpy arrays (arrays.py) computes the cosine
    methods' statistics from the bytes it read, and a float16 tensor comes here as its bits."""
    n_rows, n_cols = hx.shape
    acc = np.zeros((3, n_cols))
    step = max(1, BLOCK // max(n_cols, 1))
    loops = loops_for_size(hx.size) if n_cols > 1 else None  # one column: numpy's pairwise
    if loops is not None:
        loops.column_sums(hx, hy, step, acc)
        return acc[0], acc[1], acc[2]
    # float32 products of float16 values are exact (see Products), widened, summed by numpy
    for lo in range(0, n_rows, step):
        rows = min(step, n_rows - lo)
        x = hx[lo : lo + rows].view(np.float16).astype(np.float32)
        y = hy[lo : lo + rows].view(np.float16).astype(np.float32)
        for i, (u, v) in enumerate(((x, x), (y, y), (x, y))):
            acc[i] += np.add.reduce(np.multiply(u, v).astype(np.float64), axis=0)
    return acc[0], acc[1], acc[2]


def gram1(x: torch.Tensor | np.ndarray, y: torch.Tensor | np.ndarray) -> tuple[float, float, float]:
    """(‖x‖², ‖y‖², ⟨x, y⟩) over the whole tensors (or float16 numpy arrays: gram1_half)."""
    if isinstance(x, np.ndarray):
        return gram1_half(
            np.ascontiguousarray(x).view(np.uint16).reshape(-1),
            np.ascontiguousarray(y).view(np.uint16).reshape(-1),
        )
    xx, yy, xy = gram(x, y)
    return float(xx[0]), float(yy[0]), float(xy[0])


def gram1_half(hx: np.ndarray, hy: np.ndarray) -> tuple[float, float, float]:
    """`gram1` of float16 x, y given as their flat bits, without torch: `gram`'s sums in its
    order (one row of at most BLOCK elements summed pairwise; a longer one as whole BLOCKs
    through the compiled loop, then the partial last block), so the same bits either way."""
    n = hx.size
    if n <= BLOCK:
        x = hx.view(np.float16).astype(np.float64).reshape(1, n)
        y = hy.view(np.float16).astype(np.float64).reshape(1, n)
        sums = (np.add.reduce(u * v, axis=1) for u, v in ((x, x), (y, y), (x, y)))
        return tuple(float(v[0]) for v in sums)  # type: ignore[return-value]
    total = [0.0, 0.0, 0.0]
    loops = loops_for_size(n)
    start = 0
    if loops is not None:  # _block_sums: whole BLOCKs, SUPER of them per call
        start = n // BLOCK * BLOCK
        out = np.empty((3, SUPER))
        fx, fy = (np.empty(min(start, SUPER * BLOCK), dtype=np.float32) for _ in range(2))
        for lo in range(0, start, SUPER * BLOCK):
            hi = min(start, lo + SUPER * BLOCK)
            loops.widen_half(hx[lo:hi], fx[: hi - lo])  # as AsNumpy's float32 buffers
            loops.widen_half(hy[lo:hi], fy[: hi - lo])
            loops.block_sums(fx[: hi - lo], fy[: hi - lo], out)
            for b in range((hi - lo) // BLOCK):
                for i in range(3):
                    total[i] += float(out[i, b])
    for lo in range(start, n, BLOCK):  # Products: exact float32 products, widened, summed
        x = hx[lo : lo + BLOCK].view(np.float16).astype(np.float32)
        y = hy[lo : lo + BLOCK].view(np.float16).astype(np.float32)
        for i, (u, v) in enumerate(((x, x), (y, y), (x, y))):
            total[i] += float(np.add.reduce(np.multiply(u, v).astype(np.float64)))
    return total[0], total[1], total[2]


# -- the same sums through the compiled loops of _kernels.py (same bits, GIL released) --------

SUPER = 4  # BLOCKs per compiled call: fewer calls, and float32 buffers of 1 MB each
# Smaller tensors keep the numpy path: loading numba and its cached loops costs ~1 s once per
# process, which only tensors of millions of elements (a full-size model's) earn back.
COMPILED_MIN = 1 << 20
# Once loaded (a big tensor asked for them), smaller tensors use the loops too: the same bits,
# and their many numpy calls per tile cost 2-4x the loop's time. Tests turn it off to hold
# the numpy path to the loops.
ONCE_LOADED = True


_loaded: list[Any] = []  # [the _kernels module] once loaded, [None] if it cannot be
_load_lock = threading.Lock()  # a worker may ask while the pass's early load is under way
# what loading them adds to the process (measured: numba's import 115 MB, the loops 52 MB)
KERNELS_BYTES = 176 << 20


def kernels_memory() -> int:
    """Bytes the compiled loops hold once loaded (0 before): `--max-memory` counts them."""
    return KERNELS_BYTES if _loaded and _loaded[0] is not None else 0


def kernels() -> Any | None:
    """The compiled loops (_kernels.py), every one compiled or loaded from numba's cache, or
    None if that fails here (numba missing or broken, no writable cache directory, a full
    disk): a warning, and the numpy/torch code runs instead, with the same results. The load
    happens inside this guard, so no build can fail half-way because of it."""
    with _load_lock:
        return _load()


def _load() -> Any | None:
    if not _loaded:
        try:
            from mergebuild.engine.methods import _kernels

            _kernels.warm()
            _loaded.append(_kernels)
        except Exception as e:  # any failure: the fallback gives the same results
            import warnings

            first = str(e).strip().splitlines()[:1]
            why = f"{type(e).__name__}: {first[0]}" if first else type(e).__name__
            warnings.warn(
                f"compiled loops unavailable ({why}); using numpy and torch instead: the same "
                "results, slower",
                stacklevel=2,
            )
            _loaded.append(None)
    return _loaded[0]


def loops_for(x: torch.Tensor, minimum: int | None = None) -> Any | None:
    """The compiled loops for work on `x`, a CPU tensor: loaded if it has at least `minimum`
    elements (default COMPILED_MIN), else only if they already are (ONCE_LOADED); None where
    they do not load (the numpy/torch path)."""
    if x.device.type != "cpu":
        return None
    return loops_for_size(x.numel(), minimum)


def loops_for_size(n: int, minimum: int | None = None) -> Any | None:
    """`loops_for` for work on `n` elements already in host memory (numpy arrays)."""
    if n >= (COMPILED_MIN if minimum is None else minimum):
        return kernels()
    return _loaded[0] if ONCE_LOADED and _loaded else None


def compiled_ok(*xs: torch.Tensor) -> bool:
    """Large CPU tensors of dtypes whose products are exact in float64 (float16, bfloat16,
    float32), and the compiled loops available: there they give the numpy path's bits (see
    _kernels.py)."""
    import torch

    exact = (torch.float16, torch.bfloat16, torch.float32)
    return all(x.dtype in exact for x in xs) and all(loops_for(x) is not None for x in xs)


def half_bits(x: torch.Tensor | np.ndarray) -> np.ndarray | None:
    """A contiguous float16 CPU tensor's (or numpy array's) bits as a uint16 numpy view (what
    the compiled loops take for float16, _kernels.py), else None."""
    import numpy as np

    if isinstance(x, np.ndarray):
        return x.view(np.uint16) if x.dtype == np.float16 and x.flags.c_contiguous else None
    import torch

    if x.dtype != torch.float16 or x.device.type != "cpu" or not x.is_contiguous():
        return None
    return x.view(torch.uint16).numpy()


class AsNumpy:
    """x as numpy by pieces: 16-bit floats widened (exactly) to float32 in a buffer reused from
    piece to piece, other dtypes as views."""

    def __init__(self, x: torch.Tensor, size: int) -> None:
        import torch

        self.x = x
        wide = x.dtype in (torch.float16, torch.bfloat16)
        self.buf = torch.empty(size, dtype=torch.float32) if wide else None

    def __call__(self, lo: int, hi: int) -> np.ndarray:
        part = self.x[lo:hi]
        if self.buf is None:
            return part.contiguous().numpy()
        return self.buf[: hi - lo].copy_(part).numpy()


def _block_sums(x: torch.Tensor, y: torch.Tensor, total: list[float]) -> int:
    """Adds the sums of x's and y's whole BLOCKs (flat) to `total` in block order, as the
    numpy path would; returns where the partial last block starts (left to that path)."""
    block_sums = kernels().block_sums  # type: ignore[union-attr]  # compiled_ok said so

    full = x.numel() // BLOCK * BLOCK
    step = SUPER * BLOCK
    fx, fy = AsNumpy(x, min(full, step)), AsNumpy(y, min(full, step))
    out = np.empty((3, SUPER))
    for lo in range(0, full, step):
        hi = min(full, lo + step)
        n = (hi - lo) // BLOCK
        block_sums(fx(lo, hi), fy(lo, hi), out)  # the whole `out`: the signature warm() made
        for b in range(n):
            for i in range(3):
                total[i] += float(out[i, b])
    return full


def _column_sums(x: torch.Tensor, y: torch.Tensor, step: int, acc: list[np.ndarray]) -> None:
    """acc += the per-column sums of 2-D x and y, blocks of `step` rows (the numpy path's
    order); a few blocks per compiled call. (float16 goes to column_gram_half instead.)"""
    column_sums = kernels().column_sums  # type: ignore[union-attr]  # compiled_ok said so

    n_rows, n_cols = x.shape
    both = np.stack(acc)
    rows = max(step, SUPER * BLOCK // max(n_cols, 1) // step * step)  # whole blocks per call
    size = min(rows, n_rows) * n_cols
    fx, fy = AsNumpy(x.reshape(-1), size), AsNumpy(y.reshape(-1), size)
    for lo in range(0, n_rows, rows):
        hi = min(n_rows, lo + rows)
        a = fx(lo * n_cols, hi * n_cols).reshape(hi - lo, n_cols)
        b = fy(lo * n_cols, hi * n_cols).reshape(hi - lo, n_cols)
        column_sums(a, b, step, both)
    for i in range(3):
        acc[i][:] = both[i]
