"""What a merge method declares: input slots, a pydantic parameter model, a version, `compute`."""

from __future__ import annotations

import typing
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator
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
    """Every type an annotation names: `float | list[float]` → {float, list}."""
    out = {typing.get_origin(annotation) or annotation}
    for arg in typing.get_args(annotation):
        out |= _leaf_types(arg)
    return out


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
