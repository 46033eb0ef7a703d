"""safetensors dtype names: sizes, float-ness, widening, and (lazily) their torch dtypes."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

ITEMSIZE = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4, "F64": 8, "I64": 8, "U64": 8,
}  # fmt: skip

# safetensors' own Dtype enum order: save_file lays tensors out by descending rank, then name.
RANK = {name: i for i, name in enumerate(
    ["BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "I16", "U16", "F16", "BF16",
     "I32", "U32", "F32", "F64", "I64", "U64"]
)}  # fmt: skip

FLOATS = {"F16", "BF16", "F32", "F64", "F8_E5M2", "F8_E4M3"}

# recipe dtype names → safetensors names
RECIPE_TO_ST = {
    "fp16": "F16", "bf16": "BF16", "fp32": "F32",
    "fp8_e4m3fn": "F8_E4M3", "fp8_e5m2": "F8_E5M2",
    "fp8_e4m3fn_scaled": "F8_E4M3",  # plus a per-tensor scale_weight (engine/fp8.py)
}  # fmt: skip

# largest finite value of each fp8 format: what values beyond its range are clamped to
FP8_MAX = {"F8_E4M3": 448.0, "F8_E5M2": 57344.0}


def is_float(dt: str) -> bool:
    return dt in FLOATS


def widest(dtypes: set[str]) -> str:
    """Smallest float dtype that holds every given float dtype exactly (F16 + BF16 → F32)."""
    floats = dtypes & FLOATS
    if len(floats) == 1:
        return next(iter(floats))
    if "F64" in floats:
        return "F64"
    fp8 = {"F8_E5M2", "F8_E4M3"}
    for half in ("F16", "BF16"):
        if floats <= {half, *fp8}:
            return half
    return "F32"


def cast(t: torch.Tensor, dt: str) -> tuple[torch.Tensor, int]:
    """`t` in safetensors dtype `dt`, and how many values were beyond an fp8 format's range.

    Why clamp by hand: torch saturates float32 → e4m3fn but overflows float32 → e5m2 to inf,
    and other tools differ again; a merged model must never gain inf, so every fp8 cast
    clamps to the largest finite value (NaN stays NaN) and counts what it clamped."""
    want = to_torch(dt)
    if t.dtype == want:
        return t, 0
    top = FP8_MAX.get(dt)
    if top is None:
        return t.to(want), 0
    import torch

    if t.numel() == 0:
        return t.to(want), 0
    lo, hi = torch.aminmax(t)  # one pass, no temporary: most tensors are within range
    if -top <= float(lo) and float(hi) <= top:
        return t.to(want), 0
    x = t.float()  # `t` itself when float32: other sinks share it, so never clamp in place
    over = int(torch.count_nonzero(x.abs() > top))
    return x.clamp(-top, top).to(want), over


def to_torch(dt: str) -> torch.dtype:
    import torch

    return {
        "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16,
        "U16": torch.uint16, "F16": torch.float16, "BF16": torch.bfloat16, "I32": torch.int32,
        "U32": torch.uint32, "F32": torch.float32, "F64": torch.float64, "I64": torch.int64,
        "U64": torch.uint64, "F8_E5M2": torch.float8_e5m2, "F8_E4M3": torch.float8_e4m3fn,
    }[dt]  # fmt: skip


def from_torch(dtype: torch.dtype) -> str:

    for name in ITEMSIZE:
        if to_torch(name) == dtype:
            return name
    raise ValueError(f"dtype {dtype} cannot be stored in safetensors")
