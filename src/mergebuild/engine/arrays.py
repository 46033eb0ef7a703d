"""Tensor values as numpy arrays where torch is not needed, and torch on demand where it is.

Why: importing torch costs 1.5-2 s of one core and ~250 MB before the first key can compute,
and a pass whose every key is a plain copy or a float16 merge with compiled loops (fp16
models: add_difference and its sweeps) needs none of it. Such a pass reads keys into numpy
arrays (executor.py); any step that does need torch converts them with `torch.from_numpy`
(no copy) and imports torch then, so results never depend on which way a value went.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

# safetensors dtypes numpy holds natively (no bfloat16, no fp8)
NP_NAMES = {
    "BOOL": "bool", "U8": "uint8", "I8": "int8", "I16": "int16", "U16": "uint16",
    "F16": "float16", "I32": "int32", "U32": "uint32", "F32": "float32", "F64": "float64",
    "I64": "int64", "U64": "uint64",
}  # fmt: skip

_local = threading.local()  # per thread: its torch thread count before ensure_torch set it
_ahead_error: list[BaseException] = []  # how import_torch_ahead failed, if it did


def import_torch_ahead() -> None:
    """`import torch` ahead of its first use, on a thread of its own (a pass being set up).
    A failure is kept: a failed import can leave parts of torch loaded, and importing it again
    then fails differently, so ensure_torch reports this first error."""
    try:
        import torch  # noqa: F401
    except Exception as e:
        _ahead_error.append(e)


def is_array(x: object) -> bool:
    import numpy as np

    return isinstance(x, np.ndarray)


def ensure_torch() -> Any:
    """torch, imported if need be, set to one intra-op thread on the calling thread.

    Once per thread: MKL and OpenMP keep the count per thread (executor._one_torch_thread),
    and a reduction split over another count of threads can give other bits."""
    try:
        import torch
    except Exception as e:
        if _ahead_error:
            raise _ahead_error[0] from e
        raise

    if not hasattr(_local, "threads"):
        _local.threads = torch.get_num_threads()
        torch.set_num_threads(1)
    return torch


def restore_threads() -> None:
    """Undo ensure_torch's thread count on the calling thread (a pass's driver, at its end)."""
    threads = getattr(_local, "threads", None)
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
        del _local.threads


def as_tensor(x: Any) -> Any:
    """x as a torch tensor sharing its memory (x itself when it is one, or None)."""
    if not is_array(x):
        return x
    return ensure_torch().from_numpy(x)


def as_tensors(xs: Sequence[Any]) -> list[Any]:
    return [as_tensor(x) for x in xs]


def numel(x: Any) -> int:
    """Elements of a tensor or an array."""
    return int(x.size) if is_array(x) else int(x.numel())
