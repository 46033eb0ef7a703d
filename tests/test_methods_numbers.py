"""Each new merge method against an independent float64 numpy reference, written here from the
formula in its description (never from its code), on random tensors and edge cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mergebuild.engine.methods import REGISTRY, ComputeContext

EPS = float(np.finfo(np.float32).eps)
SHAPES = [(6, 5), (4, 3, 3, 3), (7,), (1, 5), (300, 700)]


def rand(shape: tuple[int, ...], seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(dtype)


def run(name: str, xs: list[torch.Tensor], **params: object) -> np.ndarray:
    m = REGISTRY[name]
    before = [x.clone() for x in xs]
    out = m.compute(m.Params.model_validate(params), xs)
    assert out.dtype == torch.float32 and out.shape == xs[0].shape
    for x, b in zip(xs, before, strict=True):  # inputs never modified
        assert torch.equal(x, b)
    return out.numpy().astype(np.float64)


def f64(x: torch.Tensor) -> np.ndarray:
    return x.to(torch.float64).numpy()


def assert_close(out: np.ndarray, ref: np.ndarray, scale: np.ndarray | float, k: float = 8) -> None:
    """|out − ref| within k float32 roundings of the magnitudes involved."""
    err = np.abs(out - ref)
    bound = k * EPS * np.maximum(np.abs(scale), 1e-30)
    assert np.all(err <= bound), f"max err {err.max():.3g}, worst ratio {(err / bound).max():.3g}"


# -- elementwise ------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("alpha,beta", [(0.3, 0.2), (0.0, 0.0), (1.0, 0.0), (-0.5, 1.25)])
def test_triple_sum(dtype: torch.dtype, alpha: float, beta: float) -> None:
    a, b, c = (rand((40, 33), s, dtype) for s in (1, 2, 3))
    out = run("triple_sum", [a, b, c], alpha=alpha, beta=beta)
    A, B, C = f64(a), f64(b), f64(c)
    ref = A * (1 - alpha - beta) + B * alpha + C * beta
    assert_close(out, ref, np.abs(A) + np.abs(B) + np.abs(C))
    if alpha == beta == 0:
        assert np.array_equal(out, A)  # a exactly


@pytest.mark.parametrize("alpha,beta", [(0.3, 0.2), (0.0, 0.5), (1.0, 0.25), (0.7, 1.0), (0.4, 0)])
def test_sum_twice(alpha: float, beta: float) -> None:
    a, b, c = (rand((5, 4, 3, 3), s, torch.float16) for s in (4, 5, 6))
    out = run("sum_twice", [a, b, c], alpha=alpha, beta=beta)
    A, B, C = f64(a), f64(b), f64(c)
    ref = (A * (1 - alpha) + B * alpha) * (1 - beta) + C * beta
    assert_close(out, ref, np.abs(A) + np.abs(B) + np.abs(C))
    if beta == 1:
        assert np.array_equal(out, C)


def train_difference_ref(A: np.ndarray, B: np.ndarray, C: np.ndarray, alpha: float) -> np.ndarray:
    d = B - C
    n = np.abs(B - A)
    s = np.abs(d) + n
    with np.errstate(invalid="ignore", divide="ignore"):
        q = np.where(s > 0, n / s, 0.0)
    return np.where(d == 0, A, A + 1.8 * alpha * np.sign(d) * q * np.abs(d))


@pytest.mark.parametrize("compiled", [False, True])  # torch ops; _kernels.train_difference
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("alpha", [1.0, 0.35, -2.0])
def test_train_difference(
    dtype: torch.dtype, alpha: float, compiled: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mergebuild.engine.methods import reduce, train_difference

    monkeypatch.setattr(train_difference, "COMPILED_TILE", 0 if compiled else 1 << 40)
    monkeypatch.setattr(reduce, "ONCE_LOADED", compiled)
    a, b, c = (rand((64, 17), s, dtype) for s in (7, 8, 9))
    b[:5] = c[:5]  # b == c on some rows: a exactly there
    b[5:8] = a[5:8]  # b == a: nothing added
    a[8, :] = 0
    b[8, :] = 0
    c[8, :] = 0  # all zero: s == 0
    a[0, :3] = -0.0  # b == c there: a's −0.0 kept, sign included
    out = run("train_difference", [a, b, c], alpha=alpha)
    A, B, C = f64(a), f64(b), f64(c)
    ref = train_difference_ref(A, B, C, alpha)
    assert_close(out, ref, np.abs(A) + 1.8 * abs(alpha) * np.abs(B - C))
    assert np.array_equal(out[:5], A[:5]) and np.array_equal(out[8], A[8])
    assert np.array_equal(np.signbit(out[:5]), np.signbit(A[:5]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_train_difference_compiled_loop_gives_torch_bits(
    dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The compiled loop and the torch ops give the same bits, awkward values included: inf,
    NaN, ±0, subnormals, b == c, b == a, |d| + n overflowing."""
    from mergebuild.engine.methods import reduce, train_difference

    g = np.random.default_rng(3)
    n = 5000
    xs = [g.standard_normal(n).astype(np.float32) * np.exp(g.standard_normal(n) * 3) for _ in "abc"]
    specials = [np.inf, -np.inf, np.nan, 0.0, -0.0, 1e-40, -1e-45, 3e38, -3e38]
    for x in xs:
        x[g.choice(n, 300, replace=False)] = g.choice(np.array(specials, np.float32), 300)
    xs[2][:200] = xs[1][:200]  # b == c
    xs[0][200:400] = xs[1][200:400]  # b == a
    a, b, c = (torch.from_numpy(x).to(dtype) for x in xs)
    for alpha in (1.0, -0.7, 1e30):
        bits = []
        for tile in (0, 1 << 40):
            monkeypatch.setattr(train_difference, "COMPILED_TILE", tile)
            monkeypatch.setattr(reduce, "ONCE_LOADED", tile == 0)
            out = REGISTRY["train_difference"].compute(
                REGISTRY["train_difference"].Params(alpha=alpha), [a, b, c]
            )
            bits.append(out.numpy().view(np.uint32).copy())
        assert np.array_equal(bits[0], bits[1]), alpha


def test_train_difference_b_equals_c_whole_tensor() -> None:
    """SuperMerger skips a key whose b and c are equal: the result is exactly a."""
    a, b = rand((9, 9), 10, torch.float16), rand((9, 9), 11, torch.float16)
    assert np.array_equal(run("train_difference", [a, b, b.clone()], alpha=1.0), f64(a))


# -- whole-tensor -----------------------------------------------------------------------------


def column_cos(A: np.ndarray, B: np.ndarray) -> np.ndarray:
    a2, b2 = A.reshape(A.shape[0], -1) if A.ndim > 1 else A[:, None], None
    b2 = B.reshape(B.shape[0], -1) if B.ndim > 1 else B[:, None]
    cos = np.zeros(a2.shape[1])
    for j in range(a2.shape[1]):
        na, nb = np.linalg.norm(a2[:, j]), np.linalg.norm(b2[:, j])
        cos[j] = a2[:, j] @ b2[:, j] / (na * nb) if na > 0 and nb > 0 else 0.0
    return cos


def cosine_ref(A: np.ndarray, B: np.ndarray, variant: str, alpha: float, lo: float, hi: float):
    cos = column_cos(A, B)
    if variant == "a":
        cols = A.reshape(A.shape[0], -1) if A.ndim > 1 else A[:, None]
        colsb = B.reshape(B.shape[0], -1) if B.ndim > 1 else B[:, None]
        na = np.count_nonzero(np.linalg.norm(cols, axis=0) > 0)
        nb = np.count_nonzero(np.linalg.norm(colsb, axis=0) > 0)
        second = cos.sum() / np.sqrt(na * nb)
        alpha = abs(alpha)
    else:
        second = (A.ravel() @ B.ravel()) / (np.linalg.norm(A) * np.linalg.norm(B))
    k = np.clip(((cos + second) / 2 - lo) / (hi - lo) - alpha, 0, 1)
    k = k.reshape((1, *A.shape[1:]) if A.ndim > 1 else (1,))
    return A * k + B * (1 - k)


@pytest.mark.parametrize("variant", ["a", "b"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("alpha,lo,hi", [(0.0, 0.0, 1.0), (0.2, -0.5, 0.8), (-0.1, 0.3, 0.9)])
def test_add_cosine(variant: str, shape: tuple, alpha: float, lo: float, hi: float) -> None:
    a = rand(shape, 12, torch.float16)
    b = (a.float() * 0.8 + rand(shape, 13) * 0.6).half()  # related: similarities spread out
    if len(shape) > 1 and shape[1] > 2:
        a[:, 1] = 0  # an all-zero column: similarity 0
    out = run(f"add_cosine_{variant}", [a, b], alpha=alpha, sim_min=lo, sim_max=hi)
    A, B = f64(a), f64(b)
    assert_close(out, cosine_ref(A, B, variant, alpha, lo, hi), np.abs(A) + np.abs(B))


def test_add_cosine_identical_inputs_keep_a() -> None:
    """cos = 1 everywhere: k = 1 − alpha clipped; with alpha 0 the result is a exactly."""
    a = rand((8, 6), 14, torch.float16)
    for v in "ab":
        assert np.array_equal(run(f"add_cosine_{v}", [a, a.clone()], alpha=0.0), f64(a))


def reflect_index(i: int, n: int) -> int:
    """scipy's 'reflect' (d c b a | a b c d | d c b a) for any i."""
    period = 2 * n
    i %= period
    return i if i < n else period - 1 - i


def median3(D: np.ndarray) -> np.ndarray:
    """3×…×3 median with scipy's 'reflect' edges (numpy's 'symmetric' padding): the median
    of the 3**ndim shifted copies of the padded array."""
    P = np.pad(D, 1, mode="symmetric")
    shifts = [
        P[tuple(slice(o, o + n) for o, n in zip(off, D.shape, strict=True))]
        for off in np.ndindex(*([3] * D.ndim))
    ]
    return np.median(np.stack(shifts), axis=0)


def gauss(D: np.ndarray, sigma: float) -> np.ndarray:
    r = int(4 * sigma + 0.5)
    w = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    w /= w.sum()
    for ax in range(D.ndim):
        n = D.shape[ax]
        out = np.zeros_like(D)
        for t, wt in zip(range(-r, r + 1), w, strict=True):
            idx = [reflect_index(i + t, n) for i in range(n)]
            out += wt * np.take(D, idx, axis=ax)
        D = out
    return D


@pytest.mark.parametrize("shape", [(6, 5), (3, 2, 3, 3), (7,), (1, 5), (2, 9)])
@pytest.mark.parametrize("alpha", [1.0, 0.4])
def test_smooth_add(shape: tuple, alpha: float) -> None:
    a, b, c = (rand(shape, s, torch.float16) for s in (15, 16, 17))
    out = run("smooth_add", [a, b, c], alpha=alpha)
    A, B, C = f64(a), f64(b), f64(c)
    ref = A + alpha * gauss(median3(B - C), 1.0)
    assert_close(out, ref, np.abs(A) + 4 * (np.abs(B).max() + np.abs(C).max()), k=16)


def test_smooth_add_b_equals_c_and_alpha_zero() -> None:
    a, b = rand((5, 5), 18, torch.float16), rand((5, 5), 19, torch.float16)
    assert np.array_equal(run("smooth_add", [a, b, b.clone()], alpha=0.7), f64(a))
    assert np.array_equal(run("smooth_add", [a, b, a], alpha=0.0), f64(a))


def extract_ref(A, B, C, alpha: float, beta: float, gamma: float) -> np.ndarray:
    u, v = B - A, C - A
    u2, v2 = u.reshape(-1, u.shape[-1]), v.reshape(-1, v.shape[-1])
    nu = np.maximum(np.linalg.norm(u2, axis=1), 1e-8)
    nv = np.maximum(np.linalg.norm(v2, axis=1), 1e-8)
    cos = np.einsum("ij,ij->i", u2, v2) / (nu * nv)
    d = ((np.clip(cos, -1, 1) + 1) / 2) ** gamma
    m = (d * (1 - beta) + (1 - d) * beta).reshape((*u.shape[:-1], 1))
    return A + (u * (1 - alpha) + v * alpha) * m


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("alpha,beta,gamma", [(0.5, 0.0, 1.0), (0.0, 1.0, 2.0), (1, 0.3, 0.0)])
def test_extract(shape: tuple, alpha: float, beta: float, gamma: float) -> None:
    a, b, c = (rand(shape, s, torch.float16) for s in (20, 21, 22))
    c[..., 0] = a[..., 0]  # c == a on a slice: a zero difference in part of each row
    out = run("extract", [a, b, c], alpha=alpha, beta=beta, gamma=gamma)
    A, B, C = f64(a), f64(b), f64(c)
    ref = extract_ref(A, B, C, alpha, beta, gamma)
    assert_close(out, ref, np.abs(A) + np.abs(B - A) + np.abs(C - A))


def test_extract_b_and_c_equal_a() -> None:
    a = rand((4, 6), 23, torch.float16)
    assert np.array_equal(run("extract", [a, a.clone(), a.clone()], alpha=0.5), f64(a))


def slerp_ref(A: np.ndarray, B: np.ndarray, alpha: float) -> np.ndarray:
    na, nb = np.linalg.norm(A), np.linalg.norm(B)
    lerp = A * (1 - alpha) + B * alpha
    if na == 0 or nb == 0:
        return lerp
    ah, bh = A / na, B / nb
    omega = np.arccos(np.clip(np.sum(ah * bh), -1, 1))
    if np.sin(omega) < 1e-6:
        return lerp
    res = (np.sin((1 - alpha) * omega) * ah + np.sin(alpha * omega) * bh) / np.sin(omega)
    return res * ((1 - alpha) * na + alpha * nb)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("alpha", [0.3, 0.5, 0.9, -0.2])
def test_slerp(dtype: torch.dtype, shape: tuple, alpha: float) -> None:
    a, b = rand(shape, 24, dtype), rand(shape, 25, dtype)
    out = run("slerp", [a, b], alpha=alpha)
    A, B = f64(a), f64(b)
    assert_close(out, slerp_ref(A, B, alpha), np.abs(A) + np.abs(B), k=16)


@pytest.mark.parametrize(
    "make_b",
    [
        lambda a: a * 2,  # parallel
        lambda a: -a,  # antiparallel
        lambda a: a.clone(),  # identical
        lambda a: torch.zeros_like(a),  # zero norm
    ],
    ids=["parallel", "antiparallel", "identical", "zero"],
)
def test_slerp_falls_back_to_lerp(make_b) -> None:
    a = rand((16, 8), 26, torch.float16)
    b = make_b(a)
    out = run("slerp", [a, b], alpha=0.3)
    A, B = f64(a), f64(b)
    assert_close(out, A * 0.7 + B * 0.3, np.abs(A) + np.abs(B))


def test_slerp_nonfinite_input_falls_back() -> None:
    a, b = rand((4, 4), 27), rand((4, 4), 28)
    b[0, 0] = float("inf")
    out = run("slerp", [a, b], alpha=0.5)
    A, B = f64(a), f64(b)
    with np.errstate(invalid="ignore"):
        assert np.array_equal(out[1:], (A * 0.5 + B * 0.5)[1:].astype(np.float32))
    assert np.isinf(out[0, 0])


def test_slerp_exact_ends() -> None:
    a, b = rand((5, 3), 29, torch.float16), rand((5, 3), 30, torch.float16)
    assert np.array_equal(run("slerp", [a, b], alpha=0.0), f64(a))
    assert np.array_equal(run("slerp", [a, b], alpha=1.0), f64(b))


@pytest.mark.parametrize("name", ["slerp", "add_cosine_a", "add_cosine_b", "extract"])
def test_whole_tensor_bytes_do_not_depend_on_threads(name: str) -> None:
    """The float64 reductions use a fixed order: the same bits with 1 or 2 torch threads."""
    xs = [rand((300, 700), s) for s in (31, 32, 33)][: len(REGISTRY[name].slots)]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run(name, xs, alpha=0.3)
        torch.set_num_threads(2)
        two = run(name, xs, alpha=0.3)
    finally:
        torch.set_num_threads(threads)
    assert one.tobytes() == two.tobytes()


def test_tiled_passes_each_tile_its_offset(monkeypatch: pytest.MonkeyPatch) -> None:
    """A needs_context method sees, per tile, the flat offset of its first element."""
    from mergebuild.engine import compute
    from mergebuild.engine.methods.base import Method, Params

    seen: list[tuple[int, int]] = []

    class Probe(Method):
        name = "probe_ctx"
        needs_context = True

        @staticmethod
        def compute(params: Params, xs: list[torch.Tensor], ctx: ComputeContext) -> torch.Tensor:
            seen.append((ctx.offset, xs[0].numel()))
            return xs[0].to(torch.float32) + ctx.offset

    monkeypatch.setattr(compute, "TILE_ELEMENTS", 10)
    x = torch.zeros(35)
    ctx = ComputeContext("k", 100, 1000, "key", 0)
    out, _ = compute._tiled(Probe, Params(), [x], torch.float32, ctx)
    assert seen == [(100, 10), (110, 10), (120, 10), (130, 5)]
    assert out.tolist() == [100.0 + 10 * (i // 10) for i in range(35)]
