"""`--executor ray`: a build's cache entries computed as Ray tasks, published to a shared cache.

The driver plans as usual (keys, what is cached, why), then cuts the work into units: one per
file the build writes (each output, each stored merge node). A unit's task runs the normal
engine (Execution, one fused pass) on that file alone, reading its inputs and the entries it
depends on from the cache directory every worker sees (a shared filesystem; a local cluster
shares the disk), and publishes its result there (temp, fsync, rename, sidecar). Only small
dicts (status, seconds, stats) come back through Ray, never tensors. The driver then finishes
as a local build does: outputs hardlinked from the cache, journal, report.

Each task takes the entry's lock and looks again before building: two drivers on one cluster
and one cache build each entry once (the second finds it cached). Ray is imported here only.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import socket
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mergebuild import __version__
from mergebuild.build.plan import Item, Plan
from mergebuild.errors import BuildError, MergebuildError

if TYPE_CHECKING:
    from mergebuild.build.builder import Builder
    from mergebuild.recipe.model import Recipe

# The local cluster's object store carries only the recipe and the plan (once) and small
# dicts: Ray's minimum is 75 MiB, its default a third of the RAM (shared memory).
LOCAL_OBJECT_STORE = 96 << 20


@dataclass(frozen=True)
class Unit:
    """One file a task writes: an output or a stored merge node, and what its pass needs."""

    kind: str  # "merge" | "output"
    name: str
    key: str
    computes: tuple[str, ...]  # uncached merge nodes without a cache file, computed in its pass
    after: tuple[int, ...]  # indices of the units whose entries it reads


@dataclass(frozen=True)
class Settings:
    """What every task needs besides the recipe and the plan."""

    cache_root: Path
    max_memory: int
    device: str
    version: str = __version__
    jobs: int = 1  # engine threads per task: Ray runs the tasks side by side


def plan_units(recipe: Recipe, plan: Plan) -> list[Unit]:
    """The plan's files to build, in topological order, each with the units it waits for."""
    building = {i.name: i for i in plan.to_build() if i.kind == "merge"}
    units: list[Unit] = []
    index: dict[str, int] = {}  # stored merge node → its unit
    for item in plan.to_build():
        if item.kind == "merge" and not item.stored:
            continue  # computed inside the pass of each unit that needs it
        if item.kind == "merge":
            stack = list(recipe.nodes[item.name].inputs.values())
        else:
            out = recipe.outputs[item.name]
            stack = [n for n in (out.source, out.vae) if n is not None]
        computes: set[str] = set()
        after: set[int] = set()
        while stack:  # an explicit stack: a chain may be thousands of nodes deep
            name = stack.pop()
            dep = building.get(name)
            if dep is None or name in computes:
                continue
            if dep.stored:
                after.add(index[name])  # plan.items are in schedule order: already a unit
            else:
                computes.add(name)
                stack.extend(recipe.nodes[name].inputs.values())
        if item.kind == "merge":
            index[item.name] = len(units)
        units.append(Unit(item.kind, item.name, item.key, tuple(sorted(computes)), tuple(after)))
    return units


def sub_plan(plan: Plan, unit: Unit) -> Plan:
    """The plan one task executes: its file and the nodes its pass computes are "build",
    everything else is read from the cache (its dependencies were published before)."""
    builds = {(unit.kind, unit.name), *(("merge", n) for n in unit.computes)}
    items = [
        dataclasses.replace(i, status="build" if (i.kind, i.name) in builds else "cached")
        for i in plan.items
    ]
    return dataclasses.replace(plan, items=items, corrupt={}, pending=[])


def run_unit(shared: tuple[Recipe, Plan], unit: Unit, settings: Settings, *deps: dict) -> dict:
    """The Ray task: build one unit into the shared cache; returns a small status dict."""
    if any(d.get("status") not in ("built", "cached") for d in deps):
        return {"status": "skipped", "key": unit.key}
    if settings.version != __version__:
        return _error(unit, f"the Ray worker runs mergebuild {__version__}, not {settings.version}")
    recipe, plan = shared
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            result = _build_unit(recipe, plan, unit, settings)
        except MergebuildError as e:
            return _error(unit, str(e))
    return {
        **result,
        "key": unit.key,
        "seconds": time.perf_counter() - t0,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "warnings": [str(w.message) for w in caught],
    }


def _build_unit(recipe: Recipe, plan: Plan, unit: Unit, settings: Settings) -> dict[str, Any]:
    """Under the entry's lock: cached by now (another task or driver built it) or build it."""
    from mergebuild.build.execute import FILES_PER_PASS_FDS, Execution
    from mergebuild.build.locks import locked
    from mergebuild.cache import CacheStore
    from mergebuild.progress import Progress

    store = CacheStore(settings.cache_root)
    with locked(store, [unit.key], FILES_PER_PASS_FDS):
        if store.has(unit.key):
            why = store.problem(unit.key)
            if why is None:
                return {"status": "cached"}
            warnings.warn(
                f"cache entry {unit.key} ('{unit.name}') corrupted: {why}; rebuilding",
                stacklevel=1,
            )
            store.remove(unit.key)
        sub = sub_plan(plan, unit)
        quiet = Progress(enabled=False)
        run = Execution(recipe, store, quiet, settings.jobs, settings.max_memory, settings.device)
        run.execute(sub)
    stats = {i.name: i.stats for i in sub.items if i.kind == "merge" and i.status == "built"}
    return {"status": "built", "stats": stats}


def _error(unit: Unit, message: str) -> dict[str, Any]:
    return {"status": "error", "key": unit.key, "message": f"'{unit.name}': {message}"}


def run_on_ray(builder: Builder) -> tuple[Plan, float]:
    """Builder.run's counterpart: plan, build the missing entries on Ray, finish locally."""
    t0 = time.perf_counter()
    plan = builder.plan()
    if plan.to_build():  # a fully cached build starts no cluster and imports no Ray
        units = plan_units(builder.recipe, plan)
        results = _submit(builder, plan, units)
        _apply(plan, units, results)
    builder.finish(plan)
    return plan, time.perf_counter() - t0


def _import_ray() -> Any:
    try:
        import ray
    except ImportError as e:
        raise BuildError(
            f"--executor ray needs Ray, which is not importable here ({e}); "
            "install it with: pip install 'mergebuild[ray]'"
        ) from None
    return ray


# Set before Ray is imported (it reads them then) and inherited by the cluster it starts.
RAY_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",  # a build reports nothing home
}
LOCAL_ENV = {
    # Ray's own switch for "a cluster of this machine only": every service binds and
    # advertises 127.0.0.1 instead of the machine's network address
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    # the raylet waits this long for its Python agents: 20-30 s by default, which a loaded
    # 2-core machine exceeded (the cluster then aborts)
    "RAY_agent_register_timeout_ms": "120000",
}


def _connect(cpus: int) -> tuple[Any, bool]:
    """Ray attached to $RAY_ADDRESS, else a local cluster of `cpus` CPUs on loopback; and
    whether this process started that cluster (and must stop it)."""
    address = os.environ.get("RAY_ADDRESS")
    for k, v in {**RAY_ENV, **({} if address else LOCAL_ENV)}.items():
        os.environ.setdefault(k, v)
    ray = _import_ray()
    quiet = {"logging_level": logging.ERROR, "log_to_driver": False}
    if address:
        _probe(address)
    try:
        if address:
            ray.init(address=address, **quiet)
            return ray, False
        ray.init(
            num_cpus=cpus,
            include_dashboard=False,
            object_store_memory=LOCAL_OBJECT_STORE,
            **quiet,
        )
    except Exception as e:  # Ray raises ConnectionError, RuntimeError, plain Exception...
        if not address:
            raise BuildError(f"cannot start a local Ray cluster: {e}") from e
        raise BuildError(
            f"cannot reach the Ray cluster at {address}: {e} (a cluster with token "
            "authentication also needs RAY_AUTH_MODE=token and its token in RAY_AUTH_TOKEN or "
            "~/.ray/auth_token)"
        ) from e
    return ray, True


def _probe(address: str, seconds: float = 10.0) -> None:
    """Fail fast when nothing listens at a host:port address: Ray itself retried for minutes.
    Other forms (auto, a file of addresses...) are left to Ray."""
    m = re.fullmatch(r"(?:ray://)?\[?([^\]/]+?)\]?:(\d{1,5})/?", address.strip())
    if m is None:
        return
    try:
        socket.create_connection((m[1], int(m[2])), timeout=seconds).close()
    except OSError as e:
        raise BuildError(
            f"cannot reach the Ray cluster at {address}: nothing answers at {m[1]}:{m[2]} "
            f"({e.strerror or e})"
        ) from None


def _submit(builder: Builder, plan: Plan, units: list[Unit]) -> list[dict]:
    """One task per unit, each after the tasks it reads from; results as they complete."""
    ray, started = _connect(builder.jobs)
    try:
        task = ray.remote(num_cpus=1)(run_unit)
        shared = ray.put((builder.recipe, plan))  # once, not once per task
        settings = Settings(builder.store.root, builder.max_memory, builder.device)
        refs: list[Any] = []
        for u in units:
            deps = [refs[i] for i in u.after]
            refs.append(
                task.options(name=f"mergebuild {u.kind} {u.name}").remote(
                    shared, u, settings, *deps
                )
            )
        where = {ref: n for n, ref in enumerate(refs)}
        results: list[dict] = [{} for _ in units]
        pending = list(refs)
        builder.progress.log(f"{len(units)} cache entries to build as Ray tasks")
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            n = where[ready[0]]
            try:
                got = ray.get(ready[0])
            except ray.exceptions.RayError as e:
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise BuildError(f"Ray task for '{units[n].name}' failed: {first}") from e
            if got["status"] not in ("built", "cached"):  # an error (a skip follows one)
                raise BuildError(got.get("message") or f"'{units[n].name}' was not built")
            results[n] = got
            for w in got.get("warnings", []):
                warnings.warn(w, stacklevel=1)
            builder.progress.log(
                f"{got['status']:<7} {units[n].name} ({got.get('seconds', 0):.1f} s, "
                f"{got.get('host')} pid {got.get('pid')})"
            )
        return results
    finally:
        if started:
            ray.shutdown()


def _apply(plan: Plan, units: list[Unit], results: list[dict]) -> None:
    """What the tasks did, into the plan the report and journal are made from."""
    items: dict[tuple[str, str], Item] = {(i.kind, i.name): i for i in plan.items}
    for unit, got in zip(units, results, strict=True):
        item = items[(unit.kind, unit.name)]
        if got["status"] == "cached":
            item.status, item.reason = "cached", "in cache (built meanwhile by another build)"
            continue
        item.status, item.seconds = "built", got["seconds"]
        for name, stats in got["stats"].items():
            node = items[("merge", name)]
            if node.status == "build" or not node.stats:
                node.status, node.seconds, node.stats = "built", got["seconds"], stats
    for item in plan.items:  # a node only cached units needed: nobody computed it here
        if item.status == "build":
            item.status, item.reason = "cached", "not needed: downstream built meanwhile"
