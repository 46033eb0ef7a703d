"""Build progress: rich bars on a terminal, plain log lines otherwise, nothing with -q."""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:
    from mergebuild.engine.executor import FusedPass, Unit


def _mb(n: float) -> str:
    return f"{n / 1e6:,.1f} MB"


class Progress:
    def __init__(self, enabled: bool = True, stream: TextIO | None = None) -> None:
        self.enabled = enabled
        self.stream = stream or sys.stdout
        self.interactive = enabled and self.stream.isatty()

    def log(self, message: str) -> None:
        if self.enabled:
            print(message, file=self.stream, flush=True)

    @contextlib.contextmanager
    def pass_(self, fused: FusedPass) -> Iterator[Callable[[Unit, bool], None] | None]:
        sinks = fused.sinks
        total = sum(sum(i.nbytes for i in s.infos.values()) for s in sinks)
        labels = ", ".join(s.label for s in sinks) or "(nothing to write)"
        if not self.enabled:
            yield None
            return
        t0 = time.perf_counter()
        if not self.interactive:
            ntensors = len({k for s in sinks for k in s.infos})
            self.log(
                f"building {labels}: {ntensors} tensors, {_mb(total)} to write, "
                f"{len(fused.sources)} files read"
            )
            yield None
            dt = time.perf_counter() - t0
            self.log(f"built {labels} in {dt:.1f} s ({total / 1e6 / max(dt, 1e-9):,.0f} MB/s)")
            return
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )
        from rich.progress import Progress as RichProgress

        from mergebuild.engine.dtypes import ITEMSIZE

        bar = RichProgress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            TextColumn("{task.fields[done]}/{task.fields[count]} tensors"),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=Console(file=self.stream),
            transient=False,
        )
        tasks = [
            bar.add_task(
                s.label, total=sum(i.nbytes for i in s.infos.values()), done=0, count=len(s.infos)
            )
            for s in sinks
        ]

        def on_unit(u: Unit, key_done: bool) -> None:
            for task, sink in zip(tasks, sinks, strict=True):
                info = sink.infos.get(u.key)
                if info is not None:
                    done = bar.tasks[task].fields["done"] + key_done
                    bar.update(task, advance=(u.hi - u.lo) * ITEMSIZE[info.dtype], done=done)

        with bar:
            yield on_unit
