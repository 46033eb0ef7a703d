"""Faults during a build: SIGKILL at varied moments, a full disk, concurrent builds, an input
changed mid-build. Nothing good is lost, nothing half-written is published or cached.

Real subprocesses on real files. MERGEBUILD_CHUNK_ELEMENTS cuts the tiny demo tensors into many
chunks so a build lasts long enough to be interrupted; `slow` variants repeat more times.
"""

from __future__ import annotations

import collections
import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import EXAMPLES, SRC, SeedBuild, run_cli

OUT = Path("out/anything-nsfw-gape.safetensors")
SLOW_CHUNKS = {"MERGEBUILD_CHUNK_ELEMENTS": "128", "MERGEBUILD_WRITE_BLOCK": "4096"}
TMP = ".mergebuild-tmp-"


def setup(workdir: Path) -> Path:
    recipe = workdir / "seed.yaml"
    recipe.write_text((EXAMPLES / "anything_nsfw_gape.yaml").read_text())
    return recipe


def spawn(*args: str | Path, cache: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    full = {**os.environ, "PYTHONPATH": str(SRC), "MERGEBUILD_CACHE_DIR": str(cache), **(env or {})}
    return subprocess.Popen(
        [sys.executable, "-m", "mergebuild", *map(str, args)],
        env=full,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def temps(directory: Path) -> list[Path]:
    return list(directory.rglob(f"{TMP}*")) if directory.exists() else []


def built_counts(*reports: dict) -> collections.Counter:
    return collections.Counter(
        n["name"] for r in reports for n in r["nodes"] if n["status"] == "built"
    )


# -- SIGKILL ---------------------------------------------------------------------------------


def kill_campaign(
    workdir: Path, tmp_path: Path, before: SeedBuild, n: int, seed: int
) -> collections.Counter:
    """Kill n builds at stratified random moments; check every invariant after each."""
    recipe = setup(workdir)
    out = workdir / OUT
    # the correct new bytes, from an undisturbed build in a cache of its own
    t0 = time.monotonic()
    r = run_cli(recipe, "-q", cache=tmp_path / "ref", env=SLOW_CHUNKS)
    duration = time.monotonic() - t0  # only to spread the kill moments, never asserted
    assert r.code == 0, r.err
    new = out.read_bytes()
    # the state before each killed build: a previous output and its cache
    prev_cache, prev = before.cache, before.output
    assert prev != new
    rng = random.Random(seed)
    phases: collections.Counter = collections.Counter()
    for i in range(n):
        cache = tmp_path / f"c{i}"
        shutil.copytree(prev_cache, cache)
        out.unlink()
        out.write_bytes(prev)
        delay = duration * 1.15 * (i + rng.random()) / n
        p = spawn(recipe, "-q", cache=cache, env=SLOW_CHUNKS)
        time.sleep(delay)
        p.send_signal(signal.SIGKILL)
        p.communicate()
        now = out.read_bytes()
        assert now in (prev, new), f"kill {i} after {delay:.2f}s left a partial output"
        if now == new:
            phases["after publishing"] += 1
        elif temps(cache / "objects"):
            phases["while writing"] += 1
        elif len(list((cache / "objects").glob("*/*.safetensors"))) > len(
            list((prev_cache / "objects").glob("*/*.safetensors"))
        ):
            phases["after storing, before publishing"] += 1
        else:
            phases["before writing"] += 1
        print(f"kill {i} at {delay:.2f}s of ~{duration:.2f}s: {phases}")
        v = run_cli("cache", "verify", cache=cache)
        assert v.code == 0, f"kill {i}: {v.out}{v.err}"
        r = run_cli(recipe, "-q", cache=cache)
        assert r.code == 0 and "Traceback" not in r.err, r.err
        assert out.read_bytes() == new, f"kill {i}: the build after the kill gave wrong bytes"
        assert run_cli("cache", "verify", cache=cache).code == 0
        shutil.rmtree(cache)
    print(f"\n{n} kills: {dict(phases)}")
    return phases


def test_sigkill_at_varied_moments(
    workdir: Path, tmp_path: Path, seed_prev_build: SeedBuild
) -> None:
    kill_campaign(workdir, tmp_path, seed_prev_build, n=4, seed=7)


@pytest.mark.slow
def test_sigkill_many(workdir: Path, tmp_path: Path, seed_prev_build: SeedBuild) -> None:
    seed = int(os.environ.get("KILL_SEED", 1))
    phases = kill_campaign(workdir, tmp_path, seed_prev_build, n=40, seed=seed)
    assert phases["while writing"] > 0  # the campaign did reach the merge itself


# Deterministic kill points: a wrapper runs the real CLI in a subprocess that SIGKILLs itself
# on the n-th call of one step of the write protocol (no test hooks in mergebuild itself).
KILL_AT = r"""
import os, signal, sys
what, nth = sys.argv[1], int(sys.argv[2])
sys.argv = ["mergebuild", *sys.argv[3:]]
import mergebuild.cache
from mergebuild.cli import main
owner, name = (os, what[3:]) if what.startswith("os.") else (mergebuild.cache.CacheStore, what)
real = getattr(owner, name)
calls = 0
def wrapper(*args, **kwargs):
    global calls
    calls += 1
    if calls == nth:
        shown = [str(a) for a in args if isinstance(a, (str, os.PathLike))]
        print(f"KILLED at {what} #{nth} {shown[-1:]}", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    return real(*args, **kwargs)
setattr(owner, name, wrapper)
sys.exit(main())
"""
# every rename (memo, objects, sidecars, publish, journal), links, fsyncs, some data writes
POINTS = [
    *[("os.replace", n) for n in range(1, 14)],
    ("os.link", 1),
    *[("os.fsync", n) for n in (1, 2, 3, 4, 6)],
    *[("os.pwrite", n) for n in (1, 2, 300, 2000)],
    *[("write_sidecar", n) for n in (1, 2, 3)],
]
FAST_POINTS = {("os.replace", 7), ("os.link", 1), ("write_sidecar", 2), ("os.pwrite", 300)}


def with_output(workdir: Path, data: bytes) -> Path:
    """The seed recipe in `workdir`, its output holding `data` (as a previous build left it)."""
    recipe = setup(workdir)
    (workdir / OUT).parent.mkdir(parents=True, exist_ok=True)
    (workdir / OUT).write_bytes(data)
    return recipe


@pytest.fixture(scope="module")
def kill_setup(
    tmp_path_factory: pytest.TempPathFactory,
    model_dir: Path,
    seed_build: SeedBuild,
    seed_prev_build: SeedBuild,
) -> dict:
    """A recipe, the correct new bytes, and the output of a previous build."""
    workdir = tmp_path_factory.mktemp("killpoints") / "work"
    shutil.copytree(model_dir, workdir / "models")
    return {
        "recipe": with_output(workdir, seed_prev_build.output),
        "new": seed_build.output,
        "prev": seed_prev_build.output,
        "prev_cache": seed_prev_build.cache,
    }


@pytest.mark.parametrize(
    ("what", "nth"),
    [p if p in FAST_POINTS else pytest.param(*p, marks=pytest.mark.slow) for p in POINTS],
    ids=[f"{w}-{n}" for w, n in POINTS],
)
def test_sigkill_at_exact_point(kill_setup: dict, tmp_path: Path, what: str, nth: int) -> None:
    recipe, out = kill_setup["recipe"], kill_setup["recipe"].parent / OUT
    cache = tmp_path / "cache"  # empty: every step of every write is on the way
    out.unlink()
    out.write_bytes(kill_setup["prev"])
    env = {
        **os.environ,
        "PYTHONPATH": str(SRC),
        "MERGEBUILD_CACHE_DIR": str(cache),
        "MERGEBUILD_WRITE_BLOCK": "4096",  # many data writes to be killed at
    }
    p = subprocess.run(
        [sys.executable, "-c", KILL_AT, what, str(nth), str(recipe), "-q"],
        env=env,
        capture_output=True,
        text=True,
    )
    killed = p.returncode == -signal.SIGKILL
    print(f"\n{what} #{nth}: " + (p.stderr.strip().splitlines()[-1] if killed else "completed"))
    assert killed or p.returncode == 0, p.stderr
    assert out.read_bytes() in (kill_setup["prev"], kill_setup["new"]), "partial output"
    for tmp in temps(out.parent):  # killed mid-publish: a complete hardlink, swept by gc
        assert tmp.read_bytes() == kill_setup["new"], "partial temp file next to the output"
        tmp.unlink()
    if not killed:
        assert out.read_bytes() == kill_setup["new"]
    v = run_cli("cache", "verify", cache=cache)
    assert v.code == 0, v.out + v.err
    r = run_cli(recipe, "-q", cache=cache)
    assert r.code == 0 and "Traceback" not in r.err, r.err
    assert out.read_bytes() == kill_setup["new"]
    assert run_cli("cache", "verify", cache=cache).code == 0


# -- disk full ---------------------------------------------------------------------------------


@pytest.fixture
def small_fs(tmp_path: Path):
    """Mount tmpfs filesystems of a given size (root only; skipped where mount is refused)."""
    mounted: list[Path] = []

    def mount(path: Path, size: str) -> Path:
        path.mkdir(parents=True, exist_ok=True)
        if os.geteuid() != 0 or not shutil.which("mount"):
            pytest.skip("needs root to mount a small tmpfs")
        r = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
            capture_output=True,
        )
        if r.returncode != 0:
            pytest.skip(f"cannot mount tmpfs here: {r.stderr.decode().strip()}")
        mounted.append(path)
        return path

    yield mount
    for path in reversed(mounted):
        subprocess.run(["umount", "-l", str(path)], check=False)


# sizes from "nothing fits" to "everything fits": each fails (or not) at another write
SLOW = pytest.mark.slow
CACHE_SIZES = [
    "16k",
    pytest.param("400k", marks=SLOW),
    "1100k",
    pytest.param("1500k", marks=SLOW),
    pytest.param("2200k", marks=SLOW),
    pytest.param("2090k", marks=SLOW),
    pytest.param("2110k", marks=SLOW),
    pytest.param("2130k", marks=SLOW),
    pytest.param("2140k", marks=SLOW),
    pytest.param("2150k", marks=SLOW),
    "8m",
]


@pytest.mark.parametrize("size", CACHE_SIZES)
def test_disk_full_in_cache(
    workdir: Path,
    tmp_path: Path,
    small_fs,
    size: str,
    seed_build: SeedBuild,
    seed_prev_build: SeedBuild,
) -> None:
    new, prev = seed_build.output, seed_prev_build.output
    recipe = with_output(workdir, prev)
    out = workdir / OUT
    cache = small_fs(tmp_path / "full", size)
    r = run_cli(recipe, "--json", cache=cache)
    assert "Traceback" not in r.err
    print(f"\ncache on a {size} tmpfs: exit {r.code} {r.err.strip().splitlines()[-1:]}")
    if r.code == 0:
        assert out.read_bytes() == new
    else:
        assert r.code == 1 and "No space left on device" in r.err, r.err
        assert out.read_bytes() == prev
    assert not temps(cache) and not temps(workdir), "temp files left behind"
    assert run_cli("cache", "verify", cache=cache).code == 0


@pytest.mark.parametrize("size", ["600k", "1500k"])
def test_disk_full_at_output(workdir: Path, cache: Path, small_fs, size: str) -> None:
    """Output on another (full) filesystem: publishing copies, the copy fails, the previous
    output stays whole and the temp copy is removed."""
    recipe = setup(workdir)
    small_fs(workdir / "out", size)
    out = workdir / OUT
    first = run_cli(recipe, "-q", "--set", "anything_nsfw_gape.alpha=0.5", cache=cache)
    if first.code != 0:
        assert "No space left on device" in first.err and "Traceback" not in first.err
        assert not out.exists() and not temps(workdir / "out")
        return
    prev = out.read_bytes()
    r = run_cli(recipe, cache=cache)
    assert r.code == 1 and "No space left on device" in r.err and "Traceback" not in r.err, r.err
    assert "cannot write output" in r.err
    assert out.read_bytes() == prev
    assert not temps(workdir / "out")


@pytest.mark.parametrize(
    "after_writes", [0, pytest.param(1, marks=SLOW), 7, pytest.param(60, marks=SLOW)]
)
def test_disk_full_injected_mid_write(
    workdir: Path,
    cache: Path,
    monkeypatch: pytest.MonkeyPatch,
    after_writes: int,
    seed_prev_build: SeedBuild,
) -> None:
    """Where no tmpfs can be mounted: pwrite fails with ENOSPC after some writes (the free
    space looked sufficient when the build started)."""
    from mergebuild.build import Builder
    from mergebuild.cache import CacheStore
    from mergebuild.engine import stream_writer
    from mergebuild.errors import BuildError
    from mergebuild.recipe import load_recipe

    prev = seed_prev_build.output
    recipe = with_output(workdir, prev)
    shutil.copytree(seed_prev_build.cache, cache)  # the previous build's cache
    monkeypatch.setattr(stream_writer, "BLOCK_BYTES", 4096)  # many writes in a tiny build
    real = os.pwrite
    calls = 0

    def pwrite(fd: int, data: bytes, offset: int) -> int:
        nonlocal calls
        calls += 1
        if calls > after_writes:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    with pytest.raises(BuildError, match="No space left on device"):
        Builder(load_recipe(recipe), CacheStore(cache), jobs=2).run()
    monkeypatch.undo()
    assert (workdir / OUT).read_bytes() == prev
    assert not temps(cache) and not temps(workdir)
    assert run_cli("cache", "verify", cache=cache).code == 0


# -- concurrency -------------------------------------------------------------------------------


def concurrent_same(workdir: Path, tmp_path: Path, new: bytes, pairs: int) -> None:
    recipe = setup(workdir)
    for i in range(pairs):
        (workdir / OUT).unlink(missing_ok=True)
        cache = tmp_path / f"c{i}"
        procs = [spawn(recipe, "--json", cache=cache, env=SLOW_CHUNKS) for _ in range(2)]
        results = [p.communicate() for p in procs]
        assert [p.returncode for p in procs] == [0, 0], [e for _, e in results]
        reports = [json.loads(o) for o, _ in results]
        counts = built_counts(*reports)
        assert counts == {"anything_nsfw": 1, "anything_nsfw_gape": 1, "anything-nsfw-gape": 1}
        assert (workdir / OUT).read_bytes() == new
        assert run_cli("cache", "verify", cache=cache).code == 0


def test_two_concurrent_builds_same_recipe(
    workdir: Path, tmp_path: Path, seed_build: SeedBuild
) -> None:
    concurrent_same(workdir, tmp_path, seed_build.output, pairs=2)


@pytest.mark.slow
def test_concurrent_builds_same_recipe_many(
    workdir: Path, tmp_path: Path, seed_build: SeedBuild
) -> None:
    concurrent_same(workdir, tmp_path, seed_build.output, pairs=12)


def test_killed_builder_releases_its_lock(
    workdir: Path, tmp_path: Path, seed_build: SeedBuild
) -> None:
    """A build waiting on a key's lock takes over when the holder is SIGKILLed mid-write."""
    recipe = setup(workdir)
    new = seed_build.output
    cache = tmp_path / "c"
    first = spawn(recipe, "--json", cache=cache, env={"MERGEBUILD_CHUNK_ELEMENTS": "64"})
    while not temps(cache / "objects") and first.poll() is None:
        time.sleep(0.01)
    second = spawn(recipe, "--json", cache=cache, env=SLOW_CHUNKS)
    time.sleep(0.5)  # let it reach the lock (if not, it simply finds the work undone)
    first.send_signal(signal.SIGKILL)
    first.communicate()
    out, err = second.communicate()
    assert first.returncode == -signal.SIGKILL, "the first build finished before the kill"
    assert second.returncode == 0, err
    assert built_counts(json.loads(out))["anything-nsfw-gape"] == 1
    assert (workdir / OUT).read_bytes() == new
    assert run_cli("cache", "verify", cache=cache).code == 0


OTHER = """mergebuild: 1
models:
  anything: {path: models/anything-v3.safetensors}
  nai_full: {path: models/nai-full.safetensors}
  nai_sfw:  {path: models/nai-sfw.safetensors}
  insta:    {path: models/insta.safetensors}
merges:
  shared: anything + (nai_full - nai_sfw) * 0.3
  own: shared + (insta - nai_full) * 0.5
outputs:
  other: {from: own, path: out/other.safetensors, dtype: fp16}
"""


def concurrent_sharing(workdir: Path, tmp_path: Path, seed: SeedBuild, pairs: int) -> None:
    a = setup(workdir)
    b = workdir / "other.yaml"
    b.write_text(OTHER)
    assert run_cli(b, "-q", cache=tmp_path / "ref").code == 0
    other = Path("out/other.safetensors")
    refs = {OUT: seed.output, other: (workdir / other).read_bytes()}
    for i in range(pairs):
        cache = tmp_path / f"c{i}"
        procs = [spawn(r, "--json", cache=cache, env=SLOW_CHUNKS) for r in (a, b)]
        results = [p.communicate() for p in procs]
        assert [p.returncode for p in procs] == [0, 0], [e for _, e in results]
        reports = [json.loads(o) for o, _ in results]
        key = {n["name"]: n["key"] for n in reports[0]["nodes"]}["anything_nsfw"]
        assert {n["name"]: n["key"] for n in reports[1]["nodes"]}["shared"] == key
        counts = built_counts(*reports)
        assert counts["anything_nsfw"] + counts["shared"] == 1, counts  # one builder
        for p, data in refs.items():
            assert (workdir / p).read_bytes() == data
        assert run_cli("cache", "verify", cache=cache).code == 0


def test_concurrent_builds_of_recipes_sharing_a_node(
    workdir: Path, tmp_path: Path, seed_build: SeedBuild
) -> None:
    concurrent_sharing(workdir, tmp_path, seed_build, pairs=1)


@pytest.mark.slow
def test_concurrent_builds_sharing_many(
    workdir: Path, tmp_path: Path, seed_build: SeedBuild
) -> None:
    concurrent_sharing(workdir, tmp_path, seed_build, pairs=8)


# -- input modified during the build -------------------------------------------------------------


@pytest.mark.parametrize("how", ["rewrite", pytest.param("touch", marks=SLOW)])
def test_input_modified_during_build(workdir: Path, cache: Path, tmp_path: Path, how: str) -> None:
    recipe = setup(workdir)
    victim = workdir / "models" / "gape60.safetensors"
    p = spawn(recipe, "--json", cache=cache, env={"MERGEBUILD_CHUNK_ELEMENTS": "64"})
    # wait until the merge is writing (a temp object exists), then change an input
    while not temps(cache / "objects") and p.poll() is None:
        time.sleep(0.01)
    if how == "rewrite":
        data = bytearray(victim.read_bytes())
        data[-2] ^= 0x01
        victim.write_bytes(bytes(data))
    else:
        os.utime(victim, ns=(1_000_000_000, 1_000_000_000))
    _, err = p.communicate()
    assert p.returncode == 1, f"the build did not notice (exit {p.returncode}): {err}"
    assert "changed during the build" in err and "gape" in err and "Traceback" not in err
    assert not (workdir / OUT).exists()
    assert not list((cache / "objects").glob("*/*.safetensors")), "something was cached"
    assert not temps(cache)
    # the next build uses the new bytes, and equals a clean build of them
    r = run_cli(recipe, "--json", cache=cache)
    assert r.code == 0 and r.json["models"]["gape"]["hashed"], r.json["models"]
    got = (workdir / OUT).read_bytes()
    assert run_cli(recipe, "-q", cache=tmp_path / "fresh").code == 0
    assert got == (workdir / OUT).read_bytes()
