"""The compiled loops' float16 conversions (_kernels._from_half, _half_bits, through the loops
that use them) against torch's own conversions: every float16 value widened, and float32
values at and around every rounding boundary of every binade narrowed, including ties,
subnormals, overflow to ±inf and NaNs (written as the canonical 0x7E00)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from mergebuild.engine.compute import canonical_nans
from mergebuild.engine.methods import reduce

pytestmark = pytest.mark.skipif(reduce.kernels() is None, reason="compiled loops unavailable")


def _loops():  # type: ignore[no-untyped-def]
    loops = reduce.kernels()
    assert loops is not None
    return loops


def test_every_float16_value_widens_exactly() -> None:
    """blend_rows over float16 bits with weights (1, 0): a·1 + b·0 in float32, b = +0, i.e.
    each float16 value widened (−0 + 0 is +0 in both computations)."""
    bits = np.arange(1 << 16, dtype=np.uint16).reshape(-1, 256)
    zero = np.zeros_like(bits)
    one, nil = np.ones(256, np.float32), np.zeros(256, np.float32)
    got = np.empty(bits.shape, np.float32)
    assert not _loops().blend_rows(bits, zero, one, nil, got)  # a float32 output: no check
    x = torch.from_numpy(bits.view(np.float16)).float()
    want = (x * 1.0 + torch.zeros_like(x) * 0.0).numpy()
    finite = np.isfinite(want)
    assert np.array_equal(got[finite].view(np.uint32), want[finite].view(np.uint32))
    assert np.array_equal(np.isnan(got), np.isnan(want))
    assert np.array_equal(got[np.isinf(want)], want[np.isinf(want)])


def _float32_samples() -> np.ndarray:
    """Every sign/exponent/top-mantissa pattern (the high 16 bits) with low halves that sit
    on, just below and just above float16's rounding points (13 dropped bits for normals,
    more for subnormals), plus random patterns."""
    high = np.arange(1 << 16, dtype=np.uint32) << 16
    lows = [0x0000, 0x0001, 0x0FFF, 0x1000, 0x1001, 0x1FFF, 0x2000, 0x2001, 0x3000, 0x7FFF]
    lows += [0x8000, 0x8001, 0xC000, 0xFFFF]
    grid = (high[:, None] | np.array(lows, dtype=np.uint32)[None, :]).reshape(-1)
    rand = np.random.default_rng(16).integers(0, 1 << 32, 1 << 20, dtype=np.uint64)
    return np.concatenate([grid, rand.astype(np.uint32)]).view(np.float32)


def test_float32_results_round_to_float16_as_torch_does() -> None:
    """lincomb into a float16 output, x·1 + 0·0: torch's x.half() (with −0 → +0, as the
    addition does in both), NaNs canonical, and the Inf/NaN flag set exactly when one is."""
    x = _float32_samples()
    zero = np.zeros_like(x)
    got = np.empty(x.size, np.uint16)
    flag = _loops().lincomb(x, zero, np.float32(1), np.float32(0), got)
    t = torch.from_numpy(x)
    want16 = canonical_nans((t * 1.0 + torch.zeros_like(t) * 0.0).half(), inplace=True)
    want = want16.view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(got, want)
    assert flag == bool((~torch.isfinite(want16)).any())


@pytest.mark.parametrize("special", [None, np.inf, -np.inf, np.nan, 70000.0])
def test_the_flag_says_whether_a_tile_holds_inf_or_nan(special: float | None) -> None:
    """A tile of ordinary values with one special (or an overflow in float16) in the middle."""
    x = np.linspace(-3, 3, 4097, dtype=np.float32)
    if special is not None:
        x[2048] = special
    got = np.empty(x.size, np.uint16)
    flag = _loops().lincomb(x, x, np.float32(0.5), np.float32(0.5), got)
    assert flag == (special is not None)
    if special is not None:
        want = 0x7E00 if special != special else (0xFC00 if special < 0 else 0x7C00)
        assert got[2048] == want


def _awkward_half(n: int, seed: int) -> np.ndarray:
    """float16 values over every binade, with NaN, ±inf, ±0, subnormals and the largest."""
    g = np.random.default_rng(seed)
    x = (g.standard_normal(n) * np.exp(g.standard_normal(n) * 4)).astype(np.float16)
    specials = [np.nan, np.inf, -np.inf, 0.0, -0.0, 6e-8, -6e-8, 65504.0, -65504.0, 1.0]
    at = g.choice(n, size=len(specials) * 20, replace=False)
    x[at] = np.array(specials * 20, dtype=np.float16)
    return x


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("train_difference", {"alpha": 0.7}),
        ("train_difference", {"alpha": -2.5}),
        ("triple_sum", {"alpha": 0.3, "beta": 0.2}),
        ("triple_sum", {"alpha": 1.0, "beta": 0.0}),  # a lone weight-1 term: b exactly
        ("triple_sum", {"alpha": 0.0, "beta": 0.0}),  # a alone
        ("triple_sum", {"alpha": 0.5, "beta": 0.5}),  # a's weight 0: skipped, inf · 0 not NaN
        ("triple_sum", {"alpha": 1e-50, "beta": 0.2}),  # weight 0 in float32, not in float64
        ("triple_sum", {"alpha": 300.0, "beta": 200.0}),  # overflows float16
        ("weighted_sum", {"alpha": 0.3}),
        ("weighted_sum", {"alpha": 0.0}),  # a exactly
        ("weighted_sum", {"alpha": 1.0}),  # b exactly: a's inf · 0 is not NaN
        ("weighted_sum", {"alpha": 1e-50}),  # 0 in float32, not in float64
        ("weighted_sum", {"alpha": 1e-9}),  # 1 − alpha is 1 in float32
        ("weighted_sum", {"alpha": -2.0}),
        ("add_difference", {"alpha": 0.7}),
        ("add_difference", {"alpha": 0.0}),  # a exactly, whatever b − c holds
        ("add_difference", {"alpha": -1.0}),
        ("add_difference", {"alpha": 3e4}),  # overflows float16
        ("fold", {"weights": [1.0, -1.0, 0.7]}),  # add_, sub_, then + x·w
        ("fold", {"weights": [0.3, 0.0, -2.5, 1.0]}),  # a weight-0 term skipped
        ("fold", {"weights": [0.0, 1.0]}),  # the first live term taken as it is
        ("fold", {"weights": [0.0, 0.0]}),  # nothing live: zeros
        ("fold", {"weights": [1e-50, 1.0]}),  # 0 in float32, not in float64
        ("fold", {"weights": [300.0, 200.0]}),  # overflows float16
        ("copy", {}),  # a's bits, NaNs canonical
    ],
)
def test_compute_half_is_compute_rounded_to_float16(
    name: str, params: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An elementwise method's float16 path (compute_half: bits in, bits out) writes exactly
    compute()'s float32 result cast to float16 with canonical NaNs, and flags Inf/NaN."""
    from mergebuild.engine.methods import REGISTRY, train_difference

    monkeypatch.setattr(reduce, "COMPILED_MIN", 0)
    monkeypatch.setattr(train_difference, "COMPILED_TILE", 0)
    m = REGISTRY[name]
    p = m.Params(**params)
    n = 70_001
    inputs = len(params["weights"]) if "weights" in params else len(m.slots)
    xs = [_awkward_half(n, seed) for seed in range(inputs)]
    want16 = canonical_nans(m.compute(p, [torch.from_numpy(x) for x in xs]).half(), True)
    got = np.empty(n, np.uint16)
    flag = m.compute_half(p, [x.view(np.uint16) for x in xs], got)
    assert flag is not None
    assert np.array_equal(got, want16.view(torch.int16).numpy().view(np.uint16))
    assert flag == bool((~torch.isfinite(want16)).any())


def test_float16_builds_take_the_float16_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """compute._tiled hands float16 chunks to compute_half when the output is float16 (and
    not otherwise): the path the tests above hold to compute is the one builds run."""
    from mergebuild.engine import compute
    from mergebuild.engine.methods import REGISTRY

    m = REGISTRY["triple_sum"]
    calls: list[int] = []
    original = m.compute_half.__func__  # type: ignore[attr-defined]

    def spy(cls, params, xs, out, ctx=None):  # type: ignore[no-untyped-def]
        calls.append(out.size)
        return original(cls, params, xs, out, ctx)

    monkeypatch.setattr(m, "compute_half", classmethod(spy))
    monkeypatch.setattr(reduce, "COMPILED_MIN", 0)
    xs = [torch.from_numpy(_awkward_half(5000, s)) for s in range(3)]
    p = m.Params(alpha=0.3, beta=0.2)
    out16, _ = compute._tiled(m, p, xs, torch.float16)
    out32, _ = compute._tiled(m, p, xs, torch.float32)
    assert calls == [5000]
    want = canonical_nans(out32.half(), True)
    assert torch.equal(out16.view(torch.int16), want.view(torch.int16))


@pytest.mark.parametrize(
    "alphas",
    [[0.25, 0.5, 0.75], [0.0, 1.0, -1.0], [1e-50, 3e4], [0.3]],  # 1e-50: 0 in float32
)
def test_sweep_members_in_float16_are_compute_rounded(
    alphas: list[float], monkeypatch: pytest.MonkeyPatch
) -> None:
    """add_difference's sweep path (compute_many_half: every member from one read of the
    tile) writes each member's compute() result cast to float16, NaNs canonical, and flags
    each member that holds Inf/NaN (3e4 overflows float16)."""
    from mergebuild.engine.methods import REGISTRY

    monkeypatch.setattr(reduce, "COMPILED_MIN", 0)
    m = REGISTRY["add_difference"]
    n = 70_001
    xs = [_awkward_half(n, seed) for seed in (3, 4, 5)]
    params = [m.Params(alpha=a) for a in alphas]
    outs = np.empty((len(alphas), n), np.uint16)
    flags = m.compute_many_half(params, [x.view(np.uint16) for x in xs], outs)
    assert flags is not None
    for k, p in enumerate(params):
        want16 = canonical_nans(m.compute(p, [torch.from_numpy(x) for x in xs]).half(), True)
        assert np.array_equal(outs[k], want16.view(torch.int16).numpy().view(np.uint16)), k
        assert flags[k] == bool((~torch.isfinite(want16)).any())


def test_a_float16_sweep_build_takes_the_one_read_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A float16 recipe's add_difference sweep goes through compute_many_half (counted), and
    its files hold what the same build without it writes."""
    from mergebuild.cli import main
    from mergebuild.demo import synthesize
    from mergebuild.engine.methods import REGISTRY

    for name in "abc":
        synthesize(tmp_path / f"{name}.safetensors", name, scale=1 / 16, dtype="fp16")
    (tmp_path / "r.yaml").write_text(
        "mergebuild: 1\nmodels: {a: a.safetensors, b: b.safetensors, c: c.safetensors}\n"
        "merges:\n  s: {method: add_difference, a: a, b: b, c: c, sweep: {alpha: [0, 0.5, 2]}}\n"
        "outputs:\n  o: {from: s, path: 'o-{alpha}.safetensors', dtype: fp16}\n"
    )
    monkeypatch.setattr(reduce, "COMPILED_MIN", 0)
    m = REGISTRY["add_difference"]
    original = m.compute_many_half.__func__  # type: ignore[attr-defined]
    calls = []

    def spy(cls, params, xs, outs):  # type: ignore[no-untyped-def]
        calls.append(len(params))
        return original(cls, params, xs, outs)

    args = [str(tmp_path / "r.yaml"), "-q", "--cache-dir"]
    monkeypatch.setattr(m, "compute_many_half", classmethod(spy))
    assert main([*args, str(tmp_path / "c1")]) == 0
    assert calls and set(calls) == {3}
    fast = {a: (tmp_path / f"o-{a}.safetensors").read_bytes() for a in ("0", "0.5", "2")}
    monkeypatch.setattr(m, "compute_many_half", classmethod(lambda cls, p, x, o: None))
    for a in fast:
        (tmp_path / f"o-{a}.safetensors").unlink()
    assert main([*args, str(tmp_path / "c2")]) == 0
    for a, data in fast.items():
        assert (tmp_path / f"o-{a}.safetensors").read_bytes() == data, a


def test_the_helpers_plain_python_meaning_is_what_the_loops_compute() -> None:
    """`_wide`, `_put` and `_settle` have plain-Python bodies (numpy's float16 conversions)
    next to the LLVM intrinsics the compiled loops use: a loop run as Python (`py_func`)
    writes the same bits and flag as compiled, specials included."""
    from mergebuild.engine.methods import _kernels

    x = _float32_samples()[::97].copy()  # 20 k values across every binade and boundary
    y = np.linspace(-70000, 70000, x.size, dtype=np.float32)
    compiled, plain = np.empty(x.size, np.uint16), np.empty(x.size, np.uint16)
    args = (np.float32(0.75), np.float32(-0.5))
    flag = _loops().lincomb(x, y, *args, compiled)
    assert _kernels.lincomb.py_func(x, y, *args, plain) == flag
    assert np.array_equal(plain, compiled)
    bits = np.arange(1 << 16, dtype=np.uint16).reshape(-1, 256)
    w = np.linspace(-2, 2, 256, dtype=np.float32)
    compiled, plain = np.empty_like(bits), np.empty_like(bits)
    flag = _loops().blend_rows(bits, bits[::-1].copy(), w, w[::-1].copy(), compiled)
    assert _kernels.blend_rows.py_func(bits, bits[::-1].copy(), w, w[::-1].copy(), plain) == flag
    assert np.array_equal(plain, compiled)


@pytest.mark.parametrize(
    ("method", "params"),
    [("train_difference", "alpha: 0.7"), ("triple_sum", "alpha: 0.3, beta: 0.2")],
)
def test_a_streamed_float16_build_takes_compute_half(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, method: str, params: str
) -> None:
    """A node written straight to a float16 file is streamed tile by tile (_stream_run): the
    method's compute_half runs there (counted), and the file holds what the float32 way
    writes; so does a build where it declines every second tile (the per-tile fallback)."""
    from mergebuild.cli import main
    from mergebuild.demo import synthesize
    from mergebuild.engine.methods import REGISTRY

    for name in "abc":
        synthesize(tmp_path / f"{name}.safetensors", name, scale=1 / 16, dtype="fp16")
    (tmp_path / "r.yaml").write_text(
        "mergebuild: 1\nmodels: {a: a.safetensors, b: b.safetensors, c: c.safetensors}\n"
        f"merges:\n  m: {{method: {method}, a: a, b: b, c: c, {params}}}\n"
        "outputs:\n  o: {from: m, path: o.safetensors, dtype: fp16}\n"
    )
    monkeypatch.setattr(reduce, "COMPILED_MIN", 0)
    m = REGISTRY[method]
    original = m.compute_half.__func__  # type: ignore[attr-defined]
    calls: list[int] = []

    def spy(cls, p, xs, out, ctx=None):  # type: ignore[no-untyped-def]
        calls.append(out.size)
        return original(cls, p, xs, out, ctx)

    out = tmp_path / "o.safetensors"
    monkeypatch.setattr(m, "compute_half", classmethod(spy))
    assert main([str(tmp_path / "r.yaml"), "-q", "--cache-dir", str(tmp_path / "c1")]) == 0
    assert calls and sum(calls) > 1_000_000  # the bulk of the model went through it
    fast = out.read_bytes()

    def every_other(cls, p, xs, o, ctx=None):  # type: ignore[no-untyped-def]
        calls.append(-1)
        return None if len(calls) % 2 == 0 else original(cls, p, xs, o, ctx)

    monkeypatch.setattr(m, "compute_half", classmethod(every_other))
    out.unlink()
    assert main([str(tmp_path / "r.yaml"), "-q", "--cache-dir", str(tmp_path / "c2")]) == 0
    assert out.read_bytes() == fast
    monkeypatch.setattr(m, "compute_half", classmethod(lambda cls, p, xs, o, ctx=None: None))
    out.unlink()
    assert main([str(tmp_path / "r.yaml"), "-q", "--cache-dir", str(tmp_path / "c3")]) == 0
    assert out.read_bytes() == fast


def _bake_inputs(n: int, a16: bool, present: list[bool]) -> tuple[list, list]:
    """(torch inputs, compute_half inputs) of bake_lora: `a` (float16 or float32) and one
    float32 ΔW per LoRA (None where `present` says the LoRA lacks the key), specials included."""
    a = _awkward_half(n, 7)
    a_t = torch.from_numpy(a) if a16 else torch.from_numpy(a.astype(np.float32))
    xs_t: list = [a_t]
    xs_h: list = [a.view(np.uint16) if a16 else a_t.numpy()]
    for k, there in enumerate(present):
        if not there:
            xs_t.append(None)
            xs_h.append(None)
            continue
        d = (_awkward_half(n, 20 + k).astype(np.float32) * np.float32(1.37)).astype(np.float32)
        xs_t.append(torch.from_numpy(d))
        xs_h.append(d)
    return xs_t, xs_h


@pytest.mark.parametrize(
    ("strength", "present", "a16"),
    [
        ([0.6, 0.4], [True, True], True),
        ([0.6, 0.4], [True, True], False),  # a float32 model written as float16
        ([1.0], [True], True),
        ([0.3, 0.0, -1.7], [True, True, True], True),  # a zero strength: that LoRA skipped
        ([0.5, 0.5, 0.5], [True, False, True], True),  # the second LoRA lacks the key
        ([1e-50, 2.0], [True, True], True),  # 0 in float32, not in float64: kept, as compute
        ([3e4, 1.0, 0.25, 2.0], [True, True, True, True], True),  # overflows float16
        ({"preset": "GRAD_V"}, [True, True], True),  # block weights: one number per key
        ([0.0, 0.0], [True, True], True),  # no LoRA changes the key: a's bits (copy_half)
        ([0.5], [False], True),  # ... nor one that lacks it
    ],
)
def test_bake_compute_half_is_compute_rounded_to_float16(
    strength: object, present: list[bool], a16: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """bake_lora's float16 path (_kernels.bake: `a` as float16 bits or float32, float32 ΔW,
    absent LoRAs as None) writes exactly compute()'s float32 result cast to float16 with
    canonical NaNs, and flags Inf/NaN."""
    from mergebuild.engine.methods import REGISTRY
    from mergebuild.engine.methods.base import ComputeContext

    monkeypatch.setattr(reduce, "COMPILED_MIN", 0)
    m = REGISTRY["bake_lora"]
    p = m.Params(strength=strength)
    n = 70_001
    xs_t, xs_h = _bake_inputs(n, a16, present)
    key = "model.diffusion_model.output_blocks.4.1.proj_in.weight"
    ctx = ComputeContext(tensor=key, offset=0, numel=n, node_key="0" * 32, seed=0)
    want16 = canonical_nans(m.compute(p, xs_t, ctx).half(), True)
    got = np.empty(n, np.uint16)
    flag = m.compute_half(p, xs_h, got, ctx)
    assert flag is not None
    assert np.array_equal(got, want16.view(torch.int16).numpy().view(np.uint16))
    assert flag == bool((~torch.isfinite(want16)).any())
    # and numpy's float32 arithmetic, independently of torch: a + d·f32(s), LoRA by LoRA
    values = [s.value_for(key) if hasattr(s, "value_for") else s for s in p.per_lora(len(present))]
    v = xs_t[0].numpy().astype(np.float32)
    for d, s in zip(xs_t[1:], values, strict=True):
        if d is not None and s != 0:
            with np.errstate(all="ignore"):
                v = v + d.numpy() * np.float32(s)
    with np.errstate(all="ignore"):
        ref16 = canonical_nans(torch.from_numpy(v.astype(np.float16)), True)
    assert np.array_equal(got, ref16.view(torch.int16).numpy().view(np.uint16))


def test_bake_takes_its_float16_path_in_tiled_and_declines_what_it_cannot(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """compute._tiled hands bake_lora's chunks to compute_half for a float16 output, absent
    LoRAs as None and float32 ΔW as arrays; the result equals the float32 way's, cast. With
    more LoRAs than compiled for, compute runs instead; with none that changes the key, a's
    bits are copied (float16 `a`)."""
    from mergebuild.engine import compute
    from mergebuild.engine.methods import REGISTRY
    from mergebuild.engine.methods._kernels import BAKE_LORAS
    from mergebuild.engine.methods.base import ComputeContext

    m = REGISTRY["bake_lora"]
    answers: list[object] = []
    original = m.compute_half.__func__  # type: ignore[attr-defined]

    def spy(cls, params, xs, out, ctx):  # type: ignore[no-untyped-def]
        answers.append(original(cls, params, xs, out, ctx))
        return answers[-1]

    monkeypatch.setattr(m, "compute_half", classmethod(spy))
    monkeypatch.setattr(reduce, "COMPILED_MIN", 0)
    ctx = ComputeContext(tensor="k", offset=0, numel=5000, node_key="0" * 32, seed=0)
    for present, strength, fast in [
        ([True, False], [0.6, 0.4], True),
        ([True] * (BAKE_LORAS + 1), 0.5, False),
        ([True, True], [0.0, 0.0], True),
    ]:
        answers.clear()
        xs, _ = _bake_inputs(5000, True, present)
        p = m.Params(strength=strength)
        out16, _ = compute._tiled(m, p, xs, torch.float16, ctx)
        out32, _ = compute._tiled(m, p, xs, torch.float32, ctx)
        assert len(answers) == 1 and (answers[0] is not None) == fast, (present, strength)
        want = canonical_nans(out32.half(), True)
        assert torch.equal(out16.view(torch.int16), want.view(torch.int16))


def test_a_float16_bake_build_takes_the_compiled_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Baking the demo LoRAs into a float16 model runs bake_lora's compute_half on the bulk of
    the touched tensors (counted), and writes the file the float32 way writes."""
    from mergebuild.cli import main
    from mergebuild.demo import synthesize
    from mergebuild.engine.methods import REGISTRY
    from mergebuild.lora.demo import write_demo_loras

    synthesize(tmp_path / "a.safetensors", "a", scale=1 / 16, dtype="fp16")
    loras = write_demo_loras(tmp_path, scale=1 / 16)
    names = {f"l{i}": p.name for i, p in enumerate(loras[:2])}
    (tmp_path / "r.yaml").write_text(
        "mergebuild: 1\nmodels: {a: a.safetensors, "
        + ", ".join(f"{k}: {v}" for k, v in names.items())
        + "}\nmerges:\n  m: a + lora(l0, 0.6) + lora(l1, 0.4)\n"
        "outputs:\n  o: {from: m, path: o.safetensors}\n"
    )
    monkeypatch.setattr(reduce, "COMPILED_MIN", 0)
    m = REGISTRY["bake_lora"]
    original = m.compute_half.__func__  # type: ignore[attr-defined]
    calls: list[int] = []

    def spy(cls, p, xs, out, ctx):  # type: ignore[no-untyped-def]
        done = original(cls, p, xs, out, ctx)
        calls.append(out.size if done is not None else 0)
        return done

    out = tmp_path / "o.safetensors"
    monkeypatch.setattr(m, "compute_half", classmethod(spy))
    assert main([str(tmp_path / "r.yaml"), "-q", "--cache-dir", str(tmp_path / "c1")]) == 0
    assert sum(calls) > 100_000, calls  # the bulk of the touched tensors went through it
    fast = out.read_bytes()
    monkeypatch.setattr(m, "compute_half", classmethod(lambda cls, p, xs, o, ctx=None: None))
    out.unlink()
    assert main([str(tmp_path / "r.yaml"), "-q", "--cache-dir", str(tmp_path / "c2")]) == 0
    assert out.read_bytes() == fast
