"""bake_lora: `a + Σ strengthᵢ · ΔWᵢ` — LoRA / LyCORIS files baked into a checkpoint, streamed.

Each LoRA input is a `LoraSource` (lora/source.py): its tensors are ΔW under the checkpoint's
key names, so the engine streams `a` key by key as for any merge. Keys no LoRA touches are
`a`'s tensors unchanged; the node's dtype defaults to `a`'s.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

from pydantic import StrictBool, field_validator

from mergebuild.engine.methods.base import ComputeContext, Method, Params, f32
from mergebuild.sd.blocks import AlphaError, BlockAlpha, canonical_alpha

if TYPE_CHECKING:
    import torch

Strength = float | BlockAlpha


class BakeLoraParams(Params):
    strength: Strength | list[Strength] = 1.0  # one for every LoRA, or one per LoRA
    strict: StrictBool = True  # False: LoRA modules that map to no tensor are skipped, warned

    @field_validator("strength", mode="before")
    @classmethod
    def _blocks(cls, value: Any) -> Any:
        """Block weights (a mapping, a preset, a nested 26/20-value list) in canonical form."""

        def one(v: Any) -> Any:
            if isinstance(v, dict) and set(v) == set(BlockAlpha.model_fields):
                return v  # already canonical (an expression's preset()/blocks())
            if isinstance(v, dict | list):
                try:
                    return canonical_alpha(v)
                except AlphaError as e:
                    raise ValueError(f"block weights of 'strength': {e}") from None
            return v

        if isinstance(value, list):
            return [one(v) for v in value]
        return one(value)

    def per_lora(self, n: int) -> list[Strength]:
        return list(self.strength) if isinstance(self.strength, list) else [self.strength] * n


class BakeLora(Method):
    name = "bake_lora"
    inputs_form = "base_models"
    base_name = "a"
    models_name = "loras"
    Params = BakeLoraParams
    optional_inputs = True
    dtype_from_a = True
    half_mixed = True  # a's dtype with float32 ΔW
    needs_context = True  # the key name: per-LoRA block weights resolve per tensor
    formula = "a + Σ sᵢ·ΔWᵢ (ΔW from each LoRA's factors)"
    description = """Bake LoRA / LyCORIS files into a checkpoint: W + strength·ΔW per tensor.

`loras` are models recognised as LoRAs from their keys (kohya/A1111 `lora_unet_…`, diffusers/PEFT
`lora_A`/`lora_B`; LoRA, LoCon, LoHa, LoKr, Tucker). ΔW = up·down·alpha/rank (LoHa, LoKr: their
products), formed in float64 and rounded once to float32. `strength` is one number for every
LoRA or a list with one per LoRA; each may be block weights (a mapping, `{preset: NAME}` or a
nested list). Keys no LoRA touches are a's tensors, unchanged; the dtype defaults to a's.
DoRA modules (`dora_scale`) bake as A1111 and ComfyUI do: W + strength·(W_dora − W), W_dora =
m·(W + ΔW)/‖W + ΔW‖ with the norm per input column ([1, in] magnitudes) or per output row
([out, 1]); `a` must then be a file (a model, or a node cached by an earlier build).
A LoRA for another architecture, or modules that map to no tensor of `a` (or to one of another
shape), are an error naming them; `strict: false` skips those modules with a warning.
Expression form: `anything + lora(detail, 0.6) + lora(style, 0.4)`."""
    example = """baked:
  method: bake_lora
  a: anything
  loras: [detail, style]
  strength: [0.6, 0.4]"""

    @classmethod
    def check(cls, params: BakeLoraParams, n_inputs: int) -> str | None:
        n = n_inputs - 1
        if isinstance(params.strength, list) and len(params.strength) != n:
            return (
                f"'strength' has {len(params.strength)} values for {n} LoRAs (one per LoRA; "
                "block weights of a LoRA: a mapping, {preset: NAME} or a nested [[...]] list)"
            )
        return None

    @classmethod
    def check_inputs(cls, job: Any, sources: list[Any], layouts: list[Any]) -> None:
        from mergebuild.lora.check import check_bake

        for msg in check_bake(job, sources, layouts):
            warnings.warn(msg, stacklevel=2)

    @staticmethod
    def compute(
        params: BakeLoraParams, xs: list[torch.Tensor | None], ctx: ComputeContext
    ) -> torch.Tensor:
        out = f32(xs[0])  # type: ignore[arg-type]
        for d, v in _live(params, xs, ctx):
            out.add_(d.mul(v))  # two roundings (s·ΔW, then +), never fused
        return out

    @classmethod
    def compute_half(
        cls, params: BakeLoraParams, xs: list[Any], out: Any, ctx: ComputeContext | None = None
    ) -> bool | None:
        """compute's ops as one compiled loop (_kernels.bake): `a` float16 bits or float32,
        the LoRAs' ΔW float32, rounded into the float16 output's bits."""
        import numpy as np

        from mergebuild.engine.methods._kernels import BAKE_LORAS
        from mergebuild.engine.methods.copy import copy_half
        from mergebuild.engine.methods.reduce import loops_for_size

        assert ctx is not None
        live = _live(params, xs, ctx)
        if not live and getattr(xs[0], "dtype", None) == np.uint16:
            return copy_half(xs[0], out)  # no LoRA changes this tensor: a's bits
        loops = loops_for_size(out.size)
        if loops is None or not live or len(live) > BAKE_LORAS:
            return None  # nothing to add (a cast of a) or more LoRAs than compiled for
        if any(d.dtype != np.float32 for d, _ in live):
            return None
        ss = np.array([v for _, v in live], dtype=np.float32)  # torch's d.mul(v): v in float32
        return bool(loops.bake(xs[0], tuple(d for d, _ in live), ss, out))


def _live(params: BakeLoraParams, xs: list[Any], ctx: ComputeContext) -> list[tuple[Any, float]]:
    """(ΔW, strength) of each LoRA that changes this tensor, in order."""
    pairs = []
    for d, s in zip(xs[1:], params.per_lora(len(xs) - 1), strict=True):
        v = s.value_for(ctx.tensor) if isinstance(s, BlockAlpha) else s
        if d is not None and v != 0:
            pairs.append((d, float(v)))
    return pairs
