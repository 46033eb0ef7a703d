"""The Builder: plan, lock what will be written, re-plan, execute, publish, record.

Only the order of the steps lives here; each step is its own module (see the package
docstring), so this file reads as the build's outline.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path

from mergebuild.atomic import publish
from mergebuild.build.execute import FILES_PER_PASS_FDS, Execution
from mergebuild.build.journal import record
from mergebuild.build.locks import locked
from mergebuild.build.plan import Item, Plan, Planner
from mergebuild.build.speculate import DROPPED, build_speculatively
from mergebuild.cache import CacheStore
from mergebuild.errors import BuildError, Problem, RecipeError, did_you_mean
from mergebuild.fetch.missing import fetch_missing
from mergebuild.graph import build_graph, schedule
from mergebuild.progress import Progress
from mergebuild.recipe.model import Recipe


class Builder:
    def __init__(
        self,
        recipe: Recipe,
        store: CacheStore,
        outputs: list[str] | None = None,
        jobs: int = 1,
        max_memory: int = 1 << 30,
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
        self.speculate = True  # hash new inputs while merging them (False: hash them first)
        self.hashed_while_merging: list[str] = []  # set by run()
        self.remote: object | None = None  # a remote cache session (remote/session.py)
        self.graph = build_graph(recipe)

    def plan(self, speculate: bool = False) -> Plan:
        """What is cached, what to build and why (no tensor is read). `speculate`: new inputs
        get placeholder hashes instead of being read (build/speculate.py)."""
        return Planner(
            self.recipe,
            self.store,
            self.graph,
            self.outputs,
            self.model_dirs,
            self.locked_inputs,
            self.remote,
        ).plan(speculate)

    def models(self) -> list[str]:
        """The input models the selected outputs depend on."""
        return [n for k, n in schedule(self.recipe, self.outputs) if k == "model"]

    def run(self) -> tuple[Plan, float]:
        """Build what the plan says, publish every selected output, record the journal.

        New inputs are hashed while the first pass merges them (speculate.py); what that
        could not build (a plan too long for one pass) is then built the usual way."""
        t0 = time.perf_counter()
        fetch_missing(self.recipe, self.models(), self.store, self.model_dirs, self.progress)
        plan = self.plan(speculate=self.speculate)
        early: dict[tuple[str, str], Item] = {}
        if plan.pending and plan.to_build():
            early = build_speculatively(self, plan) or {}
            dropped = sorted(n for (_, n), i in early.items() if i.reason == DROPPED)
            if dropped:
                self.progress.log(
                    f"already in the cache under their real keys (the same inputs, other "
                    f"paths): {', '.join(dropped)}; this build's copies were dropped"
                )
            hashed = plan.pending
            plan = self.plan()  # hashes memoized now: what is left, under the real keys
            plan.hashed = [*hashed, *(n for n in plan.hashed if n not in hashed)]
            for item in plan.items:
                got = early.get((item.kind, item.name))
                if got is not None and item.status == "cached" and got.status == "built":
                    item.status, item.reason, item.seconds = "built", got.reason, got.seconds
                    item.stats = got.stats
                elif got is not None and item.status == "cached":
                    item.reason = got.reason
        if plan.to_build():
            # only what gets a cache file: a `cache: false` node is never shared through it
            keys = [i.key for i in plan.to_build() if i.kind == "output" or i.stored]
            with locked(self.store, keys, FILES_PER_PASS_FDS):
                hashed = plan.hashed
                plan = self.plan()  # another process may have built some while we waited
                plan.hashed = [*hashed, *(n for n in plan.hashed if n not in hashed)]
                self._drop_corrupt(plan)
                if plan.to_build():
                    Execution(
                        self.recipe,
                        self.store,
                        self.progress,
                        self.jobs,
                        self.max_memory,
                        self.device,
                    ).execute(plan)
        self.finish(plan)
        return plan, time.perf_counter() - t0

    def finish(self, plan: Plan) -> None:
        """Publish every selected output from the cache and record the journal: the end of
        every build, whoever computed its nodes (this process, or Ray tasks)."""
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
        record(self.recipe, self.store, plan)

    def _drop_corrupt(self, plan: Plan) -> None:
        """Report and delete entries that failed their checksum; the build writes them anew."""
        for key, (name, why) in plan.corrupt.items():
            warnings.warn(
                f"cache entry {key} ('{name}') corrupted: {why}; rebuilding", stacklevel=1
            )
            self.store.remove(key)
