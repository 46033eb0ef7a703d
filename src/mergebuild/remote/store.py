"""`RemoteCache`: objects and sidecars under a URL, laid out like the local `objects/`.

  <url>/objects/ab/<key>.safetensors   the object's bytes
  <url>/objects/ab/<key>.json          its sidecar (size, xxh3 checksum), written LAST

The sidecar's presence marks an entry complete: a reader ignores an object without one, so an
upload killed half-way is invisible. Object stores never show a PUT (or a multipart upload)
before it completes; on a filesystem remote every file goes to a temp name and is renamed.
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mergebuild.cacheroot import KEY
from mergebuild.textfile import JSON_CAP, TextFileError, read_capped

if TYPE_CHECKING:
    from mergebuild.remote.ranged import RangedGet

SIGNED_FOR, RESIGN_AFTER = 3600, 3000  # seconds a download's presigned URL is valid / used

# An s3 remote that is down must cost seconds, not botocore's minutes of retries
S3_DEFAULTS: dict[str, Any] = {
    "config_kwargs": {
        "connect_timeout": 5,
        "read_timeout": 60,
        "retries": {"max_attempts": 1, "mode": "standard"},
    },
}
S3_RETRIES = 3  # s3fs's own tries, with 0.1 s, 0.17 s, ... between them


class RemoteUnavailable(Exception):
    """The remote cannot be used at all (down, refused credentials, no such bucket)."""


class RemoteEntryBad(Exception):
    """One remote entry is unusable (corrupt, truncated, unreadable sidecar)."""


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


class RemoteCache:
    """Entries under one fsspec URL; `options` go to the filesystem (s3fs: endpoint_url,
    key, secret, ...)."""

    def __init__(self, url: str, options: dict[str, Any] | None = None) -> None:
        self.url = url
        self.options = dict(options or {})
        self._fs: Any = None
        self.root = ""
        # key → (when its URL was signed, its reader)
        self._ranged_gets: dict[str, tuple[float, RangedGet | None]] = {}
        self._ranged_lock = threading.Lock()

    # -- the filesystem ----------------------------------------------------------------

    @property
    def fs(self) -> Any:
        """The fsspec filesystem, made on first use (imports fsspec / s3fs only then)."""
        if self._fs is None:
            try:
                from fsspec.core import url_to_fs
            except ImportError:
                raise RemoteUnavailable(
                    "fsspec is not installed (pip install 'mergebuild[remote]')"
                ) from None
            url = self.url if "://" in self.url else os.path.abspath(self.url)
            options = dict(self.options)
            s3 = url.startswith(("s3://", "s3a://"))
            if s3:
                for k, v in S3_DEFAULTS.items():
                    options.setdefault(k, v)
            try:
                self._fs, root = url_to_fs(url, **options)
            except ImportError as e:
                raise RemoteUnavailable(f"{_short(e)} (pip install 'mergebuild[remote]')") from None
            except Exception as e:
                raise RemoteUnavailable(_short(e)) from None
            self.root = root.rstrip("/")
            if s3:
                self._fs.retries = S3_RETRIES
        return self._fs

    @property
    def local(self) -> bool:
        """A plain directory (or file://): writes need temp names and renames."""
        return "file" in _protocols(self.fs)

    @property
    def http(self) -> bool:
        return bool({"http", "https"} & _protocols(self.fs))

    def probe(self, create: bool = False) -> None:
        """Raise RemoteUnavailable unless the remote answers and its bucket or directory
        exists (`create`: a missing directory remote is made, as a push needs it)."""
        fs = self.fs
        try:
            if self.http:
                return  # read-only, no listing: each lookup's own answer tells
            if self.local:
                if not fs.isdir(self.root):
                    if not create:
                        raise RemoteUnavailable(f"no directory {self.root}")
                    try:  # its parent must exist: a mistyped share is not made on local disk
                        os.mkdir(self.root)
                    except FileExistsError:
                        if not os.path.isdir(self.root):
                            raise RemoteUnavailable(f"{self.root} is not a directory") from None
                    except OSError as e:
                        raise RemoteUnavailable(
                            f"no directory {self.root} ({e.strerror})"
                        ) from None
                return
            bucket = self.root.split("/", 1)[0]
            fs.ls(bucket, detail=False, refresh=True)  # s3: missing bucket, credentials, down
        except RemoteUnavailable:
            raise
        except FileNotFoundError:
            bucket = self.root.split("/", 1)[0]
            raise RemoteUnavailable(f"no bucket or directory {bucket!r}") from None
        except Exception as e:
            raise RemoteUnavailable(_short(e)) from None

    # -- entries -------------------------------------------------------------------------

    def path(self, key: str, suffix: str = ".safetensors") -> str:
        assert KEY.match(key), key
        return f"{self.root}/objects/{key[:2]}/{key}{suffix}"

    def sidecar(self, key: str) -> dict[str, Any] | None:
        """The entry's sidecar (None: no complete entry). RemoteEntryBad if it is unreadable,
        RemoteUnavailable if the remote does not answer."""
        try:
            if self.local:  # a FIFO or device planted on a share must not hang or flood us
                raw = read_capped(self.path(key, ".json"), JSON_CAP)
            else:
                raw = self.fs.cat_file(self.path(key, ".json"), start=0, end=JSON_CAP + 1)
        except FileNotFoundError:
            return None
        except TextFileError as e:
            raise RemoteEntryBad(f"sidecar: {e}") from None
        except RemoteUnavailable:
            raise
        except Exception as e:
            raise RemoteUnavailable(_short(e)) from None
        if len(raw) > JSON_CAP:
            raise RemoteEntryBad("sidecar larger than any mergebuild writes")
        try:
            info = json.loads(raw)
        except ValueError:
            raise RemoteEntryBad("sidecar is not JSON") from None
        if not isinstance(info, dict) or info.get("key") != key:
            raise RemoteEntryBad("sidecar is not this entry's")
        size = info.get("size")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise RemoteEntryBad("sidecar without a size")
        return info

    def object_size(self, key: str) -> int | None:
        try:
            return int(self.fs.size(self.path(key)))
        except FileNotFoundError:
            return None
        except Exception as e:
            raise RemoteUnavailable(_short(e)) from None

    def read_range(
        self, key: str, start: int, end: int, into: memoryview | None = None
    ) -> bytes | memoryview:
        """Bytes [start, end) of the object (fetch keeps several of these in flight): from an
        s3 remote by a plain ranged GET where one works (ranged.py), received into `into`
        (then a view of it is returned), else as new bytes through fsspec."""
        fast = self._ranged(key)
        data = None if fast is None else fast.read(start, end, into)
        if data is not None:
            return data
        try:
            return self.fs.cat_file(self.path(key), start=start, end=end)
        except FileNotFoundError:
            raise RemoteEntryBad("object vanished while downloading") from None
        except Exception as e:
            raise RemoteUnavailable(_short(e)) from None

    def _ranged(self, key: str) -> RangedGet | None:
        """The object's ranged-GET reader (one presigned URL per object, signed again before
        it expires), or None: not an s3 remote, a proxy or client certificate in the way, TLS
        settings it cannot use, or s3fs could not sign (then fsspec reads)."""
        with self._ranged_lock:
            signed, reader = self._ranged_gets.get(key, (0.0, None))
            if not signed or time.monotonic() - signed > RESIGN_AFTER:
                signed, reader = time.monotonic(), self._new_ranged(key)
                self._ranged_gets[key] = (signed, reader)
            return reader

    def _new_ranged(self, key: str) -> RangedGet | None:
        if "s3" not in _protocols(self.fs) or os.environ.get("MERGEBUILD_REMOTE_RANGED") == "0":
            return None
        config = self.options.get("config_kwargs") or {}
        if config.get("proxies") or config.get("client_cert"):  # botocore's to handle
            return None
        from mergebuild.remote.ranged import RangedGet  # http.client, ssl: only to download

        try:
            url = self.fs.sign(self.path(key), expiration=SIGNED_FOR)
            if not isinstance(url, str) or not RangedGet.usable(url):
                return None
            return RangedGet(url, (self.options.get("client_kwargs") or {}).get("verify"))
        except Exception:  # e.g. a CA path ssl cannot load: s3fs reads, and reports it
            return None

    def upload(self, key: str, obj: Path, sidecar: bytes) -> None:
        """Object first, sidecar LAST; on a directory remote each through a temp name."""
        if self.http:
            raise RemoteUnavailable("an http(s) remote is read-only")
        try:
            self._put(str(obj), self.path(key))
            self._put(sidecar, self.path(key, ".json"))
        except RemoteUnavailable:
            raise
        except Exception as e:
            raise RemoteUnavailable(_short(e)) from None

    def _put(self, source: str | bytes, target: str) -> None:
        fs = self.fs
        if not self.local:  # an object store shows a PUT only once complete
            if isinstance(source, bytes):
                fs.pipe_file(target, source)
            else:
                fs.put_file(source, target)
            return
        parent = target.rsplit("/", 1)[0]
        fs.makedirs(parent, exist_ok=True)
        tmp = f"{parent}/.mergebuild-tmp-{uuid.uuid4().hex}.part"
        try:
            if isinstance(source, bytes):
                fs.pipe_file(tmp, source)
            else:
                fs.put_file(source, tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, target)  # atomic; two pushers of one key: either copy wins
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def entries(self) -> Iterator[tuple[str, dict[str, Any]]]:
        """(key, sidecar) of every complete entry (objects without sidecar are skipped)."""
        if self.http:
            raise RemoteUnavailable("an http(s) remote cannot be listed")
        try:
            names = self.fs.glob(f"{self.root}/objects/*/*.json")
        except FileNotFoundError:
            return
        except Exception as e:
            raise RemoteUnavailable(_short(e)) from None
        for name in sorted(names):
            key = name.rsplit("/", 1)[-1].removesuffix(".json")
            if not KEY.match(key):
                continue
            try:
                info = self.sidecar(key)
            except RemoteEntryBad:
                continue
            if info is not None:
                yield key, info


def _protocols(fs: Any) -> set[str]:
    p = fs.protocol
    return {p} if isinstance(p, str) else set(p)
