"""The merge DAG (networkx), its deterministic schedule, and content-addressed node keys.

Graph nodes are `(kind, name)` tuples with kind in model/merge/output; edges point from an
input to its consumer. A node's key hashes what determines its bytes — method, method version,
canonical parameters, dtype and its inputs' keys — and nothing else (not names, not paths, not
formatting), so a reformatted or renamed recipe maps to the same cache entries.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

import networkx as nx
import xxhash

from mergebuild.engine.methods import REGISTRY
from mergebuild.recipe.model import Recipe

GraphNode = tuple[str, str]


def canonical_json(obj: Any) -> str:
    """One spelling per value: sorted keys, no spaces, shortest float repr, NaN refused."""
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )


def xxh3_hex(data: str | bytes) -> str:
    return xxhash.xxh3_128_hexdigest(data.encode() if isinstance(data, str) else data)


def ref(recipe: Recipe, name: str) -> GraphNode:
    return ("model", name) if name in recipe.models else ("merge", name)


def build_graph(recipe: Recipe) -> nx.DiGraph:
    g = nx.DiGraph()
    for name in recipe.models:
        g.add_node(("model", name))
    for name, node in recipe.nodes.items():
        g.add_node(("merge", name))
        for slot, src in node.inputs.items():
            g.add_edge(ref(recipe, src), ("merge", name), slot=slot)
    for name, out in recipe.outputs.items():
        g.add_edge(ref(recipe, out.source), ("output", name))
        if out.vae is not None:
            g.add_edge(("model", out.vae), ("output", name), slot="vae")
    return g


def find_cycle(recipe: Recipe) -> list[str] | None:
    """Names along one cycle among merge nodes, or None."""
    try:
        edges = nx.find_cycle(build_graph(recipe))
    except nx.NetworkXNoCycle:
        return None
    return [u[1] for u, _ in edges]


def schedule(recipe: Recipe, outputs: Iterable[str] | None = None) -> list[GraphNode]:
    """Topological order of everything the chosen outputs depend on (ties broken by name)."""
    g = build_graph(recipe)
    wanted = [("output", o) for o in (outputs if outputs is not None else recipe.outputs)]
    needed: set[GraphNode] = set(wanted)
    for w in wanted:
        needed |= nx.ancestors(g, w)
    return list(nx.lexicographical_topological_sort(g.subgraph(needed)))


def job_args(recipe: Recipe, name: str, keys: dict[str, str]) -> tuple[list[str], dict[str, Any]]:
    """A node's inputs (names, in the order its method takes them) and parameters.

    A `fold` node sums its terms in a canonical order: the first (the key set's source)
    stays first, the others are sorted by content key (then weight, for two names of one
    file), so neither names nor recipe order reach its key or its bytes.
    """
    node = recipe.nodes[name]
    refs = list(node.inputs.values())
    if node.method != "fold":
        return refs, node.params
    ws = node.params["weights"]
    rest = sorted(range(1, len(refs)), key=lambda i: (keys[refs[i]], canonical_json(ws[i])))
    order = [0, *rest]
    return [refs[i] for i in order], {**node.params, "weights": [ws[i] for i in order]}


def named_inputs(recipe: Recipe, name: str, keys: dict[str, str]) -> dict[str, str]:
    """Slot → name in the order of `job_args` (what a lock file shows next to the params)."""
    refs, _ = job_args(recipe, name, keys)
    return dict(zip(recipe.nodes[name].inputs, refs, strict=True))


def node_identity(recipe: Recipe, name: str, keys: dict[str, str]) -> dict[str, Any]:
    """What a merge node's key hashes: all that determines its bytes, in canonical form."""
    node = recipe.nodes[name]
    method = REGISTRY[node.method]
    refs, params = job_args(recipe, name, keys)
    return {
        "method": node.method,
        "version": method.version,
        "params": params,
        "dtype": node.dtype,
        "inputs": [keys[src] for src in refs],
    }


def compute_keys(recipe: Recipe, model_keys: dict[str, str]) -> dict[str, str]:
    """Keys for every model (given: content hashes) and merge node (derived, in topo order)."""
    keys = dict(model_keys)
    for kind, name in nx.topological_sort(build_graph(recipe)):
        if kind == "merge":
            keys[name] = xxh3_hex(canonical_json(node_identity(recipe, name, keys)))
    return keys


def render_text(recipe: Recipe) -> str:
    lines = []
    for kind, name in schedule(recipe):
        if kind == "model":
            m = recipe.models[name]
            where = " ".join(
                filter(None, [str(m.path or ""), f"sha256:{m.sha256}" if m.sha256 else ""])
            )
            lines.append(f"model  {name:<24} {where}")
        elif kind == "merge":
            node = recipe.nodes[name]
            args = ", ".join(f"{s}={r}" for s, r in node.inputs.items())
            params = ", ".join(f"{k}={v}" for k, v in node.params.items())
            lines.append(
                f"merge  {name:<24} {node.method}({', '.join(filter(None, [args, params]))})"
                f" dtype={node.dtype}"
            )
            if node.method == "fold":
                from mergebuild.recipe.fold import describe

                lines.append(f"       {'':<24} {describe(recipe, name)}")
        else:
            out = recipe.outputs[name]
            lines.append(
                f"output {name:<24} ← {out.source} → {out.path}"
                f"{f' dtype={out.dtype}' if out.dtype else ''}"
                f"{f' vae={out.vae}' if out.vae else ''}"
                f"{f' {canonical_json(out.options)}' if out.options else ''}"
            )
    return "\n".join(lines)


def render_dot(recipe: Recipe) -> str:
    shapes = {"model": "box", "merge": "ellipse", "output": "note"}
    g = build_graph(recipe)
    lines = ["digraph mergebuild {", "  rankdir=LR;"]
    for kind, name in schedule(recipe):
        label = name
        if kind == "merge":
            node = recipe.nodes[name]
            label = f"{name}\\n{node.method} {canonical_json(node.params)}".replace('"', "'")
        lines.append(f'  "{kind}:{name}" [shape={shapes[kind]}, label="{label}"];')
    for u, v, data in sorted(g.edges(data=True)):
        attr = f' [label="{data["slot"]}"]' if "slot" in data else ""
        lines.append(f'  "{u[0]}:{u[1]}" -> "{v[0]}:{v[1]}"{attr};')
    lines.append("}")
    return "\n".join(lines)
