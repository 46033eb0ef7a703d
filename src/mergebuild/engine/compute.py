"""The per-key stage: what every node computes for one tensor key, apart from how keys are read
and written (executor.py).

For a key, a key plan orders the values the outputs need (sources' tensors, then each node's
value once its inputs exist, freed after their last use); each node gets its parameters for
that key (block weights resolved) and its method is called: elementwise methods on any slice,
in cache-sized tiles; whole-tensor methods (norms, top-k, medians) on the key's full tensors.
Kept apart from the IO scheduling so a method with per-tensor statistics changes only this
stage, and the readahead, workers and writers never see a method.
"""

from __future__ import annotations

import math
import threading
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Protocol

from mergebuild.engine.arrays import (
    NP_NAMES,
    as_tensor,
    as_tensors,
    ensure_torch,
    is_array,
    numel,
)
from mergebuild.engine.dtypes import FP8_MAX, RECIPE_TO_ST, cast, is_float, to_torch, widest
from mergebuild.engine.methods import Method
from mergebuild.engine.methods.base import ComputeContext, Params, Tiles
from mergebuild.engine.safetensors_io import TensorInfo
from mergebuild.errors import BuildError
from mergebuild.sd.arch import is_position_ids

if TYPE_CHECKING:
    import torch

TILE_ELEMENTS = 1 << 18  # 1 MB as float32: a method's temporaries stay in L2 (see _tiled)


@dataclass
class NodeJob:
    name: str
    method: type[Method]
    params: Params
    dtype: str  # recipe dtype ("fp16"...) or "auto"
    inputs: list[str]  # names of sources or earlier jobs, in slot order
    key: str = ""  # the node's content key: with the key name, what seeds a random method


@dataclass
class NodeStats:
    dtype: str = ""
    tensors: int = 0
    merged: int = 0
    kept_from_a: int = 0  # float keys missing from another input: A's tensor kept
    copied_non_float: int = 0  # integer buffers such as position_ids: copied from A
    dropped: int = 0  # keys present only in non-A inputs: not in the result
    missing_examples: list[str] = field(default_factory=list)
    nonfinite: set[str] = field(default_factory=set)  # keys whose result holds NaN or Inf
    clamped: int = 0  # values beyond an fp8 dtype's range, clamped to its largest finite
    clamped_keys: set[str] = field(default_factory=set)
    report: dict[str, Any] = field(default_factory=dict)  # what a method adds (ctx.report)


@dataclass(frozen=True)
class Unit:
    """A slice [lo, hi) of one key's flattened elements; whole=True means the full tensor."""

    key: str
    lo: int
    hi: int
    whole: bool


@dataclass(frozen=True)
class Step:
    """One value of a key plan: a source's tensor or a job's result, in slot `i` for step i."""

    name: str
    key: str  # the key read (a baked-in VAE's own key) or the unit's key for a job
    is_job: bool
    args: tuple[int, ...]  # slots of the job's inputs, `a` first (only `a`: key not merged)
    sinks: tuple[int, ...]  # sinks written with this value
    free: tuple[int, ...]  # slots no later step needs: dropped after this step


@dataclass(frozen=True)
class KeyPlan:
    steps: tuple[Step, ...]
    reads: tuple[tuple[str, str], ...]  # (source, key) in the order the steps read them
    peak: int  # most computed values alive at once
    # per step: how many steps from it on go out together tile by tile (0: not such a start)
    runs: tuple[int, ...]


class Target(Protocol):
    """What the per-key stage needs of a file being written (executor.Sink has it)."""

    source: str
    vae: str | None
    infos: dict[str, TensorInfo]
    vae_keys: dict[str, str]
    scaled: dict[str, str]  # keys written as scaled fp8: their scale needs the whole tensor


class KeyCompute:
    """Every job's layout, checked up front, and its values key by key (see the module doc).

    `layouts` starts with the sources' tensors and gains each job's; `targets` are the files
    being written, whose `infos` may be filled in after this is made (key plans are lazy).
    """

    def __init__(
        self,
        layouts: dict[str, dict[str, TensorInfo]],
        jobs: list[NodeJob],
        targets: Sequence[Target],
        device: str = "cpu",
        sources: Mapping[str, Any] | None = None,
    ) -> None:
        self.layouts, self.jobs, self.targets = layouts, {j.name: j for j in jobs}, targets
        self.device = device
        self.sources = sources or {}  # for methods that check their inputs' files (LoRAs)
        self.stats: dict[str, NodeStats] = {}
        # job → (key → params with block weights resolved, UNet prefix of the job's `a`)
        self.key_params: dict[str, tuple[dict[str, Params], str | None]] = {}
        # (job, key) → n: merge only the first n input channels, the rest come from `a`
        self.channel_merge: dict[tuple[str, str], int] = {}
        # job → (output key → the input key it is computed from), for jobs with their own keys
        self.key_sources: dict[str, dict[str, str]] = {}
        # job → per input slot, a's key → that input's key: Flux files spelled differently
        # (bare vs model.diffusion_model. keys) are read under their own names
        self.renames: dict[str, list[dict[str, str] | None]] = {}
        self._key_plans: dict[str, KeyPlan] = {}
        self._lock = threading.Lock()  # workers add to the clamp counts
        for job in jobs:
            self._plan_job(job)

    @property
    def elementwise(self) -> bool:
        """Every job may run on any slice of a key (else units are whole tensors)."""
        return all(j.method.elementwise for j in self.jobs.values())

    def _plan_job(self, job: NodeJob) -> None:
        from mergebuild.sd.arch import (
            detect,
            extra_channels,
            flux_key_map,
            merge_compatibility,
            unet_root,
        )
        from mergebuild.sd.blocks import LAYOUT_NAMES, block_alphas

        ins = [self.layouts[n] for n in job.inputs]
        a = ins[0]
        archs = [detect(lay) for lay in ins]
        others = zip(archs[1:], ins[1:], strict=True)
        renames = [None, *(flux_key_map(archs[0], o, lay) for o, lay in others)]
        if any(renames):
            self.renames[job.name] = renames
            ins = [a, *(_renamed(lay, m) for lay, m in zip(ins[1:], renames[1:], strict=True))]
        job.method.check_inputs(job, [self.sources.get(n) for n in job.inputs], ins)
        if len(ins) > 1 and not job.method.optional_inputs:
            why = merge_compatibility(job.inputs, archs)
            if why:
                raise BuildError(f"cannot merge '{job.name}': {why}")
        blocky = block_alphas(job.params)
        for pname, alpha in blocky:
            want = archs[0].block_layout
            if alpha.layout and want and alpha.layout != want:
                raise BuildError(
                    f"cannot merge '{job.name}': {pname} uses the {LAYOUT_NAMES[alpha.layout]} "
                    f"block layout but '{job.inputs[0]}' is {archs[0].describe()}; give "
                    f"{LAYOUT_NAMES[want]} block weights (for a mapping: 'layout: {want}')"
                )
        if blocky:
            self.key_params[job.name] = ({}, unet_root(a))
        if job.dtype == "auto":
            typed = ins[:1] if job.method.dtype_from_a else ins
            dt = widest({i.dtype for lay in typed for i in lay.values()})
        else:
            dt = RECIPE_TO_ST[job.dtype]
        st = self.stats[job.name] = NodeStats(dtype=dt)
        own = job.method.output_keys(job.params, ins)
        if own is not None:  # e.g. LoRA factors: keys of their own, each from one input key
            self.key_sources[job.name] = {k: src for k, (_, src) in own.items()}
            self.layouts[job.name] = {k: TensorInfo(dt, shape) for k, (shape, _) in own.items()}
            st.tensors = st.merged = len(own)
            return
        out: dict[str, TensorInfo] = {}
        for k, info in a.items():
            st.tensors += 1
            if not mergeable(k, info.dtype):
                if is_float(info.dtype):
                    warnings.warn(
                        f"'{job.inputs[0]}' has damaged {k} ({info.dtype}, not int64): "
                        f"'{job.name}' copies it unchanged; repair the input with "
                        "`mergebuild doctor MODEL --fix OUT`",
                        stacklevel=2,
                    )
                st.copied_non_float += 1
                out[k] = info
                continue
            out[k] = TensorInfo(dt, info.shape)
            others = [lay.get(k) for lay in ins[1:]]
            names = job.inputs[1:]
            if job.method.optional_inputs:  # only inputs holding the key take part
                kept = [(n, o) for n, o in zip(names, others, strict=True) if _float_info(o)]
                names, others = [n for n, _ in kept], [o for _, o in kept]
            if (job.method.optional_inputs and not others) or not all(map(_float_info, others)):
                st.kept_from_a += 1
                if len(st.missing_examples) < 5:
                    st.missing_examples.append(k)
                continue
            for slot_name, o in zip(names, others, strict=True):
                if o is not None and o.shape != info.shape:
                    if extra_channels(k, info.shape, o.shape):
                        self.channel_merge[(job.name, k)] = o.shape[1]
                        continue
                    raise BuildError(
                        f"cannot merge '{job.name}': tensor '{k}' has shape {list(info.shape)} "
                        f"in '{job.inputs[0]}' but {list(o.shape)} in '{slot_name}'"
                    )
            st.merged += 1
        st.dropped = len({k for lay in ins[1:] for k in lay} - a.keys())
        self.layouts[job.name] = out

    # -- key plans ----------------------------------------------------------------------------

    def key_plan(self, key: str) -> KeyPlan:
        """The evaluation steps of one key (made once, shared by its units and workers)."""
        plan = self._key_plans.get(key)
        if plan is None:  # two workers racing here build equal plans: either one is fine
            plan = self._key_plans[key] = self._make_key_plan(key)
        return plan

    def _deps(self, name: str, key: str) -> list[tuple[str, str]]:
        """The values node `name` needs for `key`: only `a` when the key is not merged."""
        if name not in self.jobs:  # a source
            return []
        job = self.jobs[name]
        own = self.key_sources.get(name)
        if own is not None:  # optional inputs lacking the source key (merge_loras) skipped
            opt = job.method.optional_inputs
            return [(n, own[key]) for n in job.inputs if not opt or self._has(n, own[key])]
        if not mergeable(key, self.layouts[name][key].dtype):
            return [(job.inputs[0], key)]
        ins = [(n, self._input_key(job, i, key)) for i, n in enumerate(job.inputs)]
        if job.method.optional_inputs:
            return [ins[0]] + [(n, k) for n, k in ins[1:] if self._has(n, k)]
        if self._others_have(job, key):
            return ins
        return [ins[0]]

    def _input_key(self, job: NodeJob, slot: int, key: str) -> str:
        """The name input `slot` of `job` gives key `key` of its `a` (see `renames`)."""
        ren = self.renames.get(job.name)
        m = ren[slot] if ren is not None else None
        return key if m is None else m.get(key, key)

    def _make_key_plan(self, key: str) -> KeyPlan:
        """Every value the sinks need for `key`, ordered so inputs come first (an explicit
        stack, not recursion: a chain may be thousands of nodes deep), each freed after its
        last use so a long chain holds a few values at a time, not one per node."""
        roots: dict[tuple[str, str], list[int]] = {}
        for i, sink in enumerate(self.targets):
            if key in sink.infos:
                vkey = sink.vae_keys.get(key)
                if vkey is not None and sink.vae is not None:
                    roots.setdefault((sink.vae, vkey), []).append(i)
                else:
                    roots.setdefault((sink.source, key), []).append(i)
        slot: dict[tuple[str, str], int] = {}
        deps: dict[tuple[str, str], list[tuple[str, str]]] = {}
        order: list[tuple[str, str]] = []
        for root in roots:
            stack = [(root, False)]
            while stack:
                v, expanded = stack.pop()
                if expanded:
                    slot[v] = len(order)
                    order.append(v)
                elif v not in deps:
                    deps[v] = self._deps(*v)
                    stack.append((v, True))
                    stack.extend((d, False) for d in reversed(deps[v]) if d not in deps)
        last = list(range(len(order)))  # the step after which each value is dead
        for i, v in enumerate(order):
            for d in deps[v]:
                last[slot[d]] = i
        frees: list[list[int]] = [[] for _ in order]
        for s, i in enumerate(last):
            frees[i].append(s)
        steps, alive, peak = [], 0, 0
        for i, (name, k) in enumerate(order):
            is_job = name in self.jobs
            alive += is_job
            peak = max(peak, alive)  # values held at once: what the executor's _cost charges
            steps.append(
                Step(
                    name,
                    k,
                    is_job,
                    tuple(slot[d] for d in deps[(name, k)]),
                    tuple(roots.get((name, k), ())),
                    tuple(frees[i]),
                )
            )
            alive -= sum(order[f][0] in self.jobs for f in frees[i])
        reads = tuple(v for v in order if v[0] not in self.jobs)
        return KeyPlan(tuple(steps), reads, peak, self._runs(key, steps))

    def _runs(self, key: str, steps: list[Step]) -> tuple[int, ...]:
        """Runs of consecutive streamed steps with one method and the same inputs (a sweep's
        members): each run is evaluated tile by tile, all members per tile (`_stream_run`)."""
        runs = [0] * len(steps)
        i = 0
        while i < len(steps):
            if not self._streams(key, steps, i):
                i += 1
                continue
            method, j = self.jobs[steps[i].name].method, i + 1
            while (
                j < len(steps)
                and self._streams(key, steps, j)
                and steps[j].args == steps[i].args
                and self.jobs[steps[j].name].method is method
            ):
                j += 1
            runs[i], i = j - i, j
        return tuple(runs)

    def _streams(self, key: str, steps: list[Step], i: int) -> bool:
        """Step i is an elementwise job on the CPU whose value only files want: its tiles can
        go straight to them (no unit-size result), cast as they come."""
        step = steps[i]
        if not step.is_job or not step.sinks or i not in step.free or step.key != key:
            return False
        job = self.jobs[step.name]
        method, dt = job.method, self.layouts[job.name][key].dtype
        return (
            method.elementwise
            and not method.needs_context
            and not method.optional_inputs
            and self.device == "cpu"
            and job.name not in self.key_sources
            and mergeable(key, dt)
            and dt not in FP8_MAX
            and len(step.args) == len(job.inputs)  # every input has the key
            and (job.name, key) not in self.channel_merge
            and not any(key in self.targets[s].scaled for s in step.sinks)
        )

    # -- evaluation ---------------------------------------------------------------------------

    def evaluate(
        self,
        u: Unit,
        read: Callable[[str, str, Unit], torch.Tensor],
        write: Callable[..., None],
    ) -> None:
        """Every value of unit `u`'s key plan: sources come from `read(name, key, u)`, each
        value a target wants goes to `write(target index, value)`, dead values are dropped.

        A whole-tensor value that only targets want (no later step reads it) may go out in
        tiles instead: `write(target index, tile, lo)`, `lo` the tile's first element within
        the unit. Why: no full-size result is held (see Tiles)."""
        plan = self.key_plan(u.key)
        vals: list[Any] = [None] * len(plan.steps)
        i = 0
        while i < len(plan.steps):
            if plan.runs[i]:
                run = plan.steps[i : i + plan.runs[i]]
                self._stream_run(run, u, [vals[j] for j in run[0].args], write)
                for step in run:
                    for j in step.free:
                        vals[j] = None
                i += len(run)
                continue
            step = plan.steps[i]
            if step.is_job:
                direct = None
                whole = any(u.key in self.targets[s].scaled for s in step.sinks)
                if step.sinks and i in step.free and not whole:  # tiles may go straight out

                    def direct(tile: torch.Tensor, lo: int, sinks: tuple[int, ...] = step.sinks):
                        for s in sinks:
                            write(s, tile, lo)

                uk = u if step.key == u.key else replace(u, key=step.key)  # a renamed input
                val = self._compute(self.jobs[step.name], uk, [vals[j] for j in step.args], direct)
            else:  # in its own shape: an inpainting `a` is wider
                val = read(step.name, step.key, u)
            vals[i] = val
            if val is not None:  # None: written tile by tile already
                for s in step.sinks:
                    write(s, val)
            for j in step.free:
                vals[j] = None
            i += 1

    def _stream_run(
        self,
        steps: Sequence[Step],
        u: Unit,
        args: list[torch.Tensor],
        write: Callable[..., None],
    ) -> None:
        """Jobs of one elementwise method on the same inputs, tile by tile: per tile, every
        job's result (`compute_many`: a sweep's members share what does not depend on their
        parameters) is cast into a reused buffer of its dtype and handed to its files as
        `write(target index, tile, lo)`. The same ops on the same slices as `_tiled`, so the
        same bytes, without a unit-size result per job and with the inputs' tiles in cache."""
        jobs = [self.jobs[step.name] for step in steps]
        params = [self._params(job, u.key) for job in jobs]
        dtypes = [self.layouts[job.name][u.key].dtype for job in jobs]
        flat = [x.reshape(-1) for x in args]
        n = numel(flat[0])
        bad = [False] * len(jobs)
        floats: list[Any] = []  # the float32 way's inputs and buffers, made on first need

        def float_tile(lo: int, hi: int) -> None:
            if not floats:
                torch = ensure_torch()
                size = min(n, TILE_ELEMENTS)
                floats.append(_computable(as_tensors(flat)))
                floats.append([torch.empty(size, dtype=to_torch(dt)) for dt in dtypes])
            method = jobs[0].method
            self._float_tile(steps, method, params, floats[0], lo, hi, floats[1], write, bad)

        half = all(dt == "F16" for dt in dtypes)
        if not (half and self._stream_half(steps, jobs, params, flat, write, bad, float_tile)):
            for lo in range(0, n, TILE_ELEMENTS):
                float_tile(lo, min(n, lo + TILE_ELEMENTS))
        self._note_nonfinite(jobs, bad, u.key)

    @staticmethod
    def _float_tile(
        steps: Sequence[Step],
        method: type[Method],
        params: list[Params],
        flat: list[torch.Tensor],
        lo: int,
        hi: int,
        bufs: list[torch.Tensor],
        write: Callable[..., None],
        bad: list[bool],
    ) -> None:
        """One tile of `_stream_run` through compute_many (float32), cast into `bufs`."""
        results = method.compute_many(params, [x[lo:hi] for x in flat])
        for n, (step, res, buf) in enumerate(zip(steps, results, bufs, strict=True)):
            tile = buf[: hi - lo]
            tile.copy_(res)
            bad[n] = settle_nonfinite(tile) or bad[n]
            for s in step.sinks:
                write(s, tile, lo)

    def _note_nonfinite(self, jobs: list[NodeJob], bad: list[bool], key: str) -> None:
        for job, nonfinite in zip(jobs, bad, strict=True):
            if nonfinite:
                self.stats[job.name].nonfinite.add(key)

    @staticmethod
    def _stream_half(
        steps: Sequence[Step],
        jobs: list[NodeJob],
        params: list[Params],
        flat: list[Any],
        write: Callable[..., None],
        bad: list[bool],
        float_tile: Callable[[int, int], None],
    ) -> bool:
        """`_stream_run` for float16 inputs (tensors or numpy arrays) and outputs through the
        method's compute_many_half: each tile read once for every member, rounded, checked,
        written as a float16 numpy array; False (nothing written) where the method has none
        or it does not apply at the first tile. A later tile it declines (a short last one,
        say) goes the float32 way, `float_tile`: same bytes."""
        import numpy as np

        from mergebuild.engine.methods.reduce import half_bits

        bits = [half_bits(x) for x in flat]
        if any(b is None for b in bits):
            return False
        n, m = bits[0].size, len(jobs)
        rows = np.empty(m * min(n, TILE_ELEMENTS), dtype=np.uint16)
        for lo in range(0, n, TILE_ELEMENTS):
            hi = min(n, lo + TILE_ELEMENTS)
            outs = rows[: m * (hi - lo)].reshape(m, hi - lo)
            flags = jobs[0].method.compute_many_half(params, [b[lo:hi] for b in bits], outs)
            if flags is None:
                if lo == 0:
                    return False
                float_tile(lo, hi)
                continue
            for k, (step, flag) in enumerate(zip(steps, flags, strict=True)):
                bad[k] = flag or bad[k]
                tile = outs[k].view(np.float16)
                for s in step.sinks:
                    write(s, tile, lo)
        return True

    def needs_torch(self, key: str) -> bool:
        """Whether `key` may need torch: anything but reads of numpy dtypes (float16 the only
        float) from plain safetensors files, written as they are, and float16 values of
        methods with compiled float16 loops (arrays.py, _job_needs_torch). Only decides
        whether a pass imports torch up front: a value that turns out to need it converts on
        the way."""
        if self.device != "cpu":
            return True
        plan = self.key_plan(key)
        streamed = {i + k for i, run in enumerate(plan.runs) for k in range(run)}
        for i, step in enumerate(plan.steps):
            dt = self.layouts[step.name][step.key].dtype
            if not step.is_job:
                if not getattr(self.sources.get(step.name), "plain", False):
                    return True
                if dt not in NP_NAMES or (is_float(dt) and dt != "F16"):
                    return True
            elif self._job_needs_torch(step, dt, i in streamed):
                return True
            for sink in step.sinks:
                target = self.targets[sink]
                if step.key in target.scaled or target.infos[key].dtype != dt:
                    return True
        return False

    def _job_needs_torch(self, step: Step, dt: str, streamed: bool) -> bool:
        """Whether a job's value may need torch (needs_torch): not `a`'s value kept as it is
        (a key not merged), nor a float16 value of a method with a compiled float16 loop,
        streamed (`_stream_half`) or computed from all its inputs at once (`_half_arrays`)."""
        job = self.jobs[step.name]
        method = job.method
        if job.name in self.key_sources:
            return True
        if not mergeable(step.key, dt):
            return False
        if dt != "F16":
            return True
        if streamed:
            return not (
                _overrides(method, "compute_half") or _overrides(method, "compute_many_half")
            )
        loop = "compute_half" if method.elementwise else "split_half"
        return not (_overrides(method, loop) and self._half_whole(job, step.key, len(step.args)))

    def _half_whole(self, job: NodeJob, key: str, n_args: int) -> bool:
        """Whether `_half_arrays` takes a float16 job's value for `key` from `n_args` inputs:
        a method given every input as it is (no channel merge, no own keys); an elementwise
        one through its compute_half, another through its split_half."""
        method = job.method
        return (
            self.device == "cpu"
            and not method.optional_inputs
            and not method.half_mixed
            and job.name not in self.key_sources
            and n_args == len(job.inputs)
            and (job.name, key) not in self.channel_merge
        )

    def _half_arrays(
        self,
        job: NodeJob,
        u: Unit,
        args: list[Any],
        info: TensorInfo,
        direct: Callable[[Any, int], None] | None,
    ) -> tuple[bool, Any]:
        """The float16 fast paths on numpy arrays, without torch: an elementwise job's
        compiled loop (`_tiled`'s) from all its inputs' bits into a new float16 array, or a
        whole-tensor job's split_half tiles (`_stream_tiles`' / `_from_tiles`'), each handed
        to `direct` if given. (done, value): value None once `direct` has every tile; not
        done where neither applies (the caller converts to tensors, the usual way)."""
        import numpy as np

        from mergebuild.engine.methods.reduce import half_bits

        if info.dtype != "F16" or not self._half_whole(job, u.key, len(args)):
            return False, None
        if not all(is_array(x) and x.dtype == np.float16 for x in args):
            return False, None
        params = self._params(job, u.key)
        ctx = _context(job, params, u, info.shape, self.stats[job.name].report)
        if not job.method.elementwise:
            tiles = job.method.split_half(params, args, ctx)
            if tiles is None or tiles.fill_half is None or tiles.may_restart:
                return False, None
            bad, out = _half_tiles(tiles, direct)
            if bad:
                self.stats[job.name].nonfinite.add(u.key)
            return True, out
        bits = [half_bits(x.reshape(-1)) for x in args]
        if any(b is None for b in bits):
            return False, None
        out = np.empty(bits[0].size, dtype=np.float16)
        bad = job.method.compute_half(params, bits, out.view(np.uint16), ctx)
        if bad is None:
            return False, None
        if bad:
            self.stats[job.name].nonfinite.add(u.key)
        return True, out.reshape(args[0].shape)

    def _compute(
        self,
        job: NodeJob,
        u: Unit,
        args: list[torch.Tensor],
        direct: Callable[[torch.Tensor, int], None] | None = None,
    ) -> torch.Tensor | None:
        """Job's value for unit `u` from its inputs' values (`a` alone: the key is not merged).

        With `direct`, a whole-tensor method's tiles may be handed to it one by one (cast to
        the job's dtype; a tile buffer reused) instead: None is returned then. An fp8 job
        computes in float32 and rounds once at the end, clamped (dtypes.cast)."""
        dt = self.layouts[job.name][u.key].dtype
        if dt not in FP8_MAX:
            return self._compute_as(job, u, args, direct, dt)
        out = self._compute_as(job, u, args, None, "F32")
        assert out is not None
        out, over = cast(out, dt)
        if over:
            with self._lock:
                self.stats[job.name].clamped += over
                self.stats[job.name].clamped_keys.add(u.key)
        return out

    def _compute_as(
        self,
        job: NodeJob,
        u: Unit,
        args: list[torch.Tensor],
        direct: Callable[[torch.Tensor, int], None] | None,
        dt: str,
    ) -> torch.Tensor | None:
        info = replace(self.layouts[job.name][u.key], dtype=dt)
        own = self.key_sources.get(job.name)
        if own is not None and job.method.optional_inputs:  # None: input lacks the source key
            it = iter(args)
            args = [next(it) if self._has(n, own[u.key]) else None for n in job.inputs]
        a = args[0]
        if not mergeable(u.key, info.dtype):
            return a
        if is_array(a):
            done, value = self._half_arrays(job, u, args, info, direct)
            if done:
                return value
        args, a = as_tensors(args), as_tensor(a)
        import torch

        if job.method.optional_inputs and len(args) > 1 and own is None:  # None: lacks the key
            it = iter(args[1:])
            args = [a] + [
                next(it) if self._has(n, self._input_key(job, i, u.key)) else None
                for i, n in enumerate(job.inputs[1:], 1)
            ]
        if len(args) < len(job.inputs):  # another input lacks the key: a's tensor, cast
            out = a.to(to_torch(info.dtype))
        else:
            params = self._params(job, u.key)
            xs = _computable(args)
            n = self.channel_merge.get((job.name, u.key))
            if n is not None:  # inpainting/pix2pix conv_in: merge channels [0, n), keep a's others
                xs = [x if x is None or x.shape[1] == n else x[:, :n] for x in xs]
            ctx = _context(job, params, u, info.shape, self.stats[job.name].report)
            if self.device != "cpu":  # same IEEE float32 ops on the GPU; results come back
                xs = [x if x is None else x.to(self.device, non_blocking=True) for x in xs]
                out = _call(job.method, params, xs, ctx).cpu()
            elif job.method.elementwise and n is None:
                out, bad = _tiled(job.method, params, xs, to_torch(info.dtype), ctx)
                if bad:
                    self.stats[job.name].nonfinite.add(u.key)
                return out
            else:
                tiles = None if n is not None else job.method.split(params, xs, ctx)
                if tiles is not None and direct is not None and not tiles.may_restart:
                    if _stream_tiles(tiles, to_torch(info.dtype), direct):
                        self.stats[job.name].nonfinite.add(u.key)
                    return None
                done = None if tiles is None else _from_tiles(tiles, to_torch(info.dtype))
                if done is not None:
                    if done[1]:
                        self.stats[job.name].nonfinite.add(u.key)
                    return done[0]
                out = _call(job.method, params, xs, ctx)
            if n is not None:
                full = a.to(torch.float32, copy=True)
                full[:, :n] = out
                out = full
            out = out.to(to_torch(info.dtype))
        if _has_nonfinite(out):  # NaN/Inf from an input (or an overflow) shows up here
            self.stats[job.name].nonfinite.add(u.key)  # set.add: atomic across workers
            out = canonical_nans(out, inplace=False)  # out may be an input's own tensor
        return out

    def _has(self, name: str, key: str) -> bool:
        return key in self.layouts[name] and is_float(self.layouts[name][key].dtype)

    def _others_have(self, job: NodeJob, key: str) -> bool:
        """Every input after `a` has a float tensor `key`: else `a`'s tensor is kept as is."""
        return all(
            self._has(n, self._input_key(job, i, key)) for i, n in enumerate(job.inputs[1:], 1)
        )

    def _params(self, job: NodeJob, key: str) -> Params:
        """The job's parameters for one key: block weights become that key's plain number."""
        entry = self.key_params.get(job.name)
        if entry is None:
            return job.params
        memo, root = entry
        p = memo.get(key)
        if p is None:
            from mergebuild.sd.blocks import resolve_params

            p = memo[key] = resolve_params(job.params, key, root)  # type: ignore[assignment]
        return p


def uses_loops(method: type[Method]) -> bool:
    """Whether `method` may call the compiled loops (_kernels.py): it says so, or it has a
    float16 loop of its own."""
    return method.compiled_loops or any(
        _overrides(method, name) for name in ("compute_half", "compute_many_half", "split_half")
    )


def _overrides(method: type[Method], name: str) -> bool:
    """Whether `method` has its own `name` classmethod (a compiled float16 loop)."""
    return getattr(method, name).__func__ is not getattr(Method, name).__func__  # type: ignore[no-any-return]


def _renamed(layout: dict[str, TensorInfo], m: dict[str, str] | None) -> dict[str, TensorInfo]:
    """An input's layout under `a`'s key names (only the keys `m` maps)."""
    return layout if m is None else {ak: layout[k] for ak, k in m.items()}


def _float_info(info: TensorInfo | None) -> bool:
    return info is not None and is_float(info.dtype)


def mergeable(key: str, dtype: str) -> bool:
    """Float weights merge; integer buffers — and position_ids even when a damaged file stores
    them as floats — are copied from `a` unchanged (never interpolated, never re-cast)."""
    return is_float(dtype) and not is_position_ids(key)


def _context(
    job: NodeJob, params: Params, u: Unit, shape: Any, report: dict[str, Any]
) -> ComputeContext | None:
    """What a `needs_context` method learns about the values it gets (None for the others)."""
    if not job.method.needs_context:
        return None
    seed = getattr(params, "seed", 0)
    return ComputeContext(u.key, 0 if u.whole else u.lo, math.prod(shape), job.key, seed, report)


def _call(
    method: type[Method], params: Params, xs: list[torch.Tensor], ctx: ComputeContext | None
) -> torch.Tensor:
    if ctx is None:
        return method.compute(params, xs)
    return method.compute(params, xs, ctx)  # type: ignore[call-arg]


def _tiled(
    method: type[Method],
    params: Params,
    xs: list[torch.Tensor],
    dtype: torch.dtype,
    ctx: ComputeContext | None = None,
) -> tuple[torch.Tensor, bool]:
    """An elementwise merge computed in cache-sized tiles, each cast into one result tensor.

    Why: a method's float32 temporaries for a whole 2 Mi-element chunk (8 MB each) spill out of
    the L2 cache, so every op streams through main memory; in 256 Ki-element tiles the same
    ops ran 1.8x faster on one core and 2.2x faster on two. Elementwise ops on a slice give the
    same bits as on the whole, so tiling never changes a result. Also returns whether any
    value is NaN/Inf, checked per tile while it is still in cache.
    """
    import torch

    flat = [x if x is None else x.reshape(-1) for x in xs]
    numel = flat[0].numel()
    out = torch.empty(numel, dtype=dtype)
    if dtype == torch.float16:
        arrays = _half_inputs(method, flat)
        if arrays is not None:
            done = method.compute_half(params, arrays, out.view(torch.uint16).numpy(), ctx)
            if done is not None:
                return out.reshape(xs[0].shape), done
    bad = False
    for lo in range(0, numel, TILE_ELEMENTS):
        part = out[lo : lo + TILE_ELEMENTS]
        tile = [x if x is None else x[lo : lo + TILE_ELEMENTS] for x in flat]
        at = None if ctx is None else replace(ctx, offset=ctx.offset + lo)
        part.copy_(_call(method, params, tile, at))
        bad = settle_nonfinite(part) or bad
    return out.reshape(xs[0].shape), bad


def _half_inputs(method: type[Method], flat: list[torch.Tensor | None]) -> list[Any] | None:
    """The inputs as `method.compute_half` takes them (float16 as bits; with `half_mixed`,
    float32 as float32 arrays, absent ones as None), or None where one cannot be."""
    import torch

    from mergebuild.engine.methods.reduce import half_bits

    arrays: list[Any] = []
    for x in flat:
        if x is None:
            if not method.half_mixed:
                return None
            arrays.append(None)
        elif method.half_mixed and x.dtype == torch.float32 and x.device.type == "cpu":
            arrays.append(x.contiguous().numpy())
        else:
            bits = half_bits(x)
            if bits is None:
                return None
            arrays.append(bits)
    return arrays


def _from_tiles(tiles: Tiles, dtype: torch.dtype) -> tuple[torch.Tensor, bool] | None:
    """A whole-tensor method's tiles cast one by one into the result (see Tiles), and whether
    any value is NaN/Inf; None when a tile asks to start over on the whole tensor.

    Casting a tile is casting the whole tensor's slice: the bytes equal `compute(...).to()`.
    """
    import torch

    numel = math.prod(tiles.shape)
    out = torch.empty(numel, dtype=dtype)
    bad = False
    for lo in range(0, numel, tiles.step):
        hi = min(numel, lo + tiles.step)
        part = tiles.fill(lo, hi)
        if part is None:
            return None
        dst = out[lo:hi]
        dst.copy_(part)
        bad = settle_nonfinite(dst) or bad
    return out.reshape(tiles.shape), bad


def _stream_tiles(
    tiles: Tiles, dtype: torch.dtype, emit: Callable[[torch.Tensor, int], None]
) -> bool:
    """Each tile cast into one reused buffer and handed to `emit(tile, lo)` (which copies it
    before the next); whether any value is NaN/Inf. The same bytes as `_from_tiles`."""
    import torch

    if tiles.fill_half is not None and dtype == torch.float16:
        return _half_tiles(tiles, lambda t, lo: emit(torch.from_numpy(t), lo))[0]
    numel = math.prod(tiles.shape)
    buf = torch.empty(min(numel, tiles.step), dtype=dtype)
    bad = False
    for lo in range(0, numel, tiles.step):
        hi = min(numel, lo + tiles.step)
        part = tiles.fill(lo, hi)
        assert part is not None  # may_restart is False
        dst = buf[: hi - lo]
        dst.copy_(part)
        bad = settle_nonfinite(dst) or bad
        emit(dst, lo)
    return bad


def _half_tiles(tiles: Tiles, emit: Callable[[Any, int], None] | None) -> tuple[bool, Any]:
    """Tiles.fill_half tile by tile, each handed to `emit(tile, lo)` from one reused float16
    numpy buffer (None returned), or without `emit` into one new float16 array (returned,
    in the tiles' shape); and whether any value is Inf/NaN (fill_half made NaNs canonical)."""
    import numpy as np

    assert tiles.fill_half is not None
    numel = math.prod(tiles.shape)
    out = np.empty(numel if emit is None else min(numel, tiles.step), dtype=np.float16)
    bits = out.view(np.uint16)
    bad = False
    for lo in range(0, numel, tiles.step):
        hi = min(numel, lo + tiles.step)
        if emit is None:
            bad = tiles.fill_half(lo, hi, bits[lo:hi]) or bad
            continue
        bad = tiles.fill_half(lo, hi, bits[: hi - lo]) or bad
        emit(out[: hi - lo], lo)
    return bad, None if emit is not None else out.reshape(tiles.shape)


# per dtype: (same-size integer dtype, magnitude bits, largest non-NaN magnitude, the NaN)
_NAN_BITS = {
    "float16": ("int16", 0x7FFF, 0x7C00, 0x7E00),
    "bfloat16": ("int16", 0x7FFF, 0x7F80, 0x7FC0),
    "float32": ("int32", 0x7FFF_FFFF, 0x7F80_0000, 0x7FC0_0000),
    "float64": ("int64", 0x7FFF_FFFF_FFFF_FFFF, 0x7FF0_0000_0000_0000, 0x7FF8_0000_0000_0000),
    "float8_e5m2": ("int8", 0x7F, 0x7C, 0x7E),
    "float8_e4m3fn": ("int8", 0x7F, 0x7E, 0x7F),  # no infinities: S.1111.111 is its NaN
}


def canonical_nans(x: torch.Tensor, inplace: bool) -> torch.Tensor:
    """x with every NaN spelled as its dtype's positive quiet NaN (x itself if it has none).

    Why: which NaN an operation returns (sign, payload) depends on the order of its operands,
    which torch's kernels and the compiled loops (built for the host CPU) need not share; one
    spelling keeps the output bytes a function of the inputs on every path and machine."""
    import torch

    spec = _NAN_BITS.get(str(x.dtype).removeprefix("torch."))
    if spec is None:
        return x
    view, magnitude, top, nan_bits = spec
    nan = torch.bitwise_and(x.view(getattr(torch, view)), magnitude).gt(top)
    if not bool(nan.any()):
        return x
    out = x if inplace else x.clone()
    out.view(getattr(torch, view)).masked_fill_(nan, nan_bits)
    return out


def settle_nonfinite(x: torch.Tensor) -> bool:
    """Whether x holds NaN/Inf (_has_nonfinite); if so, its NaNs made canonical in place."""
    if not _has_nonfinite(x):
        return False
    canonical_nans(x, inplace=True)
    return True


def _has_nonfinite(x: torch.Tensor) -> bool:
    """A sum is NaN/Inf iff some element is (or the sum overflows: then confirm).

    One vectorized reduction without allocation: ~15x cheaper than `isfinite(x).all()`. In
    x's own dtype (float32 inside): a float16 sum beyond 65504 is a false alarm, confirmed
    on the bits (NaN/Inf have every exponent bit set), 0.09 ns per element against 0.28 for
    the sum widened to float32.
    """
    import torch

    if x.numel() == 0:
        return False
    mask = {torch.float16: 0x7C00, torch.bfloat16: 0x7F80}.get(x.dtype)
    own = mask is not None or x.dtype == torch.float32  # fp8 cannot sum in its own dtype
    if math.isfinite(float(x.sum() if own else x.sum(dtype=torch.float32))):
        return False
    if mask is not None and x.device.type == "cpu" and x.is_contiguous():
        import numpy as np

        bits = x.view(torch.int16).numpy()
        return int(np.bitwise_and(bits, np.int16(mask)).max()) == mask
    return not bool(torch.isfinite(x).all())


def _computable(xs: Sequence[torch.Tensor | None]) -> list[Any]:
    """Inputs as a method takes them: float16/bfloat16/float32 as they are (mixed ops widen
    exactly), anything else (float64, fp8) converted to float32 first; None stays None."""
    import torch

    direct = (torch.float16, torch.bfloat16, torch.float32)
    return [x if x is None or x.dtype in direct else x.to(torch.float32) for x in xs]
