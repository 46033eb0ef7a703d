"""Block weights (MBW): which UNet block a key belongs to, presets, and per-key `alpha`.

A block-weighted or per-component `alpha` is stored in one canonical form (`BlockAlpha`:
a value per UNet block of a named layout, plus one per text encoder / VAE / other keys), so
every spelling of the same weights — a 26-value list, a block mapping with a default, a named
preset, or `preset(...)` in an expression — gives the same parameters and the same cache key.
The merge engine asks `BlockAlpha.value_for(key)` for the plain number of each tensor.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from fractions import Fraction
from functools import cache
from importlib import resources
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, model_serializer, model_validator

from mergebuild.errors import did_you_mean
from mergebuild.sd.arch import TEXT_ENCODERS, UNET_PREFIX, component_of, text_encoder_of


def _names(n_in: int, n_out: int) -> tuple[str, ...]:
    return (
        "BASE",
        *(f"IN{i:02}" for i in range(n_in)),
        "M00",
        *(f"OUT{i:02}" for i in range(n_out)),
    )


def _dit_names(**groups: int) -> tuple[str, ...]:
    """Transformer layouts: BASE (embedders), each block group in order, OUT (final layer)."""
    blocks = [f"{g}{i:02}" for g, n in groups.items() for i in range(n)]
    return ("BASE", *blocks, "OUT")


LAYOUTS: dict[str, tuple[str, ...]] = {
    "sd1": _names(12, 12),
    "sdxl": _names(9, 9),
    "flux": _dit_names(D=19, S=38),  # double_blocks.N → DNN, single_blocks.N → SNN
    "sd3": _dit_names(J=24),  # joint_blocks.N → JNN
    "sd3_large": _dit_names(J=38),
}
LAYOUT_NAMES = {
    "sd1": "SD1/SD2 (26 values)",
    "sdxl": "SDXL (20 values)",
    "flux": "Flux (59 values)",
    "sd3": "SD3/SD3.5 medium (26 values)",
    "sd3_large": "SD3.5 large (40 values)",
}
# a list's length says its layout; SD3 medium's 26 would read as SD1's, so it takes a mapping
LIST_LAYOUTS = {26: "sd1", 20: "sdxl", 59: "flux", 40: "sd3_large"}
GROUPS = ("text_encoder", "vae", "other")  # non-UNet key groups, each with one value
# `diffuser` is the transformer of Flux/SD3 (the same group as `unet`); clip_l, clip_g and
# t5xxl override text_encoder for that encoder's keys
COMPONENT_KEYS = ("unet", "diffuser", "text_encoder", *TEXT_ENCODERS, "vae", "other", "default")
_BLOCK = re.compile(r"(input_blocks|output_blocks)\.(\d+)\.")
_DIT_BLOCK = re.compile(r"(double_blocks|single_blocks|joint_blocks)\.(\d+)\.")
_DIT_GROUP = {"double_blocks": "D", "single_blocks": "S", "joint_blocks": "J"}
# mapping spellings: `double_blocks.3`, and ranges `double_blocks.0-9` or `IN00-IN05`
_NAME_RANGE = re.compile(r"(double_blocks|single_blocks|joint_blocks)\.(\d+)(?:-(\d+))?$")


def block_of(key: str, layout: str = "sd1", root: str | None = UNET_PREFIX) -> str:
    """The MBW block of `key` (domain.md §4): IN/M/OUT by UNet block, the final `out.` with the
    last OUT block, and everything else — time_embed, SDXL's label_emb (the sd-mecha convention),
    text encoders, VAE, buffers — with BASE."""
    if component_of(key, root) != "unet":
        return "BASE"
    rest = key.removeprefix(UNET_PREFIX)
    names = LAYOUTS[layout]
    if layout not in ("sd1", "sdxl"):  # Flux / SD3: blocks by group, final_layer is OUT
        d = _DIT_BLOCK.match(rest)
        if d:
            name = f"{_DIT_GROUP[d.group(1)]}{int(d.group(2)):02}"
            return name if name in names else "BASE"
        return "OUT" if rest.startswith("final_layer.") else "BASE"
    m = _BLOCK.match(rest)
    if m:
        name = f"{'IN' if m.group(1) == 'input_blocks' else 'OUT'}{int(m.group(2)):02}"
        return name if name in names else "BASE"
    if rest.startswith("middle_block."):
        return "M00"
    if rest.startswith("out."):
        return names[-1]
    return "BASE"


@cache
def presets() -> dict[str, tuple[Fraction, ...]]:
    """Named presets: 25 values over IN00…IN11, M00, OUT00…OUT11 (SD1/SD2 layout)."""
    text = resources.files("mergebuild.data").joinpath("mbw_presets.tsv").read_text()
    out = {}
    for line in text.splitlines():
        if not line.strip() or line.startswith("#") or line.startswith("preset_name"):
            continue
        name, values = line.split("\t")
        out[name.strip()] = tuple(Fraction(v.strip()) for v in values.split(","))
    return out


def preset_base(name: str) -> Fraction:
    """BASE of a preset written as 26 values (SuperMerger's convention: 0, except ALL_B = 1)."""
    return Fraction(1) if name == "ALL_B" else Fraction(0)


class AlphaError(Exception):
    """A bad alpha spelling; `path` is where inside the value (for file:line)."""

    def __init__(self, message: str, path: tuple[str | int, ...] = ()) -> None:
        super().__init__(message)
        self.path = path


@dataclass(frozen=True)
class Weights:
    """Exact per-group weights: UNet (one value, or one per block of `layout`) and the rest."""

    layout: str | None
    unet: tuple[Fraction, ...]  # 1 value if layout is None
    text_encoder: Fraction
    vae: Fraction
    other: Fraction
    # (clip_l | clip_g | t5xxl, value) where that encoder differs from text_encoder, sorted
    encoders: tuple[tuple[str, Fraction], ...] = ()

    @staticmethod
    def uniform(v: Fraction) -> Weights:
        return Weights(None, (v,), v, v, v)

    def encoder(self, name: str) -> Fraction:
        return dict(self.encoders).get(name, self.text_encoder)

    def normalized(self) -> Weights | Fraction:
        """A plain number when every group has the same value; UNet list collapsed if flat."""
        w = self
        enc = tuple(sorted((n, v) for n, v in w.encoders if v != w.text_encoder))
        if w.layout is not None and len(set(w.unet)) == 1:
            w = Weights(None, w.unet[:1], w.text_encoder, w.vae, w.other)
        if enc != w.encoders:
            w = Weights(w.layout, w.unet, w.text_encoder, w.vae, w.other, enc)
        if (
            w.layout is None
            and not w.encoders
            and len({w.unet[0], w.text_encoder, w.vae, w.other}) == 1
        ):
            return w.unet[0]
        return w

    def values(self) -> tuple[Fraction, ...]:
        encs = tuple(self.encoder(n) for n in TEXT_ENCODERS)
        return (*self.unet, self.text_encoder, self.vae, self.other, *encs)

    def _expand(self, layout: str) -> tuple[Fraction, ...]:
        return self.unet if self.layout is not None else self.unet * len(LAYOUTS[layout])

    def combine(self, other: Weights, op: Callable[[Fraction, Fraction], Fraction]) -> Weights:
        if self.layout and other.layout and self.layout != other.layout:
            raise AlphaError(
                f"cannot combine block weights of the {LAYOUT_NAMES[self.layout]} and "
                f"{LAYOUT_NAMES[other.layout]} layouts"
            )
        layout = self.layout or other.layout
        if layout is None:
            unet = (op(self.unet[0], other.unet[0]),)
        else:
            pairs = zip(self._expand(layout), other._expand(layout), strict=True)
            unet = tuple(op(x, y) for x, y in pairs)
        return Weights(
            layout,
            unet,
            op(self.text_encoder, other.text_encoder),
            op(self.vae, other.vae),
            op(self.other, other.other),
            tuple((n, op(self.encoder(n), other.encoder(n))) for n in TEXT_ENCODERS),
        ).normalized_encoders()

    def normalized_encoders(self) -> Weights:
        enc = tuple(sorted((n, v) for n, v in self.encoders if v != self.text_encoder))
        return Weights(self.layout, self.unet, self.text_encoder, self.vae, self.other, enc)

    def to_param(self) -> dict[str, Any]:
        """The canonical JSON form (floats) stored in recipe params and cache keys; per-encoder
        values appear only when set, so weights without them keep their old keys."""
        out: dict[str, Any] = {
            "layout": self.layout,
            "unet": [float(v) for v in self.unet] if self.layout else float(self.unet[0]),
            "text_encoder": float(self.text_encoder),
            "vae": float(self.vae),
            "other": float(self.other),
        }
        if self.encoders:
            out["encoders"] = {n: float(v) for n, v in self.encoders}
        return out


class BlockAlpha(BaseModel):
    """Canonical non-uniform alpha: per UNet block (or one UNet value) plus per component."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True)
    layout: Literal["sd1", "sdxl", "flux", "sd3", "sd3_large"] | None = None
    unet: float | list[float]
    text_encoder: float
    vae: float
    other: float
    encoders: dict[Literal["clip_l", "clip_g", "t5xxl"], float] | None = None

    @model_validator(mode="after")
    def _check(self) -> BlockAlpha:
        if isinstance(self.unet, list):
            if self.layout is None or len(self.unet) != len(LAYOUTS[self.layout]):
                raise ValueError("per-block 'unet' values need a layout and one value per block")
        elif self.layout is not None:
            raise ValueError("'layout' applies only to per-block 'unet' values")
        return self

    @model_serializer(mode="wrap")
    def _dump(self, handler: Callable[[BlockAlpha], dict[str, Any]]) -> dict[str, Any]:
        """`encoders` only when set: weights without per-encoder values keep their old keys."""
        out = handler(self)
        if out.get("encoders") is None:
            out.pop("encoders", None)
        return out

    def value_for(self, key: str, root: str | None = UNET_PREFIX) -> float:
        comp = component_of(key, root)
        if comp == "text_encoder" and self.encoders:
            enc = text_encoder_of(key)
            if enc in self.encoders:
                return float(self.encoders[enc])  # type: ignore[index]
        if comp != "unet":
            return float(getattr(self, comp))
        if not isinstance(self.unet, list):
            return self.unet
        assert self.layout is not None
        names = LAYOUTS[self.layout]
        return self.unet[names.index(block_of(key, self.layout, root))]


def resolve_params(params: BaseModel, key: str, root: str | None = UNET_PREFIX) -> BaseModel:
    """`params` with every `BlockAlpha` field (or list item: fold's per-term weights) replaced
    by its plain value for `key`."""
    update: dict[str, Any] = {}
    for f in type(params).model_fields:
        v = getattr(params, f)
        if isinstance(v, BlockAlpha):
            update[f] = v.value_for(key, root)
        elif isinstance(v, list) and any(isinstance(x, BlockAlpha) for x in v):
            update[f] = [x.value_for(key, root) if isinstance(x, BlockAlpha) else x for x in v]
    return params.model_copy(update=update) if update else params


def block_alphas(params: BaseModel) -> list[tuple[str, BlockAlpha]]:
    """Every block-weighted value of `params`: fields, and items of list fields (`weights[2]`)."""
    out = []
    for f in type(params).model_fields:
        v = getattr(params, f)
        if isinstance(v, BlockAlpha):
            out.append((f, v))
        elif isinstance(v, list):
            out += [(f"{f}[{i}]", x) for i, x in enumerate(v) if isinstance(x, BlockAlpha)]
    return out


# -- user spellings → Weights ----------------------------------------------------------------


def _num(v: Any, path: tuple[str | int, ...], what: str) -> Fraction:
    from mergebuild.recipe.yamlpos import PlainNumber

    if isinstance(v, PlainNumber):  # unquoted 1e-3 (text to PyYAML): exact from its digits
        v = Fraction(v.replace("_", ""))
    if isinstance(v, bool) or not isinstance(v, int | float | Fraction):
        raise AlphaError(f"{what} must be a number (got {v!r})", path)
    try:
        return Fraction(v)
    except (ValueError, OverflowError):
        raise AlphaError(f"{what} must be a finite number (got {v!r})", path) from None


def parse_alpha(value: Any) -> Weights | Fraction:
    """Any accepted spelling of alpha → exact weights (a plain Fraction when uniform).

    Spellings: a number; a list of 26 (SD1/SD2) or 20 (SDXL) values `BASE, IN…, M00, OUT…`
    (59 for Flux, 40 for SD3.5 large); `{preset: NAME, base: V}`; a block mapping
    `{IN00: V, …, default: V, layout: sdxl}` (`double_blocks.0-9: V` and `IN00-IN05: V` ranges
    too); or per component `{unet: <any of these>, text_encoder: V, clip_l: V, vae: V,
    default: V}` (`diffuser` is another name for `unet`).
    """
    if isinstance(value, list):
        return _from_list(value, ()).normalized()
    if isinstance(value, dict):
        if "preset" in value:
            return _from_preset(value, ()).normalized()
        keys = {str(k) for k in value}
        if keys & {"unet", "diffuser", "text_encoder", *TEXT_ENCODERS, "vae", "other"}:
            return _from_components(value).normalized()
        return _from_blocks(value, ()).normalized()
    return _num(value, (), "alpha")


def _base_everywhere(layout: str, unet: tuple[Fraction, ...]) -> Weights:
    """MBW convention: BASE also weights the text encoder, the VAE and every non-UNet key."""
    return Weights(layout, unet, unet[0], unet[0], unet[0])


def _from_list(values: list[Any], path: tuple[str | int, ...]) -> Weights:
    layout = LIST_LAYOUTS.get(len(values))
    if layout is None:
        raise AlphaError(
            f"alpha list has {len(values)} values; block weights take 26 (SD1/SD2: BASE, "
            "IN00…IN11, M00, OUT00…OUT11), 20 (SDXL: BASE, IN00…IN08, M00, OUT00…OUT08), 59 "
            "(Flux: BASE, D00…D18, S00…S37, OUT) or 40 (SD3.5 large: BASE, J00…J37, OUT); "
            "SD3 medium takes a mapping with 'layout: sd3'",
            path,
        )
    unet = tuple(_num(v, (*path, i), f"block {LAYOUTS[layout][i]}") for i, v in enumerate(values))
    return _base_everywhere(layout, unet)


def _from_preset(spec: Mapping[str, Any], path: tuple[str | int, ...]) -> Weights:
    extra = [k for k in spec if k not in ("preset", "base")]
    if extra:
        raise AlphaError(
            f"unknown field '{extra[0]}' next to 'preset' (allowed: preset, base)",
            (*path, extra[0]),
        )
    name = spec["preset"]
    table = presets()
    if not isinstance(name, str) or name not in table:
        upper = str(name).upper()
        hint = f" — did you mean '{upper}'?" if upper in table else did_you_mean(str(name), table)
        raise AlphaError(
            f"unknown block-weight preset {name!r}{hint} (see README: block weights; "
            f"{len(table)} presets, e.g. GRAD_V, FLAT_25, SMOOTHSTEP, TRUE_CUBIC_HERMITE)",
            (*path, "preset"),
        )
    base = preset_base(name)
    if "base" in spec:
        base = _num(spec["base"], (*path, "base"), "preset base")
    return _base_everywhere("sd1", (base, *table[name]))


def _block_names(key: str) -> list[str] | None:
    """The canonical block names a mapping key stands for: `IN03`, `double_blocks.3` (D03),
    a range `double_blocks.0-9` or `IN00-IN05`; None when it is not block-shaped."""
    m = _NAME_RANGE.match(key)
    if m:
        lo = int(m.group(2))
        hi = int(m.group(3)) if m.group(3) is not None else lo
        return [f"{_DIT_GROUP[m.group(1)]}{i:02}" for i in range(lo, hi + 1)] if lo <= hi else None
    if "-" in key:
        first, _, last = key.upper().partition("-")
        for names in LAYOUTS.values():
            if first in names and last in names and names.index(first) <= names.index(last):
                return list(names[names.index(first) : names.index(last) + 1])
        return None
    return [key.upper()]


def _infer_layout(spec: Mapping[str, Any]) -> str:
    """A mapping without `layout:` is SD1's unless its block names exist only in another."""
    wanted = {n for k in spec if k not in ("layout", "default") for n in _block_names(str(k)) or []}
    if all(n in LAYOUTS["sd1"] for n in wanted):
        return "sd1"
    for layout, names in LAYOUTS.items():
        if wanted <= set(names):
            return layout
    return "sd1"  # the unknown name is reported against SD1's blocks


def _from_blocks(spec: Mapping[str, Any], path: tuple[str | int, ...]) -> Weights:
    layout = spec.get("layout") or _infer_layout(spec)
    if layout not in LAYOUTS:
        raise AlphaError(
            f"unknown block layout {layout!r}: use {', '.join(LAYOUTS)}", (*path, "layout")
        )
    names = LAYOUTS[layout]
    given: dict[str, Fraction] = {}
    default: Fraction | None = None
    for k, v in spec.items():
        if k == "layout":
            continue
        if k == "default":
            default = _num(v, (*path, k), "default")
            continue
        expanded = _block_names(str(k))
        if expanded is not None and len(expanded) > 1 and all(n in names for n in expanded):
            value = _num(v, (*path, k), f"blocks {k}")
            given.update(dict.fromkeys(expanded, value))
            continue
        name = expanded[0] if expanded else str(k).upper()
        if name not in names:
            other = [n for n, lay in LAYOUTS.items() if name in lay and n != layout]
            hint = (
                f" (it exists in the {other[0]} layout: add 'layout: {other[0]}')" if other else ""
            )
            raise AlphaError(
                f"unknown block '{k}' for the {LAYOUT_NAMES[layout]} layout"
                f"{hint or did_you_mean(name, names)} (blocks: {names[0]}, {names[1]}…"
                f"{names[-1]}; or unet, text_encoder, vae, default)",
                (*path, k),
            )
        given[name] = _num(v, (*path, k), f"block {name}")
    missing = [n for n in names if n not in given]
    if missing and default is None:
        raise AlphaError(
            f"block weights give no value for {', '.join(missing[:4])}"
            f"{'…' if len(missing) > 4 else ''}: add 'default: V' for the blocks not listed",
            path,
        )
    unet = tuple(given.get(n, default or Fraction(0)) for n in names)
    return _base_everywhere(layout, unet)


def _from_components(spec: Mapping[str, Any]) -> Weights:
    # `layout` appears in the canonical form (to_param); accepting it makes that form, as
    # written into provenance and lock files, a valid recipe spelling (`mergebuild extract`)
    spec = {k: v for k, v in spec.items() if k != "layout"}
    if "diffuser" in spec:
        if "unet" in spec:
            raise AlphaError("give 'unet' or 'diffuser' (the same group), not both", ("diffuser",))
        spec["unet"] = spec.pop("diffuser")
    encoders = spec.pop("encoders", None)  # the canonical form's spelling
    if isinstance(encoders, dict):
        spec.update({k: v for k, v in encoders.items() if k not in spec})
    bad = [k for k in spec if k not in COMPONENT_KEYS]
    if bad:
        raise AlphaError(
            f"unknown component '{bad[0]}'{did_you_mean(str(bad[0]), COMPONENT_KEYS)} "
            f"(per-component alpha takes {', '.join(COMPONENT_KEYS)}; put block names under "
            "'unet:')",
            (bad[0],),
        )
    # Components not listed take `default`, and without one are kept from `a` (alpha 0).
    default = _num(spec["default"], ("default",), "default") if "default" in spec else Fraction(0)
    raw = spec.get("unet", default)
    if isinstance(raw, list):
        u = _from_list(raw, ("unet",))
        layout, unet = u.layout, u.unet
    elif isinstance(raw, dict):
        u = _from_preset(raw, ("unet",)) if "preset" in raw else _from_blocks(raw, ("unet",))
        layout, unet = u.layout, u.unet
    else:
        layout, unet = None, (_num(raw, ("unet",), "unet"),)
    rest = {g: _num(spec[g], (g,), g) if g in spec else default for g in GROUPS}
    encs = tuple((e, _num(spec[e], (e,), e)) for e in TEXT_ENCODERS if e in spec)
    w = Weights(layout, unet, rest["text_encoder"], rest["vae"], rest["other"], encs)
    return w.normalized_encoders()


def canonical_alpha(value: Any) -> float | dict[str, Any]:
    """Canonical JSON-able parameter for any alpha spelling: a float, or a `BlockAlpha` dict."""
    w = parse_alpha(value)
    return float(w) if isinstance(w, Fraction) else w.to_param()
