"""Plan a build (what is cached, what to build, and why) and carry it out.

Planning needs only file hashes and the recipe — no torch — so `--dry-run` and a fully cached
build stay fast. Building runs one fused pass (engine/executor.py) over every node that must be
computed, writes each result to a temp file next to its cache object, fsyncs and renames it,
then publishes outputs as hardlinks of their cache objects.

The Builder (builder.py) only sequences the steps; each lives in its own module so it can be
read and changed alone: plan.py (keys, cached or not, why), checks.py (refusals before and
after computing), locks.py (cache entry locks held while writing), execute.py (the fused passes
and the files they write), journal.py (what was built last time, to say why a node rebuilds).
"""

from mergebuild.build.builder import Builder
from mergebuild.build.execute import FILES_PER_PASS_FDS, MAX_FILES_PER_PASS
from mergebuild.build.plan import Item, Plan

__all__ = ["FILES_PER_PASS_FDS", "MAX_FILES_PER_PASS", "Builder", "Item", "Plan"]
