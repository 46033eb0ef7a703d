"""A malformed lock file is an error naming the entry, for a build and for `verify` (exit 1,
no traceback); `verify` never passes on one; `mergebuild lock` replaces it."""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import run_cli

RECIPE = """mergebuild: 1
models: {a: models/insta.safetensors, b: models/wd13.safetensors}
merges: {m: a * 0.5 + b * 0.5}
outputs: {o: {from: m, path: out/o.safetensors}}
"""


def _set(path: str, value: Any) -> Callable[[dict], None]:
    def edit(lock: dict) -> None:
        *parents, last = path.split(".")
        node = lock
        for p in parents:
            node = node[p]
        node[last] = value

    return edit


def _drop(path: str) -> Callable[[dict], None]:
    def edit(lock: dict) -> None:
        *parents, last = path.split(".")
        node = lock
        for p in parents:
            node = node[p]
        del node[last]

    return edit


# (id, edit, what the message must name)
CASES: list[tuple[str, Callable[[dict], None], str]] = [
    ("sha-int", _set("models.a.sha256", 123), "models.a.sha256"),
    ("sha-short", _set("models.a.sha256", "abc123"), "models.a.sha256"),
    ("sha-upper", _set("models.a.sha256", "AB" * 32), "models.a.sha256"),
    ("size-negative", _set("models.a.size", -1), "models.a.size"),
    ("size-string", _set("models.a.size", "1082454"), "models.a.size"),
    ("size-bool", _set("models.b.size", True), "models.b.size"),
    ("models-list", _set("models", ["a", "b"]), "models"),
    ("model-string", _set("models.a", "f" * 64), "models.a"),
    ("model-extra", _set("models.a.extra", 1), "models.a.extra"),
    ("model-missing-sha", _drop("models.a.sha256"), "models.a.sha256"),
    ("outputs-string", _set("outputs", "o"), "outputs"),
    ("output-list", _set("outputs.o", [1, 2]), "outputs.o"),
    ("output-from-int", _set("outputs.o.from", 1), "outputs.o.from"),
    ("nodes-list", _set("nodes", []), "nodes"),
    ("node-key-int", _set("nodes.m.key", 5), "nodes.m.key"),
    ("node-inputs-list", _set("nodes.m.inputs", ["a", "b"]), "nodes.m.inputs"),
    ("key-int", _set("models", {1: {"sha256": "0" * 64, "size": 1}}), "models.1.[key]"),
]


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("lockcache")


@pytest.fixture(scope="module")
def locked_once(model_dir: Path, cache: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple:
    """One locked build for the module: each test only rewrites the lock file."""
    work = tmp_path_factory.mktemp("lockwork")
    (work / "models").symlink_to(model_dir)
    recipe = work / "r.yaml"
    recipe.write_text(RECIPE)
    r = run_cli("lock", recipe, "-q", cache=cache)
    assert r.code == 0, r.err
    return recipe, recipe.with_suffix(".lock").read_text()


@pytest.fixture
def locked(locked_once: tuple) -> Iterator[tuple[Path, dict]]:
    recipe, text = locked_once
    yield recipe, yaml.safe_load(text)
    recipe.with_suffix(".lock").write_text(text)  # the next test starts from the good lock


@pytest.mark.parametrize("edit,named", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_malformed_lock_fails_build_and_verify(
    locked: tuple[Path, dict], cache: Path, edit: Callable[[dict], None], named: str
) -> None:
    recipe, good = locked
    bad = copy.deepcopy(good)
    edit(bad)
    recipe.with_suffix(".lock").write_text(yaml.safe_dump(bad))
    out = recipe.parent / "out/o.safetensors"
    before = hashlib.sha256(out.read_bytes()).hexdigest()
    for args in (("verify", recipe), (recipe,)):
        r = run_cli(*args, cache=cache)
        assert r.code == 1, (args, r.out, r.err)
        assert "Traceback" not in r.err and "unexpected" not in r.err, r.err
        assert "is malformed" in r.err and f"  {named}:" in r.err, r.err
        assert '"ok": true' not in r.out
    assert hashlib.sha256(out.read_bytes()).hexdigest() == before


def test_lock_replaces_a_malformed_lock_and_verify_passes(
    locked: tuple[Path, dict], cache: Path
) -> None:
    recipe, good = locked
    lock = recipe.with_suffix(".lock")
    lock.write_text("mergebuild_lock: 1\nmodels: [1]\nnodes: 7\noutputs: {o: x}\n")
    for args in (("verify", recipe, "--json"), (recipe, "-n"), (recipe, "--json")):
        r = run_cli(*args, cache=cache)
        assert r.code == 1 and "models: input should be a valid dictionary" in r.err.lower()
        assert '"ok": true' not in r.out
    r = run_cli("lock", recipe, "-q", cache=cache)
    assert r.code == 0 and "replacing it" in r.err, r.err
    assert yaml.safe_load(lock.read_text()) == good
    v = run_cli("verify", recipe, "--json", cache=cache)
    assert v.code == 0 and v.json["ok"], v.err


def test_lock_bombs_and_deep_nesting_are_refused(locked: tuple[Path, dict], cache: Path) -> None:
    recipe, _ = locked
    lock = recipe.with_suffix(".lock")
    bomb = ["mergebuild_lock: 1", "l0: &l0 [x, x, x, x, x, x, x, x, x, x]"]
    bomb += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]" for i in range(1, 9)]
    lock.write_text("\n".join(bomb) + "\n")
    r = run_cli("verify", recipe, cache=cache, timeout=120)
    assert r.code == 1 and "more than 1,000,000 values" in r.err, r.err
    lock.write_text("mergebuild_lock: 1\nmodels: " + "[" * 50_000 + "]" * 50_000 + "\n")
    r = run_cli(recipe, cache=cache, timeout=120)
    assert r.code == 1 and "Traceback" not in r.err and "lock file" in r.err, r.err


def test_verify_with_empty_sections_never_passes(locked: tuple[Path, dict], cache: Path) -> None:
    recipe, good = locked
    lock = recipe.with_suffix(".lock")
    lock.write_text(yaml.safe_dump({**good, "outputs": {}, "nodes": {}}))
    r = run_cli("verify", recipe, "--json", cache=cache)
    report, _ = json.JSONDecoder().raw_decode(r.out)  # then the error, as JSON
    assert r.code == 1 and not report["ok"]
    assert report["outputs"][0]["expected"] is None
