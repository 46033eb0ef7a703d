"""ComfyUI's "scaled fp8" checkpoints: an fp8 weight with a float32 `scale_weight` beside it.

The real weight is fp8 × scale (domain.md §11). On read, such files are dequantized in float32
(what a merge must see, and what ComfyUI computes before using the weight); their scale and
marker tensors are hidden, so a merge never copies a scale that no longer matches its weight.
On write (`dtype: fp8_e4m3fn_scaled` on an output), each transformer weight matrix gets a
per-tensor scale amax/448 so the whole e4m3 range is used, and the file carries the
`scaled_fp8` marker ComfyUI looks for, so it loads where the scaled input loaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from mergebuild.engine.dtypes import FP8_MAX, cast, is_float
from mergebuild.engine.safetensors_io import Header, SafetensorsSource, TensorInfo
from mergebuild.errors import BuildError

if TYPE_CHECKING:
    import torch

SCALE = "scale_weight"
HIDDEN_SUFFIXES = (".scale_weight", ".scale_input")
MARKER = "scaled_fp8"  # an empty tensor whose dtype names the fp8 format
SCALED_DTYPE = "F8_E4M3"
OTHER_DTYPE = "BF16"  # tensors a scaled file keeps unscaled (biases, norms, encoders)


def scale_key(weight_key: str) -> str:
    return weight_key.removesuffix("weight") + SCALE


def is_scaled_file(keys: dict[str, object]) -> bool:
    return any(k.endswith(HIDDEN_SUFFIXES) for k in keys) or any(
        k == MARKER or k.endswith("." + MARKER) for k in keys
    )


def hidden(key: str) -> bool:
    return key.endswith(HIDDEN_SUFFIXES) or key == MARKER or key.endswith("." + MARKER)


class ScaledFp8Source(SafetensorsSource):
    """A scaled-fp8 safetensors file read as its dequantized float32 weights.

    Still a SafetensorsSource: byte ranges and hashing see the file's own bytes; only the
    tensors made from them are dequantized (`decode`)."""

    def __init__(self, path: Path, header: Header | None = None) -> None:
        super().__init__(path, header)
        tensors = self.header.tensors
        self.scales: dict[str, float] = {}
        for key, (info, _, _) in tensors.items():
            if not key.endswith("." + SCALE):
                continue
            weight = key.removesuffix(SCALE) + "weight"
            if weight not in tensors or not is_float(tensors[weight][0].dtype):
                continue  # a scale is hidden either way: it never reaches another file
            if info.nbytes // 4 != 1 or info.dtype != "F32":
                raise BuildError(
                    f"{path}: '{key}' is {info.dtype}{list(info.shape)}; only one float32 "
                    "scale per tensor is supported"
                )
            self.scales[weight] = float(self.read_stored(key, 0, 1)[0])

    def infos(self) -> dict[str, TensorInfo]:
        out = {}
        for k, (info, _, _) in self.header.tensors.items():
            if hidden(k):
                continue
            out[k] = TensorInfo("F32", info.shape) if k in self.scales else info
        return out

    def decode(self, key: str, stored: torch.Tensor) -> torch.Tensor:
        """fp8 × scale in float32 for a scaled weight (stored bytes are what gets hashed)."""
        scale = self.scales.get(key)
        if scale is None:
            return stored
        import torch

        return stored.to(torch.float32).mul_(torch.tensor(scale, dtype=torch.float32))


def scaled_layout(
    infos: dict[str, TensorInfo], root: str | None
) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """A scaled-fp8 output's tensors, and weight key → its scale key: the diffusion model's
    weight matrices in e4m3fn with a scale each, other float tensors in bf16, plus the marker."""
    from mergebuild.engine.compute import mergeable
    from mergebuild.sd.arch import component_of

    out: dict[str, TensorInfo] = {}
    scaled: dict[str, str] = {}
    for k, info in infos.items():
        if not mergeable(k, info.dtype):
            out[k] = info
        elif component_of(k, root) == "unet" and k.endswith(".weight") and len(info.shape) >= 2:
            out[k] = TensorInfo(SCALED_DTYPE, info.shape)
            scaled[k] = scale_key(k)
            out[scaled[k]] = TensorInfo("F32", ())
        else:
            out[k] = TensorInfo(OTHER_DTYPE, info.shape) if is_float(info.dtype) else info
    out[(root or "") + MARKER] = TensorInfo(SCALED_DTYPE, (0,))
    return out, scaled


def quantize(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp8 values, float32 scale): scale = amax / 448, so the largest magnitude lands on
    e4m3fn's largest finite value; an all-zero (or non-finite) tensor keeps scale 1. The
    clamp only absorbs the division's rounding (amax / scale may come out a hair above 448),
    so it is not reported."""
    import torch

    x = t.to(torch.float32)
    top = FP8_MAX[SCALED_DTYPE]
    amax = float(x.abs().max()) if x.numel() else 0.0
    scale = torch.tensor(amax, dtype=torch.float32) / torch.tensor(top, dtype=torch.float32)
    if not (0.0 < amax < float("inf")) or float(scale) == 0.0:
        scale = torch.tensor(1.0, dtype=torch.float32)
    q, _ = cast(x / scale, SCALED_DTYPE)
    return q, scale
