"""extract_lora: a LoRA from the difference of two checkpoints, module by module (kohya's
`extract_lora_from_models`): ΔW = a − base in float32, conv kernels flattened to (out, in·k·k),
U, S, Vh = SVD(ΔW); up = U[:, :r]·S[:r], down = Vh[:r]; both clamped to the `clamp_quantile`
quantile of their values; alpha = r, so the LoRA's scale is 1.

Deterministic: one LAPACK SVD per module on one thread (the engine's pass), then a fixed sign
per component (the largest-magnitude entry of each row of `down` is positive), so the same
inputs give the same bytes whatever `-j` or chunking. The down and up factors of a module are
two output keys computed from one SVD, kept in a small cache between them.
"""

from __future__ import annotations

import math
import re
import threading
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

from mergebuild.errors import BuildError

if TYPE_CHECKING:
    import torch

ROLES = (".lora_down.weight", ".lora_up.weight", ".alpha")
_QKV = re.compile(r"_self_attn_([qkv])_proj$")
CACHED = 8  # modules whose factors are kept for their other output key
ERROR_FIELD = "lora_error"  # --json: module → relative Frobenius error of its factors


def module_ranks(
    params: Any, layout: dict[str, Any], family: str
) -> dict[str, tuple[str, tuple[int, ...], int]]:
    """kohya module → (checkpoint key, ΔW shape, rank) for every module extracted."""
    from mergebuild.lora.names import modules_of

    mods = modules_of(
        layout, family, resnets=params.conv_rank > 0, text_encoder=params.text_encoder
    )
    out = {}
    for name, (key, part) in mods.items():
        shape = tuple(layout[key].shape)
        if part is not None:
            shape = (shape[0] // part[1], *shape[1:])
        kernel = math.prod(shape[2:])
        want = params.conv_rank if kernel > 1 else params.rank
        r = min(want, shape[0], math.prod(shape[1:]))
        if r > 0:
            out[name] = (key, shape, r)
    return out


def output_keys(params: Any, layouts: list[Any]) -> dict[str, tuple[tuple[int, ...], str]]:
    from mergebuild.sd.arch import detect

    arch = detect(layouts[0])
    if arch.family not in ("sd1", "sd2", "sdxl"):
        raise BuildError(
            f"extract_lora: 'a' is {arch.describe()}; LoRAs are extracted from SD1, SD2 or SDXL"
        )
    out: dict[str, tuple[tuple[int, ...], str]] = {}
    for name, (key, shape, r) in module_ranks(params, layouts[0], arch.family).items():
        ones = (1,) * (len(shape) - 2)
        out[name + ".lora_down.weight"] = ((r, *shape[1:]), key)
        out[name + ".lora_up.weight"] = ((shape[0], r, *ones), key)
        out[name + ".alpha"] = ((), key)
    if not out:
        raise BuildError("extract_lora: 'a' has no module a LoRA could train")
    return out


class _Factors:
    """The last few modules' (up, down), computed once even when two workers ask."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.entries: OrderedDict[tuple[str, str], Any] = OrderedDict()

    def get(self, key: tuple[str, str], make: Any) -> Any:
        with self.lock:
            entry = self.entries.get(key)
            if entry is None:
                entry = self.entries[key] = [threading.Lock(), None]
                while len(self.entries) > CACHED:
                    self.entries.popitem(last=False)
        with entry[0]:
            if entry[1] is None:
                entry[1] = make()
            return entry[1]


FACTORS = _Factors()


def factors(
    a: torch.Tensor, base: torch.Tensor, rank: int, clamp_quantile: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(up [out, r], down [r, in·k·k]) of a − base, float32, sign-fixed and clamped."""
    import torch

    delta = a.to(torch.float32) - base.to(torch.float32)
    return svd_factors(delta.reshape(delta.shape[0], -1), rank, clamp_quantile)


def svd_factors(
    mat: torch.Tensor, rank: int, clamp_quantile: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(up, down) of a float32 matrix: LAPACK SVD, first `rank` components, fixed signs,
    clamped (shared by extract_lora and merge_loras, so both write the same convention)."""
    import numpy as np
    import torch

    u, s, vh = torch.linalg.svd(mat, full_matrices=False)
    r = min(rank, s.shape[0])
    up = u[:, :r] * s[:r]
    down = vh[:r].clone()
    idx = down.abs().argmax(dim=1, keepdim=True)  # first index of the largest magnitude
    sign = torch.where(down.gather(1, idx) < 0, -1.0, 1.0)
    down.mul_(sign)
    up.mul_(sign.reshape(1, -1))
    if clamp_quantile < 1:
        values = np.concatenate([up.numpy().ravel(), down.numpy().ravel()]).astype(np.float64)
        hi = float(np.quantile(values, clamp_quantile))
        up.clamp_(-hi, hi)
        down.clamp_(-hi, hi)
    return up, down


def rel_error(target: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> float:
    """‖T − up·down‖_F / ‖T‖_F in float64 (4 significant digits: a report figure)."""
    import torch

    norm = float(target.norm())
    err = float((target - up.to(torch.float64) @ down.to(torch.float64)).norm())
    return float(f"{(err / norm if norm > 0 else err):.4g}")


def compute(
    params: Any, xs: list[torch.Tensor], out_key: str, node_key: str, report: dict[str, Any]
) -> torch.Tensor:
    """One output tensor (down, up or alpha) of the module `out_key` names; each module's
    relative error goes to `report` (the node's --json entry)."""
    import torch

    report.setdefault(ERROR_FIELD, {})

    role = next(r for r in ROLES if out_key.endswith(r))
    module = out_key[: -len(role)]
    a, base = xs
    m = _QKV.search(module)
    if m and a.dim() == 2 and a.shape[0] == 3 * a.shape[1]:  # an OpenCLIP in_proj third
        i, d = "qkv".index(m.group(1)), a.shape[1]
        a, base = a[i * d : (i + 1) * d], base[i * d : (i + 1) * d]
    kernel = tuple(a.shape[2:])
    want = params.conv_rank if math.prod(kernel) > 1 else params.rank
    r = min(want, a.shape[0], math.prod(a.shape[1:]))
    if role == ".alpha":
        return torch.tensor(float(r), dtype=torch.float32)

    def make() -> tuple[torch.Tensor, torch.Tensor]:
        up, down = factors(a, base, r, params.clamp_quantile)
        target = (a.to(torch.float64) - base.to(torch.float64)).reshape(a.shape[0], -1)
        report[ERROR_FIELD][module] = rel_error(target, up, down)
        return up, down

    up, down = FACTORS.get((node_key, module), make)
    if role == ".lora_down.weight":
        return down.reshape(r, *a.shape[1:]).clone()
    return up.reshape(a.shape[0], r, *(1,) * len(kernel)).clone()


def lora_metadata(params: dict[str, Any], family: str) -> dict[str, str]:
    """kohya's `ss_*` fields, so web UIs list and load the file as a LoRA."""
    import json

    meta = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(params["rank"]),
        "ss_network_alpha": str(params["rank"]),
        "ss_base_model_version": {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}.get(
            family, "sd_v1"
        ),
        "ss_v2": str(family == "sd2"),
    }
    if params.get("conv_rank"):
        meta["ss_network_args"] = json.dumps(
            {"conv_dim": str(params["conv_rank"]), "conv_alpha": str(params["conv_rank"])}
        )
    return meta


def add_metadata(fused: Any, recipe: Any) -> None:
    """Give every output of an extract_lora node kohya's `ss_*` fields (before it is written)."""
    from mergebuild.lora.merge import family_of
    from mergebuild.lora.merge import metadata as merged_metadata
    from mergebuild.sd.arch import detect

    for sink in fused.sinks:
        node = recipe.nodes.get(sink.source)
        if node is None or sink.label not in recipe.outputs:
            continue
        if node.method == "extract_lora":
            family = detect(fused.layouts[node.inputs["a"]]).family
            sink.metadata.update(lora_metadata(node.params, family))
        elif node.method == "merge_loras":
            loras = [fused.sources.get(n) for n in node.inputs.values()]
            if all(hasattr(s, "info") for s in loras):
                family = family_of(loras, list(node.inputs.values()))
                sink.metadata.update(merged_metadata(node.params, family))
