"""Where a pinned model can be downloaded from: `urls:` and `hf:`, checked as plain strings.

Pure string checks (no fsspec, no huggingface_hub): the recipe schema uses them, and `-n` or a
cached build must not import network libraries. A recipe is often downloaded, and provenance
(`extract`) is foreign data, so a source is refused unless it is a short single-line URL with
a scheme and no credentials in it: a token written into a recipe would travel with every
shared copy and into every output's provenance.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import PurePosixPath
from urllib.parse import unquote, urlsplit

MAX_URL = 2048
MAX_URLS = 32
URL = re.compile(r"[a-z][a-z0-9+.-]{0,31}://[^\s\x00-\x1f\x7f]+\Z")
HF = re.compile(
    r"(?P<repo>[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95})/(?P<path>[^@\s\x00-\x1f\x7f]+)"
    r"(?:@(?P<rev>[\w.-][\w./-]{0,254}))?\Z"
)
MODEL_SUFFIXES = (".safetensors", ".sft", ".ckpt", ".pt", ".pth", ".bin")


@dataclass(frozen=True)
class HfRef:
    """`owner/repo/path/in/repo@revision` (revision defaults to `main`)."""

    repo: str
    path: str
    revision: str


def url_problem(url: object) -> str | None:
    """Why `url` is not acceptable as a download source (None: it is)."""
    if not isinstance(url, str):
        return "a URL must be a string"
    if len(url) > MAX_URL:
        return f"a URL may have at most {MAX_URL} characters"
    if not URL.match(url):
        return "expected a URL with a scheme (https://…, s3://…, file:///…) on one line"
    parts = urlsplit(url)
    if parts.username is not None or parts.password is not None:
        return (
            "credentials in a URL travel with every copy of the recipe: give them through "
            "the environment (AWS_* variables, HF_TOKEN) instead"
        )
    if parts.scheme in ("http", "https") and not parts.hostname:
        return "an http(s) URL needs a host"
    return None


def parse_hf(spec: str) -> HfRef:
    """The parts of an `hf:` source; ValueError with the reason if it is malformed."""
    m = HF.match(spec) if isinstance(spec, str) and len(spec) <= MAX_URL else None
    if m is None:
        raise ValueError(
            "expected 'owner/repo/path/in/repo@revision' (e.g. 'someone/model/model.safetensors"
            "@main')"
        )
    path = m.group("path")
    if any(p in ("", ".", "..") for p in path.split("/")):
        raise ValueError("the path in the repo may not have empty, '.' or '..' parts")
    return HfRef(m.group("repo"), path, m.group("rev") or "main")


def hf_problem(spec: object) -> str | None:
    try:
        parse_hf(spec)  # type: ignore[arg-type]
    except ValueError as e:
        return str(e)
    return None


def source_suffix(urls: tuple[str, ...], hf: str | None) -> str:
    """The file suffix a downloaded model is stored with (the engine reads by suffix)."""
    names = [urlsplit(u).path for u in urls] + ([parse_hf(hf).path] if hf else [])
    for name in names:
        suffix = PurePosixPath(unquote(name)).suffix.lower()
        if suffix in MODEL_SUFFIXES:
            return suffix
    return ".safetensors"


def describe(urls: tuple[str, ...], hf: str | None) -> str:
    """One short line naming where a model would come from (`-n`, progress)."""
    first = urls[0] if urls else f"hf:{hf}"
    more = len(urls) + (hf is not None) - 1
    return first + (f" (+{more} more)" if more > 0 else "")
