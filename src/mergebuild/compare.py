"""`mergebuild compare`: how far models are from a reference, per block, component or key.

Merging is tuned by eye on X/Y plots; a number per block says where two merges actually differ
before any image is rendered. The first model is the reference Y; for every other model X and
every group of tensors (a UNet block, a component, or one key):

- `rel_l2` = ‖X − Y‖ / ‖Y‖ over the group's float tensors (0 when X is Y);
- with `--base B`, `cosine` = ⟨X − B, Y − B⟩ / (‖X − B‖·‖Y − B‖): do the two merges push the
  base in the same direction (1), unrelated directions (0) or opposite ones (−1)?

Streamed like a merge: tensors are read chunk by chunk from every file at once, so memory stays
at a few chunks whatever the model size, and each file is read once, a page-cache window
ahead of the sums from before torch is imported. Sums are float64, taken
per chunk and added in a fixed order, so the figures do not depend on threads or chunk timing.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mergebuild.errors import BuildError

if TYPE_CHECKING:
    import torch

    from mergebuild.engine.readahead import Readahead

CHUNK = 1 << 22  # elements per read: 16 MB of float32 per model and chunk
BY = ("block", "component", "key")


@dataclass
class Sums:
    """Float64 sums over a group; X is a compared model, Y the reference, B the base."""

    dxy: float = 0.0  # ‖X − Y‖²
    yy: float = 0.0  # ‖Y‖²
    ab: float = 0.0  # ⟨X − B, Y − B⟩
    aa: float = 0.0  # ‖X − B‖²
    bb: float = 0.0  # ‖Y − B‖²
    elements: int = 0

    def add(self, o: Sums) -> None:
        self.dxy += o.dxy
        self.yy += o.yy
        self.ab += o.ab
        self.aa += o.aa
        self.bb += o.bb
        self.elements += o.elements


@dataclass
class Comparison:
    reference: str
    models: list[str]
    base: str | None
    by: str
    layout: str | None
    groups: list[str]
    sums: list[dict[str, Sums]]  # per compared model: group → sums
    skipped: dict[str, list[str]] = field(default_factory=dict)  # model → keys not compared

    def rows(self) -> list[dict[str, Any]]:
        out = []
        for model, sums in zip(self.models, self.sums, strict=True):
            for g in self.groups:
                s = sums.get(g)
                if s is None:
                    continue
                out.append(
                    {
                        "model": model,
                        "group": g,
                        "rel_l2": _ratio(math.sqrt(s.dxy), math.sqrt(s.yy)),
                        "cosine": _ratio(s.ab, math.sqrt(s.aa * s.bb))
                        if self.base is not None
                        else None,
                        "elements": s.elements,
                    }
                )
        return out

    def as_json(self) -> dict[str, Any]:
        return {
            "reference": self.reference,
            "models": self.models,
            "base": self.base,
            "by": self.by,
            "layout": self.layout,
            "groups": self.groups,
            "rows": self.rows(),
            "skipped": {m: len(k) for m, k in self.skipped.items()},
        }


def _ratio(num: float, den: float) -> float | None:
    """num/den, None where undefined (a zero norm); 0/0 of identical tensors is 0."""
    if den == 0.0:
        return 0.0 if num == 0.0 else None
    return num / den


def group_of(key: str, by: str, layout: str | None, root: str | None) -> str:
    from mergebuild.sd.arch import component_of
    from mergebuild.sd.blocks import block_of

    if by == "key":
        return key
    comp = component_of(key, root)
    if by == "component" or comp != "unet" or layout is None:
        return comp
    return block_of(key, layout, root)


def _group_order(groups: set[str], by: str, layout: str | None) -> list[str]:
    from mergebuild.sd.blocks import LAYOUTS

    if by == "key":
        return sorted(groups)
    order = [*(LAYOUTS[layout] if layout and by == "block" else ("unet",))]
    order += ["text_encoder", "vae", "other"]
    return [g for g in order if g in groups] + sorted(groups - set(order))


def compare(
    paths: list[Path], names: list[str], base: Path | None = None, by: str = "block",
    jobs: int = 2,
) -> Comparison:  # fmt: skip
    """Compare `paths[1:]` against `paths[0]` (and their deltas against `base`)."""
    from mergebuild.engine.dtypes import is_float
    from mergebuild.engine.readers import open_model
    from mergebuild.sd.arch import detect, unet_root

    if by not in BY:
        raise BuildError(f"--by {by}: choose one of {', '.join(BY)}")
    if len(paths) < 2:
        raise BuildError("compare needs a reference and at least one model to compare with it")
    sources = []
    try:
        for p in [*paths, *([base] if base is not None else [])]:
            if not p.is_file():
                raise BuildError(f"no such file: {p}")
            sources.append(open_model(p))
        ref, others = sources[0], sources[1 : len(paths)]
        bsrc = sources[len(paths)] if base is not None else None
        rinfo = ref.infos()
        layout = detect(rinfo).block_layout
        root = unet_root(rinfo)
        keys = [
            k
            for k, i in sorted(rinfo.items(), key=lambda kv: _offset(ref, kv[0]))
            if is_float(i.dtype) and not k.endswith("position_ids")
        ]
        if bsrc is not None:
            binfo = bsrc.infos()
            keys = [k for k in keys if k in binfo and binfo[k].shape == rinfo[k].shape]
        result = Comparison(
            names[0], names[1:], str(base) if base else None, by, layout, [], [], {}
        )
        groups: set[str] = set()
        mine: list[set[str]] = []
        for name, src in zip(names[1:], others, strict=True):
            info = src.infos()
            mine.append({k for k in keys if k in info and info[k].shape == rinfo[k].shape})
            result.skipped[name] = sorted(
                k for k in set(rinfo) - mine[-1] if not k.endswith("position_ids")
            )
        per_key = _sum_keys(ref, others, bsrc, keys, mine, jobs)
        for i in range(len(others)):
            sums: dict[str, Sums] = {}
            for k in keys:  # fixed order: the reference file's
                if k in mine[i]:
                    g = group_of(k, by, layout, root)
                    groups.add(g)
                    sums.setdefault(g, Sums()).add(per_key[k][i])
            result.sums.append(sums)
        result.groups = _group_order(groups, by, layout)
        return result
    finally:
        for s in sources:
            s.close()


def _offset(src: Any, key: str) -> int:
    """A key's place in its file (read in file order: sequential for the disk)."""
    byte_range = getattr(src, "byte_range", None)
    return byte_range(key, 0, 0)[1] if byte_range else 0


def _chunks(n: int) -> Iterator[tuple[int, int]]:
    for lo in range(0, n, CHUNK):
        yield lo, min(n, lo + CHUNK)


def _sum_keys(
    ref: Any, xs: list[Any], b: Any | None, keys: list[str], mine: list[set[str]], jobs: int
) -> dict[str, list[Sums | None]]:
    """Per key, every compared model's sums (None where it lacks the key). Each file is read
    once: a chunk of the reference and of the base serves every model. Chunks of a key are
    added in order, so threads change no figure."""
    _advise(ref, *xs, b)
    # The disk starts now, before torch and the compiled loops are loaded (2-2.5 s on this VM,
    # the read floor of three SD1 files being 4.4-6 s): the build's page-cache window, walked
    # in the order the keys are summed.
    ahead = _readahead(ref, xs, b, keys, mine)
    try:
        return _sum_keys_read(ref, xs, b, keys, mine, jobs, ahead)
    finally:
        ahead.stop()


def _sum_keys_read(
    ref: Any,
    xs: list[Any],
    b: Any | None,
    keys: list[str],
    mine: list[set[str]],
    jobs: int,
    ahead: Readahead,
) -> dict[str, list[Sums | None]]:
    from mergebuild.engine.methods import reduce

    infos = ref.infos()
    # full-size models: every chunk through the compiled loops (numba's ~1 s load pays off)
    big = sum(math.prod(infos[k].shape) for k in keys) >= reduce.COMPILED_MIN
    compiled = big and reduce.kernels() is not None

    def one(index: int, key: str) -> list[Sums | None]:
        out: list[Sums | None] = [Sums() if key in m else None for m in mine]
        ahead.advance(index)
        if not any(out):
            return out
        for lo, hi in _chunks(math.prod(infos[key].shape)):
            y = ref.read_flat(key, lo, hi)
            bb = None if b is None else b.read_flat(key, lo, hi)
            for x, s in zip(xs, out, strict=True):
                if s is not None:
                    s.add(_chunk_sums(y, x.read_flat(key, lo, hi), bb, lo, hi, compiled))
        return out

    import torch

    from mergebuild.engine.tuning import merging

    # the merge's process settings: freed read buffers reused instead of page-faulted afresh,
    # no GC scans. One torch thread per reader when the compiled loops sum (torch then only
    # widens 16-bit values: two threads each splitting that copy in two ran 3x slower); else
    # torch's own (torch.dot's float64 sums differed in the last bits from run to run with one)
    threads = torch.get_num_threads()
    if compiled:
        torch.set_num_threads(1)
    try:
        with merging(), ThreadPoolExecutor(max(1, jobs)) as pool:
            return dict(zip(keys, pool.map(one, range(len(keys)), keys), strict=True))
    finally:
        torch.set_num_threads(threads)


def _readahead(
    ref: Any, xs: list[Any], b: Any | None, keys: list[str], mine: list[set[str]]
) -> Readahead:
    """Every key's byte ranges in every file it is read from, advised a window ahead."""
    from mergebuild.engine.readahead import Readahead, default_window

    infos = ref.infos()
    units = []
    for k in keys:
        sources = [x for x, m in zip(xs, mine, strict=True) if k in m]
        if sources:  # else the key is not read at all
            sources += [ref, *([b] if b is not None else [])]
        n = math.prod(infos[k].shape)
        units.append([s.byte_range(k, 0, n) for s in sources if hasattr(s, "byte_range")])
    return Readahead(units, default_window()).start()


SUM_TILE = 1 << 15  # float64 elements per tile: the temporaries of one tile stay in L2


def _chunk_sums(
    y: torch.Tensor,
    x: torch.Tensor,
    bb: torch.Tensor | None,
    lo: int,
    hi: int,
    compiled: bool = False,
) -> Sums:
    """A chunk's float64 sums, tile by tile (added in order: the same figures on any run).
    Why tiles: float64 copies of a whole 4 Mi-element chunk stream through main memory; the
    same work on L2-sized tiles ran 4-5× faster. Widened through float32 (reduce.Widen): the
    same values as half → double, faster."""
    import torch

    from mergebuild.engine.methods.reduce import Widen

    s = Sums(elements=hi - lo)
    if compiled:
        return _compiled_sums(y, x, bb, s)
    size = min(SUM_TILE, hi - lo)
    widen = Widen(size, 3)
    d = torch.empty(size, dtype=torch.float64)
    for t in range(0, hi - lo, SUM_TILE):
        n = min(SUM_TILE, hi - lo - t)
        yt = torch.from_numpy(widen(0, y[t : t + n]))
        xt = torch.from_numpy(widen(1, x[t : t + n]))
        dt = torch.sub(xt, yt, out=d[:n])
        s.dxy += float(torch.dot(dt, dt))
        s.yy += float(torch.dot(yt, yt))
        if bb is not None:
            bt = torch.from_numpy(widen(2, bb[t : t + n]))
            xa, ya = xt.sub_(bt), yt.sub_(bt)
            s.ab += float(torch.dot(xa, ya))
            s.aa += float(torch.dot(xa, xa))
            s.bb += float(torch.dot(ya, ya))
    return s


LANES = 1024  # independent float64 accumulators per sum in the compiled loop


def _compiled_sums(y: torch.Tensor, x: torch.Tensor, bb: torch.Tensor | None, s: Sums) -> Sums:
    """`_chunk_sums` as compiled loops (_kernels.difference_sums) that release the GIL, so the
    reading threads sum in parallel. Element i of the chunk goes to lane i mod LANES, each
    lane adds in order, and the lanes are then added pairwise in a fixed tree: the figures
    depend only on the chunk's values."""
    import numpy as np

    from mergebuild.engine.methods.reduce import AsNumpy, half_bits, kernels

    difference_sums = kernels().difference_sums  # type: ignore[union-attr]  # checked by caller

    n = s.elements
    acc = np.zeros((5, LANES))
    hy, hx = half_bits(y), half_bits(x)
    hb = np.empty(0, dtype=np.uint16) if bb is None else half_bits(bb)
    if hy is not None and hx is not None and hb is not None:  # float16: read as bits, one call
        difference_sums(hy, hx, hb, acc)
        return _lanes(acc, bb is not None, s)
    size = min(n, SUM_TILE * 8)
    fy, fx = AsNumpy(y, size), AsNumpy(x, size)
    fb = None if bb is None else AsNumpy(bb, size)
    none = np.empty(0, dtype=np.float32)
    for t in range(0, n, size):  # size is a multiple of LANES: lanes stay i mod LANES
        hi = min(n, t + size)
        difference_sums(fy(t, hi), fx(t, hi), none if fb is None else fb(t, hi), acc)
    return _lanes(acc, bb is not None, s)


def _lanes(acc: Any, based: bool, s: Sums) -> Sums:
    """The lanes of difference_sums added pairwise in a fixed tree, into `s`."""
    width = LANES
    while width > 1:
        width //= 2
        acc = acc[:, :width] + acc[:, width : 2 * width]
    s.dxy, s.yy = float(acc[0, 0]), float(acc[1, 0])
    if based:
        s.ab, s.aa, s.bb = float(acc[2, 0]), float(acc[3, 0]), float(acc[4, 0])
    return s


def _advise(*sources: Any) -> None:
    """Sequential readahead on every file (a hint: nothing changes if it is refused)."""
    for src in sources:
        fd = getattr(src, "fd", -1)
        if isinstance(fd, int) and fd >= 0:
            with contextlib.suppress(AttributeError, OSError):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)


def text(c: Comparison) -> str:
    """One table: a row per group, a column per compared model."""
    rows = c.rows()
    cell = {(r["model"], r["group"]): r for r in rows}
    width = max(8, *(len(g) for g in c.groups)) if c.groups else 8
    head = f"{'group':<{width}}" + "".join(f"  {m[:22]:>22}" for m in c.models)
    what = "‖X−Y‖/‖Y‖" + (" | cos(X−B, Y−B)" if c.base else "")
    lines = [f"reference Y: {c.reference}" + (f"; base B: {c.base}" if c.base else ""), what, head]
    for g in c.groups:
        parts = []
        for m in c.models:
            r = cell.get((m, g))
            parts.append(f"  {_cell(r, c.base is not None):>22}")
        lines.append(f"{g:<{width}}" + "".join(parts))
    for m, keys in c.skipped.items():
        if keys:
            lines.append(f"note: {len(keys)} keys of the reference not compared with {m} "
                         "(missing, another shape, not float, or not in the base)")  # fmt: skip
    return "\n".join(lines)


def _cell(r: dict[str, Any] | None, with_cos: bool) -> str:
    if r is None:
        return "—"
    rel = "n/a" if r["rel_l2"] is None else f"{r['rel_l2']:.4g}"
    if not with_cos:
        return rel
    cos = "n/a" if r["cosine"] is None else f"{r['cosine']:+.3f}"
    return f"{rel} | {cos}"
