"""What an output file says about where it came from (safetensors `__metadata__`).

Two views of the same history are written:
- `mergebuild`: the canonical recipe subgraph that produced the file (methods, parameters,
  dtypes, node keys), every input's SHA-256 and name, and the provenance any input itself
  carried, nested — enough for `mergebuild extract` to rebuild the file;
- `sd_merge_recipe` / `sd_merge_models`: the fields the web UI's merger writes, so existing
  UIs show the merge history. Intermediate nodes have no file hash; they are listed under
  `mergebuild:<node key>` with their own recipe.

Only content and recipe semantics go in — never timestamps, absolute paths, file names or
hostnames — so two machines, checkouts or cache directories produce identical bytes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mergebuild import __version__
from mergebuild.graph import canonical_json, ref
from mergebuild.recipe.model import Recipe

METADATA_KEY = "mergebuild"
FORMAT = 2
WEBUI_METHODS = {
    "weighted_sum": "Weighted sum",
    "add_difference": "Add difference",
    "copy": "No interpolation",
}


@dataclass(frozen=True)
class InputFacts:
    """What provenance records about an input file (all derived from its bytes)."""

    sha256: str
    legacy: str
    size: int
    metadata: dict[str, Any] = field(default_factory=dict)  # its own header metadata, parsed


def read_input_metadata(path: Path) -> dict[str, Any]:
    """A safetensors input's `__metadata__`, JSON values parsed; {} for other formats."""
    if path.suffix.lower() not in (".safetensors", ".sft"):
        return {}
    from mergebuild.engine.safetensors_io import read_header
    from mergebuild.errors import BuildError

    try:
        meta = read_header(path).metadata
    except BuildError:
        return {}  # reported properly when the engine opens the file
    out: dict[str, Any] = {}
    for k, v in meta.items():
        try:
            out[k] = json.loads(v, parse_constant=_refuse) if v[:1] in "{[" else v
        except ValueError:  # not JSON, or NaN/Infinity that canonical JSON cannot carry
            out[k] = v
    return out


def _refuse(token: str) -> Any:
    raise ValueError(token)


def subgraph(recipe: Recipe, output: str) -> tuple[list[str], list[str]]:
    """(models, merge nodes) the output depends on, sorted by name.

    A walk up from this output alone: building the whole graph for each output made a recipe
    of N outputs cost N² (1000 outputs: 70 s for `-n`)."""
    out = recipe.outputs[output]
    models, merges = set(), set()
    stack = [out.source, *([out.vae] if out.vae is not None else [])]
    while stack:
        name = stack.pop()
        if name in recipe.models:
            models.add(name)
        elif name not in merges:
            merges.add(name)
            stack.extend(recipe.nodes[name].inputs.values())
    return sorted(models), sorted(merges)


def output_provenance(
    recipe: Recipe,
    output: str,
    keys: dict[str, str],
    inputs: dict[str, InputFacts],
    models: list[str],
    merges: list[str],
) -> dict[str, Any]:
    """mergebuild's own record; `models`/`merges` is the output's subgraph()."""
    out = recipe.outputs[output]
    model_entries: dict[str, Any] = {}
    for m in models:
        facts = inputs[m]
        entry: dict[str, Any] = {"sha256": facts.sha256, "size": facts.size, "xxh3": keys[m]}
        if isinstance(facts.metadata.get(METADATA_KEY), dict):
            entry["provenance"] = facts.metadata[METADATA_KEY]
        elif "sd_merge_recipe" in facts.metadata:
            entry["sd_merge_recipe"] = facts.metadata["sd_merge_recipe"]
        model_entries[m] = entry
    return {
        "format": FORMAT,
        "mergebuild_version": __version__,
        "output": {
            "name": output,
            "from": out.source,
            "dtype": out.dtype or "auto",
            **out.options,  # prune / components / include / exclude, when not the default
            **({"vae": out.vae} if out.vae else {}),
        },
        "models": model_entries,
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


def _webui_id(recipe: Recipe, name: str, keys: dict[str, str], inputs: dict) -> str:
    return inputs[name].sha256 if name in recipe.models else f"mergebuild:{keys[name]}"


def _webui_recipe(
    recipe: Recipe, node: str, keys: dict[str, str], inputs: dict, output: str | None
) -> dict[str, Any]:
    """One merge step in the web UI merger's vocabulary."""
    spec = recipe.nodes[node]
    ids = [_webui_id(recipe, src, keys, inputs) for src in spec.inputs.values()]
    entry: dict[str, Any] = {
        "type": "mergebuild",
        "mergebuild_node": node,
        "interp_method": WEBUI_METHODS.get(spec.method, spec.method),
        "primary_model_hash": ids[0],
        "secondary_model_hash": ids[1] if len(ids) > 1 and spec.method != "linear" else None,
        "tertiary_model_hash": ids[2] if len(ids) > 2 and spec.method != "linear" else None,
        "multiplier": spec.params.get("alpha"),
        "config_source": 0,
        "bake_in_vae": "None",
        "discard_weights": "",
        "is_inpainting": False,
        "is_instruct_pix2pix": False,
    }
    if spec.method == "linear":
        entry["model_hashes"] = ids
        entry["weights"] = spec.params.get("weights")
    if output is not None:
        dtype = recipe.outputs[output].dtype
        entry["save_as_half"] = dtype == "fp16"
        entry["custom_name"] = output
    return entry


def webui_metadata(
    recipe: Recipe,
    output: str,
    keys: dict[str, str],
    inputs: dict[str, InputFacts],
    models: list[str],
    merges: list[str],
) -> dict[str, str]:
    """The web UI merger's two fields; `models`/`merges` is the output's subgraph()."""
    out = recipe.outputs[output]
    if out.source in recipe.models:  # an output straight from a model: a conversion
        src = out.source
        top: dict[str, Any] = {
            "type": "mergebuild",
            "interp_method": WEBUI_METHODS["copy"],
            "primary_model_hash": inputs[src].sha256,
            "secondary_model_hash": None,
            "tertiary_model_hash": None,
            "save_as_half": out.dtype == "fp16",
            "custom_name": output,
        }
    else:
        top = _webui_recipe(recipe, out.source, keys, inputs, output)
    top["bake_in_vae"] = out.vae or "None"
    top["discard_weights"] = "|".join(out.options.get("exclude", []))
    models_field: dict[str, Any] = {}
    for m in models:
        facts = inputs[m]
        models_field[facts.sha256] = {
            "name": m,
            "legacy_hash": facts.legacy,
            "sd_merge_recipe": facts.metadata.get("sd_merge_recipe"),
        }
        nested = facts.metadata.get("sd_merge_models")
        if isinstance(nested, dict):
            for k, v in nested.items():
                models_field.setdefault(k, v)
    for n in merges:
        if n != out.source:
            models_field[f"mergebuild:{keys[n]}"] = {
                "name": n,
                "legacy_hash": None,
                "sd_merge_recipe": _webui_recipe(recipe, n, keys, inputs, None),
            }
    return {
        "sd_merge_recipe": canonical_json(top),
        "sd_merge_models": canonical_json(models_field),
    }


def output_metadata(
    recipe: Recipe, output: str, keys: dict[str, str], inputs: dict[str, InputFacts]
) -> dict[str, str]:
    models, merges = subgraph(recipe, output)  # one graph walk for both views
    return {
        METADATA_KEY: canonical_json(
            output_provenance(recipe, output, keys, inputs, models, merges)
        ),
        **webui_metadata(recipe, output, keys, inputs, models, merges),
    }


def source_key(recipe: Recipe, output: str, keys: dict[str, str]) -> str:
    return keys[ref(recipe, recipe.outputs[output].source)[1]]
