"""One fused pass over tensor keys: every node to build is computed key by key, together.

For each key, the needed input tensors are read once, each node's value is computed in float32
and cast to the node's dtype (exactly what a consumer reading the cached file would see), and the
result is written to every file that wants it. Large tensors of elementwise methods are cut into
flat chunks, so memory holds a few chunks per worker whatever the model size, and `-j` workers
share even a single huge key. Every chunk lands at a fixed file offset, so bytes never depend on
timing or thread count. Reading ahead (readahead.py) and writing (stream_writer.py) run in
their own threads, so the disk streams while the workers compute.

This module is the IO scheduling: units, the byte ranges they read, the readahead, the workers
and the files written. What a node computes for one key (key plans, per-key parameters, method
calls) is the per-key stage in compute.py.
"""

from __future__ import annotations

import math
import os
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from mergebuild.engine.arrays import (
    NP_NAMES,
    as_tensor,
    ensure_torch,
    import_torch_ahead,
    is_array,
    restore_threads,
)
from mergebuild.engine.compute import KeyCompute, NodeJob, NodeStats, Unit, mergeable
from mergebuild.engine.dtypes import ITEMSIZE, RECIPE_TO_ST, cast
from mergebuild.engine.hash_tap import HashTap
from mergebuild.engine.readahead import (
    DIRECT_BUFFERS,
    Readahead,
    default_window,
    open_direct,
    read_mode,
)
from mergebuild.engine.safetensors_io import SafetensorsSource, TensorInfo
from mergebuild.engine.stream_writer import StreamingWriter, check_space, shares
from mergebuild.engine.tuning import merging, release_freed_memory
from mergebuild.errors import BuildError
from mergebuild.hashing import FileHashes

if TYPE_CHECKING:
    import torch

__all__ = ["FusedPass", "NodeJob", "NodeStats", "Sink", "Source", "Unit"]

TRIM_ELEMENTS = 1 << 23  # a whole unit this large hands its freed memory back (tuning.py)
# 2 Mi elements (8 MB as float32); the variable exists so tests can exercise chunking on tiny models
CHUNK_ELEMENTS = int(os.environ.get("MERGEBUILD_CHUNK_ELEMENTS", 1 << 21))
# units below SMALL_UNIT elements go to the workers in batches of about BATCH_ELEMENTS (_batches)
SMALL_UNIT, BATCH_ELEMENTS = 1 << 16, 1 << 18


class Source(Protocol):
    path: Path

    def infos(self) -> dict[str, TensorInfo]: ...
    def read_flat(self, key: str, lo: int, hi: int) -> torch.Tensor: ...
    def close(self) -> None: ...


@dataclass
class Sink:
    """A file to produce: the value of `source` (a node or input), optionally re-cast."""

    label: str
    source: str
    fd: int
    dtype: str | None  # recipe dtype for float tensors; None keeps the value's dtype
    metadata: dict[str, str]
    options: dict[str, Any] = field(default_factory=dict)  # prune/components/include/exclude
    vae: str | None = None  # source whose tensors replace first_stage_model.*
    infos: dict[str, TensorInfo] = field(default_factory=dict)
    writer: StreamingWriter | None = None
    vae_keys: dict[str, str] = field(default_factory=dict)  # output key → key in `vae`
    clamped: int = 0  # values beyond an fp8 output dtype's range, clamped when cast
    scaled: dict[str, str] = field(default_factory=dict)  # scaled fp8: weight → scale key
    derived: set[str] = field(default_factory=set)  # keys written with another (scales, marker)


class FusedPass:
    def __init__(
        self,
        sources: dict[str, Source],
        jobs: list[NodeJob],
        sinks: list[Sink],
        device: str = "cpu",
        hash_sources: set[str] | None = None,
    ) -> None:
        self.sources, self.sinks, self.device = sources, sinks, device
        self._clamp_lock = threading.Lock()
        # inputs to hash from the bytes the pass reads (hash_tap.py): a first build reads once
        self.hash_sources = hash_sources or set()
        self.input_hashes: dict[str, FileHashes] = {}  # filled by run()
        self.taps: dict[int, HashTap] = {}  # source fd → the tap of its file, during run()
        layouts = {n: s.infos() for n, s in sources.items()}
        # checks every job's inputs
        self.compute = KeyCompute(layouts, jobs, sinks, device, sources=sources)
        self.jobs, self.layouts, self.stats = self.compute.jobs, layouts, self.compute.stats
        self.readahead: Readahead | None = None  # set during run()
        self.arrays = False  # during run(): values are numpy arrays, torch not imported
        for sink in sinks:
            self._plan_sink(sink)
        self._start_loading()

    def _start_loading(self) -> None:
        """Import torch (if a key needs it) and load the compiled loops (if a method uses
        them on full-size tensors) in the background from here, while the files open and the
        readahead starts, rather than once the pass runs: torch's import took 2.1 s between
        the readahead's start and the first unit of a SDXL LoRA bake."""
        sizes = {
            k: math.prod(i.shape)
            for s in self.sinks
            for k, i in s.infos.items()
            if k not in s.derived
        }
        self.needs_torch = any(self.compute.needs_torch(k) for k in sizes)
        if self.needs_torch and "torch" not in sys.modules:
            threading.Thread(target=import_torch_ahead, name="import-torch", daemon=True).start()
        self._load_compiled_loops(max(sizes.values(), default=0))

    def _plan_sink(self, sink: Sink) -> None:
        """The output's tensors: its source's, a baked-in VAE's, then the options' selection."""
        from mergebuild.sd.arch import unet_root
        from mergebuild.sd.output import selector, vae_keys

        base = dict(self.layouts[sink.source])
        if sink.vae is not None:
            vae = self.layouts[sink.vae]
            sink.vae_keys = vae_keys(vae)
            if not sink.vae_keys:
                raise BuildError(f"output '{sink.label}': '{sink.vae}' holds no VAE tensors")
            for k, vk in sink.vae_keys.items():
                old = base.get(k)
                if old is not None and old.shape != vae[vk].shape:
                    raise BuildError(
                        f"output '{sink.label}': VAE tensor '{vk}' of '{sink.vae}' has shape "
                        f"{list(vae[vk].shape)} but '{k}' is {list(old.shape)} in '{sink.source}'"
                    )
                base[k] = vae[vk]
        if sink.options:
            keep = selector(sink.options, unet_root(base))
            base = {k: i for k, i in base.items() if keep(k)}
            sink.vae_keys = {k: v for k, v in sink.vae_keys.items() if k in base}
            if not base:
                raise BuildError(f"output '{sink.label}': the options leave no tensors to write")
        if sink.dtype == "fp8_e4m3fn_scaled":
            from mergebuild.engine.scaled_fp8 import scaled_layout

            sink.infos, sink.scaled = scaled_layout(base, unet_root(base))
            sink.derived = set(sink.infos) - set(base)
            return
        st = RECIPE_TO_ST[sink.dtype] if sink.dtype else None
        sink.infos = {
            k: TensorInfo(st if st and mergeable(k, i.dtype) else i.dtype, i.shape)
            for k, i in base.items()
        }

    # -- work units ---------------------------------------------------------------------------

    def _chunkable(self, key: str) -> bool:
        """Elementwise everywhere and one shape for the key in every layout that has it."""
        if not self.compute.elementwise or any(key in s.scaled for s in self.sinks):
            return False  # a scaled fp8 weight's scale needs the whole tensor
        shapes = {lay[key].shape for lay in self.layouts.values() if key in lay}
        return len(shapes) == 1

    def units(self) -> Iterator[Unit]:
        for key in _key_order(self.sinks):
            numel = math.prod(next(s.infos[key] for s in self.sinks if key in s.infos).shape)
            if numel <= CHUNK_ELEMENTS or not self._chunkable(key):
                yield Unit(key, 0, numel, True)
                continue
            for lo in range(0, numel, CHUNK_ELEMENTS):
                yield Unit(key, lo, min(lo + CHUNK_ELEMENTS, numel), False)

    def _ranges(self, u: Unit) -> list[tuple[int, int, int]]:
        """The file byte ranges unit `u` will read, for the readahead thread."""
        out = []
        for name, key in self.compute.key_plan(u.key).reads:
            src = self.sources[name]
            if hasattr(src, "byte_range"):
                hi = math.prod(self.layouts[name][key].shape) if u.whole else u.hi
                out.append(src.byte_range(key, 0 if u.whole else u.lo, hi))
        return out

    # -- evaluation ---------------------------------------------------------------------------

    def _read(self, name: str, key: str, u: Unit) -> torch.Tensor:
        """Unit `u` of `key` in source `name`: from the direct-read buffers when the readahead
        fetched it, else read now (and hashed, for a first build's taps). A whole unit comes
        back in the source's own shape."""
        src = self.sources[name]
        shape = self.layouts[name][key].shape
        lo, hi = (0, math.prod(shape)) if u.whole else (u.lo, u.hi)
        if not isinstance(src, SafetensorsSource):
            val = src.read_flat(key, lo, hi)
        else:
            data = self._read_bytes(src, key, lo, hi)
            plain = self.arrays and src.plain  # a numpy-only pass (arrays.py)
            val = src.array_from(key, data) if plain else src.tensor_from(key, data)
        return val.reshape(shape) if u.whole else val

    def _read_bytes(self, src: SafetensorsSource, key: str, lo: int, hi: int) -> Any:
        """The stored bytes of elements [lo, hi) of `key` (numpy uint8), hashed if tapped."""
        fd, offset, length = src.byte_range(key, lo, hi)
        data = None if self.readahead is None else self.readahead.take(fd, offset, length)
        if data is None:
            data = src.read_bytes(key, lo, hi)
        tap = self.taps.get(fd)
        if tap is not None:
            tap.feed(offset, data)
        return data

    def _do_unit(self, u: Unit) -> None:
        self.compute.evaluate(u, self._read, lambda s, val, lo=0: self._write(s, u, val, lo))
        if u.whole and u.hi - u.lo >= TRIM_ELEMENTS:
            release_freed_memory()

    def _write(self, s: int, u: Unit, val: torch.Tensor, lo: int = 0) -> None:
        """Unit `u` of sink `s` (or a tile of it starting `lo` elements in), cast to the
        file's dtype, at its fixed offset."""
        sink = self.sinks[s]
        assert sink.writer is not None
        if u.key in sink.scaled:  # a whole tensor (never chunked, never tiled)
            from mergebuild.engine.scaled_fp8 import quantize

            val, scale = quantize(as_tensor(val))
            sink.writer.write(sink.scaled[u.key], scale)
            over = 0
        elif is_array(val) and val.dtype.name == NP_NAMES.get(sink.infos[u.key].dtype):
            over = 0  # already the file's dtype: written as it is
        else:
            val, over = cast(as_tensor(val), sink.infos[u.key].dtype)
        if over:  # an fp8 output: values beyond its range were clamped (counted for a warning)
            with self._clamp_lock:
                sink.clamped += over
        sink.writer.write(u.key, val, u.lo + lo)

    def _cost(self, u: Unit) -> int:
        """Rough peak bytes for one unit: raw reads plus float32 temporaries of the computed
        values it holds at once (a long chain frees each value after its consumer)."""
        n = u.hi - u.lo
        plan = self.compute.key_plan(u.key)
        raw = sum(n * ITEMSIZE[self.layouts[name][key].dtype] for name, key in plan.reads)
        return raw + 12 * n * max(1, plan.peak)

    # -- driver -------------------------------------------------------------------------------

    def run(
        self,
        jobs: int = 1,
        max_memory: int = 1 << 30,
        on_unit: Callable[[Unit, bool], None] | None = None,
    ) -> None:
        """Compute and write every sink with `jobs` workers and ~`max_memory` bytes in flight.

        `on_unit(unit, key_done)` is called from the driver thread after each unit is written.
        """
        writers = []
        share = shares(len(self.sinks))
        for sink in self.sinks:
            sink.writer = StreamingWriter(
                sink.fd, sink.infos, sink.metadata, start=False, share=share
            )
            writers.append(sink.writer)
        try:
            check_space(writers)
            for w in writers:
                w.start()
            with merging():
                self._run_units(jobs, max_memory, on_unit)
            for w in writers:
                w.finish()
        finally:
            for w in writers:
                w.close()

    def _run_units(
        self, jobs: int, max_memory: int, on_unit: Callable[[Unit, bool], None] | None
    ) -> None:
        units = list(self.units())
        direct = {}  # fd → O_DIRECT twin, for inputs mostly outside the page cache
        for src in self.sources.values():
            if isinstance(src, SafetensorsSource) and read_mode(src.fd) == "direct":
                twin = open_direct(src.fd)
                if twin >= 0:
                    direct[src.fd] = twin
        budget = min(DIRECT_BUFFERS, max_memory // 2)  # read-ahead buffers are memory too
        ranges = [self._ranges(u) for u in units]
        # one whole-tensor unit up to a third of the budget is read ahead directly too (the
        # rest take the page cache, which costs CPU). A tenth: SD1 slerp 14.3-14.8 -> 10.7-11.6 s,
        # ties 28 -> 23-25 s, RSS unchanged; a third (ties' 4 x 76 MB key too): ties 15.4-16.0
        # -> 13.8-14.6 s, CPU 19.7-21.0 -> 18.2-18.8 s, RSS 0.80-0.85 -> 0.88-0.92 GB
        readahead = Readahead(
            ranges, default_window(), direct, buffer_bytes=budget, huge_bytes=max_memory // 3
        )
        self.readahead = readahead.start()
        try:
            self._start_taps(ranges)  # inside: the `finally` below stops them
            self.arrays = self._without_torch(units)
            if not self.arrays:
                # imported once the disk is already busy: it takes 1.5-2 s; one intra-op
                # thread, as parallelism comes from workers on independent units
                ensure_torch()
            try:
                remaining: dict[str, int] = {}
                for u in units:
                    remaining[u.key] = remaining.get(u.key, 0) + 1

                def done(u: Unit) -> None:
                    remaining[u.key] -= 1
                    if on_unit:
                        on_unit(u, remaining[u.key] == 0)

                if jobs <= 1:
                    for i, u in enumerate(units):
                        readahead.advance(i)
                        self._do_unit(u)
                        done(u)
                else:
                    read = [sum(n for _, _, n in r) for r in ranges]
                    self._run_parallel(units, read, jobs, max_memory, done, readahead)
            finally:
                restore_threads()
                self.arrays = False
            self.input_hashes = {
                name: self.taps[self.sources[name].fd].finish()  # type: ignore[attr-defined]
                for name in sorted(self.hash_sources)
            }
        finally:
            readahead.stop()
            self.readahead = None
            for twin in direct.values():
                os.close(twin)
            for tap in self.taps.values():
                tap.close()
            self.taps = {}

    def _without_torch(self, units: list[Unit]) -> bool:
        """Whether this pass runs on numpy arrays without importing torch (arrays.py): no key
        needs it and the compiled loops load (~0.7 s, where torch's import took 1.5-2 s)."""
        from mergebuild.engine.methods import reduce

        if not units or self.needs_torch:
            return False
        return reduce.kernels() is not None

    def _load_compiled_loops(self, largest: int) -> None:
        """Load numba's loops (~0.7 s) in the background (`_start_loading`) when a method uses
        them on tensors of `largest` elements or more: rather than in the worker that first
        needs them, or in `_without_torch`, which then only waits for the rest (first write
        of SD1 add_difference ~1.8-2.1 -> ~1.5 s)."""
        from mergebuild.engine.compute import uses_loops
        from mergebuild.engine.methods import reduce

        if (
            self.device == "cpu"
            and any(uses_loops(j.method) for j in self.jobs.values())
            and largest >= reduce.COMPILED_MIN
        ):
            threading.Thread(target=reduce.kernels, name="load-loops", daemon=True).start()

    def _start_taps(self, ranges: list[list[tuple[int, int, int]]]) -> None:
        """One tap per file to hash, fed by every source reading that file."""
        by_file: dict[str, list[int]] = {}  # real path → fds of the sources reading it
        for name in self.hash_sources:
            src = self.sources[name]
            assert isinstance(src, SafetensorsSource)  # the planner hashes other inputs first
            by_file.setdefault(os.path.realpath(src.path), []).append(src.fd)
        for fds in by_file.values():
            planned = [(off, n) for unit in ranges for fd, off, n in unit if fd in fds]
            tap = HashTap(fds[0], os.fstat(fds[0]).st_size, planned)
            for fd in fds:
                self.taps[fd] = tap

    def _run_parallel(
        self,
        units: list[Unit],
        read: list[int],
        jobs: int,
        budget: int,
        done: Callable[[Unit], None],
        readahead: Readahead,
    ) -> None:
        """`read[i]`: bytes unit i reads. A batch starts as one unit for the readahead, so it
        reads at most an eighth of the direct-read buffers (the rest go to the units after)."""
        from mergebuild.engine.methods.reduce import kernels_memory

        in_flight: dict[Future[None], tuple[list[Unit], int]] = {}
        used = 0

        def reap(block: bool) -> None:
            nonlocal used
            ready, _ = wait(in_flight, return_when=FIRST_COMPLETED) if block else (in_flight, ())
            for fut in list(ready):
                batch, c = in_flight.pop(fut)
                used -= c
                fut.result()
                for u in batch:
                    done(u)

        small = threading.Lock()  # small units: one worker at a time (see _batches)
        # What whole units hold at once (their inputs, read whole: a whole-tensor method's
        # large keys), at most a quarter of the budget, except one alone. SD1 TIES (3 models)
        # peaked at 1.03-1.07 GB with a 236 MB and a 118 MB key in flight together; such keys
        # are few and far apart in file order, so the other worker seldom waits for one.
        held = [0]
        room_held = threading.Condition()
        held_cap = budget // 4

        def run_batch(first: int, batch: list[Unit]) -> None:
            if len(batch) == 1 and batch[0].hi - batch[0].lo >= SMALL_UNIT:
                n = read[first] if batch[0].whole else 0
                with room_held:
                    while held[0] and held[0] + n > held_cap:
                        room_held.wait()
                    held[0] += n
                try:
                    self._do_unit(batch[0])
                finally:
                    with room_held:
                        held[0] -= n
                        room_held.notify_all()
                return
            with small:
                for u in batch:
                    self._do_unit(u)

        with ThreadPoolExecutor(
            max_workers=jobs, thread_name_prefix="merge", initializer=_one_torch_thread
        ) as pool:
            try:
                cap = readahead.buffer_bytes // 8
                for first, batch in _batches(units, read, cap):
                    cost = sum(self._cost(u) for u in batch)
                    # once loaded, the compiled loops' memory is part of the budget too
                    room = budget - kernels_memory()
                    while in_flight and (used + cost > room or len(in_flight) >= 2 * jobs):
                        reap(block=True)
                    readahead.advance(first)
                    in_flight[pool.submit(run_batch, first, batch)] = (batch, cost)
                    used += cost
                while in_flight:
                    reap(block=True)
            except BaseException:
                for fut in in_flight:
                    fut.cancel()
                raise


def _one_torch_thread() -> None:
    """A merge worker's torch runs single-threaded, as the driver's does at -j1.

    Why here too: MKL keeps its thread count per calling thread, and a new thread gets the
    default (every core), whatever `torch.set_num_threads` said on the driver. LAPACK's SVD
    (extract_lora, merge_loras) gives other bits with another thread count, so -j2 wrote
    other LoRA bytes than -j1; and two workers each asking for every core oversubscribe."""
    if "torch" in sys.modules:  # else the worker sets it up if it ever needs torch
        ensure_torch()


def _batches(units: list[Unit], read: list[int], cap: int) -> Iterator[tuple[int, list[Unit]]]:
    """(index of the first, units) per work item: a large unit alone, small neighbours together
    (up to BATCH_ELEMENTS elements and `cap` bytes read).

    Why: a key of a few thousand elements computes in tens of microseconds, less than one
    round trip through the pool (submit, wake a worker, wait, reap) and the GIL hand-offs of two
    workers taking turns; batched, SD1's ~1100 mostly small keys cost a fraction of that.
    Units still run one by one and land at their fixed offsets: bytes do not change.
    """
    batch: list[Unit] = []
    first = size = nbytes = 0
    for i, u in enumerate(units):
        n = u.hi - u.lo
        if batch and (n >= SMALL_UNIT or nbytes + read[i] > cap):
            yield first, batch
            batch, size, nbytes = [], 0, 0
        if n >= SMALL_UNIT:
            yield i, [u]
            continue
        if not batch:
            first = i
        batch.append(u)
        size += n
        nbytes += read[i]
        if size >= BATCH_ELEMENTS:
            yield first, batch
            batch, size, nbytes = [], 0, 0
    if batch:
        yield first, batch


def _key_order(sinks: list[Sink]) -> list[str]:
    """Keys in the file order of each sink in turn (sequential writes)."""
    seen: dict[str, None] = {}
    for sink in sinks:
        assert sink.writer is not None
        for k in sorted(sink.infos, key=lambda k, w=sink.writer: w.offsets[k]):
            if k not in sink.derived:
                seen.setdefault(k, None)
    return list(seen)
