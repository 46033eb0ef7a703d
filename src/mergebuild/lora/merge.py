"""merge_loras: several LoRAs into one kohya LoRA, module by module.

Per output module the target is T = Σ wᵢ·ΔWᵢ (each LoRA's ΔW with its own alpha/rank). When
every contribution is a plain LoRA/LoCon and their ranks add up to at most `rank`, the factors
are concatenated (down stacked, up side by side, wᵢ·alphaᵢ/rankᵢ folded into each up): the
same product, exactly, up to one float32 rounding of the up factors. Otherwise (LoHa, LoKr,
Tucker cores, or too many components) T is re-ranked by the same deterministic SVD as
extract_lora. Every output module has alpha = its rank (scale 1), kohya names and `ss_*`
metadata, and its relative Frobenius error ‖T − up·down‖/‖T‖ goes to the --json report.

The engine hands a method tensors, not files: the LoRAs' factors are reached through the node's
sources, registered by `check_inputs` under the node's key (passes run one at a time), and
`output_keys` finds them on the layouts (`LoraLayout.source`).
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from mergebuild.errors import BuildError
from mergebuild.lora.check import _few
from mergebuild.lora.extract import ERROR_FIELD, ROLES, _Factors, rel_error, svd_factors
from mergebuild.lora.names import modules_of

if TYPE_CHECKING:
    import torch

    from mergebuild.lora.source import LoraSource

SOURCES: dict[str, list[LoraSource]] = {}  # node key → its LoRAs, for the pass under way
_PLANS: dict[str, dict[str, OutModule]] = {}
_LOCK = threading.Lock()
FACTORS = _Factors()


@dataclass(frozen=True)
class OutModule:
    """One module of the merged LoRA: its checkpoint key (rows of a stacked q/k/v), its ΔW
    shape, and the (LoRA index, module name) pairs that contribute to it, in input order."""

    key: str
    rows: tuple[int, int] | None
    shape: tuple[int, ...]
    parts: tuple[tuple[int, str], ...]


def family_of(sources: list[LoraSource], names: list[str]) -> str:
    """The one architecture every LoRA fits (an SD1/SD2 UNet-only LoRA fits either)."""
    common = set(sources[0].info.families())
    for s in sources[1:]:
        common &= set(s.info.families())
    if not common:
        shown = ", ".join(f"'{n}' ({s.info.family})" for n, s in zip(names, sources, strict=True))
        raise BuildError(f"merge_loras: the LoRAs are for different architectures: {shown}")
    return "sd1" if common == {"sd1", "sd2"} else common.pop()


def plan(sources: list[LoraSource], family: str) -> dict[str, OutModule]:
    """Output module name → what it is made of; names are kohya's trainer spelling for the
    family (an input's own name for modules kohya does not train, e.g. conv_in)."""
    out: dict[str, OutModule] = {}
    where: dict[tuple[str, tuple[int, int] | None], str] = {}
    for i, src in enumerate(sources):
        for key, places in sorted(src.placements.items()):
            canon = modules_of([key], family, resnets=True)
            for p in places:
                name = where.get((key, p.rows))
                if name is None:
                    third = None if p.rows is None else (p.rows[0] // p.shape[0], 3)
                    name = next((n for n, (_, part) in canon.items() if part == third), p.module)
                    where[(key, p.rows)] = name
                    out[name] = OutModule(key, p.rows, p.shape, ())
                m = out[name]
                if math.prod(p.shape) != math.prod(m.shape):
                    raise BuildError(
                        f"merge_loras: module {p.module} has ΔW {list(p.shape)} but another LoRA "
                        f"gives {name} {list(m.shape)}"
                    )
                out[name] = OutModule(m.key, m.rows, m.shape, (*m.parts, (i, p.module)))
    return out


def _rank(params: Any, shape: tuple[int, ...]) -> int:
    conv = math.prod(shape[2:]) > 1 and params.conv_rank is not None
    return params.conv_rank if conv else params.rank


def exact(sources: list[LoraSource], m: OutModule, want: int) -> int | None:
    """Σ ranks when the module's contributions concatenate into at most `want` components."""
    total = 0
    for i, name in m.parts:
        mod = sources[i].info.modules[name]
        if mod.algorithm not in ("lora", "locon") or mod.tucker or mod.rank is None:
            return None
        total += mod.rank
    return total if total <= want else None


def output_keys(params: Any, layouts: list[Any]) -> dict[str, tuple[tuple[int, ...], str]]:
    sources = [lay.source for lay in layouts]
    family = family_of(sources, [f"#{i}" for i in range(len(sources))])
    out: dict[str, tuple[tuple[int, ...], str]] = {}
    for name, m in plan(sources, family).items():
        r = exact(sources, m, _rank(params, m.shape))
        if r is None:
            r = min(_rank(params, m.shape), m.shape[0], math.prod(m.shape[1:]))
        ones = (1,) * (len(m.shape) - 2)
        out[name + ".lora_down.weight"] = ((r, *m.shape[1:]), m.key)
        out[name + ".lora_up.weight"] = ((m.shape[0], r, *ones), m.key)
        out[name + ".alpha"] = ((), m.key)
    if not out:
        raise BuildError("merge_loras: the LoRAs have no module to merge")
    return out


def check(job: Any, sources: list[Any], names: list[str]) -> list[str]:
    """Refuse what cannot be merged; register the sources for `compute`; return warnings."""
    from mergebuild.lora.source import LoraSource

    for n, s in zip(names, sources, strict=True):
        if not isinstance(s, LoraSource):
            raise BuildError(
                f"cannot merge '{job.name}': '{n}' is not a LoRA file; merge_loras merges LoRA "
                "files (kohya, LyCORIS or diffusers/PEFT)"
            )
    family_of(sources, names)
    warnings = []
    for n, s in zip(names, sources, strict=True):
        if s.alpha_note:
            warnings.append(f"merge '{job.name}': {s.alpha_note}")
        if s.dora_keys:
            raise BuildError(
                f"cannot merge '{job.name}': LoRA '{n}' uses DoRA (dora_scale) on "
                f"{_few(s.dora_keys)}; a DoRA update depends on the checkpoint it is baked into, "
                "so it cannot be merged into a plain LoRA"
            )
        if s.unmapped and job.params.strict:
            raise BuildError(
                f"cannot merge '{job.name}': {len(s.unmapped)} modules of LoRA '{n}' map to no "
                f"tensor of its architecture: {_few(s.unmapped)} (strict: false skips them)"
            )
        if s.unmapped:
            warnings.append(
                f"merge '{job.name}': skipped {len(s.unmapped)} modules of LoRA '{n}' that map "
                f"to no tensor: {_few(s.unmapped)}"
            )
    with _LOCK:
        SOURCES[job.key] = list(sources)
        _PLANS.pop(job.key, None)
    return warnings


def _plan_of(node_key: str) -> tuple[list[LoraSource], dict[str, OutModule]]:
    with _LOCK:
        sources = SOURCES[node_key]
        p = _PLANS.get(node_key)
        if p is None:
            p = _PLANS[node_key] = plan(sources, family_of(sources, [""] * len(sources)))
        return sources, p


def _mat(t: torch.Tensor, rows: int) -> torch.Tensor:
    return t.reshape(rows, -1)


def factors(
    params: Any, xs: list[torch.Tensor | None], m: OutModule, sources: list[LoraSource]
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(up [o, r], down [r, cols]) float32 of one output module, and its relative error."""
    import torch

    from mergebuild.lora.delta import scale

    o = m.shape[0]
    weights = params.per_lora(len(sources))
    target = torch.zeros(o, math.prod(m.shape[1:]), dtype=torch.float64)
    for i, x in enumerate(xs):
        if x is None or weights[i] == 0:
            continue
        d = x if m.rows is None else x[m.rows[0] : m.rows[1]]
        target.add_(_mat(d, o).to(torch.float64), alpha=weights[i])
    if exact(sources, m, _rank(params, m.shape)) is not None:
        ups, downs = [], []
        for i, name in m.parts:
            mod = sources[i].info.modules[name]
            w, alpha = sources[i]._factors_of(name)
            s = scale(mod, alpha) * weights[i]
            ups.append((_mat(w["up"], o).to(torch.float64) * s).to(torch.float32))
            downs.append(_mat(w["down"], mod.rank or 1).to(torch.float32))
        up, down = torch.cat(ups, dim=1), torch.cat(downs, dim=0)
    else:
        r = min(_rank(params, m.shape), o, target.shape[1])
        up, down = svd_factors(target.to(torch.float32), r, params.clamp_quantile)
    return up, down, rel_error(target, up, down)


def compute(params: Any, xs: list[torch.Tensor | None], ctx: Any) -> torch.Tensor:
    """One output tensor (down, up or alpha) of the module `ctx.tensor` names."""
    import torch

    role = next(r for r in ROLES if ctx.tensor.endswith(r))
    module = ctx.tensor[: -len(role)]
    sources, p = _plan_of(ctx.node_key)
    m = p[module]

    def make() -> tuple[torch.Tensor, torch.Tensor]:
        up, down, err = factors(params, xs, m, sources)
        ctx.report.setdefault(ERROR_FIELD, {})[module] = err
        return up, down

    up, down = FACTORS.get((ctx.node_key, module), make)
    r = down.shape[0]
    if role == ".alpha":
        return torch.tensor(float(r), dtype=torch.float32)
    if role == ".lora_down.weight":
        return down.reshape(r, *m.shape[1:]).clone()
    return up.reshape(m.shape[0], r, *(1,) * (len(m.shape) - 2)).clone()


def metadata(params: dict[str, Any], family: str) -> dict[str, str]:
    """kohya's `ss_*` fields (alpha = dim: every module's scale is 1)."""
    from mergebuild.lora.extract import lora_metadata

    conv = params.get("conv_rank")
    return lora_metadata({"rank": params["rank"], "conv_rank": conv}, family)
