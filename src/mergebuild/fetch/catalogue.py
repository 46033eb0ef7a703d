"""Download sources by SHA-256, read from recipes or lock files: what `extract --sources` adds.

An output's provenance pins its inputs by SHA-256 only: where a file was downloaded from is
not part of what the output is (a mirror added to a recipe must not change its outputs'
bytes), so it is not recorded in them. To make an extracted recipe self-contained, `extract
--sources FILE` takes the `urls` / `hf` of every model in FILE (a recipe or a `.lock`, both
have `models: {name: {sha256, urls, hf}}`) whose full SHA-256 matches an extracted input. FILE
is foreign data like the provenance: read bounded, every source checked as in a recipe, and
a bad entry skipped with a warning.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from mergebuild.errors import BuildError, MergebuildError
from mergebuild.fetch.sources import MAX_URLS, hf_problem, url_problem
from mergebuild.textfile import LOCK_CAP, read_capped

SHA256 = re.compile(r"[0-9a-fA-F]{64}\Z")


def read_sources(path: Path) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """sha256 → {"urls": [...], "hf": "..."} of the models in `path`, and warnings."""
    from mergebuild.recipe.yamlpos import load_yaml

    try:
        data, _ = load_yaml(read_capped(path, LOCK_CAP, "sources file"), str(path))
    except OSError as e:
        raise BuildError(f"--sources {path}: {e.strerror or e}") from None
    except MergebuildError as e:
        raise BuildError(f"--sources {path}: {e}") from None
    models = data.get("models") if isinstance(data, dict) else None
    if not isinstance(models, dict):
        raise BuildError(f"--sources {path}: no 'models:' mapping (give a recipe or a lock)")
    found: dict[str, dict[str, Any]] = {}
    warnings: list[str] = []
    for name, entry in models.items():
        if not isinstance(entry, dict) or not ({"urls", "hf"} & set(entry)):
            continue
        sha, urls, hf = entry.get("sha256"), entry.get("urls"), entry.get("hf")
        why = None
        if not isinstance(sha, str) or not SHA256.match(sha):
            why = "no full sha256"
        elif urls is not None and (not isinstance(urls, list) or not 0 < len(urls) <= MAX_URLS):
            why = f"'urls' must be a list of 1 to {MAX_URLS} URLs"
        else:
            why = next(filter(None, map(url_problem, urls or [])), None)
            why = why or (hf_problem(hf) if hf is not None else None)
        if why is not None:
            warnings.append(f"--sources {path}: model {str(name)[:64]!r} skipped: {why}")
            continue
        found[sha.lower()] = {
            **({"urls": list(urls)} if urls else {}),
            **({"hf": hf} if hf is not None else {}),
        }
    return found, warnings


def attach_sources(doc: dict[str, Any], sources: dict[str, dict[str, Any]]) -> list[str]:
    """Add the known sources to the models of an extracted recipe; the names given some."""
    named = []
    for name, entry in doc.get("models", {}).items():
        extra = sources.get(str(entry.get("sha256", "")))
        if extra:
            entry.update(extra)
            named.append(name)
    return named
