"""YAML loading that remembers where every value came from.

pydantic reports errors by path (`merges.x.alpha`); to print `file:line:col` we keep a map from
such paths to the YAML marks. The walk also refuses duplicate keys (plain YAML silently keeps the
last one) and caps the number of nodes so an alias bomb cannot exhaust memory.
"""

from __future__ import annotations

import re
from typing import Any

import yaml

from mergebuild.errors import Location, Problem, RecipeError

MAX_RECIPE_BYTES = 1 << 20
MAX_NODES = 100_000
PLAIN_TAGS = ("tag:yaml.org,2002:map", "tag:yaml.org,2002:seq")

Path = tuple[str | int, ...]
# numbers with an exponent that YAML 1.1 (PyYAML) leaves as text: 1e-3, 1.5e3, 2E+10
_EXPONENT_NUMBER = re.compile(r"[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9][0-9_]*)[eE][-+]?[0-9]+")


class PlainNumber(str):
    """An unquoted scalar like `1e-3` that PyYAML reads as text but YAML 1.2 (and the user)
    read as a number. It stays text (an AutoV2 pin `12e4567890` is text), and is taken as a
    number only where a number belongs; a quoted "0.5" is plain text and refused there."""

    def number(self) -> float:
        return float(self.replace("_", ""))


class Positions:
    """Path → location of the value, and of the mapping key that introduced it."""

    def __init__(self, file: str) -> None:
        self.file = file
        self.values: dict[Path, Location] = {}
        self.keys: dict[Path, Location] = {}

    def mark(self, mark: yaml.Mark | None) -> Location | None:
        return None if mark is None else Location(self.file, mark.line + 1, mark.column + 1)

    def of(self, path: Path, *, key: bool = False) -> Location | None:
        """Location of `path`, falling back to its nearest known ancestor."""
        table = self.keys if key else self.values
        for n in range(len(path), -1, -1):
            loc = table.get(path[:n]) or self.values.get(path[:n])
            if loc is not None:
                return loc
        return None


def load_yaml(data: bytes, file: str) -> tuple[Any, Positions]:
    """Parse recipe bytes into plain Python data plus `Positions`. Raises `RecipeError`."""
    if len(data) > MAX_RECIPE_BYTES:
        raise RecipeError([Problem(f"{file}: recipe is larger than {MAX_RECIPE_BYTES} bytes")])
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise RecipeError(
            [Problem(f"{file}:{line}: recipe is not valid UTF-8 (byte {e.start})")]
        ) from None
    pos = Positions(file)
    try:
        loader = yaml.SafeLoader(text)  # the reader refuses control characters right here
    except yaml.reader.ReaderError as e:
        line = text[: e.position].count("\n") + 1
        raise RecipeError(
            [Problem(f"{file}:{line}: invalid YAML: control character {e.character!r} in the text")]
        ) from None
    try:
        root = loader.get_single_node()
        if root is None:
            return {}, pos
        return _Walker(loader, pos).walk(root, ()), pos
    except yaml.MarkedYAMLError as e:
        loc = pos.mark(e.problem_mark or e.context_mark)
        msg = f"invalid YAML: {e.problem or e.context}"
        raise RecipeError([Problem(msg, loc)]) from None
    except yaml.YAMLError as e:
        raise RecipeError([Problem(f"{file}: invalid YAML: {e}")]) from None
    except RecursionError:
        raise RecipeError([Problem(f"{file}: recipe is nested too deeply")]) from None
    finally:
        loader.dispose()


class _Walker:
    def __init__(self, loader: yaml.SafeLoader, pos: Positions) -> None:
        self.loader = loader
        self.pos = pos
        self.count = 0

    def walk(self, node: yaml.Node, path: Path) -> Any:
        self.count += 1
        if self.count > MAX_NODES:
            raise RecipeError(
                [
                    Problem(
                        f"recipe expands to more than {MAX_NODES} values (alias bomb?)",
                        self.pos.mark(node.start_mark),
                    )
                ]
            )
        self.pos.values.setdefault(path, self.pos.mark(node.start_mark))
        if not isinstance(node, yaml.ScalarNode) and node.tag not in PLAIN_TAGS:
            # the walk builds plain dicts and lists: a tag would be silently dropped
            raise RecipeError(
                [
                    Problem(
                        f"YAML tag {node.tag!r} is not allowed in a recipe",
                        self.pos.mark(node.start_mark),
                    )
                ]
            )
        if isinstance(node, yaml.MappingNode):
            self.loader.flatten_mapping(node)  # resolves `<<: *anchor` merge keys
            out: dict[str, Any] = {}
            for knode, vnode in node.value:
                if not isinstance(knode, yaml.ScalarNode):
                    raise RecipeError(
                        [
                            Problem(
                                "mapping keys must be plain names", self.pos.mark(knode.start_mark)
                            )
                        ]
                    )
                key = str(knode.value)
                if key in out:
                    first = self.pos.keys[(*path, key)]
                    raise RecipeError(
                        [
                            Problem(
                                f"duplicate name '{key}' (first defined at line {first.line})",
                                self.pos.mark(knode.start_mark),
                            )
                        ]
                    )
                self.pos.keys[(*path, key)] = self.pos.mark(knode.start_mark)
                out[key] = self.walk(vnode, (*path, key))
            return out
        if isinstance(node, yaml.SequenceNode):
            return [self.walk(v, (*path, i)) for i, v in enumerate(node.value)]
        try:
            value = self.loader.construct_object(node, deep=True)
        except (ValueError, OverflowError) as e:  # e.g. a 5000-digit integer, 2001-02-30
            why = "number has too many digits" if "digits" in str(e) else str(e)
            raise RecipeError(
                [Problem(f"cannot read this value: {why}", self.pos.mark(node.start_mark))]
            ) from None
        if isinstance(node, yaml.ScalarNode) and node.style in ("'", '"'):
            self.pos.values[(*path, "__quoted__")] = self.pos.mark(node.start_mark)
        elif type(value) is str and _EXPONENT_NUMBER.fullmatch(value):
            value = PlainNumber(value)
        return value
