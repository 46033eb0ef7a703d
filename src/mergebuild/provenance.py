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

import contextlib
import json
import math
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from mergebuild import __version__
from mergebuild.graph import canonical_json, ref
from mergebuild.recipe.model import Recipe

METADATA_KEY = "mergebuild"
OMITTED = "provenance_omitted"  # why an input's provenance is not embedded (it was bad or big)
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
    metadata: dict[str, Any] = field(default_factory=dict)  # read_input_metadata(): bounded


# Foreign metadata is parsed, validated and embedded within these bounds, so a hostile input
# can neither break a build nor grow its outputs' headers without limit.
PARSED_KEYS = (METADATA_KEY, "sd_merge_recipe", "sd_merge_models")
FOREIGN_CAP = 2 << 20  # a metadata value parsed as JSON; a larger one stays an opaque string
MAX_CONTAINERS = 100_000  # arrays and objects in one value (a real provenance: ~10 a node)
MAX_JSON_DEPTH = 128  # nesting of a parsed value (json.loads recurses; ~1000 is a crash)
EMBED_CAP = 256 << 10  # one input's provenance embedded in an output
WEBUI_CAP = 64 << 10  # one input's web UI field (opaque to us) carried over
MAX_GENERATIONS = 8  # nested provenance kept below an output; deeper ancestors are cut
_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.S)
_NOT_BRACKET = bytes(b for b in range(256) if b not in b"[]{}")


def parse_foreign_json(text: str) -> Any:
    """A JSON value from someone else's file, or ValueError: size and nesting are bounded,
    numbers finite (`1e400`, NaN and Infinity are refused), strings valid Unicode."""
    if len(text) > FOREIGN_CAP:
        raise ValueError(f"larger than {FOREIGN_CAP >> 20} MiB")
    if text.count("[") + text.count("{") > MAX_CONTAINERS:  # what makes json.loads slow
        raise ValueError(f"more than {MAX_CONTAINERS:,} arrays and objects")
    if json_depth(text) > MAX_JSON_DEPTH:
        raise ValueError(f"nested deeper than {MAX_JSON_DEPTH} levels")
    value = json.loads(text, parse_constant=_refuse, parse_float=_finite)
    canonical_json(value).encode("utf-8")  # a lone surrogate (from a \\ud800 escape): ValueError
    return value


def json_depth(text: str) -> int:
    """Deepest bracket nesting of JSON text, outside strings, without recursing (vectorised:
    a hostile 4 MiB of brackets costs milliseconds, not a Python loop per bracket)."""
    if text.count("[") + text.count("{") <= MAX_JSON_DEPTH:
        return 0  # cannot be deeper than that: the common case costs two counts
    import numpy as np

    brackets = _JSON_STRING.sub("", text).encode("utf-8", "replace").translate(None, _NOT_BRACKET)
    steps = np.frombuffer(brackets, dtype=np.uint8)
    depth = np.cumsum(np.where((steps == ord("[")) | (steps == ord("{")), 1, -1))
    return int(depth.max(initial=0))


def _refuse(token: str) -> Any:
    raise ValueError(f"{token} is not a JSON number")


def _finite(token: str) -> float:
    x = float(token)
    if not math.isfinite(x):
        raise ValueError(f"{token[:40]} is out of range")
    return x


def read_metadata_values(path: Path) -> dict[str, Any]:
    """A safetensors input's `__metadata__`: the provenance fields parsed when they are
    well-formed bounded JSON, everything else as the opaque string it is; {} for other
    formats or unreadable headers (the engine reports those)."""
    if path.suffix.lower() not in (".safetensors", ".sft"):
        return {}
    from mergebuild.engine.safetensors_io import read_header
    from mergebuild.errors import BuildError

    try:
        meta = read_header(path).metadata
    except BuildError:
        return {}  # reported properly when the engine opens the file
    out: dict[str, Any] = dict(meta)
    for k in PARSED_KEYS:
        v = meta.get(k)
        if isinstance(v, str) and v[:1] in ("{", "["):
            with contextlib.suppress(ValueError, RecursionError):  # else: an opaque string
                out[k] = parse_foreign_json(v)
    return out


def read_input_metadata(path: Path) -> dict[str, Any]:
    """What an output built from `path` may embed of its metadata (see embeddable_metadata)."""
    return embeddable_metadata(read_metadata_values(path), str(path))


def embeddable_metadata(meta: dict[str, Any], label: str) -> dict[str, Any]:
    """The provenance fields of an input, checked and bounded for embedding in outputs.

    `mergebuild`: kept when it has the structure of mergebuild provenance, ancestors beyond
    MAX_GENERATIONS cut (fewer when it is larger than EMBED_CAP); otherwise dropped with a
    warning and `provenance_omitted` says why. The web UI's fields are opaque: kept when small.
    """
    out: dict[str, Any] = {}
    if METADATA_KEY in meta:
        prov, why = bounded_provenance(meta[METADATA_KEY], MAX_GENERATIONS - 1)
        if prov is not None:
            out[METADATA_KEY] = prov
        else:
            out[OMITTED] = why
            warnings.warn(
                f"{label}: its mergebuild provenance is {why}; outputs record it as omitted",
                stacklevel=2,
            )
    for k in ("sd_merge_recipe", "sd_merge_models"):
        if k not in meta:
            continue
        v = meta[k]
        if k == "sd_merge_models" and not isinstance(v, dict):
            warnings.warn(f"{label}: its {k} is not a JSON object; not carried over", stacklevel=2)
        elif len(canonical_json(v)) > WEBUI_CAP:
            warnings.warn(
                f"{label}: its {k} is larger than {WEBUI_CAP >> 10} KiB; not carried over",
                stacklevel=2,
            )
        else:
            out[k] = v
    return out


# -- the structure of mergebuild provenance (format 2), as far as anything relies on it ----------


class _Record(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True, populate_by_name=True)


class ModelRecord(_Record):
    sha256: str | None = None
    size: int | None = None
    provenance: dict[str, Any] | None = None


class MergeRecord(_Record):
    method: str
    inputs: dict[str, str]
    params: dict[str, Any] = Field(default_factory=dict)
    dtype: str = "auto"


class OutputRecord(_Record):
    name: str = "output"
    source: str = Field(alias="from")
    dtype: str | None = None


class ProvenanceRecord(_Record):
    format: int
    mergebuild_version: str | None = None
    output: OutputRecord
    models: dict[str, ModelRecord]
    merges: dict[str, MergeRecord] = Field(default_factory=dict)


def one_line(text: object, cap: int = 120) -> str:
    """`text` as one printable line of at most `cap` characters (for comments, messages and
    terminals): newlines, `\\r`, U+0085/U+2028, escapes and other control or format characters
    go."""
    s = "".join(c for c in str(text)[: cap * 4] if c.isprintable())
    return s if len(s) <= cap else s[: cap - 1] + "…"


def check_provenance(prov: Any) -> str | None:
    """None when `prov` has the structure of mergebuild provenance, else what is wrong (the
    first problem, located like `models.x.sha256`)."""
    if not isinstance(prov, dict):
        return f"not a JSON object ({type(prov).__name__})"
    try:
        ProvenanceRecord.model_validate(prov)
    except ValidationError as e:
        first = e.errors()[0]
        where = one_line(".".join(str(x) for x in first["loc"]), 100) or "provenance"
        return f"{where}: {one_line(first['msg'].lower(), 100)}"
    return None


def bounded_provenance(prov: Any, generations: int) -> tuple[dict[str, Any] | None, str]:
    """(`prov` with at most `generations` nested levels below it and at most EMBED_CAP bytes,
    or None; why it is None). Deterministic: it depends on the provenance only."""
    if isinstance(prov, str):
        return None, "not well-formed bounded JSON"
    problem = check_provenance(prov)
    if problem is not None:
        return None, f"malformed ({problem})"
    for g in sorted({generations, min(generations, 2), min(generations, 1), 0}, reverse=True):
        cut = _cut(prov, g)
        if len(canonical_json(cut)) <= EMBED_CAP:
            return cut, ""
    return None, f"larger than {EMBED_CAP >> 10} KiB"


def _cut(prov: dict[str, Any], generations: int) -> dict[str, Any]:
    """`prov` (already checked) with nested provenance below `generations` levels replaced by
    `provenance_omitted` (recursion depth is `generations`, a small constant)."""
    models: dict[str, Any] = {}
    for name, entry in prov["models"].items():
        entry = dict(entry)
        if "provenance" in entry and entry["provenance"] is not None:
            nested = entry.pop("provenance")
            if generations <= 0:
                entry[OMITTED] = "deeper than the nesting kept"
            elif (problem := check_provenance(nested)) is not None:
                entry[OMITTED] = f"malformed ({problem})"
            else:
                entry["provenance"] = _cut(nested, generations - 1)
        models[name] = entry
    return {**prov, "models": models}


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
        elif OMITTED in facts.metadata:
            entry[OMITTED] = facts.metadata[OMITTED]
        if "provenance" not in entry and "sd_merge_recipe" in facts.metadata:
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
