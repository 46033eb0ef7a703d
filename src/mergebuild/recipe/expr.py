"""The expression shorthand: `anything + (nai_full - nai_sfw) * 0.3`.

Parsed with Python's own parser (`ast`, never `eval`) and folded with exact rational arithmetic
into a linear combination Σ cᵢ·Mᵢ. The combination is then lowered to the canonical method that
computes it (`add_difference`, `weighted_sum`, `copy`, or the general `linear`), so an expression
and the equivalent explicit node get the same cache key and the same bytes.
"""

from __future__ import annotations

import ast
import math
from dataclasses import dataclass, field
from fractions import Fraction

MAX_EXPRESSION_CHARS = 4096
FLOAT32_MAX = 3.4028234663852886e38


class ExpressionError(Exception):
    def __init__(self, message: str, offset: int = 0) -> None:
        super().__init__(message)
        self.offset = offset  # 0-based character offset in the expression text


@dataclass
class _Lin:
    """Σ terms[name]·name + const, all exact."""

    terms: dict[str, Fraction] = field(default_factory=dict)
    const: Fraction = Fraction(0)

    @property
    def is_scalar(self) -> bool:
        return not any(self.terms.values())

    def scaled(self, k: Fraction) -> _Lin:
        return _Lin({n: c * k for n, c in self.terms.items()}, self.const * k)

    def plus(self, other: _Lin, sign: int) -> _Lin:
        terms = dict(self.terms)
        for n, c in other.terms.items():
            terms[n] = terms.get(n, Fraction(0)) + sign * c
        return _Lin(terms, self.const + sign * other.const)


@dataclass(frozen=True)
class Lowered:
    """A method call equivalent to the expression: inputs by slot, plus parameters."""

    method: str
    inputs: dict[str, str]
    params: dict[str, object]
    refs: dict[str, int]  # referenced name → offset of first mention (for error locations)


_OPS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/"}


def parse_expression(text: str) -> tuple[dict[str, Fraction], dict[str, int]]:
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
            if not right.is_scalar:
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
    if result.const != 0:
        raise ExpressionError("expression adds a bare number to a model; only models can be summed")
    terms = {n: c for n, c in result.terms.items() if c != 0}
    if not terms:
        raise ExpressionError("expression has no model terms (everything cancels out)")
    for name, c in terms.items():
        if not abs(_as_float(c)) <= FLOAT32_MAX:  # merges compute in float32
            raise ExpressionError(f"coefficient of '{name}' is too large", refs[name])
    return terms, refs


def _dotted(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return None if base is None else f"{base}.{node.attr}"
    return None


def _as_float(c: Fraction) -> float:
    try:
        return float(c)
    except OverflowError:
        return math.inf


def lower(text: str) -> Lowered:
    """Parse `text` and pick the canonical method that computes the same combination."""
    terms, refs = parse_expression(text)
    names = list(terms)
    coeffs = [terms[n] for n in names]
    if len(names) == 1 and coeffs[0] == 1:
        return Lowered("copy", {"a": names[0]}, {}, refs)
    if len(names) == 2 and sum(coeffs) == 1:
        return Lowered(
            "weighted_sum", {"a": names[0], "b": names[1]}, {"alpha": float(coeffs[1])}, refs
        )
    if len(names) == 3 and 1 in coeffs:
        a = names[coeffs.index(1)]
        rest = [n for n in names if n != a]
        if terms[rest[0]] == -terms[rest[1]]:
            b, c = sorted(rest, key=lambda n: terms[n] < 0)
            return Lowered(
                "add_difference", {"a": a, "b": b, "c": c}, {"alpha": float(terms[b])}, refs
            )
    slots = {f"m{i}": n for i, n in enumerate(names)}
    weights = [float(c) for c in coeffs]
    return Lowered("linear", slots, {"weights": weights}, refs)
