"""Sweep members as data: values and their spelling, groups, member spaces and their joins,
the names an expression uses, path templates. Pure functions: recipe/sweep.py does the rest."""

from __future__ import annotations

import ast
import string
import warnings
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

from mergebuild.recipe.yamlpos import PlainNumber


@dataclass(frozen=True)
class Value:
    """One swept value: what the member gets, how names and paths spell it, where it was."""

    raw: Any
    spell: str
    src: tuple  # its path in the YAML (for positions of errors inside the member)


@dataclass
class Group:
    """A swept node's own axes: `keys[i]` takes `rows[r][i]` in member r."""

    origin: str
    keys: list[str]
    rows: list[tuple[Value, ...]]


@dataclass
class Space:
    """A node's members: each row picks one row of each group (by index)."""

    groups: list[str]
    rows: list[tuple[int, ...]]

    def project(self, row: tuple[int, ...], groups: list[str]) -> tuple[int, ...]:
        return tuple(row[self.groups.index(g)] for g in groups)


def expr_names(text: str) -> list[str] | None:
    """Model/node names and free variables of an expression (dotted `ns.x` included), in
    order; None when it does not parse (the loader reports it)."""
    from mergebuild.recipe.expr import MAX_EXPRESSION_CHARS

    if len(text) > MAX_EXPRESSION_CHARS:
        return None
    try:
        with warnings.catch_warnings():  # `1if` etc.: the loader's own parse reports the text
            warnings.simplefilter("ignore")
            tree = ast.parse(f"({text})", mode="eval")
    except (SyntaxError, RecursionError, MemoryError, ValueError):
        return None
    funcs = {id(n.func) for n in ast.walk(tree) if isinstance(n, ast.Call)}
    out: list[str] = []
    for n in ast.walk(tree):
        if id(n) in funcs:
            continue
        if isinstance(n, ast.Name):
            out.append(n.id)
        elif isinstance(n, ast.Attribute):
            name = dotted(n)
            if name:
                out.append(name)
    return list(dict.fromkeys(out))


def dotted(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = dotted(node.value)
        return None if base is None else f"{base}.{node.attr}"
    return None


def free_names(text: str) -> set[str] | None:
    names = expr_names(text)
    return None if names is None else {n for n in names if "." not in n}


def topological(refs: dict[str, list[str]]) -> list[str]:
    """Nodes in an order where each comes after the nodes it reads (cycles left out)."""
    indeg = {n: len(set(r)) for n, r in refs.items()}
    users: dict[str, list[str]] = {n: [] for n in refs}
    for n, rs in refs.items():
        for r in set(rs):
            users[r].append(n)
    ready = [n for n, d in indeg.items() if d == 0]
    out: list[str] = []
    while ready:
        n = ready.pop(0)
        out.append(n)
        for u in users[n]:
            indeg[u] -= 1
            if indeg[u] == 0:
                ready.append(u)
    return out


def components(spaces: list[Space]) -> list[Space]:
    """Inputs' member spaces, those sharing a group joined (a diamond is one sweep)."""
    parts: list[Space] = []
    for s in spaces:
        merged = s
        rest = []
        for p in parts:
            if set(p.groups) & set(merged.groups):
                joined = join(p, merged, 1 << 62)
                assert joined is not None
                merged = joined
            else:
                rest.append(p)
        parts = [*rest, merged]
    return parts


def join(a: Space, b: Space, limit: int) -> Space | None:
    """Rows of `a` and `b` that agree on their shared groups (a product when none)."""
    shared = [g for g in b.groups if g in a.groups]
    extra = [i for i, g in enumerate(b.groups) if g not in a.groups]
    rows = []
    for ra in a.rows:
        key = a.project(ra, shared)
        for rb in b.rows:
            if b.project(rb, shared) == key:
                rows.append((*ra, *(rb[i] for i in extra)))
                if len(rows) > limit:
                    return None
    return Space([*a.groups, *(b.groups[i] for i in extra)], rows)


def is_number(v: Any) -> bool:
    return isinstance(v, int | float | PlainNumber) and not isinstance(v, bool)


def decimal(v: Any) -> Decimal:
    """A number as the decimal it is written as (`0.1` is 0.1, not 0.1000000000000000055…),
    so ranges step exactly and names never show 0.30000000000000004."""
    if isinstance(v, PlainNumber):
        v = v.number()
    d = Decimal(repr(v)) if isinstance(v, float) else Decimal(v)
    return d


def decimal_text(d: Decimal) -> str:
    if d == 0:
        return "0"
    text = format(d.normalize(), "f")
    return text


def render(template: str, fields: dict[str, str]) -> str:
    out = []
    for literal, fname, spec, _ in string.Formatter().parse(template):
        out.append(literal)
        if fname is None:
            continue
        value = fields[fname]
        if spec:
            try:
                num = Decimal(value)
                value = format(int(num) if spec.endswith("d") else float(num), spec)
            except (InvalidOperation, ValueError):
                pass  # a name: spelled as is
        out.append(value)
    return "".join(out)


def example(path: str, fields: dict[str, str]) -> str:
    keys = [k for k in fields if "." not in k] or list(fields)
    stem, dot, suffix = path.rpartition(".")
    tail = "-".join("{" + k + "}" for k in keys)
    return f"{stem}-{tail}.{suffix}" if dot and "/" not in suffix else f"{path}-{tail}"
