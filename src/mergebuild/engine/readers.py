"""Open an input model by file type: safetensors, or a .ckpt loaded without running its code.

`.ckpt` files are pickles, and unpickling can execute arbitrary code. They are loaded only with
torch's weights-only unpickler (tensors and plain containers). Old training checkpoints also
pickle pytorch-lightning callback objects; those few names are mapped to inert stand-ins
(their state is discarded) so the weights load without importing lightning. Any other global
is refused with its name — never retried with full unpickling.
"""

from __future__ import annotations

import re
import warnings
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mergebuild.engine.safetensors_io import SafetensorsSource, TensorInfo
from mergebuild.errors import BuildError

if TYPE_CHECKING:
    import torch

CKPT_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
LIGHTNING_PREFIXES = ("pytorch_lightning.", "lightning.pytorch.", "lightning_fabric.")
_UNSUPPORTED = re.compile(r"GLOBAL ([\w.]+)")
MAX_STANDINS = 32


class LegacyFormatWarning(UserWarning):
    pass


class _Inert(dict):
    """Stand-in for a pickled lightning object: accepts any state and keeps none of it."""

    def __setstate__(self, state: object) -> None:
        pass


class CheckpointSource:
    """A torch checkpoint's state dict, tensors memory-mapped when the file is zip-format."""

    def __init__(self, path: Path) -> None:
        self.path = path
        state = _find_state_dict(_safe_load(path), path)
        self.tensors: dict[str, torch.Tensor] = state
        self.metadata: dict[str, str] = {}

    def infos(self) -> dict[str, TensorInfo]:
        from mergebuild.engine.dtypes import from_torch

        return {k: TensorInfo(from_torch(t.dtype), tuple(t.shape)) for k, t in self.tensors.items()}

    def read_flat(self, key: str, lo: int, hi: int) -> torch.Tensor:
        t = self.tensors[key]
        if not t.is_contiguous():
            t = self.tensors[key] = t.contiguous()
        return t.reshape(-1)[lo:hi]

    def close(self) -> None:
        self.tensors = {}


def _safe_load(path: Path) -> Any:
    import pickle

    import torch

    is_zip = zipfile.is_zipfile(path)
    if not is_zip:
        warnings.warn(
            f"{path.name} is a legacy (non-zip) torch pickle: it is loaded fully into "
            "memory; convert it once with a `copy` node to a .safetensors file",
            LegacyFormatWarning,
            stacklevel=3,
        )
    standins: list[tuple[Any, str]] = []
    for _ in range(MAX_STANDINS):
        try:
            with torch.serialization.safe_globals(standins):
                return torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
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
                f"{path}: refused to load: not a weights-only checkpoint ({_first_line(e)})"
            ) from None
        except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as e:
            raise BuildError(
                f"{path}: not a readable torch checkpoint ({_first_line(e)})"
            ) from None
    raise BuildError(f"{path}: refused to load: too many unknown objects in the pickle")


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:200] if text else type(e).__name__


def _find_state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    import torch

    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise BuildError(f"{path}: checkpoint holds no state dict (found {type(obj).__name__})")
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not tensors:
        raise BuildError(f"{path}: checkpoint contains no tensors")
    for k, t in tensors.items():
        # a view (e.g. stride 0) can claim far more elements than the file stores: a 2 KB
        # file would otherwise make us allocate and write gigabytes
        need = t.numel() * t.element_size()
        have = t.untyped_storage().nbytes() - t.storage_offset() * t.element_size()
        if need > have:
            raise BuildError(
                f"{path}: tensor '{k}' claims {need} bytes but the file stores {max(have, 0)} "
                "for it (a crafted or damaged checkpoint)"
            )
    return tensors


def open_model(path: Path) -> SafetensorsSource | CheckpointSource:
    suffix = path.suffix.lower()
    if suffix in (".safetensors", ".sft"):
        return SafetensorsSource(path)
    if suffix in CKPT_SUFFIXES:
        return CheckpointSource(path)
    raise BuildError(
        f"{path}: unknown model format '{suffix}' (expected .safetensors or a torch .ckpt/.pt)"
    )
