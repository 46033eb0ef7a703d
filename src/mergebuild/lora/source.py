"""A LoRA presented to the engine as ΔW tensors under the checkpoint's key names.

The factors are small and held in memory; each ΔW is computed when the engine first asks for
any part of its key, whole (so the bytes never depend on chunking), kept while the engine reads
its chunks, then dropped. A q/k/v module of an OpenCLIP encoder fills its third of the stacked
`in_proj_weight` ΔW (the rows of modules the LoRA lacks stay zero).
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mergebuild.engine.safetensors_io import SafetensorsSource, TensorInfo, read_header
from mergebuild.errors import BuildError
from mergebuild.lora.formats import LoraFormatError, LoraInfo, Module, is_lora, parse
from mergebuild.lora.keymap import Target, target
from mergebuild.lora.peft import alphas

if TYPE_CHECKING:
    import torch

    from mergebuild.lora.delta import Product


@dataclass(frozen=True)
class Placement:
    """One module's share of a key: the whole tensor, or rows [lo, hi)."""

    module: str
    shape: tuple[int, ...]  # the module's own ΔW shape
    rows: tuple[int, int] | None


def natural_shape(m: Module, ref: tuple[int, ...] | None) -> tuple[int, ...]:
    """ΔW's shape from the factors; flattened conv factors take their kernel from `ref`."""
    s = m.shapes
    algo = m.algorithm
    kernel: tuple[int, ...] = ()
    if algo in ("lora", "locon"):
        out, cols = s["up"][0], s["down"][1]
        kernel = s["mid"][2:] if "mid" in s else s["down"][2:]
        if kernel == (1, 1) and ref is not None and len(ref) == 2:
            kernel = ()  # a 1×1 conv LoRA on a linear layer (SD1 proj_in vs SD2)
    elif algo == "loha":
        if "hada_t1" in s:
            out, cols, kernel = s["hada_w1_a"][1], s["hada_w1_b"][1], s["hada_t1"][2:]
        else:
            out, cols = s["hada_w1_a"][0], math.prod(s["hada_w1_b"][1:])
    else:
        a, b = s["lokr_w1"][:2] if "lokr_w1" in s else (s["lokr_w1_a"][0], s["lokr_w1_b"][1])
        if "lokr_w2" in s:
            c, d, kernel = s["lokr_w2"][0], s["lokr_w2"][1], s["lokr_w2"][2:]
        elif "lokr_t2" in s:
            c, d, kernel = s["lokr_w2_a"][1], s["lokr_w2_b"][1], s["lokr_t2"][2:]
        else:
            c, d = s["lokr_w2_a"][0], math.prod(s["lokr_w2_b"][1:])
        out, cols = a * c, b * d
    if kernel:
        return (out, cols, *kernel)
    if ref is not None and len(ref) == 4:
        k = ref[2:]
        if cols % math.prod(k) == 0:
            return (out, cols // math.prod(k), *k)
    return (out, cols)


class LoraLayout(dict):  # type: ignore[type-arg]
    """A LoRA's layout (checkpoint key → ΔW info) that knows its source: merge_loras plans its
    output modules from the factors, which the engine's layouts alone do not describe."""

    source: LoraSource


class _Entry:
    def __init__(self, numel: int) -> None:
        self.lock = threading.Lock()
        self.flat: torch.Tensor | None = None
        self.rows: _RowBlocks | None = None  # a plain product, formed by row blocks
        self.left = numel  # elements the engine has not read yet


class _RowBlocks:
    """A plain product's ΔW read by fixed row blocks: each chunk forms only the blocks it
    overlaps, so workers reading chunks of one key form its ΔW in parallel (a whole ΔW under
    one lock made the other worker wait); a block two chunks share is formed once and kept
    until both have read it. The blocks are the whole tensor's (delta.Product), so the bytes
    do not depend on the chunks."""

    def __init__(self, p: Product) -> None:
        self.p = p
        self.size = p.step * p.cols  # elements per block
        self.lock = threading.Lock()
        self.blocks: dict[int, list[Any]] = {}  # index → [lock, values or None, elements left]

    def read(self, lo: int, hi: int) -> torch.Tensor:
        import torch

        first, last = lo // self.size, (hi - 1) // self.size
        if first == last:
            return self._shared(first, lo, hi)
        # blocks wholly inside the chunk are rounded straight into it (no other chunk needs
        # them); the one or two it shares with its neighbours are kept for them
        out = torch.empty(hi - lo, dtype=torch.float32)
        total = self.p.rows * self.p.cols
        for i in range(first, last + 1):
            blo, bhi = i * self.size, min((i + 1) * self.size, total)
            if lo <= blo and bhi <= hi:
                self.p.block_into(i, out[blo - lo : bhi - lo])
            else:
                a, z = max(lo, blo), min(hi, bhi)
                out[a - lo : z - lo] = self._shared(i, a, z)
        return out

    def _shared(self, i: int, lo: int, hi: int) -> torch.Tensor:
        """Elements [lo, hi) of block i, which other chunks read too: formed once, kept until
        every element of it has been read."""
        blo = i * self.size
        bhi = min(blo + self.size, self.p.rows * self.p.cols)
        with self.lock:
            b = self.blocks.setdefault(i, [threading.Lock(), None, bhi - blo])
        with b[0]:
            if b[1] is None:
                b[1] = self.p.block(i).reshape(-1)
            vals = b[1]
        with self.lock:
            b[2] -= hi - lo
            if b[2] <= 0:
                self.blocks.pop(i, None)
        return vals[lo - blo : hi - blo]


class LoraSource:
    """Source protocol (infos/read_flat/close) over a LoRA file's ΔW."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._st = SafetensorsSource(path)
        try:
            self.info: LoraInfo = parse(self._st.infos(), self._st.metadata)
        except LoraFormatError as e:
            self._st.close()
            raise BuildError(f"{path}: not a LoRA mergebuild can read: {e}") from None
        self.family = "sd1" if self.info.family == "sd1/sd2" else self.info.family
        try:
            self.alphas, self.alpha_note = alphas(path, self.info)  # PEFT: adapter_config.json
        except BuildError:
            self._st.close()
            raise
        self.targets: dict[str, Target] = {}
        self.unmapped: list[str] = []
        self.placements: dict[str, list[Placement]] = {}
        self._infos: dict[str, TensorInfo] = {}
        for name, m in self.info.modules.items():
            t = target(name, self.family)
            if t is None:
                self.unmapped.append(name)
                continue
            self.targets[name] = t
            own = natural_shape(m, t.shape)
            if t.part is not None:
                idx, n = t.part
                rows = (idx * own[0], (idx + 1) * own[0])
                shape = (own[0] * n, *own[1:])
            else:
                rows, shape = None, own
            old = self._infos.get(t.key)
            if old is not None and old.shape != shape:
                raise BuildError(f"{path}: modules for '{t.key}' disagree on its shape")
            self._infos[t.key] = TensorInfo("F32", shape)
            self.placements.setdefault(t.key, []).append(Placement(name, own, rows))
        self._lock = threading.Lock()
        self._cache: dict[str, _Entry] = {}  # ΔW of keys whose chunks are being read
        self._base: tuple[str, object] | None = None  # (name, source) DoRA renormalises against

    @property
    def dora_keys(self) -> list[str]:
        return sorted(
            k
            for k, ps in self.placements.items()
            if any(self.info.modules[p.module].dora for p in ps)
        )

    def bind_base(self, name: str, base: object) -> None:
        """The checkpoint a DoRA LoRA is baked into: its ΔW' = (W + ΔW)·m/‖W + ΔW‖ − W needs W,
        read here (whole, once per DoRA key) while the engine streams the bake."""
        if self._base is not None and self._base[1] is not base:
            raise BuildError(
                f"{self.path}: a DoRA LoRA is baked into both '{self._base[0]}' and '{name}' in "
                "one build; its update depends on the model, so bake it in one place per build"
            )
        self._base = (name, base)

    def reshape(self, key: str, shape: tuple[int, ...]) -> None:
        """Give `key`'s ΔW the checkpoint's shape (same values, other singleton dims)."""
        assert math.prod(shape) == math.prod(self._infos[key].shape)
        self._infos[key] = TensorInfo("F32", shape)

    def infos(self) -> dict[str, TensorInfo]:
        out = LoraLayout(self._infos)
        out.source = self
        return out

    def _factors_of(self, name: str) -> tuple[dict[str, torch.Tensor], float | None]:
        """A module's factors, read when its key is computed (a LoRA with both SDXL text
        encoders is ~230 MB at rank 32: read on demand, never held whole)."""
        m = self.info.modules[name]
        w = {role: self._st.read(key) for role, key in m.parts.items() if role != "dora_scale"}
        a = w.pop("alpha", None)
        return w, (float(a.reshape(-1)[0]) if a is not None else self.alphas.get(name))

    def _module_delta(self, p: Placement, key: str, base: torch.Tensor | None) -> torch.Tensor:
        """One module's ΔW (its own shape); DoRA's ΔW' against the base's rows of `key`."""
        from mergebuild.lora.delta import delta, dora

        m = self.info.modules[p.module]
        d = delta(m, *self._factors_of(p.module), p.shape)
        if not m.dora or base is None:
            return d
        w = base if p.rows is None else base[p.rows[0] : p.rows[1]]
        return dora(w.reshape(p.shape), d, self._st.read(m.parts["dora_scale"]))

    def _base_weight(self, key: str) -> torch.Tensor | None:
        if self._base is None or not any(
            self.info.modules[p.module].dora for p in self.placements[key]
        ):
            return None
        src = self._base[1]
        shape = src.infos()[key].shape  # type: ignore[attr-defined]
        return src.read_flat(key, 0, math.prod(shape)).reshape(shape)  # type: ignore[attr-defined]

    def delta(self, key: str) -> torch.Tensor:
        """The whole ΔW of `key` (float32, its shape), from every module placed there."""
        import torch

        shape = self._infos[key].shape
        places = self.placements[key]
        base = self._base_weight(key)
        if len(places) == 1 and places[0].rows is None:
            return self._module_delta(places[0], key, base).reshape(shape)
        out = torch.zeros(shape, dtype=torch.float32)
        for p in places:
            assert p.rows is not None
            out[p.rows[0] : p.rows[1]] = self._module_delta(p, key, base)
        return out

    def read_flat(self, key: str, lo: int, hi: int) -> torch.Tensor:
        with self._lock:
            entry = self._cache.get(key)
            if entry is None:
                entry = self._cache[key] = _Entry(math.prod(self._infos[key].shape))
        with entry.lock:  # one ΔW per key, computed once even when two workers ask for it
            if entry.flat is None and entry.rows is None:
                plain = self._plain(key)
                if plain is not None:
                    entry.rows = _RowBlocks(plain)
                else:
                    entry.flat = self.delta(key).reshape(-1)
            flat, rows = entry.flat, entry.rows
        out = rows.read(lo, hi) if rows is not None else flat[lo:hi]  # type: ignore[index]
        with self._lock:
            entry.left -= hi - lo
            if entry.left <= 0:
                self._cache.pop(key, None)
        return out

    def _plain(self, key: str) -> Product | None:
        """The key's ΔW as one plain product (one module, whole tensor, no DoRA), or None."""
        from mergebuild.lora.delta import product

        places = self.placements[key]
        if len(places) != 1 or places[0].rows is not None:
            return None
        m = self.info.modules[places[0].module]
        if m.dora and self._base is not None:
            return None
        p = product(m, *self._factors_of(places[0].module))
        if p is not None and p.rows * p.cols != math.prod(self._infos[key].shape):
            return None  # let delta() say what is wrong
        return p

    def close(self) -> None:
        self._cache.clear()
        self._st.close()


_IS_LORA: dict[tuple[str, int, int, int, int], bool] = {}  # (path, stat) → answer


def header_is_lora(path: Path) -> bool:
    """Whether a safetensors file holds a LoRA (read from its header; no torch). Memoized by
    the file's stat: a build asks for every model up to 15 times (roles, speculation, each
    plan, opening), and a 3000-tensor SDXL LoRA header takes ~0.1 s to parse."""
    if path.suffix.lower() not in (".safetensors", ".sft"):
        return False
    st = path.stat()
    sig = (str(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    got = _IS_LORA.get(sig)
    if got is None:
        got = _IS_LORA[sig] = is_lora(read_header(path).tensors)
    return got


def open_input(path: Path) -> object:
    """An input model for the engine: a LoRA's ΔW source, or the checkpoint reader."""
    from mergebuild.engine.readers import open_model

    if header_is_lora(path):
        return LoraSource(path)
    return open_model(path)
