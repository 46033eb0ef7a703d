"""A build with nothing to do is answered from the last build's stamp without loading the
recipe (no torch, pydantic or networkx); every kind of change falls back to the normal build,
whose result is checked against a build in a fresh cache."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import EXAMPLES, SRC, run_cli

OUT = "out/anything-nsfw-gape.safetensors"
NOOP = "nothing changed since the last build"


def recipe(workdir: Path) -> Path:
    r = workdir / "r.yaml"
    shutil.copy(EXAMPLES / "anything_nsfw_gape.yaml", r)
    return r


def heavy_modules(args: list[str], cwd: Path, cache: Path) -> tuple[str, set[str]]:
    code = (
        "import sys\n"
        "from mergebuild.cli import main\n"
        f"rc = main({[str(a) for a in args]!r})\n"
        "assert rc == 0, rc\n"
        "print('MODULES', *sorted(m for m in ('torch', 'pydantic', 'networkx', 'yaml')"
        " if m in sys.modules))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(SRC), "MERGEBUILD_CACHE_DIR": str(cache)}
    p = subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True
    )
    assert p.returncode == 0, p.stderr
    last = p.stdout.splitlines()[-1].split()
    return p.stdout, set(last[1:])


def test_noop_build_imports_nothing_heavy(workdir: Path, cache: Path) -> None:
    r = recipe(workdir)
    assert run_cli(r, cache=cache, cwd=workdir).code == 0  # the stamp is for this directory
    out, mods = heavy_modules([r], workdir, cache)
    assert NOOP in out and "0 built, 3 cached" in out
    assert mods == set()
    out, mods = heavy_modules([r, "-n"], workdir, cache)
    assert "0 to build, 3 cached" in out and mods == set()


def test_noop_dry_run_prints_what_the_normal_path_prints(workdir: Path, cache: Path) -> None:
    r = recipe(workdir)
    assert run_cli(r, cache=cache).code == 0
    fast = run_cli(r, "-n", cache=cache)
    slow = run_cli(r, "-n", cache=cache, env={"MERGEBUILD_X": "1"})  # new env: no stamp
    assert fast.code == slow.code == 0
    assert fast.out == slow.out


def _edit_recipe(w: Path, r: Path) -> None:
    r.write_text(r.read_text().replace("alpha: 1.0", "alpha: 0.5"))


def _same_size_edit(w: Path, r: Path) -> None:
    st = r.stat()
    r.write_text(r.read_text().replace("alpha: 1.0", "alpha: 0.9"))
    os.utime(r, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size, same mtime: content decides


def _replace_input(w: Path, r: Path) -> None:
    shutil.copy(w / "models/wd13.safetensors", w / "models/gape60.safetensors")


def _touch_input(w: Path, r: Path) -> None:
    os.utime(w / "models/gape60.safetensors")


def _delete_output(w: Path, r: Path) -> None:
    (w / OUT).unlink()


def _replace_output(w: Path, r: Path) -> None:
    (w / OUT).unlink()
    shutil.copy(w / "models/insta.safetensors", w / OUT)


def _add_lock(w: Path, r: Path) -> None:
    assert run_cli("lock", r, "-q", cache=w.parent / "cache").code == 0


CHANGES = {
    "recipe edited": (_edit_recipe, []),
    "recipe edited, same size and mtime": (_same_size_edit, []),
    "input replaced": (_replace_input, []),
    "input touched": (_touch_input, []),
    "output deleted": (_delete_output, []),
    "output replaced": (_replace_output, []),
    "lock file written": (_add_lock, []),
    "parameter override": (None, ["--set", "anything_nsfw_gape.alpha=0.5"]),
    "environment": (None, ["ENV"]),
}


@pytest.mark.parametrize("change", list(CHANGES))
def test_any_change_takes_the_normal_path(change: str, workdir: Path, cache: Path) -> None:
    r = recipe(workdir)
    assert run_cli(r, cache=cache).code == 0
    assert NOOP in run_cli(r, cache=cache).out
    edit, extra = CHANGES[change]
    env = {}
    if extra == ["ENV"]:
        extra, env = [], {"MERGEBUILD_MODEL_PATH": str(workdir)}
    if edit is not None:
        edit(workdir, r)
    res = run_cli(r, *extra, cache=cache, env=env)
    assert res.code == 0, res.err
    assert NOOP not in res.out
    # the result is what a fresh cache builds from the same recipe and inputs
    got = (workdir / OUT).read_bytes()
    (workdir / OUT).unlink()
    fresh = run_cli(r, *extra, cache=workdir / "fresh", env=env)
    assert fresh.code == 0, fresh.err
    assert (workdir / OUT).read_bytes() == got


def test_removed_cache_object_is_rebuilt(workdir: Path, cache: Path) -> None:
    r = recipe(workdir)
    assert run_cli(r, cache=cache).code == 0
    for sidecar in (cache / "objects").rglob("*.json"):
        sidecar.unlink()  # every entry now incomplete: the normal path must rebuild
    res = run_cli(r, cache=cache)
    assert res.code == 0 and NOOP not in res.out and "3 built, 0 cached" in res.out


def test_gc_drops_the_stamp_with_its_recipe(workdir: Path, cache: Path) -> None:
    r = recipe(workdir)
    assert run_cli(r, cache=cache).code == 0
    assert NOOP in run_cli(r, cache=cache).out
    r.unlink()
    res = run_cli("cache", "gc", cache=cache)
    assert res.code == 0, res.err
    assert "unknown" not in res.out + res.err
    assert list((cache / "journal").iterdir()) == []
