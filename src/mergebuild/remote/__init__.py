"""A remote cache: the local store's objects and sidecars mirrored under any fsspec URL.

Split from the local store because a remote is optional, slow and unreliable: fsspec and s3fs
are imported only when one is configured, and every remote failure ends as a warning (or, with
`--remote-required`, one error) instead of a traceback in the middle of a build.
"""

from mergebuild.remote.store import RemoteCache, RemoteUnavailable

__all__ = ["RemoteCache", "RemoteUnavailable"]
