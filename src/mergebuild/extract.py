"""`show` and `extract`: reading provenance that someone else's file carries.

That provenance is foreign data: names may hold newlines, YAML syntax or terminal escapes, and
the structure may be wrong, cyclic or huge. `extract` checks the structure it relies on, turns
every name into a safe unique identifier, drops pins that are not SHA-256 digests (with a
warning) and writes the recipe with `yaml.safe_dump` of a data structure, so the recipe holds
only what the provenance structurally says. Comments are single-line, printable and capped.
`show` prints each node once (a cycle or a shared ancestor cannot loop or explode).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from mergebuild.errors import BuildError
from mergebuild.graph import canonical_json
from mergebuild.provenance import (
    FORMAT,
    OMITTED,
    ProvenanceRecord,
    check_provenance,
    one_line,
)

NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")  # recipe's DottedName
OUTPUT_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")  # also a file name: no `/`, no `..`
SHA256 = re.compile(r"[0-9a-fA-F]{64}")
NAME_CAP = 64
VALUE_DEPTH = 16  # parameter values: numbers, block-weight mappings, weight lists
TREE_LINES = 2000
OUTPUT_OPTIONS = ("prune", "components", "include", "exclude", "vae")


class _OutputOptions(BaseModel):
    """The output options an extracted recipe carries over, checked like the recipe does."""

    model_config = ConfigDict(extra="ignore", strict=True)
    prune: bool = False
    components: list[Literal["unet", "text_encoder", "vae", "other"]] | None = None
    include: list[str] | None = None
    exclude: list[str] | None = None
    vae: str | None = None


@dataclass
class Extracted:
    doc: dict[str, Any]  # the recipe, exactly what the YAML text parses back to
    comments: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def text(self) -> str:
        import yaml

        head = "".join(f"# {one_line(c, 200)}\n" for c in self.comments)
        # ASCII only: PyYAML's allow_unicode writes U+0085 raw, which reads back as a line
        # break (a different string); escaped, every string reads back exactly
        return head + yaml.safe_dump(self.doc, sort_keys=False, allow_unicode=False)


MODEL_SUFFIXES = (".safetensors", ".sft", ".ckpt", ".pt", ".pth", ".bin")


def check_recipe_target(target: Path, model: Path) -> None:
    """`extract -o` writes a recipe: it must never replace a model file (the one it reads,
    or any other), which a slip of the shell (`-o model.safetensors`) would otherwise do."""
    if target.suffix.lower() in MODEL_SUFFIXES:
        raise BuildError(
            f"-o {target}: a recipe is YAML; refusing a model file name ({target.suffix})"
        )
    if not target.exists():
        return
    if not target.is_file():
        raise BuildError(f"-o {target}: exists and is not a regular file")
    if target.samefile(model):
        raise BuildError(f"-o {target}: is the model being read; refusing to overwrite it")
    with target.open("rb") as f:
        head = f.read(9)
    header_len = int.from_bytes(head[:8], "little") if len(head) == 9 else -1
    safetensors = head[8:9] == b"{" and 0 < header_len < target.stat().st_size
    if safetensors or head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":
        raise BuildError(
            f"-o {target}: exists and looks like a model file, not a recipe; refusing to "
            "overwrite it"
        )


def _malformed(where: str, why: str) -> BuildError:
    return BuildError(f"the provenance is malformed: {one_line(where, 100)}: {one_line(why, 200)}")


def safe_names(raw: list[str], pattern: re.Pattern[str], fallback: str) -> dict[str, str]:
    """Foreign names → unique names matching `pattern`: a safe name is kept, any other is
    rewritten (unsafe characters → `_`, capped, numbered when it collides)."""
    out = {n: n for n in raw if pattern.fullmatch(n) and len(n) <= NAME_CAP}
    taken = set(out.values())
    for n in sorted(set(raw) - set(out)):
        base = re.sub(r"[^A-Za-z0-9_]", "_", n)[:NAME_CAP] or fallback
        if not pattern.fullmatch(base):
            base = f"{fallback}_{base}"[:NAME_CAP]
        name, i = base, 2
        while name in taken:
            name, i = f"{base}_{i}", i + 1
        out[n] = name
        taken.add(name)
    return out


def _check_value(value: Any, where: str) -> None:
    """A parameter value is plain data: finite numbers, strings, lists, mappings; bounded."""
    stack = [(value, 0)]
    while stack:
        v, depth = stack.pop()
        if depth > VALUE_DEPTH:
            raise _malformed(where, f"nested deeper than {VALUE_DEPTH} levels")
        if isinstance(v, float) and not math.isfinite(v):
            raise _malformed(where, "not a finite number")
        if isinstance(v, list):
            stack.extend((x, depth + 1) for x in v)
        elif isinstance(v, dict):
            if not all(isinstance(k, str) for k in v):
                raise _malformed(where, "mapping keys must be strings")
            stack.extend((x, depth + 1) for x in v.values())
        elif not (v is None or isinstance(v, bool | int | float | str)):
            raise _malformed(where, f"unexpected {type(v).__name__}")


def _slot_index(slot: str) -> int:
    """`m3` → 3: variadic slots sort by number (`m10` after `m9`); anything else first."""
    return int(slot[1:]) if re.fullmatch(r"m\d{1,6}", slot) else -1


def _check_acyclic(merges: dict[str, list[str]]) -> None:
    """Kahn's algorithm over merge → merge edges; what is left over lies on a cycle."""
    users: dict[str, list[str]] = {n: [] for n in merges}
    pending = {n: 0 for n in merges}
    for n, refs in merges.items():
        for r in refs:
            if r in merges:
                users[r].append(n)
                pending[n] += 1
    ready = [n for n, k in pending.items() if k == 0]
    while ready:
        for u in users[ready.pop()]:
            pending[u] -= 1
            if pending[u] == 0:
                ready.append(u)
    left = sorted(n for n, k in pending.items() if k > 0)
    if left:
        raise _malformed(f"merges.{left[0]}", "the merges form a cycle")


def extract(prov: Any) -> Extracted:
    """The recipe that rebuilds the file described by `prov` (BuildError when malformed)."""
    from mergebuild.engine.methods import REGISTRY
    from mergebuild.recipe.schema import DTYPE_ALIASES

    problem = check_provenance(prov)
    if problem is not None:
        where, _, why = problem.partition(": ")
        raise _malformed(where, why)
    rec = ProvenanceRecord.model_validate(prov)
    if rec.format != FORMAT:
        raise _malformed("format", f"format {rec.format}, this mergebuild reads {FORMAT}")
    both = sorted(set(rec.models) & set(rec.merges))
    if both:
        raise _malformed(f"merges.{both[0]}", "the name is a model and a merge")
    names = safe_names([*rec.models, *rec.merges], NAME, "m")
    result = Extracted({})

    models: dict[str, Any] = {}
    for raw in sorted(rec.models):
        sha = rec.models[raw].sha256
        if sha is not None and SHA256.fullmatch(sha):
            models[names[raw]] = {"sha256": sha.lower()}
        else:
            models[names[raw]] = {}
            result.warnings.append(
                f"model '{names[raw]}': the provenance's sha256 {one_line(sha, 80)!r} is not 64 "
                "hex digits; dropped: give the model's path or sha256 in the recipe"
            )

    def dtype(value: str | None, where: str) -> str | None:
        if value is None or value == "auto":
            return None
        if value.lower() not in DTYPE_ALIASES:
            raise _malformed(where, f"unknown dtype {one_line(value, 40)!r}")
        return DTYPE_ALIASES[value.lower()]

    merges: dict[str, Any] = {}
    edges: dict[str, list[str]] = {}
    for raw in sorted(rec.merges):
        m, where = rec.merges[raw], f"merges.{raw}"
        method = REGISTRY.get(m.method)
        if method is None:
            unknown = one_line(m.method, 40)
            raise BuildError(f"node '{names[raw]}' uses method '{unknown}', unknown here")
        if method.inputs_form in ("variadic", "base_models"):
            base = ["base"] if method.inputs_form == "base_models" else []
            slots = sorted((s for s in m.inputs if s not in base), key=_slot_index)
            if (
                slots != [f"m{i}" for i in range(len(slots))]
                or not slots
                or (base and "base" not in m.inputs)
            ):
                takes = "base, m0, m1, …" if base else "m0, m1, …"
                raise _malformed(f"{where}.inputs", f"{method.name} takes inputs {takes}")
            slots = base + slots
        else:
            slots = list(method.slots)
            if sorted(m.inputs) != sorted(slots):
                raise _malformed(f"{where}.inputs", f"{method.name} takes {', '.join(slots)}")
        refs = [m.inputs[s] for s in slots]
        for r in refs:
            if r not in names:
                raise _malformed(f"{where}.inputs", f"'{r}' is neither a model nor a merge")
        edges[raw] = refs
        entry: dict[str, Any] = {"method": method.name}
        if method.inputs_form == "base_models":
            entry[method.base_name] = names[refs[0]]
            entry[method.models_name] = [names[r] for r in refs[1:]]
        elif method.variadic:
            entry["inputs"] = [names[r] for r in refs]
        else:
            entry.update({s: names[r] for s, r in zip(slots, refs, strict=True)})
        for k, v in sorted(m.params.items()):
            if k not in method.Params.model_fields:
                raise _malformed(f"{where}.params", f"'{k}' is not a parameter of {method.name}")
            _check_value(v, f"{where}.params.{k}")
            entry[k] = v
        entry["dtype"] = dtype(m.dtype, f"{where}.dtype") or "auto"
        merges[names[raw]] = entry
    _check_acyclic(edges)

    out, raw_out = rec.output, prov["output"]
    if out.source not in names:
        raise _malformed("output.from", f"'{out.source}' is neither a model nor a merge")
    try:
        opts = _OutputOptions.model_validate(raw_out)
    except ValidationError as e:
        first = e.errors()[0]
        raise _malformed("output." + ".".join(map(str, first["loc"])), first["msg"]) from None
    if opts.vae is not None and opts.vae not in rec.models:
        raise _malformed("output.vae", f"'{opts.vae}' is not a model of the provenance")
    for kind in ("include", "exclude"):
        for pattern in getattr(opts, kind) or []:
            _check_value(pattern, f"output.{kind}")
    oname = safe_names([out.name], OUTPUT_NAME, "output")[out.name]
    entry = {"from": names[out.source], "path": f"{oname}.safetensors"}
    if (dt := dtype(out.dtype, "output.dtype")) is not None:
        entry["dtype"] = dt
    for k in OUTPUT_OPTIONS:
        if k in raw_out:
            v = getattr(opts, k)
            entry[k] = names[v] if k == "vae" and v is not None else v

    result.doc = {"mergebuild": 1, "models": models, "merges": merges, "outputs": {oname: entry}}
    nested = sorted(names[n] for n, m in rec.models.items() if m.provenance is not None)
    listed = ", ".join(nested[:8]) + (f" and {len(nested) - 8} more" if len(nested) > 8 else "")
    result.comments = [
        f"extracted by mergebuild {one_line(rec.mergebuild_version, 40)} from a model it built",
        "inputs are pinned by sha256: build with --models DIR (or MERGEBUILD_MODEL_PATH)",
        *([f"{listed} were merges too: `mergebuild extract` them as well"] if nested else []),
        *result.warnings,
    ]
    return result


# -- show ---------------------------------------------------------------------------------------


def _params(params: dict[str, Any]) -> str:
    shown = (
        f"{k}={v}" if isinstance(v, int | float | str) else f"{k}={canonical_json(v)}"
        for k, v in params.items()
    )
    return ", ".join(shown)


def provenance_tree(prov: Any, level: int = 1, cap: int = TREE_LINES) -> list[str]:
    """The provenance as an indented tree, output first, down to pinned inputs and their own
    provenance. Iterative, each node once per provenance, at most `cap` lines."""
    lines: list[str] = []
    # a stack of work: ("prov", value, level) or ("node", record, name, seen, level)
    stack: list[tuple[Any, ...]] = [("prov", prov, level)]
    while stack and len(lines) < cap:
        task = stack.pop()
        pad = "  " * task[-1]
        if task[0] == "prov":
            problem = check_provenance(task[1])
            if problem is not None:
                lines.append(pad + one_line(f"(malformed provenance: {problem})", 200))
                continue
            rec = ProvenanceRecord.model_validate(task[1])
            o = rec.output
            lines.append(pad + one_line(f"{o.name} ← {o.source} (dtype {o.dtype})", 300))
            stack.append(("node", rec, o.source, set(), task[-1] + 1))
            continue
        _, rec, name, seen, lvl = task
        if name in seen:
            lines.append(pad + one_line(f"{name} (see above)", 300))
            continue
        seen.add(name)
        if name in rec.merges:
            m = rec.merges[name]
            args = ", ".join(f"{s}={src}" for s, src in m.inputs.items())
            p = _params(m.params)
            lines.append(pad + one_line(f"{name} = {m.method}({args}{', ' if p else ''}{p})", 300))
            for src in reversed(list(m.inputs.values())):
                stack.append(("node", rec, src, seen, lvl + 1))
        elif name in rec.models:
            m = rec.models[name]
            lines.append(pad + one_line(f"{name}: sha256 {m.sha256}", 300))
            extra = m.model_extra or {}
            if m.provenance is not None:
                stack.append(("prov", m.provenance, lvl + 1))
            elif OMITTED in extra:
                lines.append(pad + "  " + one_line(f"provenance omitted: {extra[OMITTED]}", 300))
            elif extra.get("sd_merge_recipe"):
                text = canonical_json(extra["sd_merge_recipe"])
                lines.append(pad + "  " + one_line(f"web UI merge: {text}", 300))
        else:
            lines.append(pad + one_line(f"{name} (not recorded in the provenance)", 300))
    if stack:
        lines.append("  " * level + f"… (more than {cap} lines: the rest is not shown)")
    return lines
