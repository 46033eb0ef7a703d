"""float16 passes run on numpy arrays without importing torch (engine/arrays.py); values that
need torch convert on the way, and every path gives the same bytes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import SRC, load_st

MODELS = """\
mergebuild: 1
models:
  anything: models/anything-v3.safetensors
  nai_full: models/nai-full.safetensors
  nai_sfw: models/nai-sfw.safetensors
  insta: models/insta.safetensors
merges:
"""

SWEEP = (
    "  nsfw: {method: add_difference, a: anything, b: nai_full, c: nai_sfw,"
    " sweep: {alpha: [0.25, 0.7]}}\n"
)
SWEEP_OUT = '  nsfw: {from: nsfw, path: "out/nsfw-{alpha}.safetensors"}\n'

# a fresh interpreter: builds, then fails if torch was imported on the way
PROBE = (
    "import sys; from mergebuild.cli import main; rc = main(sys.argv[1:]); "
    "assert 'torch' not in sys.modules, 'torch was imported'; raise SystemExit(rc)"
)


def _recipe(workdir: Path, merges: str, outputs: str) -> Path:
    path = workdir / "r.yaml"
    path.write_text(MODELS + merges + "outputs:\n" + outputs)
    return path


def _probe(recipe: Path, cache: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(SRC), "MERGEBUILD_CACHE_DIR": str(cache)}
    return subprocess.run(
        [sys.executable, "-c", PROBE, str(recipe), "-q", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _f32(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float32)


def test_fp16_sweep_builds_without_torch_and_matches_numpy(workdir: Path, cache: Path) -> None:
    recipe = _recipe(workdir, SWEEP, SWEEP_OUT)
    for jobs in ("1", "2"):
        p = _probe(recipe, cache / jobs, "-j", jobs)
        assert p.returncode == 0, p.stderr
    m = {n: load_st(workdir / "models" / f"{f}.safetensors")
         for n, f in (("a", "anything-v3"), ("b", "nai-full"), ("c", "nai-sfw"))}  # fmt: skip
    for alpha in (0.25, 0.7):
        out = load_st(workdir / "out" / f"nsfw-{alpha}.safetensors")
        assert set(out) == set(m["a"])
        for k, a in m["a"].items():
            got = out[k]
            if a.dtype != np.float16 or k.endswith("position_ids"):
                assert got.dtype == a.dtype and np.array_equal(got, a), k  # copied as it is
                continue
            # the method's float32 ops in its order, rounded once to float16 (numpy's own)
            want = ((_f32(m["b"][k]) - _f32(m["c"][k])) * np.float32(alpha) + _f32(a)).astype(
                np.float16
            )
            assert got.dtype == np.float16 and got.tobytes() == want.tobytes(), k


def test_half_loop_methods_chains_and_copies_build_without_torch(
    workdir: Path, cache: Path
) -> None:
    """Streamed nodes (fold's too), a cached intermediate read by the next node (computed
    whole, not streamed), and a plain copy: no torch, and the chain's numbers are numpy's."""
    recipe = _recipe(
        workdir,
        "  td: {method: train_difference, a: anything, b: nai_full, c: nai_sfw, alpha: 0.5}\n"
        "  ts: {method: triple_sum, a: anything, b: nai_full, c: insta, alpha: 0.2, beta: 0.3}\n"
        "  s1: {method: add_difference, a: anything, b: nai_full, c: nai_sfw, alpha: 0.3}\n"
        "  s2: {method: weighted_sum, a: s1, b: insta, alpha: 0.4}\n"
        "  fo: {method: fold, models: [anything, nai_full, nai_sfw], weights: [1, -0.5, 0.5]}\n"
        "  same: {method: copy, a: insta}\n",
        "  td: {from: td, path: out/td.safetensors}\n"
        "  ts: {from: ts, path: out/ts.safetensors}\n"
        "  s2: {from: s2, path: out/s2.safetensors}\n"
        "  fo: {from: fo, path: out/fo.safetensors}\n"
        "  copy: {from: insta, path: out/insta-copy.safetensors}\n"
        "  same: {from: same, path: out/insta-same.safetensors}\n",
    )
    p = _probe(recipe, cache, "-j", "2")
    assert p.returncode == 0, p.stderr
    models = workdir / "models"
    a, b, c, i = (
        load_st(models / f"{f}.safetensors")
        for f in ("anything-v3", "nai-full", "nai-sfw", "insta")
    )
    for name in ("insta-copy", "insta-same"):  # an output of a model, a `copy` node's
        copy = load_st(workdir / "out" / f"{name}.safetensors")
        assert {k: v.tobytes() for k, v in copy.items()} == {k: v.tobytes() for k, v in i.items()}
    s2 = load_st(workdir / "out" / "s2.safetensors")
    for k, x in a.items():
        if x.dtype != np.float16 or k.endswith("position_ids"):
            assert np.array_equal(s2[k], x), k
            continue
        s1 = ((_f32(b[k]) - _f32(c[k])) * np.float32(0.3) + _f32(x)).astype(np.float16)
        want = (_f32(s1) * np.float32(1.0 - 0.4) + _f32(i[k]) * np.float32(0.4)).astype(np.float16)
        assert s2[k].tobytes() == want.tobytes(), k


def test_a_pass_that_needs_torch_still_imports_it(workdir: Path, cache: Path) -> None:
    """An fp32 output of float16 models casts with torch: the probe must see it imported."""
    recipe = _recipe(workdir, SWEEP, '  nsfw: {from: nsfw, path: "out/n-{alpha}.safetensors",'
                     " dtype: fp32}\n")  # fmt: skip
    p = _probe(recipe, cache)
    assert p.returncode != 0 and "torch was imported" in p.stderr


def _build(recipe: Path, cache: Path, jobs: int) -> dict[str, bytes]:
    from mergebuild.build import Builder
    from mergebuild.cache import CacheStore
    from mergebuild.recipe import load_recipe

    Builder(load_recipe(recipe), CacheStore(cache), jobs=jobs).run()
    return {p.name: p.read_bytes() for p in sorted((recipe.parent / "out").iterdir())}


@pytest.mark.parametrize("jobs", [1, 2])
def test_values_that_need_torch_convert_on_the_way(
    workdir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, jobs: int
) -> None:
    """Numpy reads forced on a pass whose steps need torch (a whole-tensor method feeding
    another node, a sweep of a method without float16 loops, an fp32 output cast): every
    value converts where torch is needed, with the bytes of the normal (torch) pass."""
    from mergebuild.engine import executor

    recipe = _recipe(
        workdir,
        SWEEP + "  ws: {method: weighted_sum, a: anything, b: insta, sweep: {alpha: [0.3, 0.6]}}\n"
        "  tv: {method: ties, base: anything, models: [nai_full, insta], k: 0.5}\n"
        "  chain: {method: weighted_sum, a: tv, b: nai_sfw, alpha: 0.5}\n",
        SWEEP_OUT + '  ws: {from: ws, path: "out/ws-{alpha}.safetensors", dtype: fp32}\n'
        "  chain: {from: chain, path: out/chain.safetensors}\n",
    )
    normal = _build(recipe, tmp_path / "c1", jobs)
    assert len(normal) == 5
    for p in (workdir / "out").iterdir():
        p.unlink()
    seen: list[bool] = []
    real = executor.FusedPass._without_torch

    def forced(self: executor.FusedPass, units: list) -> bool:
        seen.append(real(self, units))
        return True

    monkeypatch.setattr(executor.FusedPass, "_without_torch", forced)
    assert _build(recipe, tmp_path / "c2", jobs) == normal
    assert seen and not any(seen)  # the pass did need torch: the forced reads were exercised


@pytest.mark.parametrize("jobs", ["1", "2"])
def test_whole_tensor_methods_build_without_torch_with_the_bytes_of_the_torch_pass(
    workdir: Path, cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, jobs: str
) -> None:
    """add_cosine_a and slerp streamed to their files, add_cosine_b and a slerp at alpha 1
    feeding other nodes (whole values): statistics and tiles from the numpy arrays, no torch,
    and the bytes of the same build on tensors (the pass forced to import torch)."""
    from mergebuild.engine import executor

    recipe = _recipe(
        workdir,
        "  ca: {method: add_cosine_a, a: anything, b: insta, alpha: 0.1}\n"
        "  cb: {method: add_cosine_b, a: nai_full, b: insta, alpha: 0.2, sim_min: 0.5}\n"
        "  mix: {method: weighted_sum, a: cb, b: anything, alpha: 0.3}\n"
        "  sl: {method: slerp, a: anything, b: nai_sfw, alpha: 0.35}\n"
        "  s1: {method: slerp, a: anything, b: nai_sfw, alpha: 1.0}\n"
        "  mix1: {method: add_difference, a: s1, b: nai_full, c: insta, alpha: 0.5}\n",
        "  ca: {from: ca, path: out/ca.safetensors}\n"
        "  mix: {from: mix, path: out/mix.safetensors}\n"
        "  sl: {from: sl, path: out/sl.safetensors}\n"
        "  mix1: {from: mix1, path: out/mix1.safetensors}\n",
    )
    p = _probe(recipe, cache, "-j", jobs)
    assert p.returncode == 0, p.stderr
    free = {q.name: q.read_bytes() for q in sorted((workdir / "out").iterdir())}
    for q in (workdir / "out").iterdir():
        q.unlink()
    monkeypatch.setattr(executor.FusedPass, "_without_torch", lambda self, units: False)
    assert _build(recipe, tmp_path / "torch", int(jobs)) == free
    assert len(free) == 4


def test_a_failed_background_import_of_torch_is_the_error_reported() -> None:
    """The pass's early `import torch` runs on a thread of its own; when it fails, the error
    a later use of torch reports is that first one (importing a half-loaded torch again would
    fail with another, misleading one)."""
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from mergebuild.engine import arrays\n"
        "arrays.import_torch_ahead()\n"
        "first = arrays._ahead_error[0]\n"
        "sys.modules['torch'] = None\n"
        "try:\n"
        "    arrays.ensure_torch()\n"
        "except ImportError as e:\n"
        "    assert e is first and e.__cause__ is not None, (e, first)\n"
        "    print('first error reported')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "first error reported", out.stderr
