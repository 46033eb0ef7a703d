"""First builds hash new inputs while merging them (build/speculate.py, engine/hash_tap.py).

Checked against independent computations: the output bytes of the old two-pass build (hash
first, then merge), hashlib/xxhash over the input files, and the bytes the kernel says the
process read (/proc/self/io).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import xxhash

from conftest import EXAMPLES, run_cli

OUT = Path("out/anything-nsfw-gape.safetensors")


def seed_recipe(workdir: Path, text: str | None = None) -> Path:
    recipe = workdir / "seed.yaml"
    recipe.write_text(text or (EXAMPLES / "anything_nsfw_gape.yaml").read_text())
    return recipe


def build(recipe: Path, cache: Path, *args: str) -> dict:
    r = run_cli(recipe, "--json", *args, cache=cache)
    assert r.code == 0, r.err
    return r.json


def two_pass(recipe: Path, cache: Path, *args: str) -> dict:
    """Today's other route: `-n` hashes every input first, then the build merges."""
    assert run_cli(recipe, "-n", "-q", *args, cache=cache).code == 0
    return build(recipe, cache, *args)


def objects(cache: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((cache / "objects").rglob("*.safetensors"))}


def file_hashes(path: Path) -> dict[str, str]:
    data = path.read_bytes()
    legacy = hashlib.sha256(data[0x100000 : 0x100000 + 0x10000]).hexdigest()[:8]
    return {
        "sha256": hashlib.sha256(data).hexdigest(),
        "xxh3": xxhash.xxh3_128_hexdigest(data),
        "legacy": legacy,
    }


def memo_of(cache: Path, path: Path) -> dict:
    for f in (cache / "hashes").glob("*.json"):
        memo = json.loads(f.read_text())
        if memo["path"] == str(path.absolute()):
            return memo["hashes"]
    raise AssertionError(f"no memo for {path}")


@pytest.mark.parametrize("jobs", ["1", "2"])
def test_first_build_equals_the_two_pass_build(workdir: Path, tmp_path: Path, jobs: str) -> None:
    """Same output bytes, same cache objects (keys and bytes), same hashes in the report."""
    recipe = seed_recipe(workdir)
    first = build(recipe, tmp_path / "c1", "-j", jobs)
    assert all(m["hashed"] and m["hashed_while_merging"] for m in first["models"].values())
    assert {n["status"] for n in first["nodes"]} == {"built"}
    out1 = (workdir / OUT).read_bytes()
    objs1 = objects(tmp_path / "c1")
    (workdir / OUT).unlink()
    second = two_pass(recipe, tmp_path / "c2", "-j", jobs)
    assert not any(m["hashed_while_merging"] for m in second["models"].values())
    assert (workdir / OUT).read_bytes() == out1
    assert objects(tmp_path / "c2") == objs1
    assert [(n["name"], n["key"]) for n in first["nodes"]] == [
        (n["name"], n["key"]) for n in second["nodes"]
    ]
    for name, m in first["models"].items():
        want = file_hashes(Path(m["path"]))
        assert m["sha256"] == want["sha256"] and m["key"] == want["xxh3"]
        assert memo_of(tmp_path / "c1", Path(m["path"])) == {
            **want,
            "size": Path(m["path"]).stat().st_size,
        }, name
    # the build left no temp and no stray file in the cache
    assert not [p for p in (tmp_path / "c1").rglob(".mergebuild-tmp-*")]
    assert run_cli("cache", "verify", cache=tmp_path / "c1").code == 0


@pytest.mark.parametrize(
    "options",
    [
        "components: [unet]",  # the text encoder and VAE are never read by the merge
        "exclude: ['^model\\.diffusion_model\\.(input|middle)_blocks']",
    ],
)
def test_keys_the_merge_skips_are_hashed_alongside(
    workdir: Path, tmp_path: Path, options: str
) -> None:
    text = (EXAMPLES / "anything_nsfw_gape.yaml").read_text()
    text = text.replace("    dtype: fp16\n", f"    dtype: fp16\n    {options}\n", 1)
    assert options in text
    recipe = seed_recipe(workdir, text)
    first = build(recipe, tmp_path / "c1")
    for m in first["models"].values():
        want = file_hashes(Path(m["path"]))
        assert (m["sha256"], m["key"]) == (want["sha256"], want["xxh3"])
    out1 = (workdir / OUT).read_bytes()
    two_pass(recipe, tmp_path / "c2")
    assert (workdir / OUT).read_bytes() == out1


def test_the_same_bytes_under_another_path_are_not_published_twice(
    workdir: Path, cache: Path
) -> None:
    recipe = seed_recipe(workdir)
    build(recipe, cache)
    before = objects(cache)
    out1 = (workdir / OUT).read_bytes()
    shutil.copytree(workdir / "models", workdir / "copies")  # new files, never hashed
    moved = seed_recipe(workdir, recipe.read_text().replace("models/", "copies/"))
    (workdir / OUT).unlink()
    r = run_cli(moved, "--json", cache=cache)
    assert r.code == 0, r.err
    assert "this build's copies were dropped" in r.err
    report = r.json
    assert all(m["hashed"] for m in report["models"].values())
    # every file it would have published was in the cache already (the node feeding only the
    # output has no file: it was computed, and is reported so)
    files = {n["name"]: (n["status"], n["reason"]) for n in report["nodes"] if n["path"]}
    assert len(files) == 2 and all(
        s == "cached" and "dropped" in why for s, why in files.values()
    ), files
    assert objects(cache) == before
    assert (workdir / OUT).read_bytes() == out1
    assert not [p for p in cache.rglob(".mergebuild-tmp-*")]


@pytest.mark.parametrize("change", ["touch", "sample", "size"])
def test_a_touched_input_is_hashed_first_a_changed_one_while_merging(
    workdir: Path, cache: Path, change: str
) -> None:
    """A touched file (size and the 64 KiB legacy sample unchanged) is most likely the same
    bytes: hashing it first finds everything cached. A file whose sample or size changed is
    merged and hashed at once."""
    recipe = seed_recipe(workdir)
    build(recipe, cache)
    out1 = (workdir / OUT).read_bytes()
    gape = workdir / "models" / "gape60.safetensors"
    data = bytearray(gape.read_bytes())
    assert len(data) > 0x100000 + 10  # the sample starts inside the file
    if change == "touch":
        os.utime(gape, ns=(1_000_000_000, 1_000_000_000))
    elif change == "sample":
        data[0x100000 + 10] ^= 0x01
        gape.write_bytes(bytes(data))
    else:  # the same tensors, one more metadata field: a longer file
        from safetensors.numpy import load_file

        tensors = load_file(str(gape))
        gape.unlink()
        _write_st(gape, tensors, {"note": "re-saved"}, sorted(tensors))
        assert gape.stat().st_size != len(data)
    report = build(recipe, cache)
    gape_entry = report["models"]["gape"]
    assert gape_entry["hashed"] and gape_entry["sha256"] == file_hashes(gape)["sha256"]
    assert gape_entry["hashed_while_merging"] == (change != "touch")
    assert not report["models"]["anything"]["hashed"]
    if change == "touch":
        assert report["summary"]["built"] == 0 and (workdir / OUT).read_bytes() == out1


def test_a_wrong_pin_fails_after_the_merge_and_publishes_nothing(
    workdir: Path, cache: Path
) -> None:
    real = file_hashes(workdir / "models" / "gape60.safetensors")["sha256"]
    wrong = ("0" if real[0] != "0" else "1") + real[1:]
    text = (EXAMPLES / "anything_nsfw_gape.yaml").read_text()
    line = next(ln for ln in text.splitlines() if ln.strip().startswith("gape:"))
    text = text.replace(line, f"  gape: {{path: models/gape60.safetensors, sha256: {wrong}}}")
    r = run_cli(seed_recipe(workdir, text), cache=cache)
    assert r.code != 0 and "Traceback" not in r.err
    assert real in r.err and wrong in r.err
    assert not (workdir / OUT).exists()
    assert not list((cache / "objects").rglob("*.safetensors"))
    assert not list(cache.rglob(".mergebuild-tmp-*"))


def test_inputs_differing_from_the_lock_publish_nothing(workdir: Path, tmp_path: Path) -> None:
    recipe = seed_recipe(workdir)
    assert run_cli("lock", recipe, "-q", cache=tmp_path / "c1").code == 0
    locked_out = (workdir / OUT).read_bytes()
    gape = workdir / "models" / "gape60.safetensors"
    data = bytearray(gape.read_bytes())
    data[-2] ^= 0x01  # another file: last tensor byte changed
    gape.unlink()
    gape.write_bytes(bytes(data))
    r = run_cli(recipe, cache=tmp_path / "c2")
    assert r.code != 0 and "lock file" in r.err and "Traceback" not in r.err
    assert (workdir / OUT).read_bytes() == locked_out
    assert not list((tmp_path / "c2" / "objects").rglob("*.safetensors"))


ST_DTYPES = {"float16": "F16", "float32": "F32", "int64": "I64", "int32": "I32"}


def _write_st(path: Path, tensors: dict[str, np.ndarray], meta: dict, order: list[str]) -> None:
    """A safetensors file whose data section follows `order` (not the sorted order every
    writer uses): the merge then reads this file out of its own order."""
    header: dict = {"__metadata__": meta} if meta else {}
    at, blobs = 0, []
    for k in order:
        raw = tensors[k].tobytes()
        header[k] = {
            "dtype": ST_DTYPES[tensors[k].dtype.name],
            "shape": list(tensors[k].shape),
            "data_offsets": [at, at + len(raw)],
        }
        blobs.append(raw)
        at += len(raw)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(len(text).to_bytes(8, "little") + text + b"".join(blobs))


def test_inputs_in_another_tensor_order_and_colliding_provenance(
    workdir: Path, tmp_path: Path
) -> None:
    """An input whose tensors lie in reverse order (the tap stashes what comes early), and an
    input whose metadata names another input's sha256 (its provenance then changes length
    once the hashes are known, so the header cannot be rewritten in place)."""
    from safetensors.numpy import load_file

    models = workdir / "models"
    gape = models / "gape60.safetensors"
    tensors = load_file(str(gape))
    nai = file_hashes(models / "nai-full.safetensors")["sha256"]
    nested = {nai: {"name": "nai", "legacy_hash": None, "sd_merge_recipe": None}}
    meta = {"sd_merge_models": json.dumps(nested)}
    gape.unlink()
    _write_st(gape, {k: v for k, v in tensors.items()}, meta, sorted(tensors, reverse=True))
    recipe = seed_recipe(workdir)
    first = build(recipe, tmp_path / "c1", "-j", "2")
    assert first["models"]["gape"]["sha256"] == file_hashes(gape)["sha256"]
    out1 = (workdir / OUT).read_bytes()
    objs1 = objects(tmp_path / "c1")
    two_pass(recipe, tmp_path / "c2", "-j", "2")
    assert (workdir / OUT).read_bytes() == out1
    assert objects(tmp_path / "c2") == objs1
    assert nai in json.loads(_metadata(workdir / OUT)["sd_merge_models"])


def _metadata(path: Path) -> dict:
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + n])["__metadata__"]


def _rchar() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar")


@pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="needs /proc/self/io")
def test_a_first_build_reads_each_input_once(tmp_path: Path) -> None:
    """Bytes read by the process (the kernel's count) for a first build of three ~6 MB inputs:
    about their total size, where hashing first and merging after read about twice as much."""
    import mergebuild.engine.executor  # noqa: F401  (imports torch: outside the measurement)
    from mergebuild.build import Builder
    from mergebuild.cache import CacheStore
    from mergebuild.recipe.load import load_recipe

    rng = np.random.default_rng(7)
    keys = [f"model.diffusion_model.input_blocks.{i}.0.weight" for i in range(6)]

    def models(d: Path) -> int:
        d.mkdir()
        for name in "abc":
            t = {k: rng.standard_normal((256, 2048)).astype(np.float16) for k in keys}
            _write_st(d / f"{name}.safetensors", t, {}, sorted(t))
        return sum(f.stat().st_size for f in d.iterdir())

    def run(d: Path, speculate: bool) -> tuple[int, int]:
        size = models(d)
        recipe = d / "r.yaml"
        recipe.write_text(
            "mergebuild: 1\nmodels:\n"
            + "".join(f"  {n}: {d / n}.safetensors\n" for n in "abc")
            + "merges:\n  m: a + (b - c) * 0.5\n"
            + f"outputs:\n  o: {{from: m, path: {d / 'o.safetensors'}}}\n"
        )
        builder = Builder(load_recipe(recipe), CacheStore(d / "cache"), jobs=2)
        builder.speculate = speculate
        before = _rchar()
        builder.run()
        return _rchar() - before, size

    run(tmp_path / "warm", True)  # imports and first-use costs, outside the measurement
    once, size = run(tmp_path / "first", True)
    twice, size2 = run(tmp_path / "two-pass", False)
    assert once < 1.15 * size, (once, size)
    assert twice > 1.9 * size2, (twice, size2)  # the measure sees the second read


@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize("stash", [0, 1 << 12, 1 << 30])
@pytest.mark.parametrize("mb, n_cuts", [(2, 60), (12, 12)], ids=["small ranges", "mixed"])
def test_hash_tap_against_hashlib(
    tmp_path: Path, seed: int, stash: int, mb: int, n_cuts: int
) -> None:
    """Ranges fed in a shuffled order, some twice, some never (gaps), a stash too small or
    large enough, ranges below the tap's batch size (copied and held back) alone or mixed
    with larger ones: the tap's hashes equal hashlib's over the whole file."""
    from mergebuild.engine.hash_tap import HashTap

    rnd = random.Random(seed)
    data = rnd.randbytes(rnd.randrange(mb << 19, mb << 20))
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    cuts = sorted(rnd.sample(range(1, len(data)), n_cuts))
    spans = list(zip([0, *cuts], [*cuts, len(data)], strict=True))
    planned = [s for i, s in enumerate(spans) if i % 7 != 3]  # the rest: gaps the tap reads
    fed = planned + rnd.sample(planned, 10)
    rnd.shuffle(fed)
    fd = os.open(path, os.O_RDONLY)
    try:
        tap = HashTap(fd, len(data), [(lo, hi - lo) for lo, hi in planned], stash=stash)
        for lo, hi in fed:
            tap.feed(lo, np.frombuffer(data[lo:hi], dtype=np.uint8))
        got = tap.finish()
        tap.close()
    finally:
        os.close(fd)
    want = file_hashes(path)
    assert (got.sha256, got.xxh3, got.legacy, got.size) == (
        want["sha256"],
        want["xxh3"],
        want["legacy"],
        len(data),
    )
