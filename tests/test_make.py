"""mergebuild from make: rules from `mergebuild makefile`, driven by real `make` on a project of
two recipes (the second merges the first's output), checking which builds each change causes."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import SRC, run_cli

A = """mergebuild: 1
models:
  anything: models/anything-v3.safetensors
  nai_full: models/nai-full.safetensors
  nai_sfw: models/nai-sfw.safetensors
merges:
  nsfw: anything + (nai_full - nai_sfw) * 0.3
outputs:
  a: {from: nsfw, path: out/a.safetensors}
"""
B = """mergebuild: 1
models:
  a: out/a.safetensors
  insta: models/insta.safetensors
merges:
  mix: {method: weighted_sum, a: a, b: insta, alpha: 0.4}
outputs:
  b: {from: mix, path: out/b.safetensors}
"""

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")


@pytest.fixture
def project(workdir: Path, cache: Path) -> Path:
    (workdir / "a.yaml").write_text(A)
    (workdir / "b.yaml").write_text(B)
    for r in ("a", "b"):
        res = run_cli("makefile", f"{r}.yaml", cwd=workdir)
        assert res.code == 0, res.err
        (workdir / f"{r}.mk").write_text(res.out)
    log = workdir / "runs.log"
    wrapper = workdir / "mb.sh"  # logs each run, then runs this checkout's mergebuild
    wrapper.write_text(
        f'#!/bin/sh\necho "$2" >> {log}\nPYTHONPATH={SRC} MERGEBUILD_CACHE_DIR={cache} '
        f'exec {sys.executable} -m mergebuild "$@"\n'
    )
    wrapper.chmod(0o755)
    (workdir / "Makefile").write_text(
        "MERGEBUILD := ./mb.sh\ninclude a.mk b.mk\nall: out/a.safetensors out/b.safetensors\n"
    )
    return workdir


def make(project: Path) -> list[str]:
    """Run make; the recipes mergebuild was run on, in order."""
    log = project / "runs.log"
    log.unlink(missing_ok=True)
    p = subprocess.run(["make", "-j2", "all"], cwd=project, capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr
    return log.read_text().split() if log.exists() else []


def later(project: Path, changed: Path) -> None:
    """Set mtimes as if `changed` were edited after a complete build, all in the past (so a
    rule's `touch` leaves its output newest), without sleeping, at any mtime granularity."""
    old = time.time() - 60
    for f in project.rglob("*"):
        if f.is_file():
            os.utime(f, (old, old))
    for i, out in enumerate(("out/a.safetensors", "out/b.safetensors"), 1):
        if (project / out).exists():
            os.utime(project / out, (old + i, old + i))
    os.utime(changed, (old + 10, old + 10))


def test_make_rebuilds_exactly_what_changed(project: Path) -> None:
    assert make(project) == ["a.yaml", "b.yaml"]
    built = {r: (project / f"out/{r}.safetensors").read_bytes() for r in "ab"}
    assert make(project) == []  # no-op: mergebuild is not even started
    # touched, unchanged input of b only: b's rule runs, a cache hit with the same bytes
    later(project, project / "models/insta.safetensors")
    assert make(project) == ["b.yaml"]
    assert (project / "out/b.safetensors").read_bytes() == built["b"]
    assert make(project) == []
    # an edited recipe: a is rebuilt, and b because a's output changed
    (project / "a.yaml").write_text(A.replace("* 0.3", "* 0.5"))
    later(project, project / "a.yaml")
    assert make(project) == ["a.yaml", "b.yaml"]
    assert (project / "out/a.safetensors").read_bytes() != built["a"]
    assert (project / "out/b.safetensors").read_bytes() != built["b"]
    # a replaced model file
    shutil.copy(project / "models/wd13.safetensors", project / "models/nai-sfw.safetensors")
    later(project, project / "models/nai-sfw.safetensors")
    assert make(project) == ["a.yaml", "b.yaml"]
    assert make(project) == []


def test_deleted_input_reaches_mergebuild_with_its_message(project: Path) -> None:
    assert make(project) == ["a.yaml", "b.yaml"]
    (project / "models/insta.safetensors").unlink()
    p = subprocess.run(["make", "all"], cwd=project, capture_output=True, text=True)
    assert p.returncode != 0
    assert "insta" in p.stderr and "not found" in p.stderr and "No rule" not in p.stderr


def test_depfile_lists_recipe_lock_and_models(project: Path) -> None:
    assert run_cli("lock", "a.yaml", "-q", cwd=project).code == 0
    r = run_cli("deps", "a.yaml", "-o", "a.d", cwd=project)
    assert r.code == 0, r.err
    first = (project / "a.d").read_text().splitlines()[0]
    target, _, prereqs = first.partition(": ")
    assert target == "out/a.safetensors"
    assert prereqs.split() == [
        "a.yaml", "a.lock", "models/anything-v3.safetensors", "models/nai-full.safetensors",
        "models/nai-sfw.safetensors",
    ]  # fmt: skip


def test_unmakeable_names_are_refused(project: Path) -> None:
    (project / "c.yaml").write_text(A.replace("out/a.safetensors", "'out/a:b.safetensors'"))
    r = run_cli("makefile", "c.yaml", cwd=project)
    assert r.code != 0 and "make cannot name" in r.err and "Traceback" not in r.err


def test_sweep_members_are_one_shell_word_even_where_a_file_matches_them(
    workdir: Path, cache: Path
) -> None:
    """`nsfw[alpha=0.25]` unquoted is a glob pattern: with a file `nsfwa` next to it, the shell
    would pass that file's name instead of the member's."""
    (workdir / "s.yaml").write_text(
        A.replace("* 0.3", "* alpha\n    sweep: {alpha: [0.25, 0.5]}")
        .replace("  nsfw: anything", "  nsfw:\n    expr: anything")
        .replace("out/a.safetensors", '"out/a-{alpha}.safetensors"')
    )
    res = run_cli("makefile", "s.yaml", cwd=workdir)
    assert res.code == 0, res.err
    assert "'a[alpha=0.25]'" in res.out
    (workdir / "s.mk").write_text(res.out)
    (workdir / "nsfwa").write_text("decoy")
    (workdir / "aa").write_text("decoy")
    (workdir / "Makefile").write_text(
        f"MERGEBUILD := PYTHONPATH={SRC} MERGEBUILD_CACHE_DIR={cache} {sys.executable} "
        "-m mergebuild\ninclude s.mk\n"
    )
    p = subprocess.run(
        ["make", "out/a-0.25.safetensors"], cwd=workdir, capture_output=True, text=True
    )
    assert p.returncode == 0, p.stderr
    assert (workdir / "out" / "a-0.25.safetensors").is_file()
    assert not (workdir / "out" / "a-0.5.safetensors").exists()  # only that member
