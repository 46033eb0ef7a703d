"""Find the file behind each input model: by path, by SHA-256 / AutoV2 prefix, or both.

A shared recipe names models by content, because file names differ between machines. A model
with a hash is looked up at its `path` first, then in the search paths (the recipe's
`search_paths`, `--models DIR`, `$MERGEBUILD_MODEL_PATH`); every candidate is hashed once and
remembered (hashing.HashMemo), so the index of a models folder costs one read per file, ever.
A file found at `path` whose hash differs from the pin is refused: it is a different model.

A search path may be wrong or hostile (`search_paths: [/]` in a downloaded recipe), so the walk
is bounded: it stays on the search path's filesystem (like `find -xdev`), never enters a
virtual filesystem (/proc, /sys, /dev…) nor follows a symlinked directory (as before: no
loops), looks only at files with a model suffix and a plausible size, and stops at a number
of directories / entries per search path and of files hashed per model (environment
variables below), saying which search path to narrow. A recipe's own search paths may not be
a filesystem root, the home directory or a virtual filesystem at all (recipe/load.py).
"""

from __future__ import annotations

import functools
import os
import stat
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from mergebuild.atomic import TMP_PREFIX
from mergebuild.errors import BuildError
from mergebuild.fetch.store import stored_model
from mergebuild.hashing import FileHashes, HashMemo, stat_signature
from mergebuild.recipe.model import ModelInput, Recipe
from mergebuild.textfile import JSON_CAP, read_capped

ENV_VAR = "MERGEBUILD_MODEL_PATH"
MODEL_SUFFIXES = (".safetensors", ".sft", ".ckpt", ".pt", ".pth", ".bin")
# walk bounds, overridable through the environment (a huge models tree, or a test)
MAX_DIRS_VAR, MAX_DIRS = "MERGEBUILD_SEARCH_MAX_DIRS", 20_000  # per search path
MAX_FILES_VAR, MAX_FILES = "MERGEBUILD_SEARCH_MAX_FILES", 200_000  # entries seen, per path
MAX_HASHED_VAR, MAX_HASHED = "MERGEBUILD_SEARCH_MAX_HASHED", 1_000  # files read, per model
MAX_MODEL_SIZE = 256 << 30  # larger "files" are sparse or virtual (/proc/kcore), not models
VIRTUAL_FS = frozenset(
    {
        "proc", "sysfs", "devtmpfs", "devpts", "cgroup", "cgroup2", "securityfs", "debugfs",
        "tracefs", "configfs", "fusectl", "pstore", "bpf", "mqueue", "hugetlbfs", "autofs",
        "binfmt_misc", "efivarfs", "selinuxfs", "rpc_pipefs", "nsfs",
    }
)  # fmt: skip
VIRTUAL_ROOTS = ("/proc", "/sys", "/dev")  # where there is no /proc/self/mountinfo


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


def _limit(var: str, default: int) -> int:
    try:
        return max(1, int(os.environ.get(var, default)))
    except ValueError:
        return default


@functools.lru_cache(maxsize=1)
def _mounts() -> tuple[tuple[str, str, int], ...]:
    """(mount point, fs type, st_dev) of every mount, from /proc/self/mountinfo (Linux)."""
    try:
        text = read_capped("/proc/self/mountinfo", JSON_CAP, "mount table").decode(errors="replace")
    except OSError:
        return ()
    out = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        fields, rest = left.split(), right.split()
        if not sep or len(fields) < 5 or not rest:
            continue
        try:
            major, minor = (int(x) for x in fields[2].split(":"))
            point = fields[4].encode().decode("unicode_escape")  # `\040` is a space
        except ValueError:
            continue
        out.append((point, rest[0], os.makedev(major, minor)))
    return tuple(out)


def _virtual_devices() -> frozenset[int]:
    return frozenset(dev for _, fs, dev in _mounts() if fs in VIRTUAL_FS)


def virtual_fs(path: Path | str) -> str | None:
    """The type of the virtual filesystem `path` lies on (`proc`, `sysfs`…), else None."""
    real = os.path.realpath(path)
    mounts = _mounts()
    if not mounts:
        hit = [r for r in VIRTUAL_ROOTS if real == r or real.startswith(r + "/")]
        return hit[0].strip("/") if hit else None
    best, kind = "", ""
    for point, fs, _ in mounts:
        inside = real == point or real.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, kind = point, fs
    return kind if kind in VIRTUAL_FS else None


def too_broad(path: Path) -> str | None:
    """Why `path` is no place for a recipe to search for models (None: it may)."""
    real = Path(os.path.realpath(path))
    if real.parent == real:
        return "the filesystem root"
    try:
        home = Path(os.path.realpath(Path.home()))
    except (RuntimeError, KeyError):
        home = None
    if home is not None and home == real:
        return "the home directory"
    if home is not None and home.is_relative_to(real):
        return f"{real}, which holds the home directory"
    fs = virtual_fs(real)
    return f"on a virtual filesystem ({fs})" if fs else None


@dataclass
class _Walk:
    files: list[Path]
    note: str | None = None  # why the walk is incomplete, for the user
    capped: bool = False  # a bound stopped it: worth a warning even when the model is found


def walk_models(root: Path) -> _Walk:
    """Files under `root` that may be models, sorted; bounded as the module doc says."""
    try:
        top = os.stat(root)
    except OSError:
        return _Walk([])
    if not stat.S_ISDIR(top.st_mode):
        return _Walk([])
    fs = virtual_fs(root)
    if fs:
        return _Walk([], f"{root} was skipped: it is a virtual filesystem ({fs})")
    max_dirs, max_files = _limit(MAX_DIRS_VAR, MAX_DIRS), _limit(MAX_FILES_VAR, MAX_FILES)
    virtual = _virtual_devices()
    seen = {(top.st_dev, top.st_ino)}
    stack, found = [str(root)], []
    dirs = entries = 0
    other_fs = 0
    while stack:
        dirs += 1
        if dirs > max_dirs:
            return _Walk(sorted(found), _capped(root, f"{max_dirs:,} folders", MAX_DIRS_VAR), True)
        try:
            with os.scandir(stack.pop()) as it:
                listing = sorted(it, key=lambda e: e.name, reverse=True)
        except OSError:
            continue
        entries += len(listing)
        if entries > max_files:
            note = _capped(root, f"{max_files:,} entries", MAX_FILES_VAR)
            return _Walk(sorted(found), note, True)
        for e in listing:
            try:
                if e.is_dir(follow_symlinks=False):
                    st = e.stat(follow_symlinks=False)
                    if st.st_dev != top.st_dev:
                        other_fs += 1  # a mount point: another disk, /proc, a network share
                    elif (st.st_dev, st.st_ino) not in seen:  # a bind mount of an ancestor
                        seen.add((st.st_dev, st.st_ino))
                        stack.append(e.path)
                    continue
                if not e.name.lower().endswith(MODEL_SUFFIXES) or e.name.startswith(TMP_PREFIX):
                    continue
                st = e.stat()  # a symlinked model file is followed; a symlinked folder is not
            except OSError:
                continue
            regular = stat.S_ISREG(st.st_mode) and st.st_dev not in virtual
            if regular and 0 < st.st_size <= MAX_MODEL_SIZE:
                found.append(Path(e.path))
    note = None
    if other_fs:
        note = (
            f"{root}: {other_fs} folder(s) on other filesystems were not searched "
            "(add them with --models DIR)"
        )
    return _Walk(sorted(found), note)


def _capped(root: Path, what: str, var: str) -> str:
    return (
        f"the search in {root} stopped after {what}: give the folder that holds the models "
        f"instead (--models DIR, or search_paths in the recipe), or raise ${var}"
    )


def _candidates(
    dirs: list[Path], preferred_name: str | None, walks: dict[Path, _Walk] | None = None
) -> tuple[list[Path], list[_Walk]]:
    """Candidate files of every search path (each walked once per `walks`), and the walks
    that have something to say."""
    walks = {} if walks is None else walks
    found: list[Path] = []
    seen: set[Path] = set()
    noted: list[_Walk] = []
    for d in dirs:
        if d not in walks:
            walks[d] = walk_models(d)
        w = walks[d]
        found += [p for p in w.files if p not in seen]
        seen.update(w.files)
        if w.note:
            noted.append(w)
    if preferred_name:  # a file with the expected name is most likely the one: hash it first
        found.sort(key=lambda p: p.name != preferred_name)
    return found, noted


def resolve_model(
    model: ModelInput,
    memo: HashMemo,
    dirs: list[Path],
    walks: dict[Path, _Walk] | None = None,
    cache_root: Path | None = None,
) -> ResolvedInput:
    pin = model.sha256
    fs = virtual_fs(model.path) if model.path is not None else None
    if fs:
        raise BuildError(
            f"model '{model.name}': {model.path} is on a virtual filesystem ({fs}), not a model"
        )
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
    stored = stored_model(cache_root, pin) if cache_root is not None else None
    if stored is not None:  # downloaded before (fetch/): named by its hash, checked again
        hashes, memoized = memo.hashes(stored)
        if hashes.sha256 == pin:
            sig = stat_signature(stored.stat())
            return ResolvedInput(model.name, stored, hashes, sig, memoized)
    where = ([f"{model.path} (does not exist)"] if model.path is not None else []) + [
        str(d) for d in dirs
    ]
    candidates, noted = _candidates(dirs, model.path.name if model.path else None, walks)
    notes = [w.note for w in noted if w.note]
    capped = [w.note for w in noted if w.note and w.capped]  # warned about even when found
    matches: dict[str, tuple[Path, FileHashes, bool]] = {}
    max_hashed, hashed = _limit(MAX_HASHED_VAR, MAX_HASHED), 0
    for i, path in enumerate(candidates):
        if hashed >= max_hashed:
            stop = (
                f"stopped after hashing {hashed:,} files ({len(candidates) - i:,} not hashed): "
                f"narrow the search paths, or raise ${MAX_HASHED_VAR}"
            )
            notes.append(stop)
            capped.append(stop)
            break
        try:
            hashes, memoized = memo.hashes(path)
        except BuildError:
            continue
        hashed += not memoized
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
            + "".join(f"\n  note: {n}" for n in notes)
        )
    for n in capped:
        warnings.warn(f"model '{model.name}': {n}", stacklevel=2)
    if len(matches) > 1:
        listing = "\n    ".join(f"{sha}  {m[0]}" for sha, m in sorted(matches.items()))
        raise BuildError(
            f"model '{model.name}': hash prefix {pin} matches different files; "
            f"pin more digits of the sha256:\n    {listing}"
        )
    path, hashes, memoized = next(iter(matches.values()))
    return ResolvedInput(model.name, path, hashes, stat_signature(path.stat()), memoized)


def resolve_models(
    recipe: Recipe,
    names: list[str],
    memo: HashMemo,
    extra_dirs: list[Path] | None = None,
    cache_root: Path | None = None,
) -> dict[str, ResolvedInput]:
    """Resolve every named model; report all that fail at once."""
    dirs = search_dirs(recipe, extra_dirs)
    out: dict[str, ResolvedInput] = {}
    problems: list[str] = []
    walks: dict[Path, _Walk] = {}  # each search path is walked once per build

    def resolve(name: str) -> ResolvedInput | str:
        try:
            return resolve_model(recipe.models[name], memo, dirs, walks, cache_root)
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
