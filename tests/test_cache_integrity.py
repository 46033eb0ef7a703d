"""Cache entries carry a checksum: a corrupted or truncated object is caught before use,
reported, removed and rebuilt; `mergebuild cache verify` re-reads every entry."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from conftest import EXAMPLES, SeedBuild, run_cli

OUT = "out/anything-nsfw-gape.safetensors"


def setup(workdir: Path) -> Path:
    recipe = workdir / "seed.yaml"
    recipe.write_text((EXAMPLES / "anything_nsfw_gape.yaml").read_text())
    return recipe


def build(recipe: Path, cache: Path, *extra: str) -> tuple[dict, str]:
    r = run_cli(recipe, "--json", *extra, cache=cache)
    assert r.code == 0, r.err
    assert "Traceback" not in r.err
    return r.json, r.err


def objects(report: dict) -> dict[str, Path]:
    """name → cache object of every stored node and output in a --json report."""
    root = Path(report["cache_dir"]) / "objects"
    return {n["name"]: root / n["key"][:2] / f"{n['key']}.safetensors" for n in report["nodes"]}


def statuses(report: dict) -> dict[str, str]:
    return {n["name"]: n["status"] for n in report["nodes"]}


def flip_byte(path: Path, at: int) -> None:
    """Change one byte in place (same inode, as bit rot or a stray writer would)."""
    with open(path, "r+b") as f:
        f.seek(at)
        b = f.read(1)
        f.seek(at)
        f.write(bytes([b[0] ^ 0x40]))


@pytest.fixture
def reference(seed_build: SeedBuild) -> bytes:
    """Output bytes of a clean build in a cache of its own (built once per session)."""
    return seed_build.output


@pytest.mark.parametrize("jobs,chunk", [("1", None), ("2", "1000")])
def test_sidecar_records_size_and_checksum(
    workdir: Path, cache: Path, jobs: str, chunk: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The checksum is computed while writing (chunks may land out of order with -j2)."""
    import xxhash

    if chunk:
        monkeypatch.setenv("MERGEBUILD_CHUNK_ELEMENTS", chunk)
    report, _ = build(setup(workdir), cache, "-j", jobs)
    for name, obj in objects(report).items():
        if name == "anything_nsfw_gape":  # feeds only the output: not stored
            continue
        info = json.loads(obj.with_suffix(".json").read_text())
        data = obj.read_bytes()
        assert info["size"] == len(data)
        # header (8-byte length + JSON) and data section hashed apart
        head = 8 + int.from_bytes(data[:8], "little")
        assert info["xxh3_128_split"] == {
            "head_bytes": head,
            "head": xxhash.xxh3_128_hexdigest(data[:head]),
            "body": xxhash.xxh3_128_hexdigest(data[head:]),
        }


@pytest.mark.parametrize("damage", ["none", "flip"])
def test_whole_file_checksums_of_older_sidecars_still_count(
    workdir: Path, cache: Path, damage: str
) -> None:
    """Sidecars from before the split checksum hold one xxh3 of the whole file."""
    import xxhash

    report, _ = build(setup(workdir), cache)
    obj = objects(report)["anything-nsfw-gape"]
    info = json.loads(obj.with_suffix(".json").read_text())
    del info["xxh3_128_split"]
    info["xxh3_128"] = xxhash.xxh3_128_hexdigest(obj.read_bytes())
    obj.with_suffix(".json").write_text(json.dumps(info))
    if damage == "flip":
        data = bytearray(obj.read_bytes())
        data[-3] ^= 0x40
        obj.write_bytes(bytes(data))
    assert run_cli("cache", "verify", cache=cache).code == (1 if damage == "flip" else 0)


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_corrupt_node_is_detected_reported_and_rebuilt(
    workdir: Path, cache: Path, reference: bytes, damage: str
) -> None:
    recipe = setup(workdir)
    first, _ = build(recipe, cache, "--set", "anything_nsfw_gape.alpha=0.5")
    node = objects(first)["anything_nsfw"]
    size = node.stat().st_size
    if damage == "flip":
        flip_byte(node, size // 2)
    else:
        os.truncate(node, size - 100)
    # the next build uses the node as an input: it must not merge from damaged bytes
    report, err = build(recipe, cache)
    assert "warning: cache entry" in err and "anything_nsfw" in err and "corrupted" in err, err
    assert "rebuilding" in err
    assert statuses(report)["anything_nsfw"] == "built"
    assert (workdir / OUT).read_bytes() == reference
    assert run_cli("cache", "verify", cache=cache).code == 0


def test_corrupt_output_object_is_rebuilt_not_published(
    workdir: Path, cache: Path, reference: bytes
) -> None:
    recipe = setup(workdir)
    first, _ = build(recipe, cache)
    out_obj = objects(first)["anything-nsfw-gape"]
    (workdir / OUT).unlink()  # the user deleted the output; the damaged object must not return
    flip_byte(out_obj, out_obj.stat().st_size - 1)
    dry = run_cli(recipe, "-n", cache=cache)
    assert dry.code == 0 and "cache entry corrupted: checksum mismatch" in dry.out, dry.out
    report, err = build(recipe, cache)
    assert "corrupted" in err
    assert statuses(report)["anything-nsfw-gape"] == "built"
    assert (workdir / OUT).read_bytes() == reference


def test_object_without_sidecar_counts_as_absent(workdir: Path, cache: Path) -> None:
    recipe = setup(workdir)
    first, _ = build(recipe, cache)
    for obj in objects(first).values():
        obj.with_suffix(".json").unlink(missing_ok=True)
    v = run_cli("cache", "verify", cache=cache)
    assert v.code == 0 and "leftovers" in v.out, v.out
    report, err = build(recipe, cache)
    assert report["summary"]["built"] == 3 and "corrupted" not in err
    assert run_cli("cache", "verify", cache=cache).code == 0


def test_cache_verify_reads_everything_and_removes_on_request(workdir: Path, cache: Path) -> None:
    recipe = setup(workdir)
    first, _ = build(recipe, cache, "--set", "anything_nsfw_gape.alpha=0.5")
    build(recipe, cache)
    ok = run_cli("cache", "verify", cache=cache)
    assert ok.code == 0 and "0 corrupted" in ok.out, ok.out
    node = objects(first)["anything_nsfw"]
    st = node.stat()
    flip_byte(node, 200)
    # bit rot keeps the mtime: the cheap per-build check cannot see it, verify must
    os.utime(node, ns=(st.st_atime_ns, st.st_mtime_ns))
    bad = run_cli("cache", "verify", "--json", cache=cache)
    assert bad.code == 1 and "Traceback" not in bad.err
    assert [b["name"] for b in bad.json["bad"]] == ["anything_nsfw"]
    assert "checksum mismatch" in bad.json["bad"][0]["problem"]
    removed = run_cli("cache", "verify", "--remove", cache=cache)
    assert removed.code == 1 and "removed" in removed.out
    assert not node.exists() and not node.with_suffix(".json").exists()
    assert run_cli("cache", "verify", cache=cache).code == 0


def test_cached_build_does_not_rehash_objects(
    workdir: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The checksum is memoized by stat signature: a fully cached build re-reads no object."""
    import mergebuild.cache
    import mergebuild.hashing
    from mergebuild.build import Builder
    from mergebuild.cache import CacheStore
    from mergebuild.recipe import load_recipe

    recipe = setup(workdir)
    build(recipe, cache)

    def no_reads(path: Path) -> str:
        raise AssertionError(f"re-hashed {path}")

    monkeypatch.setattr(mergebuild.cache, "hash_file", no_reads)
    monkeypatch.setattr(mergebuild.hashing, "hash_file", no_reads)
    plan = Builder(load_recipe(recipe), CacheStore(cache)).plan()
    assert not plan.to_build() and not plan.corrupt


def test_entry_without_checksum_is_rebuilt(workdir: Path, cache: Path, reference: bytes) -> None:
    """Sidecars written before checksums existed cannot vouch for their object."""
    recipe = setup(workdir)
    first, _ = build(recipe, cache)
    out_obj = objects(first)["anything-nsfw-gape"]
    sidecar = out_obj.with_suffix(".json")
    info = json.loads(sidecar.read_text())
    del info["xxh3_128_split"]
    sidecar.write_text(json.dumps(info))
    assert run_cli("cache", "verify", cache=cache).code == 1
    report, err = build(recipe, cache)
    assert "no checksum" in err and statuses(report)["anything-nsfw-gape"] == "built"
    assert (workdir / OUT).read_bytes() == reference
    assert run_cli("cache", "verify", cache=cache).code == 0


def test_gc_sweeps_stale_publish_temps_in_output_dirs(workdir: Path, cache: Path) -> None:
    """A build killed between linking and renaming an output leaves a temp hardlink next to it
    (tested in test_faults); `cache gc` removes such files once they are a day old."""
    recipe = setup(workdir)
    build(recipe, cache)
    out_dir = (workdir / OUT).parent
    old, young = out_dir / ".mergebuild-tmp-old.safetensors", out_dir / ".mergebuild-tmp-y"
    other = out_dir / "keep.safetensors"
    for p in (old, young, other):
        p.write_bytes(b"x")
    two_days_ago = time.time() - 2 * 86400
    os.utime(old, (two_days_ago, two_days_ago))
    os.utime(other, (two_days_ago, two_days_ago))
    assert run_cli("cache", "gc", cache=cache).code == 0
    assert not old.exists() and young.exists() and other.exists()
    assert (workdir / OUT).exists()
