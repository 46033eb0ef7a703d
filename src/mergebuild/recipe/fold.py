"""`fold: true`: a linear merge node and the linear subgraph under it become one `fold` node.

The explain analysis gives every leaf term (an input model, or a non-linear node's output)
its exact coefficient at each position (per block when block weights vary). The node is
rewritten into method `fold` over those terms, each coefficient converted once to a float
(or to canonical block weights): one float32 sum and one rounding, whatever the merge order.
Intermediate nodes are no longer its inputs, so they are built only when something else needs
them. A term whose coefficient is 0 at every position is left out of the sum and reported.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import replace
from fractions import Fraction
from typing import Any

from mergebuild.errors import Location, Problem
from mergebuild.recipe.model import NodeSpec, Recipe

FOLDABLE = (
    "weighted_sum", "add_difference", "linear", "copy", "triple_sum", "sum_twice", "n_average",
    "fold",
)  # fmt: skip


def not_foldable(node: NodeSpec) -> str | None:
    """Why `fold: true` cannot apply to `node`, or None."""
    if node.method in FOLDABLE:
        return None
    return (
        f"merge '{node.name}': 'fold: true' applies to linear merges ({', '.join(FOLDABLE[:-1])}"
        f" or an expression of + − ×); {node.method} is not linear (its result is not a fixed "
        "weighted sum of its inputs), so there is no sum to fold: remove 'fold'"
    )


def fold_nodes(recipe: Recipe, where: Callable[[str], Location | None]) -> list[Problem]:
    """Rewrite every `fold: true` node of `recipe` in place; problems located by `where`."""
    from mergebuild.engine.methods.fold import Fold
    from mergebuild.explain import TOL, Explainer, ExplainError

    ex = Explainer(recipe)  # the recipe as written: each fold sees its original subgraph
    order = ex.order()
    problems: list[Problem] = []
    new: dict[str, NodeSpec] = {}
    for name, node in recipe.nodes.items():
        if not node.fold or node.folded_from is not None:  # (an included node: folded there)
            continue
        try:
            an = ex.analyse(name)
        except ExplainError as e:
            problems.append(Problem(f"merge '{name}': cannot fold: {e}", where(name)))
            continue
        terms = sorted({t for form in an.forms for t in form}, key=order)
        live = [t for t in terms if any(abs(f.get(t, Fraction(0))) > TOL for f in an.forms)]
        if not live:
            problems.append(
                Problem(
                    f"merge '{name}': every model cancels out (its linear form is 0): "
                    "folding leaves nothing to sum",
                    where(name),
                )
            )
            continue
        first = primary(recipe, name)  # gives the key set, as `a` does in the unfolded graph
        names = [first, *(t for t in live if t != first)]
        weights = [_weight(an.positions, an.forms, t) if t in live else 0.0 for t in names]
        params = Fold.Params.model_validate({"weights": weights}).model_dump()
        cancelled = tuple(sorted(an.seen - set(live), key=order))
        new[name] = replace(
            node,
            method="fold",
            inputs={f"m{i}": t for i, t in enumerate(names)},
            params=params,
            folded_from=node.method,
            cancelled=cancelled,
        )
        if cancelled:
            warnings.warn(
                f"merge '{name}' (fold): {', '.join(cancelled)} "
                f"{'cancels' if len(cancelled) == 1 else 'cancel'} out (total coefficient 0): "
                "left out of the sum",
                stacklevel=2,
            )
    recipe.nodes.update(new)
    return problems


def primary(recipe: Recipe, name: str) -> str:
    """The leaf reached through first inputs (`a`) of linear nodes: whose keys and non-float
    tensors the unfolded graph keeps, so the folded node keeps them too."""
    cur = name
    while cur in recipe.nodes and recipe.nodes[cur].method in FOLDABLE:
        cur = next(iter(recipe.nodes[cur].inputs.values()))
    return cur


def _weight(positions: tuple[str, ...], forms: list[dict[str, Fraction]], t: str) -> Any:
    """A term's coefficients (one per position) as one float or canonical block weights."""
    from mergebuild.explain import ALL, UNET, _layouts_of
    from mergebuild.sd.arch import TEXT_ENCODERS
    from mergebuild.sd.blocks import LAYOUTS, Weights

    by = {p: f.get(t, Fraction(0)) for p, f in zip(positions, forms, strict=True)}
    if positions == (ALL,):
        return float(by[ALL])
    encs = tuple((e, by[e]) for e in TEXT_ENCODERS if e in by)
    rest = (by["text_encoder"], by["vae"], by["other"], encs)
    if positions[0] == UNET:
        w = Weights(None, (by[UNET],), *rest)
    else:
        (layout,) = _layouts_of(positions)
        assert layout is not None
        w = Weights(layout, tuple(by[b] for b in LAYOUTS[layout]), *rest)
    n = w.normalized_encoders().normalized()
    return float(n) if isinstance(n, Fraction) else n.to_param()


def describe(recipe: Recipe, name: str) -> str:
    """`folded add_difference: A − C + D (B cancels out)`: for `-n` and `graph`."""
    from mergebuild.explain import render

    node = recipe.nodes[name]
    if node.method != "fold":
        return ""
    ws = node.params["weights"]
    refs = list(node.inputs.values())
    if all(isinstance(w, float) for w in ws):
        form = render([(r, Fraction(w)) for r, w in zip(refs, ws, strict=True) if w != 0])
    else:
        form = "Σ over " + ", ".join(r for r, w in zip(refs, ws, strict=True) if w != 0)
        form += " (weights vary by block)"
    what = f"folded {node.folded_from}" if node.folded_from else "fold"
    gone = ""
    if node.cancelled:
        verb = "cancels" if len(node.cancelled) == 1 else "cancel"
        gone = f" ({', '.join(node.cancelled)} {verb} out)"
    return f"{what}: {form}{gone}"
