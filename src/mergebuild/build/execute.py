"""Carry out a plan: the fused passes that compute its nodes and write its files.

Apart from planning because this is the only part that reads tensors (it imports the engine,
hence torch, lazily) and writes cache objects: each file goes to a temp file next to its
object, is fsynced and renamed, and only then gets the sidecar that makes it count as present.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mergebuild import __version__
from mergebuild.atomic import fsync_dir, make_temp
from mergebuild.build.checks import check_device, check_inputs_unchanged
from mergebuild.build.plan import Item, Plan
from mergebuild.cache import CacheStore
from mergebuild.engine.dtypes import FP8_MAX, RECIPE_TO_ST
from mergebuild.engine.methods import REGISTRY
from mergebuild.errors import BuildError
from mergebuild.graph import canonical_json, node_identity, schedule
from mergebuild.hashing import SplitChecksum
from mergebuild.progress import Progress
from mergebuild.provenance import output_metadata
from mergebuild.recipe.model import Recipe

# Files one fused pass writes at once. Each holds a 4 MiB staging block (more while the disk
# lags) and two descriptors while it is written: a 1000-node cached chain in one pass held
# ~2.4 MB per node of 2.4 MB models (1.1 GB at 300 nodes). Typical recipes stay in one pass.
MAX_FILES_PER_PASS = 32
# descriptors a pass may hold besides the locks: two per file written, inputs, and slack
# for the interpreter, torch and the readahead
FILES_PER_PASS_FDS = 4 * MAX_FILES_PER_PASS + 256


class Execution:
    """Runs the `build` items of a plan with the build's workers, memory bound and device."""

    def __init__(
        self,
        recipe: Recipe,
        store: CacheStore,
        progress: Progress,
        jobs: int,
        max_memory: int,
        device: str,
    ) -> None:
        self.recipe, self.store, self.progress = recipe, store, progress
        self.jobs, self.max_memory, self.device = jobs, max_memory, device

    def execute(self, plan: Plan) -> None:
        """Build every item of the plan: one fused pass, or several for a long recipe.

        A pass writes every file it produces at once, and each file being written holds a
        few MiB of staging blocks and two descriptors: so a pass writes at most
        MAX_FILES_PER_PASS files, in schedule order. A later pass reads what an earlier one
        cached (a consumer sees the same cast value either way, so the bytes do not change);
        a `cache: false` node is computed in each pass that needs it.
        """
        building = plan.to_build()
        files = [i for i in building if i.kind == "output" or i.stored]
        done: set[str] = set()  # merge nodes cached by an earlier pass
        stats: dict[str, Any] = {}
        for group in self.groups(files):
            jobs = self._pass_jobs(plan, group, done)
            fused, seconds = self._run_pass(plan, group, jobs)
            for item in [*group, *(i for i in jobs if not i.stored)]:
                if item.status == "build":
                    item.status, item.seconds = "built", seconds
            for job in jobs:
                stats.setdefault(job.name, fused.stats[job.name])
            done.update(i.name for i in group if i.kind == "merge")
        for item in building:
            if item.kind == "merge":
                item.stats = self.node_stats(stats[item.name], item.name)

    def groups(self, files: list[Item]) -> list[list[Item]]:
        """Files in passes of at most MAX_FILES_PER_PASS, in schedule order — and a LoRA made
        in the recipe (extract_lora, merge_loras) in a pass before any that bakes or merges
        it: its consumers read its factors from the cache, as they would read a LoRA file."""
        from mergebuild.lora.roles import LORA_MAKERS

        level: dict[str, int] = {}
        for kind, name in schedule(self.recipe):
            if kind != "merge":
                continue
            node = self.recipe.nodes[name]
            level[name] = max(
                (
                    level[r] + (self.recipe.nodes[r].method in LORA_MAKERS)
                    for r in node.inputs.values()
                    if r in level
                ),
                default=0,
            )

        def of(item: Item) -> int:
            name = item.name if item.kind == "merge" else self.recipe.outputs[item.name].source
            return level.get(name, 0)

        groups = []
        for lv in sorted({of(i) for i in files}):
            mine = [i for i in files if of(i) == lv]
            groups += [
                mine[i : i + MAX_FILES_PER_PASS] for i in range(0, len(mine), MAX_FILES_PER_PASS)
            ]
        return groups

    @staticmethod
    def node_stats(st: Any, name: str) -> dict[str, Any]:
        """A built node's report fields (and the warning its NaN/Inf values deserve)."""
        _warn_nonfinite(name, st.nonfinite)
        _warn_clamped(f"merge '{name}'", st.clamped, st.dtype, len(st.clamped_keys))
        return {
            "dtype": st.dtype,
            "tensors": st.tensors,
            "merged": st.merged,
            "kept_from_a": st.kept_from_a,
            "copied_non_float": st.copied_non_float,
            "dropped": st.dropped,
            "nonfinite_keys": sorted(st.nonfinite),
            **({"clamped_values": st.clamped} if st.clamped else {}),
            **{k: dict(sorted(v.items())) for k, v in st.report.items()},  # method's facts
        }

    def _pass_jobs(self, plan: Plan, group: list[Item], done: set[str]) -> list[Item]:
        """The merge nodes a pass computes to write `group`, in schedule order: those the
        group's files need that are not models, not in the cache, not cached by `done`."""
        building = {i.name for i in plan.to_build() if i.kind == "merge"} - done
        need: set[str] = set()
        stack = [i.name if i.kind == "merge" else self.recipe.outputs[i.name].source for i in group]
        while stack:  # an explicit stack: a chain may be thousands of nodes deep
            name = stack.pop()
            if name in building and name not in need:
                need.add(name)
                stack.extend(self.recipe.nodes[name].inputs.values())
        return [i for i in plan.items if i.kind == "merge" and i.name in need]

    def _run_pass(self, plan: Plan, group: list[Item], items: list[Item]) -> tuple[Any, float]:
        """One fused pass computing `items` and writing `group`; every file is fsynced,
        renamed into the cache and given its sidecar before this returns."""
        with self.pass_files(plan, group, items) as done:
            self.publish(done.files)
            return done.fused, done.seconds

    @contextmanager
    def pass_files(
        self,
        plan: Plan,
        group: list[Item],
        items: list[Item],
        hash_inputs: set[str] | None = None,
        temp_shard: str | None = None,
    ) -> Iterator[PassResult]:
        """Run one fused pass into temp files (fsynced, not yet renamed): what the caller
        does with them happens inside the `with`; any temp left at its end is deleted.

        `hash_inputs`: models to hash from the bytes the pass reads (build/speculate.py);
        `temp_shard`: where the temps go when their keys are not known yet."""
        from mergebuild.engine.executor import FusedPass, NodeJob, Sink
        from mergebuild.engine.safetensors_io import SafetensorsSource
        from mergebuild.graph import job_args
        from mergebuild.lora.extract import add_metadata as add_lora_metadata
        from mergebuild.lora.roles import LORA_MAKERS
        from mergebuild.lora.source import open_input

        by_name = {(i.kind, i.name): i for i in plan.items}
        needed_sources: set[str] = set()
        jobs: list[NodeJob] = []
        for item in items:
            node = self.recipe.nodes[item.name]
            method = REGISTRY[node.method]
            refs, params = job_args(self.recipe, item.name, plan.keys)  # fold: canonical order
            jobs.append(
                NodeJob(
                    item.name,
                    method,
                    method.Params.model_validate(params),
                    node.dtype,
                    refs,
                    key=plan.keys[item.name],
                )
            )
            needed_sources.update(node.inputs.values())
        for item in group:
            if item.kind == "output":
                out = self.recipe.outputs[item.name]
                needed_sources.update(n for n in (out.source, out.vae) if n is not None)
        built_names = {j.name for j in jobs}
        sources: dict[str, Any] = {}
        files: list[PassFile] = []
        try:
            for name in sorted(needed_sources - built_names):
                if name in self.recipe.models:
                    sources[name] = open_input(plan.inputs[name].path)
                elif self.recipe.nodes[name].method in LORA_MAKERS:  # factors: read as a LoRA
                    sources[name] = open_input(by_name[("merge", name)].path)
                else:
                    sources[name] = SafetensorsSource(by_name[("merge", name)].path)
            for item in group:
                shard = self.store.object_dir(temp_shard or item.key)
                fd, tmp = make_temp(shard, ".safetensors")
                if item.kind == "merge":
                    meta = {
                        "mergebuild.node": canonical_json(
                            node_identity(self.recipe, item.name, plan.keys)
                        )
                    }
                    sink = Sink(item.name, item.name, fd, None, meta)
                else:
                    out = self.recipe.outputs[item.name]
                    sink = Sink(
                        item.name,
                        out.source,
                        fd,
                        out.dtype,
                        output_metadata(self.recipe, item.name, plan.keys, plan.facts),
                        options=out.options,
                        vae=out.vae,
                    )
                files.append(PassFile(item, tmp, sink))
            t0 = time.perf_counter()
            tapped = {n for n in hash_inputs or () if isinstance(sources.get(n), SafetensorsSource)}
            fused = FusedPass(
                sources,
                jobs,
                [f.sink for f in files],
                device=check_device(self.device),
                hash_sources=tapped,
            )
            add_lora_metadata(fused, self.recipe)  # kohya's ss_* fields on extracted LoRAs
            with self.progress.pass_(fused) as on_unit:
                fused.run(self.jobs, self.max_memory, on_unit)
            check_inputs_unchanged(plan.models)
            for f in files:
                if f.item.kind == "output":
                    dt = RECIPE_TO_ST.get(f.sink.dtype or "", "")
                    _warn_clamped(f"output '{f.item.name}'", f.sink.clamped, dt)
                os.fsync(f.sink.fd)
                os.close(f.sink.fd)
                f.sink.fd = -1
            yield PassResult(fused, time.perf_counter() - t0, files)
        except OSError as e:
            raise BuildError(
                f"build failed: {e.strerror or e} "
                f"({getattr(e, 'filename', None) or f'while writing to {self.store.objects}'})"
            ) from None
        finally:
            for f in files:
                if f.sink.fd >= 0:
                    os.close(f.sink.fd)
                f.tmp.unlink(missing_ok=True)
            for src in sources.values():
                src.close()

    def publish(self, files: list[PassFile], keys: list[str] | None = None) -> None:
        """Rename each temp to its object (under `keys[i]`, else its item's key), then the
        sidecars: every rename is durable before a sidecar makes its object count."""
        targets = [self.store.object_path(k) for k in keys or [f.item.key for f in files]]
        for f, target in zip(files, targets, strict=True):
            self.store.object_dir(target.stem)  # a speculative temp sits in another shard
            os.replace(f.tmp, target)
        for directory in sorted({t.parent for t in targets}):
            fsync_dir(directory)
        for f, target in zip(files, targets, strict=True):
            self.store.write_sidecar(
                target.stem,
                {
                    "kind": f.item.kind,
                    "name": f.item.name,
                    "recipe": str(self.recipe.path),
                    "mergebuild_version": __version__,
                },
                checksum=f.checksum if f.checksum is not None else f.sink.writer.checksum(),
            )


@dataclass
class PassFile:
    """A file a pass wrote: its plan item, its temp path, the sink that wrote it."""

    item: Item
    tmp: Path
    sink: Any
    checksum: SplitChecksum | None = None  # set when the header was rewritten after the pass


@dataclass
class PassResult:
    fused: Any
    seconds: float
    files: list[PassFile] = field(default_factory=list)


def _warn_clamped(what: str, n: int, dtype: str, keys: int = 0) -> None:
    """fp8 has a small range (e4m3fn: ±448): values beyond it are clamped, never inf."""
    if n:
        top = FP8_MAX.get(dtype, 0.0)
        where = f" in {keys} tensors" if keys else ""
        warnings.warn(
            f"{what}: {n:,} values{where} beyond the {dtype} range were clamped to ±{top:g}",
            stacklevel=2,
        )


def _warn_nonfinite(name: str, keys: set[str]) -> None:
    """NaN/Inf do not stop a build (some models carry them in unused keys) but must be seen."""
    if keys:
        shown = ", ".join(sorted(keys)[:10]) + (
            f" … ({len(keys)} in all)" if len(keys) > 10 else ""
        )
        warnings.warn(
            f"merge '{name}': NaN or Inf values in {len(keys)} tensors: {shown} "
            "(from the inputs, or values beyond the dtype's range)",
            stacklevel=2,
        )
