"""Shared fixtures: synthetic SD-shaped models on disk, an isolated cache, a CLI runner.

The CLI is run as a real subprocess (`python -m mergebuild`) against this checkout's `src/`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from cli_zygote import zygote

SRC = Path(__file__).resolve().parents[1] / "src"
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(SRC))

SCALE = 1 / 64  # small dims: a whole SD1 model is ~1 MB

# The suite starts the CLI as hundreds of fresh interpreters. Where PYTHONDONTWRITEBYTECODE is
# set, each one compiled mergebuild from source again (~0.1 s of CPU a run): children may keep
# its bytecode (src/**/__pycache__, git-ignored; checked against each source's mtime).
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)


@dataclass
class Result:
    code: int
    out: str
    err: str

    @property
    def json(self) -> dict:
        return json.loads(self.out)


def run_cli(
    *args: str | Path,
    cache: Path | None = None,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 300,
    fresh: bool = False,
) -> Result:
    """The CLI as a child process: forked from a zygote that imported torch already
    (tests/cli_zygote.py), or a fresh `python -m mergebuild` with `fresh=True`."""
    full_env = {**os.environ, "PYTHONPATH": str(SRC), **(env or {})}
    if cache is not None:
        full_env["MERGEBUILD_CACHE_DIR"] = str(cache)
    server = None if fresh else zygote()
    if server is not None:
        code, out, err = server.run([*map(str, args)], full_env, str(cwd) if cwd else None, timeout)
        return Result(code, out, err)
    p = subprocess.run(
        [sys.executable, "-m", "mergebuild", *map(str, args)],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return Result(p.returncode, p.stdout, p.stderr)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo models (SD1 key names, fp16, tiny dims), written once per test session."""
    from mergebuild.demo import write_demo_models

    d = tmp_path_factory.mktemp("models")
    write_demo_models(d, scale=SCALE)
    return d


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    return tmp_path / "cache"


@pytest.fixture
def workdir(tmp_path: Path, model_dir: Path) -> Path:
    """A recipe directory whose models/ holds copies of the demo models (safe to modify)."""
    import shutil

    w = tmp_path / "work"
    shutil.copytree(model_dir, w / "models")
    return w


SEED_OUT = Path("out/anything-nsfw-gape.safetensors")  # the seed example's one output


@dataclass(frozen=True)
class SeedBuild:
    """The seed example (examples/anything_nsfw_gape.yaml) built once: its cache (copy it
    before building into it) and the bytes of its output."""

    cache: Path
    output: bytes


def _build_seed(factory: pytest.TempPathFactory, model_dir: Path, *args: str) -> SeedBuild:
    base = factory.mktemp("seed")
    (base / "models").symlink_to(model_dir)
    recipe = base / "seed.yaml"
    recipe.write_text((EXAMPLES / "anything_nsfw_gape.yaml").read_text())
    r = run_cli(recipe, "-q", *args, cache=base / "cache")
    assert r.code == 0, r.err
    return SeedBuild(base / "cache", (base / SEED_OUT).read_bytes())


@pytest.fixture(scope="session")
def seed_build(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> SeedBuild:
    """Built once per session, not once per test: each CLI build costs seconds of imports.
    Outputs do not depend on the directory or the cache (test_sharing proves it), so these
    bytes are what any correct build of the seed example gives."""
    return _build_seed(tmp_path_factory, model_dir)


@pytest.fixture(scope="session")
def seed_prev_build(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> SeedBuild:
    """The seed example with its second alpha at 0.5: "the previous build" of fault tests."""
    return _build_seed(tmp_path_factory, model_dir, "--set", "anything_nsfw_gape.alpha=0.5")


def load_st(path: Path) -> dict:
    """Tensors as numpy arrays (bf16 as float32), via the safetensors library itself."""
    from safetensors.numpy import load_file

    return load_file(str(path))


# Long lists of variants where every case runs full CLI builds: the first N (in the order the
# test file lists them) run in `make test`; the rest are marked slow, so `make test-reliability`
# still runs every one. This keeps the default suite under ten minutes on two cores.
FAST_VARIANTS = {
    "test_hostile_metadata_never_breaks_show_extract": 5,
    "test_malformed_provenance_show_extract_and_build": 5,
    "test_ckpt_changed_mid_build_fails_cleanly": 4,
    "test_malformed_lock_fails_build_and_verify": 6,
    "test_dry_run_plans_10000_nodes": 1,
    "test_any_change_takes_the_normal_path": 4,
    "test_extract_output_never_replaces_a_model": 2,
    "test_every_method_runs_on_flux_whatever_the_key_spelling": 3,
}


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    seen: dict[str, int] = {}
    for item in items:
        name = getattr(item, "originalname", item.name)
        limit = FAST_VARIANTS.get(name)
        if limit is None:
            continue
        seen[name] = seen.get(name, 0) + 1
        if seen[name] > limit:
            item.add_marker(pytest.mark.slow)
