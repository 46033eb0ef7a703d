"""Task-vector methods against float64 numpy references written here from their formulas.

Each reference starts from the float32 task vectors δᵢ = float32(mᵢ − base) (the methods
define δ as that float32 difference) and does everything else in float64; the method's float32
arithmetic must agree within float32 rounding. Inputs on a coarse grid (k/32) make ties at the
TIES threshold frequent and δ exact.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from mergebuild.engine import rng
from mergebuild.engine.methods import REGISTRY
from mergebuild.engine.methods.base import ComputeContext

NODE = "0123456789abcdef" * 4


def ctx(tensor: str = "model.w", offset: int = 0, numel: int = 0, seed: int = 0) -> ComputeContext:
    return ComputeContext(tensor=tensor, offset=offset, numel=numel, node_key=NODE, seed=seed)


def grid(rs: np.random.Generator, n: int, shape: tuple[int, ...], lo: int = -64) -> list:
    return [(rs.integers(lo, 65, size=shape) / 32).astype(np.float32) for _ in range(n)]


def smooth(rs: np.random.Generator, n: int, shape: tuple[int, ...]) -> list:
    base = rs.normal(size=shape).astype(np.float32)
    return [base] + [(base + 0.1 * rs.normal(size=shape)).astype(np.float32) for _ in range(n)]


def run(name: str, arrays: list, c: ComputeContext | None = None, **params) -> np.ndarray:
    m = REGISTRY[name]
    p = m.Params(**params)
    xs = [torch.from_numpy(a.copy()) for a in arrays]
    before = [x.clone() for x in xs]
    out = m.compute(p, xs, c or ctx(numel=xs[0].numel())) if m.needs_context else m.compute(p, xs)
    assert out.dtype == torch.float32 and out.shape == xs[0].shape
    for x, b in zip(xs, before, strict=True):  # inputs are never modified
        assert torch.equal(x, b)
    return out.numpy()


def deltas32(arrays: list) -> list[np.ndarray]:
    base = arrays[0].astype(np.float32)
    return [(m.astype(np.float32) - base).astype(np.float64).reshape(-1) for m in arrays[1:]]


def close(got: np.ndarray, want: np.ndarray, scale: float = 1.0) -> None:
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=2e-6 * scale)


# ---------------------------------------------------------------- references (float64)


def ref_trim(d: np.ndarray, k: float) -> np.ndarray:
    j = max(int((1.0 - k) * d.size), 1)
    thr = np.sort(np.abs(d))[j - 1]
    return np.where(np.abs(d) >= thr, d, 0.0)


def ref_disjoint(taus: list[np.ndarray], weights: list[float], vote: str) -> np.ndarray:
    t = np.stack(taus)
    w = np.asarray(weights, dtype=np.float64)[:, None]
    elected = np.sign(t.sum(0)) if vote == "magnitude" else np.sign(np.sign(t).sum(0))
    agree = (np.sign(t) == elected) & (elected != 0)
    num = (t * agree).sum(0)
    den = (w * agree).sum(0)
    return np.where(den > 0, num / np.where(den > 0, den, 1.0), 0.0)


def ref_ties(arrays, k=0.2, vote="magnitude", alpha=1.0, weights=None, ds=None, rescale=1.0):
    ds = deltas32(arrays) if ds is None else ds
    weights = [1.0] * len(ds) if weights is None else weights
    taus = [w * ref_trim(d, k) for d, w in zip(ds, weights, strict=True)]
    merged = ref_disjoint(taus, weights, vote) * rescale
    return (arrays[0].astype(np.float64).reshape(-1) + alpha * merged).reshape(arrays[0].shape)


def ref_keep(seed: int, tensor: str, i: int, n: int, q) -> np.ndarray:
    return rng.uniform(seed, NODE, f"{tensor}#{i}", 0, n).numpy() < q


# ---------------------------------------------------------------- ties


@pytest.mark.parametrize("n", [1, 2, 5])
@pytest.mark.parametrize("k", [0.05, 0.2, 0.5, 1.0])
@pytest.mark.parametrize("vote", ["magnitude", "count"])
def test_ties_matches_reference_on_a_grid(n, k, vote):
    rs = np.random.default_rng(n * 100 + int(k * 10))
    arrays = grid(rs, n + 1, (17, 23))
    got = run("ties", arrays, k=k, vote=vote, alpha=0.7)
    close(got, ref_ties(arrays, k=k, vote=vote, alpha=0.7), 2.0)


@pytest.mark.parametrize("weights", [[1.0, 1.0, 1.0], [0.5, 2.0, 1.0], [0.0, 1.0, 3.0]])
def test_ties_weights(weights):
    arrays = smooth(np.random.default_rng(3), 3, (40, 33))
    got = run("ties", arrays, k=0.3, weights=weights, alpha=1.0)
    close(got, ref_ties(arrays, k=0.3, weights=weights), 3.0)


def test_ties_threshold_ties_are_all_kept():
    """Every |δ| equal: the threshold equals them all, so k has no effect."""
    base = np.zeros(100, np.float32)
    m = np.full(100, 0.5, np.float32)
    m[::2] = -0.5
    for k in (0.01, 0.5, 1.0):
        np.testing.assert_array_equal(run("ties", [base, m], k=k), m)


def test_ties_keeps_sd_mecha_count_of_elements():
    """k = 0.2 of 10 distinct values: j = 8, so the 3 largest |δ| survive."""
    base = np.zeros(10, np.float32)
    m = np.arange(1, 11, dtype=np.float32) * np.array([1, -1] * 5, np.float32)
    got = run("ties", [base, m], k=0.2)
    np.testing.assert_array_equal(got, np.where(np.abs(m) >= 8, m, 0))


def test_ties_all_zero_deltas_and_model_equal_to_base():
    rs = np.random.default_rng(1)
    base = grid(rs, 1, (64,))[0]
    np.testing.assert_array_equal(run("ties", [base, base, base], k=0.3), base)
    other = grid(rs, 1, (64,))[0]
    # a model equal to base adds zeros: it neither votes nor counts in the mean
    got = run("ties", [base, base, other], k=1.0)
    close(got, ref_ties([base, base, other], k=1.0))
    np.testing.assert_array_equal(got, other)


def test_ties_opposite_signs_cancel():
    base = np.zeros(50, np.float32)
    m = np.linspace(-2, 2, 50).astype(np.float32)
    for vote in ("magnitude", "count"):
        np.testing.assert_array_equal(run("ties", [base, m, -m], k=1.0, vote=vote), base)
    # unequal magnitudes: magnitude vote picks the larger side, count vote ties at 0
    got = run("ties", [base, m, -2 * m], k=1.0, vote="magnitude")
    np.testing.assert_array_equal(got, -2 * m)
    np.testing.assert_array_equal(run("ties", [base, m, -2 * m], k=1.0, vote="count"), base)


def test_ties_alpha_zero_is_exactly_base():
    arrays = grid(np.random.default_rng(0), 3, (30,))
    arrays[0] = arrays[0].astype(np.float16)
    got = run("ties", arrays, k=0.5, alpha=0.0)
    np.testing.assert_array_equal(got, arrays[0].astype(np.float32))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_ties_half_inputs(dtype):
    arrays = grid(np.random.default_rng(5), 3, (20, 20))
    xs = [torch.from_numpy(a).to(dtype) for a in arrays]
    p = REGISTRY["ties"].Params(k=0.4)
    got = REGISTRY["ties"].compute(p, xs).numpy()
    close(got, ref_ties([x.float().numpy() for x in xs], k=0.4), 2.0)


# ---------------------------------------------------------------- dare


@pytest.mark.parametrize("p", [0.0, 0.3, 0.9])
@pytest.mark.parametrize("n", [1, 3])
def test_dare_matches_reference(p, n):
    rs = np.random.default_rng(int(p * 10) + n)
    arrays = smooth(rs, n, (31, 29))
    weights = [0.5 + i for i in range(n)]
    got = run("dare", arrays, ctx(numel=arrays[0].size, seed=11), p=p, alpha=0.8, weights=weights)
    ds = deltas32(arrays)
    acc = sum(
        w * np.where(ref_keep(11, "model.w", i, d.size, 1 - p), d, 0.0)
        for i, (d, w) in enumerate(zip(ds, weights, strict=True), start=1)
    )
    want = arrays[0].astype(np.float64) + (0.8 / (1 - p)) * acc.reshape(arrays[0].shape)
    close(got, want, 5.0)


def test_dare_p0_is_task_arithmetic():
    arrays = smooth(np.random.default_rng(9), 2, (100,))
    got = run("dare", arrays, p=0.0, alpha=1.0)
    ds = deltas32(arrays)
    close(got, arrays[0] + ds[0] + ds[1])


@pytest.mark.parametrize(
    "cuts", [[0, 1000], [0, 1, 999, 1000], [0, 262144 - 7, 262144 + 7, 300000]]
)
def test_dare_chunks_give_the_same_bytes(cuts):
    numel = cuts[-1]
    arrays = smooth(np.random.default_rng(2), 2, (numel,))
    whole = run("dare", arrays, ctx(numel=numel, seed=4), p=0.6)
    parts = [
        run("dare", [a[lo:hi] for a in arrays], ctx(offset=lo, numel=numel, seed=4), p=0.6)
        for lo, hi in itertools.pairwise(cuts)
    ]
    assert np.concatenate(parts).tobytes() == whole.tobytes()


def test_dare_drop_rate_and_stream_independence():
    n = 200_000
    base = np.zeros(n, np.float32)
    ones = np.ones(n, np.float32)
    got = run("dare", [base, ones, 2 * ones], ctx(numel=n, seed=1), p=0.7, weights=[1.0, 0.0])
    kept = got != 0
    assert abs(kept.mean() - 0.3) < 6 * np.sqrt(0.3 * 0.7 / n)
    np.testing.assert_allclose(got[kept], 1 / 0.3, rtol=1e-6)
    # the two models get independent masks: both kept ~ 0.3², values 1/0.3 + 2/0.3
    both = run("dare", [base, ones, 2 * ones], ctx(numel=n, seed=1), p=0.7)
    frac = np.isclose(both, 3 / 0.3).mean()
    assert abs(frac - 0.09) < 6 * np.sqrt(0.09 * 0.91 / n)
    # another seed, another tensor name: other masks
    other = run("dare", [base, ones, 2 * ones], ctx(numel=n, seed=2), p=0.7, weights=[1.0, 0.0])
    assert np.mean((other != 0) != kept) > 0.05
    renamed = run(
        "dare", [base, ones, ones], ctx("model.v", numel=n, seed=1), p=0.7, weights=[1.0, 0.0]
    )
    assert np.mean((renamed != 0) != kept) > 0.05


# ---------------------------------------------------------------- dare_ties


@pytest.mark.parametrize(
    ("p", "k", "n"), [(0.0, 1.0, 2), (0.5, 1.0, 3), (0.8, 0.3, 5), (0.3, 0.6, 1)]
)
def test_dare_ties_matches_reference(p, k, n):
    arrays = grid(np.random.default_rng(int(p * 100) + n), n + 1, (25, 26))
    c = ctx(numel=arrays[0].size, seed=8)
    got = run("dare_ties", arrays, c, p=p, k=k, vote="magnitude", alpha=0.9)
    ds = [
        np.where(ref_keep(8, "model.w", i, d.size, 1 - p), d, 0.0)
        for i, d in enumerate(deltas32(arrays), start=1)
    ]
    close(got, ref_ties(arrays, k=k, alpha=0.9, ds=ds, rescale=1 / (1 - p)), 10.0)


def test_dare_ties_p0_equals_ties():
    arrays = grid(np.random.default_rng(4), 4, (300,))
    a = run("dare_ties", arrays, p=0.0, k=0.3, vote="count")
    b = run("ties", arrays, k=0.3, vote="count")
    assert a.tobytes() == b.tobytes()


def test_dare_ties_masks_are_the_dare_masks():
    """Same seed, node, tensor: dare_ties drops exactly the elements dare drops (one model)."""
    n = 5000
    base = np.zeros(n, np.float32)
    m = np.random.default_rng(0).normal(size=n).astype(np.float32)
    c = ctx(numel=n, seed=3)
    a = run("dare", [base, m], c, p=0.5)
    b = run("dare_ties", [base, m], c, p=0.5)
    np.testing.assert_array_equal(a != 0, b != 0)
    close(a, b, 4.0)


# ---------------------------------------------------------------- della


def ref_della(arrays, p, eps, seed, alpha=1.0, vote="magnitude", weights=None, tensor="model.w"):
    ds = []
    for i, d in enumerate(deltas32(arrays), start=1):
        n = d.size
        order = np.argsort(np.abs(d), kind="stable")
        rank = np.empty(n)
        rank[order] = np.arange(1, n + 1)
        q = np.clip(1 - p + eps * (rank / n - (n + 1) / (2 * n)), 0, 1)
        keep = rng.uniform(seed, NODE, f"{tensor}#{i}", 0, n).numpy() < q
        ds.append(np.where(keep, d / np.where(q > 0, q, 1), 0.0))
    return ref_ties(arrays, k=1.0, vote=vote, alpha=alpha, weights=weights, ds=ds)


@pytest.mark.parametrize(
    ("p", "eps", "n"), [(0.0, 0.0, 2), (0.5, 0.2, 3), (0.9, 0.1, 2), (0.3, 1.0, 4)]
)
def test_della_matches_reference(p, eps, n):
    arrays = smooth(np.random.default_rng(int(p * 10 + eps * 100)), n, (37, 19))
    c = ctx(numel=arrays[0].size, seed=21)
    got = run("della", arrays, c, p=p, eps=eps, alpha=1.2, weights=[1.0 + i for i in range(n)])
    want = ref_della(arrays, p, eps, 21, alpha=1.2, weights=[1.0 + i for i in range(n)])
    close(got, want, 30.0)


def test_della_keeps_large_magnitudes_more_often():
    n = 100_000
    base = np.zeros(n, np.float32)
    m = np.random.default_rng(1).normal(size=n).astype(np.float32)
    got = run("della", [base, m], ctx(numel=n, seed=5), p=0.5, eps=0.4)
    order = np.argsort(np.abs(m), kind="stable")
    low, high = (got[order[: n // 10]] != 0).mean(), (got[order[-n // 10 :]] != 0).mean()
    # keep probability rises linearly from 0.3 to 0.7 with the rank
    assert abs(low - 0.32) < 0.02 and abs(high - 0.68) < 0.02
    assert abs((got != 0).mean() - 0.5) < 6 * np.sqrt(0.25 / n)


def test_della_eps0_p0_is_ties_without_trim():
    arrays = grid(np.random.default_rng(6), 3, (200,))
    a = run("della", arrays, p=0.0, eps=0.0)
    b = run("ties", arrays, k=1.0)
    assert a.tobytes() == b.tobytes()


# ---------------------------------------------------------------- add_perpendicular


def ref_perp(a, b, c, alpha):
    da = (a.astype(np.float32) - c).astype(np.float64).reshape(-1)
    db = (b.astype(np.float32) - c).astype(np.float64).reshape(-1)
    nn = da @ da
    perp = db - (da * (da @ db) / nn if nn > 0 else 0)
    return (a.astype(np.float64).reshape(-1) + alpha * perp).reshape(a.shape)


@pytest.mark.parametrize("alpha", [1.0, 0.4, -0.5])
def test_add_perpendicular_matches_reference(alpha):
    a, b = smooth(np.random.default_rng(7), 1, (64, 48))
    c = (a + np.random.default_rng(8).normal(size=a.shape) * 0.05).astype(np.float32)
    got = run("add_perpendicular", [a, b, c], alpha=alpha)
    close(got, ref_perp(a, b, c, alpha), 3.0)
    # the added part is orthogonal to a − c
    added = (got.astype(np.float64) - a).reshape(-1)
    assert abs(added @ (a - c).astype(np.float64).reshape(-1)) < 1e-4 * np.linalg.norm(added)


def test_add_perpendicular_a_equal_c_is_add_difference():
    a, b = smooth(np.random.default_rng(1), 1, (100,))
    got = run("add_perpendicular", [a, b, a.copy()], alpha=0.5)
    close(got, a + 0.5 * (b.astype(np.float64) - a))


def test_add_perpendicular_parallel_delta_adds_nothing():
    a = np.random.default_rng(2).normal(size=256).astype(np.float32)
    c = np.zeros(256, np.float32)
    got = run("add_perpendicular", [a, 2 * a, c])
    np.testing.assert_allclose(got, a, atol=1e-6)


# ---------------------------------------------------------------- model_stock


def ref_stock(arrays):
    ds = deltas32(arrays)
    n = len(ds)
    cos = []
    for i in range(n):
        for j in range(i + 1, n):
            nn = np.linalg.norm(ds[i]) * np.linalg.norm(ds[j])
            cos.append(0.0 if nn == 0 else ds[i] @ ds[j] / nn)
    c = np.mean(cos)
    t = n * c / (1 + (n - 1) * c) if 1 + (n - 1) * c > 0 else 0.0
    return (arrays[0].astype(np.float64).reshape(-1) + t * np.mean(ds, axis=0)).reshape(
        arrays[0].shape
    ), t


@pytest.mark.parametrize("n", [2, 3, 5])
def test_model_stock_matches_reference(n):
    arrays = smooth(np.random.default_rng(n), n, (33, 40))
    # correlated task vectors: a shared direction plus noise gives cosθ ≈ 0.5
    shared = np.random.default_rng(99).normal(size=arrays[0].shape) * 0.1
    arrays = [arrays[0]] + [(a + shared).astype(np.float32) for a in arrays[1:]]
    want, t = ref_stock(arrays)
    assert 0.2 < t < 1.0
    close(run("model_stock", arrays), want, 2.0)


def test_model_stock_edge_cases():
    base = np.zeros(64, np.float32)
    m = np.random.default_rng(0).normal(size=64).astype(np.float32)
    # identical models: cosθ = 1, t = 1: their mean
    close(run("model_stock", [base, m, m, m]), m)
    # a model equal to base: cosθ averages in 0
    want, _ = ref_stock([base, m, base.copy()])
    close(run("model_stock", [base, m, base.copy()]), want)
    # opposite task vectors: 1 + cosθ = 0, t is defined 0 (base)
    np.testing.assert_array_equal(run("model_stock", [base, m, -m]), base)
    np.testing.assert_array_equal(run("model_stock", [base, base, base]), base)


# ---------------------------------------------------------------- geometric_median


def ref_gmed(arrays, weights=None, eps=1e-6, max_iter=100, tol=0.0):
    xs = [a.astype(np.float64).reshape(-1) for a in arrays]
    w = np.ones(len(xs)) if weights is None else np.asarray(weights, float)
    y = sum(wi * x for wi, x in zip(w, xs, strict=True)) / w.sum()
    d = np.array([np.linalg.norm(x - y) for x in xs])
    obj = (w * d).mean()
    for _ in range(max_iter):
        beta = w / np.maximum(d, eps)
        y = sum(b * x for b, x in zip(beta, xs, strict=True)) / beta.sum()
        d = np.array([np.linalg.norm(x - y) for x in xs])
        prev, obj = obj, (w * d).mean()
        if abs(prev - obj) <= tol * obj:
            break
    return y.reshape(arrays[0].shape)


@pytest.mark.parametrize("n", [2, 3, 5])
def test_geometric_median_matches_reference(n):
    arrays = smooth(np.random.default_rng(n + 40), n, (20, 30))[1:]
    arrays.append((arrays[0] + 5).astype(np.float32))  # an outlier
    got = run("geometric_median", arrays, max_iter=30, tol=0.0)
    close(got, ref_gmed(arrays, max_iter=30), 5.0)
    mean = np.mean(arrays, axis=0)
    assert np.linalg.norm(got - arrays[0]) < np.linalg.norm(mean - arrays[0])


def test_geometric_median_weights_eps_and_stop():
    arrays = smooth(np.random.default_rng(1), 3, (500,))
    w = [3.0, 1.0, 0.0, 1.0]
    close(
        run("geometric_median", arrays, weights=w, max_iter=50, tol=0.0),
        ref_gmed(arrays, w, max_iter=50),
        5.0,
    )
    # max_iter 0: the weighted mean
    close(run("geometric_median", arrays, weights=w, max_iter=0), ref_gmed(arrays, w, max_iter=0))
    # identical inputs: every distance hits eps, the result stays that input
    same = [arrays[0]] * 3
    close(run("geometric_median", same), arrays[0])
    # tolerance stops early but near the converged value
    loose = run("geometric_median", arrays, tol=1e-3)
    close(loose, ref_gmed(arrays, tol=1e-3), 5.0)


# ---------------------------------------------------------------- n_average


@pytest.mark.parametrize("weights", [None, [1.0, 2.0, 3.0], [0.0, 1.0, 1.0], [0.0, 0.0, 2.5]])
def test_n_average_matches_reference(weights):
    arrays = smooth(np.random.default_rng(4), 2, (50, 7))
    w = np.ones(3) if weights is None else np.asarray(weights)
    want = sum(wi * a.astype(np.float64) for wi, a in zip(w, arrays, strict=True)) / w.sum()
    close(run("n_average", arrays, weights=weights), want, 2.0)


def test_n_average_identical_inputs_exact_and_chunking():
    a = np.random.default_rng(0).normal(size=1000).astype(np.float32)
    np.testing.assert_array_equal(run("n_average", [a, a, a, a, a]), a)
    arrays = smooth(np.random.default_rng(1), 3, (1000,))
    whole = run("n_average", arrays, weights=[1, 2, 3, 4])
    parts = [
        run("n_average", [x[lo : lo + 300] for x in arrays], weights=[1, 2, 3, 4])
        for lo in range(0, 1000, 300)
    ]
    assert np.concatenate(parts).tobytes() == whole.tobytes()


# ---------------------------------------------------------------- cross-cutting


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("ties", {"k": 0.3}),
        ("dare_ties", {"p": 0.5, "k": 0.5}),
        ("della", {"p": 0.5, "eps": 0.2}),
        ("add_perpendicular", {}),
        ("model_stock", {}),
        ("geometric_median", {"max_iter": 5, "tol": 0.0}),
    ],
)
def test_whole_tensor_bytes_do_not_depend_on_thread_count(name, params):
    """Reductions over 300 k elements: torch's own would split work by thread count."""
    arrays = smooth(np.random.default_rng(0), 3, (300_001,))
    if REGISTRY[name].inputs_form == "slots":
        arrays = arrays[:3]
    saved = torch.get_num_threads()
    try:
        outs = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            outs.append(run(name, arrays, ctx(numel=300_001, seed=1), **params).tobytes())
    finally:
        torch.set_num_threads(saved)
    assert outs[0] == outs[1] == outs[2]


@pytest.mark.parametrize(
    ("name", "params", "n_inputs", "fragment"),
    [
        ("ties", {"weights": [1.0, 2.0]}, 4, "3 models"),
        ("dare", {"weights": [0.0, 0.0]}, 3, "above 0"),
        ("n_average", {"weights": [1.0]}, 2, "2 models"),
        ("geometric_median", {"weights": [1.0, 1.0, 1.0]}, 2, "2 models"),
    ],
)
def test_check_refuses_mismatched_weights(name, params, n_inputs, fragment):
    m = REGISTRY[name]
    msg = m.check(m.Params(**params), n_inputs)
    assert msg is not None and fragment in msg


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("ties", {"k": 0.0}),
        ("ties", {"k": 1.5}),
        ("ties", {"vote": "median"}),
        ("ties", {"weights": [1.0, -1.0]}),
        ("dare", {"p": 1.0}),
        ("dare", {"p": -0.1}),
        ("dare", {"seed": -1}),
        ("dare_ties", {"k": 0}),
        ("della", {"eps": -0.1}),
        ("geometric_median", {"max_iter": -1}),
        ("geometric_median", {"eps": 0.0}),
        ("model_stock", {"alpha": 1.0}),
    ],
)
def test_params_out_of_range_are_refused(name, params):
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        REGISTRY[name].Params(**params)


def test_declarations():
    for name in ("ties", "dare", "dare_ties", "della", "model_stock"):
        assert REGISTRY[name].inputs_form == "base_models"
    assert REGISTRY["model_stock"].min_models == 2
    assert REGISTRY["dare"].streaming == "elementwise" and REGISTRY["dare"].needs_context
    for name in (
        "ties",
        "dare_ties",
        "della",
        "add_perpendicular",
        "model_stock",
        "geometric_median",
    ):
        assert REGISTRY[name].streaming == "whole_tensor"
    for name in ("dare", "dare_ties", "della"):
        assert REGISTRY[name].random
    for name in (
        "ties",
        "dare",
        "dare_ties",
        "della",
        "add_perpendicular",
        "model_stock",
        "geometric_median",
        "n_average",
    ):
        m = REGISTRY[name]
        assert m.formula and m.description and m.example and m.version == 1
