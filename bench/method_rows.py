"""`make bench` rows for the merge methods (issue 13): each method against the I/O floor of the
inputs it reads, the whole-tensor ones also against sd-mecha on the same inputs.

Each row is held to the faster of the pass's floor and one measured right before it.

Targets (issue 13, "Benchmark"): elementwise methods ≤ 1.3× the floor; whole-tensor methods
≤ 2× the floor, peak RSS ≤ 1.0 GB (SD1) / 1.5 GB (SDXL), ≥ 3× faster than sd-mecha. Each
target becomes a `check:` row. sd-mecha rows run once (a minute or more each).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from run import DATA, PY, SD_MECHA_VERSION, data_digest, mergebuild

if TYPE_CHECKING:
    from run import Runner

RSS_TARGET_GB = {"sd1": 1.0, "sdxl": 1.5}


@dataclass(frozen=True)
class MethodRow:
    label: str
    merge: str  # the YAML flow mapping of node `m`
    inputs: str  # the floor it is compared with: "ab", "abc" or "abcd"
    target: float  # × floor
    mecha: str = ""  # the same merge through sd-mecha (an expression over a, b, c, d)


ROWS = (
    MethodRow(
        "train_difference",
        "{method: train_difference, a: a, b: b, c: c, alpha: 1.0}",
        "abc",
        1.3,
    ),
    MethodRow(
        "triple_sum",
        "{method: triple_sum, a: a, b: b, c: c, alpha: 0.3, beta: 0.2}",
        "abc",
        1.3,
    ),
    MethodRow("add_cosine_a", "{method: add_cosine_a, a: a, b: b, alpha: 0.0}", "ab", 1.3),
    # vote: count is sd-mecha's ties_sum (vote_sgn=False): the same arithmetic on both sides
    MethodRow(
        "ties (base a; models b, c, d; k 0.2)",
        "{method: ties, base: a, models: [b, c, d], k: 0.2, vote: count}",
        "abcd",
        2.0,
        # add_difference_ties' own graph: 1.1.8's wrapper fails comparing merge spaces
        "linear.add_difference(a, ties.ties_sum(linear.subtract(b, a), linear.subtract(c, a), "
        "linear.subtract(d, a), k=0.2), alpha=1.0) | a",
    ),
    MethodRow(
        "slerp (a, b; alpha 0.3)",
        "{method: slerp, a: a, b: b, alpha: 0.3}",
        "ab",
        2.0,
        "sd_mecha.slerp(a, b, alpha=0.3)",
    ),
    MethodRow(
        "dare_ties (base a; models b, c, d; p 0.9)",
        "{method: dare_ties, base: a, models: [b, c, d], p: 0.9, vote: count, seed: 1}",
        "abcd",
        2.0,
        "sd_mecha.add_ties_with_dare(a, b, c, d, probability=0.9, k=1.0, seed=1)",
    ),
)

MECHA = """
import os, sys, torch, sd_mecha
from sd_mecha.extensions.builtin.merge_methods import linear, ties
a, b, c, d = (sd_mecha.model(p) for p in sys.argv[1:5])
out = sys.argv[5]
class Quiet:
    def __init__(self, *a, **k): pass
    def __enter__(self): return self
    def __exit__(self, *a): pass
    def update(self, *a, **k): pass
    def set_postfix(self, *a, **k): pass
    def close(self): pass
r = {expr}
sd_mecha.merge(r, output=out, threads=2, merge_dtype=torch.float32, output_dtype=torch.float16,
               tqdm=Quiet)
fd = os.open(out, os.O_RDONLY); os.fsync(fd); os.close(fd)
"""

# Max |x − y| over every float tensor of two files, one key at a time (a child process: the
# bench's parent stays small), and the largest |x| for scale.
COMPARE = """
import sys, torch
from safetensors import safe_open
worst, top = 0.0, 0.0
with safe_open(sys.argv[1], "pt") as x, safe_open(sys.argv[2], "pt") as y:
    for k in x.keys():
        t, u = x.get_tensor(k), y.get_tensor(k)
        if t.is_floating_point():
            t, u = t.float(), u.float()
            worst = max(worst, float((t - u).abs().max()))
            top = max(top, float(t.abs().max()))
print(worst, top)
"""


def recipe_from_yaml(path: Path, models: dict[str, Path], merges: str, final: str) -> Path:
    """A recipe over the bench models with `merges` (YAML lines under `merges:`, indented two
    spaces) and one fp16 output of node `final`: how every method row, and a later `fold: true`
    two-step row, is written."""
    lines = "".join(f"  {k}: {v}\n" for k, v in models.items())
    out = DATA / "out.safetensors"
    path.write_text(
        f"mergebuild: 1\nmodels:\n{lines}merges:\n{merges}"
        f"outputs:\n  o: {{from: {final}, path: {out}, dtype: fp16}}\n"
    )
    return path


def add(r: Runner, floors: dict[str, float], mecha: bool) -> None:
    """Measure every method row (and its sd-mecha twin when `mecha`), then the target checks."""
    import subprocess

    for row in ROWS:
        slug = row.label.split()[0]
        rcp = recipe_from_yaml(DATA / f"{r.arch}-{slug}.yaml", r.m, f"  m: {row.merge}\n", "m")
        r.dry_run(rcp)
        # this machine's disk drifts by 1.5x within minutes: the floor each row is held to is
        # measured right before it, on the same inputs (the pass's first floors stay as well)
        paired = r.floor(
            f"I/O floor for {slug}: read {','.join(row.inputs)} + write out",
            [str(r.m[k]) for k in row.inputs],
        )
        # ... and the floor of a streaming merge, which reads and writes at once (issue 14):
        # this disk's throughput drops when reads and writes mix, so it is reported alongside
        over = r.overlapped(
            f"I/O floor for {slug}, overlapped: read {','.join(row.inputs)} while writing out",
            [str(r.m[k]) for k in row.inputs],
        )
        over["floor"] = paired["wall"]
        mine = r.run(f"mergebuild {row.label}", mergebuild(rcp, r.cache), [r.cache], r.cold)
        mine["floor"] = min(paired["wall"], floors[row.inputs])
        mine["overlap"] = over["wall"]
        mine["sha256"] = data_digest(r.out)  # the tensor bytes: compared across code changes
        ratio = mine["wall"] / mine["floor"]
        r.check(
            f"check: {slug} ≤ {row.target}× floor ({ratio:.2f}×; "
            f"{mine['wall'] / over['wall']:.2f}× the overlapped floor)",
            ratio <= row.target,
        )
        if row.target > 1.3:  # whole-tensor methods also have a memory target
            limit = RSS_TARGET_GB[r.arch]
            r.check(
                f"check: {slug} peak RSS ≤ {limit} GB ({mine['rss']:.2f} GB)", mine["rss"] <= limit
            )
        if not (mecha and row.mecha):
            continue
        kept = DATA / f"{r.arch}-{slug}-mergebuild.safetensors"
        r.out.replace(kept)
        inputs = [str(r.m[k]) for k in "abcd"]
        theirs = r.run(
            f"sd-mecha {SD_MECHA_VERSION} {slug}, threads=2",
            [PY, "-c", MECHA.format(expr=row.mecha), *inputs, str(r.out)],
            repeat=1,
        )
        theirs["floor"] = floors[row.inputs]
        speedup, cpu = theirs["wall"] / mine["wall"], theirs["cpu"] / mine["cpu"]
        r.check(
            f"check: {slug} ≥ 3× faster than sd-mecha ({speedup:.1f}× wall, {cpu:.1f}× CPU time)",
            speedup >= 3.0,
        )
        if slug != "dare_ties":  # dare's masks come from different generators
            diff = subprocess.run(
                [PY, "-c", COMPARE, str(kept), str(r.out)],
                check=True,
                capture_output=True,
                text=True,
            ).stdout.split()
            worst, top = float(diff[0]), float(diff[1])
            r.check(
                f"check: {slug} output vs sd-mecha's: max abs Δ {worst:.3g} (max abs x {top:.3g})",
                worst <= 1e-2 * top,
            )
        kept.unlink()
