"""Compiled loops (numba) for hot per-element work, with the same operations in the same
order as the numpy/torch code they replace, so the same bits.

Why: as numpy and torch calls, this work is many calls per tile (gram: ~11 per 64 Ki elements
to convert, multiply, widen and reduce), and two merge workers then spend their time handing
the GIL back and forth: measured, two threads ran gram's sums no faster than one. A compiled
loop is one call per tile, keeps its temporaries in registers and releases the GIL.

- `block_sums`, `column_sums` (reduce.gram): every product of two float16, bfloat16 or
  float32 values is exact in float64 (at most 48 significant bits), so only the order of the
  additions matters, and it is numpy's. `block_sums` is `np.add.reduce` of each 64 Ki block,
  i.e. numpy's pairwise sum: 512 leaves of 128 elements, each summed in 8 lanes then
  ((r0+r1)+(r2+r3))+((r4+r5)+(r6+r7)), the leaves combined in a perfect binary tree (64 Ki is
  a power of two, so numpy halves exactly). `column_sums` is `acc += np.add.reduce(block,
  axis=0)` per block of rows: each column summed row after row, then added to `acc`.
- `difference_sums` (compare): its own fixed order, in lanes (see there).
- `train_difference`: the method's float32 operations, element by element.
- `weighted3`: triple_sum's a·wa + b·wb + c·wc, in its order.
- `add_difference_many`: the members of an add_difference sweep from one read of a tile.
- `fold_first`, `fold_add`, `fold_round`: fold's Σ wᵢ·mᵢ over float16 inputs, term by term
  into a float32 tile, rounded once.
- `lincomb`, `blend_rows`: slerp's and the cosine methods' tiles, a·ca + b·cb.
- `copy_half`: a float16 tensor as it is, NaNs made canonical (copy; tensors no LoRA touches).
- `widen_half`: float16 bits to float32, for `block_sums` (a pass without torch).
- `bake`: bake_lora's a + Σ ΔWᵢ·sᵢ, float16 or float32 `a`, float32 ΔW (1-4 LoRAs).
- `drop`: DARE's counter-based mask (engine/rng.py's splitmix64, integers only) applied to a
  δ tile in place, as the numpy path's multiply by 0/1 (dare, dare_ties).
- `ties_combine`: TIES' trim, sign election and disjoint mean on one tile (ties, dare_ties,
  della), the float32 operations of _taskvec.ties_tiles' `quick` form; `ties_tile` the same
  from float16 inputs' bits to a float16 tile (1-4 models, one compiled loop each).
- `abs_delta_window`: the window pass of TIES' exact trim threshold (_topk) over a whole δ.

float16 without copies: the sums, `difference_sums` and the tiles above also take float16
tensors as their bits (uint16 arrays, `_wide`), and the tiles write float16 outputs as bits
(`_put`, `_settle`): LLVM's fpext / fptrunc, i.e. the CPU's conversions (F16C on x86), exact
one way and rounded to nearest-even the other, as torch converts (tests/test_half_kernels.py
compares every float16 value and the ties and boundaries of every binade). A float16 tile is
then read, combined, rounded, checked for Inf/NaN and its NaNs made canonical
(compute.canonical_nans) in one call, instead of widening copies, the ops, a cast and a sum
over the result: SD1 add_cosine_a's merge workers went from 3.4-3.7 to 2.3-2.6 s of CPU.

Tests hold each loop to the code it replaces, bit for bit (tests/test_method_tiles.py,
test_methods_numbers.py, test_compare.py). No fast-math flags: LLVM neither reassociates nor
fuses (FMA) these operations. Bounds are not checked per element (that would stop the loops
vectorising): each loop asserts its arrays' sizes once instead.
"""

from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic, overload

BLOCK = 1 << 16  # reduce.BLOCK: one np.add.reduce call of the numpy path
LEAF = 128  # numpy's PW_BLOCKSIZE: below it, pairwise_sum adds in 8 lanes
LEAVES = BLOCK // LEAF
BAKE_LORAS = 4  # `bake` is compiled ahead (warm) for up to this many LoRAs at once
_F0, _F1 = np.float32(0.0), np.float32(1.0)

# compiled on first call, cached on disk by numba; this module is imported only by the sums
# that use it, so --help, -n and a cached build never load numba
_jit = numba.njit(nogil=True, cache=True, boundscheck=False, error_model="numpy")

_H_EXP, _H_MANT, _H_NAN = np.uint16(0x7C00), np.uint16(0x03FF), np.uint16(0x7E00)
_H_CARRY, _H_SIGN = np.uint16(0x0400), np.uint16(0x8000)


@intrinsic
def _half_bits(typingctx, x):  # type: ignore[no-untyped-def]
    """float32 → the bits of the nearest float16 (ties to even): LLVM's fptrunc."""

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))

    return types.uint16(types.float32), codegen


@intrinsic
def _from_half(typingctx, x):  # type: ignore[no-untyped-def]
    """float16 bits → the same value as float32 (exact): LLVM's fpext."""

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return types.float32(types.uint16), codegen


@intrinsic
def _bits32(typingctx, x):  # type: ignore[no-untyped-def]
    """A float32's bit pattern as uint32 (a bitcast)."""

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        return builder.bitcast(args[0], ir.IntType(32))

    return types.uint32(types.float32), codegen


def _wide(x: object) -> np.float32:
    """An input element as float32: float16 bits (uint16) widened, a float as it is.

    This body is the plain-Python meaning (a loop's `py_func`, NUMBA_DISABLE_JIT); compiled
    loops use the overload below, which tests hold to it."""
    if isinstance(x, np.uint16):
        return np.array(x, dtype=np.uint16).view(np.float16).astype(np.float32)[()]
    return x  # type: ignore[return-value]


@overload(_wide)
def _wide_impl(x):  # type: ignore[no-untyped-def]
    if x == types.uint16:
        return lambda x: _from_half(x)
    if isinstance(x, types.Float):  # float32 (float64: only tests call with it)
        return lambda x: x
    return None


def _put(out: np.ndarray, i: int, v: np.float32) -> np.uint16:
    """out[i] = v, as float16 bits into a uint16 array (then: 0x8000 if that is Inf/NaN, the
    exponent's carry, else 0 — OR-ed over a tile without a branch) or as is into float32 (0).
    Plain-Python meaning, as `_wide`'s."""
    if out.dtype == np.uint16:
        h = np.array(v, dtype=np.float32).astype(np.float16).view(np.uint16)[()]
        out[i] = h
        return np.uint16(((int(h) & 0x7C00) + 0x0400) & 0x8000)
    out[i] = v
    return np.uint16(0)


@overload(_put)
def _put_impl(out, i, v):  # type: ignore[no-untyped-def]
    if out.dtype == types.uint16:

        def half(out, i, v):  # type: ignore[no-untyped-def]
            h = _half_bits(v)
            out[i] = h
            return ((h & _H_EXP) + _H_CARRY) & _H_SIGN

        return half
    if out.dtype == types.float32:

        def single(out, i, v):  # type: ignore[no-untyped-def]
            out[i] = v
            return np.uint16(0)

        return single
    return None


def _settle(out: np.ndarray, special: np.uint16) -> bool:
    """After a tile of `_put`s: whether a float16 output holds Inf/NaN (`special`, their
    OR), its NaNs then rewritten as the one canonical 0x7E00 (compute.canonical_nans). False
    for a float32 output: its caller checks it as before. Plain-Python meaning, as `_wide`'s."""
    if out.dtype != np.uint16 or special == 0:
        return False
    flat = out.reshape(-1)
    flat[((flat & _H_EXP) == _H_EXP) & ((flat & _H_MANT) != 0)] = _H_NAN
    return True


@overload(_settle)
def _settle_impl(out, special):  # type: ignore[no-untyped-def]
    if out.dtype == types.uint16:

        def half(out, special):  # type: ignore[no-untyped-def]
            if special == 0:
                return False
            flat = out.reshape(-1)
            for i in range(flat.size):
                if (flat[i] & _H_EXP) == _H_EXP and (flat[i] & _H_MANT) != 0:
                    flat[i] = _H_NAN
            return True

        return half
    if out.dtype == types.float32:
        return lambda out, special: False
    return None


@_jit
def block_sums(x: np.ndarray, y: np.ndarray, out: np.ndarray) -> None:
    """out[t, b] = np.add.reduce(p_t[b·BLOCK:(b+1)·BLOCK]) for p = x·x, y·y, x·y (float64)
    over float32 x, y whose length is a multiple of BLOCK."""
    assert x.size == y.size and x.size % BLOCK == 0 and out.shape[1] >= x.size // BLOCK
    leaves = np.empty((3, LEAVES))
    r = np.empty((3, 8))
    x8, y8 = x.reshape(-1, 8), y.reshape(-1, 8)
    for b in range(x.size // BLOCK):
        for leaf in range(LEAVES):
            row = np.uint64(b * (BLOCK // 8) + leaf * (LEAF // 8))
            xr, yr = x8[row], y8[row]
            for j in range(8):
                u, v = np.float64(xr[j]), np.float64(yr[j])
                r[0, j] = u * u
                r[1, j] = v * v
                r[2, j] = u * v
            for i in range(np.uint64(1), np.uint64(LEAF // 8)):
                xr, yr = x8[row + i], y8[row + i]
                for j in range(8):
                    u, v = np.float64(xr[j]), np.float64(yr[j])
                    r[0, j] += u * u
                    r[1, j] += v * v
                    r[2, j] += u * v
            for t in range(3):
                leaves[t, leaf] = ((r[t, 0] + r[t, 1]) + (r[t, 2] + r[t, 3])) + (
                    (r[t, 4] + r[t, 5]) + (r[t, 6] + r[t, 7])
                )
        m = LEAVES
        while m > 1:
            m //= 2
            for t in range(3):
                for q in range(m):
                    leaves[t, q] = leaves[t, 2 * q] + leaves[t, 2 * q + 1]
        for t in range(3):
            out[t, b] = leaves[t, 0]


@_jit
def column_sums(x: np.ndarray, y: np.ndarray, step: int, acc: np.ndarray) -> None:
    """acc[t] += Σ over rows of p_t, per column, for float32 (or float16 bits) (rows, cols)
    x, y: block by block of `step` rows, each block summed row after row from its first row."""
    n_rows, n_cols = x.shape
    assert y.shape == x.shape and acc.shape[1] == n_cols and step > 0
    s = np.empty((3, n_cols))
    for lo in range(0, n_rows, step):
        for j in range(n_cols):
            u, v = np.float64(_wide(x[lo, j])), np.float64(_wide(y[lo, j]))
            s[0, j] = u * u
            s[1, j] = v * v
            s[2, j] = u * v
        for i in range(lo + 1, min(n_rows, lo + step)):
            for j in range(n_cols):
                u, v = np.float64(_wide(x[i, j])), np.float64(_wide(y[i, j]))
                s[0, j] += u * u
                s[1, j] += v * v
                s[2, j] += u * v
        for t in range(3):
            for j in range(n_cols):
                acc[t, j] += s[t, j]


@_jit
def difference_sums(y: np.ndarray, x: np.ndarray, b: np.ndarray, acc: np.ndarray) -> None:
    """compare's float64 sums of float32 (or float16 bits) y, x (and base b unless it is
    empty), added into acc[:, j] for the elements i ≡ j (mod W), W = acc.shape[1], each lane in
    index order: acc[0] ‖x−y‖², acc[1] ‖y‖², acc[2] ⟨x−b, y−b⟩, acc[3] ‖x−b‖², acc[4] ‖y−b‖².
    Lanes are independent, so the loops vectorise without reordering any addition (the
    figures do not depend on the machine); the caller combines the lanes in a fixed order."""
    n, w = y.size, acc.shape[1]
    assert x.size == n and (b.size == 0 or b.size == n) and acc.shape[0] == 5
    for lo in range(0, n, w):
        width = min(w, n - lo)
        ys, xs = y[lo : lo + width], x[lo : lo + width]  # slices: the loops vectorise
        if b.size == 0:
            for j in range(width):
                yv, xv = np.float64(_wide(ys[j])), np.float64(_wide(xs[j]))
                d = xv - yv
                acc[0, j] += d * d
                acc[1, j] += yv * yv
        else:
            bs = b[lo : lo + width]
            for j in range(width):
                yv, xv = np.float64(_wide(ys[j])), np.float64(_wide(xs[j]))
                bv = np.float64(_wide(bs[j]))
                d, xa, ya = xv - yv, xv - bv, yv - bv
                acc[0, j] += d * d
                acc[1, j] += yv * yv
                acc[2, j] += xa * ya
                acc[3, j] += xa * xa
                acc[4, j] += ya * ya


@_jit
def train_difference(
    a: np.ndarray, b: np.ndarray, c: np.ndarray, scale: np.float32, out: np.ndarray
) -> bool:
    """train_difference.compute's float32 operations on one tile, in its order (so its bits):
    d = b − c; n = |b − a|; t = (n / (|d| + n)) · d · scale, −0 where d == 0; out = t + a.
    float16 inputs and output as bits too (returns whether the output holds Inf/NaN)."""
    assert b.size == a.size and c.size == a.size and out.size == a.size
    special = np.uint16(0)
    for i in range(a.size):
        ai, bi = _wide(a[i]), _wide(b[i])
        d = bi - _wide(c[i])
        n = abs(bi - ai)
        t = n / (abs(d) + n) * d * scale
        special |= _put(out, i, (-_F0 if d == _F0 else t) + ai)
    return _settle(out, special)


@_jit
def weighted3(
    a: np.ndarray,
    b: np.ndarray,
    c: np.ndarray,
    wa: np.float32,
    wb: np.float32,
    wc: np.float32,
    live: int,
    out: np.ndarray,
) -> bool:
    """triple_sum.weighted over three float16 inputs (bits) into float16 bits: a·wa, then
    + b·wb, then + c·wc in float32, skipping the terms whose bit in `live` (1 a, 2 b, 4 c)
    is clear (the caller decides on the float64 weights), a first term of weight 1 taken as
    it is, +0 where none is live; whether the output holds Inf/NaN."""
    assert b.size == a.size and c.size == a.size and out.size == a.size
    special = np.uint16(0)
    for i in range(a.size):
        v = _F0
        first = True
        if live & 1:
            v = _wide(a[i]) if wa == _F1 else _wide(a[i]) * wa
            first = False
        if live & 2:
            x = _wide(b[i]) if first and wb == _F1 else _wide(b[i]) * wb
            v = x if first else v + x
            first = False
        if live & 4:
            x = _wide(c[i]) if first and wc == _F1 else _wide(c[i]) * wc
            v = x if first else v + x
        special |= _put(out, i, v)
    return _settle(out, special)


@_jit
def add_difference_many(
    a: np.ndarray,
    b: np.ndarray,
    c: np.ndarray,
    alphas: np.ndarray,
    live: np.ndarray,
    outs: np.ndarray,
    flags: np.ndarray,
) -> None:
    """A sweep of add_difference on float16 inputs (bits), each member into its row of
    `outs` (float16 bits): (b − c)·alphas[k] + a in float32, compute's order; a member whose
    `live[k]` is 0 (alpha 0, decided on the float64 value) is a exactly. flags[k]: whether
    member k holds Inf/NaN (its NaNs canonical)."""
    m, n = outs.shape
    assert a.size == n and b.size == n and c.size == n and alphas.size == m
    assert live.size == m and flags.size == m
    for k in range(m):
        al, o = alphas[k], outs[k]
        special = np.uint16(0)
        if live[k] == 0:
            for i in range(n):
                special |= _put(o, i, _wide(a[i]))
        else:
            for i in range(n):
                special |= _put(o, i, (_wide(b[i]) - _wide(c[i])) * al + _wide(a[i]))
        flags[k] = _settle(o, special)


@_jit
def _sign32(x: np.float32) -> np.float32:
    """torch.sign of a float32: ±1, 0 for ±0 and NaN."""
    if x > _F0:
        return _F1
    if x < _F0:
        return -_F1
    return _F0


@_jit
def _ties_sums(
    d: np.ndarray,
    lams: np.ndarray,
    ws: np.ndarray,
    magnitude: bool,
    num: np.ndarray,
    den: np.ndarray,
    vote: np.ndarray,
) -> bool:
    """The core of `ties_combine`: δ rows `d` (n, m) trimmed in place (hardshrink by lams[k],
    NaN for none) and weighted (ws), signs elected into `vote` (by magnitude or count), agreeing
    τ summed into `num` and their weights into `den`; whether every sum in `num` is finite."""
    n, m = d.shape
    for k in range(n):
        lam, w, row = lams[k], ws[k], d[k]
        trim = lam == lam
        for i in range(m):
            x = row[i]
            x = _F0 if trim and x >= -lam and x <= lam else x  # hardshrink
            x = x * w if w != _F1 else x
            row[i] = x
            term = x if magnitude else _sign32(x)
            vote[i] = term if k == 0 else vote[i] + term
    for i in range(m):
        vote[i] = _sign32(vote[i])
        num[i] = _F0
    finite = True
    for k in range(n):
        w, row = ws[k], d[k]
        for i in range(m):
            x = row[i]
            e = _F1 if _sign32(x) == vote[i] else _F0
            term = e if w == _F1 else e * w
            den[i] = term if k == 0 else den[i] + term
            num[i] = num[i] + e * x
    for i in range(m):
        finite &= np.isfinite(num[i])
    return finite


@_jit
def ties_combine(
    d: np.ndarray,
    lams: np.ndarray,
    ws: np.ndarray,
    magnitude: bool,
    scale: np.float32,
    base: np.ndarray,
    out: np.ndarray,
) -> bool:
    """_taskvec.ties_tiles' `quick` form on one tile with the same float32 operations in the
    same order (so the same bits): δ rows `d` (n, m) are trimmed in place (hardshrink by
    lams[k], NaN for none), weighted (ws), signs elected (by magnitude or count), agreeing τ
    summed and divided by their weights, then out = that · scale + base. Loops run over the
    elements innermost, without branches, so they vectorise. False (out unfinished) where a
    sum is not finite: the caller redoes the tile exactly."""
    n, m = d.shape
    assert lams.size == n and ws.size == n and base.size == m and out.size == m
    vote = np.empty(m, dtype=np.float32)
    den = np.empty(m, dtype=np.float32)
    if not _ties_sums(d, lams, ws, magnitude, out, den, vote):
        return False
    _ties_finish(out, den, vote, scale, base, out)
    return True


@_jit
def _ties_finish(
    num: np.ndarray,
    den: np.ndarray,
    vote: np.ndarray,
    scale: np.float32,
    base: np.ndarray,
    out: np.ndarray,
) -> np.uint16:
    """out = num / den · scale + base (den 1 where no sign was elected), through `_put` (float32
    or float16 bits; `out` may be `num`); the OR of `_put`'s Inf/NaN marks."""
    special = np.uint16(0)
    for i in range(out.size):
        a = abs(vote[i])
        special |= _put(out, i, num[i] / (den[i] * a + (-a + _F1)) * scale + _wide(base[i]))
    return special


@_jit
def ties_tile(
    xs: tuple[np.ndarray, ...],
    base: np.ndarray,
    lo: int,
    lams: np.ndarray,
    ws: np.ndarray,
    magnitude: bool,
    scale: np.float32,
    d: np.ndarray,
    scratch: np.ndarray,
    out: np.ndarray,
    keys: np.ndarray,
    start: np.uint64,
    limit: np.uint64,
) -> int:
    """`ties_combine` on elements [lo, lo + out.size) of whole flat inputs (xs: one per model,
    base; float16 as bits), δ rows formed into `d` as TileDeltas forms them (float32(x) −
    float32(base)), the result rounded into `out` (float16 bits) as the executor casts:
    one call per tile instead of a copy and a subtraction per model, the combine, a cast and
    a check. −1 (out unfinished) where a sum is not finite (the caller redoes the tile
    exactly), else whether `out` holds Inf/NaN (`_settle`). `scratch`: (3, ≥ m) float32.
    dare_ties: with `keys` (one stream key per model, else empty), each δ row is first
    multiplied by DARE's mask (`drop`, its elements numbered from `start`)."""
    n, m = d.shape
    assert len(xs) == n and lams.size == n and ws.size == n and lo + m <= base.size
    assert out.size == m and scratch.shape[1] >= m and (keys.size == 0 or keys.size == n)
    b = base[lo : lo + m]  # sliced, then indexed from 0: `lo + i` would not vectorise
    for k, x in enumerate(xs):
        assert lo + m <= x.size
        row, xt = d[k], x[lo : lo + m]
        for i in range(m):
            row[i] = _wide(xt[i]) - _wide(b[i])
        if keys.size:
            drop(row, keys[k], start, limit)
    num, den, vote = scratch[0, :m], scratch[1, :m], scratch[2, :m]
    if not _ties_sums(d, lams, ws, magnitude, num, den, vote):
        return -1
    return 1 if _settle(out, _ties_finish(num, den, vote, scale, b, out)) else 0


@_jit
def abs_delta_window(
    x: np.ndarray, b: np.ndarray, low: np.uint32, span: np.uint32, cand: np.ndarray
) -> tuple[int, int]:
    """Over δ = float32(x) − float32(b), element by element (the subtraction of
    _taskvec.TileDeltas): how many bit patterns of |δ| are below `low`, and how many lie in
    [low, low + span], the first cand.size of those stored in `cand` in order (the window
    pass of _topk._in_windows, for one whole tensor in one call)."""
    assert b.size == x.size
    below, inside, cap = 0, 0, cand.size
    for i in range(x.size):
        u = _bits32(abs(_wide(x[i]) - _wide(b[i])))
        below += u < low
        if u - low <= span:  # unsigned: wraps above span when u < low
            if inside < cap:
                cand[inside] = u
            inside += 1
    return below, inside


@_jit
def delta_strided(x: np.ndarray, b: np.ndarray, step: np.uint64, out: np.ndarray) -> None:
    """out[j] = float32(x[j·step]) − float32(b[j·step]): TileDeltas.strided's sample of δ,
    one gather instead of two strided torch copies and a subtraction."""
    assert b.size == x.size and (out.size - 1) * step < x.size
    for j in range(np.uint64(out.size)):
        out[j] = _wide(x[j * step]) - _wide(b[j * step])


TIES_TILE_MODELS = 4  # ties_tile is compiled ahead for 1..4 models; more take ties_combine

_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_MIX1, _MIX2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


@_jit
def drop(d: np.ndarray, key: np.uint64, start: np.uint64, limit: np.uint64) -> None:
    """d[j] *= 1 if splitmix64 output z of element start + j (rng._mixed) is below `limit`
    else 0, in float32: rng.keep_mask's mask times d, without the mask array. All integer
    arithmetic is uint64 (wrapping, as numpy's): a mixed int64/uint64 op would go to float."""
    x = key + (start + np.uint64(1)) * _GAMMA
    for j in range(d.size):
        z = x + np.uint64(j) * _GAMMA
        z = (z ^ (z >> np.uint64(30))) * _MIX1
        z = (z ^ (z >> np.uint64(27))) * _MIX2
        z = z ^ (z >> np.uint64(31))
        d[j] = d[j] * (_F1 if z < limit else _F0)


@_jit
def fold_first(x: np.ndarray, w: np.float32, acc: np.ndarray) -> None:
    """fold's first live term into the float32 accumulator: x·w, or x itself for w = 1
    (float16 bits or float32 `x`)."""
    assert acc.size == x.size
    if w == _F1:
        for i in range(x.size):
            acc[i] = _wide(x[i])
    else:
        for i in range(x.size):
            acc[i] = _wide(x[i]) * w


@_jit
def fold_add(x: np.ndarray, w: np.float32, acc: np.ndarray) -> None:
    """acc += x·w in float32, element by element: fold's next term (x·1 and x·(−1) are
    exact, so this is also its add_ and sub_ of x)."""
    assert acc.size == x.size
    for i in range(x.size):
        acc[i] += _wide(x[i]) * w


@_jit
def fold_round(acc: np.ndarray, out: np.ndarray) -> bool:
    """The float32 sum rounded into `out` (float16 bits), NaNs canonical; whether it holds
    Inf/NaN."""
    assert out.size == acc.size
    special = np.uint16(0)
    for i in range(acc.size):
        special |= _put(out, i, acc[i])
    return _settle(out, special)


@_jit
def widen_half(a: np.ndarray, out: np.ndarray) -> None:
    """out = a's float16 values as float32 (exact): what block_sums takes. One vectorised
    loop, 0.1 ns per element, where block_sums widening as it reads took 4 ns (no longer
    vectorised) and numpy's astype 1.8 ns."""
    assert out.size == a.size
    for i in range(a.size):
        out[i] = _wide(a[i])


@_jit
def copy_half(a: np.ndarray, out: np.ndarray) -> bool:
    """out = a, float16 bits to float16 bits (copy's value, and a tensor no LoRA touches):
    what widening, rounding back and canonical_nans give, i.e. a itself with canonical NaNs;
    whether it holds Inf/NaN (`_settle`)."""
    assert out.size == a.size
    special = np.uint16(0)
    for i in range(a.size):
        h = a[i]
        out[i] = h
        special |= ((h & _H_EXP) + _H_CARRY) & _H_SIGN
    return _settle(out, special)


@_jit
def lincomb(a: np.ndarray, b: np.ndarray, ca: np.float32, cb: np.float32, out: np.ndarray) -> bool:
    """out = a·ca + b·cb in float32, element by element (slerp's tiles); a float16 `out`
    rounded, and whether it holds Inf/NaN (`_settle`)."""
    assert b.size == a.size and out.size == a.size
    special = np.uint16(0)
    for i in range(a.size):
        special |= _put(out, i, _wide(a[i]) * ca + _wide(b[i]) * cb)
    return _settle(out, special)


@_jit
def bake(a: np.ndarray, ds: tuple[np.ndarray, ...], ss: np.ndarray, out: np.ndarray) -> bool:
    """bake_lora's float32 ops, element by element: a, then + ds[0]·ss[0], then + ds[1]·ss[1],
    ... (each product rounded to float32, then each sum: torch's `d.mul(s)` then `add_`); `a`
    float16 bits or float32, the ΔW `ds` float32. A float16 `out` rounded, and whether it holds
    Inf/NaN (`_settle`). One pass instead of a widening copy, two ops per LoRA, a cast and a
    check: baking two LoRAs into SDXL spent 12.6% of 29 s of CPU on those, 5.8% in this loop."""
    assert a.size == out.size
    for d in ds:
        assert d.size == out.size
    special = np.uint16(0)
    for i in range(out.size):
        v = _wide(a[i])
        for k in range(len(ds)):
            v = v + ds[k][i] * ss[k]
        special |= _put(out, i, v)
    return _settle(out, special)


@_jit
def blend_rows(
    a: np.ndarray, b: np.ndarray, ka: np.ndarray, kb: np.ndarray, out: np.ndarray
) -> bool:
    """out[r, j] = a[r, j]·ka[j] + b[r, j]·kb[j] in float32 (the cosine methods' tiles); a
    float16 `out` rounded, and whether it holds Inf/NaN (`_settle`)."""
    rows, cols = a.shape
    assert b.shape == a.shape and out.shape == a.shape and ka.size == cols and kb.size == cols
    special = np.uint16(0)
    for r in range(rows):
        ar, br, o = a[r], b[r], out[r]
        for j in range(cols):
            special |= _put(o, j, _wide(ar[j]) * ka[j] + _wide(br[j]) * kb[j])
    return _settle(out, special)


def warm() -> None:
    """Compile every loop now (numba caches the machine code on disk): `make install` calls
    this so that no build pays the compile (~1-2 s each time this file changes)."""
    x = np.zeros(BLOCK, dtype=np.float32)
    block_sums(x, x, np.zeros((3, 1)))
    column_sums(x.reshape(-1, 8), x.reshape(-1, 8), 4, np.zeros((3, 8)))
    difference_sums(x, x, x, np.zeros((5, 8)))
    train_difference(x, x, x, np.float32(1), np.empty_like(x))
    d = np.zeros((2, 8), dtype=np.float32)
    ones = np.ones(2, dtype=np.float32)
    ties_combine(d, ones, ones, True, np.float32(1), x[:8], np.empty(8, np.float32))
    h8, scratch = np.zeros(8, dtype=np.uint16), np.zeros((3, 8), dtype=np.float32)
    for n in range(1, TIES_TILE_MODELS + 1):  # one compiled loop per number of models
        rows = np.zeros((n, 8), dtype=np.float32)
        wn = np.ones(n, dtype=np.float32)
        keys = np.zeros(0, dtype=np.uint64)
        args = (0, wn, wn, True, np.float32(1), rows, scratch, h8.copy())
        ties_tile((h8,) * n, h8, *args, keys, np.uint64(0), np.uint64(0))
    lincomb(x, x, np.float32(1), np.float32(1), np.empty_like(x))
    drop(x, np.uint64(1), np.uint64(0), np.uint64(1))
    rows = x.reshape(-1, 8)
    blend_rows(rows, rows, x[:8], x[:8], np.empty_like(rows))
    difference_sums(x, x, x[:0], np.zeros((5, 8)))
    h = np.zeros(BLOCK, dtype=np.uint16)  # float16 bits: the same loops without copies
    copy_half(h, np.empty_like(h))
    widen_half(h, np.empty(h.size, dtype=np.float32))
    column_sums(h.reshape(-1, 8), h.reshape(-1, 8), 4, np.zeros((3, 8)))
    difference_sums(h, h, h, np.zeros((5, 8)))
    lincomb(h, h, np.float32(1), np.float32(1), np.empty_like(h))
    train_difference(h, h, h, np.float32(1), np.empty_like(h))
    weighted3(h, h, h, np.float32(1), np.float32(1), np.float32(1), 7, np.empty_like(h))
    acc = np.empty(h.size, dtype=np.float32)
    fold_first(h, np.float32(1), acc)
    fold_add(h, np.float32(-1), acc)
    fold_round(acc, np.empty_like(h))
    members = np.empty((2, h.size), dtype=np.uint16)
    one = np.ones(2, dtype=np.uint8)
    add_difference_many(h, h, h, x[:2], one, members, np.empty(2, dtype=np.bool_))
    delta_strided(h, h, np.uint64(3), x[:8])
    delta_strided(x, x, np.uint64(3), x[:8].copy())
    cand = np.empty(8, dtype=np.uint32)
    abs_delta_window(h, h, np.uint32(0), np.uint32(1), cand)
    abs_delta_window(x, x, np.uint32(0), np.uint32(1), cand)
    for n in range(1, BAKE_LORAS + 1):  # one compiled loop per number of LoRAs
        for base in (h, x):
            bake(base, (x,) * n, np.ones(n, dtype=np.float32), np.empty_like(h))
    hrows = h.reshape(-1, 8)
    blend_rows(hrows, hrows, x[:8], x[:8], np.empty_like(hrows))
