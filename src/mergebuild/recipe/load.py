"""Recipe file → validated `Recipe`, collecting every problem with its file:line:column."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from mergebuild.engine.methods import REGISTRY, Method
from mergebuild.engine.methods.base import bounds, in_bounds
from mergebuild.errors import Location, Problem, RecipeError, did_you_mean
from mergebuild.recipe.expr import ExpressionError, lower
from mergebuild.recipe.model import ModelInput, NodeSpec, OutputSpec, Recipe
from mergebuild.recipe.schema import (
    DTYPE_ALIASES,
    MergeEntry,
    ModelEntry,
    RecipeFile,
    problems_from,
)
from mergebuild.recipe.sweep import Expansion, expand_sweeps
from mergebuild.recipe.yamlpos import Positions, load_yaml
from mergebuild.sd.blocks import AlphaError, canonical_alpha
from mergebuild.sd.output import canonical as canonical_output
from mergebuild.textfile import RECIPE_CAP, TextFileError, read_capped

GENERIC_FIELDS = ("method", "expr", "inputs", "dtype", "cache", "fold")


def load_recipe(
    path: str | os.PathLike[str],
    overrides: list[str] | tuple[str, ...] = (),
    allow_outside_paths: bool = False,
    _including: tuple[Path, ...] = (),
) -> Recipe:
    """Parse, validate and resolve a recipe; raise `RecipeError` listing every problem.

    A shared recipe must not write anywhere it likes: outputs outside the recipe's directory
    (after resolving symlinks) are refused unless `allow_outside_paths`.
    """
    shown = str(path)
    if not _including and ".lock" in (Path(path).suffix, Path(path).resolve().suffix):
        raise RecipeError(
            [
                Problem(
                    f"{shown}: a recipe's name cannot end in .lock: `mergebuild lock` writes its "
                    "lock file there (RECIPE.lock), which would replace the recipe; rename it"
                )
            ]
        )
    try:
        raw = read_capped(path, RECIPE_CAP, "recipe")
    except TextFileError as e:
        raise RecipeError([Problem(f"cannot read recipe {shown}: {e}")]) from None
    except OSError as e:
        raise RecipeError([Problem(f"cannot read recipe {shown}: {e.strerror}")]) from None
    data, pos = load_yaml(raw, shown)
    if not isinstance(data, dict):
        raise RecipeError(
            [
                Problem(
                    "a recipe is a mapping with 'mergebuild', 'models', 'merges' and 'outputs'",
                    pos.of(()),
                )
            ]
        )
    apply_overrides(data, pos, overrides)
    sweeps = expand_sweeps(data, pos)
    try:
        rf = RecipeFile.model_validate(data)
    except ValidationError as e:
        raise RecipeError(_once(problems_from(e, (), pos), sweeps)) from None
    resolver = _Resolver(Path(path).resolve(), rf, data, pos, allow_outside_paths, _including)
    resolver.sweeps = sweeps
    try:
        recipe = resolver.resolve()
    except RecipeError as e:
        raise RecipeError(_once(e.problems, sweeps)) from None
    recipe.node_members, recipe.output_members = sweeps.node_members, sweeps.output_members
    return recipe


def _once(problems: list[Problem], sweeps: Expansion) -> list[Problem]:
    """A mistake in a swept node is reported once, not once per member: problems that differ
    only in the member they name (same place, same words) collapse into the first."""
    if not sweeps.origin:
        return problems
    seen: set[tuple[str, Location | None]] = set()
    out = []
    for p in problems:
        text = _MEMBER.sub(lambda m: m.group(1), p.message)
        if (text, p.location) not in seen:
            seen.add((text, p.location))
            out.append(p)
    return out


_MEMBER = re.compile(r"([A-Za-z_][A-Za-z0-9_.]*)\[[^\[\]\n]*\]")


def apply_overrides(data: dict[str, Any], pos: Positions, overrides: list[str] | tuple) -> None:
    """`--set NAME.FIELD=VALUE` on an explicit merge node or an output (VALUE is YAML)."""
    problems = []
    for item in overrides:
        target, eq, value = item.partition("=")
        name, dot, field = target.rpartition(".")
        if not eq or not dot or not name or not field:
            problems.append(Problem(f"--set {item!r}: expected NAME.FIELD=VALUE"))
            continue
        merges, outputs = data.get("merges") or {}, data.get("outputs") or {}
        merges = merges if isinstance(merges, dict) else {}  # wrong shapes: reported later
        outputs = outputs if isinstance(outputs, dict) else {}
        if name.endswith(".sweep") and name[: -len(".sweep")] in merges:
            problems += _set_sweep(data, pos, item, name[: -len(".sweep")], field, value)
            continue
        section = "merges" if name in merges else "outputs" if name in outputs else None
        if section is None:
            problems.append(
                Problem(
                    f"--set {item!r}: no merge or output named '{name}'"
                    f"{did_you_mean(name, [*merges, *outputs])}"
                )
            )
            continue
        entry = data[section][name]
        if not isinstance(entry, dict):
            entry = data[section][name] = {"expr": entry}
            if field not in ("dtype", "cache", "fold", "sweep"):
                problems.append(
                    Problem(
                        f"--set {item!r}: '{name}' is an expression; "
                        "use the explicit form (method: ...) to override it"
                    )
                )
                continue
        try:
            parsed = _set_value(value)
        except RecipeError as e:
            problems += [Problem(f"--set {item!r}: {p.message}", p.location) for p in e.problems]
            continue
        entry[field], sub = parsed
        for path, loc in sub.values.items():
            pos.values[(section, name, field, *path)] = loc
        pos.values[(section, name, field)] = Location("--set", 1, 1)
    if problems:
        raise RecipeError(problems)


def _set_sweep(
    data: dict[str, Any], pos: Positions, item: str, name: str, param: str, value: str
) -> list[Problem]:
    """`--set NODE.sweep.PARAM=[v1, v2]` (or `{range: [...]}`, or `zip=true`): one axis of a
    node's sweep, added or replaced."""
    entry = data["merges"][name]
    if not isinstance(entry, dict):
        entry = data["merges"][name] = {"expr": entry}
    sweep = entry.setdefault("sweep", {})
    if not isinstance(sweep, dict):
        return [Problem(f"--set {item!r}: the sweep of '{name}' is not a mapping")]
    try:
        parsed, sub = _set_value(value)
    except RecipeError as e:
        return [Problem(f"--set {item!r}: {p.message}", p.location) for p in e.problems]
    sweep[param] = parsed
    where = ("merges", name, "sweep", param)
    for path in [p for p in pos.values if p[: len(where)] == where]:
        del pos.values[path]
    for path, loc in sub.values.items():
        pos.values[(*where, *path)] = loc
    pos.values[where] = pos.keys[where] = Location("--set", 1, 1)
    return []


def _set_value(value: str) -> tuple[Any, Positions]:
    """A `--set` VALUE read like the recipe: the same loader, caps and refusals (duplicate
    keys, tags, alias bombs). Text that is not YAML at all (`@x`, `a: b: c`) stays a string,
    as before; only the parser decides that, nothing is constructed."""
    if not value.strip():
        return None, Positions("--set")
    try:
        yaml.compose(value, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return value, Positions("--set")
    return load_yaml(value.encode(), "--set")


class _Resolver:
    def __init__(
        self,
        path: Path,
        rf: RecipeFile,
        data: dict[str, Any],
        pos: Positions,
        allow_outside: bool = False,
        including: tuple[Path, ...] = (),
    ) -> None:
        self.recipe = Recipe(path=path, sources=[path])
        self.recipe.cache = rf.cache.model_dump() if rf.cache else None
        self.landing: dict[str, str] = {}  # output name → where its file really lands
        self.landed: dict[Any, str] = {}  # realpath / (dir, casefolded name) → output name
        self.rf, self.data, self.pos = rf, data, pos
        self.allow_outside = allow_outside
        self.including = (*including, path)
        self.problems: list[Problem] = []
        # names references may use: this recipe's, plus `ns.name` from included recipes
        self.model_names: set[str] = set(rf.models)
        self.merge_names: set[str] = set(rf.merges)
        self.included: set[str] = set()  # nodes from included recipes: checked there already
        self.aliases: dict[str, str] = {}  # `ns.output` → the included name it stands for
        self.sweeps = Expansion()  # values and references of expression sweep members

    def err(self, message: str, loc: Location | None) -> None:
        self.problems.append(Problem(message, loc))

    def resolve(self) -> Recipe:
        self.recipe.search_paths = [
            self._search_path(p, ("search_paths", i)) for i, p in enumerate(self.rf.search_paths)
        ]
        for ns, text in self.rf.include.items():
            self._include(ns, text)
        for name in [*self.rf.models, *self.rf.merges]:
            if name in self.recipe.models or name in self.recipe.nodes or name in self.aliases:
                section = "models" if name in self.rf.models else "merges"
                self.err(
                    f"duplicate name '{name}': already defined by include '{name.split('.')[0]}'",
                    self.pos.of((section, name), key=True),
                )
        for name, entry in self.rf.models.items():
            if isinstance(entry, str):
                if not entry.strip():
                    self.err(
                        f"model '{name}' has an empty path: give a file path, or "
                        "{sha256: ...} to find the file by content",
                        self.pos.of(("models", name)),
                    )
                    continue
                entry = ModelEntry(path=entry)
            self.recipe.models[name] = ModelInput(
                name,
                self._path(entry.path, ("models", name)) if entry.path else None,
                self.pos.of(("models", name)),
                entry.sha256,
                tuple(entry.urls or ()),
                entry.hf,
            )
        for name, raw in self.rf.merges.items():
            if name in self.rf.models:
                first = self.pos.of(("models", name), key=True)
                self.err(
                    f"duplicate name '{name}': already a model (line {first.line})"
                    if first
                    else f"duplicate name '{name}'",
                    self.pos.of(("merges", name), key=True),
                )
                continue
            node = self._node(name, raw)
            if node is not None:
                self.recipe.nodes[name] = node
        for name, out in self.rf.outputs.items():
            self._output(name, out)
        if not self.recipe.outputs and not self.problems:
            self.err("the recipe has no outputs: add one under 'outputs:'", self.pos.of(()))
        self._check_refs()
        self._apply_aliases()
        if not self.problems:
            from mergebuild.graph import find_cycle

            cycle = find_cycle(self.recipe)
            if cycle:
                self.err(
                    f"merge cycle: {' → '.join([*cycle, cycle[0]])}",
                    self.recipe.nodes[cycle[0]].location,
                )
        if not self.problems:
            from mergebuild.recipe.fold import fold_nodes

            self.problems += fold_nodes(self.recipe, self._fold_location)
        if self.problems:
            raise RecipeError(self.problems)
        return self.recipe

    def _fold_location(self, name: str) -> Location | None:
        return self.pos.of(("merges", name, "fold"), key=True)  # or the node, for `expr` text

    def _include(self, ns: str, text: str) -> None:
        """Another recipe's graph, namespaced `ns.`; its outputs become models of this one.

        `ns.<output>` is exactly what that recipe publishes: an alias of its source when the
        output keeps the source's dtype, else a non-stored `copy` node cast to the output's
        dtype. Its other models and nodes are `ns.<name>` (`ns._<name>` when an output of that
        name stands for something else). Layout options (prune, vae, key filters) of an included
        output are refused: reference its source node instead.
        """
        loc = self.pos.of(("include", ns))
        path = self._path(text, ("include", ns)).resolve()
        if path in self.including:
            chain = " → ".join(p.name for p in (*self.including, path))
            self.err(f"include cycle: {chain}", loc)
            return
        try:
            # its outputs are never written from here: where they point is not our concern
            sub = load_recipe(path, (), True, self.including)
        except RecipeError as e:
            if not e.problems[0].location:
                self.err(f"include '{ns}': {e.problems[0].message}", loc)
            self.problems += [p for p in e.problems if p.location]
            return

        def is_alias(o: OutputSpec) -> bool:
            return o.dtype is None and not o.options and o.vae is None

        owned = {o.name for o in sub.outputs.values() if not (is_alias(o) and o.source == o.name)}
        rename = {n: f"{ns}._{n}" if n in owned else f"{ns}.{n}" for n in [*sub.models, *sub.nodes]}
        for m in sub.models.values():
            self.recipe.models[rename[m.name]] = replace(m, name=rename[m.name])
            self.model_names.add(rename[m.name])
        for n in sub.nodes.values():
            inputs = {slot: rename[src] for slot, src in n.inputs.items()}
            cancelled = tuple(rename.get(c, c) for c in n.cancelled)
            self.recipe.nodes[rename[n.name]] = replace(
                n, name=rename[n.name], inputs=inputs, cancelled=cancelled
            )
            self.merge_names.add(rename[n.name])
            self.included.add(rename[n.name])
        for o in sub.outputs.values():
            name, src = f"{ns}.{o.name}", rename[o.source]
            if o.options or o.vae is not None:
                self.err(
                    f"include '{ns}': output '{o.name}' uses prune/components/include/exclude/"
                    f"vae, which an included output cannot carry; use its source '{src}'",
                    loc,
                )
            elif is_alias(o):
                if name != src:
                    self.aliases[name] = src
                    (self.model_names if src in self.recipe.models else self.merge_names).add(name)
            else:
                self.recipe.nodes[name] = NodeSpec(
                    name, "copy", {"a": src}, {}, o.dtype or "auto", False, o.location
                )
                self.merge_names.add(name)
                self.included.add(name)
        known = self.recipe.search_paths
        known += [p for p in sub.search_paths if p not in known]
        self.recipe.sources += [p for p in sub.sources if p not in self.recipe.sources]

    def _apply_aliases(self) -> None:
        """Point references to an aliased included output at what it stands for."""
        if not self.aliases:
            return
        for name, node in list(self.recipe.nodes.items()):
            inputs = {s: self.aliases.get(r, r) for s, r in node.inputs.items()}
            if inputs != node.inputs:
                self.recipe.nodes[name] = replace(node, inputs=inputs)
        for name, out in list(self.recipe.outputs.items()):
            if out.source in self.aliases:
                self.recipe.outputs[name] = replace(out, source=self.aliases[out.source])

    def _path(self, text: str, where: tuple) -> Path:
        if "\0" in text:
            self.err("a file path cannot contain a NUL character", self.pos.of(where))
            text = text.replace("\0", "")
        p = Path(os.path.expanduser(text))
        return Path(os.path.normpath(self.recipe.directory / p))

    def _search_path(self, text: str, where: tuple) -> Path:
        """A recipe is data, often downloaded: it may point at a models folder anywhere (its
        own, `../models`, `/data/sd`), but not at a whole filesystem, the home directory or a
        virtual filesystem; the user can still pass those with --models DIR."""
        from mergebuild.locate import too_broad  # locate imports the recipe model

        path = self._path(text, where)
        why = too_broad(path)
        if why:
            self.err(
                f"search path {text!r} is {why}: a recipe may only name folders that hold "
                "models (pass a broader folder yourself with --models DIR if you mean it)",
                self.pos.of(where),
            )
        return path

    def _dtype(self, value: str | None, where: tuple, allow_auto: bool) -> str | None:
        if value is None or (allow_auto and value == "auto"):
            return value
        dt = DTYPE_ALIASES.get(str(value).lower())
        if dt is None:
            choices = sorted(set(DTYPE_ALIASES.values()))
            self.err(
                f"unknown dtype {value!r}; use one of {', '.join(choices)}"
                f"{did_you_mean(str(value), DTYPE_ALIASES)}",
                self.pos.of(where),
            )
        elif dt.endswith("_scaled") and allow_auto:  # a node's value is one tensor per key
            self.err(
                f"dtype {value!r} applies to outputs (it adds a scale_weight per weight); "
                "give the merge node fp8_e4m3fn, or set it on the output",
                self.pos.of(where),
            )
        return dt

    def _node(self, name: str, raw: Any) -> NodeSpec | None:
        where = ("merges", name)
        loc = self.pos.of(where)
        if isinstance(raw, str):
            raw = {"expr": raw}
        if not isinstance(raw, dict):
            self.err(
                f"merge '{name}' must be an expression string or a mapping with 'method:'", loc
            )
            return None
        try:
            entry = MergeEntry.model_validate(raw)
        except ValidationError as e:
            self.problems += problems_from(e, where, self.pos)
            return None
        dtype = self._dtype(entry.dtype, (*where, "dtype"), allow_auto=True) or "auto"
        if entry.expr is not None:
            extra = [k for k in raw if k not in ("expr", "dtype", "cache", "fold")]
            for k in extra:
                self.err(
                    f"merge '{name}' has an expression; field '{k}' does not apply",
                    self.pos.of((*where, k), key=True),
                )
            return self._folded(name, entry, self._expression(name, entry, dtype))
        if entry.method is None:
            self.err(
                f"merge '{name}' needs 'method:' (one of {', '.join(REGISTRY)}) or an expression",
                loc,
            )
            return None
        method = REGISTRY.get(entry.method)
        if method is None:
            self.err(
                f"unknown method '{entry.method}'{did_you_mean(entry.method, REGISTRY)} "
                f"(available: {', '.join(REGISTRY)})",
                self.pos.of((*where, "method")),
            )
            return None
        return self._folded(
            name, entry, self._method_node(name, method, raw, dtype, entry.cache, self.pos)
        )

    def _folded(self, name: str, entry: MergeEntry, node: NodeSpec | None) -> NodeSpec | None:
        """`fold: true` is marked here (a linear node only) and applied once the graph is whole."""
        if node is None or not entry.fold:
            return node
        from mergebuild.recipe.fold import not_foldable

        why = not_foldable(node)
        if why:
            self.err(why, self.pos.of(("merges", name, "fold")))
            return None
        return replace(node, fold=True)

    def _method_node(
        self,
        name: str,
        method: type[Method],
        raw: dict[str, Any],
        dtype: str,
        cache: bool | None,
        pos: Positions,
        expression: str | None = None,
    ) -> NodeSpec | None:
        """Inputs and parameters of a method node, in any of the method's input forms.

        `pos` locates problems: the recipe's positions for an explicit node, one fixed place
        (the call's column) for a method called in an expression.
        """
        where = ("merges", name)
        loc = pos.of(where)
        sig = method.signature()
        form = method.inputs_form
        slots = method.slots if form == "slots" else ()  # a variadic method has no `a:`
        base_name, models_name = method.base_name, method.models_name
        spelled = {*slots, base_name, models_name, "inputs"}
        params = {k: v for k, v in raw.items() if k not in GENERIC_FIELDS and k not in spelled}
        inputs: dict[str, str] = {}
        n_models = -1
        if form == "slots":
            for k in ("inputs", "models", "base"):
                if k in raw and k not in method.slots:
                    self.err(
                        f"merge '{name}' ({method.name}) takes inputs "
                        f"{', '.join(method.slots)}, not '{k}:'; signature: {sig}",
                        pos.of((*where, k), key=True),
                    )
            for slot in method.slots:
                ref = raw.get(slot)
                if ref is None:
                    self.err(
                        f"merge '{name}' ({method.name}: {method.summary}) is missing "
                        f"input '{slot}'; signature: {sig}",
                        pos.of(where, key=True),
                    )
                elif not isinstance(ref, str):
                    self.err(
                        f"input '{slot}' of merge '{name}' must be a model or node name",
                        pos.of((*where, slot)),
                    )
                else:
                    inputs[slot] = ref
        else:
            field = "inputs" if raw.get(models_name) is None else models_name
            refs = raw.get(field)
            if raw.get(models_name) is not None and raw.get("inputs") is not None:
                self.err(
                    f"merge '{name}': give '{models_name}:' or its alias 'inputs:', not both",
                    pos.of((*where, "inputs"), key=True),
                )
            if form == "base_models":
                base = raw.get(base_name)
                if not isinstance(base, str):
                    what = (
                        f"is missing '{base_name}:'"
                        if base is None
                        else f"'{base_name}' must be a name"
                    )
                    self.err(
                        f"merge '{name}' ({method.name}) {what}; signature: {sig}",
                        pos.of((*where, base_name) if base is not None else where, key=True),
                    )
                else:
                    inputs["base"] = base
            elif "base" in raw:
                self.err(
                    f"merge '{name}' ({method.name}) takes no 'base:'; signature: {sig}",
                    pos.of((*where, "base"), key=True),
                )
            if not isinstance(refs, list) or not all(isinstance(r, str) for r in refs):
                self.err(
                    f"merge '{name}' ({method.name}) needs '{models_name}: [..]' (a list of "
                    f"model or node names); signature: {sig}",
                    pos.of((*where, field) if refs is not None else where, key=True),
                )
                return None
            n_models = len(refs)
            if n_models < method.min_models:
                self.err(
                    f"merge '{name}': {method.name} needs at least {method.min_models} "
                    f"models, got {n_models}; signature: {sig}",
                    pos.of((*where, field)),
                )
            inputs.update({f"m{i}": ref for i, ref in enumerate(refs)})
        if not self._method_params(name, method, params, n_models, pos):
            return None
        try:
            p = method.Params.model_validate(params)
        except ValidationError as e:
            for prob in problems_from(e, where, pos, f" ({method.name})"):
                if "unknown field" in prob.message:
                    field = prob.message.split("'")[1]
                    allowed = [*method.Params.model_fields, *method.input_names(), *GENERIC_FIELDS]
                    prob = Problem(
                        f"unknown parameter '{field}' for {method.name}"
                        f"{did_you_mean(field, allowed)}",
                        prob.location,
                    )
                self.problems.append(Problem(f"{prob.message}; signature: {sig}", prob.location))
            return None
        msg = method.check(p, len(inputs))
        if msg:
            self.err(f"merge '{name}': {msg}; signature: {sig}", loc)
        for field, msg in _block_range(method, p):
            self.err(f"merge '{name}': {msg}; signature: {sig}", pos.of((*where, field)))
        if len(inputs) < len(method.slots) or (form == "base_models" and "base" not in inputs):
            return None
        return NodeSpec(name, method.name, inputs, p.model_dump(), dtype, cache, loc, expression)

    def _method_params(
        self, name: str, method: type[Method], params: dict[str, Any], n_models: int, pos: Positions
    ) -> bool:
        """Checks before pydantic's, with messages that say what to write instead; block
        weights canonicalised in place. False when a problem was reported."""
        where = ("merges", name)
        sig = method.signature()
        ok = True
        fields = method.Params.model_fields
        if "seed" in params and not method.random:
            self.err(
                f"merge '{name}': {method.name} is not random, 'seed' does not apply; "
                f"signature: {sig}",
                pos.of((*where, "seed"), key=True),
            )
            ok = False
        for field, value in params.items():
            if field in method.block_params or field not in fields:
                continue
            shape = str(fields[field].annotation)
            if isinstance(value, list | dict) and "list" not in shape and "dict" not in shape:
                takes = ", ".join(method.block_params) or "none of its parameters"
                self.err(
                    f"merge '{name}': '{field}' of {method.name} takes one number, not block "
                    f"weights (per-block values: {takes}); signature: {sig}",
                    pos.of((*where, field)),
                )
                ok = False
        weights = params.get("weights")
        if n_models >= 0 and isinstance(weights, list) and len(weights) != n_models:
            self.err(
                f"merge '{name}': 'weights' has {len(weights)} values for {n_models} models "
                f"(one per model, same order); signature: {sig}",
                pos.of((*where, "weights")),
            )
            ok = False
        for field in method.block_params:
            if isinstance(params.get(field), list | dict):  # block weights; numbers as before
                try:
                    params[field] = canonical_alpha(params[field])
                except AlphaError as e:
                    self.err(f"merge '{name}': {e}", pos.of((*where, field, *e.path)))
                    ok = False
        for field in getattr(method, "block_list_params", ()):  # fold: each item may vary
            if not isinstance(params.get(field), list):
                continue
            items = params[field] = list(params[field])
            for i, item in enumerate(items):
                if isinstance(item, list | dict):
                    try:
                        items[i] = canonical_alpha(item)
                    except AlphaError as e:
                        self.err(f"merge '{name}': {e}", pos.of((*where, field, i, *e.path)))
                        ok = False
        return ok

    def _expression(self, name: str, entry: MergeEntry, dtype: str) -> NodeSpec | None:
        where = ("merges", name)
        text = entry.expr or ""
        vpath = where if self.pos.values.get((*where, "expr")) is None else (*where, "expr")
        loc = self.pos.of(vpath)
        quoted = (*vpath, "__quoted__") in self.pos.values
        try:
            low = lower(text, name, self.sweeps.bind.get(name), self.sweeps.rename.get(name))
        except ExpressionError as e:
            self.err(f"in merge '{name}': {e}", _shift(loc, e.offset, quoted))
            return None
        for ref, off in low.refs.items():
            if ref not in self.model_names and ref not in self.merge_names:
                self.err(
                    _unknown_ref(ref, self.model_names, self.merge_names),
                    _shift(loc, off, quoted),
                )
        for call in low.subnodes:  # methods called inside: anonymous nodes `name/1`…
            at = _At(_shift(loc, call.offset, quoted))
            method = REGISTRY[call.method]
            sub = self._method_node(call.name, method, call.raw, "auto", None, at, text)
            if sub is not None:
                self.recipe.nodes[call.name] = sub
                self.merge_names.add(call.name)
        if low.call is not None:  # the whole expression is one method call
            at = _At(_shift(loc, low.call.offset, quoted))
            method = REGISTRY[low.call.method]
            return self._method_node(name, method, low.call.raw, dtype, entry.cache, at, text)
        return NodeSpec(name, low.method, low.inputs, low.params, dtype, entry.cache, loc, text)

    def _output(self, name: str, out: Any) -> None:
        where = ("outputs", name)
        dtype = self._dtype(out.dtype, (*where, "dtype"), allow_auto=False)
        path = self._path(out.path, (*where, "path"))
        self._check_output_place(name, path)
        for model in self.recipe.models.values():
            if model.path == path:
                self.err(
                    f"output '{name}' would overwrite input model '{model.name}' ({path})",
                    self.pos.of((*where, "path")),
                )
        for kind in ("include", "exclude"):
            for i, pattern in enumerate(getattr(out, kind) or []):
                try:
                    re.compile(pattern)
                except re.error as e:
                    self.err(
                        f"output '{name}': {kind} pattern {pattern!r} is not a valid regular "
                        f"expression ({e})",
                        self.pos.of((*where, kind, i)),
                    )
        if out.vae is not None and out.components is not None and "vae" not in out.components:
            self.err(
                f"output '{name}' bakes in a VAE but its components leave the VAE out",
                self.pos.of((*where, "vae")),
            )
        options = canonical_output(out.prune, out.components, out.include, out.exclude)
        self.recipe.outputs[name] = OutputSpec(
            name, out.source, path, dtype, self.pos.of(where), options, out.vae
        )

    def _check_output_place(self, name: str, path: Path) -> None:
        """Refuse outputs that land outside the recipe's directory, on an input's bytes, on
        this recipe, a recipe it includes or their lock files, or on another output's file.

        Symlinks are resolved: in the directories (which decide where the file lands) and in
        the output itself (a link to an input model would name the input). Names are compared
        case-folded too (a case-insensitive filesystem), and existing files by inode (a
        hardlink of the recipe is the recipe).
        """
        loc = self.pos.of(("outputs", name, "path"))
        lands = Path(os.path.realpath(path.parent)) / path.name
        home = Path(os.path.realpath(self.recipe.directory))
        if not self.allow_outside and not lands.is_relative_to(home):
            self.err(
                f"output '{name}' would be written outside the recipe's directory ({lands} is "
                f"not under {home}); pass --allow-outside-paths if that is intended",
                loc,
            )
        if os.path.isdir(path):
            self.err(f"output '{name}' ({path}) is a directory; give a file name", loc)
            return
        parent = _nearest_existing(path.parent)
        if parent is not None and not parent.is_dir():
            self.err(
                f"output '{name}' ({path}) cannot be written: {parent} is a file, not a directory",
                loc,
            )
            return
        real = os.path.realpath(path)
        for model in self.recipe.models.values():
            if model.path and model.path != path and os.path.realpath(model.path) == real:
                self.err(
                    f"output '{name}' ({path}) resolves to input model '{model.name}' ({real}) "
                    "through a symlink; writing it would destroy the input",
                    loc,
                )
        for what, protected in self._protected():
            if _same_place(path, lands, protected):
                self.err(
                    f"output '{name}' ({path}) is {what} ({protected}); writing it would "
                    "destroy it: choose another output path",
                    loc,
                )
                return
        # not by inode: outputs are hardlinks of cache objects, equal outputs share one.
        # Indexed (what _same_place compares with inode=False): a sweep of 1000 outputs must
        # not compare every pair through realpath.
        real = os.path.realpath(path)
        mine = (str(lands), real, (str(lands.parent), lands.name.casefold()))
        for other in dict.fromkeys(self.landed[k] for k in mine if k in self.landed):
            place = self.landing[other]
            self.err(
                f"outputs '{other}' and '{name}' write the same file {path}"
                + (f" (through a link: {place})" if place != str(lands) else ""),
                loc,
            )
        self.landing[name] = str(lands)
        real_place = Path(os.path.realpath(lands))
        for k in (str(real_place), (str(real_place.parent), real_place.name.casefold())):
            self.landed.setdefault(k, name)

    def _protected(self) -> list[tuple[str, Path]]:
        """Files a build must never write over: recipes and their lock files."""
        out: list[tuple[str, Path]] = []
        for i, src in enumerate(self.recipe.sources):
            kind = "the recipe itself" if i == 0 else f"included recipe {src.name}"
            out.append((kind, src))
            lock = src.with_suffix(".lock")  # lockfile.lock_path of that recipe
            out.append(("the recipe's lock file" if i == 0 else f"the lock file of {kind}", lock))
        return out

    def _check_refs(self) -> None:
        models, merges = self.model_names, self.merge_names
        for node in self.recipe.nodes.values():
            if node.expression is not None or node.name in self.included:
                continue  # reported with a precise column while lowering
            method = REGISTRY.get(node.method)
            spelled = {"base": method.base_name} if method else {}
            for slot, ref in node.inputs.items():
                if ref not in models and ref not in merges:
                    path = ("merges", node.name, spelled.get(slot, slot))
                    if path not in self.pos.values and slot[1:].isdigit():  # models: [..]
                        many = method.models_name if method else "models"
                        path = ("merges", node.name, many, int(slot[1:]))
                    if path not in self.pos.values:
                        path = ("merges", node.name, "inputs")
                    self.err(_unknown_ref(ref, models, merges), self.pos.of(path))
        for out in self.recipe.outputs.values():
            if out.vae is not None and out.vae not in models:
                self.err(
                    f"output '{out.name}': vae '{out.vae}' must be one of the models"
                    f"{did_you_mean(out.vae, models)}",
                    self.pos.of(("outputs", out.name, "vae")),
                )
            if out.source not in models and out.source not in merges:
                self.err(
                    f"output '{out.name}' is from unknown node '{out.source}'"
                    f"{did_you_mean(out.source, sorted([*merges, *models]))}",
                    self.pos.of(("outputs", out.name, "from")),
                )


def _nearest_existing(path: Path) -> Path | None:
    """`path` or its closest ancestor that exists (following symlinks)."""
    for p in (path, *path.parents):
        if os.path.exists(p):
            return p
    return None


def _same_place(path: Path, lands: Path, other: Path, inode: bool = True) -> bool:
    """Would writing `path` (whose directory entry is `lands`) replace or be `other`?"""
    real_other = os.path.realpath(other)
    if str(lands) == real_other or os.path.realpath(path) == real_other:
        return True
    if (
        lands.parent == Path(real_other).parent
        and lands.name.casefold() == Path(real_other).name.casefold()
    ):
        return True  # the same name on a case-insensitive filesystem
    if not inode:
        return False
    try:
        a, b = os.stat(path), os.stat(other)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _block_range(method: type[Method], params: Any) -> Iterator[tuple[str, str]]:
    """Block weights of a bounded parameter must each lie in its range, like one number."""
    from mergebuild.sd.blocks import BlockAlpha

    for field in method.block_params:
        w = getattr(params, field, None)
        b = bounds(method.Params, field)
        if isinstance(w, BlockAlpha) and (b[0] is not None or b[2] is not None):
            vals = [*(w.unet if isinstance(w.unet, list) else [w.unet])]
            for v in [*vals, w.text_encoder, w.vae, w.other]:
                if not in_bounds(v, b):
                    yield field, f"block value {v:g} of '{field}' is out of its range"
                    break


class _At(Positions):
    """Every path located at one place: a method called inside an expression."""

    def __init__(self, loc: Location | None) -> None:
        super().__init__(loc.file if loc else "")
        self.loc = loc

    def of(self, path: Any, *, key: bool = False) -> Location | None:
        return self.loc


def _unknown_ref(ref: str, models: set[str], merges: set[str]) -> str:
    members = sorted(m for m in merges if m.startswith(ref + "["))
    if members and "." in ref:  # the sweep of an included recipe: its members are plain nodes
        shown = ", ".join(members[:3]) + (", …" if len(members) > 3 else "")
        return (
            f"'{ref}' is swept in the included recipe (members {shown}); a recipe does not "
            f"sweep along an included sweep: name one member in the explicit form "
            f'(a: "{members[0]}"), or put the sweep in this recipe'
        )
    close = did_you_mean(ref, sorted([*models, *merges]))
    kind = "model" if not close or close.split("'")[1] in models else "node"
    return f"unknown {kind} '{ref}'{close}"


def _shift(loc: Location | None, offset: int, quoted: bool) -> Location | None:
    if loc is None:
        return None
    return Location(loc.file, loc.line, loc.column + offset + (1 if quoted else 0))
