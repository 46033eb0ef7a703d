"""Broken or hostile model files through the CLI: one clear error naming the defect, exit 1,
no traceback, nothing cached or written; suspicious values (NaN/Inf) are reported by key."""

from __future__ import annotations

import struct
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from conftest import run_cli
from test_safetensors_io import CASES as HEADER_CASES
from test_safetensors_io import corrupt, hdr

RECIPE = """mergebuild: 1
models:
  a: models/a.safetensors
  b: models/wd13.safetensors
merges:
  m: a * 0.5 + b * 0.5
outputs:
  o: {from: m, path: out/o.safetensors}
"""


def overlapping(tmp: Path) -> Path:
    p = tmp / "x.safetensors"
    text = (
        b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},'
        b'"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}'
    )
    p.write_bytes(hdr(text) + bytes(12))
    return p


def negative_offsets(tmp: Path) -> Path:
    p = tmp / "x.safetensors"
    p.write_bytes(hdr(b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[-8,0]}}') + bytes(8))
    return p


def huge_shape(tmp: Path) -> Path:
    """A shape whose product overflows any int64 count: refused by arithmetic, not allocation."""
    p = tmp / "x.safetensors"
    dims = "[4294967296,4294967296,4294967296]"
    p.write_bytes(
        hdr(f'{{"a":{{"dtype":"F32","shape":{dims},"data_offsets":[0,8]}}}}'.encode()) + bytes(8)
    )
    return p


def not_an_object(tmp: Path) -> Path:
    p = tmp / "x.safetensors"
    p.write_bytes(hdr(b"[1, 2, 3]"))
    return p


def empty(tmp: Path) -> Path:
    p = tmp / "x.safetensors"
    p.write_bytes(b"")
    return p


def deep_json(tmp: Path) -> Path:
    """Found by this suite: json.loads raised RecursionError, which escaped as a crash."""
    p = tmp / "x.safetensors"
    p.write_bytes(hdr(b"[" * 100_000))
    return p


def surrogate_name(tmp: Path) -> Path:
    """Valid JSON, but the name cannot be written back out as UTF-8 (crashed the writer)."""
    p = tmp / "x.safetensors"
    p.write_bytes(hdr(b'{"\\ud800":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}') + bytes(4))
    return p


def shape_case(shape: str, dtype: str = "F32", nbytes: int = 0) -> Callable[[Path], Path]:
    """One tensor whose `shape` JSON is hostile; offsets match the byte count torch would
    compute if it ignored overflow (0 for a zero-size tensor), so only the shape is wrong."""

    def make(tmp: Path) -> Path:
        p = tmp / "x.safetensors"
        text = f'{{"a":{{"dtype":"{dtype}","shape":{shape},"data_offsets":[0,{nbytes}]}}}}'
        p.write_bytes(hdr(text.encode()) + bytes(nbytes))
        return p

    return make


# Found by the red team: [0, 2**70] matched its 0 bytes, then overflowed inside torch
# ("unexpected TypeError ... Overflow" with C++ frames). Every dimension is checked up front.
SHAPES = {
    "zero size, dim 2**70": (shape_case(f"[0,{2**70}]"), "dimension"),
    "zero size, dim 2**63": (shape_case(f"[0,{2**63}]"), "dimension"),
    "zero size, byte stride 2**64": (shape_case(f"[0,{2**62}]"), "too large"),
    "zero size, strides overflow": (shape_case(f"[0,{2**61},8]", "F16"), "too large"),
    "zero size last, huge first": (shape_case(f"[{2**62},4,0]"), "too large"),
    "negative dim": (shape_case("[-1,4]"), "dimension -1"),
    "negative dims cancel": (shape_case("[-2,-2]", nbytes=16), "dimension -2"),
    "float dim": (shape_case("[2.0]", nbytes=8), "dimension 2.0"),
    "string dim": (shape_case('["2"]', nbytes=8), "dimension 2"),
    "bool dim": (shape_case("[true]", nbytes=4), "dimension True"),
    "null dim": (shape_case("[null]"), "dimension None"),
    "nested dim": (shape_case("[[2]]", nbytes=8), "invalid shape"),
    "shape not a list": (shape_case("4", nbytes=16), "not a list"),
    "shape an object": (shape_case('{"0":4}', nbytes=16), "not a list"),
    "huge rank": (shape_case("[" + ",".join(["1"] * 100) + "]", nbytes=4), "100 dimensions"),
}

EXTRA = {
    "deeply nested json": (deep_json, "nested too deeply"),
    "lone surrogate name": (surrogate_name, "not valid Unicode"),
    "overlapping offsets": (overlapping, "overlaps"),
    "negative offsets": (negative_offsets, "outside the file"),
    "huge shape": (huge_shape, "too large"),
    "header not an object": (not_an_object, "not a JSON object"),
    "empty file": (empty, "shorter than"),
    **SHAPES,
}


def hostile_file(tmp: Path, case: str) -> tuple[Path, str]:
    if case in HEADER_CASES:
        mutate, expect = HEADER_CASES[case]
        return corrupt(tmp, mutate), expect
    make, expect = EXTRA[case]
    return make(tmp), expect


@pytest.mark.parametrize("case", [*HEADER_CASES, *EXTRA])
def test_broken_safetensors_input_is_one_clear_error(
    workdir: Path, cache: Path, tmp_path: Path, case: str
) -> None:
    bad, expect = hostile_file(tmp_path, case)
    bad.rename(workdir / "models" / "a.safetensors")
    recipe = workdir / "r.yaml"
    recipe.write_text(RECIPE)
    r = run_cli(recipe, cache=cache)
    assert r.code == 1, (r.code, r.err)
    assert "Traceback" not in r.err and r.err.startswith("error:"), r.err
    assert "a.safetensors" in r.err and expect in r.err, r.err
    assert not (workdir / "out" / "o.safetensors").exists()
    assert not list((cache / "objects").glob("*/*")) if (cache / "objects").exists() else True


@pytest.mark.parametrize("claimed", [(1 << 60), 99 * 1024 * 1024, (1 << 64) - 1])
def test_huge_claimed_header_is_not_allocated(tmp_path: Path, claimed: int) -> None:
    from mergebuild.engine.safetensors_io import read_header
    from mergebuild.errors import BuildError

    p = tmp_path / "h.safetensors"
    p.write_bytes(struct.pack("<Q", claimed) + b"{}" * 100)
    tracemalloc.start()
    try:
        with pytest.raises(BuildError, match="header claims"):
            read_header(p)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, f"allocated {peak} bytes for a {claimed}-byte header claim"


def test_shape_mismatch_names_key_and_both_shapes(workdir: Path, cache: Path) -> None:
    models = workdir / "models"
    t = load_file(str(models / "insta.safetensors"))
    key = "model.diffusion_model.out.2.weight"
    assert key in t
    t[key] = np.zeros((t[key].shape[0], t[key].shape[1] + 1, *t[key].shape[2:]), t[key].dtype)
    save_file(t, str(models / "a.safetensors"))
    recipe = workdir / "r.yaml"
    recipe.write_text(RECIPE)
    r = run_cli(recipe, cache=cache)
    assert r.code == 1 and "Traceback" not in r.err, r.err
    shape_a = list(t[key].shape)
    shape_b = list(load_file(str(models / "wd13.safetensors"))[key].shape)
    assert key in r.err and str(shape_a) in r.err and str(shape_b) in r.err, r.err
    assert not (workdir / "out" / "o.safetensors").exists()


def test_nan_and_inf_inputs_warn_with_keys(workdir: Path, cache: Path) -> None:
    models = workdir / "models"
    t = load_file(str(models / "insta.safetensors"))
    nan_key, inf_key = (
        "model.diffusion_model.out.2.bias",
        "cond_stage_model.transformer.text_model.final_layer_norm.weight",
    )
    assert nan_key in t and inf_key in t
    t[nan_key] = t[nan_key].copy()
    t[nan_key][0] = np.nan
    # a negative NaN with a payload: what an op returns from it depends on operand order
    t[nan_key][1:2].view(np.uint16 if t[nan_key].itemsize == 2 else np.uint32)[0] = (
        0xFE01 if t[nan_key].itemsize == 2 else 0xFFC00001
    )
    t[inf_key] = t[inf_key].copy()
    t[inf_key][-1] = -np.inf
    save_file(t, str(models / "a.safetensors"))
    recipe = workdir / "r.yaml"
    recipe.write_text(RECIPE)
    r = run_cli(recipe, "--json", cache=cache)
    assert r.code == 0, r.err
    assert "warning:" in r.err and "NaN or Inf" in r.err, r.err
    assert nan_key in r.err and inf_key in r.err
    node = next(n for n in r.json["nodes"] if n["name"] == "m")
    assert node["nonfinite_keys"] == sorted([nan_key, inf_key])
    # every NaN is written as its dtype's one positive quiet NaN
    out = load_file(str(workdir / "out" / "o.safetensors"))[nan_key]
    bits = out.view({2: np.uint16, 4: np.uint32}[out.itemsize])
    canonical = {2: 0x7E00, 4: 0x7FC00000}[out.itemsize]
    assert bits[:2].tolist() == [canonical, canonical]
    assert not np.isnan(out[2:]).any()


@pytest.mark.parametrize("kind", ["directory", "device", "fifo", "symlink_loop", "unreadable"])
def test_model_path_that_is_not_a_model_file(workdir: Path, cache: Path, kind: str) -> None:
    import os

    target = workdir / "models" / "a.safetensors"
    if kind == "directory":
        target.mkdir()
    elif kind == "device":
        target.symlink_to("/dev/zero")
    elif kind == "fifo":
        os.mkfifo(target)
    elif kind == "symlink_loop":
        target.symlink_to(target)
    else:
        target.write_bytes(b"x")
        target.chmod(0)
        if os.geteuid() == 0:
            pytest.skip("root reads any file")
    recipe = workdir / "r.yaml"
    recipe.write_text(RECIPE)
    r = run_cli(recipe, cache=cache, timeout=60)
    assert r.code == 1 and "Traceback" not in r.err and "a.safetensors" in r.err, r.err
    assert "unexpected" not in r.err, r.err


@pytest.mark.parametrize(
    ("shape", "dtype"),
    [([0, 3], "F32"), ([5, 0], "F16"), ([0, 2**40], "F32"), ([2**61 - 1, 0], "U8"), ([], "F64")],
)
def test_edge_shapes_that_torch_holds_are_accepted(
    tmp_path: Path, shape: list[int], dtype: str
) -> None:
    """The dimension checks refuse only what overflows int64: these build in torch."""
    import torch

    from mergebuild.engine.dtypes import ITEMSIZE, to_torch
    from mergebuild.engine.safetensors_io import read_header

    n = ITEMSIZE[dtype] * (1 if not shape else 0)
    text = f'{{"a":{{"dtype":"{dtype}","shape":{shape},"data_offsets":[0,{n}]}}}}'
    p = tmp_path / "x.safetensors"
    p.write_bytes(hdr(text.encode()) + bytes(n))
    info = read_header(p).tensors["a"][0]
    assert list(info.shape) == shape
    assert tuple(torch.empty(info.shape, dtype=to_torch(dtype)).shape) == tuple(shape)
