"""What an output file says about where it came from (safetensors `__metadata__`).

Only content and recipe semantics go in — names, methods, parameters, content keys, versions —
never timestamps, absolute paths or hostnames, so two machines produce identical bytes.
"""

from __future__ import annotations

from typing import Any

import networkx as nx

from mergebuild import __version__
from mergebuild.graph import build_graph, canonical_json, ref
from mergebuild.recipe.model import Recipe

METADATA_KEY = "mergebuild"


def subgraph(recipe: Recipe, output: str) -> tuple[list[str], list[str]]:
    """(models, merge nodes) the output depends on, sorted by name."""
    g = build_graph(recipe)
    anc = nx.ancestors(g, ("output", output))
    return (sorted(n for k, n in anc if k == "model"), sorted(n for k, n in anc if k == "merge"))


def output_provenance(recipe: Recipe, output: str, keys: dict[str, str]) -> dict[str, Any]:
    out = recipe.outputs[output]
    models, merges = subgraph(recipe, output)
    return {
        "format": 1,
        "mergebuild_version": __version__,
        "output": {
            "from": out.source,
            "dtype": out.dtype or "auto",
            **({"options": out.options} if out.options else {}),
            **({"vae": out.vae} if out.vae else {}),
        },
        "models": {m: {"xxh3": keys[m]} for m in models},
        "merges": {
            n: {
                "method": recipe.nodes[n].method,
                "inputs": recipe.nodes[n].inputs,
                "params": recipe.nodes[n].params,
                "dtype": recipe.nodes[n].dtype,
                "key": keys[n],
            }
            for n in merges
        },
    }


def output_metadata(recipe: Recipe, output: str, keys: dict[str, str]) -> dict[str, str]:
    return {METADATA_KEY: canonical_json(output_provenance(recipe, output, keys))}


def source_key(recipe: Recipe, output: str, keys: dict[str, str]) -> str:
    return keys[ref(recipe, recipe.outputs[output].source)[1]]
