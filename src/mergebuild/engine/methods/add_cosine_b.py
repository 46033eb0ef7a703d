"""add_cosine_b: SuperMerger's "cosineB" — like cosineA, with the whole tensor's cosine as
the second similarity (favours b's structure with details from a)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from mergebuild.engine.methods.add_cosine_a import CosineBlend, CosineParams, column_cosines

if TYPE_CHECKING:
    import numpy as np
    import torch


class AddCosineB(CosineBlend):
    name = "add_cosine_b"
    slots = ("a", "b")
    Params = CosineParams
    block_params = ("alpha",)
    elementwise = False
    formula = "a·k + b·(1−k), k = clip(norm((cosⱼ + cos(a, b))/2) − α, 0, 1) per column j"
    description = """SuperMerger's "cosineB": the same blend as add_cosine_a, but the similarity
of column j is (cosⱼ + cos of the whole flattened tensors) / 2, and alpha is subtracted as
given (not its absolute value).

cosⱼ: cosine of a and b along dim 0 (0 for an all-zero column); the whole-tensor cosine is
⟨a, b⟩ / (‖a‖·‖b‖) (0 when a norm is 0); k = clip((s − sim_min) / (sim_max − sim_min) − α,
0, 1); result a·k + b·(1 − k). Sums float64 in a fixed order, blend float32. As with
add_cosine_a, SuperMerger's model-wide percentile normalisation is replaced by sim_min /
sim_max (default 0..1, sd-mecha's add_cosine_b). alpha may be block weights."""
    example = """cos_b:
  method: add_cosine_b
  a: anything
  b: insta
  alpha: 0.1"""

    @staticmethod
    def similarity(params: CosineParams, xs: list[torch.Tensor]) -> tuple[np.ndarray, float]:
        """(combined similarity per column, alpha): the whole-tensor statistics."""
        import numpy as np

        a, b = xs
        cos, aa, bb, ab_cols = column_cosines(a, b)
        ab = float(np.add.reduce(ab_cols))
        den = np.sqrt(float(np.add.reduce(aa))) * np.sqrt(float(np.add.reduce(bb)))
        whole = ab / den if den > 0 else 0.0
        return (cos + whole) / 2.0, float(params.alpha)  # type: ignore[arg-type]
