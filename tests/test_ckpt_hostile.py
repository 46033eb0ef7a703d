"""Zip .ckpt inputs read by byte range: every member checked before use, views read exactly,
compressed members unpacked (bounded, CRC-checked), and a file that changes or shrinks during a
build fails it with one message instead of SIGBUS or someone else's bytes.

Hostile archives are built with Python's zipfile (and byte patches) from a file torch.save wrote;
expected values come from numpy and from torch.load(weights_only=True), never from the reader.
"""

from __future__ import annotations

import io
import itertools
import os
import pickle
import struct
import sys
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from conftest import SRC, load_st, run_cli

torch = pytest.importorskip("torch")

from mergebuild.atomic import TMP_PREFIX  # noqa: E402
from mergebuild.engine.readers import CheckpointSource  # noqa: E402
from mergebuild.errors import BuildError  # noqa: E402

RNG = np.random.default_rng(12)
BASE = RNG.standard_normal((6, 10)).astype(np.float32)
LONG = RNG.standard_normal(40).astype(np.float32)


def reference() -> dict[str, np.ndarray]:
    """The values every key of `views_state()` must read as, computed with numpy alone."""
    return {
        "plain": BASE,
        "transposed": BASE.T,
        "column_slice": BASE[:, 3:7],
        "offset_view": LONG[5:25].reshape(4, 5),
        "strided": LONG[::3],
        "shared_a": LONG[:10],
        "shared_b": LONG[10:30],
        "scalar": np.array(LONG[7]),
        "half": BASE.astype(np.float16),
        "half_t": BASE.astype(np.float16).T,
        "ints": np.arange(12, dtype=np.int64).reshape(3, 4),
        "empty": np.zeros((0, 3), dtype=np.float32),
    }


def views_state() -> dict[str, torch.Tensor]:
    base, long = torch.from_numpy(BASE.copy()), torch.from_numpy(LONG.copy())
    half = base.half()
    return {
        "plain": base,
        "transposed": base.t(),
        "column_slice": base[:, 3:7],
        "offset_view": long[5:25].view(4, 5),
        "strided": long[::3],
        "shared_a": long[:10],
        "shared_b": long[10:30],
        "scalar": long[7],
        "half": half,
        "half_t": half.t(),
        "ints": torch.arange(12).view(3, 4),
        "empty": torch.zeros(0, 3),
    }


def save(path: Path, obj: object) -> Path:
    torch.save(obj, path)
    return path


def read_all(path: Path, pieces: int = 1) -> dict[str, np.ndarray]:
    """Every tensor through the reader, in `pieces` flat ranges, reassembled."""
    src = CheckpointSource(path)
    try:
        out = {}
        for k, info in src.infos().items():
            n = int(np.prod(info.shape))
            cuts = sorted({0, n, *(n * i // pieces for i in range(1, pieces))})
            parts = [src.read_flat(k, lo, hi) for lo, hi in itertools.pairwise(cuts)]
            flat = torch.cat(parts) if parts else src.read_flat(k, 0, 0)
            out[k] = flat.reshape(info.shape).numpy()
        return out
    finally:
        src.close()


def members(path: Path) -> list[tuple[zipfile.ZipInfo, bytes]]:
    with zipfile.ZipFile(path) as z:
        return [(i, z.read(i)) for i in z.infolist()]


def rezip(
    src: Path,
    dst: Path,
    method: Callable[[str], int] = lambda n: zipfile.ZIP_STORED,
    data: Callable[[str, bytes], bytes | None] = lambda n, b: b,
    extra: list[tuple[str, bytes]] = (),  # type: ignore[assignment]
) -> Path:
    """A copy of a torch zip with each member's compression and bytes chosen per name
    (None drops the member); `extra` members are appended, duplicates allowed."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about duplicate names
        with zipfile.ZipFile(dst, "w") as z:
            for info, raw in members(src):
                new = data(info.filename, raw)
                if new is not None:
                    z.writestr(info.filename, new, compress_type=method(info.filename))
            for name, raw in extra:
                z.writestr(name, raw)
    return dst


def storage_names(path: Path) -> list[str]:
    return [i.filename for i, _ in members(path) if "/data/" in i.filename]


def biggest_storage(path: Path) -> str:
    return max((m for m in members(path) if "/data/" in m[0].filename), key=lambda m: m[1])[
        0
    ].filename


def patch_entry(path: Path, name: str, sig: bytes, field: int, fmt: str, value: int) -> None:
    """Overwrite one fixed field (byte offset `field`) of the local (PK\\3\\4) or central
    (PK\\1\\2) header of member `name` in place: what no zip library writes on purpose."""
    raw = bytearray(path.read_bytes())
    name_at = 30 if sig == b"PK\x03\x04" else 46
    pos = 0
    while True:
        pos = raw.index(sig, pos)
        n = struct.unpack_from("<H", raw, pos + (26 if name_at == 30 else 28))[0]
        if raw[pos + name_at : pos + name_at + n] == name.encode():
            struct.pack_into(fmt, raw, pos + field, value)
            path.write_bytes(bytes(raw))
            return
        pos += 4


@pytest.fixture
def good(tmp_path: Path) -> Path:
    return save(tmp_path / "good.ckpt", {"state_dict": views_state(), "epoch": 2})


# -- values: views, offsets, byte order ---------------------------------------------------------


@pytest.mark.parametrize("pieces", [1, 3, 7])
def test_views_read_like_numpy_and_torch_load(good: Path, pieces: int) -> None:
    got = read_all(good, pieces)
    ref = reference()
    loaded = torch.load(good, weights_only=True)["state_dict"]
    assert set(got) == set(ref)
    for k, exp in ref.items():
        np.testing.assert_array_equal(got[k], exp, err_msg=k)
        assert got[k].dtype == exp.dtype, k
        np.testing.assert_array_equal(got[k], loaded[k].numpy(), err_msg=k)


def test_big_endian_storages_are_swapped(good: Path, tmp_path: Path) -> None:
    """A file written on a big-endian machine: every storage byte-swapped, byteorder 'big'."""
    state = {k: v for k, v in views_state().items() if v.dtype == torch.float32}
    src = save(tmp_path / "le.ckpt", {"state_dict": state})
    big = rezip(
        src,
        tmp_path / "be.ckpt",
        data=lambda n, b: (
            b"big"
            if n.endswith("/byteorder")
            else np.frombuffer(b, ">f4").astype("<f4").view("u1").tobytes()
            if "/data/" in n
            else b
        ),
    )
    assert torch.load(big, weights_only=True)["state_dict"]["plain"][0, 0] == BASE[0, 0]
    got = read_all(big, 2)
    for k, exp in reference().items():
        if k in state:
            np.testing.assert_array_equal(got[k], exp, err_msg=k)


def test_parameters_and_nested_state_dict(tmp_path: Path) -> None:
    p = save(
        tmp_path / "p.ckpt",
        {"state_dict": {"w": torch.nn.Parameter(torch.from_numpy(BASE.copy()))}, "opt": [1, 2]},
    )
    np.testing.assert_array_equal(read_all(p)["w"], BASE)


# -- compressed members: unpacked, bounded, CRC-checked -----------------------------------------


def _deflate_first(names: list[str]) -> Callable[[str], int]:
    return lambda n: zipfile.ZIP_DEFLATED if n == names[0] else zipfile.ZIP_STORED


COMPRESSIONS = {
    "one storage deflated": lambda names: _deflate_first(names),
    "all members deflated": lambda names: lambda n: zipfile.ZIP_DEFLATED,
    "data.pkl stored, storages deflated": lambda names: lambda n: 8 if "/data/" in n else 0,
    "pickle deflated only": lambda names: lambda n: 8 if n.endswith("data.pkl") else 0,
}


@pytest.mark.parametrize("case", COMPRESSIONS)
def test_compressed_members_read_correctly(good: Path, tmp_path: Path, case: str) -> None:
    """Found by the red team: the memory-mapped path read deflated bytes as tensor data
    (garbage, exit 0). torch.load reads such archives, so they are unpacked, not refused."""
    z = rezip(good, tmp_path / "z.ckpt", method=COMPRESSIONS[case](storage_names(good)))
    got = read_all(z, 3)
    loaded = torch.load(z, weights_only=True)["state_dict"]
    for k, exp in reference().items():
        np.testing.assert_array_equal(got[k], exp, err_msg=k)
        np.testing.assert_array_equal(got[k], loaded[k].numpy(), err_msg=k)


def _corrupt_deflated(good: Path, tmp_path: Path, how: str) -> Path:
    name = storage_names(good)[0]
    z = rezip(good, tmp_path / "z.ckpt", method=_deflate_first([name]))
    if how == "crc":
        patch_entry(z, name, b"PK\x01\x02", 16, "<L", 0xDEADBEEF)
    else:
        with zipfile.ZipFile(z) as zf:
            info = zf.getinfo(name)
        raw = bytearray(z.read_bytes())
        start = info.header_offset + 30 + len(name)
        raw[start : start + info.compress_size] = bytes(info.compress_size)
        z.write_bytes(bytes(raw))
    return z


@pytest.mark.parametrize("how", ["crc", "stream"])
def test_damaged_compressed_member_is_one_error(good: Path, tmp_path: Path, how: str) -> None:
    z = _corrupt_deflated(good, tmp_path, how)
    with pytest.raises(BuildError, match=r"z\.ckpt.*(CRC|damaged|Error)") as e:
        read_all(z)
    assert storage_names(good)[0] in str(e.value)


# -- structure: what the archive claims must be what it holds -----------------------------------


def truncated_member(good: Path, dst: Path) -> Path:
    """The biggest storage cut to half, the archive otherwise consistent."""
    big = biggest_storage(good)
    return rezip(good, dst, data=lambda n, b: b[: len(b) // 2] if n == big else b)


def grown_member(good: Path, dst: Path) -> Path:
    name = storage_names(good)[0]
    return rezip(good, dst, data=lambda n, b: b + bytes(8) if n == name else b)


def missing_member(good: Path, dst: Path) -> Path:
    name = storage_names(good)[-1]
    return rezip(good, dst, data=lambda n, b: None if n == name else b)


def duplicate_member(good: Path, dst: Path) -> Path:
    name = storage_names(good)[0]
    return rezip(good, dst, extra=[(name, bytes(24))])


def _copy_patched(good: Path, dst: Path, *patch: object) -> Path:
    dst.write_bytes(good.read_bytes())
    patch_entry(dst, *patch)  # type: ignore[arg-type]
    return dst


def member_runs_into_next(good: Path, dst: Path) -> Path:
    """Central directory sizes grown by 64: the member's bytes would take the next header's."""
    name = storage_names(good)[0]
    size = dict((i.filename, i.file_size) for i, _ in members(good))[name]
    _copy_patched(good, dst, name, b"PK\x01\x02", 20, "<L", size + 64)
    patch_entry(dst, name, b"PK\x01\x02", 24, "<L", size + 64)
    return dst


def member_beyond_eof(good: Path, dst: Path) -> Path:
    name = storage_names(good)[-1]
    return _copy_patched(good, dst, name, b"PK\x01\x02", 42, "<L", 10**9)


def member_size_beyond_eof(good: Path, dst: Path) -> Path:
    name = biggest_storage(good)
    _copy_patched(good, dst, name, b"PK\x01\x02", 20, "<L", 10**9)
    patch_entry(dst, name, b"PK\x01\x02", 24, "<L", 10**9)
    return dst


def local_method_differs(good: Path, dst: Path) -> Path:
    return _copy_patched(good, dst, storage_names(good)[0], b"PK\x03\x04", 8, "<H", 8)


def central_says_deflated(good: Path, dst: Path) -> Path:
    """Stored bytes that the central directory calls deflated (and vice versa locally)."""
    name = storage_names(good)[0]
    _copy_patched(good, dst, name, b"PK\x01\x02", 10, "<H", 8)
    patch_entry(dst, name, b"PK\x03\x04", 8, "<H", 8)
    return dst


def local_name_differs(good: Path, dst: Path) -> Path:
    name = storage_names(good)[0]
    fixed = bytearray(good.read_bytes())
    at = fixed.index(name.encode()) + len(name) - 1  # the first copy is the local header's
    fixed[at] = ord("9") if fixed[at] != ord("9") else ord("8")
    dst.write_bytes(bytes(fixed))
    return dst


def encrypted_flag(good: Path, dst: Path) -> Path:
    name = storage_names(good)[0]
    _copy_patched(good, dst, name, b"PK\x01\x02", 8, "<H", 0x809)
    patch_entry(dst, name, b"PK\x03\x04", 6, "<H", 0x809)
    return dst


def unknown_method(good: Path, dst: Path) -> Path:
    name = storage_names(good)[0]
    _copy_patched(good, dst, name, b"PK\x01\x02", 10, "<H", 99)
    patch_entry(dst, name, b"PK\x03\x04", 8, "<H", 99)
    return dst


def bzip2_member(good: Path, dst: Path) -> Path:
    """torch's reader (miniz) reads stored and deflate members only: nor does mergebuild."""
    name = storage_names(good)[0]
    return rezip(good, dst, method=lambda n: zipfile.ZIP_BZIP2 if n == name else 0)


def lzma_members(good: Path, dst: Path) -> Path:
    return rezip(good, dst, method=lambda n: zipfile.ZIP_LZMA if "/data/" in n else 0)


def cut_file(good: Path, dst: Path) -> Path:
    """The file cut inside its storages: the central directory is gone."""
    dst.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    return dst


def no_pickle(good: Path, dst: Path) -> Path:
    return rezip(good, dst, data=lambda n, b: None if n.endswith("data.pkl") else b)


def bad_byteorder(good: Path, dst: Path) -> Path:
    return rezip(good, dst, data=lambda n, b: b"middle" if n.endswith("/byteorder") else b)


STRUCTURE = {
    "member truncated to half": (truncated_member, "declares"),
    "member longer than its storage": (grown_member, "declares"),
    "member missing": (missing_member, "no member"),
    "duplicate member name": (duplicate_member, "2 times"),
    "member runs into the next": (member_runs_into_next, "overlap"),
    "member offset beyond EOF": (member_beyond_eof, "local header"),
    "member size beyond EOF": (member_size_beyond_eof, "beyond the end"),
    "local method differs": (local_method_differs, "compression method"),
    "stored bytes called deflated": (central_says_deflated, ""),
    "local name differs": (local_name_differs, "local header"),
    "encrypted member": (encrypted_flag, "encrypted"),
    "unknown compression": (unknown_method, "compression method 99"),
    "bzip2 member": (bzip2_member, "(bzip2)"),
    "lzma members": (lzma_members, "(lzma)"),
    "file cut in half": (cut_file, "truncated?"),
    "no data.pkl": (no_pickle, "data.pkl"),
    "unknown byte order": (bad_byteorder, "byte order"),
}


@pytest.mark.parametrize("case", STRUCTURE)
def test_inconsistent_archive_is_refused(good: Path, tmp_path: Path, case: str) -> None:
    make, expect = STRUCTURE[case]
    bad = make(good, tmp_path / "bad.ckpt")
    with pytest.raises(BuildError) as e:
        read_all(bad)
    msg = str(e.value)
    assert "bad.ckpt" in msg and expect in msg, msg


def test_huge_zero_size_ckpt_tensor_is_refused(tmp_path: Path) -> None:
    """Same class as safetensors' [0, 2**70]: a zero-byte tensor whose byte strides do not fit
    int64 (torch builds it; its safetensors copy could never be read back)."""
    p = save(tmp_path / "h.ckpt", {"w": torch.zeros(2), "h": torch.empty(0, 2**62)})
    with pytest.raises(BuildError, match=r"h\.ckpt: tensor 'h' has a shape too large"):
        CheckpointSource(p)


@pytest.mark.parametrize("dim", [2**70, 2**63, -5])
def test_pickled_dimension_out_of_range_is_one_error(tmp_path: Path, dim: int) -> None:
    """The pickle's size tuple patched to a dimension no int64 holds, or a negative one."""
    p = save(tmp_path / "h.ckpt", {"w": torch.zeros(2), "h": torch.empty(0, 12345678)})
    enc = b"\x8a" + bytes([9]) + dim.to_bytes(9, "little", signed=True)
    bad = rezip(
        p,
        tmp_path / "bad.ckpt",
        data=lambda n, b: (
            b.replace(b"J" + struct.pack("<i", 12345678), enc) if n.endswith("data.pkl") else b
        ),
    )
    assert bad.read_bytes() != p.read_bytes()
    with pytest.raises(BuildError) as e:
        CheckpointSource(bad)
    msg = str(e.value)
    assert "bad.ckpt" in msg and "\n" not in msg and len(msg) < 400, msg
    assert "Exception raised from" not in msg, msg


# -- through the CLI: merges exact, refusals one message, nothing left behind -------------------

RECIPE = """mergebuild: 1
models:
  a: models/a.ckpt
  b: models/wd13.safetensors
merges:
  m: a * 0.5 + b * 0.5
outputs:
  o: {from: m, path: out/o.safetensors}
"""


def ckpt_twin(
    workdir: Path, method: Callable[[str], int] | None = None, legacy: bool = False
) -> Path:
    """models/a.ckpt holding insta.safetensors' tensors as views of bigger storages (each key
    the second half of a 2x-long buffer, so every read has a non-zero storage offset)."""
    a = load_st(workdir / "models" / "insta.safetensors")
    state = {}
    for k, v in a.items():
        t = torch.from_numpy(np.concatenate([v.reshape(-1), v.reshape(-1)]))
        state[k] = t[v.size :].view(v.shape) if v.ndim else t[1]
    p = workdir / "models" / "plain.ckpt"
    torch.save({"state_dict": state}, p, _use_new_zipfile_serialization=not legacy)
    if method is None:
        p.rename(workdir / "models" / "a.ckpt")
    else:
        rezip(p, workdir / "models" / "a.ckpt", method=method)
    return workdir / "models" / "a.ckpt"


def expected_merge(workdir: Path) -> dict[str, np.ndarray]:
    a = load_st(workdir / "models" / "insta.safetensors")
    b = load_st(workdir / "models" / "wd13.safetensors")
    out = {}
    for k, x in a.items():
        if x.dtype.kind != "f":
            out[k] = x
            continue
        exp = x.astype(np.float32) * np.float32(0.5) + b[k].astype(np.float32) * np.float32(0.5)
        out[k] = exp.astype(x.dtype)
    return out


def leftovers(*dirs: Path) -> list[Path]:
    found = []
    for d in dirs:
        if d.exists():
            found += [p for p in d.rglob("*") if p.is_file() and p.name.startswith(TMP_PREFIX)]
            found += list(d.rglob("*.safetensors"))
    return found


@pytest.mark.parametrize("compressed", [False, True])
def test_ckpt_merge_is_exact(workdir: Path, cache: Path, compressed: bool) -> None:
    method = (lambda n: zipfile.ZIP_DEFLATED) if compressed else None
    ckpt_twin(workdir, method)
    r = workdir / "r.yaml"
    r.write_text(RECIPE)
    res = run_cli(r, "-j", "2", cache=cache, env={"MERGEBUILD_CHUNK_ELEMENTS": "1000"})
    assert res.code == 0, res.err
    got = load_st(workdir / "out" / "o.safetensors")
    exp = expected_merge(workdir)
    assert set(got) == set(exp)
    for k, x in exp.items():
        np.testing.assert_array_equal(got[k], x, err_msg=k)


@pytest.mark.parametrize("case", ["member truncated to half", "member runs into the next"])
def test_cli_refuses_inconsistent_archive(workdir: Path, cache: Path, case: str) -> None:
    make, expect = STRUCTURE[case]
    plain = ckpt_twin(workdir).rename(workdir / "models" / "plain.ckpt")
    make(plain, workdir / "models" / "a.ckpt")
    r = workdir / "r.yaml"
    r.write_text(RECIPE)
    res = run_cli(r, cache=cache)
    assert res.code == 1 and "Traceback" not in res.err, res.err
    assert res.err.startswith("error:") and "a.ckpt" in res.err and expect in res.err, res.err
    assert not leftovers(workdir / "out", cache)


# A real CLI run in a subprocess whose reader changes the input file on its Nth read: a
# deterministic "someone rewrote the model mid-build" (the old memory-mapped reader died of
# SIGBUS here, exit 135, leaving its temp file in the cache).
DRIVER = r"""
import os, sys
import mergebuild.engine.readers as readers
from mergebuild.cli import main

target, mode, nth = sys.argv[1], sys.argv[2], int(sys.argv[3])
orig = readers.CheckpointSource.read_flat
calls = [0]

def read_flat(self, key, lo, hi):
    calls[0] += 1
    if calls[0] == nth:
        size = os.path.getsize(target)
        if mode == "half":
            os.truncate(target, size // 2)
        elif mode == "empty":
            os.truncate(target, 0)
        elif mode == "tail":
            os.truncate(target, size - 100)
        elif mode == "rewrite":  # same size, other bytes, a later mtime
            with open(target, "r+b") as f:
                f.seek(size // 3)
                f.write(bytes(64))
            st = os.stat(target)
            os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    return orig(self, key, lo, hi)

readers.CheckpointSource.read_flat = read_flat
raise SystemExit(main(sys.argv[4:]))
"""


@pytest.mark.parametrize(
    ("mode", "nth", "jobs", "kind"),
    [
        ("half", 1, "1", "zip"),
        ("half", 40, "2", "zip"),
        ("empty", 1, "2", "zip"),
        ("empty", 25, "1", "zip"),
        ("tail", 3, "1", "zip"),
        ("rewrite", 5, "2", "zip"),
        ("half", 2, "1", "deflated"),
        ("rewrite", 2, "2", "deflated"),
        ("half", 1, "2", "legacy"),  # held in memory: the end-of-build check catches it
    ],
)
def test_ckpt_changed_mid_build_fails_cleanly(
    workdir: Path, cache: Path, mode: str, nth: int, jobs: str, kind: str
) -> None:
    import subprocess

    method = (lambda n: zipfile.ZIP_DEFLATED) if kind == "deflated" else None
    a = ckpt_twin(workdir, method, legacy=kind == "legacy")
    r = workdir / "r.yaml"
    r.write_text(RECIPE)
    env = {
        **os.environ,
        "PYTHONPATH": str(SRC),
        "MERGEBUILD_CACHE_DIR": str(cache),
        "MERGEBUILD_CHUNK_ELEMENTS": "500",
    }
    p = subprocess.run(
        [sys.executable, "-c", DRIVER, str(a), mode, str(nth), str(r), "-j", jobs],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 1, (p.returncode, p.stderr[-2000:])
    assert "Traceback" not in p.stderr, p.stderr
    errors = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "a.ckpt" in errors[0] and "changed" in errors[0], p.stderr
    assert not leftovers(workdir / "out", cache)


# -- messages never suggest an unsafe load ------------------------------------------------------


def _zip_with_pickle(good: Path, dst: Path, payload: bytes) -> Path:
    return rezip(good, dst, data=lambda n, b: payload if n.endswith("data.pkl") else b)


def _global_pickle(module: str, name: str) -> bytes:
    return b"\x80\x02c" + f"{module}\n{name}\n".encode() + b")R."


PICKLES: dict[str, Callable[[Path, Path], Path]] = {
    "protocol 0 file": lambda g, d: _write(d, pickle.dumps({"a": 1}, protocol=0)),
    "protocol 4 file": lambda g, d: _write(d, pickle.dumps({"a": [1, 2]}, protocol=4)),
    "protocol 0 in zip": lambda g, d: _zip_with_pickle(g, d, pickle.dumps({"a": 1}, protocol=0)),
    "garbage pickle in zip": lambda g, d: _zip_with_pickle(g, d, b"\x80\x02\xff\xfe"),
    "truncated pickle in zip": lambda g, d: _zip_with_pickle(g, d, b"\x80\x02}q\x00(X"),
    "empty pickle in zip": lambda g, d: _zip_with_pickle(g, d, b""),
    "blocked module in zip": lambda g, d: _zip_with_pickle(g, d, _global_pickle("os", "system")),
    "unknown global in zip": lambda g, d: _zip_with_pickle(g, d, _global_pickle("x.y", "Z")),
    "build on a list in zip": lambda g, d: _zip_with_pickle(g, d, b"\x80\x02]}b."),
    "legacy file, unknown global": lambda g, d: _write(d, _global_pickle("x.y", "Z")),
    "not a pickle at all": lambda g, d: _write(d, b"hello world\n" * 10),
}


def _write(dst: Path, data: bytes) -> Path:
    dst.write_bytes(data)
    return dst


@pytest.mark.parametrize("case", PICKLES)
def test_refusals_never_suggest_unsafe_loading(good: Path, tmp_path: Path, case: str) -> None:
    bad = PICKLES[case](good, tmp_path / "p.ckpt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(BuildError) as e:
            CheckpointSource(bad)
    msg = str(e.value)
    assert "p.ckpt" in msg, msg
    for advice in ("weights_only", "trusted source", "file an issue", "add_safe_globals"):
        assert advice not in msg, msg
    assert len(msg) < 500, msg


@pytest.mark.parametrize("protocol", [0, 1, 3, 4, 5])
def test_other_pickle_protocols_warn_nothing(tmp_path: Path, protocol: int) -> None:
    """torch warns "please file an issue" for protocols other than 2: not our users' concern."""
    p = _write(tmp_path / "p.ckpt", pickle.dumps({"a": 1}, protocol=protocol))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with pytest.raises(BuildError):
            CheckpointSource(p)
    texts = [str(w.message) for w in seen]
    assert not [t for t in texts if "issue" in t or "weights_only" in t], texts


def test_refusal_through_cli_has_no_torch_advice(workdir: Path, cache: Path) -> None:
    (workdir / "models" / "a.ckpt").write_bytes(pickle.dumps({"a": 1}, protocol=0))
    r = workdir / "r.yaml"
    r.write_text(RECIPE)
    res = run_cli(r, cache=cache)
    assert res.code == 1 and "Traceback" not in res.err, res.err
    assert "weights_only" not in res.err and "a.ckpt" in res.err, res.err


def test_pickle_with_storage_for_nothing_is_refused(good: Path, tmp_path: Path) -> None:
    """A persistent id naming a storage key the archive lacks."""
    buf = io.BytesIO()
    torch.save({"w": torch.zeros(3)}, buf)
    other = tmp_path / "o.ckpt"
    other.write_bytes(buf.getvalue())
    bad = rezip(other, tmp_path / "bad.ckpt", data=lambda n, b: None if "/data/" in n else b)
    with pytest.raises(BuildError, match="no member"):
        CheckpointSource(bad)
