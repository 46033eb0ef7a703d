"""Health checks for a checkpoint, and the one repair that is always safe (position_ids).

The classic damage: an old merger interpolated the CLIP text encoder's int64 `position_ids`
(`arange(77)`) as floats; truncated back to integers some positions came out wrong and the model
ignored words of every prompt. `examine` reports that, non-finite values, values that overflow
fp16, keys missing or unexpected for the detected architecture, and mixed float dtypes;
`write_fixed` copies the file tensor by tensor with only `position_ids` reset to int64 arange.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mergebuild.engine.dtypes import is_float
from mergebuild.sd.arch import Arch, detect, is_position_ids

if TYPE_CHECKING:
    import torch

FP16_MAX = 65504.0
FP16_SAFE = ("F16", "F8_E5M2", "F8_E4M3")  # dtypes whose values always fit fp16's range
SCAN_ELEMENTS = 1 << 22  # tensors are checked in chunks of this many elements
TABLE_COMPONENTS = {
    "diffuser": "unet",
    "clip_l": "text_encoder",
    "clip_g": "text_encoder",
    "t5xxl": "text_encoder",
    "vae": "vae",
}
FP8_E4M3_MAX = 448.0  # fp8_e4m3fn outputs clamp beyond this (engine/dtypes.py)
MAX_LISTED = 8


@dataclass
class Finding:
    severity: str  # "error": the model is damaged; "warning": worth knowing
    check: str
    message: str
    keys: list[str] = field(default_factory=list)
    fixable: bool = False


def position_ids_problem(key: str, dtype: str, t: torch.Tensor) -> str | None:
    """Why `t` is not a healthy int64 arange, or None."""
    import torch

    n = t.shape[-1] if t.dim() else 0
    want = torch.arange(n, dtype=torch.int64).expand_as(t)
    as_long = t.to(torch.int64)  # truncation, as torch's .long() does when a model is loaded
    wrong = (as_long != want).nonzero()[:, -1].tolist() if t.numel() else []
    parts = []
    if dtype != "I64":
        parts.append(f"stored as {dtype}, not int64")
    if wrong:
        shown = ", ".join(map(str, wrong[:MAX_LISTED])) + ("…" if len(wrong) > MAX_LISTED else "")
        parts.append(
            f"positions {shown} are wrong ({len(wrong)} of {n}: the text encoder misreads the "
            "prompt tokens there)"
        )
    elif is_float(dtype) and not torch.equal(t.to(torch.float64), want.to(torch.float64)):
        parts.append("values are not whole numbers")
    return f"{key}: {'; '.join(parts)}" if parts else None


def _expected_keys(arch: Arch) -> tuple[set[str], set[str]] | None:
    """(required keys, all known keys) for the components present, or None if unknown."""
    if arch.dit:
        return _dit_expected_keys(arch)
    if arch.family not in ("sd1", "sdxl") or not arch.prefixed:
        return None
    from mergebuild.demo import key_table

    required, known = set(), set()
    for k, spec in key_table(arch.family).items():
        known.add(k)
        comp = TABLE_COMPONENTS.get(spec["component"])
        if comp in arch.components and not spec.get("optional"):
            required.add(k)
    return required, known


def _dit_expected_keys(arch: Arch) -> tuple[set[str], set[str]] | None:
    """Flux (dev, schnell; bare or prefixed) and SD3 medium: the packaged key lists, required
    for the parts the file holds (a transformer-only file needs no encoders)."""
    if arch.family == "sd3" and arch.variant != "medium":
        return None  # SD3.5's key list is not packaged
    from mergebuild.demo import key_table
    from mergebuild.sd.arch import UNET_PREFIX

    required, known = set(), set()
    for k, spec in key_table(arch.family).items():
        comp = spec["component"]
        if comp == "diffuser" and not arch.prefixed:
            k = k.removeprefix(UNET_PREFIX)
        known.add(k)
        if arch.variant == "schnell" and ".guidance_in." in f".{k}":
            continue  # schnell is not guidance-distilled
        held = comp in arch.text_encoders or TABLE_COMPONENTS.get(comp) in arch.components
        if held and (comp not in ("clip_l", "clip_g", "t5xxl") or comp in arch.text_encoders):
            required.add(k)
    return required, known


def _listed(keys: list[str]) -> str:
    return ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")


def examine(path: Path) -> tuple[Arch, int, list[Finding]]:
    """(architecture, tensors checked, findings) for the model at `path`."""

    from mergebuild.engine.readers import open_model

    src = open_model(path)
    try:
        infos = src.infos()
        arch = detect(infos)
        findings: list[Finding] = []
        nonfinite: list[str] = []
        overflow: list[str] = []
        fp8_over: list[str] = []
        for k in sorted(infos):
            info = infos[k]
            numel = math.prod(info.shape)
            if is_position_ids(k):
                t = src.read_flat(k, 0, numel).reshape(info.shape)
                why = position_ids_problem(k, info.dtype, t)
                if why:
                    findings.append(Finding("error", "position_ids", why, [k], fixable=True))
                continue
            if not is_float(info.dtype) or numel == 0:
                continue
            bad, big = _scan(src, k, numel, range_check=info.dtype != "F8_E4M3")
            if bad:
                nonfinite.append(k)
            if big > FP16_MAX and info.dtype not in FP16_SAFE:
                overflow.append(k)
            if big > FP8_E4M3_MAX:
                fp8_over.append(k)
        if nonfinite:
            findings.append(
                Finding(
                    "error",
                    "nonfinite",
                    f"{len(nonfinite)} tensors hold NaN or Inf: {_listed(nonfinite)}",
                    nonfinite,
                )
            )
        if overflow:
            findings.append(
                Finding(
                    "warning",
                    "fp16_overflow",
                    f"{len(overflow)} tensors exceed ±{FP16_MAX:g} and become Inf when saved as "
                    f"fp16: {_listed(overflow)}",
                    overflow,
                )
            )
        if fp8_over:
            findings.append(
                Finding(
                    "warning",
                    "fp8_range",
                    f"{len(fp8_over)} tensors exceed ±{FP8_E4M3_MAX:g} and are clamped when saved "
                    f"as fp8_e4m3fn (fp8_e4m3fn_scaled or fp8_e5m2 keep them): "
                    f"{_listed(fp8_over)}",
                    fp8_over,
                )
            )
        findings += _scale_findings(src)
        findings += _key_findings(arch, infos)
        floats: dict[str, int] = {}
        for k, i in infos.items():
            if is_float(i.dtype) and not is_position_ids(k):
                floats[i.dtype] = floats.get(i.dtype, 0) + 1
        if len(floats) > 1 and not getattr(src, "scales", None):  # scaled fp8: by design
            mix = ", ".join(f"{d} ×{n}" for d, n in sorted(floats.items()))
            findings.append(Finding("warning", "mixed_dtypes", f"mixed float dtypes: {mix}"))
        return arch, len(infos), findings
    finally:
        src.close()


def _scale_findings(src: Any) -> list[Finding]:
    """A scaled fp8 file's scales: zero, negative or non-finite ones break their weight."""
    bad = sorted(k for k, v in getattr(src, "scales", {}).items() if not (0 < v < math.inf))
    if not bad:
        return []
    return [
        Finding(
            "error",
            "fp8_scale",
            f"{len(bad)} scale_weight values are zero, negative or not finite: {_listed(bad)}",
            bad,
        )
    ]


def _scan(src: Any, key: str, numel: int, range_check: bool) -> tuple[bool, float]:
    """(holds NaN/Inf, largest finite |value|) of one tensor, read in bounded chunks."""
    import torch

    bad, big = False, 0.0
    for lo in range(0, numel, SCAN_ELEMENTS):
        t = src.read_flat(key, lo, min(lo + SCAN_ELEMENTS, numel))
        # NaN or Inf anywhere makes the sum non-finite, so a finite float32 sum (one fast pass)
        # settles the common case; a non-finite one is checked element by element, since large
        # finite values can overflow the sum too.
        if not math.isfinite(t.to(torch.float32).sum().item()):
            finite = torch.isfinite(t)
            if not bool(finite.all()):
                bad = True
                t = t.masked_fill(~finite, 0)
        if range_check:
            lo_v, hi_v = torch.aminmax(t)
            big = max(big, -float(lo_v), float(hi_v))
    return bad, big


def _key_findings(arch: Arch, infos: dict[str, Any]) -> list[Finding]:
    expected = _expected_keys(arch)
    if expected is None:
        return []
    required, known = expected
    out = []
    missing = sorted(required - infos.keys())
    if missing:
        out.append(
            Finding(
                "warning",
                "missing_keys",
                f"{len(missing)} keys of a {arch.describe()} model are missing: {_listed(missing)}",
                missing,
            )
        )
    unexpected = sorted(k for k in infos if k not in known and not k.startswith("model_ema."))
    if unexpected:
        out.append(
            Finding(
                "warning",
                "unexpected_keys",
                f"{len(unexpected)} keys are not part of a {arch.describe()} model: "
                f"{_listed(unexpected)}",
                unexpected,
            )
        )
    return out


def write_fixed(path: Path, out: Path) -> list[str]:
    """Copy `path` to `out` (safetensors, atomically) with position_ids reset to int64 arange.

    Every other tensor and the metadata are copied byte for byte. Returns what changed.
    """
    import torch

    from mergebuild.atomic import atomic_file
    from mergebuild.engine.readers import open_model
    from mergebuild.engine.safetensors_io import TensorInfo
    from mergebuild.engine.stream_writer import StreamingWriter

    src = open_model(path, stored=True)  # a scaled fp8 file stays scaled
    try:
        infos = src.infos()
        new_infos = dict(infos)
        fixed: dict[str, torch.Tensor] = {}
        changes = []
        for k, info in infos.items():
            if not is_position_ids(k):
                continue
            t = src.read_flat(k, 0, math.prod(info.shape)).reshape(info.shape)
            if position_ids_problem(k, info.dtype, t) is None:
                continue
            n = info.shape[-1] if info.shape else 0
            fixed[k] = torch.arange(n, dtype=torch.int64).expand(info.shape).contiguous()
            new_infos[k] = TensorInfo("I64", info.shape)
            changes.append(f"{k}: {info.dtype} → I64 arange({n})")
        with atomic_file(out) as (fd, _):
            meta = dict(getattr(src, "metadata", {}) or {})
            with StreamingWriter(fd, new_infos, meta) as writer:
                for k, info in infos.items():
                    t = fixed.get(k)
                    if t is None:
                        t = src.read_flat(k, 0, math.prod(info.shape))
                    writer.write(k, t)
                writer.finish()
        return changes
    finally:
        src.close()


def findings_json(findings: list[Finding]) -> list[dict[str, Any]]:
    return [{**asdict(f), "keys": f.keys[:100]} for f in findings]
