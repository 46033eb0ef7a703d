"""One fused pass over tensor keys: every node to build is computed key by key, together.

For each key, the needed input tensors are read once, each node's value is computed in float32
and cast to the node's dtype (exactly what a consumer reading the cached file would see), and the
result is written to every file that wants it. Keys are independent, so `-j` workers process
different keys at once; writes land at fixed offsets, so the bytes never depend on timing.
Memory holds only the keys in flight, bounded by a byte budget.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from mergebuild.engine.dtypes import RECIPE_TO_ST, is_float, to_torch, widest
from mergebuild.engine.methods import Method
from mergebuild.engine.methods.base import Params
from mergebuild.engine.safetensors_io import StreamingWriter, TensorInfo
from mergebuild.errors import BuildError

if TYPE_CHECKING:
    import torch


class Source(Protocol):
    path: Path

    def infos(self) -> dict[str, TensorInfo]: ...
    def read(self, key: str) -> torch.Tensor: ...
    def close(self) -> None: ...


@dataclass
class NodeJob:
    name: str
    method: type[Method]
    params: Params
    dtype: str  # recipe dtype ("fp16"...) or "auto"
    inputs: list[str]  # names of sources or earlier jobs, in slot order


@dataclass
class Sink:
    """A file to produce: the value of `source` (a node or input), optionally re-cast."""

    label: str
    source: str
    fd: int
    dtype: str | None  # recipe dtype for float tensors; None keeps the value's dtype
    metadata: dict[str, str]
    infos: dict[str, TensorInfo] = field(default_factory=dict)
    writer: StreamingWriter | None = None


@dataclass
class NodeStats:
    dtype: str = ""
    tensors: int = 0
    merged: int = 0
    kept_from_a: int = 0  # float keys missing from another input: A's tensor kept
    copied_non_float: int = 0  # integer buffers such as position_ids: copied from A
    dropped: int = 0  # keys present only in non-A inputs: not in the result
    missing_examples: list[str] = field(default_factory=list)


class FusedPass:
    def __init__(self, sources: dict[str, Source], jobs: list[NodeJob], sinks: list[Sink]) -> None:
        self.sources, self.jobs, self.sinks = sources, {j.name: j for j in jobs}, sinks
        self.layouts: dict[str, dict[str, TensorInfo]] = {n: s.infos() for n, s in sources.items()}
        self.stats: dict[str, NodeStats] = {}
        for job in jobs:
            self._plan_job(job)
        for sink in sinks:
            base = self.layouts[sink.source]
            st = RECIPE_TO_ST[sink.dtype] if sink.dtype else None
            sink.infos = {
                k: TensorInfo(st if st and is_float(i.dtype) else i.dtype, i.shape)
                for k, i in base.items()
            }

    def _plan_job(self, job: NodeJob) -> None:
        ins = [self.layouts[n] for n in job.inputs]
        a = ins[0]
        if job.dtype == "auto":
            dt = widest({i.dtype for lay in ins for i in lay.values()})
        else:
            dt = RECIPE_TO_ST[job.dtype]
        st = self.stats[job.name] = NodeStats(dtype=dt)
        out: dict[str, TensorInfo] = {}
        for k, info in a.items():
            st.tensors += 1
            if not is_float(info.dtype):
                st.copied_non_float += 1
                out[k] = info
                continue
            out[k] = TensorInfo(dt, info.shape)
            others = [lay.get(k) for lay in ins[1:]]
            if any(o is None or not is_float(o.dtype) for o in others):
                st.kept_from_a += 1
                if len(st.missing_examples) < 5:
                    st.missing_examples.append(k)
                continue
            for slot_name, o in zip(job.inputs[1:], others, strict=True):
                if o is not None and o.shape != info.shape:
                    raise BuildError(
                        f"cannot merge '{job.name}': tensor '{k}' has shape {list(info.shape)} "
                        f"in '{job.inputs[0]}' but {list(o.shape)} in '{slot_name}'"
                    )
            st.merged += 1
        st.dropped = len({k for lay in ins[1:] for k in lay} - a.keys())
        self.layouts[job.name] = out

    # -- evaluation ------------------------------------------------------------------------

    def _value(self, name: str, key: str, memo: dict[str, Any]) -> torch.Tensor:
        if name in memo:
            return memo[name]
        if name in self.sources:
            val = self.sources[name].read(key)
        else:
            val = self._compute(self.jobs[name], key, memo)
        memo[name] = val
        return val

    def _compute(self, job: NodeJob, key: str, memo: dict[str, Any]) -> torch.Tensor:
        info = self.layouts[job.name][key]
        a = self._value(job.inputs[0], key, memo)
        if not is_float(info.dtype):
            return a
        if any(
            key not in self.layouts[n] or not is_float(self.layouts[n][key].dtype)
            for n in job.inputs[1:]
        ):
            return a.to(to_torch(info.dtype))
        import torch

        xs = [a.to(torch.float32)]
        xs += [self._value(n, key, memo).to(torch.float32) for n in job.inputs[1:]]
        return job.method.compute(job.params, xs).to(to_torch(info.dtype))

    def _do_key(self, key: str) -> int:
        memo: dict[str, Any] = {}
        written = 0
        for sink in self.sinks:
            info = sink.infos.get(key)
            if info is None:
                continue
            val = self._value(sink.source, key, memo)
            if val.dtype != to_torch(info.dtype):
                val = val.to(to_torch(info.dtype))
            assert sink.writer is not None
            sink.writer.write(key, val)
            written += info.nbytes
        return written

    def run(
        self,
        jobs: int = 1,
        max_memory: int = 1 << 30,
        on_key: Callable[[str, int], None] | None = None,
    ) -> None:
        """Compute and write every sink. `jobs` workers; ~`max_memory` bytes of keys in flight."""
        import torch

        for sink in self.sinks:
            sink.writer = StreamingWriter(sink.fd, sink.infos, sink.metadata)
        order = _key_order(self.sinks)
        torch_threads = torch.get_num_threads()
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(jobs, 1)))
        try:
            if jobs <= 1:
                for k in order:
                    n = self._do_key(k)
                    if on_key:
                        on_key(k, n)
            else:
                self._run_parallel(order, jobs, max_memory, on_key)
        finally:
            torch.set_num_threads(torch_threads)
        for sink in self.sinks:
            sink.writer.check_complete()

    def _cost(self, key: str) -> int:
        """Rough peak bytes for one key: float32 copies of every tensor touched."""
        return sum(4 * max(1, _numel(lay[key])) for lay in self.layouts.values() if key in lay)

    def _run_parallel(
        self, order: list[str], jobs: int, budget: int, on_key: Callable[[str, int], None] | None
    ) -> None:
        lock = threading.Lock()
        in_flight: dict[Future[int], tuple[str, int]] = {}
        used = 0
        with ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="merge") as pool:
            try:
                for k in order:
                    cost = self._cost(k)
                    while in_flight and (used + cost > budget or len(in_flight) >= 2 * jobs):
                        done, _ = wait(in_flight, return_when=FIRST_COMPLETED)
                        for fut in done:
                            key, c = in_flight.pop(fut)
                            n = fut.result()
                            used -= c
                            if on_key:
                                with lock:
                                    on_key(key, n)
                    in_flight[pool.submit(self._do_key, k)] = (k, cost)
                    used += cost
                for fut in list(in_flight):
                    key, _ = in_flight.pop(fut)
                    n = fut.result()
                    if on_key:
                        on_key(key, n)
            except BaseException:
                for fut in in_flight:
                    fut.cancel()
                raise


def _numel(info: TensorInfo) -> int:
    n = 1
    for d in info.shape:
        n *= d
    return n


def _key_order(sinks: list[Sink]) -> list[str]:
    """Keys in the file order of the first sink (sequential writes), then any others."""
    seen: dict[str, None] = {}
    for sink in sinks:
        assert sink.writer is not None
        for k in sorted(sink.infos, key=lambda k, w=sink.writer: w.offsets[k]):
            seen.setdefault(k, None)
    return list(seen)
