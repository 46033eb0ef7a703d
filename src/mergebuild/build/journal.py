"""The build journal: what each node and output of a recipe was built from last time.

Apart from planning because it is the one piece of state that outlives a build besides the
cache objects: written after every build (`record`), read only to say why something rebuilds
(`why_node`, `why_output`). Losing it changes a reason's wording, never a result.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

from mergebuild.cache import CacheStore
from mergebuild.recipe.model import Recipe

if TYPE_CHECKING:
    from mergebuild.build.plan import Plan


def why_node(recipe: Recipe, name: str, key: str, keys: dict[str, str], journal: dict) -> str:
    prev = journal.get("nodes", {}).get(name)
    if prev is None:
        return "new node (never built)"
    if prev.get("key") == key:
        return "missing from cache"
    node = recipe.nodes[name]
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
        elif src in recipe.models:
            why.append(f"new input bytes: {src}")
        else:
            why.append(f"upstream '{src}' changed")
    return "; ".join(why) or "definition changed"


def why_output(recipe: Recipe, name: str, key: str, keys: dict[str, str], journal: dict) -> str:
    prev = journal.get("outputs", {}).get(name)
    if prev is None:
        return "new output (never built)"
    if prev.get("key") == key:
        return "missing from cache"
    src = recipe.outputs[name].source
    if prev.get("source_key") != keys[src]:
        kind = "new input bytes" if src in recipe.models else "source changed"
        return f"{kind}: {src}"
    return "output settings or provenance changed"


def record(recipe: Recipe, store: CacheStore, plan: Plan) -> None:
    """Remember what this build's nodes and outputs were made from (best effort)."""
    journal = store.read_journal(recipe.path)
    nodes, outputs = journal.get("nodes", {}), journal.get("outputs", {})
    for item in plan.items:
        if item.kind == "merge":
            node = recipe.nodes[item.name]
            nodes[item.name] = {
                "key": item.key,
                "method": node.method,
                "params": node.params,
                "dtype": node.dtype,
                "inputs": {s: [src, plan.keys[src]] for s, src in node.inputs.items()},
            }
        else:
            src = recipe.outputs[item.name].source
            outputs[item.name] = {
                "key": item.key,
                "source_key": plan.keys[src],
                "path": str(item.path),
            }
    nodes = {k: v for k, v in nodes.items() if k in recipe.nodes}
    outputs = {k: v for k, v in outputs.items() if k in recipe.outputs}
    with contextlib.suppress(OSError):
        store.write_journal(recipe.path, {"nodes": nodes, "outputs": outputs})
