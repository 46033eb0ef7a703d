"""Find the file behind each input model: by path, by SHA-256 / AutoV2 prefix, or both.

A shared recipe names models by content, because file names differ between machines. A model
with a hash is looked up at its `path` first, then in the search paths (the recipe's
`search_paths`, `--models DIR`, `$MERGEBUILD_MODEL_PATH`); every candidate is hashed once and
remembered (hashing.HashMemo), so the index of a models folder costs one read per file, ever.
A file found at `path` whose hash differs from the pin is refused: it is a different model.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from mergebuild.atomic import TMP_PREFIX
from mergebuild.errors import BuildError
from mergebuild.hashing import FileHashes, HashMemo, stat_signature
from mergebuild.recipe.model import ModelInput, Recipe

ENV_VAR = "MERGEBUILD_MODEL_PATH"
MODEL_SUFFIXES = (".safetensors", ".sft", ".ckpt", ".pt", ".pth", ".bin")


@dataclass(frozen=True)
class ResolvedInput:
    name: str
    path: Path
    hashes: FileHashes
    signature: list[int]  # stat when hashed: a change during the build is detected
    memoized: bool  # False: the bytes were read to hash them now


def search_dirs(recipe: Recipe, extra: list[Path] | None = None) -> list[Path]:
    """Recipe's own search paths first, then --models, then the environment."""
    env = [Path(p) for p in os.environ.get(ENV_VAR, "").split(os.pathsep) if p]
    dirs: list[Path] = []
    for d in [*recipe.search_paths, *(extra or []), *env]:
        d = Path(os.path.abspath(os.path.expanduser(d)))
        if d not in dirs:
            dirs.append(d)
    return dirs


def _candidates(dirs: list[Path], preferred_name: str | None) -> list[Path]:
    found: list[Path] = []
    for d in dirs:
        if not d.is_dir():
            continue
        for p in sorted(d.rglob("*")):
            ok = p.suffix.lower() in MODEL_SUFFIXES and not p.name.startswith(TMP_PREFIX)
            if ok and p.is_file() and p not in found:
                found.append(p)
    if preferred_name:  # a file with the expected name is most likely the one: hash it first
        found.sort(key=lambda p: p.name != preferred_name)
    return found


def resolve_model(model: ModelInput, memo: HashMemo, dirs: list[Path]) -> ResolvedInput:
    pin = model.sha256
    if model.path is not None and model.path.is_file():
        hashes, memoized = memo.hashes(model.path)
        if pin and not hashes.sha256.startswith(pin):
            raise BuildError(
                f"model '{model.name}': {model.path} has sha256 {hashes.sha256}, "
                f"but the recipe pins {pin} — this is a different file (was it replaced?)"
            )
        return ResolvedInput(
            model.name, model.path, hashes, stat_signature(model.path.stat()), memoized
        )
    if not pin:
        if model.path is not None and model.path.exists():
            raise BuildError(f"model '{model.name}': input model is not a file: {model.path}")
        raise BuildError(f"model '{model.name}': input model not found: {model.path}")
    where = ([f"{model.path} (does not exist)"] if model.path is not None else []) + [
        str(d) for d in dirs
    ]
    candidates = _candidates(dirs, model.path.name if model.path else None)
    matches: dict[str, tuple[Path, FileHashes, bool]] = {}
    for path in candidates:
        try:
            hashes, memoized = memo.hashes(path)
        except BuildError:
            continue
        if hashes.sha256.startswith(pin):
            matches.setdefault(hashes.sha256, (path, hashes, memoized))
            if len(pin) == 64:
                break  # a full hash cannot be ambiguous
    if not matches:
        looked = "\n    ".join(where) or "(no search paths: add search_paths, --models DIR "
        looked += "" if where else f"or ${ENV_VAR})"
        raise BuildError(
            f"model '{model.name}' (sha256 {pin}) not found; looked in "
            f"({len(candidates)} model files hashed):\n    {looked}"
        )
    if len(matches) > 1:
        listing = "\n    ".join(f"{sha}  {m[0]}" for sha, m in sorted(matches.items()))
        raise BuildError(
            f"model '{model.name}': hash prefix {pin} matches different files; "
            f"pin more digits of the sha256:\n    {listing}"
        )
    path, hashes, memoized = next(iter(matches.values()))
    return ResolvedInput(model.name, path, hashes, stat_signature(path.stat()), memoized)


def resolve_models(
    recipe: Recipe, names: list[str], memo: HashMemo, extra_dirs: list[Path] | None = None
) -> dict[str, ResolvedInput]:
    """Resolve every named model; report all that fail at once."""
    dirs = search_dirs(recipe, extra_dirs)
    out: dict[str, ResolvedInput] = {}
    problems: list[str] = []

    def resolve(name: str) -> ResolvedInput | str:
        try:
            return resolve_model(recipe.models[name], memo, dirs)
        except BuildError as e:
            return str(e)

    # Models given by an existing path are hashed at once, one per core (SHA-256 is CPU-bound
    # and frees the GIL), each distinct file once. The rest (a second name for the same file,
    # a search by sha256) then resolves in order and finds those hashes memoized.
    first: dict[Path, str] = {}
    for name in names:
        path = recipe.models[name].path
        if path is not None and path.is_file():
            first.setdefault(path.resolve(), name)
    early = list(first.values())
    workers = max(1, min(len(early), os.cpu_count() or 1))
    with ThreadPoolExecutor(workers, thread_name_prefix="hash") as pool:
        done = dict(zip(early, pool.map(resolve, early), strict=True))
    for name in names:
        got = done[name] if name in done else resolve(name)
        if isinstance(got, str):
            problems.append(got)
        else:
            out[name] = got
    if len(problems) == 1:
        raise BuildError(problems[0])
    if problems:
        raise BuildError("cannot resolve input models:\n  " + "\n  ".join(problems))
    return out
