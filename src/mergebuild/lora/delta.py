"""ΔW of one module from its factors, as A1111 and LyCORIS define them (domain.md §10).

Products are formed in float64 and rounded once to float32: every product of two float32
factors is exact in float64, so the result is the true ΔW rounded once, whatever order BLAS
sums in (two orders can differ only when a float64 sum lies within ~1e-16 of a float32
rounding boundary). A module is always computed whole, in fixed row blocks, so the bytes never
depend on how the engine chunks a tensor or on `-j`.

    LoRA / LoCon  ΔW = up · down · alpha/rank          (conv: flattened, then reshaped)
    Tucker        ΔW[o,i,k,l] = Σ up[o,a]·mid[a,b,k,l]·down[b,i] · alpha/rank
    LoHa          ΔW = (w1a·w1b) ⊙ (w2a·w2b) · alpha/rank (Tucker: each factor via its core)
    LoKr          ΔW = kron(w1, w2) · alpha/rank, w1/w2 full or a·b (scale 1 when both full)
    DoRA          W' = (W + ΔW) · dora_scale / ‖W + ΔW‖ (per input column, or per output row
                  for an [out, 1] magnitude), ΔW' = W' − W; the bake adds strength·ΔW'
                  (A1111's and ComfyUI's order: strength outside the renormalisation)
"""

from __future__ import annotations

import math
import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from mergebuild.lora.formats import Module

# float64 elements per block of rows: 2 MB, so the block stays in L2 between its matmul and
# its rounding (rank-32 SDXL module: 3.3 -> 1.9 ns per element against 1 << 20). The bits
# were the same as with 1 << 20 for every module shape tried (an element's float64 dot product
# over the rank does not depend on how many rows its block has)
ROW_BLOCK = 1 << 18


def scale(module: Module, alpha: float | None) -> float:
    rank = module.rank
    if rank is None or alpha is None:
        return 1.0
    return alpha / rank


def _f64(t: torch.Tensor) -> torch.Tensor:
    import torch

    return t.to(torch.float64)


_local = threading.local()


def _scratch(n: int) -> torch.Tensor:
    """This thread's float64 buffer of at least `n` elements (at most ROW_BLOCK are asked)."""
    import torch

    buf = getattr(_local, "buf", None)
    if buf is None or buf.numel() < n:
        buf = _local.buf = torch.empty(max(n, ROW_BLOCK), dtype=torch.float64)
    return buf[:n]


def _mat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1)


def _tucker(core: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    """Σ_ab core[a,b,k,l]·wa[a,o]·wb[b,i] → [o, i, k, l] (LyCORIS's Tucker convention)."""
    import torch

    return torch.einsum("abkl,ao,bi->oikl", _f64(core), _f64(_mat(wa)), _f64(_mat(wb)))


class Product:
    """ΔW = (a·b [⊙ p0·p1])·s of a plain LoRA/LoCon/LoHa module, formed by fixed blocks of
    `step` rows: the whole tensor and a reader of row blocks run the very same operations."""

    def __init__(
        self,
        a: torch.Tensor,
        b: torch.Tensor,
        s: float,
        pair: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> None:
        # the scale goes into b once (exact products in float64 either way, to within float64
        # rounding): no pass over every element of ΔW just to scale it
        self.a, self.b64, self.s = a, _f64(b).mul_(s), s
        self.p0 = pair[0] if pair else None
        self.p1 = _f64(pair[1]) if pair else None
        self.rows, self.cols = a.shape[0], b.shape[1]
        self.step = max(1, ROW_BLOCK // max(self.cols, 1))

    def block(self, i: int) -> torch.Tensor:
        """Rows [i·step, (i+1)·step) as float32: float64 products, rounded once."""
        import torch

        return self._block64(i).to(torch.float32)

    def block_into(self, i: int, dst: torch.Tensor) -> None:
        """`block(i)`, flattened, rounded straight into `dst` (float32): the same bits without
        a float32 block to allocate and copy again."""
        dst.copy_(self._block64(i).view(-1))

    def _block64(self, i: int) -> torch.Tensor:
        """Rows [i·step, (i+1)·step) in float64, in this thread's scratch buffer (valid until
        its next call): a fresh 8 MB buffer per block would be mapped and faulted in."""
        import torch

        lo = i * self.step
        a = _f64(self.a[lo : lo + self.step])
        blk = _scratch(a.shape[0] * self.cols).view(a.shape[0], self.cols)
        torch.matmul(a, self.b64, out=blk)
        if self.p0 is not None:
            blk.mul_(_f64(self.p0[lo : lo + self.step]) @ self.p1)
        return blk

    def whole(self, shape: tuple[int, ...]) -> torch.Tensor:
        import torch

        if self.rows * self.cols != math.prod(shape):
            raise ValueError(
                f"factors make {self.rows}×{self.cols} values, the tensor needs {list(shape)}"
            )
        out = torch.empty(self.rows, self.cols, dtype=torch.float32)
        for i, lo in enumerate(range(0, self.rows, self.step)):
            out[lo : lo + self.step] = self.block(i)
        return out.reshape(shape)


def product(module: Module, w: dict[str, torch.Tensor], alpha: float | None) -> Product | None:
    """The module's ΔW as a plain product, or None (Tucker cores, LoKr: formed whole)."""
    s = scale(module, alpha)
    algo = module.algorithm
    if algo in ("lora", "locon") and "mid" not in w:
        return Product(_mat(w["up"]), _mat(w["down"]), s)
    if algo == "loha" and "hada_t1" not in w:
        pair = (_mat(w["hada_w2_a"]), _mat(w["hada_w2_b"]))
        return Product(_mat(w["hada_w1_a"]), _mat(w["hada_w1_b"]), s, pair)
    return None


def delta(
    module: Module,
    w: dict[str, torch.Tensor],
    alpha: float | None,
    shape: tuple[int, ...],
) -> torch.Tensor:
    """ΔW (float32, `shape`) of `module` from its factor tensors `w` (by role)."""
    import torch

    plain = product(module, w, alpha)
    if plain is not None:
        return plain.whole(shape)
    s = scale(module, alpha)
    algo = module.algorithm
    if algo in ("lora", "locon"):
        out = _tucker(w["mid"], _mat(w["up"]).T, _mat(w["down"])).mul_(s)
        return out.to(torch.float32).reshape(shape)
    if algo == "loha":
        p1 = _tucker(w["hada_t1"], w["hada_w1_a"], w["hada_w1_b"])
        p2 = _tucker(w["hada_t2"], w["hada_w2_a"], w["hada_w2_b"])
        return p1.mul_(p2).mul_(s).to(torch.float32).reshape(shape)
    # lokr
    w1 = _f64(w["lokr_w1"]) if "lokr_w1" in w else _f64(w["lokr_w1_a"]) @ _f64(w["lokr_w1_b"])
    if "lokr_w2" in w:
        w2 = _f64(w["lokr_w2"])
    elif "lokr_t2" in w:
        w2 = _tucker(w["lokr_t2"], w["lokr_w2_a"], w["lokr_w2_b"])
    else:
        w2 = _f64(_mat(w["lokr_w2_a"])) @ _f64(_mat(w["lokr_w2_b"]))
    if w2.dim() == 2 and len(shape) == 4 and w1.dim() == 2:
        # a conv LoKr with a flattened w2: its columns are (in, kh, kw)
        w2 = w2.reshape(w2.shape[0], -1, *shape[2:])
    while w1.dim() < w2.dim():
        w1 = w1.unsqueeze(-1)
    out = torch.kron(w1, w2).mul_(s)
    return out.to(torch.float32).reshape(shape)


def dora(weight: torch.Tensor, dw: torch.Tensor, dora_scale: torch.Tensor) -> torch.Tensor:
    """DoRA's ΔW' = (W + ΔW)·m/‖W + ΔW‖ − W, norms per input column (A1111's
    `apply_weight_decompose`) or per output row when `dora_scale` has one value per row."""
    import torch

    w = _f64(weight)
    merged = w + _f64(dw)
    m = _f64(dora_scale)
    flat = merged.reshape(merged.shape[0], -1)
    if m.numel() == merged.shape[0] and m.shape[0] == merged.shape[0]:
        norm = flat.norm(dim=1).reshape(-1, *[1] * (merged.dim() - 1))
        mag = m.reshape(norm.shape)
    else:
        norm = merged.transpose(0, 1).reshape(merged.shape[1], -1).norm(dim=1)
        norm = norm.reshape(1, -1, *[1] * (merged.dim() - 2))
        mag = m.reshape(norm.shape)
    return (merged * (mag / norm) - w).to(torch.float32)
