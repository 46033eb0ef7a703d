"""What a merge method declares: input slots, a pydantic parameter model, a version, `compute`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, Strict, field_validator

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

    @field_validator("*", mode="after", check_fields=False)
    @classmethod
    def _float32_range(cls, value: object) -> object:
        """Merges compute in float32: a larger number would silently turn every weight inf."""
        for x in value if isinstance(value, list | tuple) else (value,):
            if isinstance(x, float) and abs(x) > FLOAT32_MAX:
                raise ValueError(f"{x:g} is too large: float32 arithmetic stops at ±3.4e38")
        return value


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
    streaming: ClassVar[str] = "elementwise"  # derived from `elementwise`: never set by hand
    formula: ClassVar[str] = ""  # one line, for `mergebuild methods` and the README table
    description: ClassVar[str] = ""  # what, when to use, parameters
    example: ClassVar[str] = ""  # a YAML `merges:` entry using the method
    # compute(params, xs, ctx) instead of compute(params, xs)
    needs_context: ClassVar[bool] = False

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
        cls.streaming = "elementwise" if cls.elementwise else "whole_tensor"
