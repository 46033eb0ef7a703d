"""`mergebuild` command line: one module per command group, `app` parses and dispatches.

Imports stay lazy: --help, --dry-run and a cached build never load torch; the engine is
imported only when something must be computed. This package imports nothing at load time, so
a group module importing `mergebuild.cli.options` never runs `app` (no import cycle).
"""

from typing import NoReturn


def main(argv: list[str] | None = None) -> int:
    """The command line, as a function: parses `argv`, runs the command, returns the exit code
    (see `app.main`). Callers inside another program use this."""
    from mergebuild.cli.app import main as run

    return run(argv)


def run() -> NoReturn:
    """The process entry point (the console script, `python -m mergebuild`): `main`, then a
    quick exit.

    Why: the interpreter's own teardown (freeing every module, their static destructors) took
    0.5-0.8 s of a 5-6 s SD1 build once torch and numba were loaded, and 0.35 s of a 4.3 s
    pull from S3 (aiobotocore, aiohttp, numpy), after every file was written, fsynced and
    renamed. Here the standard streams are flushed and the atexit handlers run (logging, Ray's
    shutdown, weakref finalizers), then the process ends without the teardown: every file the
    commands write is closed (and fsynced) before they return. Where a non-daemon thread is
    still alive, the exit is the normal one, which waits for it."""
    import os
    import sys
    import threading

    # read when numpy loads OpenBLAS, before any merge: its idle thread pool otherwise spins on
    # the cores the merge needs (1-3% of a build's CPU; the merge uses numpy for buffer views
    # and small sums, torch has its own BLAS). engine/tuning.py sets it too, if still in time.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    code = main()
    others = [t for t in threading.enumerate() if t is not threading.main_thread()]
    if any(not t.daemon and t.is_alive() for t in others):
        sys.exit(code)
    import atexit

    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: the normal exit would fail here too
            code = code or 120
    os._exit(code)
