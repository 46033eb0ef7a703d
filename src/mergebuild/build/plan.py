"""The plan of a build: every node's and output's content key, whether the cache has it, why not.

Apart from execution because planning reads only the recipe, file hashes and the cache index —
never a tensor, never torch — and is all that `--dry-run` and a fully cached build need.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mergebuild.build.checks import check_lock, check_outputs_spare_inputs
from mergebuild.build.journal import why_node, why_output
from mergebuild.build.speculate import unhashed_inputs
from mergebuild.cache import CacheStore
from mergebuild.fetch.missing import absent, placeholder
from mergebuild.graph import canonical_json, node_identity, schedule, xxh3_hex
from mergebuild.locate import ResolvedInput, resolve_models
from mergebuild.lora.peft import input_key
from mergebuild.lora.roles import check_roles
from mergebuild.provenance import InputFacts, output_metadata, read_input_metadata, source_key
from mergebuild.recipe.model import Recipe

if TYPE_CHECKING:
    import networkx as nx


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
    # models not hashed yet (speculative plan): their keys and hashes are placeholders
    pending: list[str] = field(default_factory=list)
    downloads: list[str] = field(default_factory=list)  # models `-n` would download first

    def to_build(self) -> list[Item]:
        return [i for i in self.items if i.status == "build"]


class Planner:
    """Plans the selected outputs of a recipe against one cache (see `plan`)."""

    def __init__(
        self,
        recipe: Recipe,
        store: CacheStore,
        graph: nx.DiGraph,
        outputs: list[str],
        model_dirs: list[Path],
        locked_inputs: dict[str, str] | None,
        remote: Any = None,
    ) -> None:
        self.recipe, self.store, self.graph, self.outputs = recipe, store, graph, outputs
        self.model_dirs, self.locked_inputs = model_dirs, locked_inputs
        self.remote = remote  # remote/session.py: `lookup` pulls a needed key into the store

    def plan(self, speculate: bool = False) -> Plan:
        """With `speculate`, models never hashed get placeholder hashes (speculate.py)."""
        order = schedule(self.recipe, self.outputs)
        names = [n for k, n in order if k == "model"]
        pending = unhashed_inputs(self.recipe, self.graph, names, self.store) if speculate else {}
        rest = [n for n in names if n not in pending]
        # a build downloads these first (fetch/); `-n` plans them with placeholders
        to_fetch = absent(self.recipe, rest, self.store, self.model_dirs)
        resolved = resolve_models(
            self.recipe,
            [n for n in rest if n not in to_fetch],
            self.store.hashes,
            self.model_dirs,
            self.store.root,
        )
        check_lock(resolved, self.locked_inputs)  # the pending ones: once they are hashed
        resolved.update(pending)
        resolved.update({n: placeholder(self.recipe.models[n], self.store.root) for n in to_fetch})
        resolved = {n: resolved[n] for n in names}
        check_roles(self.recipe, {n: r.path for n, r in resolved.items() if n not in to_fetch})
        check_outputs_spare_inputs(self.recipe, self.store, self.outputs, resolved)
        keys = {n: input_key(r.path, r.hashes.xxh3) for n, r in resolved.items()}  # + PEFT cfg
        models = {n: (r.path, r.signature) for n, r in resolved.items()}
        hashed = [n for n, r in resolved.items() if not r.memoized]
        facts = {
            n: InputFacts(
                r.hashes.sha256,
                r.hashes.legacy,
                r.hashes.size,
                read_input_metadata(r.path) if n not in to_fetch else {},
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
        hits: dict[str, str] = {}  # key → "remote hit…": pulled (or, dry run, pullable)

        def usable(name: str, key: str) -> bool:
            """In the cache and its bytes match their checksum (checked only for entries used)."""
            hit = self.remote.lookup(name, key) if self.remote is not None else None
            if hit is not None:
                hits[key] = hit
            if not self.store.has(key):
                return hit is not None  # a dry run's remote hit, not downloaded
            why = self.store.problem(key)
            if why is not None:
                corrupt[key] = (name, why)
            return why is None

        for kind, name in reversed(order):
            if kind == "output":
                key = okeys[name]
                if usable(name, key):
                    item = Item("output", name, key, "cached", hits.get(key, "in cache"), True)
                else:
                    item = Item(
                        "output",
                        name,
                        key,
                        "build",
                        _corrupt_reason(corrupt.get(key))
                        or why_output(self.recipe, name, key, keys, journal),
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
                    status, why = "cached", hits.get(key, "in cache")
                else:
                    have = False
                    status = "build"
                    why = _corrupt_reason(corrupt.get(key)) or why_node(
                        self.recipe, name, key, keys, journal
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
        plan = Plan(items, all_keys, models, hashed, resolved, facts, corrupt, sorted(pending))
        plan.downloads = to_fetch
        return plan


def _corrupt_reason(found: tuple[str, str] | None) -> str | None:
    return f"cache entry corrupted: {found[1]}" if found else None
