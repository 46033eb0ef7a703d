"""Ranged GETs of one S3 object over plain HTTP(S) connections, on a URL s3fs presigned.

Why: s3fs (aiobotocore over aiohttp) spent 2.8 s of CPU receiving a 2.1 GB object in 16 MB
ranges from a local S3 server, and the download took 4.0 s on two cores shared with that
server; `http.client` reading each range straight into its buffer took 2.1 s of CPU and 3.0 s
(measured in one process against the same warm server). The URL is signed once per object by
s3fs itself (botocore's SigV4, with whatever credentials and endpoint s3fs resolved), and each
download thread keeps one keep-alive connection.

Anything unexpected gives None, never an error: a proxy to go through or a client
certificate to present (botocore knows how, this does not), a status other than 206, a
Content-Range or length that is not the range's, a short body, a dropped connection. The
caller then reads that range through s3fs, which reports a missing object, a down server or
refused credentials as before. A TLS failure (a CA this does not know of) turns the reader off
for the rest of the download: every range goes through s3fs, without a handshake each.
"""

from __future__ import annotations

import http.client
import os
import ssl
import threading
import urllib.parse
import urllib.request
from typing import Any

RECEIVE = 1 << 20  # bytes per readinto call


class RangedGet:
    """GETs of byte ranges of the object at a presigned `url`."""

    def __init__(self, url: str, verify: Any = None) -> None:
        """`verify` as botocore takes it (False, a CA bundle path, None: the default); an
        unusable one raises (ssl.SSLError, OSError): the caller then does without."""
        parts = urllib.parse.urlsplit(url)
        self.https = parts.scheme == "https"
        self.host, self.port = parts.hostname or "", parts.port
        self.target = parts.path + (f"?{parts.query}" if parts.query else "")
        self.context = _context(verify) if self.https else None
        self.local = threading.local()  # this thread's connection
        self.off = False  # after a TLS failure

    @classmethod
    def usable(cls, url: str) -> bool:
        """A plain http(s) URL reached without a proxy."""
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            return False
        proxies = urllib.request.getproxies()
        if parts.scheme in proxies or "all" in proxies:
            return bool(urllib.request.proxy_bypass(parts.hostname))
        return True

    def read(self, start: int, end: int, into: memoryview | None = None) -> memoryview | None:
        """Bytes [start, end) of the object, received straight into `into` (at least
        end − start bytes; a new buffer if None), or None (see the module doc)."""
        n = end - start
        if self.off:
            return None
        conn = self._connection()
        try:
            conn.request("GET", self.target, headers={"Range": f"bytes={start}-{end - 1}"})
            response = conn.getresponse()
            where = response.getheader("Content-Range", "")
            if (
                response.status != 206
                or response.getheader("Content-Length") != str(n)
                or not where.startswith(f"bytes {start}-{end - 1}/")
            ):
                self._drop()
                return None
            view, got = (memoryview(bytearray(n)) if into is None else into)[:n], 0
            while got < n:
                k = response.readinto(view[got : got + RECEIVE])
                if not k:
                    break
                got += k
            if got != n:
                self._drop()
                return None
            return view
        except (ssl.SSLEOFError, ssl.SSLZeroReturnError):  # a closed connection: retry later
            self._drop()
            return None
        except ssl.SSLError:  # (an OSError too) the next range would fail the same way
            self.off = True
            self._drop()
            return None
        except (OSError, http.client.HTTPException, ValueError):
            self._drop()
            return None

    def _connection(self) -> http.client.HTTPConnection:
        conn = getattr(self.local, "conn", None)
        if conn is None:
            if self.https:
                conn = http.client.HTTPSConnection(
                    self.host, self.port, timeout=60, context=self.context
                )
            else:
                conn = http.client.HTTPConnection(self.host, self.port, timeout=60)
            self.local.conn = conn
        return conn

    def _drop(self) -> None:
        conn = getattr(self.local, "conn", None)
        self.local.conn = None
        if conn is not None:
            conn.close()


def _context(verify: Any) -> ssl.SSLContext:
    """TLS as aiobotocore (s3fs's client) checks it: `verify` False (no check), else the CA
    bundle it names, AWS_CA_BUNDLE, or botocore's default bundle (`get_cert_path`)."""
    context = ssl.create_default_context()
    if verify is False:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context
    if not isinstance(verify, str):
        verify = os.environ.get("AWS_CA_BUNDLE") or True
    from botocore.httpsession import get_cert_path

    cafile = get_cert_path(verify)
    if cafile:
        context.load_verify_locations(cafile)
    return context
