"""The expression shorthand: `anything + (nai_full - nai_sfw) * 0.3`.

Parsed with Python's own parser (`ast`, never `eval`) and folded with exact rational arithmetic
into a linear combination Σ cᵢ·Mᵢ. The combination is then lowered to the canonical method that
computes it (`add_difference`, `weighted_sum`, `copy`, or the general `linear`), so an expression
and the equivalent explicit node get the same cache key and the same bytes.

A coefficient may also be block weights — `preset("TRUE_CUBIC_HERMITE")`, `blocks(...)` — exact
per-block values (`sd.blocks.Weights`) folded with the same arithmetic group by group, so
`a + (b - c) * preset("X")` lowers to add_difference with the same alpha as `alpha: {preset: X}`.
"""

from __future__ import annotations

import ast
import math
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

from mergebuild.sd.blocks import AlphaError, Weights, parse_alpha

MAX_EXPRESSION_CHARS = 4096
FLOAT32_MAX = 3.4028234663852886e38
WEIGHT_FUNCTIONS = ("preset", "blocks")

Coef = Fraction | Weights


def _mul(x: Coef, y: Coef) -> Coef:
    if isinstance(x, Fraction) and isinstance(y, Fraction):
        return x * y
    return _lift(x).combine(_lift(y), lambda p, q: p * q).normalized()


def _add(x: Coef, y: Coef) -> Coef:
    if isinstance(x, Fraction) and isinstance(y, Fraction):
        return x + y
    return _lift(x).combine(_lift(y), lambda p, q: p + q).normalized()


def _lift(x: Coef) -> Weights:
    return Weights.uniform(x) if isinstance(x, Fraction) else x


def _is_zero(x: Coef) -> bool:
    return x == 0 if isinstance(x, Fraction) else False  # Weights are normalized: never uniform


def _all_sign(x: Coef) -> int:
    """1 if every value is ≥ 0, -1 if every value is ≤ 0, else 0."""
    vals = (x,) if isinstance(x, Fraction) else x.values()
    return 1 if all(v >= 0 for v in vals) else -1 if all(v <= 0 for v in vals) else 0


class ExpressionError(Exception):
    def __init__(self, message: str, offset: int = 0) -> None:
        super().__init__(message)
        self.offset = offset  # 0-based character offset in the expression text


@dataclass
class _Lin:
    """Σ terms[name]·name + const, all exact."""

    terms: dict[str, Coef] = field(default_factory=dict)
    const: Coef = Fraction(0)

    @property
    def is_scalar(self) -> bool:
        return all(_is_zero(c) for c in self.terms.values())

    def scaled(self, k: Coef) -> _Lin:
        return _Lin({n: _mul(c, k) for n, c in self.terms.items()}, _mul(self.const, k))

    def plus(self, other: _Lin, sign: int) -> _Lin:
        terms = dict(self.terms)
        s = Fraction(sign)
        for n, c in other.terms.items():
            terms[n] = _add(terms.get(n, Fraction(0)), _mul(c, s))
        return _Lin(terms, _add(self.const, _mul(other.const, s)))


@dataclass(frozen=True)
class Lowered:
    """A method call equivalent to the expression: inputs by slot, plus parameters."""

    method: str
    inputs: dict[str, str]
    params: dict[str, object]
    refs: dict[str, int]  # referenced name → offset of first mention (for error locations)


_OPS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/"}


def parse_expression(text: str) -> tuple[dict[str, Coef], dict[str, int]]:
    """Fold `text` into {name: coefficient} (first-appearance order) and name → offset."""
    if len(text) > MAX_EXPRESSION_CHARS:
        raise ExpressionError(f"expression longer than {MAX_EXPRESSION_CHARS} characters")
    try:
        tree = ast.parse(text.strip() and f"({text})", mode="eval")
    except SyntaxError as e:
        raise ExpressionError(f"invalid expression: {e.msg}", max((e.offset or 2) - 2, 0)) from None
    except (RecursionError, MemoryError):
        raise ExpressionError("expression is nested too deeply") from None
    refs: dict[str, int] = {}
    lines = text.split("\n")

    def offset(node: ast.AST) -> int:
        line, col = getattr(node, "lineno", 1), getattr(node, "col_offset", 1)
        return sum(len(s) + 1 for s in lines[: line - 1]) + col - (1 if line == 1 else 0)

    def fold(node: ast.AST) -> _Lin:
        if isinstance(node, ast.Call):
            return _Lin(const=weights_call(node, offset(node)))
        if isinstance(node, ast.Name | ast.Attribute):
            name = _dotted(node)  # `ns.model`: an output of an included recipe
            if name is None:
                raise ExpressionError("unsupported syntax (attribute)", offset(node))
            refs.setdefault(name, offset(node))
            return _Lin({name: Fraction(1)})
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            seg = ast.get_source_segment(f"({text})", node) or ""
            try:
                value = Fraction(seg.replace("_", ""))
            except (ValueError, ZeroDivisionError):
                value = Fraction(node.value)
            return _Lin(const=value)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.UAdd | ast.USub):
            inner = fold(node.operand)
            return inner if isinstance(node.op, ast.UAdd) else inner.scaled(Fraction(-1))
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            left, right = fold(node.left), fold(node.right)
            if isinstance(node.op, ast.Add):
                return left.plus(right, 1)
            if isinstance(node.op, ast.Sub):
                return left.plus(right, -1)
            if isinstance(node.op, ast.Mult):
                if left.is_scalar:
                    return right.scaled(left.const)
                if right.is_scalar:
                    return left.scaled(right.const)
                raise ExpressionError("cannot multiply two models together", offset(node))
            if not right.is_scalar or not isinstance(right.const, Fraction):
                raise ExpressionError("can only divide by a number", offset(node.right))
            if right.const == 0:
                raise ExpressionError("division by zero", offset(node.right))
            return left.scaled(1 / right.const)
        what = type(getattr(node, "op", node)).__name__
        raise ExpressionError(
            f"unsupported syntax ({what}): use model names, numbers, + - * / and parentheses",
            offset(node),
        )

    try:
        result = fold(tree.body)
    except RecursionError:
        raise ExpressionError("expression is nested too deeply") from None
    except AlphaError as e:
        raise ExpressionError(str(e)) from None
    if not _is_zero(result.const):
        raise ExpressionError("expression adds a bare number to a model; only models can be summed")
    terms = {n: c for n, c in result.terms.items() if not _is_zero(c)}
    if not terms:
        raise ExpressionError("expression has no model terms (everything cancels out)")
    for name, c in terms.items():
        vals = (c,) if isinstance(c, Fraction) else c.values()
        if not all(abs(_as_float(v)) <= FLOAT32_MAX for v in vals):  # merges compute in float32
            raise ExpressionError(f"coefficient of '{name}' is too large", refs[name])
    return terms, refs


def _dotted(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return None if base is None else f"{base}.{node.attr}"
    return None


def weights_call(node: ast.Call, at: int) -> Coef:
    """`preset("NAME", base=V)` or `blocks(v0, …)` / `blocks(IN00=V, default=V, …)`."""
    fname = node.func.id if isinstance(node.func, ast.Name) else None
    if fname not in WEIGHT_FUNCTIONS:
        raise ExpressionError(
            f'unknown function {fname or "(expression)"!r}: only preset("NAME") and '
            "blocks(...) give block weights",
            at,
        )

    def const(v: ast.AST) -> Any:
        if isinstance(v, ast.UnaryOp) and isinstance(v.op, ast.USub):
            inner = const(v.operand)
            if isinstance(inner, int | float):
                return -inner
        if isinstance(v, ast.Constant) and type(v.value) in (int, float, str):
            return v.value
        raise ExpressionError(f"arguments of {fname}() must be numbers or quoted names", at)

    args = [const(a) for a in node.args]
    kwargs = {k.arg: const(k.value) for k in node.keywords if k.arg is not None}
    spec: Any
    if fname == "preset":
        if len(args) != 1 or set(kwargs) - {"base"}:
            raise ExpressionError('use preset("NAME") or preset("NAME", base=V)', at)
        spec = {"preset": args[0], **kwargs}
    elif args and kwargs:
        raise ExpressionError("blocks() takes either 26/20 values or NAME=V pairs, not both", at)
    else:
        spec = args if args else kwargs
    try:
        return parse_alpha(spec)
    except AlphaError as e:
        raise ExpressionError(f"in {fname}(): {e}", at) from None


def _as_float(c: Fraction) -> float:
    try:
        return float(c)
    except OverflowError:
        return math.inf


def _param(c: Coef) -> float | dict[str, Any]:
    return float(c) if isinstance(c, Fraction) else c.to_param()


def lower(text: str) -> Lowered:
    """Parse `text` and pick the canonical method that computes the same combination."""
    terms, refs = parse_expression(text)
    names = list(terms)
    coeffs = [terms[n] for n in names]
    if len(names) == 1 and coeffs[0] == 1:
        return Lowered("copy", {"a": names[0]}, {}, refs)
    if len(names) == 2 and _add(coeffs[0], coeffs[1]) == 1:
        return Lowered(
            "weighted_sum", {"a": names[0], "b": names[1]}, {"alpha": _param(coeffs[1])}, refs
        )
    if len(names) == 3 and 1 in coeffs:
        a = names[coeffs.index(1)]
        rest = [n for n in names if n != a]
        if _is_zero(_add(terms[rest[0]], terms[rest[1]])):
            b, c = sorted(rest, key=lambda n: _all_sign(terms[n]) < 0)
            return Lowered(
                "add_difference", {"a": a, "b": b, "c": c}, {"alpha": _param(terms[b])}, refs
            )
    if not all(isinstance(c, Fraction) for c in coeffs):
        raise ExpressionError(
            "block weights (preset()/blocks()) work only in expressions that reduce to a weighted "
            "sum `a * (1 - w) + b * w` or an add difference `a + (b - c) * w`"
        )
    slots = {f"m{i}": n for i, n in enumerate(names)}
    weights = [float(c) for c in coeffs]
    return Lowered("linear", slots, {"weights": weights}, refs)
