"""Shared pieces of the task-vector methods (δᵢ = modelᵢ − base): parameters, reductions, TIES.

Whole-tensor reductions (dot products, norms) are float64 sums that must not depend on the
torch thread count (-j): torch's parallel reductions split work by thread. Here every
reduction walks the flattened tensor in fixed chunks of REDUCE_CHUNK elements, reduces each
chunk with numpy's pairwise float64 `np.add.reduce` (single-threaded, fixed order for a given
length) and adds the chunk results left to right, so the value is a function of the data only.

Masks are applied by multiplying with float 0/1 (bool ops are far slower in torch on CPU), so a
non-finite δ element gives NaN even where it is dropped: the executor reports such keys.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import Field

from mergebuild.engine.methods.base import Params, Tiles, f32
from mergebuild.sd.blocks import BlockAlpha

if TYPE_CHECKING:  # numpy's helpers load when a tensor is merged, not when a recipe is planned
    import numpy as np
    import torch

    from mergebuild.engine.methods._topk import Count, Fill, Sample

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


def delta(xs: list[torch.Tensor], i: int, lo: int = 0, hi: int | None = None) -> torch.Tensor:
    """A new flat float32 δᵢ[lo:hi] = xs[i] − xs[0] (one IEEE subtraction per element)."""
    return f32(xs[i].reshape(-1)[lo:hi]).sub_(xs[0].reshape(-1)[lo:hi])


class TileDeltas:
    """δᵢ[lo:hi] = float32(xs[i]) − float32(xs[0]) written into a caller's float32 view.

    The same single IEEE subtraction as `delta`, without allocating (a fresh tensor per tile
    costs page faults) and with the base tile converted to float32 once per tile: a mixed
    float16 − float32 op is 2.5x slower than converting first, and gives the same bits.
    """

    def __init__(self, xs: list[torch.Tensor], tile: int) -> None:
        import torch

        self.flat = [x.reshape(-1) for x in xs]  # once: a non-contiguous input is copied once
        base = self.flat[0]
        self.base32 = (
            None
            if base.dtype == torch.float32
            else torch.empty(min(base.numel(), tile), dtype=torch.float32)
        )
        self.span = (-1, -1)

    def base(self, lo: int, hi: int) -> torch.Tensor:
        if self.base32 is None:
            return self.flat[0][lo:hi]
        if self.span != (lo, hi) or hi - lo > self.base32.numel():
            if hi - lo > self.base32.numel():  # a caller's larger tile
                import torch

                self.base32 = torch.empty(hi - lo, dtype=torch.float32)
            self.base32[: hi - lo].copy_(self.flat[0][lo:hi])
            self.span = (lo, hi)
        return self.base32[: hi - lo]

    def __call__(self, i: int, lo: int, hi: int, out: torch.Tensor) -> torch.Tensor:
        out.copy_(self.flat[i][lo:hi])
        return out.sub_(self.base(lo, hi))

    def _compiled(self, i: int) -> tuple[Any, np.ndarray, np.ndarray] | None:
        """(the compiled loops, input i, the base) as arrays those loops read the way the
        tiles compute: both float16 (as bits) or both float32, contiguous, on the CPU."""
        import torch

        x, b = self.flat[i], self.flat[0]
        if x.dtype != b.dtype or x.device.type != "cpu" or b.device.type != "cpu":
            return None
        if not (x.is_contiguous() and b.is_contiguous()):
            return None
        from mergebuild.engine.methods import reduce

        loops = reduce.loops_for(b)
        if loops is None:
            return None
        if x.dtype == torch.float16:
            return loops, x.view(torch.uint16).numpy(), b.view(torch.uint16).numpy()
        if x.dtype == torch.float32:
            return loops, x.numpy(), b.numpy()
        return None

    def counter(self, i: int) -> Count | None:
        """δᵢ's window pass (_topk.Count) as one compiled loop over the whole tensor, reading
        float16 inputs as their bits: the same subtraction as the tiles, without them. None
        where `_compiled` has no arrays for it."""
        import numpy as np

        got = self._compiled(i)
        if got is None:
            return None
        loops, xa, ba = got
        window = loops.abs_delta_window

        def count(low: int, high: int, size: int) -> tuple[int, int, np.ndarray]:
            cand = np.empty(size, dtype=np.uint32)
            below, inside = window(xa, ba, np.uint32(low), np.uint32(high - low), cand)
            return int(below), int(inside), cand[: min(inside, size)]

        return count

    def bits(self, i: int) -> np.ndarray | None:
        """Input i's bits (uint16) where `_compiled` reads it and the base as float16 (what
        _kernels.ties_tile reads), else None."""
        got = self._compiled(i)
        return None if got is None or got[1].dtype.itemsize != 2 else got[1]

    def strided(self, i: int, step: int) -> torch.Tensor:
        """δᵢ[::step] (new): the same subtraction, for a sample of the whole tensor."""
        got = self._compiled(i)
        if got is None:
            return f32(self.flat[i][::step]).sub_(self.flat[0][::step])
        import numpy as np
        import torch

        loops, xa, ba = got
        out = np.empty(-(-xa.size // step), dtype=np.float32)
        loops.delta_strided(xa, ba, np.uint64(step), out)
        return torch.from_numpy(out)


def trim_thresholds(
    numel: int,
    k: float,
    fills: list[Fill],
    buf: torch.Tensor,
    samples: list[Sample] | None = None,
    counts: list[Count | None] | None = None,
) -> list[float | None]:
    """sd-mecha's TIES threshold of each task vector of one tensor, in one pass over its
    tiles: the j-th smallest |δ| with j = max(⌊(1−k)·numel⌋, 1).

    Elements with |δ| ≥ threshold are kept (ties at the threshold included), so at least
    numel − j + 1 elements survive. None means "keep everything" (k = 1: the threshold would
    be min |δ|). Exact and deterministic: a radix select over the tiles each `fill` writes into
    `buf` (see _topk.py), never a full-size |δ|."""
    from mergebuild.engine.methods._topk import kth_smallest_abs_many

    j = max(int((1.0 - k) * numel), 1)
    if j == 1 or numel == 0:
        return [None] * len(fills)
    return list(kth_smallest_abs_many(fills, numel, [j] * len(fills), buf, samples, counts))


# Elements per tile of the elementwise phase: its ~8 float32 tile buffers (2 MB) stay in L2;
# 2^16 measured 20% faster than 2^18 on SD1's token embedding, 2^15 slower again (call overhead).
TILE = 1 << 16

# The 9-op form of finite tiles (ties_tiles' `quick`); tests turn it off to compare with `exact`
QUICK = True

# deltas(i, lo, hi, out): δᵢ[lo:hi] written into the float32 view `out`, returned
Deltas = Callable[[int, int, int, "torch.Tensor"], "torch.Tensor"]


def ties_merge(
    base: torch.Tensor,
    deltas: Deltas,
    weights: list[float],
    k: float,
    vote: Literal["magnitude", "count"],
    scale: float,
) -> torch.Tensor:
    """base + scale · disjoint weighted mean of trimmed, sign-elected task vectors (ties_tiles,
    gathered into one new float32 tensor)."""
    out = ties_tiles(base, deltas, weights, k, vote, scale).whole()
    assert out is not None  # ties' tiles never start over
    return out


def ties_tiles(
    base: torch.Tensor,
    deltas: Deltas,
    weights: list[float],
    k: float,
    vote: Literal["magnitude", "count"],
    scale: float,
) -> Tiles:
    """base + scale · disjoint weighted mean of trimmed, sign-elected task vectors, as Tiles.

    `deltas(i, lo, hi, out)` writes float32 δᵢ[lo:hi] into `out` (i = 1..n; the same values at
    every call); if it has a `base(lo, hi)` (TileDeltas), that float32 base tile is reused.
    With τᵢ = wᵢ·trim(δᵢ): elected sign s = sign(Σ τᵢ) (magnitude) or sign(Σ sign τᵢ) (count);
    result = Σ_{sign τᵢ = s ≠ 0} τᵢ / Σ_{same i} wᵢ, 0 where none.

    Only the trim thresholds need the whole tensor (a radix select over tiles, done here);
    the rest is elementwise given them and runs tile by tile when `fill` is called. Every
    temporary is a tile buffer allocated once and reused with in-place / `out=` ops.
    """
    import torch

    from mergebuild.engine.methods import reduce
    from mergebuild.engine.methods._topk import TILE as SELECT_TILE

    shape, numel = tuple(base.shape), base.numel()
    flat_base = base.reshape(-1)
    active = [(i, w) for i, w in enumerate(weights, start=1) if w != 0]
    size = min(numel, TILE)
    thresholds: dict[int, float | None] = {i: None for i, _ in active}
    if k < 1.0 and numel > 0:
        scratch = torch.empty(min(numel, SELECT_TILE), dtype=torch.float32)
        ids = [i for i, _ in active]  # trim on the unweighted δᵢ
        strided = getattr(deltas, "strided", None)  # plain δ (ties): a cheap exact sample
        samples = None if strided is None else [partial(strided, i) for i in ids]
        counter = getattr(deltas, "counter", None)  # ... and a compiled window pass
        counts = None if counter is None else [counter(i) for i in ids]
        fills = [partial(deltas, i) for i in ids]
        got = trim_thresholds(numel, k, fills, scratch, samples, counts)
        thresholds.update(zip(ids, got, strict=True))
        del scratch
    # hardshrink(δ, λ) keeps |δ| > λ: with λ the float32 just below the threshold, |δ| ≥ thr
    shrink = {i: _below(t) for i, t in thresholds.items()}
    fast = (
        QUICK and bool(active) and all(t is None or math.isfinite(t) for t in thresholds.values())
    )
    bufs = [torch.empty(size, dtype=torch.float32) for _ in active]
    signs = [torch.empty(size, dtype=torch.float32) for _ in active] if fast else []
    tmp, tmp2, votes, num, den, base32 = (torch.empty(size, dtype=torch.float32) for _ in range(6))
    base_tile = getattr(deltas, "base", None)

    def exact(lo: int, hi: int) -> torch.Tensor:
        """The reference form of a tile; any input: NaN and inf propagate as they always did.

        Masks are float 0/1 made with sign/clamp (exact), not bool tensors: torch's bool ops
        and masked_fill are 5-25x slower than float arithmetic on CPU."""
        m = hi - lo
        t = tmp[:m]
        taus = []
        for (i, w), buf in zip(active, bufs, strict=True):
            d = deltas(i, lo, hi, buf[:m])
            thr = thresholds[i]
            if thr is not None:  # keep |δ| ≥ thr: heaviside(|δ| − thr) (x − y = 0 iff x == y)
                d.mul_(torch.abs(d, out=t).sub_(thr).sign_().add_(1.0).clamp_(max=1.0))
            if w != 1.0:
                d.mul_(w)
            taus.append(d)
        v = votes[:m].zero_()
        for d in taus:
            v.add_(d if vote == "magnitude" else torch.sign(d, out=t))
        sign = v.sign_()
        nm, dn = num[:m].zero_(), den[:m].zero_()  # Σ of agreeing τᵢ (times the sign), Σ wᵢ
        for d, (_, w) in zip(taus, active, strict=True):
            d.mul_(sign)  # > 0 exactly where τᵢ agrees with a non-zero elected sign
            agree = torch.sign(d, out=t).clamp_(min=0.0)
            dn.add_(agree if w == 1.0 else agree.mul_(w))
            nm.add_(d.clamp_(min=0.0))
        # no elected sign ⟺ no agreeing model (den 0, num 0): divide by 1 there, not 0
        dn.add_(torch.abs(sign, out=t).neg_().add_(1.0))
        return torch.add(nm.mul_(sign).div_(dn).mul_(scale), flat_base[lo:hi], out=nm)

    def quick(lo: int, hi: int) -> torch.Tensor | None:
        """`exact` in 9 tile ops per model instead of 16, valid when every τᵢ is finite
        (else None: the caller redoes the tile with `exact`). Only the signs of some zeros
        differ on the way (a dropped δ is +0, not ±0), and no zero's sign reaches the result:
        Σ of agreeing τᵢ taken directly equals (Σ of their |τᵢ|)·s (rounding is symmetric),
        and sign τᵢ == s marks them once the places where s = 0 get den 1 and num +0."""
        m = hi - lo
        t, v = tmp[:m], votes[:m]
        taus = []
        for n, ((i, w), buf, sbuf) in enumerate(zip(active, bufs, signs, strict=True)):
            d = deltas(i, lo, hi, buf[:m])
            lam = shrink[i]
            if lam is not None:
                torch.hardshrink(d, lam, out=d)
            if w != 1.0:
                d.mul_(w)
            s = torch.sign(d, out=sbuf[:m])
            # the first term copied, not added to +0: only a −0 sum differs, and sign(−0) = 0
            (v.copy_ if n == 0 else v.add_)(d if vote == "magnitude" else s)
            taus.append((d, s, w))
        sign = v.sign_()
        nm, dn = num[:m].zero_(), den[:m]
        for n, (d, s, w) in enumerate(taus):
            e = torch.eq(s, sign, out=t)  # float 1/0: τᵢ agrees (or is 0 where s = 0)
            term = e if w == 1.0 else torch.mul(e, w, out=tmp2[:m])  # +0 or wᵢ, never −0
            (dn.copy_ if n == 0 else dn.add_)(term)
            nm.add_(e.mul_(d))  # a non-finite τᵢ makes NaN or inf here, whatever e is
        if not math.isfinite(float(nm.sum())):
            return None
        a = torch.abs(sign, out=t)  # s = 0: den 1 (as `exact`), elsewhere den unchanged
        dn.mul_(a).add_(a.neg_().add_(1.0))
        return nm.div_(dn).mul_(scale).add_(base32_tile(lo, hi))

    def base32_tile(lo: int, hi: int) -> torch.Tensor:
        """The base tile in float32: a mixed float16 + float32 add is 2.5x slower, same bits."""
        if base_tile is not None:
            return base_tile(lo, hi)
        if flat_base.dtype == torch.float32:
            return flat_base[lo:hi]
        return base32[: hi - lo].copy_(flat_base[lo:hi])

    loops = reduce.loops_for(flat_base) if fast else None
    compiled = loops is not None
    if loops is not None:
        import numpy as np

        ties_combine = loops.ties_combine
        rows = torch.empty(len(active) * size, dtype=torch.float32)
        lams = np.array([np.nan if shrink[i] is None else shrink[i] for i, _ in active], np.float32)
        ws = np.array([w for _, w in active], dtype=np.float32)
        scale32 = np.float32(scale)

    def compiled_quick(lo: int, hi: int) -> torch.Tensor | None:
        """`quick` as one compiled loop over the tile (_kernels.ties_combine: the same float32
        operations in the same order, so the same bits), after the δ tiles are written."""
        m = hi - lo
        d = rows[: len(active) * m].view(len(active), m)
        for k, (i, _) in enumerate(active):
            deltas(i, lo, hi, d[k])
        b = base32_tile(lo, hi).contiguous()
        out = num[:m]
        if not ties_combine(
            d.numpy(), lams, ws, vote == "magnitude", scale32, b.numpy(), out.numpy()
        ):
            return None
        return out

    def fill(lo: int, hi: int) -> torch.Tensor:
        out = (compiled_quick if compiled else quick)(lo, hi) if fast else None
        return exact(lo, hi) if out is None else out

    fill_half = None
    bits = getattr(deltas, "bits", None)
    if loops is not None and bits is not None and len(active) <= loops.TIES_TILE_MODELS:
        xs = tuple(bits(i) for i, _ in active)
        base_bits = bits(0)
        if base_bits is not None and all(x is not None for x in xs):
            ties_tile = loops.ties_tile
            scratch = np.empty((3, size), dtype=np.float32)
            rows_np = rows.numpy()
            # dare_ties: the deltas carry DARE's mask as (stream key of model i, first element
            # number, limit), applied inside the loop as rng.drop_ applies it to a δ tile
            mask = getattr(deltas, "mask", None)
            keys = np.array([] if mask is None else [mask[0](i) for i, _ in active], np.uint64)
            first, limit = (0, np.uint64(0)) if mask is None else mask[1:]

            def fill_half(lo: int, hi: int, out: np.ndarray) -> bool:
                """The tile as float16 bits in one call (_kernels.ties_tile: `compiled_quick`
                on the inputs' bits); a tile whose sums are not finite is redone by `fill`."""
                m = hi - lo
                d = rows_np[: len(active) * m].reshape(len(active), m)
                at = np.uint64(first + lo)
                args = (lams, ws, vote == "magnitude", scale32, d, scratch, out, keys, at, limit)
                got = ties_tile(xs, base_bits, lo, *args)
                if got >= 0:
                    return bool(got)
                from mergebuild.engine.compute import settle_nonfinite

                half = torch.from_numpy(out).view(torch.float16)
                return settle_nonfinite(half.copy_(fill(lo, hi)))

    return Tiles(TILE, shape, fill, fill_half=fill_half)


def _below(thr: float | None) -> float | None:
    """The largest float32 below a finite threshold > 0 (0 stays 0: keep everything)."""
    import numpy as np

    if thr is None or not math.isfinite(thr):
        return None
    return float(np.nextafter(np.float32(thr), np.float32(0.0)))


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
