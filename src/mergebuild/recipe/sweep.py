"""Sweeps: `sweep: {alpha: [0.25, 0.5]}` on a merge node makes a family of ordinary nodes.

Expansion is a pre-pass on the parsed YAML (after `--set`, before validation), so the graph,
keys, fused pass and cache only ever see plain nodes: `nsfw[alpha=0.25]` is validated, keyed
and built like a node written by hand, and adding a value builds only the new member.

A swept node defines a *group* (its own params: product of their values, or paired with
`zip: true`). A node reading swept nodes inherits their groups: its members are the natural
join of its inputs' members (a diamond over one sweep stays one sweep), times its own sweep
(or paired with it under `zip: true`). Outputs of a swept node become one output per member,
their `path` a template (`out/nsfw-{alpha}.safetensors`) that must tell the members apart.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import string
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any

from mergebuild.errors import Location, Problem, RecipeError, did_you_mean
from mergebuild.recipe.sweep_space import (
    Group,
    Space,
    Value,
    components,
    decimal,
    decimal_text,
    example,
    expr_names,
    free_names,
    is_number,
    join,
    render,
    topological,
)
from mergebuild.recipe.yamlpos import Positions

MAX_ENV = "MERGEBUILD_SWEEP_MAX"
DEFAULT_MAX = 1000  # members in a whole recipe: a typo in a range step is not a 10⁶-node build
ZIP = "zip"
PRESET = "preset"  # sweeps the block-weight curve of the method's block parameter
_SAFE_TEXT = re.compile(r"[A-Za-z0-9_.+\-]{1,64}")
_SPEC = re.compile(r"0?\d{0,2}(\.\d{1,2})?[efg%d]?")  # `{alpha:.2f}`: small widths only


@dataclass
class Expansion:
    """What the loader needs beyond the rewritten YAML."""

    bind: dict[str, dict[str, Any]] = field(default_factory=dict)  # expr member → name → value
    rename: dict[str, dict[str, str]] = field(default_factory=dict)  # expr member → ref → member
    node_members: dict[str, list[str]] = field(default_factory=dict)
    output_members: dict[str, list[str]] = field(default_factory=dict)
    origin: dict[str, str] = field(default_factory=dict)  # member name → the name it came from


def sweep_cap() -> int:
    try:
        return max(1, int(os.environ.get(MAX_ENV, DEFAULT_MAX)))
    except ValueError:
        return DEFAULT_MAX


def member_base(name: str) -> str:
    return name.split("[", 1)[0]


def expand_sweeps(data: dict[str, Any], pos: Positions) -> Expansion:
    """Rewrite `data` in place: swept nodes and their dependents become member nodes."""
    merges, outputs = data.get("merges"), data.get("outputs")
    ex = Expansion()
    if not isinstance(merges, dict):
        return ex
    problems: list[Problem] = []
    for name in merges:
        if "[" in str(name) or "]" in str(name):
            problems.append(
                Problem(
                    f"merge name '{name}': '[' and ']' are reserved for sweep members "
                    "(written `sweep:` on the node, named NODE[param=value])",
                    pos.of(("merges", name), key=True),
                )
            )
    if not any(isinstance(e, dict) and "sweep" in e for e in merges.values()):
        if problems:
            raise RecipeError(problems)
        return ex
    _Expander(data, merges, outputs if isinstance(outputs, dict) else {}, pos, ex, problems).run()
    if problems:
        raise RecipeError(problems)
    return ex


class _Expander:
    def __init__(
        self,
        data: dict[str, Any],
        merges: dict[str, Any],
        outputs: dict[str, Any],
        pos: Positions,
        ex: Expansion,
        problems: list[Problem],
    ) -> None:
        self.data, self.merges, self.outputs, self.pos, self.ex = data, merges, outputs, pos, ex
        self.problems = problems
        self.models = set(data["models"]) if isinstance(data.get("models"), dict) else set()
        self.groups: dict[str, Group] = {}
        self.spaces: dict[str, Space] = {}
        self.labels: dict[str, list[tuple[str, dict[str, str], dict[str, Any]]]] = {}
        self.index: dict[str, dict[tuple[int, ...], int]] = {}
        self.by_prefix: dict[tuple[str, tuple], list[tuple[tuple, Location]]] = {}
        self.cap = sweep_cap()
        self.total = 0

    def err(self, message: str, where: tuple, key: bool = False) -> None:
        self.problems.append(Problem(message, self.pos.of(where, key=key)))

    # -- the order nodes are expanded in -------------------------------------------------

    def run(self) -> None:
        refs = {n: _refs(e, self.merges) for n, e in self.merges.items()}
        order = topological(refs)
        for name, entry in self.merges.items():  # left in a cycle: the loader reports it
            if name not in order and isinstance(entry, dict):
                entry.pop("sweep", None)
        failed: set[str] = set()  # every sweep is checked; what reads a bad one is skipped
        for name in order:
            if any(r in failed for r in refs[name]):
                failed.add(name)
                continue
            before = len(self.problems)
            self._space(name, refs[name])
            if len(self.problems) > before:
                failed.add(name)
        if self.problems:
            return
        self._rewrite_merges(refs)
        self._rewrite_outputs()

    def _space(self, name: str, refs: list[str]) -> None:
        entry = self.merges[name]
        before = len(self.problems)
        own = self._own_group(name, entry) if isinstance(entry, dict) else None
        if len(self.problems) > before:
            return
        spec = entry.get("sweep") if isinstance(entry, dict) else None
        zipped = isinstance(spec, dict) and spec.get(ZIP) is True
        parts = components([self.spaces[r] for r in dict.fromkeys(refs) if r in self.spaces])
        if own is not None:
            self.groups[name] = own
            parts.append(Space([name], [(i,) for i in range(len(own.rows))]))
        if zipped and len(parts) < 2 and (own is None or len(own.keys) < 2):
            self.err(
                f"merge '{name}': zip: true pairs sweeps member by member, but this node has "
                "only one sweep to pair",
                ("merges", name, "sweep", ZIP),
            )
            return
        if not parts:
            return
        if zipped:
            lengths = {len(p.rows) for p in parts}
            if len(lengths) > 1:
                sizes = ", ".join(f"{'/'.join(p.groups)}: {len(p.rows)}" for p in parts)
                self.err(
                    f"merge '{name}': zip: true pairs sweeps of equal length; these have "
                    f"{sizes} members",
                    ("merges", name, "sweep", ZIP),
                )
                return
            groups = [g for p in parts for g in p.groups]
            rows = [tuple(x for p in parts for x in p.rows[i]) for i in range(len(parts[0].rows))]
            space = Space(groups, rows)
        else:
            space = parts[0]
            for p in parts[1:]:
                joined = join(space, p, self.cap - self.total)
                if joined is None:
                    self._too_many(name, "the product of its sweeps")
                    return
                space = joined
        self.total += len(space.rows)
        if self.total > self.cap:
            self._too_many(name, "its sweep")
            return
        self.spaces[name] = space

    def _too_many(self, name: str, what: str) -> None:
        own = "sweep" in self.merges[name]
        where = ("merges", name, "sweep") if own else ("merges", name)
        self.problems.append(
            Problem(
                f"merge '{name}': {what} makes the recipe more than {self.cap} sweep members "
                f"(a typo in a range step?); set {MAX_ENV}=N to allow more",
                self.pos.of(where, key=not own),
            )
        )

    # -- a node's own sweep ----------------------------------------------------------------

    def _own_group(self, name: str, entry: dict[str, Any]) -> Group | None:
        if "sweep" not in entry:
            return None
        spec, at = entry["sweep"], ("merges", name, "sweep")
        if not isinstance(spec, dict):
            self.err(
                f"merge '{name}': sweep is a mapping of parameter → values, e.g. "
                "sweep: {alpha: [0.25, 0.5, 0.75]} or {alpha: {range: [0.1, 0.9, 0.2]}}",
                at,
            )
            return None
        if ZIP in spec and not isinstance(spec[ZIP], bool):
            self.err(f"merge '{name}': zip is true or false", (*at, ZIP))
        keys = [k for k in spec if k != ZIP]
        allowed = self._sweepable(name, entry)
        axes: list[list[Value]] = []
        for key in keys:
            if allowed is not None and key not in allowed:
                self._not_sweepable(name, entry, key, allowed)
                continue
            if self._given(name, entry, key):
                continue
            axis = self._axis(name, key, spec[key], (*at, key))
            swept_input = [v for v in axis or () if isinstance(v.raw, str) and v.raw in self.spaces]
            if swept_input and "expr" not in entry and key != PRESET:
                self.err(
                    f"merge '{name}': input '{key}' is swept over '{swept_input[0].raw}', "
                    "itself swept: sweep one or the other",
                    swept_input[0].src,
                )
            elif axis is not None:
                axes.append(axis)
        if len(axes) != len(keys):
            return None
        if not keys:
            return None  # `sweep: {zip: true}` on a node that only pairs what it reads
        if spec.get(ZIP) is True:
            lengths = {len(a) for a in axes}
            if len(lengths) > 1:
                sizes = ", ".join(f"{k}: {len(a)}" for k, a in zip(keys, axes, strict=True))
                self.err(
                    f"merge '{name}': zip: true pairs values of equal count; got {sizes}",
                    (*at, ZIP),
                )
                return None
            rows = list(zip(*axes, strict=True))
        else:
            n = 1
            for a in axes:
                n *= len(a)
            if self.total + n > self.cap:
                self._too_many(name, "its sweep")
                return None
            rows = list(itertools.product(*axes))
        return Group(name, keys, rows)

    def _sweepable(self, name: str, entry: dict[str, Any]) -> set[str] | None:
        """Names a sweep may set: the method's parameters and single inputs (and `preset`
        with a block-weight parameter), or the free names of an expression. None: unknown
        (the loader reports the bad method or expression)."""
        if "expr" in entry:
            text = entry["expr"]
            free = free_names(text) if isinstance(text, str) else None
            if free is None:
                return None
            return {n for n in free if n not in self.models and n not in self.merges}
        method = _method(entry.get("method"))
        if method is None:
            return None
        names = set(method.Params.model_fields)
        names |= set(method.slots if method.inputs_form == "slots" else ())
        if method.inputs_form == "base_models":
            names.add(method.base_name)
        if len(method.block_params) == 1:
            names.add(PRESET)
        return names

    def _block_param(self, name: str, entry: dict[str, Any]) -> str | None:
        method = _method(entry.get("method"))
        params = method.block_params if method else ()
        return params[0] if len(params) == 1 else None

    def _not_sweepable(self, name: str, entry: dict[str, Any], key: str, allowed: set) -> None:
        where = ("merges", name, "sweep", key)
        if "expr" in entry:
            if key in self.models or key in self.merges:
                what = "a model" if key in self.models else "a merge node"
                msg = f"'{key}' is {what}, not a number the expression uses"
            else:
                names = ", ".join(sorted(allowed)) or "none"
                msg = (
                    f"the expression does not use the name '{key}' "
                    f"(names it leaves free: {names}){did_you_mean(key, allowed)}; "
                    f"write it where the value goes, e.g. `a + (b - c) * {key}`"
                )
            self.err(f"merge '{name}': cannot sweep '{key}': {msg}", where, key=True)
            return
        method = _method(entry.get("method"))
        assert method is not None
        if key == PRESET and len(method.block_params) > 1:
            params = ", ".join(method.block_params)
            msg = (
                f"{method.name} has several block-weight parameters ({params}): sweep one "
                "of them, e.g. alpha: [{preset: GRAD_V}, {preset: COSINE}]"
            )
        else:
            msg = (
                f"{method.name} has no parameter or input '{key}'"
                f"{did_you_mean(key, allowed)} (it has: {', '.join(sorted(allowed))})"
            )
        self.err(f"merge '{name}': cannot sweep '{key}': {msg}", where, key=True)

    def _given(self, name: str, entry: dict[str, Any], key: str) -> bool:
        """A value both written on the node and swept is a conflict, except a number next
        to a swept `preset`: that is the curve's BASE value (`{preset: P, base: alpha}`)."""
        target = key
        if key == PRESET:
            target = self._block_param(name, entry) or key
            if target not in entry or is_number(entry[target]):
                return False
        elif key not in entry:
            return False
        given = self.pos.of(("merges", name, target), key=True)
        line = f" (line {given.line})" if given else ""
        self.err(
            f"merge '{name}': '{target}' is both given{line} and swept; remove one",
            ("merges", name, "sweep", key),
            key=True,
        )
        return True

    def _axis(self, name: str, key: str, spec: Any, at: tuple) -> list[Value] | None:
        if isinstance(spec, dict) and set(spec) == {"range"}:
            return self._range(name, key, spec["range"], (*at, "range"))
        if not isinstance(spec, list):
            self.err(
                f"merge '{name}': the sweep of '{key}' is a list of values or "
                "{range: [start, stop, step]}",
                at,
            )
            return None
        if not spec:
            self.err(f"merge '{name}': the sweep of '{key}' has no values", at)
            return None
        out: list[Value] = []
        seen: dict[str, int] = {}
        for i, raw in enumerate(spec):
            spell = self._spell(name, key, raw, (*at, i))
            if spell is None:
                return None
            if spell in seen:
                first = self.pos.of((*at, seen[spell]))
                line = f" (line {first.line})" if first else ""
                self.err(
                    f"merge '{name}': {key}={spell} is swept twice{line}; each value once",
                    (*at, i),
                )
                return None
            seen[spell] = i
            out.append(Value(raw, spell, (*at, i)))
        return out

    def _spell(self, name: str, key: str, raw: Any, at: tuple) -> str | None:
        if isinstance(raw, bool) or raw is None:
            return json.dumps(raw)  # the loader refuses it where a number belongs, located
        if is_number(raw):
            return decimal_text(decimal(raw))
        if isinstance(raw, str):
            if _SAFE_TEXT.fullmatch(raw):
                return raw
            self.err(
                f"merge '{name}': swept text {raw!r} of '{key}' must be a name (letters, "
                "digits, _ . + -, at most 64): it is spelled in member names and paths",
                at,
            )
            return None
        preset = raw.get(PRESET) if isinstance(raw, dict) and len(raw) == 1 else None
        if isinstance(preset, str) and _SAFE_TEXT.fullmatch(preset):
            return preset
        import xxhash

        text = json.dumps(raw, sort_keys=True, default=str)
        return "blocks-" + xxhash.xxh3_64_hexdigest(text.encode())[:8]

    def _range(self, name: str, key: str, spec: Any, at: tuple) -> list[Value] | None:
        usage = f"merge '{name}': range of '{key}' is [start, stop, step] (stop included)"
        if not (isinstance(spec, list) and len(spec) == 3 and all(map(is_number, spec))):
            self.err(f"{usage}: three numbers", at)
            return None
        try:
            start, stop, step = (decimal(v) for v in spec)
        except (InvalidOperation, ValueError):
            self.err(f"{usage}: three finite numbers", at)
            return None
        if not all(d.is_finite() for d in (start, stop, step)):
            self.err(f"{usage}: three finite numbers", at)
            return None
        if step == 0:
            self.err(f"{usage}: the step cannot be 0", (*at, 2))
            return None
        if (stop - start) * step < 0:
            way = "up" if stop > start else "down"
            self.err(
                f"{usage}: it goes {way} from {decimal_text(start)} to {decimal_text(stop)}, "
                f"so the step must be {'positive' if way == 'up' else 'negative'} "
                f"(got {decimal_text(step)})",
                (*at, 2),
            )
            return None
        q = (stop - start) / step
        near = q.to_integral_value()
        count = int(near if abs(q - near) <= Decimal("1e-9") * max(1, abs(q)) else q // 1) + 1
        if self.total + count > self.cap:
            self._too_many(name, f"the range of '{key}' ({count} values)")
            return None
        ints = all(isinstance(v, int) for v in spec)
        out = []
        for i in range(count):
            d = start + step * i
            out.append(Value(int(d) if ints else float(d), decimal_text(d), at))
        return out

    # -- members ---------------------------------------------------------------------------

    def _label(self, name: str) -> list[tuple[str, dict[str, str], dict[str, Any]]]:
        """Per member: its label text, its template fields, and its own swept values."""
        if name in self.labels:
            return self.labels[name]
        space = self.spaces[name]
        groups = [self.groups[g] for g in space.groups]
        counts: dict[str, int] = {}
        for g in groups:
            for k in g.keys:
                counts[k] = counts.get(k, 0) + 1
        out = []
        for row in space.rows:
            items: list[tuple[str, str]] = []
            fields: dict[str, str] = {}
            own: dict[str, Any] = {}
            for g, r in zip(groups, row, strict=True):
                for k, v in zip(g.keys, g.rows[r], strict=True):
                    shown = k if counts[k] == 1 else f"{g.origin}.{k}"
                    items.append((shown, v.spell))
                    fields[shown] = fields[f"{g.origin}.{k}"] = v.spell
                    if g.origin == name:
                        own[k] = v
            out.append((",".join(f"{k}={v}" for k, v in items), fields, own))
        self.labels[name] = out
        return out

    def _row_index(self, name: str) -> dict[tuple[int, ...], int]:
        if name not in self.index:
            self.index[name] = {row: i for i, row in enumerate(self.spaces[name].rows)}
        return self.index[name]

    def _rewrite_merges(self, refs: dict[str, list[str]]) -> None:
        new: dict[str, Any] = {}
        for name, entry in self.merges.items():
            if name not in self.spaces:
                new[name] = entry
                continue
            space = self.spaces[name]
            members = []
            for row, (label, _, own) in zip(space.rows, self._label(name), strict=True):
                member = f"{name}[{label}]"
                renames = {}
                for r in dict.fromkeys(refs[name]):
                    if r in self.spaces:
                        sub = self.spaces[r].groups
                        at = self._row_index(r)[space.project(row, sub)]
                        renames[r] = f"{r}[{self._label(r)[at][0]}]"
                new[member] = self._member_entry(name, member, entry, own, renames)
                members.append(member)
                self.ex.origin[member] = name
            self.ex.node_members[name] = members
        self.data["merges"] = new

    def _member_entry(
        self, name: str, member: str, entry: Any, own: dict[str, Value], renames: dict[str, str]
    ) -> Any:
        self._copy_positions(("merges", name), ("merges", member), skip="sweep")
        if isinstance(entry, str):
            entry = {"expr": entry}
        out = {k: v for k, v in entry.items() if k != "sweep"}
        if "expr" in out:
            if own:
                self.ex.bind[member] = {k: v.raw for k, v in own.items()}
            if renames:
                self.ex.rename[member] = renames
            return out
        method = _method(out.get("method"))
        for field_name in _input_fields(method):
            ref = out.get(field_name)
            if isinstance(ref, str):
                out[field_name] = renames.get(ref, ref)
            elif isinstance(ref, list):
                out[field_name] = [renames.get(r, r) if isinstance(r, str) else r for r in ref]
        for key, v in own.items():
            if key == PRESET:
                continue
            out[key] = v.raw
            self._place(v, ("merges", member, key))
        if PRESET in own:
            block = self._block_param(name, entry)
            if block is None:  # an unknown method: the loader reports it
                out[PRESET] = own[PRESET].raw
                return out
            curve: dict[str, Any] = {PRESET: own[PRESET].raw}
            base = out.get(block)
            if base is not None:
                curve["base"] = base
                self._move(("merges", member, block), ("merges", member, block, "base"))
            out[block] = curve
            self._place(own[PRESET], ("merges", member, block))
            self._place(own[PRESET], ("merges", member, block, PRESET))
        return out

    def _rewrite_outputs(self) -> None:
        new: dict[str, Any] = {}
        seen: dict[str, tuple[str, str]] = {}  # file (normalised) → (output, member)
        for name, entry in self.outputs.items():
            src = entry.get("from") if isinstance(entry, dict) else None
            if not isinstance(src, str) or src not in self.spaces:
                new[name] = entry
                continue
            path = entry.get("path")
            where = ("outputs", name, "path")
            labels = self._label(src)
            if not isinstance(path, str):
                new[name] = entry  # the loader reports it
                continue
            fields_used = self._template_fields(name, path, labels[0][1])
            if fields_used is None:
                continue
            if not fields_used:
                self.err(
                    f"output '{name}' is from swept node '{src}' ({len(labels)} members): "
                    f"its path must be a template that tells them apart, e.g. "
                    f"{example(path, labels[0][1])!r}",
                    where,
                )
                continue
            members = []
            for label, fields, _ in labels:
                member = f"{name}[{label}]"
                if member in self.outputs:
                    self.err(f"output '{member}' is also a member of swept output '{name}'", where)
                    break
                text = render(path, {**fields, "name": name, "member": label})
                norm = os.path.normcase(os.path.normpath(text)).casefold()
                if norm in seen:
                    other_out, other = seen[norm]
                    self.err(
                        f"output '{name}': path template {path!r} gives the same file "
                        f"{text!r} for members [{other}] and [{label}]"
                        + (f" (and output '{other_out}')" if other_out != name else "")
                        + "; put every swept value in it, e.g. "
                        f"{example(path, fields)!r}",
                        where,
                    )
                    break
                seen[norm] = (name, label)
                out = dict(entry)
                out["from"] = f"{src}[{label}]"
                out["path"] = text
                new[member] = out
                members.append(member)
                self._copy_positions(("outputs", name), ("outputs", member))
                self.ex.origin[member] = name
            self.ex.output_members[name] = members
        self.data["outputs"] = new

    def _template_fields(self, name: str, path: str, fields: dict[str, str]) -> set[str] | None:
        where = ("outputs", name, "path")
        known = {*fields, "name", "member"}
        try:
            parsed = list(string.Formatter().parse(path))
        except ValueError as e:
            self.err(f"output '{name}': path template {path!r}: {e} ({{{{ is a brace)", where)
            return None
        used: set[str] = set()
        for _, fname, spec, conv in parsed:
            if fname is None:
                continue
            if fname not in known:
                self.err(
                    f"output '{name}': path template {path!r} has no value for {{{fname}}}"
                    f"{did_you_mean(fname, known)} (it knows: "
                    f"{', '.join('{' + k + '}' for k in sorted(known))})",
                    where,
                )
                return None
            if conv or (spec and not _SPEC.fullmatch(spec)):
                self.err(
                    f"output '{name}': path template {path!r}: {{{fname}}} takes a number "
                    "format like {alpha:.2f} or nothing",
                    where,
                )
                return None
            used.add(fname)
        return used

    # -- positions -------------------------------------------------------------------------

    def _entries(self, kind: str, prefix: tuple) -> list[tuple[tuple, Location]]:
        """Positions recorded under one node or output (indexed once: a sweep of 1000
        members must not rescan the whole recipe's positions per member)."""
        if not self.by_prefix:
            for k, table in (("values", self.pos.values), ("keys", self.pos.keys)):
                for path, loc in table.items():
                    if len(path) >= 2:
                        self.by_prefix.setdefault((k, path[:2]), []).append((path, loc))
        return self.by_prefix.get((kind, prefix[:2]), [])

    def _copy_positions(self, src: tuple, dst: tuple, skip: str | None = None) -> None:
        n = len(src)
        for kind, table in (("values", self.pos.values), ("keys", self.pos.keys)):
            for path, loc in self._entries(kind, src):
                if path[:n] == src and not (skip and len(path) > n and path[n] == skip):
                    table.setdefault((*dst, *path[n:]), loc)

    def _place(self, v: Value, dst: tuple) -> None:
        """Errors about a swept value point at the value in the sweep."""
        n = len(v.src)
        loc = self.pos.of(v.src)
        if loc is not None:
            self.pos.values[dst] = loc
        for path, at in self._entries("values", v.src):
            if path[:n] == v.src and len(path) > n:
                self.pos.values[(*dst, *path[n:])] = at

    def _move(self, src: tuple, dst: tuple) -> None:
        loc = self.pos.values.get(src)
        if isinstance(loc, Location):
            self.pos.values[dst] = loc


def _method(name: Any) -> Any:
    from mergebuild.engine.methods import REGISTRY

    return REGISTRY.get(name) if isinstance(name, str) else None


def _input_fields(method: Any) -> tuple[str, ...]:
    if method is None:
        return ()
    return (*method.input_names(), "inputs", "models")


def _refs(entry: Any, merges: dict[str, Any]) -> list[str]:
    """Merge nodes an entry reads (in order; shapes the loader will refuse give none)."""
    out: list[str] = []
    if isinstance(entry, str) or (isinstance(entry, dict) and isinstance(entry.get("expr"), str)):
        text = entry if isinstance(entry, str) else entry["expr"]
        names = expr_names(text)
        out = [n for n in names or () if n in merges]
    elif isinstance(entry, dict):
        sweep = entry.get("sweep") if isinstance(entry.get("sweep"), dict) else {}
        for f in _input_fields(_method(entry.get("method"))):
            for v in (entry.get(f), sweep.get(f)):  # a swept input: each value is read
                for r in [v] if isinstance(v, str) else v if isinstance(v, list) else []:
                    if isinstance(r, str) and r in merges:
                        out.append(r)
    return out
