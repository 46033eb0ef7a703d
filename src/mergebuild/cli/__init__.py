"""`mergebuild` command line: one module per command group, `app` parses and dispatches.

Imports stay lazy: --help, --dry-run and a cached build never load torch; the engine is
imported only when something must be computed. This package imports nothing at load time, so
a group module importing `mergebuild.cli.options` never runs `app` (no import cycle).
"""


def main(argv: list[str] | None = None) -> int:
    """The console script and `python -m mergebuild` (see `app.main`)."""
    from mergebuild.cli.app import main as run

    return run(argv)
