"""What a merge method declares: inputs, a pydantic parameter model, a version, `compute`.

The declaration is the single source for recipe validation, cache keys, `mergebuild methods`
and the README's table: inputs form, parameter ranges, streaming class, randomness, formula.
"""

from __future__ import annotations

import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, get_args

from pydantic import BaseModel, ConfigDict, Field, Strict, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

if TYPE_CHECKING:
    import torch

FLOAT32_MAX = 3.4028234663852886e38


def f32(x: torch.Tensor) -> torch.Tensor:
    """A new float32 copy of `x` (never `x` itself, even when it already is float32)."""
    import torch

    return x.to(torch.float32, copy=True)


class Params(BaseModel):
    """Base for method parameters: unknown fields are errors, NaN/inf are refused."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True)

    @field_validator("*", mode="before", check_fields=False)
    @classmethod
    def _numbers_are_numbers(cls, value: object, info: ValidationInfo) -> object:
        """pydantic's lax mode reads `yes`/`true` as 1 and "0.5" as 0.5: a YAML boolean or a
        quoted string where a number belongs is a mistake in the recipe, said so."""
        from mergebuild.recipe.yamlpos import PlainNumber

        field = cls.model_fields.get(info.field_name or "")
        allowed = _leaf_types(field.annotation) if field else set()

        def check(x: object) -> object:
            if isinstance(x, PlainNumber) and float in allowed:
                return x.number()  # unquoted 1e-3: a number in YAML 1.2
            if isinstance(x, bool) and bool not in allowed:
                raise _not_a_number(f"the boolean {str(x).lower()}")
            if isinstance(x, str) and str not in allowed:
                raise _not_a_number(f"the string {x!r}")
            return x

        if isinstance(value, list | tuple):
            return [check(x) for x in value]
        return check(value)

    @field_validator("*", mode="after", check_fields=False)
    @classmethod
    def _float32_range(cls, value: object) -> object:
        """Merges compute in float32: a larger number would silently turn every weight inf."""
        for x in value if isinstance(value, list | tuple) else (value,):
            if isinstance(x, float) and abs(x) > FLOAT32_MAX:
                raise ValueError(f"{x:g} is too large: float32 arithmetic stops at ±3.4e38")
        return value


def _not_a_number(what: str) -> PydanticCustomError:
    return PydanticCustomError(
        "not_a_number", "Input should be a valid number, not {what}", {"what": what}
    )


def _leaf_types(annotation: Any) -> set[Any]:
    """Every type an annotation names: `float | list[float]` → {float, list};
    `Literal["a", "b"]` names the types of its values (str)."""
    if typing.get_origin(annotation) is typing.Literal:
        return {type(v) for v in typing.get_args(annotation)}
    out = {typing.get_origin(annotation) or annotation}
    for arg in typing.get_args(annotation):
        out |= _leaf_types(arg)
    return out


class SeedParams(Params):
    """Base for random methods' parameters: `seed` (default 0) is part of the node key."""

    seed: Annotated[int, Strict()] = Field(0, ge=0, le=2**63 - 1)


@dataclass(frozen=True)
class ComputeContext:
    """Where the values a `needs_context` method sees come from (for counter-based RNG)."""

    tensor: str  # the tensor's key name
    offset: int  # flat index of xs[i]'s first element within the whole tensor
    numel: int  # the whole tensor's element count
    node_key: str  # the node's content key (hex)
    seed: int  # the node's `seed` parameter (0 for methods that are not random)
    # facts for the node's --json report (extract_lora/merge_loras: each module's error)
    report: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Tiles:
    """A whole-tensor result given tile by tile, once its whole-tensor statistics are known.

    Why: the per-key stage casts each tile into the output dtype as it comes, so no full-size
    float32 result (4 bytes per element, page-faulted in afresh for every large key) and no
    full-size cast of it are held: less memory per key in flight, fewer passes over memory.
    `fill(lo, hi)` returns the float32 values of flat elements [lo, hi) — the same bits the
    whole computation gives there — in a buffer the next call may reuse, or None when the
    method must start over on the whole tensor (slerp's lerp fallback on a non-finite value).
    """

    step: int  # elements per `fill` call (the last one may be shorter): the caller's tiles
    shape: tuple[int, ...]
    fill: Callable[[int, int], torch.Tensor | None]
    # fill may return None: the tiles cannot go out before the last one is known
    may_restart: bool = False
    # fill_half(lo, hi, out): the same tile rounded to float16 into `out` (uint16, its bits),
    # NaNs canonical; returns whether it holds Inf/NaN. Where given, a float16 output takes it:
    # one compiled call instead of fill, a cast and a check (_kernels.py).
    fill_half: Callable[[int, int, Any], bool] | None = None

    def whole(self) -> torch.Tensor | None:
        """Every tile in one new float32 tensor (None: a tile asked to start over)."""
        import math

        import torch

        numel = math.prod(self.shape)
        out = torch.empty(numel, dtype=torch.float32)
        for lo in range(0, numel, self.step):
            hi = min(numel, lo + self.step)
            part = self.fill(lo, hi)
            if part is None:
                return None
            out[lo:hi].copy_(part)
        return out.reshape(self.shape)


INPUTS_FORMS = ("slots", "variadic", "base_models")


def cls_name(params: Params) -> str:
    return type(params).__name__.removesuffix("Params") or "base"


class Method:
    name: ClassVar[str]
    # Bump when the arithmetic changes: it is part of every cache key using the method.
    version: ClassVar[int] = 1
    slots: ClassVar[tuple[str, ...]] = ("a",)
    # Parameters that may vary by key (block weights): canonicalised by the recipe loader,
    # resolved to a plain number per tensor by the executor.
    block_params: ClassVar[tuple[str, ...]] = ()
    # Variadic methods take `inputs: [..]` instead of named slots.
    variadic: ClassVar[bool] = False
    Params: ClassVar[type[Params]] = Params
    summary: ClassVar[str] = ""
    # How inputs are given: "slots" (a, b, c…), "variadic" (`models:`/`inputs:` [..]) or
    # "base_models" (`base: X` + `models: [..]`); xs is then [base, model_1, …, model_n].
    inputs_form: ClassVar[str] = "slots"
    min_models: ClassVar[int] = 1  # for variadic / base_models
    random: ClassVar[bool] = False  # takes `seed:` (its Params derive from SeedParams)
    # runs compiled loops (_kernels.py) on full-size tensors: the pass loads them early
    compiled_loops: ClassVar[bool] = False
    streaming: ClassVar[str] = "elementwise"  # derived from `elementwise`: never set by hand
    formula: ClassVar[str] = ""  # one line, for `mergebuild methods` and the README table
    description: ClassVar[str] = ""  # what, when to use, parameters
    example: ClassVar[str] = ""  # a YAML `merges:` entry using the method
    # compute(params, xs, ctx) instead of compute(params, xs)
    needs_context: ClassVar[bool] = False
    # How a base_models method's inputs are spelled in a recipe (bake_lora: `a:` + `loras:`);
    # the node's slots stay `base`, `m0`, `m1`…
    base_name: ClassVar[str] = "base"
    models_name: ClassVar[str] = "models"
    # Inputs after the first may lack a key (a LoRA touches some tensors): compute then gets
    # None in their place instead of the key being kept from `a`.
    optional_inputs: ClassVar[bool] = False
    # dtype "auto" is the widest dtype of the first input only (a bake keeps the model's dtype)
    dtype_from_a: ClassVar[bool] = False
    # compute_half also takes float32 inputs (float32 arrays) and absent optional ones (None):
    # bake_lora's ΔW are float32 whatever the model's dtype
    half_mixed: ClassVar[bool] = False

    @classmethod
    def check(cls, params: Params, n_inputs: int) -> str | None:
        """Cross-field validation beyond the pydantic model; return an error message or None."""
        return None

    # Elementwise methods see tensors in flat chunks (bounded memory, parallel within a key);
    # a method that needs whole tensors (norms, top-k) sets this False.
    elementwise: ClassVar[bool] = True

    # compute(params, xs) -> tensor: merge `xs` (same shape, slot order; fp16/bf16/fp32) into
    # a NEW float32 tensor. Arithmetic is float32 whatever the input dtypes (fp16/bf16 → fp32
    # is exact, so mixing dtypes in an op equals converting first). It must not modify `xs`,
    # and must evaluate a fixed order of single IEEE operations (no fused multiply-add) so
    # results are bit-identical on every machine and thread count.
    compute: ClassVar[Callable[[Any, list[torch.Tensor]], torch.Tensor]]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """A method without `compute` is refused when its module is imported, not mid-build."""
        super().__init_subclass__(**kwargs)
        if not callable(getattr(cls, "compute", None)):
            raise TypeError(f"merge method {cls.__name__} defines no compute()")
        if cls.variadic and cls.inputs_form == "slots":
            cls.inputs_form = "variadic"
        if cls.inputs_form not in INPUTS_FORMS:
            raise TypeError(f"merge method {cls.__name__}: unknown inputs_form {cls.inputs_form}")
        cls.variadic = cls.inputs_form == "variadic"
        cls.streaming = "elementwise" if cls.elementwise else "whole_tensor"
        if not cls.formula:
            cls.formula = cls.summary
        if not cls.summary:
            cls.summary = cls.formula

    @classmethod
    def compute_many(cls, params: list[Any], xs: list[torch.Tensor]) -> Iterator[torch.Tensor]:
        """`compute(p, xs)` for each p in turn: the members of a sweep on one tile (elementwise
        methods without context only). A method may share what does not depend on the
        parameters (add_difference: b − c once) as long as each result has compute's bits.
        A result may live in a buffer the next one reuses: the caller copies it first."""
        for p in params:
            yield cls.compute(p, xs)

    @classmethod
    def compute_half(cls, params: Any, xs: list[Any], out: Any, ctx: Any = None) -> bool | None:
        """An elementwise method's float16 fast path: compute's result for float16 inputs
        given as their bits (uint16 numpy arrays, flat), rounded into `out` (the float16
        output's bits) with canonical NaNs; returns whether it holds Inf/NaN, or None where
        it does not apply (nothing written: compute runs). One compiled call per chunk
        instead of widening copies, compute's ops, a cast and a check (_kernels.py).
        `ctx` is the ComputeContext for a `needs_context` method (as compute gets it), else
        None; with `half_mixed`, float32 inputs come as float32 arrays and absent ones as None."""
        return None

    @classmethod
    def compute_many_half(cls, params: list[Any], xs: list[Any], outs: Any) -> list[bool] | None:
        """`compute_many`'s float16 fast path (see compute_half): member k's result rounded
        into row k of `outs` (uint16, float16 bits); whether each holds Inf/NaN, or None
        where it does not apply (compute_many runs). By default each member's compute_half:
        a method with one has it in streamed builds too (a file's only node is streamed)."""
        flags = []
        for p, out in zip(params, outs, strict=True):
            flag = cls.compute_half(p, xs, out)
            if flag is None:
                return None
            flags.append(flag)
        return flags

    @classmethod
    def split(cls, params: Any, xs: list[torch.Tensor], ctx: Any) -> Tiles | None:
        """A whole-tensor method's result as Tiles (see Tiles), or None: call `compute`.

        `ctx` is the ComputeContext for `needs_context` methods, else None. The default has
        no split; a method defining one computes `compute` through it, so both give the same
        bits."""
        return None

    @classmethod
    def split_half(cls, params: Any, xs: list[Any], ctx: Any) -> Tiles | None:
        """`split` for float16 inputs given as numpy arrays, in a pass without torch
        (arrays.py): Tiles whose `fill_half` gives `split`'s float16 tiles bit for bit (their
        `fill` is not called), or None: the inputs become tensors and `split` runs."""
        return None

    @classmethod
    def output_keys(
        cls, params: Any, layouts: list[Any]
    ) -> dict[str, tuple[tuple[int, ...], str]] | None:
        """For a method whose result has other keys than `a` (extract_lora writes LoRA
        factors): output key → (shape, the input key it is computed from; `compute` gets that
        key's tensors and `ctx.tensor` = the output key). None (the default): `a`'s keys."""
        return None

    @classmethod
    def check_inputs(cls, job: Any, sources: list[Any], layouts: list[Any]) -> None:
        """Raise BuildError when the inputs' layouts do not suit the method (called by the
        engine while planning; the default checks nothing beyond the architectures)."""

    @classmethod
    def input_names(cls) -> tuple[str, ...]:
        """How the inputs are spelled in a recipe (and filled by positional call arguments)."""
        if cls.inputs_form == "base_models":
            return (cls.base_name, cls.models_name)
        if cls.inputs_form == "variadic":
            return ("models",)
        return cls.slots

    @classmethod
    def param_order(cls) -> list[str]:
        """Parameters in declared order, `seed` last: what positional call arguments fill."""
        names = list(cls.Params.model_fields)
        return [n for n in names if n != "seed"] + (["seed"] if "seed" in names else [])

    @classmethod
    def signature(cls) -> str:
        """`ties(base, models=[..], k=0.2 in (0, 1], ...)`: quoted by every parameter error."""
        parts = [
            {
                "base_models": f"{cls.base_name}, {cls.models_name}=[..]",
                "variadic": f"{cls.models_name}=[..]",
            }.get(cls.inputs_form, ", ".join(cls.slots))
        ]
        for name in cls.param_order():
            f = cls.Params.model_fields[name]
            text = name if f.is_required() else f"{name}={_show(f.default)}"
            lo, lo_incl, hi, hi_incl = bounds(cls.Params, name)
            if lo is not None or hi is not None:
                left = "(-inf" if lo is None else f"{'[' if lo_incl else '('}{_show(lo)}"
                right = "inf)" if hi is None else f"{_show(hi)}{']' if hi_incl else ')'}"
                text += f" in {left}, {right}"
            if name in cls.block_params:
                text += " (or block weights)"
            parts.append(text)
        return f"{cls.name}({', '.join(parts)})"


def bounds(params: type[Params], name: str) -> tuple[Any, bool, Any, bool]:
    """(low, low inclusive, high, high inclusive) of a numeric parameter (None: unbounded),
    from its Field constraints, also when they sit inside `Annotated[float, …] | BlockAlpha`."""
    f = params.model_fields[name]
    metas = list(f.metadata)
    for arg in get_args(f.annotation):
        metas += [m for a in get_args(arg)[1:] for m in getattr(a, "metadata", [a])]
    lo = hi = None
    lo_incl = hi_incl = False
    for m in metas:
        if getattr(m, "gt", None) is not None:
            lo, lo_incl = m.gt, False
        if getattr(m, "ge", None) is not None:
            lo, lo_incl = m.ge, True
        if getattr(m, "lt", None) is not None:
            hi, hi_incl = m.lt, False
        if getattr(m, "le", None) is not None:
            hi, hi_incl = m.le, True
    return lo, lo_incl, hi, hi_incl


def in_bounds(value: float, b: tuple[Any, bool, Any, bool]) -> bool:
    lo, lo_incl, hi, hi_incl = b
    if lo is not None and (value < lo or (value == lo and not lo_incl)):
        return False
    return not (hi is not None and (value > hi or (value == hi and not hi_incl)))


def _show(v: object) -> str:
    if isinstance(v, float) and v.is_integer() and abs(v) < 1e15:
        return f"{v:.1f}"
    if isinstance(v, int) and v >= 2**62:
        return "2**63-1" if v == 2**63 - 1 else str(v)
    return repr(v) if isinstance(v, str) else str(v)
