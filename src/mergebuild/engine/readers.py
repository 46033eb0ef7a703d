"""Open an input model by file type: safetensors, or a .ckpt loaded without running its code.

`.ckpt` files are pickles, and unpickling can execute arbitrary code. They are loaded only with
torch's weights-only unpickler (tensors and plain containers). Old training checkpoints also
pickle pytorch-lightning callback objects; those few names are mapped to inert stand-ins
(their state is discarded) so the weights load without importing lightning. Any other global
is refused with its name — never retried with full unpickling, and no message ever suggests it.
"""

from __future__ import annotations

import pickle
import re
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mergebuild.engine.safetensors_io import SafetensorsSource, TensorInfo, shape_problem
from mergebuild.errors import BuildError

if TYPE_CHECKING:
    import torch

    from mergebuild.engine.ckpt_zip import TensorRef, ZipArchive

CKPT_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
LIGHTNING_PREFIXES = ("pytorch_lightning.", "lightning.pytorch.", "lightning_fabric.")
_UNSUPPORTED = re.compile(r"GLOBAL ([\w.]+)")
MAX_STANDINS = 32
# torch's advice in its refusals: to load with weights_only=False, or to allowlist globals
# "if you trust" the file. Neither may reach a mergebuild message.
_ADVICE = re.compile(r"weights_only|trust|safe_globals|file an issue|documentation", re.I)
_ALLOWLIST = re.compile(r",?\s*(?:or )?(?:types|classes) allowlisted via `add_safe_globals`,?")


class LegacyFormatWarning(UserWarning):
    pass


class _Inert(dict):
    """Stand-in for a pickled lightning object: accepts any state and keeps none of it."""

    def __setstate__(self, state: object) -> None:
        pass


class CheckpointSource:
    """A torch checkpoint's state dict. Zip-format files (all torch.save has written since
    torch 1.6) are read tensor by tensor with `pread` (ckpt_zip.py), never memory-mapped;
    legacy pickles are loaded whole."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.metadata: dict[str, str] = {}
        self.archive: ZipArchive | None = None
        self.refs: dict[str, TensorRef] = {}
        self.swap = False
        self.tensors: dict[str, torch.Tensor] = {}  # legacy files only: held in memory
        if zipfile.is_zipfile(path):
            self._open_zip()
        elif _starts_like_zip(path):
            raise BuildError(
                f"{path}: not a readable torch checkpoint: a zip archive without its central "
                "directory (truncated?)"
            )
        else:
            warnings.warn(
                f"{path.name} is a legacy (non-zip) torch pickle: it is loaded fully into "
                "memory; convert it once with a `copy` node to a .safetensors file",
                LegacyFormatWarning,
                stacklevel=3,
            )
            self.tensors = _find_state_dict(_legacy_load(path), path)
            _check_in_memory(self.tensors, path)

    def _open_zip(self) -> None:
        from mergebuild.engine.ckpt_zip import (
            ZipArchive,
            byteorder,
            needs_swap,
            tensor_ref,
            unpickle,
        )

        self.archive = archive = ZipArchive(self.path)
        try:
            self.swap = needs_swap(byteorder(archive))
            obj, backing = _with_standins(self.path, lambda ok: unpickle(archive, ok))
            state = _find_state_dict(obj, self.path)
            self.refs = {k: tensor_ref(archive, k, t, backing) for k, t in state.items()}
        except BaseException:
            self.close()
            raise

    def infos(self) -> dict[str, TensorInfo]:
        from mergebuild.engine.dtypes import from_torch

        if self.archive is not None:
            return {k: r.info for k, r in self.refs.items()}
        return {k: TensorInfo(from_torch(t.dtype), tuple(t.shape)) for k, t in self.tensors.items()}

    def read_flat(self, key: str, lo: int, hi: int) -> torch.Tensor:
        if self.archive is not None:
            from mergebuild.engine.ckpt_zip import read_flat

            return read_flat(self.archive, self.refs[key], lo, hi, self.swap)
        t = self.tensors[key]
        if not t.is_contiguous():
            t = self.tensors[key] = t.contiguous()
        return t.reshape(-1)[lo:hi]

    def close(self) -> None:
        self.tensors, self.refs = {}, {}
        if self.archive is not None:
            self.archive.close()
            self.archive = None


def _starts_like_zip(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"PK\x03\x04"
    except OSError as e:
        raise BuildError(f"cannot read {path}: {e.strerror}") from None


def _legacy_load(path: Path) -> Any:
    import torch

    def load(ok: list[Any]) -> Any:
        with torch.serialization.safe_globals(ok):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=False)

    return _with_standins(path, load)


def _with_standins(path: Path, load: Callable[[list[Any]], Any]) -> Any:
    """`load(allowed)`, retried with an inert stand-in for each lightning name it refuses.
    Any other refused global, or any other failure, is one message."""
    standins: list[tuple[Any, str]] = []
    for _ in range(MAX_STANDINS):
        try:
            with warnings.catch_warnings():
                # torch asks to "file an issue" for protocols other than 2: not for our users
                warnings.filterwarnings("ignore", message="Detected pickle protocol")
                return load(standins)
        except BuildError:
            raise
        except pickle.UnpicklingError as e:
            m = _UNSUPPORTED.search(str(e))
            name = m.group(1) if m else None
            if name and name.startswith(LIGHTNING_PREFIXES):
                standins.append((type(name.rsplit(".", 1)[1], (_Inert,), {}), name))
                continue
            if name:
                raise BuildError(
                    f"{path}: refused to load: the pickle references '{name}', which is not a "
                    "tensor or plain container. Loading it could run code from the file. If you "
                    "trust it, convert it to .safetensors with another tool."
                ) from None
            raise BuildError(
                f"{path}: refused to load: not a weights-only checkpoint ({_reason(e)})"
            ) from None
        except RecursionError:
            raise BuildError(
                f"{path}: not a readable torch checkpoint (nested too deeply)"
            ) from None
        except Exception as e:  # torch's unpickler on hostile bytes: any failure is a refusal
            raise BuildError(f"{path}: not a readable torch checkpoint ({_reason(e)})") from None
    raise BuildError(f"{path}: refused to load: too many unknown objects in the pickle")


def _reason(e: BaseException) -> str:
    """The defect torch names, without its advice: torch suggests `weights_only=False`, which
    would run the file's code, and mergebuild never repeats that."""
    text = str(e)
    m = re.search(r"WeightsUnpickler error:\s*(.*?)\s*(?:Check the documentation|$)", text, re.S)
    if m:
        text = m.group(1)
    sentences = re.split(r"(?<=\.)\s+|\n+", text.strip())
    sentences = [_ALLOWLIST.sub("", s) for s in sentences]
    kept = " ".join(s for s in sentences if s and not _ADVICE.search(s))
    kept = kept.split(" Exception raised from ")[0]  # torch's C++ frames follow
    if not isinstance(e, (pickle.UnpicklingError, RuntimeError)):
        kept = f"{type(e).__name__}: {kept}" if kept else type(e).__name__
    return kept[:200] or type(e).__name__


def _find_state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    import torch

    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise BuildError(f"{path}: checkpoint holds no state dict (found {type(obj).__name__})")
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not tensors:
        raise BuildError(f"{path}: checkpoint contains no tensors")
    return tensors


def _check_in_memory(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """A loaded legacy file's tensors: types and sizes mergebuild can store and read."""
    from mergebuild.engine.dtypes import from_torch

    for k, t in tensors.items():
        try:
            from_torch(t.dtype)
        except ValueError:
            raise BuildError(
                f"{path}: tensor '{k}' has dtype {t.dtype}, which mergebuild cannot store"
            ) from None
        why = shape_problem(tuple(t.shape), t.element_size())
        if why:
            raise BuildError(f"{path}: tensor '{k}' {why}")
        # a view (e.g. stride 0) can claim far more elements than the file stores: a 2 KB
        # file would otherwise make us allocate and write gigabytes
        need = t.numel() * t.element_size()
        have = t.untyped_storage().nbytes() - t.storage_offset() * t.element_size()
        if need > have:
            raise BuildError(
                f"{path}: tensor '{k}' claims {need} bytes but the file stores {max(have, 0)} "
                "for it (a crafted or damaged checkpoint)"
            )


def open_model(path: Path, stored: bool = False) -> SafetensorsSource | CheckpointSource:
    """The model at `path` as a merge reads it; `stored=True`: a safetensors file's tensors as
    stored (a scaled fp8 file not dequantized: for byte-for-byte copies)."""
    suffix = path.suffix.lower()
    if suffix in (".safetensors", ".sft"):
        from mergebuild.engine.safetensors_io import read_header
        from mergebuild.engine.scaled_fp8 import ScaledFp8Source, is_scaled_file

        header = read_header(path)  # read once, whichever reader gets it
        if stored or not is_scaled_file(header.tensors):
            return SafetensorsSource(path, header)
        return ScaledFp8Source(path, header)  # fp8 × scale_weight: dequantized as it is read
    if suffix in CKPT_SUFFIXES:
        return CheckpointSource(path)
    raise BuildError(
        f"{path}: unknown model format '{suffix}' (expected .safetensors or a torch .ckpt/.pt)"
    )
