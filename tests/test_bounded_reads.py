"""Every text file mergebuild reads (recipes, includes, locks, memos, sidecars) must be a regular
file of bounded size: /dev/zero, a FIFO or a huge file is one clear error, never a hang or an
out-of-memory. Each case runs the real CLI with a timeout, so a hang fails the test."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from conftest import run_cli
from mergebuild.textfile import TextFileError, read_capped

RECIPE = """mergebuild: 1
models:
  a: models/anything-v3.safetensors
{include}merges:
  m: a * 0.5 + a * 0.5
outputs:
  o: {{from: m, path: out/o.safetensors}}
"""


def _special(kind: str, where: Path) -> Path:
    """A hostile stand-in for a text file: a device, a FIFO, a directory or a huge file."""
    if kind == "dev_zero":
        return Path("/dev/zero")
    if kind == "fifo":
        os.mkfifo(where)
        return where
    if kind == "directory":
        where.mkdir()
        return where
    with open(where, "wb") as f:  # sparse: 64 MiB claimed, nothing stored
        f.truncate(64 << 20)
    return where


KINDS = ["dev_zero", "fifo", "directory", "huge"]
EXPECT = {
    "dev_zero": "not a regular file",
    "fifo": "not a regular file",
    "directory": "not a regular file",
    "huge": "larger than",
}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dry_run", [False, True])
def test_include_of_special_file(workdir: Path, cache: Path, kind: str, dry_run: bool) -> None:
    target = _special(kind, workdir / "inc.yaml")
    (workdir / "r.yaml").write_text(RECIPE.format(include=f"include:\n  x: '{target}'\n"))
    r = run_cli(workdir / "r.yaml", *(["-n"] if dry_run else []), cache=cache, timeout=60)
    assert r.code == 2, r.err
    assert EXPECT[kind] in r.err and "Traceback" not in r.err


@pytest.mark.parametrize("kind", KINDS)
def test_recipe_itself_special(workdir: Path, cache: Path, kind: str) -> None:
    target = _special(kind, workdir / "r.yaml")
    r = run_cli(target, "-n", cache=cache, timeout=60)
    assert r.code == 2, r.err
    assert EXPECT[kind] in r.err and "Traceback" not in r.err


@pytest.mark.parametrize("kind", KINDS)
def test_lock_file_special(workdir: Path, cache: Path, kind: str) -> None:
    (workdir / "r.yaml").write_text(RECIPE.format(include=""))
    lock = workdir / "r.lock"
    if kind in ("dev_zero",):
        lock.symlink_to("/dev/zero")
    else:
        _special(kind, lock)
    for args in (["-n"], [], ["verify"]):
        cmd = [*args[:1], workdir / "r.yaml"] if args == ["verify"] else [workdir / "r.yaml", *args]
        r = run_cli(*cmd, cache=cache, timeout=60)
        assert r.code == 1, (args, r.err)
        assert EXPECT[kind] in r.err and "Traceback" not in r.err
    assert not (workdir / "out" / "o.safetensors").exists()


@pytest.mark.parametrize("kind", ["dev_zero", "fifo", "huge"])
def test_hostile_memo_and_sidecar_are_ignored(workdir: Path, cache: Path, kind: str) -> None:
    """Cache-internal JSON replaced by a special file counts as absent: the build rebuilds."""
    (workdir / "r.yaml").write_text(RECIPE.format(include=""))
    assert run_cli(workdir / "r.yaml", cache=cache).code == 0
    victims = list((cache / "hashes").rglob("*.json")) + list((cache / "objects").rglob("*.json"))
    victims += list((cache / "journal").glob("*.json"))
    assert victims
    for v in victims:
        v.unlink()
        if kind == "dev_zero":
            v.symlink_to("/dev/zero")
        else:
            _special(kind, v)
    r = run_cli(workdir / "r.yaml", cache=cache, timeout=120)
    assert r.code == 0, r.err
    r = run_cli(workdir / "r.yaml", "-n", cache=cache, timeout=60)
    assert r.code == 0, r.err


def test_read_capped_limits(tmp_path: Path) -> None:
    f = tmp_path / "f"
    f.write_bytes(b"x" * 100)
    assert read_capped(f, 100) == b"x" * 100
    with pytest.raises(TextFileError, match="larger than 99 bytes"):
        read_capped(f, 99)
    with pytest.raises(FileNotFoundError):
        read_capped(tmp_path / "missing", 10)
