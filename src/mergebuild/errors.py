"""Error types the CLI turns into one readable message and an exit code (no traceback)."""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from dataclasses import dataclass

EXIT_BUILD = 1
EXIT_RECIPE = 2


class MergebuildError(Exception):
    """A failure the user can act on; `str()` is the whole message."""

    exit_code = EXIT_BUILD
    json_reported = False  # the command's own --json document already carries this error


class BuildError(MergebuildError):
    """Inputs or environment prevent the build (missing model, corrupt file, disk full...)."""


@dataclass(frozen=True)
class Location:
    file: str
    line: int  # 1-based
    column: int  # 1-based

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.column}"


@dataclass(frozen=True)
class Problem:
    message: str
    location: Location | None = None

    def __str__(self) -> str:
        return f"{self.location}: {self.message}" if self.location else self.message


class RecipeError(MergebuildError):
    """One or more problems in a recipe, each with file:line:column when known."""

    exit_code = EXIT_RECIPE

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


def did_you_mean(name: str, candidates: Iterable[str]) -> str:
    """' — did you mean 'x'?' when a close candidate exists, else ''."""
    close = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return f" — did you mean '{close[0]}'?" if close else ""
