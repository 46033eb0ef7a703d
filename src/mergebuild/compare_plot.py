"""`compare --png`: the comparison as a heatmap (models × groups), written atomically.

matplotlib is imported here only (Agg backend: no display needed), so `compare` without
`--png` and every other command start without it.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

from mergebuild.atomic import write_bytes
from mergebuild.compare import Comparison

ANNOTATE_CELLS = 200  # above this, numbers would not be readable in their cells


def heatmap_png(c: Comparison, target: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("rel_l2", "‖X − Y‖ / ‖Y‖", "viridis", None)]
    if c.base is not None:
        panels.append(("cosine", "cos(X − B, Y − B)", "RdBu", (-1.0, 1.0)))
    cell = {(r["model"], r["group"]): r for r in c.rows()}
    width = max(6.0, 0.45 * len(c.groups) + 2.5)
    height = (0.5 * len(c.models) + 1.6) * len(panels)
    fig, axes = plt.subplots(len(panels), 1, figsize=(width, height), squeeze=False)
    for ax, (field, title, cmap, limits) in zip(axes[:, 0], panels, strict=True):
        grid = [[_value(cell.get((m, g)), field) for g in c.groups] for m in c.models]
        finite = [v for row in grid for v in row if not math.isnan(v)]
        vmin, vmax = limits or (0.0, max(finite, default=0.0) or 1.0)
        im = ax.imshow(grid, aspect="auto", cmap=cmap, vmin=vmin, vmax=vmax)
        ax.set_title(f"{title}   (Y = {c.reference})", fontsize=9)
        ax.set_xticks(range(len(c.groups)), c.groups, rotation=90, fontsize=7)
        ax.set_yticks(range(len(c.models)), c.models, fontsize=8)
        if len(c.models) * len(c.groups) <= ANNOTATE_CELLS:
            for i, row in enumerate(grid):
                for j, v in enumerate(row):
                    if not math.isnan(v):
                        ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=5.5)
        fig.colorbar(im, ax=ax, fraction=0.03, pad=0.01)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    write_bytes(target, buf.getvalue())


def _value(row: dict | None, field: str) -> float:
    v = None if row is None else row.get(field)
    return math.nan if v is None else float(v)
