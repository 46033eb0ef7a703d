"""pydantic models of the recipe file, and translation of their errors into located problems."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)

from mergebuild.errors import Problem, did_you_mean
from mergebuild.fetch.sources import MAX_URLS, hf_problem, url_problem
from mergebuild.recipe.yamlpos import Path, Positions

RECIPE_VERSION = 1

DTYPE_ALIASES = {
    "fp16": "fp16", "float16": "fp16", "half": "fp16",
    "bf16": "bf16", "bfloat16": "bf16",
    "fp32": "fp32", "float32": "fp32", "float": "fp32",
    "fp8_e4m3fn": "fp8_e4m3fn", "float8_e4m3fn": "fp8_e4m3fn", "fp8": "fp8_e4m3fn",
    "fp8_e5m2": "fp8_e5m2", "float8_e5m2": "fp8_e5m2",
    "fp8_e4m3fn_scaled": "fp8_e4m3fn_scaled",
}  # fmt: skip

Name = Annotated[str, StringConstraints(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")]
# `ns.name`: how included recipes' names appear; allowed so an extracted recipe keeps them
DottedName = Annotated[
    str, StringConstraints(pattern=r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
]


# a merge's name, or a sweep member's: `nsfw[alpha=0.25]` (only recipe/sweep.py makes those;
# it refuses brackets in names written by hand)
NodeName = Annotated[
    str,
    StringConstraints(
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*(\[[^\[\]\n]*\])?$"
    ),
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, populate_by_name=True)


Sha256 = Annotated[
    str, StringConstraints(pattern=r"^[0-9a-fA-F]{10,64}$", to_lower=True, strip_whitespace=True)
]


class ModelEntry(_Strict):
    """A file by path, by content (full SHA-256 or its 10-hex AutoV2 prefix), or both; `urls`
    and `hf` say where to download it when it is not found (fetch/: the full hash verifies it)."""

    path: str | None = Field(default=None, min_length=1)
    sha256: Sha256 | None = None
    urls: list[str] | None = Field(default=None, min_length=1, max_length=MAX_URLS)
    hf: str | None = None

    @field_validator("urls")
    @classmethod
    def _urls(cls, value: list[str] | None) -> list[str] | None:
        for i, url in enumerate(value or []):
            if (why := url_problem(url)) is not None:
                raise ValueError(f"URL {i + 1}: {why}")
        return value

    @field_validator("hf")
    @classmethod
    def _hf(cls, value: str | None) -> str | None:
        if value is not None and (why := hf_problem(value)) is not None:
            raise ValueError(why)
        return value

    @model_validator(mode="after")
    def _path_or_hash(self) -> ModelEntry:
        if self.path is None and self.sha256 is None:
            raise ValueError("give 'path', 'sha256' (or its 10-hex AutoV2 prefix), or both")
        if (self.urls or self.hf) and (self.sha256 is None or len(self.sha256) != 64):
            raise ValueError(
                "'urls' and 'hf' need the full 'sha256' (64 hex digits) to verify the "
                "download; a 10-hex AutoV2 prefix is not enough"
            )
        return self


class MergeEntry(_Strict):
    """Fields every explicit merge node may have; slot names and method params come on top."""

    model_config = ConfigDict(extra="allow")
    method: str | None = None
    expr: str | None = None
    inputs: list[str] | None = None
    models: list[str] | None = None  # `inputs:` of variadic methods, the models of base_models
    base: str | None = None  # base_models methods: the model the task vectors are taken from
    dtype: str = "auto"
    cache: StrictBool | None = None  # not 1, "yes" or "false": YAML true/false only
    fold: StrictBool = False  # a linear node: evaluate its linear subgraph as one Σ (fold.py)


class OutputEntry(_Strict):
    source: str = Field(alias="from", min_length=1)
    path: str = Field(min_length=1)
    dtype: str | None = None
    prune: StrictBool = False  # drop model_ema.*
    components: (
        list[
            Literal["unet", "diffuser", "text_encoder", "clip_l", "clip_g", "t5xxl", "vae", "other"]
        ]
        | None
    ) = None
    include: list[str] | None = None  # regexes: keep only matching keys
    exclude: list[str] | None = None  # regexes: drop matching keys
    vae: str | None = None  # a model whose tensors replace first_stage_model.*


class CacheEntry(_Strict):
    """`cache:` at the top: a remote cache to pull from and push to (remote/)."""

    remote: str | None = Field(default=None, min_length=1)  # any fsspec URL or a directory
    push: StrictBool = False
    remote_options: dict[str, Any] = Field(default_factory=dict)  # e.g. s3fs endpoint_url


class RecipeFile(_Strict):
    mergebuild: Literal[1]
    search_paths: list[str] = Field(default_factory=list)
    include: dict[Name, str] = Field(default_factory=dict)
    models: dict[DottedName, str | ModelEntry] = Field(default_factory=dict)
    merges: dict[NodeName, Any] = Field(default_factory=dict)
    outputs: dict[str, OutputEntry]
    cache: CacheEntry | None = None

    @field_validator("mergebuild", mode="before")
    @classmethod
    def _version_is_a_number(cls, value: Any) -> Any:
        if isinstance(value, bool) or not isinstance(value, int):  # `true` == 1 in Python
            raise ValueError(f"unsupported recipe version {value!r}")
        return value


FIELD_NAMES = {
    (): ["mergebuild", "search_paths", "include", "models", "merges", "outputs", "cache"],
    "cache": ["remote", "push", "remote_options"],
    "output": ["from", "path", "dtype", "prune", "components", "include", "exclude", "vae"],
    "model": ["path", "sha256", "urls", "hf"],
}


def problems_from(err: ValidationError, prefix: Path, pos: Positions, what: str = "") -> list:
    """Turn pydantic errors into messages that name the field and point at its YAML line."""
    out: list[Problem] = []
    for e in err.errors():
        if any("BlockAlpha" in str(x) for x in e["loc"]):
            continue  # the canonical block-weight branch of `float | BlockAlpha`: noise to users
        loc = tuple(
            x
            for x in e["loc"]
            if x not in ("str", "ModelEntry", "float", "constrained-float")
            and not str(x).startswith("function-after[")  # a model validator's own step
        )
        path = (*prefix, *loc)
        name = ".".join(str(x) for x in path) or "recipe"
        kind = e["type"]
        if kind == "extra_forbidden":
            field = str(loc[-1])
            choices = _choices_for(path[:-1])
            out.append(
                Problem(
                    f"unknown field '{field}' in {_where(path[:-1], what)}"
                    f"{did_you_mean(field, choices)}",
                    pos.of(path, key=True),
                )
            )
        elif kind == "missing":
            field = str(loc[-1])
            noun = "parameter" if what else "field"
            out.append(
                Problem(
                    f"{_where(path[:-1], what)} is missing required {noun} '{field}'",
                    pos.of(path[:-1], key=True),
                )
            )
        elif kind == "literal_error" and path == ("mergebuild",):
            out.append(
                Problem(
                    f"unsupported recipe version {e.get('input')!r}: this mergebuild reads "
                    f"'mergebuild: {RECIPE_VERSION}'",
                    pos.of(path),
                )
            )
        elif kind == "string_pattern_mismatch" and path[-1] == "[key]":
            path = path[:-1]
            bad = str(path[1])
            fixed = "".join(c if c.isalnum() or c == "_" else "_" for c in bad)
            out.append(
                Problem(
                    f"name '{bad}' can't be used in expressions: use letters, digits and _ "
                    f"(e.g. '{fixed}')",
                    pos.of(path, key=True),
                )
            )
        elif kind == "value_error" and path[:1] == ("models",):  # ours: keep URL, HF_TOKEN…
            where = f"'{path[-1]}' of " if len(path) > 2 else ""
            why = e["msg"].removeprefix("Value error, ")
            out.append(Problem(f"{where}{_where(path[:2], '')}: {why}", pos.of(path)))
        else:
            got = e.get("input")
            got_s = "" if isinstance(got, dict | list) else f" (got {got!r})"
            subject = f"'{path[-1]}' of {_where(path[:-1], '')}" if len(path) > 2 else name
            if len(path) > 3 and isinstance(path[-1], int):  # an item of a list field
                subject = f"item {path[-1] + 1} of '{path[-2]}' of {_where(path[:-2], '')}"
            out.append(Problem(f"{subject}: {e['msg'].lower()}{got_s}", pos.of(path)))
    return out


def _where(path: Path, what: str) -> str:
    if not path:
        return "the recipe"
    if len(path) >= 2 and path[0] in ("merges", "outputs", "models"):
        kind = {"merges": "merge", "outputs": "output", "models": "model"}[str(path[0])]
        return f"{kind} '{path[1]}'{what}"
    return ".".join(str(x) for x in path)


def _choices_for(path: Path) -> list[str]:
    if not path:
        return FIELD_NAMES[()]
    if path[0] == "outputs":
        return FIELD_NAMES["output"]
    if path[0] == "models":
        return FIELD_NAMES["model"]
    if path[0] == "cache":
        return FIELD_NAMES["cache"]
    return []
