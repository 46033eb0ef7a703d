"""extract_lora: a kohya LoRA file from (a − base), by SVD per module (lora/extract.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

from pydantic import Field, Strict, StrictBool

from mergebuild.engine.methods.base import ComputeContext, Method, Params

if TYPE_CHECKING:
    import torch


class ExtractLoraParams(Params):
    rank: Annotated[int, Strict()] = Field(32, ge=1, le=1 << 16)  # linear and 1×1 conv modules
    conv_rank: Annotated[int, Strict()] = Field(0, ge=0, le=1 << 16)  # 3×3 convs; 0: none
    clamp_quantile: float = Field(0.99, gt=0, le=1)  # kohya's outlier clamp; 1: none
    text_encoder: StrictBool = True


class ExtractLora(Method):
    name = "extract_lora"
    slots = ("a", "base")
    Params = ExtractLoraParams
    elementwise = False
    needs_context = True  # the output key names the module and the factor
    formula = "SVD(a − base) per module → kohya LoRA (rank r, alpha = r)"
    description = """A LoRA file from the difference between a fine-tune and its base.

Per module kohya's trainer targets (attention, feed-forward, proj_in/out, text encoders; with
`conv_rank` > 0 also resnet and sampler convs): ΔW = a − base in float32, SVD, the first `rank`
(3×3 convs: `conv_rank`) components: up = U·S, down = Vh, alpha = rank, so baking the LoRA at
strength 1 adds the rank-r approximation of ΔW. Factors are clamped to the `clamp_quantile`
quantile of their values (kohya's 0.99; 1 disables). Each component's sign is fixed (the
largest entry of `down`'s row is positive), so the same inputs give the same bytes. The output
uses kohya names and `ss_*` metadata; its keys are the LoRA's, so an output `from:` this node
is a LoRA file (bake it from that file)."""
    example = """extracted:
  method: extract_lora
  a: anything
  base: sd15
  rank: 64
  conv_rank: 32"""

    @classmethod
    def output_keys(
        cls, params: Any, layouts: list[Any]
    ) -> dict[str, tuple[tuple[int, ...], str]] | None:
        from mergebuild.lora.extract import output_keys

        return output_keys(params, layouts)

    @staticmethod
    def compute(
        params: ExtractLoraParams, xs: list[torch.Tensor], ctx: ComputeContext
    ) -> torch.Tensor:
        from mergebuild.lora.extract import compute

        return compute(params, xs, ctx.tensor, ctx.node_key, ctx.report)
