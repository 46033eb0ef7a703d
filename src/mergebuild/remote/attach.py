"""Give a Builder the remote session its command's options and recipe ask for."""

from __future__ import annotations

import argparse
from typing import Any

from mergebuild.remote.config import settings


def attach(args: argparse.Namespace, builder: Any) -> None:
    """No remote configured: nothing changes (and nothing remote is imported)."""
    found = settings(args, builder.recipe.cache)
    if found is None:
        return
    from mergebuild.remote.session import Session

    builder.remote = Session(
        found, builder.store, bool(getattr(args, "dry_run", False)), builder.progress.log
    )
    # new inputs are hashed first: their real keys are what the remote is asked for
    builder.speculate = False
