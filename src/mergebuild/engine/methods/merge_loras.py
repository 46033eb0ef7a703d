"""merge_loras: several LoRAs into one kohya LoRA file (lora/merge.py)."""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import Field, Strict, StrictBool

from mergebuild.engine.methods.base import ComputeContext, Method, Params

if TYPE_CHECKING:
    import torch


class MergeLorasParams(Params):
    weights: float | list[float] = 1.0  # one for every LoRA, or one per LoRA
    rank: Annotated[int, Strict()] = Field(64, ge=1, le=1 << 16)  # components per module
    conv_rank: Annotated[int, Strict()] | None = Field(None, ge=1, le=1 << 16)  # 3×3; None: rank
    clamp_quantile: float = Field(1.0, gt=0, le=1)  # kohya's outlier clamp of SVD factors
    strict: StrictBool = True  # False: modules that map to no tensor are skipped, warned

    def per_lora(self, n: int) -> list[float]:
        return list(self.weights) if isinstance(self.weights, list) else [self.weights] * n


class MergeLoras(Method):
    name = "merge_loras"
    inputs_form = "variadic"
    models_name = "loras"
    Params = MergeLorasParams
    optional_inputs = True  # a LoRA lacking a module contributes nothing to it
    elementwise = False
    needs_context = True  # the output key names the module and the factor
    formula = "Σ wᵢ·ΔWᵢ per module → one kohya LoRA (concatenated, or SVD to rank r)"
    description = """Several LoRA / LyCORIS files merged into one LoRA file.

Per module the target is Σ weightᵢ·ΔWᵢ (each LoRA's own alpha/rank applied). When every
contribution is a plain LoRA/LoCon and their ranks add up to at most `rank` (`conv_rank` for 3×3
convs), the factors are concatenated with the weights folded into `up`: exact up to one float32
rounding. Otherwise (LoHa, LoKr, Tucker, or more components than `rank`) the target is re-ranked
by extract_lora's deterministic SVD (`clamp_quantile` < 1 clamps like kohya; default off).
Every module gets alpha = its rank; the file has kohya names and `ss_*` metadata, and each
module's relative Frobenius error ‖T − up·down‖/‖T‖ is in the --json report (`lora_error`).
DoRA files are refused (their update depends on the checkpoint). Write the node to an output
to get the LoRA file; `strict: false` skips modules that map to no tensor, with a warning."""
    example = """merged_lora:
  method: merge_loras
  loras: [detail, style]
  weights: [0.6, 0.4]
  rank: 64"""

    @classmethod
    def check(cls, params: MergeLorasParams, n_inputs: int) -> str | None:
        if isinstance(params.weights, list) and len(params.weights) != n_inputs:
            return f"'weights' has {len(params.weights)} values for {n_inputs} LoRAs (one per LoRA)"
        return None

    @classmethod
    def check_inputs(cls, job: Any, sources: list[Any], layouts: list[Any]) -> None:
        from mergebuild.lora.merge import check

        for msg in check(job, sources, job.inputs):
            warnings.warn(msg, stacklevel=2)

    @classmethod
    def output_keys(
        cls, params: Any, layouts: list[Any]
    ) -> dict[str, tuple[tuple[int, ...], str]] | None:
        from mergebuild.lora.merge import output_keys

        return output_keys(params, layouts)

    @staticmethod
    def compute(
        params: MergeLorasParams, xs: list[torch.Tensor | None], ctx: ComputeContext
    ) -> torch.Tensor:
        from mergebuild.lora.merge import compute

        return compute(params, xs, ctx)
