"""`mergebuild explain`: each merge node as one linear form over the input models.

Pure recipe analysis (no torch, no model file is opened): two recipes that merge the same
models in a different order show the same form, and a form whose coefficients do not sum to
1, cancel a model out, or grow large is flagged before anything is built. Coefficients are
exact `Fraction`s of the recipe's float values; judgements (sum, zero) use a 1e-9 tolerance.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

from mergebuild.errors import EXIT_RECIPE, MergebuildError, did_you_mean
from mergebuild.recipe.model import Recipe
from mergebuild.sd.arch import TEXT_ENCODERS
from mergebuild.sd.blocks import GROUPS, LAYOUTS

TOL = Fraction(1, 10**9)
LARGE = Fraction(3, 2)
ALL = "all"  # the one position of a graph without block weights
UNET = "UNet"  # the UNet position when block weights vary only by component
POSITION_GROUPS = (*GROUPS, *TEXT_ENCODERS)  # clip_l…: each encoder may differ (blocks.Weights)

Form = dict[str, Fraction]  # term (model or opaque node) → coefficient


class ExplainError(MergebuildError):
    exit_code = EXIT_RECIPE


LINEAR = ("weighted_sum", "add_difference", "linear", "copy", "triple_sum", "sum_twice")
LINEAR_METHODS = (*LINEAR, "n_average", "fold")  # fold: what `fold: true` rewrites a node to


def _alpha(value: Any, pos: str) -> Fraction:
    """A parameter's exact value at a position (BASE, IN00, text_encoder, UNet or all)."""
    if not isinstance(value, dict):
        return Fraction(value)
    if pos in TEXT_ENCODERS:
        return Fraction((value.get("encoders") or {}).get(pos, value["text_encoder"]))
    if pos in GROUPS:
        return Fraction(value[pos])
    unet = value["unet"]
    if not isinstance(unet, list):
        return Fraction(unet)
    return Fraction(unet[LAYOUTS[value["layout"]].index(pos)])


def _add(out: Form, form: Form, k: Fraction) -> None:
    for t, c in form.items():
        out[t] = out.get(t, Fraction(0)) + c * k


def combine(method: str, params: dict[str, Any], xs: list[Form], pos: str) -> Form:
    """The linear form of a node from its inputs' forms, at one position."""
    if method == "n_average":
        ws = [Fraction(w) for w in params.get("weights") or [1.0] * len(xs)]
        total = sum(ws, Fraction(0))
        ks = [w / total for w in ws]
    elif method == "linear":
        ks = [Fraction(w) for w in params["weights"]]
    elif method == "fold":  # one weight (or block weights) per term
        ks = [_alpha(w, pos) for w in params["weights"]]
    elif method == "copy":
        ks = [Fraction(1)]
    else:
        a = _alpha(params["alpha"], pos)
        b = _alpha(params["beta"], pos) if "beta" in params else Fraction(0)
        ks = {
            "weighted_sum": [1 - a, a],
            "add_difference": [Fraction(1), a, -a],
            "triple_sum": [1 - a - b, a, b],
            "sum_twice": [(1 - a) * (1 - b), a * (1 - b), b],
        }[method]
    out: Form = {}
    for form, k in zip(xs, ks, strict=True):
        _add(out, form, k)
    return out


@dataclass
class Analysis:
    """One node's forms: `positions[i]` has form `forms[i]`; `seen` is every term reached."""

    positions: tuple[str, ...]
    forms: list[Form]
    seen: set[str] = field(default_factory=set)


class Explainer:
    def __init__(self, recipe: Recipe) -> None:
        self.recipe = recipe
        self._memo: dict[str, Analysis] = {}

    def linear(self, name: str) -> bool:
        return self.recipe.nodes[name].method in LINEAR_METHODS

    def positions(self, name: str) -> tuple[str, ...]:
        """Where a node's form may differ: per block if block weights reach it through linear
        nodes (an opaque node's output is one term, whatever weights it uses inside)."""
        node = self.recipe.nodes[name]
        layouts: set[str | None] = set()
        encoders = False  # per-encoder weights (clip_l…) somewhere: one position each
        if self.linear(name):
            for v in node.params.values():
                for w in v if isinstance(v, list) else [v]:  # fold: block weights per term
                    if isinstance(w, dict) and "unet" in w:
                        layouts.add(w.get("layout"))
                        encoders |= bool(w.get("encoders"))
            for ref in node.inputs.values():
                if ref in self._memo:
                    layouts |= _layouts_of(self._memo[ref].positions)
                    encoders |= TEXT_ENCODERS[0] in self._memo[ref].positions
        named = {x for x in layouts if x is not None}
        if len(named) > 1:
            raise ExplainError(
                f"'{name}' mixes block weights of the {' and '.join(sorted(named))} layouts"
            )
        groups = POSITION_GROUPS if encoders else GROUPS
        if named:
            return (*LAYOUTS[named.pop()], *groups)
        return (UNET, *groups) if layouts else (ALL,)

    def analyse(self, name: str) -> Analysis:
        """Iterative post-order (a long chain must not hit Python's recursion limit)."""
        stack = [name]
        while stack:
            top = stack[-1]
            if top in self._memo:
                stack.pop()
                continue
            node = self.recipe.nodes[top]
            todo = [
                r
                for r in node.inputs.values()
                if r in self.recipe.nodes and self.linear(r) and r not in self._memo
            ]
            if todo and self.linear(top):
                stack.extend(todo)
                continue
            stack.pop()
            self._memo[top] = self._compute(top)
        return self._memo[name]

    def _compute(self, name: str) -> Analysis:
        node = self.recipe.nodes[name]
        positions = self.positions(name)
        if not self.linear(name):
            return Analysis(positions, [{name: Fraction(1)}], {name})
        seen: set[str] = set(node.cancelled)  # a folded node's terms that cancelled out
        forms = []
        for pos in positions:
            xs = []
            for ref in node.inputs.values():
                if ref in self.recipe.nodes and self.linear(ref):
                    sub = self._memo[ref]
                    seen |= sub.seen
                    xs.append(sub.forms[_index(sub.positions, pos)])
                else:  # a model, or an opaque node's output
                    seen.add(ref)
                    xs.append({ref: Fraction(1)})
            forms.append(combine(node.method, node.params, xs, pos))
        return Analysis(positions, forms, seen)

    def order(self) -> Callable[[str], tuple[int, int]]:
        """Models in declaration order, then opaque nodes in recipe order."""
        models = {m: i for i, m in enumerate(self.recipe.models)}
        nodes = {n: i for i, n in enumerate(self.recipe.nodes)}
        return lambda t: (0, models[t]) if t in models else (1, nodes.get(t, len(nodes)))


def _layouts_of(positions: tuple[str, ...]) -> set[str | None]:
    if positions == (ALL,):
        return set()
    if positions[0] == UNET:
        return {None}
    return {k for k, names in LAYOUTS.items() if positions[: len(names)] == names}


def _index(positions: tuple[str, ...], pos: str) -> int:
    """Where `pos` sits in an input's positions (an input may have fewer: all / UNet)."""
    if len(positions) == 1:
        return 0
    if pos in positions:
        return positions.index(pos)
    if pos in TEXT_ENCODERS:  # an input without per-encoder weights: its text_encoder value
        return positions.index("text_encoder")
    return 0 if pos == ALL else positions.index(UNET)  # a block of a UNet-only input


def simplify(form: Form, key: Callable[[str], tuple[int, int]]) -> list[tuple[str, Fraction]]:
    """Terms in a stable order with (near-)zero coefficients dropped."""
    return sorted(((t, c) for t, c in form.items() if abs(c) > TOL), key=lambda tc: key(tc[0]))


def num(c: Fraction) -> str:
    return f"{float(c):.6g}"


def render(terms: list[tuple[str, Fraction]]) -> str:
    """`anything − 0.7·nai_full + gape`: ±1 coefficients as bare names."""
    if not terms:
        return "0"
    parts = []
    for i, (t, c) in enumerate(terms):
        mag = abs(c)
        body = t if abs(mag - 1) <= TOL else f"{num(mag)}·{t}"
        if i == 0:
            parts.append(f"−{body}" if c < 0 else body)
        else:
            parts.append(f"{'−' if c < 0 else '+'} {body}")
    return " ".join(parts)


def flags_of(terms: list[tuple[str, Fraction]]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    total = sum((c for _, c in terms), Fraction(0))
    if abs(total - 1) > TOL:
        out.append(
            {
                "kind": "sum_not_one",
                "sum": float(total),
                "message": f"coefficients sum to {num(total)}, not 1: not an affine "
                "combination, the merge changes the model's scale",
            }
        )
    for t, c in terms:
        if abs(c) > LARGE:
            out.append(
                {
                    "kind": "large",
                    "term": t,
                    "coefficient": float(c),
                    "message": f"{t} has coefficient {num(c)} (magnitude above 1.5)",
                }
            )
    return out


def _section(pos: str) -> str:
    """IN, M or OUT for a UNet block; a component or BASE is its own section."""
    return pos.rstrip("0123456789") if pos[-1].isdigit() else pos


def label(blocks: list[str], positions: tuple[str, ...]) -> str:
    """`IN00–IN05, OUT06–OUT11`: runs of consecutive blocks within IN, M or OUT; BASE and
    components one by one."""
    idx = sorted(positions.index(b) for b in blocks)
    runs: list[list[int]] = []
    for i in idx:
        prev = runs[-1][-1] if runs else None
        if (
            prev is not None
            and i == prev + 1
            and _section(positions[i]) == _section(positions[prev])
        ):
            runs[-1].append(i)
        else:
            runs.append([i])
    return ", ".join(
        positions[r[0]] if len(r) == 1 else f"{positions[r[0]]}–{positions[r[-1]]}" for r in runs
    )


def explain_node(ex: Explainer, name: str) -> dict[str, Any]:
    """A node's report: method, linear, terms (or per-block groups), flags."""
    node = ex.recipe.nodes[name]
    rep: dict[str, Any] = {"method": node.method, "linear": ex.linear(name)}
    if node.method == "fold":  # one float32 Σ over its terms, one rounding
        rep["folded"] = True
        rep["folded_from"] = node.folded_from
    if not ex.linear(name):
        rep.update(terms=None, groups=[], flags=[])
        return rep
    an = ex.analyse(name)
    key = ex.order()
    groups: dict[tuple[tuple[str, str], ...], list[str]] = {}
    simple: dict[tuple[tuple[str, str], ...], list[tuple[str, Fraction]]] = {}
    for pos, form in zip(an.positions, an.forms, strict=True):
        terms = simplify(form, key)
        k = tuple((t, num(c)) for t, c in terms)
        groups.setdefault(k, []).append(pos)
        simple.setdefault(k, terms)
    flags: list[dict[str, Any]] = []
    live = {t for terms in simple.values() for t, _ in terms}
    for t in sorted(an.seen - live, key=key):
        flags.append(
            {
                "kind": "cancels",
                "term": t,
                "message": f"{t} appears in the graph but its total coefficient is 0",
            }
        )
    if len(groups) == 1:
        terms = next(iter(simple.values()))
        rep["terms"] = {t: float(c) for t, c in terms}
        rep["form"] = render(terms)
        rep["groups"] = []
        flags = flags_of(terms) + flags
    else:
        rep["terms"] = None
        rep["groups"] = []
        for k, blocks in groups.items():
            terms = simple[k]
            gflags = flags_of(terms)
            where = label(blocks, an.positions)
            for f in gflags:
                f["blocks"] = where
            rep["groups"].append(
                {
                    "blocks": blocks,
                    "label": where,
                    "terms": {t: float(c) for t, c in terms},
                    "form": render(terms),
                    "flags": gflags,
                }
            )
            flags += gflags
        rep["groups"].sort(key=lambda g: an.positions.index(g["blocks"][0]))
    rep["flags"] = flags
    return rep


def explain(recipe: Recipe, node: str | None = None) -> dict[str, dict[str, Any]]:
    """Reports for every merge node (recipe order), or for `node` alone (a swept node: each
    of its members)."""
    members = recipe.node_members.get(node or "")
    if members:
        ex = Explainer(recipe)
        return {n: explain_node(ex, n) for n in members}
    if node is not None and node not in recipe.nodes:
        if node in recipe.models:
            raise ExplainError(f"'{node}' is an input model, not a merge node")
        raise ExplainError(
            f"unknown merge node '{node}'{did_you_mean(node, recipe.nodes)} "
            f"(merge nodes: {', '.join(recipe.nodes) or 'none'})"
        )
    ex = Explainer(recipe)
    names = [node] if node is not None else list(recipe.nodes)
    return {n: explain_node(ex, n) for n in names}


def text(reports: dict[str, dict[str, Any]]) -> str:
    lines = []
    for name, rep in reports.items():
        if not rep["linear"]:
            lines.append(f"{name}: non-linear ({rep['method']})")
            continue
        how = rep["method"]
        if rep.get("folded"):
            how = f"folded {rep['folded_from']}" if rep["folded_from"] else "fold"
        if rep["terms"] is not None:
            folded = f"  [{how}: one float32 sum, one rounding]" if rep.get("folded") else ""
            lines.append(f"{name} = {rep['form']}{folded}")
        else:
            lines.append(f"{name} ({how}, varies by block):")
            lines += [f"  {g['label']}: {g['form']}" for g in rep["groups"]]
        lines += [f"  ! {f['message']}" + (f" [{f['blocks']}]" if "blocks" in f else "")
                  for f in rep["flags"]]  # fmt: skip
    return "\n".join(lines)
