"""`lock -n` / `verify -n` plan without building or writing, and `extract -o` never replaces a
model file (the one it reads or any other)."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest

from conftest import EXAMPLES, run_cli

OUT = "out/anything-nsfw-gape.safetensors"


def recipe(workdir: Path) -> Path:
    r = workdir / "r.yaml"
    shutil.copy(EXAMPLES / "anything_nsfw_gape.yaml", r)
    return r


def tree(path: Path) -> dict[str, str]:
    """Every file under `path` with its sha256: 'nothing written' means this did not change."""
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


@pytest.mark.parametrize("command", ["lock", "verify"])
def test_lock_and_verify_dry_run_build_and_write_nothing(
    command: str, workdir: Path, cache: Path
) -> None:
    r = recipe(workdir)
    before = tree(workdir)
    res = run_cli(command, r, "-n", cache=cache)
    assert res.code == 0, res.err
    assert "3 to build, 0 cached" in res.out  # the plan: two merges and the output
    assert tree(workdir) == before  # no lock, no output
    assert not list(cache.rglob("*.safetensors"))  # nothing built


def test_lock_dry_run_after_a_build_shows_cached_and_keeps_the_lock(
    workdir: Path, cache: Path
) -> None:
    r = recipe(workdir)
    assert run_cli("lock", r, cache=cache).code == 0
    lock = r.with_suffix(".lock")
    locked = lock.read_bytes()
    res = run_cli("lock", r, "-n", "--json", cache=cache)
    assert res.code == 0, res.err
    assert res.json["dry_run"] is True
    assert {n["status"] for n in res.json["nodes"]} == {"cached"}
    assert lock.read_bytes() == locked


@pytest.mark.parametrize("target", ["self", "other_model", "ckpt_name", "renamed_model"])
def test_extract_output_never_replaces_a_model(target: str, workdir: Path, cache: Path) -> None:
    r = recipe(workdir)
    assert run_cli(r, cache=cache).code == 0
    built = workdir / OUT
    victim = {
        "self": built,
        "other_model": workdir / "models/anything-v3.safetensors",
        "ckpt_name": workdir / "new.ckpt",
        "renamed_model": workdir / "models/anything.yaml",
    }[target]
    if target == "renamed_model":  # a model under a recipe-like name: refused by content
        shutil.copy(workdir / "models/nai-sfw.safetensors", victim)
    before = tree(workdir)
    res = run_cli("extract", built, "-o", victim)
    assert res.code != 0
    assert "refusing" in res.err and "Traceback" not in res.err
    assert tree(workdir) == before


def test_extract_output_may_replace_an_older_recipe(workdir: Path, cache: Path) -> None:
    r = recipe(workdir)
    assert run_cli(r, cache=cache).code == 0
    old = workdir / "extracted.yaml"
    old.write_text("models: {a: models/anything-v3.safetensors}\n")  # '{' at byte 8
    res = run_cli("extract", workdir / OUT, "-o", old)
    assert res.code == 0, res.err
    assert "merges:" in old.read_text()


@pytest.mark.parametrize("fault", ["recipe_changed", "lock_missing"])
def test_failing_json_commands_print_one_json_document(
    fault: str, workdir: Path, cache: Path
) -> None:
    """`--json` output is one parseable document even when the command fails."""
    import json

    r = recipe(workdir)
    if fault == "recipe_changed":
        assert run_cli("lock", r, "-q", cache=cache).code == 0
        r.write_text(r.read_text().replace("alpha: 1.0", "alpha: 0.75"))
    v = run_cli("verify", r, "--json", cache=cache)
    assert v.code != 0
    doc = json.loads(v.out)  # raises on a second document
    assert doc["exit_code"] == v.code and doc["error"]
    if fault == "recipe_changed":
        assert doc["ok"] is False and doc["recipe_changes"]
