"""Looking for a pinned model is bounded: the walk stays on the search path's filesystem, never
enters /proc or other virtual filesystems, does not follow symlinked folders (no loops), stops
at a cap with a message naming the search path, and a recipe may not search `/`, the home
directory or /proc. Pins are still found in ordinary search paths."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import SRC, run_cli

Walker = Callable[[Path], Any]
ENVS = ("MERGEBUILD_SEARCH_MAX_DIRS", "MERGEBUILD_SEARCH_MAX_FILES", "MERGEBUILD_SEARCH_MAX_HASHED")


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def pinned(where: Path, pin: str, search: list[str] | None = None) -> Path:
    doc = {
        "mergebuild": 1,
        **({"search_paths": search} if search is not None else {}),
        "models": {"x": {"sha256": pin}},
        "outputs": {"o": {"from": "x", "path": "o.safetensors"}},
    }
    recipe = where / "r.yaml"
    recipe.write_text(yaml.safe_dump(doc, sort_keys=False))
    return recipe


@pytest.fixture
def walk(monkeypatch: pytest.MonkeyPatch) -> Walker:
    """`walk_models` with clean limits (the caller's environment must not leak in)."""
    for var in ENVS:
        monkeypatch.delenv(var, raising=False)
    from mergebuild.locate import walk_models

    return walk_models


def test_pins_found_nested_and_through_symlinked_files(
    model_dir: Path, tmp_path: Path, walk: Walker
) -> None:
    root = tmp_path / "models"
    deep = root / "a" / "b" / "c"
    deep.mkdir(parents=True)
    shutil.copy(model_dir / "insta.safetensors", deep / "insta.safetensors")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copy(model_dir / "nai-sfw.safetensors", elsewhere / "sfw.safetensors")
    (root / "sfw-link.safetensors").symlink_to(elsewhere / "sfw.safetensors")
    (root / "notes.txt").write_text("not a model")
    (root / "empty.safetensors").write_bytes(b"")  # no model is empty
    (root / ".mergebuild-tmp-x.safetensors").write_bytes(b"partial")
    found = walk(root)
    assert found.files == sorted([deep / "insta.safetensors", root / "sfw-link.safetensors"])
    assert found.note is None
    # through the CLI, with the recipe's own search path and with --models
    work = tmp_path / "work"
    work.mkdir()
    recipe = pinned(work, sha(model_dir / "nai-sfw.safetensors")[:10], ["../models"])
    r = run_cli(recipe, "-n", "--json", cache=tmp_path / "c")
    assert r.code == 0, r.err
    assert r.json["models"]["x"]["path"] == str(root / "sfw-link.safetensors")
    recipe = pinned(work, sha(model_dir / "insta.safetensors"))
    r = run_cli(recipe, "-n", "--json", "--models", root, cache=tmp_path / "c")
    assert r.code == 0, r.err
    assert r.json["models"]["x"]["path"] == str(deep / "insta.safetensors")


def test_symlink_loops_and_links_out_are_not_followed(
    model_dir: Path, tmp_path: Path, walk: Walker
) -> None:
    root = tmp_path / "models"
    (root / "a").mkdir(parents=True)
    shutil.copy(model_dir / "insta.safetensors", root / "a" / "m.safetensors")
    (root / "a" / "loop").symlink_to(root / "a")  # a → a/loop → a …
    (root / "up").symlink_to(root)  # the root inside itself
    (root / "proc").symlink_to("/proc")  # a bind-like link into a virtual filesystem
    (root / "sys").symlink_to("/sys")
    (root / "etc").symlink_to("/etc")  # out of the search path
    (root / "status.ckpt").symlink_to("/proc/self/status")  # a model-named virtual file
    (root / "kcore.ckpt").symlink_to("/proc/kcore")
    (root / "zero.safetensors").symlink_to("/dev/zero")
    found = walk(root)
    assert found.files == [root / "a" / "m.safetensors"]
    # the pin of a file that is nowhere: the walk ends, and says where it looked
    recipe = pinned(tmp_path, "ab" * 32)
    r = run_cli(recipe, "-n", "--models", root, cache=tmp_path / "c", timeout=60)
    assert r.code == 1 and "Traceback" not in r.err, r.err
    assert "not found" in r.err and str(root) in r.err and "1 model files" in r.err


@pytest.mark.parametrize("root", ["/proc", "/proc/self", "/sys", "/dev"])
def test_virtual_filesystem_search_paths_are_skipped(root: str, walk) -> None:
    found = walk(Path(root))
    assert found.files == []
    assert found.note and "virtual filesystem" in found.note


@pytest.mark.parametrize(
    ("search", "why"),
    [
        ("/", "the filesystem root"),
        ("/proc", "virtual filesystem"),
        ("/sys/kernel", "virtual filesystem"),
        ("~", "the home directory"),
        ("HOME_PARENT", "holds the home directory"),
        ("..", "the home directory"),  # the recipe sits in ~/downloads
        ("../..", "holds the home directory"),
        ("/..", "the filesystem root"),
    ],
)
def test_recipe_search_paths_may_not_be_broad(tmp_path: Path, search: str, why: str) -> None:
    home = tmp_path / "users" / "me"
    downloads = home / "downloads"
    downloads.mkdir(parents=True)
    search = str(home.parent) if search == "HOME_PARENT" else search
    recipe = pinned(downloads, "ab" * 32, [search])
    r = run_cli(recipe, "-n", cache=tmp_path / "c", env={"HOME": str(home)}, timeout=60)
    assert r.code == 2 and "Traceback" not in r.err, r.err
    assert f"search path {search!r} is" in r.err and why in r.err, r.err
    assert "r.yaml:3:" in r.err and "--models DIR" in r.err
    # the user may still name a broad folder themselves (bounded walk): here a small one
    ok = pinned(downloads, "ab" * 32, ["models"])
    r = run_cli(ok, "-n", "--models", home, cache=tmp_path / "c", env={"HOME": str(home)})
    assert r.code == 1 and "not found" in r.err, r.err


def make_tree(root: Path, width: int, depth: int) -> None:
    if depth == 0:
        return
    for i in range(width):
        d = root / f"d{i}"
        d.mkdir(parents=True)
        (d / f"f{i}.txt").write_text("x")
        make_tree(d, width, depth - 1)


@pytest.mark.parametrize(
    ("var", "value", "what"),
    [
        ("MERGEBUILD_SEARCH_MAX_DIRS", "5", "5 folders"),
        ("MERGEBUILD_SEARCH_MAX_FILES", "20", "20 entries"),
    ],
)
def test_walk_cap_stops_with_a_message(tmp_path: Path, var: str, value: str, what: str) -> None:
    tree = tmp_path / "big"
    make_tree(tree, 3, 3)  # 39 folders, 78 entries
    recipe = pinned(tmp_path, "cd" * 32)
    r = run_cli(recipe, "-n", "--models", tree, cache=tmp_path / "c", env={var: value})
    assert r.code == 1 and "Traceback" not in r.err, r.err
    assert f"the search in {tree} stopped after {what}" in r.err, r.err
    assert "--models DIR" in r.err and var in r.err
    # without the cap, the same walk completes and says nothing of the kind
    r = run_cli(recipe, "-n", "--models", tree, cache=tmp_path / "c")
    assert r.code == 1 and "stopped" not in r.err, r.err


def test_cap_hit_but_model_found_warns(model_dir: Path, tmp_path: Path) -> None:
    tree = tmp_path / "big"
    make_tree(tree, 3, 2)
    shutil.copy(model_dir / "insta.safetensors", tree / "insta.safetensors")  # at the top
    recipe = pinned(tmp_path, sha(model_dir / "insta.safetensors"))
    env = {"MERGEBUILD_SEARCH_MAX_DIRS": "2"}
    r = run_cli(recipe, "-n", "--json", "--models", tree, cache=tmp_path / "c", env=env)
    assert r.code == 0, r.err
    assert r.json["models"]["x"]["path"] == str(tree / "insta.safetensors")
    assert "warning" in r.err and "stopped after 2 folders" in r.err


def test_hash_cap_stops_with_a_message(model_dir: Path, tmp_path: Path) -> None:
    tree = tmp_path / "many"
    tree.mkdir()
    names = sorted(p.name for p in model_dir.glob("*.safetensors"))
    for name in names:
        shutil.copy(model_dir / name, tree / name)
    last = tree / names[-1]  # candidates are hashed in name order: this one comes last
    recipe = pinned(tmp_path, sha(last))
    env = {"MERGEBUILD_SEARCH_MAX_HASHED": "1"}
    r = run_cli(recipe, "-n", "--models", tree, cache=tmp_path / "c1", env=env)
    assert r.code == 1 and "Traceback" not in r.err, r.err
    assert f"stopped after hashing 1 files ({len(names) - 1} not hashed)" in r.err, r.err
    assert "MERGEBUILD_SEARCH_MAX_HASHED" in r.err
    # files already hashed (memoized) cost nothing and do not count: the next run gets further
    env2 = {"MERGEBUILD_SEARCH_MAX_HASHED": str(len(names) - 1)}
    r = run_cli(recipe, "-n", "--json", "--models", tree, cache=tmp_path / "c1", env=env2)
    assert r.code == 0, r.err
    assert r.json["models"]["x"]["path"] == str(last)


def _can_mount() -> bool:
    if shutil.which("unshare") is None:
        return False
    p = subprocess.run(["unshare", "-rm", "true"], capture_output=True)
    return p.returncode == 0


@pytest.mark.skipif(not _can_mount(), reason="needs unshare -rm (user + mount namespaces)")
def test_walk_stays_on_one_filesystem(model_dir: Path, tmp_path: Path) -> None:
    """A filesystem mounted inside the search path is not entered (like `find -xdev`): it may
    be a network share or a whole other disk. The model is found when named directly."""
    root = tmp_path / "models"
    (root / "mnt").mkdir(parents=True)
    shutil.copy(model_dir / "insta.safetensors", root / "local.safetensors")
    probe = (
        "import json, sys; from pathlib import Path; from mergebuild.locate import walk_models; "
        "w = walk_models(Path(sys.argv[1])); d = walk_models(Path(sys.argv[1]) / 'mnt'); "
        "print(json.dumps([[str(p) for p in w.files], w.note, [str(p) for p in d.files]]))"
    )
    script = (
        f"mount -t tmpfs none '{root / 'mnt'}' && "
        f"cp '{model_dir / 'nai-sfw.safetensors'}' '{root / 'mnt' / 'sfw.safetensors'}' && "
        f'exec "{sys.executable}" -c "{probe}" "{root}"'
    )
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    p = subprocess.run(
        ["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, env=env
    )
    assert p.returncode == 0, p.stderr
    import json

    files, note, direct = json.loads(p.stdout)
    assert files == [str(root / "local.safetensors")]
    assert note and "other filesystems were not searched" in note
    assert direct == [str(root / "mnt" / "sfw.safetensors")]
