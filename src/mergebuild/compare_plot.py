"""`compare --png`: the comparison as a heatmap (models × groups), and for each sweep one line
per group across its members, written atomically.

matplotlib is imported here only (Agg backend: no display needed), so `compare` without
`--png` and every other command start without it.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

from mergebuild.atomic import write_bytes
from mergebuild.compare import Comparison

ANNOTATE_CELLS = 200  # above this, numbers would not be readable in their cells


def heatmap_png(c: Comparison, target: Path, sweeps: list[list[str]] | None = None) -> None:
    """`sweeps`: lists of compared model names (a sweep's members, in order)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("rel_l2", "‖X − Y‖ / ‖Y‖", "viridis", None)]
    if c.base is not None:
        panels.append(("cosine", "cos(X − B, Y − B)", "RdBu", (-1.0, 1.0)))
    cell = {(r["model"], r["group"]): r for r in c.rows()}
    sweeps = sweeps or []
    width = max(6.0, 0.45 * len(c.groups) + 2.5)
    heights = [0.5 * len(c.models) + 1.6] * len(panels) + [4.0] * len(sweeps)
    fig, axes = plt.subplots(
        len(heights), 1, figsize=(width, sum(heights)), squeeze=False,
        gridspec_kw={"height_ratios": heights},
    )  # fmt: skip
    for ax, members in zip(axes[len(panels) :, 0], sweeps, strict=True):
        _sweep_lines(ax, c, cell, members)
    for ax, (field, title, cmap, limits) in zip(axes[:, 0], panels, strict=False):
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


def _sweep_lines(ax: Any, c: Comparison, cell: dict, members: list[str]) -> None:
    """One line per group: its relative distance to the reference across the members. The x
    axis is the swept value when the members differ in one number, else the member names."""
    found = [_swept_number(m) for m in members]
    numbers = [v for v in found if v is not None]
    numeric = len(numbers) == len(members) and len({name for name, _ in numbers}) == 1
    xs: list[float] = [x for _, x in numbers] if numeric else list(range(len(members)))
    for g in c.groups:
        ys = [_value(cell.get((m, g)), "rel_l2") for m in members]
        ax.plot(xs, ys, marker=".", label=g)
    ax.set_xlabel(numbers[0][0] if numeric else "member", fontsize=8)
    if not numeric:
        ax.set_xticks(xs, members, rotation=30, fontsize=7, ha="right")
    ax.set_ylabel(f"‖X − Y‖ / ‖Y‖  (Y = {c.reference})", fontsize=8)
    ax.set_title(f"sweep: {members[0].split('[', 1)[0]}", fontsize=9)
    ax.legend(fontsize=6, ncol=max(1, len(c.groups) // 12), loc="best")


def _swept_number(member: str) -> tuple[str, float] | None:
    """`nsfw[alpha=0.25]` → ("alpha", 0.25); None unless one parameter with a number."""
    inside = member.rpartition("[")[2].rstrip("]")
    if "[" not in member or "," in inside or "=" not in inside:
        return None
    name, _, value = inside.partition("=")
    try:
        return name, float(value)
    except ValueError:
        return None


def _value(row: dict | None, field: str) -> float:
    v = None if row is None else row.get(field)
    return math.nan if v is None else float(v)
