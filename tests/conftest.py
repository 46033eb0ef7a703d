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

SRC = Path(__file__).resolve().parents[1] / "src"
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(SRC))

SCALE = 1 / 64  # small dims: a whole SD1 model is ~1 MB


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
) -> Result:
    full_env = {**os.environ, "PYTHONPATH": str(SRC), **(env or {})}
    if cache is not None:
        full_env["MERGEBUILD_CACHE_DIR"] = str(cache)
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


def load_st(path: Path) -> dict:
    """Tensors as numpy arrays (bf16 as float32), via the safetensors library itself."""
    from safetensors.numpy import load_file

    return load_file(str(path))
