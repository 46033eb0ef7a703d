"""An output never lands on a file the build reads or keeps: the recipe, an included recipe,
their lock files, another output, the cache's own files, or a directory. Each way of naming the
same file (plain, `./`, `..`, a symlink, a symlinked folder, a hardlink, other case, `--set`)
is refused with one message (exit 2), and the protected file keeps its bytes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from conftest import Result, load_st, run_cli

MODELS = """models:
  anything: models/anything-v3.safetensors
  nai_sfw: models/nai-sfw.safetensors
merges:
  m: anything * 0.5 + nai_sfw * 0.5
"""


def recipe_text(path: str, extra: str = "") -> str:
    return f"mergebuild: 1\n{extra}{MODELS}outputs:\n  o: {{from: m, path: '{path}'}}\n"


def refused(r: Result, *words: str) -> None:
    assert r.code == 2, (r.code, r.err)
    assert "Traceback" not in r.err and "unexpected" not in r.err, r.err
    assert len(r.err) < 2000
    for w in words:
        assert w in r.err, r.err


def snapshot(*paths: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in paths if p.exists()}


@pytest.mark.parametrize(
    ("out", "setup"),
    [
        ("self.yaml", None),
        ("./self.yaml", None),
        ("out/../self.yaml", None),
        ("models/../out/../self.yaml", None),
        ("link.yaml", "symlink"),  # a symlink at the output path naming the recipe
        ("here/self.yaml", "symlinked_dir"),  # a folder that is a link back to the recipe's
        ("hard.yaml", "hardlink"),
        ("SELF.yaml", None),  # one file on a case-insensitive filesystem
    ],
)
def test_output_over_the_recipe_is_refused(
    workdir: Path, cache: Path, out: str, setup: str | None
) -> None:
    recipe = workdir / "self.yaml"
    recipe.write_text(recipe_text(out))
    if setup == "symlink":
        (workdir / "link.yaml").symlink_to(recipe)
    elif setup == "symlinked_dir":
        (workdir / "here").symlink_to(workdir)
    elif setup == "hardlink":
        os.link(recipe, workdir / "hard.yaml")
    before = recipe.read_bytes()
    r = run_cli(recipe, cache=cache, cwd=workdir)
    refused(r, "the recipe itself", "output 'o'")
    assert recipe.read_bytes() == before
    assert not (cache / "objects").exists()


def test_output_over_the_recipe_through_set(workdir: Path, cache: Path) -> None:
    recipe = workdir / "self.yaml"
    recipe.write_text(recipe_text("out/o.safetensors"))
    before = recipe.read_bytes()
    for value in ("self.yaml", str(recipe), "./out/../self.yaml", "self.lock"):
        r = run_cli(recipe, "--set", f"o.path={value}", cache=cache, cwd=workdir)
        refused(r, "output 'o'")
        assert "the recipe itself" in r.err or "the recipe's lock file" in r.err, r.err
        assert recipe.read_bytes() == before
    # the recipe itself, reached through a symlinked recipe file: the real file is protected
    link = workdir / "alias.yaml"
    link.symlink_to(recipe)
    r = run_cli(link, "--set", "o.path=self.yaml", cache=cache)
    refused(r, "the recipe itself")
    assert recipe.read_bytes() == before


@pytest.mark.parametrize("out", ["self.lock", "./self.lock", "out/../self.lock", "lock-link"])
def test_output_over_the_lock_file_is_refused(workdir: Path, cache: Path, out: str) -> None:
    recipe = workdir / "self.yaml"
    recipe.write_text(recipe_text(out))
    lock = workdir / "self.lock"
    lock.write_text("mergebuild_lock: 1\n")  # existing or not, it is where `lock` writes
    (workdir / "lock-link").symlink_to(lock)
    r = run_cli("lock", recipe, cache=cache)
    refused(r, "the recipe's lock file")
    assert lock.read_text() == "mergebuild_lock: 1\n"
    lock.unlink()  # absent: the place is protected all the same
    r = run_cli(recipe, "-n", cache=cache)
    refused(r, "the recipe's lock file")


def write_include_tree(workdir: Path) -> tuple[Path, Path, Path]:
    """top.yaml includes a/sub.yaml, which includes ../b/leaf.yaml."""
    (workdir / "a").mkdir()
    (workdir / "b").mkdir()
    leaf = workdir / "b" / "leaf.yaml"
    leaf.write_text(
        "mergebuild: 1\nmodels:\n  x: ../models/insta.safetensors\n"
        "outputs:\n  x: {from: x, path: leaf-out.safetensors}\n"
    )
    sub = workdir / "a" / "sub.yaml"
    sub.write_text(
        "mergebuild: 1\ninclude: {leaf: ../b/leaf.yaml}\n"
        "models:\n  y: ../models/nai-sfw.safetensors\n"
        "merges:\n  s: leaf.x * 0.5 + y * 0.5\n"
        "outputs:\n  s: {from: s, path: sub-out.safetensors}\n"
    )
    top = workdir / "top.yaml"
    return top, sub, leaf


@pytest.mark.parametrize(
    ("out", "what"),
    [
        ("a/sub.yaml", "included recipe sub.yaml"),
        ("./b/../a/sub.yaml", "included recipe sub.yaml"),
        ("b/leaf.yaml", "included recipe leaf.yaml"),  # included by an include
        ("sublink.yaml", "included recipe sub.yaml"),
        ("a/sub.lock", "the lock file of included recipe sub.yaml"),
        ("b/leaf.lock", "the lock file of included recipe leaf.yaml"),
        ("leafhard.yaml", "included recipe leaf.yaml"),
    ],
)
def test_output_over_an_included_recipe_is_refused(
    workdir: Path, cache: Path, out: str, what: str
) -> None:
    top, sub, leaf = write_include_tree(workdir)
    (workdir / "sublink.yaml").symlink_to(sub)
    os.link(leaf, workdir / "leafhard.yaml")
    top.write_text(
        "mergebuild: 1\ninclude: {sub: a/sub.yaml}\n"
        "models:\n  z: models/anything-v3.safetensors\n"
        f"merges:\n  t: sub.s * 0.5 + z * 0.5\noutputs:\n  final: {{from: t, path: '{out}'}}\n"
    )
    before = snapshot(sub, leaf, workdir / out)
    r = run_cli(top, cache=cache)
    refused(r, what, "output 'final'")
    assert snapshot(sub, leaf, workdir / out) == before
    # the same through --set on a recipe that was fine
    top.write_text(top.read_text().replace(f"path: '{out}'", "path: t.safetensors"))
    assert run_cli(top, "-n", cache=cache).code == 0
    refused(run_cli(top, "-n", "--set", f"final.path={out}", cache=cache), what)


def test_an_included_recipe_may_not_write_over_its_includer(workdir: Path, cache: Path) -> None:
    """Loaded on its own, sub.yaml checks its own outputs: writing leaf.yaml is refused."""
    _, sub, leaf = write_include_tree(workdir)
    sub.write_text(sub.read_text().replace("sub-out.safetensors", "../b/leaf.yaml"))
    before = leaf.read_bytes()
    r = run_cli(sub, "--allow-outside-paths", cache=cache)
    refused(r, "included recipe leaf.yaml")
    assert leaf.read_bytes() == before


def test_recipe_named_like_a_lock_file_is_refused(workdir: Path, cache: Path) -> None:
    recipe = workdir / "r.lock"
    recipe.write_text(recipe_text("o.safetensors"))
    before = recipe.read_bytes()
    link = workdir / "r.yaml"  # a recipe that is a link to such a file: its lock is the file
    link.symlink_to(recipe)
    for args in (("lock", recipe), (recipe, "-n"), ("graph", recipe), ("lock", link)):
        r = run_cli(*args, cache=cache)
        refused(r, "cannot end in .lock")
    assert recipe.read_bytes() == before


@pytest.mark.parametrize(
    ("out", "setup", "message"),
    [
        ("out", "dir", "is a directory"),
        (".", None, "is a directory"),
        ("models", None, "is a directory"),
        ("notes.txt/o.safetensors", "file", "notes.txt is a file, not a directory"),
        ("notes.txt/deeper/o.safetensors", "file", "notes.txt is a file, not a directory"),
        ("dirlink", "dirlink", "is a directory"),
    ],
)
def test_output_path_must_be_a_file_name(
    workdir: Path, cache: Path, out: str, setup: str | None, message: str
) -> None:
    if setup == "dir":
        (workdir / "out").mkdir()
    elif setup == "file":
        (workdir / "notes.txt").write_text("keep")
    elif setup == "dirlink":
        (workdir / "out").mkdir()
        (workdir / "dirlink").symlink_to(workdir / "out")
    recipe = workdir / "r.yaml"
    recipe.write_text(recipe_text(out))
    r = run_cli(recipe, cache=cache)
    refused(r, message, "output 'o'")
    if setup == "file":
        assert (workdir / "notes.txt").read_text() == "keep"


@pytest.mark.parametrize(
    "second",
    ["out/o.safetensors", "./out/o.safetensors", "out/../out/o.safetensors", "link/o.safetensors"],
)
def test_two_outputs_writing_one_file_are_refused(workdir: Path, cache: Path, second: str) -> None:
    (workdir / "out").mkdir()
    (workdir / "link").symlink_to(workdir / "out")
    recipe = workdir / "r.yaml"
    recipe.write_text(
        recipe_text("out/o.safetensors") + f"  p: {{from: m, path: '{second}', dtype: fp32}}\n"
    )
    r = run_cli(recipe, cache=cache)
    refused(r, "outputs 'o' and 'p' write the same file")
    assert not any((workdir / "out").iterdir())


def test_output_inside_the_cache_is_refused(workdir: Path) -> None:
    cache = workdir / "c"
    recipe = workdir / "r.yaml"
    for out in ("c/objects/x.safetensors", "c/journal/j.safetensors", "c/CACHEDIR.TAG"):
        recipe.write_text(recipe_text(out))
        r = run_cli(recipe, "-n", cache=cache)
        assert r.code == 1 and "Traceback" not in r.err, r.err
        assert "inside the cache's own files" in r.err, r.err
    recipe.write_text(recipe_text("c-out/o.safetensors"))  # a sibling folder is fine
    assert run_cli(recipe, "-n", cache=cache).code == 0


def test_input_model_at_the_lock_path_is_refused(workdir: Path, cache: Path) -> None:
    """`lock` writes RECIPE.lock: a model stored under that name would be replaced."""
    victim = workdir / "r.lock"
    victim.write_bytes((workdir / "models/insta.safetensors").read_bytes())
    before = victim.read_bytes()
    recipe = workdir / "r.yaml"
    recipe.write_text(
        "mergebuild: 1\nmodels:\n  x: r.lock\noutputs:\n  o: {from: x, path: o.safetensors}\n"
    )
    r = run_cli("lock", recipe, cache=cache)
    assert r.code == 1 and "Traceback" not in r.err, r.err
    assert "lock file path" in r.err
    assert victim.read_bytes() == before
    assert not (workdir / "o.safetensors").exists()


def test_a_normal_output_next_to_the_recipe_and_its_lock(workdir: Path, cache: Path) -> None:
    """The protections do not get in the way: an output beside the recipe builds, the lock is
    written beside both, and neither replaces the other."""
    recipe = workdir / "self.yaml"
    recipe.write_text(recipe_text("self.safetensors"))
    before = recipe.read_bytes()
    r = run_cli("lock", recipe, "-q", cache=cache)
    assert r.code == 0, r.err
    assert recipe.read_bytes() == before
    assert "mergebuild_lock: 1" in (workdir / "self.lock").read_text()
    got = load_st(workdir / "self.safetensors")["model.diffusion_model.out.2.weight"]
    a = load_st(workdir / "models/anything-v3.safetensors")["model.diffusion_model.out.2.weight"]
    b = load_st(workdir / "models/nai-sfw.safetensors")["model.diffusion_model.out.2.weight"]
    import numpy as np

    want = a.astype(np.float32) * np.float32(0.5) + b.astype(np.float32) * np.float32(0.5)
    assert np.array_equal(got, want.astype(np.float16))
