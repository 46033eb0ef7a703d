"""A byte stream of a remote file from an offset: what resuming a download needs.

http(s) goes through urllib (in the standard library; a `Range` request, and the answer's
status and Content-Range say whether the server continued where asked or sent the whole file);
every other scheme (s3://, file://, gs://…) through fsspec, which seeks. `hf:` sources become
the hub's `resolve` URL through huggingface_hub, so `HF_ENDPOINT` and `HF_TOKEN` work as with
its own tools; the token is sent to the hub only, never along a redirect to a CDN. fsspec and
huggingface_hub are imported only here, only when a download happens.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any, BinaryIO
from urllib.parse import unquote, urlsplit

from mergebuild import __version__

TIMEOUT_VAR = "MERGEBUILD_FETCH_TIMEOUT"
CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)\Z")


class FetchError(Exception):
    """A source failed (unreachable, refused, cut off); the next source may still work."""


class RangeRefused(FetchError):
    """416: the partial file is not a prefix the server can continue (it is as long as the
    whole file, or longer): start again from byte 0."""


@dataclass
class Opened:
    stream: Any  # .read(n) -> bytes, .close()
    start: int  # the offset of the stream's first byte (0 when the server ignored the Range)
    total: int | None  # the whole file's size, when the source says


def timeout() -> float:
    try:
        return max(0.1, float(os.environ.get(TIMEOUT_VAR, "30")))
    except ValueError:
        return 30.0


def open_source(source: str, offset: int) -> Opened:
    """`source` (a URL, or `hf:owner/repo/path@rev`) opened at `offset`."""
    if source.startswith("hf:"):
        url, auth = hf_url(source[3:])
        return open_http(url, offset, auth)
    scheme = source.split("://", 1)[0].lower()
    if scheme in ("http", "https"):
        return open_http(source, offset, {})
    return open_fsspec(source, offset)


def hf_url(spec: str) -> tuple[str, dict[str, str]]:
    """The hub's download URL for `owner/repo/path@rev`, and its auth header (if a token)."""
    from mergebuild.fetch.sources import parse_hf

    try:
        from huggingface_hub import constants, get_token, hf_hub_url
    except ImportError:
        raise FetchError(
            "hf: sources need huggingface_hub: pip install 'mergebuild[remote]'"
        ) from None
    ref = parse_hf(spec)
    endpoint = os.environ.get("HF_ENDPOINT") or None  # read now: the module reads it at import
    url = hf_hub_url(ref.repo, ref.path, revision=ref.revision, endpoint=endpoint)
    # not build_hf_headers(): its user agent asks the endpoint for an "agent" registry first
    token = None if constants.HF_HUB_DISABLE_IMPLICIT_TOKEN else get_token()
    return url, ({"Authorization": f"Bearer {token}"} if token else {})


def open_http(url: str, offset: int, auth: dict[str, str]) -> Opened:
    headers = {"User-Agent": f"mergebuild/{__version__}", "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    req = urllib.request.Request(url, headers=headers)
    for k, v in auth.items():
        req.add_unredirected_header(k, v)  # urllib copies other headers along redirects
    try:
        resp = urllib.request.urlopen(req, timeout=timeout())
    except urllib.error.HTTPError as e:
        e.close()
        if e.code == 416 and offset:
            raise RangeRefused(f"HTTP 416 for a download from byte {offset:,}") from None
        raise FetchError(f"HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", None) or e
        raise FetchError(f"cannot connect: {reason}") from None
    length = resp.headers.get("Content-Length")
    size = int(length) if length and length.isdigit() else None
    if resp.status == 206:
        m = CONTENT_RANGE.match(resp.headers.get("Content-Range", "").strip())
        if m is None or int(m.group(1)) != offset:
            resp.close()
            raise FetchError(f"the server answered a range request from byte {offset:,} wrongly")
        total = int(m.group(3)) if m.group(3) != "*" else None
        return Opened(resp, offset, total)
    if resp.status != 200:
        resp.close()
        raise FetchError(f"HTTP {resp.status} {resp.reason}")
    return Opened(resp, 0, size)


def open_fsspec(url: str, offset: int) -> Opened:
    try:
        import fsspec
    except ImportError:
        raise FetchError(
            f"{url.split('://', 1)[0]}:// URLs need fsspec: pip install 'mergebuild[remote]'"
        ) from None
    try:
        if url.lower().startswith("file://"):  # fsspec keeps %20 as is; a URL means a space
            fs, path = fsspec.filesystem("file"), unquote(urlsplit(url).path)
        else:
            fs, path = fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as e:  # an unknown protocol, or its package is missing
        raise FetchError(f"cannot open this kind of URL: {e}") from None
    if "file" in fs.protocol or "local" in fs.protocol:
        _check_local(path)
    try:
        size = fs.size(path)
        f: BinaryIO = fs.open(path, "rb")
        with contextlib.suppress(AttributeError, ValueError):
            f.seek(offset)
        start = f.tell() if hasattr(f, "tell") else 0
    except FileNotFoundError:
        raise FetchError("not found") from None
    except Exception as e:  # each backend raises its own types (botocore, aiohttp…)
        raise FetchError(f"{type(e).__name__}: {e}") from None
    return Opened(f, start, int(size) if size is not None else None)


def _check_local(path: str) -> None:
    """A file:// source in a downloaded recipe must not be a device (/dev/zero never ends, a
    FIFO blocks) nor something on /proc or /sys."""
    from mergebuild.locate import virtual_fs

    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise FetchError("not found") from None
    except OSError as e:
        raise FetchError(e.strerror or str(e)) from None
    if not stat.S_ISREG(st.st_mode) or virtual_fs(path):
        raise FetchError("not a regular file")
