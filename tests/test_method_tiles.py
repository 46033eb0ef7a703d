"""Whole-tensor methods computed as statistics + tiles (methods.base.Tiles): the tiles cast into
the output (or streamed to the files) must give the bytes of the whole computation, and ties'
9-op form of finite tiles the bytes of its reference form, for any input values.

Inputs include what breaks shortcuts: NaN, ±inf, ±0, a base of −0.0, magnitudes tied at the
trim threshold, float32 overflow, deltas that are all zero, tensors shorter than a tile and
not a multiple of it.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import load_st, run_cli
from mergebuild.engine import compute
from mergebuild.engine.methods import REGISTRY, _taskvec, add_cosine_a, slerp
from mergebuild.engine.methods.base import ComputeContext

KINDS = ["plain", "specials", "ties_at_threshold", "overflow", "no_delta", "neg_zero_base"]


def _inputs(kind: str, n: int, numel: int, dtype: torch.dtype, seed: int) -> list[torch.Tensor]:
    """Base + n models (float32 values rounded to `dtype`), one flavour of awkward values."""
    g = np.random.default_rng(seed)
    base = g.standard_normal(numel).astype(np.float32)
    xs = [base] + [base + 0.05 * g.standard_normal(numel).astype(np.float32) for _ in range(n)]
    if kind == "specials":
        for i, x in enumerate(xs):
            at = g.choice(numel, size=min(numel, 12), replace=False)
            x[at[:3]] = np.nan if i % 2 else np.inf
            x[at[3:6]] = -0.0
            x[at[6:9]] = 0.0
            x[at[9:]] = -np.inf
    elif kind == "ties_at_threshold":  # few distinct magnitudes: many equal to the threshold
        xs = [np.round(x * 4) / 4 for x in xs]
    elif kind == "overflow":
        xs = [x * np.float32(3e38) for x in xs]
    elif kind == "no_delta":
        xs = [base.copy() for _ in xs]
    elif kind == "neg_zero_base":  # −0.0 + (+0.0) is +0.0: a result's zero sign shows
        xs[0][::3] = -0.0
        for x in xs[1:]:
            x[::3] = xs[0][::3]
    return [torch.from_numpy(x.copy()).to(dtype) for x in xs]


def _bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes()


TIES_CASES = [
    ("ties", {"k": 0.2}),
    ("ties", {"k": 0.2, "vote": "count"}),
    ("ties", {"k": 1.0}),
    ("ties", {"k": 0.5, "weights": [1.0, 0.5, 2.0], "alpha": -0.7}),
    ("ties", {"k": 0.01, "weights": [0.0, 1.0, 3.0], "vote": "count"}),
    ("dare_ties", {"p": 0.9, "vote": "count", "seed": 1}),
    ("dare_ties", {"p": 0.5, "k": 0.3, "weights": [2.0, 1.0, 0.5]}),
    ("della", {"p": 0.7, "eps": 0.2}),
]


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("name", "params"), TIES_CASES)
def test_ties_quick_tiles_equal_the_reference_form(
    monkeypatch: pytest.MonkeyPatch, name: str, params: dict, kind: str, compiled: bool
) -> None:
    """Finite tiles take the 9-op form (as torch ops, or as one compiled loop), others the
    reference form: either way, the bytes of the reference form everywhere (tensors of 1 to 3
    tiles, fp16 and float32 inputs)."""
    from mergebuild.engine.methods import reduce

    monkeypatch.setattr(reduce, "COMPILED_MIN", 0 if compiled else 1 << 40)
    monkeypatch.setattr(reduce, "ONCE_LOADED", compiled)
    m = REGISTRY[name]
    for numel, dtype in ((70_001, torch.float16), (150_000, torch.float32), (37, torch.bfloat16)):
        xs = _inputs(kind, 3, numel, dtype, seed=numel)
        ctx = ComputeContext("k.weight", 0, numel, "ab" * 16, params.get("seed", 0))
        p = m.Params(**params)

        def run(xs: list[torch.Tensor] = xs, p: object = p, ctx: ComputeContext = ctx) -> bytes:
            return _bytes(m.compute(p, xs, ctx) if m.needs_context else m.compute(p, xs))

        monkeypatch.setattr(_taskvec, "QUICK", False)
        want = run()
        monkeypatch.setattr(_taskvec, "QUICK", True)
        assert run() == want, (name, params, kind, numel)


SPLIT_CASES = [
    ("ties", {"k": 0.2}, (301, 257)),
    ("dare_ties", {"p": 0.8, "k": 0.5, "seed": 3}, (5000,)),
    ("dare_ties", {"p": 0.3, "seed": 5, "vote": "count"}, (301, 257)),  # no trim, many tiles
    ("slerp", {"alpha": 0.3}, (64, 32, 3, 3)),
    ("slerp", {"alpha": 0.7}, (12_345,)),
    ("add_cosine_a", {"alpha": 0.0}, (301, 257)),
    ("add_cosine_a", {"alpha": 0.4, "sim_min": 0.5}, (3, 4000)),  # a row longer than a tile
    ("add_cosine_b", {"alpha": 0.2}, (7, 5, 3, 3)),
    ("add_cosine_b", {"alpha": 0.1}, (999,)),
]


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("out", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("kind", ["plain", "specials", "overflow"])
@pytest.mark.parametrize(("name", "params", "shape"), SPLIT_CASES)
def test_tiles_cast_and_streamed_equal_the_whole_result(
    monkeypatch: pytest.MonkeyPatch,
    name: str,
    params: dict,
    shape: tuple[int, ...],
    kind: str,
    out: torch.dtype,
    compiled: bool,
) -> None:
    """`_from_tiles` and `_stream_tiles` (small tiles: many, the last one short) give the
    bytes of `compute(...).to(dtype)` and the same NaN/Inf verdict; a slerp tile that asks to
    start over (its lerp fallback) leaves no tiles written. `compiled`: the tiles (and the
    sums) through _kernels.py's loops, against `compute`'s torch ops."""
    from mergebuild.engine.methods import reduce

    monkeypatch.setattr(reduce, "COMPILED_MIN", 0 if compiled else 1 << 40)
    monkeypatch.setattr(reduce, "ONCE_LOADED", compiled)
    for mod, attr in ((slerp, "FILL_TILE"), (add_cosine_a, "FILL_TILE"), (_taskvec, "TILE")):
        monkeypatch.setattr(mod, attr, 1000)
    m = REGISTRY[name]
    numel = math.prod(shape)
    n = len(m.slots) - 1 if m.inputs_form == "slots" else 3
    xs = [x.reshape(shape) for x in _inputs(kind, n, numel, torch.float16, seed=numel)]
    ctx = ComputeContext("k.weight", 0, numel, "cd" * 16, params.get("seed", 0))
    p = m.Params(**params)
    whole = (m.compute(p, xs, ctx) if m.needs_context else m.compute(p, xs)).to(out)
    # the engine writes one NaN per dtype: which one an op returns depends on operand order
    want = (_bytes(compute.canonical_nans(whole, inplace=False)), compute._has_nonfinite(whole))
    tiles = m.split(p, xs, ctx)
    if tiles is None:  # e.g. slerp's lerp fallback decided by the statistics
        assert kind != "plain"
        return
    done = compute._from_tiles(tiles, out)
    if done is None:  # a tile asked to start over: only slerp may, and it streams nothing
        assert tiles.may_restart
        return
    assert (_bytes(done[0]), done[1]) == want
    assert done[0].shape == whole.shape
    if tiles.may_restart:
        return
    got = torch.full((numel,), 7, dtype=out)
    pieces: list[tuple[int, int]] = []

    def emit(t: torch.Tensor, lo: int) -> None:
        got[lo : lo + t.numel()] = t
        pieces.append((lo, t.numel()))

    bad = compute._stream_tiles(m.split(p, xs, ctx), out, emit)
    assert (_bytes(got), bad) == want
    assert sum(k for _, k in pieces) == numel
    assert len(pieces) == -(-numel // tiles.step)  # one per tile, the last one short
    assert [lo for lo, _ in pieces] == sorted({lo for lo, _ in pieces})  # each once, in order


HALF_SPLIT_CASES = [c for c in SPLIT_CASES if c[0] in ("slerp", "add_cosine_a", "add_cosine_b")]
HALF_SPLIT_CASES += [
    ("slerp", {"alpha": 0.0}, (5000,)),  # a's bits
    ("slerp", {"alpha": 1.0}, (70, 100)),  # b's bits
    ("slerp", {"alpha": 0.4, "lerp": "zero"}, (3000,)),  # ‖a‖ = 0: the lerp fallback
    ("slerp", {"alpha": 0.4, "lerp": "parallel"}, (3000,)),  # b = 2a: the lerp fallback
    ("slerp", {"alpha": 0.6}, (200_001,)),  # whole blocks through the loop, then the rest
]


@pytest.mark.parametrize("kind", ["plain", "specials", "overflow"])
@pytest.mark.parametrize(("name", "params", "shape"), HALF_SPLIT_CASES)
def test_split_half_on_arrays_gives_the_float16_bytes_of_compute(
    monkeypatch: pytest.MonkeyPatch, name: str, params: dict, shape: tuple[int, ...], kind: str
) -> None:
    """A pass without torch hands float16 numpy arrays to `split_half`: its tiles, streamed or
    gathered (compute._half_tiles), give the bytes and the NaN/Inf verdict of
    `compute(...).to(float16)` on the same values as tensors (the loops loaded, as such a
    pass loads them first)."""
    from mergebuild.engine.methods import reduce

    monkeypatch.setattr(reduce, "COMPILED_MIN", 0)
    for mod in (add_cosine_a, slerp):
        monkeypatch.setattr(mod, "FILL_TILE", 1000)
    m = REGISTRY[name]
    numel = math.prod(shape)
    params = dict(params)
    lerp = params.pop("lerp", None)
    xs = [x.reshape(shape) for x in _inputs(kind, 1, numel, torch.float16, seed=numel + 1)]
    if lerp == "zero":
        xs[0] = torch.zeros_like(xs[0])
    elif lerp == "parallel":
        xs[1] = xs[0] * 2
    p = m.Params(**params)
    whole = m.compute(p, xs).to(torch.float16)
    want = (_bytes(compute.canonical_nans(whole, inplace=False)), compute._has_nonfinite(whole))
    arrays = [x.numpy().copy() for x in xs]
    tiles = m.split_half(p, arrays, None)
    assert tiles is not None and tiles.fill_half is not None
    bad, out = compute._half_tiles(tiles, None)
    assert isinstance(out, np.ndarray) and out.shape == shape
    assert (out.tobytes(), bad) == want
    got = np.full(numel, 7, dtype=np.float16)

    def emit(t: np.ndarray, lo: int) -> None:
        got[lo : lo + t.size] = t

    assert compute._half_tiles(m.split_half(p, arrays, None), emit) == (want[1], None)
    assert got.tobytes() == want[0]


def test_slerp_tiles_stream_when_no_value_can_overflow() -> None:
    """float16 inputs: the norms bound every result far below float32's maximum, so slerp's
    tiles go out as they come (no restart); huge bfloat16 values keep the restart."""
    m = REGISTRY["slerp"]
    p = m.Params(alpha=0.3)
    g = np.random.default_rng(5)
    xs = [torch.from_numpy(g.standard_normal(5000).astype(np.float32)).half() for _ in range(2)]
    tiles = m.split(p, xs, None)
    assert tiles is not None and not tiles.may_restart
    big = [(x.float() * 1e37).to(torch.bfloat16) for x in xs]
    tiles = m.split(p, big, None)
    assert tiles is not None and tiles.may_restart


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])  # fp16 cannot get there
@pytest.mark.parametrize("alpha", [0.3, 0.5, 0.8])
def test_slerp_overflowing_result_falls_back_to_lerp(alpha: float, dtype: torch.dtype) -> None:
    """Finite norms but a result past float32's range: the tiles start over and the key is
    the plain lerp a·(1−α) + b·α (numpy float32), through the per-key stage."""
    from mergebuild.engine.compute import KeyCompute, NodeJob, Unit
    from mergebuild.engine.safetensors_io import TensorInfo

    numel = 5000
    big = np.float32(3.3e38)
    a = np.zeros(numel, np.float32)
    b = np.zeros(numel, np.float32)
    a[: numel // 2], b[numel // 4 :] = big, big  # overlapping halves: not parallel
    ta, tb = torch.from_numpy(a).to(dtype), torch.from_numpy(b).to(dtype)
    st = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32"}[dtype]
    key = "model.diffusion_model.out.0.weight"
    lay = {"a": {key: TensorInfo(st, (numel,))}, "b": {key: TensorInfo(st, (numel,))}}

    class Target:
        def __init__(self) -> None:
            self.source, self.vae, self.vae_keys, self.scaled = "m", None, {}, {}
            self.infos = {key: TensorInfo("F32", (numel,))}

    job = NodeJob("m", REGISTRY["slerp"], REGISTRY["slerp"].Params(alpha=alpha), "fp32", ["a", "b"])
    kc = KeyCompute(lay, [job], [Target()])
    got: dict[int, torch.Tensor] = {}

    def write(s: int, val: torch.Tensor, lo: int | None = None) -> None:
        assert lo is None, "a tile was written before the fallback"
        got[s] = val.clone()

    kc.evaluate(Unit(key, 0, numel, True), lambda n, k, u: {"a": ta, "b": tb}[n], write)
    fa, fb = ta.float().numpy(), tb.float().numpy()
    want = fa * np.float32(1.0 - alpha) + fb * np.float32(alpha)
    assert np.array_equal(got[0].numpy().view(np.uint32), want.view(np.uint32))
    assert np.isfinite(want).all() and not kc.stats["m"].nonfinite


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize(
    "shape",
    [(70_000,), (200_001,), (600_000,), (300, 1000), (2000, 700), (3, 70_000), (40, 3, 3)],
)
@pytest.mark.parametrize("nonfinite", [False, True])
@pytest.mark.parametrize("compiled_min", [0, 1 << 40])  # every shape compiled; none
def test_gram_sums_are_the_fixed_block_sums(
    shape: tuple[int, ...],
    dtype: torch.dtype,
    nonfinite: bool,
    compiled_min: int,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """reduce.gram's float64 sums equal their definition computed here in plain numpy: exact
    products, np.add.reduce per 65 536-element block (axis None) or per block of whole rows
    (axis 0), blocks added in order. Shapes span several calls of the compiled loops
    (_kernels.py) and their partial last pieces; inf, NaN and −0 go through them as in numpy."""
    from mergebuild.engine.methods import reduce
    from mergebuild.engine.methods.reduce import BLOCK, gram

    monkeypatch.setattr(reduce, "COMPILED_MIN", compiled_min)
    monkeypatch.setattr(reduce, "ONCE_LOADED", compiled_min == 0)
    g = np.random.default_rng(sum(shape))
    scale = np.exp(g.standard_normal(shape) * 2)  # magnitudes over many binades
    x = torch.from_numpy((g.standard_normal(shape) * scale).astype(np.float32)).to(dtype)
    y = torch.from_numpy(g.standard_normal(shape).astype(np.float32)).to(dtype)
    y.view(-1)[1] = -0.0
    if nonfinite:
        x.view(-1)[x.numel() // 2] = float("inf")
        y.view(-1)[-1] = float("nan")
    fx = x.float().numpy().astype(np.float64).reshape(-1)
    fy = y.float().numpy().astype(np.float64).reshape(-1)
    want = [0.0, 0.0, 0.0]
    for lo in range(0, fx.size, BLOCK):
        a, b = fx[lo : lo + BLOCK], fy[lo : lo + BLOCK]
        for i, (u, v) in enumerate(((a, a), (b, b), (a, b))):
            want[i] += float(np.add.reduce(u * v))
    got = gram(x, y)
    if fx.size > BLOCK:  # one block: summed by the short-rows branch, unchanged
        assert np.array_equal([float(v[0]) for v in got], want, equal_nan=True)
    rows = shape[0]
    cols = fx.size // rows
    step = max(1, BLOCK // cols)
    ax, ay = fx.reshape(rows, cols), fy.reshape(rows, cols)
    acc = [np.zeros(cols) for _ in range(3)]
    for lo in range(0, rows, step):
        a, b = ax[lo : lo + step], ay[lo : lo + step]
        for i, (u, v) in enumerate(((a, a), (b, b), (a, b))):
            acc[i] += np.add.reduce(u * v, axis=0)
    for got_i, want_i in zip(gram(x, y, 0), acc, strict=True):
        assert np.array_equal(got_i.view(np.uint64), want_i.view(np.uint64)) or (
            np.array_equal(got_i, want_i, equal_nan=True) and nonfinite
        )


def test_gram_of_float16_extremes_is_exact() -> None:
    """float16 products are taken in float32 (reduce.Products): at the largest normal and the
    smallest subnormal values the sums still equal float64 products' sums bit for bit."""
    from mergebuild.engine.methods.reduce import gram

    tiny, big = float(np.finfo(np.float16).smallest_subnormal), float(np.finfo(np.float16).max)
    vals = np.array([tiny, -tiny, big, -big, 1.0, 2.0**-14, 3 * tiny, 0.0], dtype=np.float16)
    x = np.tile(vals, 10_000)  # > one block: the long-rows branch
    y = np.roll(x, 3)
    fx, fy = x.astype(np.float64), y.astype(np.float64)
    got = gram(torch.from_numpy(x), torch.from_numpy(y))
    want = [0.0, 0.0, 0.0]
    for lo in range(0, fx.size, 65_536):
        a, b = fx[lo : lo + 65_536], fy[lo : lo + 65_536]
        for i, (u, v) in enumerate(((a, a), (b, b), (a, b))):
            want[i] += float(np.add.reduce(u * v))
    assert [float(v[0]) for v in got] == want
    assert want[2] != 0.0 and all(np.isfinite(want))


METHOD_RECIPES = {
    "ties": "{method: ties, base: a, models: [b, c, d], k: 0.3}",
    "dare_ties": "{method: dare_ties, base: a, models: [b, c, d], p: 0.6, k: 0.5, seed: 4}",
    "slerp": "{method: slerp, a: a, b: b, alpha: 0.4}",
    "add_cosine_a": "{method: add_cosine_a, a: a, b: b, alpha: 0.1}",
}


def _four_models(model_dir: Path) -> dict[str, Path]:
    """The test models as a (base), b, c, d: one base and three of its fine-tunes."""
    names = ("v1-5-pruned", "anything-v3", "nai-full", "nai-sfw")
    return {n: model_dir / f"{s}.safetensors" for n, s in zip("abcd", names, strict=True)}


@pytest.mark.parametrize("name", sorted(METHOD_RECIPES))
def test_streamed_build_same_bytes_at_j1_j2_and_reports_nan(
    tmp_path: Path, model_dir: Path, name: str
) -> None:
    """A real build whose node goes to the file tile by tile: -j1 and -j2 write the same
    bytes, a NaN in one model's key is reported for that key only, and the other keys equal
    the same build with every key whole (the method called directly, cast to fp16)."""
    from safetensors.numpy import load_file, save_file

    srcs = list(_four_models(model_dir).values())
    models = {n: tmp_path / f"{n}.safetensors" for n in "abcd"}
    nan_key = "model.diffusion_model.out.2.weight"
    for (n, path), src in zip(models.items(), srcs, strict=True):
        t = load_file(str(src))
        if n == "b":
            t[nan_key] = t[nan_key].copy()
            t[nan_key].reshape(-1)[5] = np.nan
        save_file(t, str(path))
    outs = {}
    for jobs in ("1", "2"):
        out = tmp_path / f"o{jobs}.safetensors"
        recipe = tmp_path / f"r{jobs}.yaml"
        lines = "".join(f"  {k}: {v}\n" for k, v in models.items())
        recipe.write_text(
            f"mergebuild: 1\nmodels:\n{lines}merges:\n  m: {METHOD_RECIPES[name]}\n"
            f"outputs:\n  o: {{from: m, path: {out}, dtype: fp16}}\n"
        )
        r = run_cli(recipe, "--json", "-j", jobs, cache=tmp_path / f"cache{jobs}")
        assert r.code == 0, r.err
        node = next(n for n in r.json["nodes"] if n["name"] == "m")
        assert node["nonfinite_keys"] == [nan_key]
        outs[jobs] = out.read_bytes()
    assert outs["1"] == outs["2"]
    got = load_st(tmp_path / "o1.safetensors")
    ins = {n: load_file(str(p)) for n, p in models.items()}
    m = REGISTRY[name]
    p = m.Params(**_flow(METHOD_RECIPES[name]))
    order = ["a", "b"] if m.inputs_form == "slots" else ["a", "b", "c", "d"]
    checked = 0
    for key in sorted(got)[::7]:
        if not np.issubdtype(got[key].dtype, np.floating) or key == nan_key:
            continue
        if m.needs_context:  # the node key seeds the masks: dare_ties is compared with itself
            continue
        xs = [torch.from_numpy(ins[n][key]) for n in order]
        want = m.compute(p, xs).to(torch.float16).numpy()
        assert np.array_equal(got[key].view(np.uint16), want.view(np.uint16)), key
        checked += 1
    assert checked > 5 or m.needs_context


def _flow(text: str) -> dict:
    """The parameters of a one-line YAML flow mapping (inputs and `method` left out)."""
    import yaml

    d = yaml.safe_load(text)
    return {k: v for k, v in d.items() if k not in ("method", "a", "b", "base", "models")}


def test_large_whole_units_hand_memory_back_without_changing_bytes(
    tmp_path: Path, model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After each whole unit of TRIM_ELEMENTS elements or more the worker calls malloc_trim
    (freed input tensors go back to the system, not kept in glibc's arenas); the file is the
    same bytes as a build that never trims."""
    from mergebuild.cli import main
    from mergebuild.engine import executor, tuning

    real = tuning._malloc_trim
    if real is None:
        pytest.skip("no glibc malloc_trim")
    trims: list[int] = []
    monkeypatch.setattr(tuning, "_malloc_trim", lambda pad: trims.append(pad) or real(pad))
    lines = "".join(f"  {k}: {v}\n" for k, v in _four_models(model_dir).items())
    outs = []
    for limit in (1 << 62, 1 << 12):
        monkeypatch.setattr(executor, "TRIM_ELEMENTS", limit)
        out = tmp_path / f"o{limit}.safetensors"
        recipe = tmp_path / f"r{limit}.yaml"
        recipe.write_text(
            f"mergebuild: 1\nmodels:\n{lines}merges:\n  m: {METHOD_RECIPES['ties']}\n"
            f"outputs:\n  o: {{from: m, path: {out}, dtype: fp16}}\n"
        )
        assert main([str(recipe), "-q", "-j", "2", "--cache-dir", str(tmp_path / f"c{limit}")]) == 0
        outs.append(out.read_bytes())
        assert bool(trims) == (limit < 1 << 62)
    assert outs[0] == outs[1]


def test_without_the_compiled_loops_a_warning_and_the_same_sums(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """numba that cannot load (missing, no cache directory, a full disk while compiling): one
    warning, and numpy sums the same figures; nothing fails."""
    import sys

    from mergebuild.engine import methods
    from mergebuild.engine.methods import reduce, train_difference

    g = np.random.default_rng(5)
    x = torch.from_numpy(g.standard_normal(300_000).astype(np.float16))
    y = torch.from_numpy(g.standard_normal(300_000).astype(np.float16))
    monkeypatch.setattr(reduce, "COMPILED_MIN", 0)
    monkeypatch.setattr(train_difference, "COMPILED_TILE", 0)
    want = reduce.gram(x, y)
    m = REGISTRY["train_difference"]
    td = m.compute(m.Params(alpha=0.7), [x, y, y.flip(0)])
    monkeypatch.setattr(reduce, "_loaded", [])
    monkeypatch.setitem(sys.modules, "numba", None)  # `import numba` raises ImportError
    monkeypatch.delitem(sys.modules, "mergebuild.engine.methods._kernels", raising=False)
    monkeypatch.delattr(methods, "_kernels", raising=False)
    with pytest.warns(UserWarning, match="compiled loops unavailable .*numba"):
        got = reduce.gram(x, y)
    assert [float(v[0]) for v in got] == [float(v[0]) for v in want]
    assert reduce.kernels() is None  # decided once per process
    assert torch.equal(m.compute(m.Params(alpha=0.7), [x, y, y.flip(0)]), td)


def test_builds_use_only_the_loops_compiled_ahead(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every compiled loop is called with the argument types `_kernels.warm()` compiles (at
    `make install`, or inside reduce.kernels()'s guard): a build never compiles, so it never
    writes numba's cache (a full disk there cannot fail a build half-way)."""
    from mergebuild import compare
    from mergebuild.engine.methods import reduce, train_difference

    loops = reduce.kernels()
    assert loops is not None
    names = ["block_sums", "column_sums", "difference_sums", "train_difference", "ties_combine"]
    names += ["lincomb", "blend_rows", "weighted3", "abs_delta_window", "ties_tile", "copy_half"]
    names += ["widen_half"]
    before = {k: list(getattr(loops, k).signatures) for k in names}
    monkeypatch.setattr(reduce, "COMPILED_MIN", 0)
    monkeypatch.setattr(train_difference, "COMPILED_TILE", 0)
    g = np.random.default_rng(9)
    n = 5 * 65_536 + 7  # a compiled call with fewer blocks than it has room for, and a tail
    xs = [torch.from_numpy(g.standard_normal(n).astype(np.float16)) for _ in range(4)]
    reduce.gram(xs[0], xs[1])
    reduce.gram(xs[0][: 600 * 500].reshape(600, 500), xs[1][: 600 * 500].reshape(600, 500), 0)
    compare._chunk_sums(xs[0], xs[1], xs[2], 0, n, compiled=True)
    compare._chunk_sums(xs[0], xs[1], None, 0, n, compiled=True)
    for name, shape in (("slerp", (n,)), ("add_cosine_a", (n // 7, 7))):
        m = REGISTRY[name]
        pair = [x[: math.prod(shape)].reshape(shape) for x in xs[:2]]
        tiles = m.split(m.Params(alpha=0.3), pair, None)
        assert tiles is not None and tiles.whole() is not None
        assert tiles.fill_half is not None  # float16 inputs, float16 output: one call a tile
        tiles.fill_half(0, tiles.step, np.empty(tiles.step, dtype=np.uint16))
    for models in range(1, 4):  # ties' float16 tiles: one loop per number of models
        tiles = REGISTRY["ties"].split(REGISTRY["ties"].Params(), xs[: models + 1], None)
        assert tiles is not None and tiles.fill_half is not None
        tiles.fill_half(0, tiles.step, np.empty(tiles.step, dtype=np.uint16))
    dare = REGISTRY["dare_ties"]  # ... and dare_ties' (the same loop, with DARE's mask)
    ctx = ComputeContext("k.weight", 0, n, "ab" * 16, 1)
    tiles = dare.split(dare.Params(p=0.5, seed=1), xs, ctx)
    assert tiles is not None and tiles.fill_half is not None
    tiles.fill_half(0, tiles.step, np.empty(tiles.step, dtype=np.uint16))
    half = (("train_difference", {"alpha": 0.5}), ("triple_sum", {"alpha": 0.5, "beta": 0.2}))
    half += (("copy", {}),)
    for name, params in half:  # float16 bits in and out (compute._tiled's float16 path)
        m = REGISTRY[name]
        bits = [x.view(torch.uint16).numpy() for x in xs[:3]]
        assert m.compute_half(m.Params(**params), bits, np.empty(n, np.uint16)) is not None
        rows = np.empty((2, n), np.uint16)  # ... and into a row of a streamed run's tile
        assert m.compute_half(m.Params(**params), bits, rows[1]) is not None
    for name in ("train_difference", "ties", "dare_ties"):
        m = REGISTRY[name]
        p = m.Params(**({"p": 0.5, "seed": 1} if name == "dare_ties" else {}))
        ctx = ComputeContext("k.weight", 0, n, "ab" * 16, 1)
        m.compute(p, xs[:3] if name == "train_difference" else xs, *([ctx] * m.needs_context))
    assert {k: list(getattr(loops, k).signatures) for k in names} == before


@pytest.mark.parametrize("name", ["add_cosine_a", "add_cosine_b"])
@pytest.mark.parametrize("shape", [(4, 0), (0, 3), (2, 0, 3), (0,)])
def test_cosine_methods_take_empty_tensors(name: str, shape: tuple[int, ...]) -> None:
    """A tensor with no elements has no column to measure: compute gives an empty float32
    tensor of its shape, and neither tile path offers itself (both once divided by zero)."""
    import numpy as np
    import torch

    from mergebuild.engine.methods import REGISTRY

    method = REGISTRY[name]
    params = method.Params(alpha=0.2)
    xs = [torch.zeros(shape, dtype=torch.float16) for _ in method.slots]
    out = method.compute(params, xs)
    assert out.shape == shape and out.dtype == torch.float32
    assert method.split(params, xs, None) is None
    assert method.split_half(params, [np.zeros(shape, np.float16) for _ in xs], None) is None
