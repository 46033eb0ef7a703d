"""The tiled exact selection behind TIES' trim threshold (engine/methods/_topk.py) against
numpy's sort of the whole |x|, on every path: the sampled window, the count-only window of one
repeated value, and the radix fallback after a misleading sample or a crowded window."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mergebuild.engine.methods import REGISTRY, _topk

N = 3 * _topk.TILE + 12_339  # several tiles and a partial last one (a multiple of 5)


def filler(x: np.ndarray):
    t = torch.from_numpy(x)

    def fill(lo: int, hi: int, out: torch.Tensor) -> torch.Tensor:
        return out.copy_(t[lo:hi])

    return fill


def sampler(x: np.ndarray):
    return lambda step: torch.from_numpy(x[::step].copy())


def want(x: np.ndarray, j: int) -> np.uint32:
    """Bits of the j-th smallest |x| by a full sort (NaN last, as numpy sorts)."""
    return np.sort(np.abs(x))[j - 1 : j].view(np.uint32)[0]


def select(x: np.ndarray, j: int, sample=None) -> np.uint32:
    buf = torch.empty(min(x.size, _topk.TILE), dtype=torch.float32)
    got = _topk.kth_smallest_abs(filler(x), x.size, j, buf, sample)
    return np.array([got], dtype=np.float32).view(np.uint32)[0]


def same(got: np.uint32, expected: np.uint32) -> None:
    """Equal bits, or both NaN (any NaN is the same threshold)."""
    as_float = np.array([got, expected], dtype=np.uint32).view(np.float32)
    assert got == expected or np.isnan(as_float).all(), (hex(got), hex(expected))


def ranks(n: int) -> list[int]:
    return [1, 2, n // 1000, n // 5, n // 2, 4 * n // 5, n - 7, n]


def data(kind: str, seed: int = 0) -> np.ndarray:
    rs = np.random.default_rng(seed)
    x = (rs.standard_normal(N) * 0.01).astype(np.float32)
    if kind == "grid":  # few distinct values: long runs of ties at every rank
        x = (np.round(x * 300) / 300).astype(np.float32)
    elif kind == "mostly_zero":
        x[rs.random(N) < 0.9] = 0.0
    elif kind == "signed_zero_and_subnormal":
        x[rs.random(N) < 0.3] = -0.0
        x[rs.random(N) < 0.05] = np.float32(1e-40) * rs.choice([-1, 1])
    elif kind == "nonfinite":
        r = rs.random(N)
        x[r < 0.02] = np.nan
        x[(r > 0.5) & (r < 0.53)] = -np.inf
        x[(r > 0.6) & (r < 0.61)] = np.inf
    elif kind == "rows":  # rows of very different scales: a sample of blocks misleads
        x = (x.reshape(-1, 5) * np.geomspace(1e-4, 1e4, N // 5)[:, None]).reshape(-1)
        x = x.astype(np.float32)
    assert x.dtype == np.float32
    return x


KINDS = ["normal", "grid", "mostly_zero", "signed_zero_and_subnormal", "nonfinite", "rows"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("strided", [True, False])
def test_exact_at_every_rank(kind, strided):
    x = data(kind)
    for j in ranks(N):
        same(select(x, j, sampler(x) if strided else None), want(x, j))


def test_one_tile_is_selected_directly():
    x = data("grid")[: _topk.TILE - 3]
    for j in ranks(x.size):
        same(select(x, j), want(x, j))


@pytest.fixture
def radix_calls(monkeypatch) -> list[int]:
    """The radix fallback, counted: one entry per call."""
    calls: list[int] = []
    radix = _topk._radix
    monkeypatch.setattr(
        _topk,
        "_radix",
        lambda *a: calls.append(1) or radix(*a),  # type: ignore[func-returns-value]
    )
    return calls


@pytest.mark.parametrize(
    "lie",
    [
        lambda n: torch.zeros(n),  # all zeros: the window sits at 0
        lambda n: torch.full((n,), 5.0),  # far above every value
        lambda n: torch.linspace(-1e30, 1e30, n),  # spans everything: too crowded to keep
    ],
)
def test_a_misleading_sample_falls_back_to_the_radix_select(radix_calls, lie):
    """The sample only places the window: a wrong one costs a pass, never a wrong value."""
    x = data("normal", seed=3)
    for j in (N // 5, 4 * N // 5):
        same(select(x, j, lambda step: lie(N // step)), want(x, j))
    assert len(radix_calls) == 2


def test_a_good_sample_needs_no_radix_pass(monkeypatch):
    monkeypatch.setattr(_topk, "_radix", lambda *a: pytest.fail("radix fallback used"))
    x = data("normal", seed=4)
    for j in ranks(N):
        same(select(x, j, sampler(x)), want(x, j))


@pytest.mark.parametrize("j", [1, 2, N // 5, 4 * N // 5, N])
def test_several_tensors_in_one_pass(radix_calls, j):
    """kth_smallest_abs_many: each tensor's own exact rank-j value, when one of them needs the
    radix fallback (a lying sample, a crowded window) and the others do not."""
    xs = [data(kind, seed=i) for i, kind in enumerate(KINDS)]
    samples = [sampler(x) for x in xs]
    samples[0] = lambda step: torch.full((N // step,), 5.0)  # far above every value of xs[0]
    buf = torch.empty(_topk.TILE, dtype=torch.float32)
    got = _topk.kth_smallest_abs_many([filler(x) for x in xs], N, [j] * len(xs), buf, samples)
    for x, g in zip(xs, got, strict=True):
        same(np.array([g], dtype=np.float32).view(np.uint32)[0], want(x, j))
    assert radix_calls, "the lying sample did not reach the fallback"


def test_rank_outside_the_tensor_is_refused():
    x = data("normal")
    with pytest.raises(ValueError, match="rank"):
        select(x, 0)
    with pytest.raises(ValueError, match="rank"):
        select(x, N + 1)


@pytest.mark.parametrize("k", [1e-6, 0.2, 0.5, 0.9999])
@pytest.mark.parametrize("kind", ["normal", "grid", "mostly_zero"])
def test_ties_on_a_multi_tile_tensor_keeps_exactly_the_top_k(k, kind):
    """ties with one model: base + δ where |δ| ≥ the j-th smallest |δ| (numpy sort), else base."""
    base = data("normal", seed=7)
    d = data(kind, seed=8)
    model = base + d
    dd = (model.astype(np.float32) - base).astype(np.float32)  # the method's float32 δ
    j = max(int((1.0 - k) * N), 1)
    thr = np.sort(np.abs(dd))[j - 1]
    expect = np.where(np.abs(dd) >= thr, base + dd, base).astype(np.float32)
    m = REGISTRY["ties"]
    got = m.compute(m.Params(k=k), [torch.from_numpy(base), torch.from_numpy(model)]).numpy()
    np.testing.assert_array_equal(got, expect)


def deltas_of(
    x: np.ndarray, dtype: torch.dtype, seed: int
) -> tuple[list[torch.Tensor], np.ndarray]:
    """[base, model] in `dtype` with model − base ≈ x, and the method's float32 δ (numpy)."""
    base = (np.random.default_rng(seed).standard_normal(x.size) * 0.05).astype(np.float32)
    with np.errstate(invalid="ignore", over="ignore"):
        xs = [torch.from_numpy(base).to(dtype), torch.from_numpy(base + x).to(dtype)]
        d = xs[1].numpy().astype(np.float32) - xs[0].numpy().astype(np.float32)
    return xs, d


@pytest.fixture
def compiled(monkeypatch):
    from mergebuild.engine.methods import reduce

    monkeypatch.setattr(reduce, "COMPILED_MIN", 0)
    assert reduce.kernels() is not None


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("kind", KINDS)
def test_the_compiled_window_pass_gives_the_exact_rank(compiled, monkeypatch, kind, dtype):
    """TileDeltas.counter: the window pass as one compiled loop over float16 bits or float32,
    never the tiles, and the same exact order statistic of |δ| as a full sort."""
    from mergebuild.engine.methods._taskvec import TileDeltas

    xs, d = deltas_of(data(kind, seed=11), dtype, seed=12)
    tiles = TileDeltas(xs, _topk.TILE)
    count = tiles.counter(1)
    assert count is not None
    monkeypatch.setattr(_topk, "_tiled_windows", lambda *a: pytest.fail("tiles used"))
    buf = torch.empty(_topk.TILE, dtype=torch.float32)
    fill = lambda lo, hi, out: tiles(1, lo, hi, out)  # noqa: E731
    for j in ranks(N):
        got = _topk.kth_smallest_abs_many(
            [fill], N, [j], buf, [lambda step: tiles.strided(1, step)], [count]
        )
        same(np.array(got, dtype=np.float32).view(np.uint32)[0], want(d, j))


def test_a_window_fuller_than_the_sample_said_is_counted_again(compiled):
    """Candidates beyond the buffer sized from the sample: the pass runs again with room for
    all of them (not the radix fallback), and the rank is still exact."""
    from mergebuild.engine.methods._taskvec import TileDeltas

    n = 2_000_003
    rs = np.random.default_rng(5)
    xs, d = deltas_of((rs.standard_normal(n) * 0.01).astype(np.float32), torch.float16, 6)
    bits = np.sort(np.abs(d)).view(np.uint32)
    j = n // 2
    low, high = int(bits[j - 100_000]), int(bits[j + 100_000])  # ~200 000 inside > one TILE
    count = TileDeltas(xs, _topk.TILE).counter(1)
    calls = []

    def counting(lo: int, hi: int, size: int):
        calls.append(size)
        return count(lo, hi, size)

    buf = torch.empty(_topk.TILE, dtype=torch.float32)
    got = _topk._in_windows([None], n, [j], buf, [(low, high, 0.0)], [counting])
    assert got == [int(bits[j - 1])]
    assert calls[0] == _topk.TILE and calls[1] > 200_000 - 1000, calls


def test_the_counter_is_offered_only_where_it_gives_the_same_bits(compiled):
    """Mixed dtypes and bfloat16 keep the tiles (their own conversions)."""
    from mergebuild.engine.methods._taskvec import TileDeltas

    x = torch.zeros(64)
    assert TileDeltas([x.half(), x.float()], 64).counter(1) is None
    assert TileDeltas([x.bfloat16(), x.bfloat16()], 64).counter(1) is None
    assert TileDeltas([x.half(), x.half()], 64).counter(1) is not None


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("step", [1, 7, 128])
def test_the_compiled_sample_is_the_strided_delta(compiled, dtype, step):
    """TileDeltas.strided through the compiled gather: δ[::step] as torch computes it."""
    from mergebuild.engine.methods._taskvec import TileDeltas

    xs, _ = deltas_of(data("nonfinite", seed=13), dtype, seed=14)
    tiles = TileDeltas(xs, _topk.TILE)
    assert tiles._compiled(1) is not None
    want = xs[1][::step].float() - xs[0][::step].float()
    got = tiles.strided(1, step)
    assert got.shape == want.shape
    assert torch.equal(got.isnan(), want.isnan())
    assert torch.equal(
        got.nan_to_num(0.0).view(torch.int32), want.nan_to_num(0.0).view(torch.int32)
    )
