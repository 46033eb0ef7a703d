"""The exact j-th smallest |x| of a tensor given tile by tile, without holding |x| whole.

Why: TIES' trim threshold is an order statistic of |δᵢ| over the whole tensor; a full-size
|δᵢ| buffer plus numpy's introselect cost 4 bytes per element (250 MB on SDXL's largest key)
and ~7 ns per element. Here the float32 bit patterns of |x| are compared as unsigned integers
(for non-negative floats, and NaN after them as numpy sorts it, they order like the values):

1. a deterministic sample (every s-th element, or evenly spread blocks) gives a window
   [L, H] of bit patterns that very likely holds rank j;
2. one chunked pass counts the elements below L and keeps the few inside [L, H] (one pass
   for several tensors of a key: the TIES task vectors share the base's tiles);
3. if rank j falls inside the window, numpy's introselect on those candidates gives it.
   Otherwise (an unlucky sample, or a window too crowded to keep) an exact radix select runs:
   a histogram of the top 16 bits, then of the low 16 bits within the chosen bin.

Every path returns the exact order statistic, so the result never depends on the sample: it
equals `np.partition(|x|, j - 1)[j - 1]` bit for bit. Memory: a few tiles and the candidates.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

TILE = 1 << 17  # elements per tile of the passes: the temporaries stay in L2
BINS = 1 << 16
SAMPLE_BLOCKS, SAMPLE_BLOCK = 64, 512

# fill(lo, hi, out) writes x[lo:hi] into the float32 view `out` (len hi − lo) and returns it
Fill = Callable[[int, int, "torch.Tensor"], "torch.Tensor"]
# sample(step): a new float32 tensor x[::step], the same values `fill` gives at those places
Sample = Callable[[int], "torch.Tensor"]
# count(low, high, size): the window pass over the whole tensor in one call (a compiled loop):
# (how many |x| bit patterns are below low, how many lie in [low, high], the first `size` of
# those in order), the same numbers the tiles of `fill` give
Count = Callable[[int, int, int], "tuple[int, int, np.ndarray]"]


def kth_smallest_abs(
    fill: Fill, numel: int, j: int, buf: torch.Tensor, sample: Sample | None = None
) -> float:
    """The j-th smallest |x| (1 ≤ j ≤ numel) of the tensor `fill` produces tile by tile.

    `buf` is a float32 scratch tensor of at least min(numel, TILE) elements. A tensor that
    fits in one tile is selected directly (numpy's introselect, one fill). `sample(step)`, if
    given, returns x[::step] (a cheap, evenly spread sample); else blocks of `fill` are used.
    """
    return kth_smallest_abs_many([fill], numel, [j], buf, [sample])[0]


def kth_smallest_abs_many(
    fills: Sequence[Fill],
    numel: int,
    js: Sequence[int],
    buf: torch.Tensor,
    samples: Sequence[Sample | None] | None = None,
    counts: Sequence[Count | None] | None = None,
) -> list[float]:
    """`kth_smallest_abs` of several tensors of one size (rank js[m] of fills[m]), each exact.

    Why: TIES trims every task vector δₘ = xₘ − base of a key. One pass over the tiles for all
    of them, tile by tile, converts the base tile once for all models (TileDeltas caches it)
    and reads each input tile while the others are still in cache. A tensor with a `counts[m]`
    makes its window pass in that one call instead of tiles."""
    for j in js:
        if not 1 <= j <= numel:
            raise ValueError(f"rank {j} outside 1..{numel}")
    if numel <= TILE:
        out = []
        for f, j in zip(fills, js, strict=True):
            arr = f(0, numel, buf[:numel]).abs_().numpy()
            arr.partition(j - 1)
            out.append(float(arr[j - 1]))
        return out
    windows = [
        _window(_sample(f, numel, buf, None if samples is None else samples[m]), j / numel)
        for m, (f, j) in enumerate(zip(fills, js, strict=True))
    ]
    found = _in_windows(fills, numel, js, buf, windows, counts)
    out = []
    for f, j, bits in zip(fills, js, found, strict=True):
        b = bits if bits is not None else _radix(f, numel, j, buf)
        out.append(float(np.array([b], dtype=np.uint32).view(np.float32)[0]))
    return out


def _sample(fill: Fill, numel: int, buf: torch.Tensor, sample: Sample | None) -> np.ndarray:
    """Bit patterns of |x| at about numel/128 evenly spread places (32 Ki to 256 Ki of them).

    The size trades the sample's introselect (~8 ns an element) against the window's width,
    i.e. the candidates kept and selected among: on SD1's 375 tensors above a tile this is
    16 M sampled and ~24 M candidates per model, against 43 M and 16 M at numel/32."""
    want = min(max(numel // 128, 1 << 15), 1 << 18)
    if sample is not None:
        return sample(max(numel // want, 1)).abs_().numpy().view(np.uint32)
    out = np.empty(SAMPLE_BLOCKS * SAMPLE_BLOCK, dtype=np.uint32)
    for b in range(SAMPLE_BLOCKS):
        lo = b * (numel - SAMPLE_BLOCK) // (SAMPLE_BLOCKS - 1)
        tile = fill(lo, lo + SAMPLE_BLOCK, buf[:SAMPLE_BLOCK]).abs_().numpy().view(np.uint32)
        out[b * SAMPLE_BLOCK : (b + 1) * SAMPLE_BLOCK] = tile
    return out


def _window(sample: np.ndarray, p: float) -> tuple[int, int, float]:
    """Bit patterns [L, H] around quantile p of the sample, ± 6 standard errors and 0.2%,
    and about which share of the tensor falls inside (that of the sample, at least)."""
    n = sample.size
    margin = 6.0 * math.sqrt(n * p * (1.0 - p)) + 0.002 * n + 8
    lo_rank, hi_rank = int(p * n - margin), int(p * n + margin)
    low, high = 0, 0xFFFFFFFF
    ranks = [r for r in (lo_rank, hi_rank) if 0 < r < n]
    if ranks:
        sample.partition(ranks)  # both ranks in one introselect
    if lo_rank > 0:
        low = int(sample[lo_rank])
    if hi_rank < n:
        high = int(sample[hi_rank])
    share = (min(hi_rank, n - 1) - max(lo_rank, 0) + 1) / n
    return low, high, share


def _in_windows(
    fills: Sequence[Fill],
    numel: int,
    js: Sequence[int],
    buf: torch.Tensor,
    windows: Sequence[tuple[int, int, float]],
    counts: Sequence[Count | None] | None = None,
) -> list[int | None]:
    """One pass over the tiles (tiles outer, tensors inner): per tensor, count |x| below its
    window's L and keep those in [L, H]; the bits of its rank j, or None (not in the window,
    or the window too crowded to keep: say 80% zeros). A tensor with a `count` is done in
    that call instead (its candidates in a buffer sized from the sample, again if too small)."""
    cap = max(numel // 8, TILE)
    n = len(fills)
    below, count = [0] * n, [0] * n
    kept: list[list[np.ndarray] | None] = [[] for _ in range(n)]  # None: window too crowded
    tiled = []
    each = counts or [None] * n
    for t, ((low, high, share), counter) in enumerate(zip(windows, each, strict=True)):
        if counter is None:
            tiled.append(t)
            continue
        size = min(cap, int(numel * share * 1.5) + TILE)
        below[t], count[t], c = counter(low, high, size)
        if size < count[t] <= cap:
            below[t], count[t], c = counter(low, high, count[t])
        kept[t] = [c] if count[t] <= cap else None
    if tiled:
        _tiled_windows(fills, numel, buf, windows, tiled, cap, below, count, kept)
    out: list[int | None] = []
    for t, (j, (low, high, _)) in enumerate(zip(js, windows, strict=True)):
        keep = kept[t]
        if keep is None or not below[t] < j <= below[t] + count[t]:
            out.append(None)
        elif low == high:
            out.append(low)
        else:
            cands = np.concatenate(keep)
            cands.partition(j - below[t] - 1)
            out.append(int(cands[j - below[t] - 1]))
    return out


def _tiled_windows(
    fills: Sequence[Fill],
    numel: int,
    buf: torch.Tensor,
    windows: Sequence[tuple[int, int, float]],
    which: Sequence[int],
    cap: int,
    below: list[int],
    count: list[int],
    kept: list[list[np.ndarray] | None],
) -> None:
    """`_in_windows`' pass over the tiles of the tensors `which`, updating its lists."""
    shifted = np.empty(TILE, dtype=np.uint32)
    below_l, inside = np.empty(TILE, dtype=np.bool_), np.empty(TILE, dtype=np.bool_)
    for lo in range(0, numel, TILE):
        hi = min(numel, lo + TILE)
        m = hi - lo
        for t in which:
            keep = kept[t]
            if keep is None:
                continue
            low, high, _ = windows[t]
            bits = fills[t](lo, hi, buf[:m]).abs_().numpy().view(np.uint32)
            np.less(bits, low, out=below_l[:m])
            below[t] += int(np.count_nonzero(below_l[:m]))
            np.subtract(bits, np.uint32(low), out=shifted[:m])
            np.less_equal(shifted[:m], np.uint32(high - low), out=inside[:m])
            if low == high:
                count[t] += int(np.count_nonzero(inside[:m]))
                continue
            # positions then values: 0.6 ns per element against 1.7 for np.compress (and 2.2
            # for bits[mask]) at the window's density of a few per thousand
            c = bits.take(np.flatnonzero(inside[:m]))
            count[t] += c.size
            if count[t] > cap:
                kept[t] = None
                continue
            keep.append(c)


def _radix(fill: Fill, numel: int, j: int, buf: torch.Tensor) -> int:
    """Exact select in two histogram passes: top 16 bits, then low 16 bits in that bin."""
    wide = np.empty(TILE, dtype=np.int64)  # bincount counts intp input without a copy
    hist = np.zeros(BINS, dtype=np.int64)
    for bits in _tiles(fill, numel, buf):
        top = wide[: len(bits)]
        np.right_shift(bits, 16, out=top)
        hist += np.bincount(top, minlength=BINS)
    high, rank = _locate(hist, j)  # rank within the elements whose top 16 bits are `high`
    hist[:] = 0
    sel = np.empty(TILE, dtype=np.bool_)
    for bits in _tiles(fill, numel, buf):
        top, hit = wide[: len(bits)], sel[: len(bits)]
        np.right_shift(bits, 16, out=top)
        np.equal(top, high, out=hit)
        low = bits[hit]
        if low.size:
            low &= 0xFFFF
            hist += np.bincount(low.astype(np.int64), minlength=BINS)
    low_bits, _ = _locate(hist, rank)
    return (high << 16) | low_bits


def _tiles(fill: Fill, numel: int, buf: torch.Tensor) -> Iterator[np.ndarray]:
    """The uint32 bit patterns of |x|, one tile at a time (views of `buf`, reused)."""
    for lo in range(0, numel, TILE):
        hi = min(numel, lo + TILE)
        yield fill(lo, hi, buf[: hi - lo]).abs_().numpy().view(np.uint32)


def _locate(hist: np.ndarray, j: int) -> tuple[int, int]:
    """(bin holding the j-th smallest element, its rank within that bin), 1-based rank."""
    cum = np.cumsum(hist)
    b = int(np.searchsorted(cum, j))  # first bin whose cumulative count reaches j
    before = int(cum[b - 1]) if b else 0
    return b, j - before
