"""Cache commands delete only inside a marked cache, never through a symlink, and only files
named like the cache's own: a wrong --cache-dir or a planted symlink must not cost a file."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
import xxhash

from conftest import EXAMPLES, SeedBuild, run_cli

SIGNATURE = b"Signature: 8a477f597d28d172789f06886806bc55"  # the CACHEDIR.TAG spec, verbatim
TAG = SIGNATURE + b"\n# a tag written by the test\n"
DELETERS = [("gc",), ("verify", "--remove"), ("clean",)]
IDS = ["gc", "verify-remove", "clean"]
OLD = time.time() - 3 * 86400


def key(prefix: str, n: int = 0) -> str:
    return (prefix + f"{n:030x}")[:32]


def entry(root: Path, k: str, data: bytes = b"tensor bytes" * 8, good: bool = True) -> Path:
    """An object with its sidecar, as a build writes them (checksum right unless `good` is
    False)."""
    shard = root / "objects" / k[:2]
    shard.mkdir(parents=True, exist_ok=True)
    obj = shard / f"{k}.safetensors"
    obj.write_bytes(data)
    digest = xxhash.xxh3_128_hexdigest(data if good else data + b"!")
    info = {"key": k, "size": len(data), "xxh3_128": digest, "kind": "merge", "name": k[:6]}
    obj.with_suffix(".json").write_text(json.dumps(info))
    return obj


def marked_cache(root: Path) -> Path:
    root.mkdir(parents=True)
    (root / "CACHEDIR.TAG").write_bytes(TAG)
    return root


def victim_dir(base: Path, shard: str = "ab") -> Path:
    """Someone's files, some named exactly like cache entries of `shard` (and stale)."""
    v = base / "victim"
    v.mkdir()
    for name in (f"{key(shard)}.safetensors", f"{key(shard)}.json", "thesis.tex"):
        (v / name).write_bytes(b"precious " + name.encode())
    (v / ".mergebuild-tmp-abcd1234.safetensors").write_bytes(b"precious temp-named")
    (v / "0123456789abcdef.json").write_bytes(b"precious memo-named")
    (v / f"{key(shard)}.lock").write_bytes(b"precious lock-named")
    sub = v / shard
    sub.mkdir()
    (sub / f"{key(shard, 1)}.safetensors").write_bytes(b"precious nested")
    for p in v.rglob("*"):
        os.utime(p, (OLD, OLD), follow_symlinks=False)
    return v


def snapshot(d: Path) -> dict[str, bytes | str]:
    """Every file's bytes and every symlink's target under `d` (without following)."""
    out: dict[str, bytes | str] = {}
    for p in sorted(d.rglob("*")):
        rel = str(p.relative_to(d))
        if p.is_symlink():
            out[rel] = "-> " + os.readlink(p)
        elif p.is_file():
            out[rel] = p.read_bytes()
    return out


def cache_cmd(root: Path, *args: str, env: dict[str, str] | None = None):
    r = run_cli("cache", *args, "--cache-dir", root, env=env)
    assert "Traceback" not in r.err and "unexpected" not in r.err, r.err
    return r


# -- symlinks inside a marked cache ------------------------------------------------------------


@pytest.mark.parametrize("cmd", DELETERS, ids=IDS)
def test_symlinked_shard_is_not_followed(tmp_path: Path, cmd: tuple[str, ...]) -> None:
    cache = marked_cache(tmp_path / "cache")
    victim = victim_dir(tmp_path, "ab")
    (cache / "objects").mkdir()
    (cache / "objects" / "ab").symlink_to(victim)
    own = entry(cache, key("cd"), good=cmd[0] != "verify")  # something the command must remove
    before = snapshot(victim)
    r = cache_cmd(cache, *cmd)
    assert r.code == (1 if cmd[0] == "verify" else 0), r.out + r.err
    assert snapshot(victim) == before
    assert (cache / "objects" / "ab").is_symlink()
    assert not own.exists()
    assert "left alone: objects/ab" in r.out


@pytest.mark.parametrize("cmd", DELETERS, ids=IDS)
@pytest.mark.parametrize("target", ["shards", "flat"])
def test_symlinked_objects_dir_is_not_followed(
    tmp_path: Path, cmd: tuple[str, ...], target: str
) -> None:
    """objects/ pointing at a folder holding shard-shaped dirs, or entry-named files directly."""
    cache = marked_cache(tmp_path / "cache")
    victim = victim_dir(tmp_path, "ab")
    (cache / "objects").symlink_to(victim if target == "shards" else victim / "ab")
    before = snapshot(victim)
    r = cache_cmd(cache, *cmd)
    assert r.code == 0, r.out + r.err
    assert snapshot(victim) == before
    assert (cache / "objects").is_symlink()
    assert "left alone: objects" in r.out


@pytest.mark.parametrize("cmd", [*DELETERS, ("adopt",)], ids=[*IDS, "adopt"])
@pytest.mark.parametrize("marked", [True, False])
def test_symlinked_root_is_refused(tmp_path: Path, cmd: tuple[str, ...], marked: bool) -> None:
    real = tmp_path / "real-cache"
    if marked:
        marked_cache(real)
    else:
        real.mkdir()
        (real / "notes.txt").write_text("mine")
    entry(real, key("ab"), good=False)
    link = tmp_path / "link"
    link.symlink_to(real)
    before = snapshot(real)
    r = cache_cmd(link, *cmd)
    assert snapshot(real) == before
    if cmd[0] == "adopt":  # not a deletion: follows the link, but marks only a cache
        assert (r.code == 0) == marked, r.out + r.err
        return
    assert r.code != 0
    assert "is a symlink" in r.err and str(real) in r.err, r.err
    assert r.err.count("\n") == 1  # one readable message


def test_symlinked_root_is_fine_for_builds_and_reading(workdir: Path, tmp_path: Path) -> None:
    """A cache dir the user symlinked elsewhere keeps working; only deletions refuse it."""
    real = tmp_path / "big-disk" / "cache"
    real.parent.mkdir()
    link = tmp_path / "cache-link"
    link.symlink_to(real, target_is_directory=True)
    real.mkdir()
    recipe = workdir / "seed.yaml"
    recipe.write_text((EXAMPLES / "anything_nsfw_gape.yaml").read_text())
    assert run_cli(recipe, "-q", cache=link).code == 0
    assert (real / "CACHEDIR.TAG").read_bytes().startswith(SIGNATURE)
    ls = cache_cmd(link, "ls", "--json")
    assert ls.code == 0 and len(ls.json["objects"]) == 2
    assert cache_cmd(link, "verify").code == 0
    assert cache_cmd(real, "gc").code == 0
    assert len(cache_cmd(real, "ls", "--json").json["objects"]) == 2


@pytest.mark.parametrize("cmd", DELETERS, ids=IDS)
def test_entries_that_are_symlinks_are_left_alone(tmp_path: Path, cmd: tuple[str, ...]) -> None:
    cache = marked_cache(tmp_path / "cache")
    victim = victim_dir(tmp_path)
    k = key("ab")
    for sub in ("objects/ab", "journal", "hashes", "locks"):
        (cache / sub).mkdir(parents=True)
    links = {
        f"objects/ab/{k}.safetensors": victim / f"{k}.safetensors",
        f"objects/ab/{k}.json": victim / f"{k}.json",
        "objects/ab/.mergebuild-tmp-abcd1234.safetensors": victim / "thesis.tex",
        "journal/0123456789abcdef.json": victim / "0123456789abcdef.json",
        "hashes/0123456789abcdef.json": victim / "0123456789abcdef.json",
        f"locks/{k}.lock": victim / f"{k}.lock",
        ".mergebuild-tmp-abcd1234": victim / "thesis.tex",
    }
    for name, target in links.items():
        (cache / name).symlink_to(target)
        os.utime(cache / name, (OLD, OLD), follow_symlinks=False)
    own = entry(cache, key("cd"), good=cmd[0] != "verify")
    before = snapshot(victim)
    r = cache_cmd(cache, *cmd)
    assert snapshot(victim) == before
    assert all((cache / name).is_symlink() for name in links), r.out
    assert not own.exists()
    assert f"left alone: objects/ab/{k}.safetensors" in r.out


# -- not a cache -----------------------------------------------------------------------------


def home_like(d: Path) -> Path:
    """A home folder; one has an objects/ dir with entry-named files, as a project might."""
    (d / "Documents").mkdir(parents=True)
    (d / "Documents" / "taxes.pdf").write_bytes(b"%PDF")
    (d / ".bashrc").write_text("alias ll='ls -l'\n")
    (d / "locks").mkdir()
    (d / "locks" / f"{key('ab')}.lock").write_text("mine")
    entry(d, key("ab"), good=False)
    (d / "objects" / "ab" / ".mergebuild-tmp-abcd1234").write_text("old")
    for p in d.rglob("*"):
        os.utime(p, (OLD, OLD))
    return d


def git_like(d: Path) -> Path:
    """Top-level names a cache could have, plus one it never has."""
    entry(d, key("ab"))
    (d / "hashes").mkdir()
    (d / "hashes" / "0123456789abcdef.json").write_text("{}")
    (d / "HEAD").write_text("ref: refs/heads/main\n")
    return d


def cache_shaped_but_foreign_shard(d: Path) -> Path:
    entry(d, key("ab"))
    (d / "objects" / "pack").mkdir()
    (d / "objects" / "pack" / "x.idx").write_text("mine")
    return d


LAYOUTS = {"home": home_like, "git": git_like, "foreign-shard": cache_shaped_but_foreign_shard}


@pytest.mark.parametrize("cmd", DELETERS, ids=IDS)
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("via", ["flag", "env"])
def test_deleters_refuse_a_folder_that_is_not_a_cache(
    tmp_path: Path, cmd: tuple[str, ...], layout: str, via: str
) -> None:
    d = LAYOUTS[layout](tmp_path / "someone")
    before = snapshot(d)
    if via == "flag":
        r = cache_cmd(d, *cmd)
    else:  # MERGEBUILD_CACHE_DIR=~ by mistake
        r = run_cli("cache", *cmd, env={"MERGEBUILD_CACHE_DIR": str(d), "HOME": str(d)})
        assert "Traceback" not in r.err
    assert r.code != 0
    assert "not a mergebuild cache" in r.err and "nothing was deleted" in r.err, r.err
    assert r.err.count("\n") == 1
    assert snapshot(d) == before
    assert not (d / "CACHEDIR.TAG").exists()


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_a_build_refuses_a_folder_that_is_not_a_cache(
    workdir: Path, tmp_path: Path, layout: str
) -> None:
    """Nothing is written into someone's folder, so it never becomes a marked cache."""
    d = LAYOUTS[layout](tmp_path / "someone")
    before = snapshot(d)
    recipe = workdir / "seed.yaml"
    recipe.write_text((EXAMPLES / "anything_nsfw_gape.yaml").read_text())
    r = run_cli(recipe, "-q", cache=d)
    assert r.code != 0 and "Traceback" not in r.err
    assert "not a mergebuild cache" in r.err and "--cache-dir" in r.err, r.err
    assert snapshot(d) == before
    assert cache_cmd(d, "adopt").code != 0 and snapshot(d) == before


@pytest.mark.parametrize("cmd", DELETERS, ids=IDS)
@pytest.mark.parametrize("what", ["file", "fifo", "marker-symlink", "marker-wrong"])
def test_deleters_refuse_odd_roots(tmp_path: Path, cmd: tuple[str, ...], what: str) -> None:
    """A root that is a file or a FIFO, or whose tag is a symlink or lacks the signature."""
    root = tmp_path / "root"
    if what == "file":
        root.write_text("data")
    elif what == "fifo":
        os.mkfifo(root)
    else:
        root.mkdir()
        entry(root, key("ab"), good=False)
        real_tag = tmp_path / "tag"
        real_tag.write_bytes(TAG)
        if what == "marker-symlink":
            (root / "CACHEDIR.TAG").symlink_to(real_tag)
        else:
            (root / "CACHEDIR.TAG").write_bytes(b"signature: 8a477f597d28d172789f06886806bc55")
    before = snapshot(tmp_path)
    r = cache_cmd(root, *cmd)
    assert r.code != 0 and r.err.startswith("error: "), r.err
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("cmd", [*DELETERS, ("ls",), ("verify",)], ids=[*IDS, "ls", "verify"])
def test_missing_cache_dir(tmp_path: Path, cmd: tuple[str, ...]) -> None:
    root = tmp_path / "no" / "such"
    r = cache_cmd(root, *cmd)
    assert r.code == 0, r.err
    assert "removed the cache" not in r.out
    if cmd[0] in ("gc", "clean"):
        assert f"no cache at {root}" in r.out
    assert not root.exists() and not root.parent.exists()


# -- names the cache never writes ------------------------------------------------------------

FOREIGN = [
    "objects/ab/notes.txt",
    f"objects/ab/{key('cd')}.safetensors",  # an entry's name in the wrong shard
    f"objects/ab/{key('ab').upper()}.safetensors",
    f"objects/ab/{key('ab')}.safetensors.bak",
    f"objects/ab/{key('ab', 7)}.safetensors/inner",  # a directory with an entry's name
    "objects/abc/x.safetensors",
    "objects/zz/y.json",
    "objects/readme",
    "journal/recipe.json",
    "journal/0123456789abcdef.json.orig",
    "hashes/README",
    "locks/x.lock",
    "photo.jpg",
    ".mergebuild-tmp-abcd1234/inside",
]


@pytest.mark.parametrize("cmd", DELETERS, ids=IDS)
def test_names_of_the_wrong_shape_are_left_alone(tmp_path: Path, cmd: tuple[str, ...]) -> None:
    cache = marked_cache(tmp_path / "cache")
    for name in FOREIGN:
        (cache / name).parent.mkdir(parents=True, exist_ok=True)
        (cache / name).write_text("not the cache's")
        os.utime(cache / name, (OLD, OLD))
    ours = [entry(cache, key("ab", 1), good=cmd[0] != "verify")]
    ours.append(entry(cache, key("ef"), good=False))
    stale_tmp = cache / "objects" / "ef" / ".mergebuild-tmp-k2j4_x9q.safetensors"
    stale_tmp.write_bytes(b"partial")
    os.utime(stale_tmp, (OLD, OLD))
    r = cache_cmd(cache, *cmd)
    assert all((cache / n).read_text() == "not the cache's" for n in FOREIGN)
    assert not any(p.exists() for p in ours) and not stale_tmp.exists()
    assert "unknown file, left alone: objects/ab/notes.txt" in r.out, r.out
    if cmd[0] == "clean":
        assert "unknown file, left alone: photo.jpg" in r.out
    if cmd[0] == "clean":  # the root and its tag stay while foreign files are in it
        assert (cache / "CACHEDIR.TAG").read_bytes() == TAG
        assert not (cache / "objects" / "ef").exists()


# -- legacy caches (before the tag) ------------------------------------------------------------


def recipe_in(workdir: Path, name: str = "seed.yaml") -> Path:
    recipe = workdir / name
    recipe.write_text((EXAMPLES / "anything_nsfw_gape.yaml").read_text())
    return recipe


def legacy_cache(workdir: Path, cache: Path, seed: SeedBuild) -> Path:
    """A cache as an older mergebuild left it: a real build's files (the session's build of
    the seed example, copied: a build costs seconds of imports), no tag."""
    recipe = recipe_in(workdir)
    shutil.copytree(seed.cache, cache, symlinks=True)
    (cache / "CACHEDIR.TAG").unlink()
    return recipe


@pytest.mark.parametrize("adopt", ["command", "build"])
def test_legacy_cache_is_adopted_explicitly_or_by_a_build(
    workdir: Path, cache: Path, adopt: str, seed_build: SeedBuild
) -> None:
    recipe = legacy_cache(workdir, cache, seed_build)
    before = snapshot(cache)
    refused = cache_cmd(cache, "gc")
    assert refused.code != 0 and f"mergebuild cache adopt --cache-dir {cache}" in refused.err
    assert snapshot(cache) == before
    if adopt == "command":
        assert cache_cmd(cache, "adopt").code == 0
    else:
        assert run_cli(recipe, "-q", cache=cache).code == 0
    assert (cache / "CACHEDIR.TAG").read_bytes()[:43] == SIGNATURE
    assert cache_cmd(cache, "clean").code == 0 and not cache.exists()


@pytest.mark.parametrize("extra", ["file", "symlinked-subdir", "foreign-shard"])
def test_legacy_cache_with_foreign_entries_is_not_adopted(
    workdir: Path, cache: Path, tmp_path: Path, extra: str, seed_build: SeedBuild
) -> None:
    recipe = legacy_cache(workdir, cache, seed_build)
    if extra == "file":
        (cache / "todo.txt").write_text("mine")
    elif extra == "symlinked-subdir":
        (tmp_path / "elsewhere").mkdir()
        for p in (cache / "locks").iterdir():
            p.unlink()
        (cache / "locks").rmdir()
        (cache / "locks").symlink_to(tmp_path / "elsewhere")
    else:
        (cache / "objects" / "tmp").mkdir()
    before = snapshot(cache)
    for r in (cache_cmd(cache, "adopt"), cache_cmd(cache, "clean"), run_cli(recipe, cache=cache)):
        assert r.code != 0 and "not a mergebuild cache" in r.err, r.err
    assert snapshot(cache) == before


# -- what must still be deleted --------------------------------------------------------------


def on_disk(cache: Path) -> set[str]:
    return {p.name for p in (cache / "objects").glob("*/*")}


def keys_of(report: dict) -> set[str]:
    return {n["key"] for n in report["nodes"]}


def test_gc_removes_exactly_what_no_latest_build_uses(workdir: Path, cache: Path) -> None:
    a, b = recipe_in(workdir, "a.yaml"), recipe_in(workdir, "b.yaml")
    b.write_text(b.read_text().replace("out/", "out-b/").replace("0.3", "0.35"))
    first = run_cli(a, "--json", cache=cache)
    assert first.code == 0, first.err
    second = run_cli(a, "--json", "--set", "anything_nsfw_gape.alpha=0.5", cache=cache)
    other = run_cli(b, "--json", cache=cache)
    assert second.code == 0 and other.code == 0
    stored = {n.split(".")[0] for n in on_disk(cache)}
    live = (keys_of(second.json) | keys_of(other.json)) & stored
    dead = stored - live
    assert dead and dead <= keys_of(first.json), "the variant left no unused object"
    tmp_dir = cache / "objects" / next(iter(live))[:2]
    stale, young = tmp_dir / ".mergebuild-tmp-aaaa1111.json", tmp_dir / ".mergebuild-tmp-bbbb2222"
    for p in (stale, young):
        p.write_text("{")
    os.utime(stale, (OLD, OLD))

    dry = cache_cmd(cache, "gc", "-n")
    assert dry.code == 0 and f"would remove {len(dead)} objects" in dry.out
    assert {n.split(".")[0] for n in on_disk(cache) if not n.startswith(".")} == stored
    gc = cache_cmd(cache, "gc")
    assert gc.code == 0 and f"removed {len(dead)} objects" in gc.out, gc.out
    left = on_disk(cache)
    assert {n for n in left if not n.startswith(".")} == {
        f"{k}.{s}" for k in live for s in ("safetensors", "json")
    }
    assert young.name in left and stale.name not in left
    # b's recipe is deleted: its journal and objects go on the next gc, a's stay
    b.unlink()
    assert cache_cmd(cache, "gc").code == 0
    a_live = keys_of(second.json) & stored
    assert {n.split(".")[0] for n in on_disk(cache) if not n.startswith(".")} == a_live
    assert len(list((cache / "journal").iterdir())) == 1
    assert cache_cmd(cache, "verify").code == 0
    dry = run_cli(a, "-n", "--set", "anything_nsfw_gape.alpha=0.5", cache=cache)
    assert dry.code == 0 and "0 to build" in dry.out, dry.out


def test_verify_remove_still_removes_corruption_and_leftovers(tmp_path: Path) -> None:
    cache = marked_cache(tmp_path / "cache")
    good, bad = entry(cache, key("ab", 1)), entry(cache, key("ab", 2), good=False)
    orphan = entry(cache, key("cd", 3)).with_suffix(".json")
    orphan.with_suffix(".safetensors").unlink()
    lone = entry(cache, key("cd", 4))
    lone.with_suffix(".json").unlink()
    stale = cache / "objects" / "cd" / ".mergebuild-tmp-q1w2e3r4.safetensors"
    young = cache / "objects" / "cd" / ".mergebuild-tmp-t5y6u7i8.safetensors"
    for p in (stale, young):
        p.write_bytes(b"partial")
    os.utime(stale, (OLD, OLD))
    check = cache_cmd(cache, "verify", "--json")
    assert check.code == 1 and [b["key"] for b in check.json["bad"]] == [key("ab", 2)]
    assert len(check.json["leftovers"]) == 4 and bad.exists()
    r = cache_cmd(cache, "verify", "--remove")
    assert r.code == 1 and f"removed {key('ab', 2)}" in r.out
    assert good.exists() and good.with_suffix(".json").exists()
    assert not any(p.exists() for p in (bad, bad.with_suffix(".json"), orphan, lone, stale))
    assert young.exists()
    assert cache_cmd(cache, "verify").code == 0


def test_clean_removes_a_real_cache_completely(workdir: Path, cache: Path) -> None:
    recipe = recipe_in(workdir)
    assert run_cli(recipe, "-q", cache=cache).code == 0
    names = {p.name for p in cache.iterdir()}
    assert names == {"CACHEDIR.TAG", "objects", "hashes", "journal", "locks"}
    r = cache_cmd(cache, "clean")
    assert r.code == 0 and f"removed the cache at {cache}" in r.out and "left alone" not in r.out
    assert not cache.exists()
    again = cache_cmd(cache, "clean")
    assert again.code == 0 and "no cache at" in again.out


@pytest.mark.parametrize("kind", ["symlink", "dir", "young", "not-temp", "stale"])
def test_gc_sweeps_only_stale_temp_files_in_output_dirs(
    workdir: Path, cache: Path, tmp_path: Path, kind: str
) -> None:
    recipe = recipe_in(workdir)
    assert run_cli(recipe, "-q", cache=cache).code == 0
    out_dir = workdir / "out"
    victim = tmp_path / "victim.bin"
    victim.write_bytes(b"precious")
    p = out_dir / (".mergebuild-tmp-zz9y8x7w.safetensors" if kind != "not-temp" else "mine.bin")
    if kind == "symlink":
        p.symlink_to(victim)
    elif kind == "dir":
        p.mkdir()
        (p / "inside").write_bytes(b"precious")
    else:
        p.write_bytes(b"x")
    if kind != "young":
        os.utime(p, (OLD, OLD), follow_symlinks=False)
    assert cache_cmd(cache, "gc").code == 0
    assert os.path.lexists(p) == (kind != "stale")
    assert victim.read_bytes() == b"precious"
    assert (workdir / "out" / "anything-nsfw-gape.safetensors").exists()


# -- the store's own removal during builds -----------------------------------------------------


def test_store_remove_during_builds(tmp_path: Path) -> None:
    """A corrupted entry is removed in a marked cache (also through a symlinked root, which
    the user chose); never through a symlinked shard, never in an unmarked folder."""
    from mergebuild.cache import CacheStore

    cache = marked_cache(tmp_path / "cache")
    obj = entry(cache, key("ab"), good=False)
    link = tmp_path / "link"
    link.symlink_to(cache)
    assert CacheStore(link).remove(key("ab")) and not obj.exists()
    assert not obj.with_suffix(".json").exists()

    victim = victim_dir(tmp_path, "cd")
    (cache / "objects" / "cd").symlink_to(victim)
    before = snapshot(victim)
    assert not CacheStore(cache).remove(key("cd")) and snapshot(victim) == before

    plain = tmp_path / "plain"
    obj = entry(plain, key("ef"), good=False)
    assert not CacheStore(plain).remove(key("ef")) and obj.exists()
    assert not CacheStore(cache).remove("../" + key("ab")[3:])
