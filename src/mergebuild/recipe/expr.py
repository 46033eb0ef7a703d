"""The expression shorthand: `anything + (nai_full - nai_sfw) * 0.3`.

Parsed with Python's own parser (`ast`, never `eval`) and folded with exact rational arithmetic
into a linear combination Σ cᵢ·Mᵢ. The combination is then lowered to the canonical method that
computes it (`add_difference`, `weighted_sum`, `copy`, or the general `linear`), so an expression
and the equivalent explicit node get the same cache key and the same bytes.

A coefficient may also be block weights — `preset("TRUE_CUBIC_HERMITE")`, `blocks(...)` — exact
per-block values (`sd.blocks.Weights`) folded with the same arithmetic group by group, so
`a + (b - c) * preset("X")` lowers to add_difference with the same alpha as `alpha: {preset: X}`.

A merge method may be called like a function: `slerp(a, b, 0.3)`, `ties(base=sd15,
models=[a, b], k=0.2)`. Positional arguments fill the method's inputs, then its parameters in
declared order; keywords go by name. A call that is the whole expression is the node itself;
a call used as a term (`slerp(a, b, 0.3) * 0.5 + c * 0.5`), or an input that is itself an
expression, becomes an anonymous node `<parent>/<n>` (numbered in order of appearance) in
the explicit form, so it gets the same cache key as the same node written out by hand.
"""

from __future__ import annotations

import ast
import math
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

from mergebuild.recipe.yamlpos import PlainNumber
from mergebuild.sd.blocks import AlphaError, Weights, parse_alpha

MAX_EXPRESSION_CHARS = 4096
FLOAT32_MAX = 3.4028234663852886e38
WEIGHT_FUNCTIONS = ("preset", "blocks")
LORA_FUNCTION = "lora"  # lora(NAME, strength): a LoRA baked into the rest of the expression
LORA_TAG = "\0lora:"  # marks a LoRA's term while folding; never a recipe name

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
    call: Call | None = None  # the expression is one method call: this node, explicit form
    subnodes: tuple[Call, ...] = ()  # anonymous nodes the expression needs, inputs first


@dataclass(frozen=True)
class Call:
    """A node in the recipe's explicit form (`{a: x, b: y, alpha: 0.3}` or `{base: …,
    models: [..], …}`), validated by the loader like one written by hand."""

    name: str
    method: str
    raw: dict[str, Any]
    offset: int


_OPS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/"}


def parse_expression(
    text: str, calls: _Calls | None = None
) -> tuple[dict[str, Coef], dict[str, int]]:
    """Fold `text` into {name: coefficient} (first-appearance order) and name → offset.

    With `calls`, merge methods called in the expression become anonymous nodes there.
    """
    tree = _parse(text)
    refs: dict[str, int] = {}
    folder = _Folder(text, refs, calls)
    try:
        result = folder.fold(tree.body)
    except RecursionError:
        raise ExpressionError("expression is nested too deeply") from None
    except AlphaError as e:
        raise ExpressionError(str(e)) from None
    return _terms(result, refs), refs


def _parse(text: str) -> ast.Expression:
    if len(text) > MAX_EXPRESSION_CHARS:
        raise ExpressionError(f"expression longer than {MAX_EXPRESSION_CHARS} characters")
    try:
        return ast.parse(text.strip() and f"({text})", mode="eval")
    except SyntaxError as e:
        raise ExpressionError(f"invalid expression: {e.msg}", max((e.offset or 2) - 2, 0)) from None
    except (RecursionError, MemoryError):
        raise ExpressionError("expression is nested too deeply") from None


def _terms(result: _Lin, refs: dict[str, int]) -> dict[str, Coef]:
    """The model terms of a folded expression, refusing what no merge can compute."""
    if not _is_zero(result.const):
        raise ExpressionError("expression adds a bare number to a model; only models can be summed")
    terms = {n: c for n, c in result.terms.items() if not _is_zero(c)}
    if not terms:
        raise ExpressionError("expression has no model terms (everything cancels out)")
    for name, c in terms.items():
        vals = (c,) if isinstance(c, Fraction) else c.values()
        if not all(abs(_as_float(v)) <= FLOAT32_MAX for v in vals):  # merges compute in float32
            raise ExpressionError(f"coefficient of '{name}' is too large", refs.get(name, 0))
    return terms


class _Folder:
    """Folds an expression's syntax tree into a linear combination, exactly."""

    def __init__(
        self,
        text: str,
        refs: dict[str, int],
        calls: _Calls | None,
        bind: dict[str, Any] | None = None,
        rename: dict[str, str] | None = None,
    ) -> None:
        self.text, self.refs, self.calls = text, refs, calls
        self.bind = bind or {}  # a sweep member's values of the expression's free names
        self.rename = rename or {}  # swept node → this member's member of it
        self.lines = text.split("\n")
        if calls is not None:
            calls.folder = self

    def offset(self, node: ast.AST) -> int:
        line, col = getattr(node, "lineno", 1), getattr(node, "col_offset", 1)
        return sum(len(s) + 1 for s in self.lines[: line - 1]) + col - (1 if line == 1 else 0)

    def fold(self, node: ast.AST) -> _Lin:
        fold, offset, text, refs = self.fold, self.offset, self.text, self.refs
        if isinstance(node, ast.Call):
            if self.calls is not None and method_called(node) is not None:
                return _Lin({self.calls.add(node): Fraction(1)})
            if isinstance(node.func, ast.Name) and node.func.id == LORA_FUNCTION:
                return self.lora(node)
            return _Lin(const=weights_call(node, offset(node)))
        if isinstance(node, ast.Name | ast.Attribute):
            name = _dotted(node)  # `ns.model`: an output of an included recipe
            if name is None:
                raise ExpressionError("unsupported syntax (attribute)", offset(node))
            if name in self.bind:
                return _Lin(const=self.bound(name, offset(node)))
            name = self.rename.get(name, name)
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

    def bound(self, name: str, at: int) -> Coef:
        """A swept value as a coefficient: exactly the number written (as `* 0.25` would be),
        or block weights."""
        v = self.bind[name]
        if isinstance(v, bool) or not isinstance(v, int | float | str | dict | list):
            raise ExpressionError(f"'{name}' is swept over {v!r}: a number or block weights", at)
        if isinstance(v, int):
            return Fraction(v)
        if isinstance(v, float):
            if not math.isfinite(v):
                raise ExpressionError(f"'{name}' is swept over {v!r}: a finite number", at)
            return Fraction(repr(v))
        if isinstance(v, PlainNumber):  # `1e-3`: a number YAML 1.1 left as text
            return Fraction(v.replace("_", ""))
        if isinstance(v, str):
            what = f"'{name}' is swept over the text {v!r}"
            raise ExpressionError(f"{what}: a number or block weights", at)
        try:
            return parse_alpha(v)
        except AlphaError as e:
            raise ExpressionError(f"'{name}' is swept over block weights: {e}", at) from None

    def lora(self, node: ast.Call) -> _Lin:
        """`lora(NAME)`, `lora(NAME, 0.6)`, `lora(NAME, preset("GRAD_V"))`: NAME's term, tagged
        as a LoRA, with the strength as its coefficient."""
        at = self.offset(node)
        usage = 'use lora(NAME, strength), e.g. lora(detail, 0.6) or lora(detail, preset("GRAD_V"))'
        args = list(node.args) + [k.value for k in node.keywords if k.arg == "strength"]
        if not 1 <= len(args) <= 2 or any(k.arg != "strength" for k in node.keywords):
            raise ExpressionError(usage, at)
        name = _dotted(args[0])
        if name is None:
            raise ExpressionError(f"the first argument of lora() is a model name; {usage}", at)
        name = self.rename.get(name, name)
        self.refs.setdefault(name, self.offset(args[0]))
        strength: Coef = Fraction(1)
        if len(args) == 2:
            k = self.fold(args[1])
            if not k.is_scalar:
                raise ExpressionError(f"the strength of lora() is a number; {usage}", at)
            strength = k.const
        return _Lin({LORA_TAG + name: strength})


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
            f"unknown function {fname or '(expression)'!r}: call a merge method (see "
            '`mergebuild methods`), or preset("NAME") / blocks(...) for block weights',
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


def lower(
    text: str,
    parent: str = "",
    bind: dict[str, Any] | None = None,
    rename: dict[str, str] | None = None,
) -> Lowered:
    """Parse `text` and pick the canonical method that computes the same combination.

    Merge methods called in `text` become nodes named `parent` (a call that is the whole
    expression) or `parent/1`, `parent/2`… (calls used as terms or inputs). A sweep member
    gives `bind` (its values of the expression's free names) and `rename` (node → member).
    """
    calls = _Calls(parent)
    tree = _parse(text)
    refs: dict[str, int] = {}
    folder = _Folder(text, refs, calls, bind, rename)
    try:
        if isinstance(tree.body, ast.Call) and method_called(tree.body) is not None:
            calls.add(tree.body, top=True)
            top = calls.nodes.pop(parent)
            return Lowered(top.method, {}, {}, refs, top, tuple(calls.nodes.values()))
        result = folder.fold(tree.body)
    except RecursionError:
        raise ExpressionError("expression is nested too deeply") from None
    except AlphaError as e:
        raise ExpressionError(str(e)) from None
    terms = _terms(result, refs)
    if any(n.startswith(LORA_TAG) for n in terms):
        call = _bake(terms, refs, calls, parent)
        return Lowered(call.method, {}, {}, refs, call, tuple(calls.nodes.values()))
    if any(n.startswith(LORA_TAG) for n in result.terms):
        raise ExpressionError("lora() terms cancel out: nothing is baked")
    low = _pick(terms, refs)
    return Lowered(low.method, low.inputs, low.params, refs, None, tuple(calls.nodes.values()))


def _bake(terms: dict[str, Coef], refs: dict[str, int], calls: _Calls, parent: str) -> Call:
    """`model + lora(x, s) + …` as the explicit bake_lora node; the model part may itself be
    an expression (then an anonymous node `parent/N`)."""
    loras = {n.removeprefix(LORA_TAG): c for n, c in terms.items() if n.startswith(LORA_TAG)}
    rest = {n: c for n, c in terms.items() if not n.startswith(LORA_TAG)}
    first = min(refs[n] for n in loras)
    if not rest:
        raise ExpressionError(
            "lora() is baked into a model: write `model + lora(NAME, 0.6)`", first
        )
    if len(rest) == 1 and next(iter(rest.values())) == 1:
        base = next(iter(rest))
    else:
        low = _pick(rest, refs)
        base = calls._name()
        if low.method == "linear":
            raw: dict[str, Any] = {"models": list(low.inputs.values()), **low.params}
        else:
            raw = {**low.inputs, **low.params}
        calls.nodes[base] = Call(base, low.method, raw, min(refs[n] for n in rest))
    values = [_param(c) for c in loras.values()]
    strength = values[0] if all(v == values[0] for v in values) else values
    raw = {"a": base, "loras": list(loras), "strength": strength}
    return Call(parent, "bake_lora", raw, first)


def _pick(terms: dict[str, Coef], refs: dict[str, int]) -> Lowered:
    """The canonical method computing Σ terms[n]·n."""
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


def method_called(node: ast.Call) -> str | None:
    """The merge method a call names (`slerp(…)`), or None (preset()/blocks(), or unknown)."""
    from mergebuild.engine.methods import REGISTRY

    name = node.func.id if isinstance(node.func, ast.Name) else None
    return name if name in REGISTRY and name not in WEIGHT_FUNCTIONS else None


class _Calls:
    """Method calls met while folding, as explicit-form nodes under deterministic names."""

    def __init__(self, parent: str) -> None:
        self.parent = parent
        self.nodes: dict[str, Call] = {}  # in creation order: inputs before their consumers
        self.count = 0
        self.folder: _Folder | None = None

    def _name(self) -> str:
        self.count += 1
        return f"{self.parent}/{self.count}"

    def add(self, node: ast.Call, top: bool = False) -> str:
        """Register the call `node`; return the node name standing for its value."""
        from mergebuild.engine.methods import REGISTRY

        assert self.folder is not None
        at = self.folder.offset(node)
        fname = method_called(node)
        assert fname is not None
        method = REGISTRY[fname]
        name = self.parent if top else self._name()
        inputs = method.input_names()
        params = method.param_order()
        sig = method.signature()
        raw: dict[str, Any] = {}
        if len(node.args) > len(inputs) + len(params):
            raise ExpressionError(f"too many arguments for {sig}", at)
        for i, arg in enumerate(node.args):
            if isinstance(arg, ast.Starred):
                raise ExpressionError(f"*arguments are not supported in {fname}()", at)
            field = inputs[i] if i < len(inputs) else params[i - len(inputs)]
            raw[field] = self._arg(field, arg, field in inputs)
        for kw in node.keywords:
            if kw.arg is None:
                raise ExpressionError(f"**arguments are not supported in {fname}()", at)
            many = method.models_name if method.inputs_form != "slots" else "models"
            field = many if kw.arg == "inputs" and method.inputs_form != "slots" else kw.arg
            if field in raw:
                raise ExpressionError(f"{fname}() got '{kw.arg}' twice; signature: {sig}", at)
            raw[field] = self._arg(field, kw.value, field in inputs)
        self.nodes[name] = Call(name, fname, raw, at)
        return name

    def _arg(self, field: str, arg: ast.AST, is_input: bool) -> Any:
        if not is_input:
            return self._value(arg)
        if field in ("models", "loras"):
            if not isinstance(arg, ast.List | ast.Tuple):
                raise ExpressionError(f"{field}= takes a list: [a, b, …]", self._at(arg))
            return [self._input(e) for e in arg.elts]
        return self._input(arg)

    def _at(self, node: ast.AST) -> int:
        assert self.folder is not None
        return self.folder.offset(node)

    def _input(self, arg: ast.AST) -> str:
        """A model/node name; any other expression becomes an anonymous node first."""
        assert self.folder is not None
        lin = self.folder.fold(arg)
        terms = _terms(lin, self.folder.refs)
        if any(n.startswith(LORA_TAG) for n in terms):
            name = self._name()
            self.nodes[name] = _bake(terms, self.folder.refs, self, name)
            return name
        if len(terms) == 1 and next(iter(terms.values())) == 1:
            return next(iter(terms))
        low = _pick(terms, self.folder.refs)
        name = self._name()
        if low.method == "linear":
            raw: dict[str, Any] = {"models": list(low.inputs.values()), **low.params}
        else:
            raw = {**low.inputs, **low.params}
        self.nodes[name] = Call(name, low.method, raw, self._at(arg))
        return name

    def _value(self, v: ast.AST) -> Any:
        """A parameter: a number, a quoted string, true/false, a list, or preset()/blocks()
        (or a swept name: its value, as the explicit form would get it)."""
        assert self.folder is not None
        if isinstance(v, ast.Name) and v.id in self.folder.bind:
            return self.folder.bind[v.id]
        if isinstance(v, ast.UnaryOp) and isinstance(v.op, ast.USub | ast.UAdd):
            inner = self._value(v.operand)
            if type(inner) in (int, float):
                return -inner if isinstance(v.op, ast.USub) else inner
        elif isinstance(v, ast.Constant) and type(v.value) in (int, float, str, bool):
            return v.value
        elif isinstance(v, ast.List | ast.Tuple):
            return [self._value(e) for e in v.elts]
        elif isinstance(v, ast.Call) and not method_called(v):
            return _param(weights_call(v, self._at(v)))
        raise ExpressionError(
            "a parameter is a number, a quoted string, True/False, a list of those, "
            "or preset()/blocks()",
            self._at(v),
        )
