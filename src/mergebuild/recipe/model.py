"""The resolved recipe: what the graph, cache keys and engine work from."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mergebuild.errors import Location


@dataclass(frozen=True)
class ModelInput:
    name: str
    path: Path | None  # None: found by `sha256` in the search paths
    location: Location | None = None
    sha256: str | None = None  # full hash or a prefix of at least 10 hex digits (AutoV2)
    urls: tuple[str, ...] = ()  # where to download it when not found (fetch/; full sha256)
    hf: str | None = None  # `owner/repo/path@revision` on the Hugging Face hub


@dataclass(frozen=True)
class NodeSpec:
    """A merge step: `method` applied to `inputs` (slot → referenced name, in slot order)."""

    name: str
    method: str
    inputs: dict[str, str]
    params: dict[str, Any]
    dtype: str = "auto"
    cache: bool | None = None  # None: store only if another merge node consumes it
    location: Location | None = None
    expression: str | None = None
    fold: bool = False  # `fold: true`: recipe/fold.py rewrites the node into method `fold`
    folded_from: str | None = None  # after that rewrite: the method the recipe wrote
    cancelled: tuple[str, ...] = ()  # terms of the folded subgraph whose total weight is 0


@dataclass(frozen=True)
class OutputSpec:
    name: str
    source: str
    path: Path
    dtype: str | None = None  # None: keep the source's dtype
    location: Location | None = None
    # layout options in canonical form (sd/output.py): prune, components, include, exclude
    options: dict[str, Any] = field(default_factory=dict)
    vae: str | None = None  # model whose tensors replace first_stage_model.*


@dataclass
class Recipe:
    path: Path
    models: dict[str, ModelInput] = field(default_factory=dict)
    nodes: dict[str, NodeSpec] = field(default_factory=dict)
    outputs: dict[str, OutputSpec] = field(default_factory=dict)
    search_paths: list[Path] = field(default_factory=list)
    # this file and every recipe it includes, transitively: a build must never write over
    # them (nor over their lock files)
    sources: list[Path] = field(default_factory=list)
    # sweeps (recipe/sweep.py): a swept node's or output's name → its members' names
    node_members: dict[str, list[str]] = field(default_factory=dict)
    output_members: dict[str, list[str]] = field(default_factory=dict)
    cache: dict[str, Any] | None = None  # the top `cache:` section: a remote (remote/config.py)

    @property
    def directory(self) -> Path:
        return self.path.parent

    def select_outputs(self, names: list[str] | None) -> list[str] | None:
        """Output names as a user gives them: a swept output's name stands for its members."""
        if names is None:
            return None
        return [m for n in names for m in self.output_members.get(n, [n])]
