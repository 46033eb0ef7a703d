"""A symlink planted below the cache root never redirects cache writes outside the cache:
the build stops with a readable message (objects, locks, journal) or skips the optional hash
memo, and the directory the link points to stays exactly as it was."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from conftest import EXAMPLES, run_cli


def recipe(workdir: Path) -> Path:
    r = workdir / "r.yaml"
    shutil.copy(EXAMPLES / "anything_nsfw_gape.yaml", r)
    return r


def files(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


@pytest.mark.parametrize("where", ["shard", "objects", "locks", "journal"])
def test_planted_symlink_stops_the_build(where: str, workdir: Path, cache: Path) -> None:
    r = recipe(workdir)
    plan = run_cli(r, "-n", "--json", cache=cache)
    assert plan.code == 0, plan.err
    outside = workdir / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("untouched")
    assert (cache / "CACHEDIR.TAG").is_file()  # -n made the marked root (and the hash memo)
    shutil.rmtree(cache / where, ignore_errors=True)
    if where == "shard":  # every shard a node of this recipe would be written into
        (cache / "objects").mkdir(exist_ok=True)
        for node in plan.json["nodes"]:
            link = cache / "objects" / node["key"][:2]
            if not link.is_symlink():
                link.symlink_to(outside)
    else:
        (cache / where).symlink_to(outside)
    assert files(outside) == ["keep.txt"]
    res = run_cli(r, cache=cache)
    assert res.code != 0
    assert "is a symlink" in res.err and "Traceback" not in res.err
    assert files(outside) == ["keep.txt"]
    assert not (workdir / "out").exists() or files(workdir / "out") == []


def test_planted_hash_memo_symlink_is_skipped(workdir: Path, cache: Path) -> None:
    r = recipe(workdir)
    outside = workdir / "outside"
    outside.mkdir()
    assert run_cli(r, "-n", cache=cache).code == 0  # creates the marked root and the memo
    shutil.rmtree(cache / "hashes")
    (cache / "hashes").symlink_to(outside)
    res = run_cli(r, cache=cache)
    assert res.code == 0, res.err
    assert files(outside) == []
    assert (workdir / "out/anything-nsfw-gape.safetensors").is_file()
