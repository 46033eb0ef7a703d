"""train_difference: SuperMerger's "trainDifference" — add b − c scaled by how far b is from a."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from mergebuild.engine.methods.base import Method, Params, f32
from mergebuild.sd.blocks import BlockAlpha

if TYPE_CHECKING:
    import torch


# tiles this large (a full-size model's) go through one compiled loop with the same float32
# operations (_kernels.train_difference): no GIL and one pass instead of ~10; smaller tensors
# keep torch (numba's load costs ~1 s per process)
COMPILED_TILE = 1 << 17


class TrainDifferenceParams(Params):
    alpha: float | BlockAlpha = 1.0


class TrainDifference(Method):
    name = "train_difference"
    compiled_loops = True
    slots = ("a", "b", "c")
    Params = TrainDifferenceParams
    block_params = ("alpha",)
    version = 1
    formula = "a + 1.8·α·sign(b−c)·|b−c|·|b−a| / (|b−c| + |b−a|)"
    description = """Add the difference b − c to a as if a had been trained like b (SuperMerger's
"trainDifference"): each element of b − c is scaled by |b−a| / (|b−c| + |b−a|), so where a
already sits near b little is added, where a is far from b nearly all of it.

Per element, in float32: d = b − c; n = |b − a|; q = n / (|d| + n) (0 where both are 0);
result = a + (sign(d)·q·|d|)·f32(1.8·α). Where b == c (element or whole tensor) the result is
exactly a (SuperMerger skips a key whose b and c are equal, which gives the same). alpha may
be block weights; alpha 0 gives exactly a."""
    example = """trained:
  method: train_difference
  a: anything
  b: nai_full
  c: sd15
  alpha: 1.0"""

    @classmethod
    def compute_half(
        cls, params: TrainDifferenceParams, xs: list[Any], out: Any, ctx: Any = None
    ) -> bool | None:
        """compute's compiled loop reading and writing float16 bits (no widening copies)."""
        import numpy as np

        from mergebuild.engine.methods.reduce import loops_for_size

        alpha = float(params.alpha)  # type: ignore[arg-type]
        loops = loops_for_size(out.size, COMPILED_TILE)
        if loops is None or alpha == 0:
            return None
        return bool(loops.train_difference(*xs, np.float32(alpha * 1.8), out))

    @staticmethod
    def compute(params: TrainDifferenceParams, xs: list[torch.Tensor]) -> torch.Tensor:
        import numpy as np
        import torch

        from mergebuild.engine.methods.reduce import loops_for

        a, b, c = xs
        alpha = float(params.alpha)  # type: ignore[arg-type]
        if alpha == 0:
            return f32(a)
        # Inputs converted to float32 once (exact): mixed float16/float32 ops are 2.5x slower
        # and give the same bits. Each buffer is reused once its value is no longer needed.
        a32, b32, c32 = f32(a), f32(b), f32(c)
        loops = loops_for(a32, COMPILED_TILE)
        if loops is not None:
            flat = [x.reshape(-1).numpy() for x in (a32, b32, c32)]
            out = np.empty(a32.numel(), dtype=np.float32)
            loops.train_difference(*flat, np.float32(alpha * 1.8), out)
            return torch.from_numpy(out).reshape(a32.shape)
        d = torch.sub(b32, c32)
        n = b32.sub_(a32).abs_()
        q = n.div_(torch.abs(d, out=c32).add_(n))  # NaN only where |d| + n == 0, i.e. d == 0
        # sign(d)·q·|d| is q·d bit for bit (rounding is symmetric): fewer temporaries
        t = q.mul_(d).mul_(alpha * 1.8)
        # −0.0 + a is a exactly, −0.0 included: b == c keeps a. On the CPU with numpy's
        # compare and masked copy: torch's bool kernels cost 10x more here.
        if t.device.type == "cpu":
            np.copyto(t.numpy(), np.float32(-0.0), where=np.equal(d.numpy(), 0.0))
        else:
            t.masked_fill_(d == 0, -0.0)
        return t.add_(a32)
