"""Open an input model by file type."""

from __future__ import annotations

from pathlib import Path

from mergebuild.engine.safetensors_io import SafetensorsSource
from mergebuild.errors import BuildError


def open_model(path: Path) -> SafetensorsSource:
    if path.suffix.lower() in (".safetensors", ".sft"):
        return SafetensorsSource(path)
    raise BuildError(f"{path}: unsupported model format '{path.suffix}' (use .safetensors)")
