"""Plan a build (what is cached, what to build, and why) and carry it out.

Planning needs only file hashes and the recipe — no torch — so `--dry-run` and a fully cached
build stay fast. Building runs one fused pass (engine/executor.py) over every node that must be
computed, writes each result to a temp file next to its cache object, fsyncs and renames it,
then publishes outputs as hardlinks of their cache objects.
"""

from __future__ import annotations

import contextlib
import os
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mergebuild import __version__
from mergebuild.atomic import fsync_dir, make_temp, publish
from mergebuild.cache import CacheStore
from mergebuild.cacheroot import MARKER, SUBDIRS
from mergebuild.engine.methods import REGISTRY
from mergebuild.errors import BuildError, Problem, RecipeError, did_you_mean
from mergebuild.graph import build_graph, canonical_json, node_identity, schedule, xxh3_hex
from mergebuild.hashing import stat_signature
from mergebuild.locate import ResolvedInput, resolve_models
from mergebuild.progress import Progress
from mergebuild.provenance import InputFacts, output_metadata, read_input_metadata, source_key
from mergebuild.recipe.model import Recipe

# Files one fused pass writes at once. Each holds a 4 MiB staging block (more while the disk
# lags) and two descriptors while it is written: a 1000-node cached chain in one pass held
# ~2.4 MB per node of 2.4 MB models (1.1 GB at 300 nodes). Typical recipes stay in one pass.
MAX_FILES_PER_PASS = 32
# descriptors a pass may hold besides the locks: two per file written, inputs, and slack
# for the interpreter, torch and the readahead
FILES_PER_PASS_FDS = 4 * MAX_FILES_PER_PASS + 256


@dataclass
class Item:
    """One merge node or output in the plan, and (after a build) what happened to it."""

    kind: str  # "merge" | "output"
    name: str
    key: str
    status: str  # plan: "cached" | "build"; after running: "cached" | "built"
    reason: str
    stored: bool  # merge: its value has (or gets) a cache object; output: always
    path: Path | None = None
    seconds: float = 0.0
    bytes: int | None = None
    stats: dict[str, Any] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "key": self.key,
            "status": self.status,
            "reason": self.reason,
            "seconds": round(self.seconds, 3),
            "bytes": self.bytes,
            "path": str(self.path) if self.path else None,
            **self.stats,
        }


@dataclass
class Plan:
    items: list[Item]
    keys: dict[str, str]
    models: dict[str, tuple[Path, list[int]]]  # name → (path, stat signature when hashed)
    hashed: list[str]  # models whose bytes were (re-)read to get their key
    inputs: dict[str, ResolvedInput] = field(default_factory=dict)
    facts: dict[str, InputFacts] = field(default_factory=dict)
    corrupt: dict[str, tuple[str, str]] = field(default_factory=dict)  # key → (name, why)

    def to_build(self) -> list[Item]:
        return [i for i in self.items if i.status == "build"]


class Builder:
    def __init__(
        self,
        recipe: Recipe,
        store: CacheStore,
        outputs: list[str] | None = None,
        jobs: int = 1,
        max_memory: int = 2 << 30,
        progress: Progress | None = None,
        device: str = "cpu",
        model_dirs: list[Path] | None = None,
        locked_inputs: dict[str, str] | None = None,
    ):
        unknown = [o for o in outputs or [] if o not in recipe.outputs]
        if unknown:
            raise RecipeError(
                [
                    Problem(
                        f"no output named '{o}' in {recipe.path}{did_you_mean(o, recipe.outputs)}"
                    )
                    for o in unknown
                ]
            )
        self.recipe, self.store = recipe, store
        self.outputs = outputs or list(recipe.outputs)
        self.jobs, self.max_memory, self.device = jobs, max_memory, device
        self.model_dirs = model_dirs or []
        self.locked_inputs = locked_inputs  # name → sha256 from RECIPE.lock, if one applies
        self.progress = progress or Progress(enabled=False)
        self.graph = build_graph(recipe)

    # -- planning -----------------------------------------------------------------------------

    def plan(self) -> Plan:
        order = schedule(self.recipe, self.outputs)
        resolved = resolve_models(
            self.recipe, [n for k, n in order if k == "model"], self.store.hashes, self.model_dirs
        )
        self._check_lock(resolved)
        self._check_outputs_spare_inputs(resolved)
        keys = {n: r.hashes.xxh3 for n, r in resolved.items()}
        models = {n: (r.path, r.signature) for n, r in resolved.items()}
        hashed = [n for n, r in resolved.items() if not r.memoized]
        facts = {
            n: InputFacts(
                r.hashes.sha256, r.hashes.legacy, r.hashes.size, read_input_metadata(r.path)
            )
            for n, r in resolved.items()
        }
        for kind, name in order:
            if kind == "merge":
                keys[name] = xxh3_hex(canonical_json(node_identity(self.recipe, name, keys)))
        okeys = {}
        for name in self.outputs:
            meta = output_metadata(self.recipe, name, keys, facts)
            spec = self.recipe.outputs[name]
            layout: dict[str, Any] = dict(spec.options)  # empty for plain outputs: keys unchanged
            if spec.vae is not None:
                layout["vae"] = keys[spec.vae]
            okeys[name] = xxh3_hex(
                canonical_json(
                    {
                        "kind": "output",
                        "source": source_key(self.recipe, name, keys),
                        "dtype": spec.dtype,
                        "metadata": meta,
                        **({"layout": layout} if layout else {}),
                    }
                )
            )
        journal = self.store.read_journal(self.recipe.path)
        needed: set[tuple[str, str]] = set()
        items: list[Item] = []
        corrupt: dict[str, tuple[str, str]] = {}

        def usable(name: str, key: str) -> bool:
            """In the cache and its bytes match their checksum (checked only for entries used)."""
            if not self.store.has(key):
                return False
            why = self.store.problem(key)
            if why is not None:
                corrupt[key] = (name, why)
            return why is None

        for kind, name in reversed(order):
            if kind == "output":
                key = okeys[name]
                if usable(name, key):
                    item = Item("output", name, key, "cached", "in cache", True)
                else:
                    item = Item(
                        "output",
                        name,
                        key,
                        "build",
                        _corrupt_reason(corrupt.get(key))
                        or self._why_output(name, key, keys, journal),
                        True,
                    )
                    needed.update(self.graph.predecessors(("output", name)))
                item.path = self.recipe.outputs[name].path
                items.append(item)
            elif kind == "merge":
                node = self.recipe.nodes[name]
                key = keys[name]
                feeds_merge = any(k == "merge" for k, _ in self.graph.successors(("merge", name)))
                stored = node.cache if node.cache is not None else feeds_merge
                have = self.store.has(key)
                if ("merge", name) not in needed:
                    status, why = "cached", "in cache" if have else "not needed: downstream cached"
                elif usable(name, key):
                    status, why = "cached", "in cache"
                else:
                    have = False
                    status = "build"
                    why = _corrupt_reason(corrupt.get(key)) or self._why_node(
                        name, key, keys, journal
                    )
                    needed.update(self.graph.predecessors(("merge", name)))
                if node.method == "fold":  # `-n` shows what the node folded into
                    from mergebuild.recipe.fold import describe

                    why += f"; {describe(self.recipe, name)}"
                item = Item("merge", name, key, status, why, stored or have)
                item.path = self.store.object_path(key) if item.stored else None
                items.append(item)
        items.reverse()
        all_keys = {**keys, **{f"output:{k}": v for k, v in okeys.items()}}
        return Plan(items, all_keys, models, hashed, resolved, facts, corrupt)

    def _check_outputs_spare_inputs(self, resolved: dict[str, ResolvedInput]) -> None:
        """A model found by hash may live where an output goes: never write over it. Nor over
        the cache's own files (objects, sidecars, journals, memos: `cache gc` would delete the
        output, or the output would corrupt the cache). And `lock` writes RECIPE.lock: it must
        not be an input."""
        from mergebuild.lockfile import lock_path

        real = {os.path.realpath(r.path): n for n, r in resolved.items()}
        lock = os.path.realpath(lock_path(self.recipe))
        if lock in real:
            raise BuildError(
                f"input model '{real[lock]}' is the recipe's lock file path {lock}; "
                "rename the model"
            )
        cache = [os.path.realpath(self.store.root / d) for d in _CACHE_NAMES]
        for name in self.outputs:
            path = self.recipe.outputs[name].path
            hit = real.get(os.path.realpath(path))
            if hit is not None:
                raise BuildError(
                    f"output '{name}' ({path}) is the file of input model '{hit}'; writing it "
                    "would destroy the input"
                )
            lands = os.path.join(os.path.realpath(path.parent), path.name)
            if any(lands == d or lands.startswith(d + os.sep) for d in cache):
                raise BuildError(
                    f"output '{name}' ({path}) is inside the cache's own files "
                    f"({self.store.root}); write outputs elsewhere"
                )

    def _check_lock(self, resolved: dict[str, ResolvedInput]) -> None:
        """With a lock file, every input must be the exact file the lock recorded."""
        if self.locked_inputs is None:
            return
        bad = []
        for name, r in resolved.items():
            want = self.locked_inputs.get(name)
            if want is None:
                warnings.warn(
                    f"model '{name}' is not in the lock file; `mergebuild lock` records it",
                    stacklevel=2,
                )
            elif want != r.hashes.sha256:
                bad.append(
                    f"model '{name}': {r.path} has sha256 {r.hashes.sha256}, "
                    f"the lock file expects {want}"
                )
        if bad:
            raise BuildError(
                "inputs differ from the lock file:\n  "
                + "\n  ".join(bad)
                + "\n(rebuild with --update-lock to accept them, or restore the locked files)"
            )

    def _why_node(self, name: str, key: str, keys: dict[str, str], journal: dict) -> str:
        prev = journal.get("nodes", {}).get(name)
        if prev is None:
            return "new node (never built)"
        if prev.get("key") == key:
            return "missing from cache"
        node = self.recipe.nodes[name]
        why = []
        if prev.get("method") != node.method:
            why.append(f"method changed: {prev.get('method')} → {node.method}")
        else:
            old = prev.get("params", {})
            for p in sorted(set(old) | set(node.params)):
                if old.get(p) != node.params.get(p):
                    was, now = old.get(p), node.params.get(p)
                    if isinstance(was, dict) or isinstance(now, dict):  # block weights: long
                        why.append(f"parameter changed: {p} (block weights)")
                    else:
                        why.append(f"parameter changed: {p} {was} → {now}")
        if prev.get("dtype") != node.dtype:
            why.append(f"dtype changed: {prev.get('dtype')} → {node.dtype}")
        old_inputs = prev.get("inputs", {})
        for slot, src in node.inputs.items():
            if old_inputs.get(slot) == [src, keys[src]]:
                continue
            if old_inputs.get(slot, [None])[0] != src:
                why.append(f"input {slot} is now '{src}'")
            elif src in self.recipe.models:
                why.append(f"new input bytes: {src}")
            else:
                why.append(f"upstream '{src}' changed")
        return "; ".join(why) or "definition changed"

    def _why_output(self, name: str, key: str, keys: dict[str, str], journal: dict) -> str:
        prev = journal.get("outputs", {}).get(name)
        if prev is None:
            return "new output (never built)"
        if prev.get("key") == key:
            return "missing from cache"
        src = self.recipe.outputs[name].source
        if prev.get("source_key") != keys[src]:
            kind = "new input bytes" if src in self.recipe.models else "source changed"
            return f"{kind}: {src}"
        return "output settings or provenance changed"

    # -- building -----------------------------------------------------------------------------

    def run(self) -> tuple[Plan, float]:
        """Build what the plan says, publish every selected output, record the journal."""
        t0 = time.perf_counter()
        plan = self.plan()
        if plan.to_build():
            # only what gets a cache file: a `cache: false` node is never shared through it
            with self._locked([i.key for i in plan.to_build() if i.kind == "output" or i.stored]):
                hashed = plan.hashed
                plan = self.plan()  # another process may have built some while we waited
                plan.hashed = [*hashed, *(n for n in plan.hashed if n not in hashed)]
                self._drop_corrupt(plan)
                if plan.to_build():
                    self._execute(plan)
        for item in plan.items:
            if item.kind == "output":
                obj = self.store.object_path(item.key)
                try:
                    publish(obj, self.recipe.outputs[item.name].path)
                except OSError as e:
                    raise BuildError(f"cannot write output {item.path}: {e.strerror}") from None
                item.bytes = obj.stat().st_size
            elif item.stored and item.path is not None and item.path.exists():
                item.bytes = item.path.stat().st_size
        self._record(plan)
        return plan, time.perf_counter() - t0

    def _drop_corrupt(self, plan: Plan) -> None:
        """Report and delete entries that failed their checksum; the build writes them anew."""
        for key, (name, why) in plan.corrupt.items():
            warnings.warn(
                f"cache entry {key} ('{name}') corrupted: {why}; rebuilding", stacklevel=1
            )
            self.store.remove(key)

    @contextlib.contextmanager
    def _locked(self, keys: list[str]) -> Iterator[None]:
        keys = sorted(set(keys))  # fixed order: no deadlock between two builds
        _allow_files(len(keys) + FILES_PER_PASS_FDS)  # each held lock is an open file
        with contextlib.ExitStack() as stack:
            for key in keys:
                stack.enter_context(self.store.lock(key))
            yield

    def _execute(self, plan: Plan) -> None:
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
        for lo in range(0, len(files), MAX_FILES_PER_PASS):
            group = files[lo : lo + MAX_FILES_PER_PASS]
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
                st = stats[item.name]
                item.stats = {
                    "dtype": st.dtype,
                    "tensors": st.tensors,
                    "merged": st.merged,
                    "kept_from_a": st.kept_from_a,
                    "copied_non_float": st.copied_non_float,
                    "dropped": st.dropped,
                    "nonfinite_keys": sorted(st.nonfinite),
                }
                _warn_nonfinite(item.name, st.nonfinite)

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
        from mergebuild.engine.executor import FusedPass, NodeJob, Sink
        from mergebuild.engine.readers import open_model
        from mergebuild.engine.safetensors_io import SafetensorsSource
        from mergebuild.graph import job_args

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
        sinks: list[Sink] = []
        temps: list[tuple[Path, Path, Item]] = []
        try:
            for name in sorted(needed_sources - built_names):
                if name in self.recipe.models:
                    sources[name] = open_model(plan.inputs[name].path)
                else:
                    sources[name] = SafetensorsSource(by_name[("merge", name)].path)
            for item in group:
                target = self.store.object_path(item.key)
                fd, tmp = make_temp(target.parent, ".safetensors")
                temps.append((tmp, target, item))
                if item.kind == "merge":
                    meta = {
                        "mergebuild.node": canonical_json(
                            node_identity(self.recipe, item.name, plan.keys)
                        )
                    }
                    sinks.append(Sink(item.name, item.name, fd, None, meta))
                else:
                    out = self.recipe.outputs[item.name]
                    sinks.append(
                        Sink(
                            item.name,
                            out.source,
                            fd,
                            out.dtype,
                            output_metadata(self.recipe, item.name, plan.keys, plan.facts),
                            options=out.options,
                            vae=out.vae,
                        )
                    )
            t0 = time.perf_counter()
            fused = FusedPass(sources, jobs, sinks, device=_check_device(self.device))
            with self.progress.pass_(fused) as on_unit:
                fused.run(self.jobs, self.max_memory, on_unit)
            self._check_inputs_unchanged(plan)
            for sink in sinks:
                os.fsync(sink.fd)
            for sink, (tmp, target, _) in zip(sinks, temps, strict=True):
                os.close(sink.fd)
                sink.fd = -1
                os.replace(tmp, target)
            # every object's rename is durable before any sidecar makes it count as present
            for directory in sorted({target.parent for _, target, _ in temps}):
                fsync_dir(directory)
            for sink, (_, _, item) in zip(sinks, temps, strict=True):
                self.store.write_sidecar(
                    item.key,
                    {
                        "kind": item.kind,
                        "name": item.name,
                        "recipe": str(self.recipe.path),
                        "mergebuild_version": __version__,
                    },
                    checksum=sink.writer.checksum() if sink.writer else None,
                )
            return fused, time.perf_counter() - t0
        except OSError as e:
            raise BuildError(
                f"build failed: {e.strerror or e} "
                f"({getattr(e, 'filename', None) or f'while writing to {self.store.objects}'})"
            ) from None
        finally:
            for sink in sinks:
                if sink.fd >= 0:
                    os.close(sink.fd)
            for tmp, _, _ in temps:
                tmp.unlink(missing_ok=True)
            for src in sources.values():
                src.close()

    def _check_inputs_unchanged(self, plan: Plan) -> None:
        for name, (path, sig) in plan.models.items():
            try:
                now = stat_signature(path.stat())
            except OSError:
                now = None
            if now != sig:
                raise BuildError(
                    f"input model '{name}' ({path}) changed during the build; "
                    "nothing was cached — run the build again"
                )

    def _record(self, plan: Plan) -> None:
        journal = self.store.read_journal(self.recipe.path)
        nodes, outputs = journal.get("nodes", {}), journal.get("outputs", {})
        for item in plan.items:
            if item.kind == "merge":
                node = self.recipe.nodes[item.name]
                nodes[item.name] = {
                    "key": item.key,
                    "method": node.method,
                    "params": node.params,
                    "dtype": node.dtype,
                    "inputs": {s: [src, plan.keys[src]] for s, src in node.inputs.items()},
                }
            else:
                src = self.recipe.outputs[item.name].source
                outputs[item.name] = {
                    "key": item.key,
                    "source_key": plan.keys[src],
                    "path": str(item.path),
                }
        nodes = {k: v for k, v in nodes.items() if k in self.recipe.nodes}
        outputs = {k: v for k, v in outputs.items() if k in self.recipe.outputs}
        with contextlib.suppress(OSError):
            self.store.write_journal(self.recipe.path, {"nodes": nodes, "outputs": outputs})


_CACHE_NAMES = (*SUBDIRS, MARKER)  # the cache's own layout: never an output


def _allow_files(n: int) -> None:
    """Raise this process's open-file limit (soft, up to the hard one) to hold `n` files.

    A 1000-node chain holds a lock file per node for the whole build; 1024, a common default
    soft limit, then failed with "Too many open files" well before the hard limit.
    """
    try:
        import resource
    except ImportError:  # not a Unix: no such limit to raise
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= n:
        return
    want = n if hard == resource.RLIM_INFINITY else min(n, hard)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


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


def _corrupt_reason(found: tuple[str, str] | None) -> str | None:
    return f"cache entry corrupted: {found[1]}" if found else None


def _check_device(device: str) -> str:
    if device == "cpu":
        return device
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise BuildError(f"--device {device}: CUDA is not available on this machine")
    return device
