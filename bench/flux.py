"""`make bench` (Flux part): two Flux transformers merged, against the overlapped I/O floor.

Synthetic Flux.1 dev transformers (real key names, bf16, bare keys as most transformer-only
files are) at shrunken sizes, and at full size (23.8 GB each) when the disk has room. Rows, each
with its own floor measured in the same run:
- weighted_sum of the two, bf16 output (what the inputs are);
- the same with an fp8_e4m3fn output (half the bytes to write);
- peak RSS at every size, to show it does not grow with the model.
Before each measured run the page cache is emptied for every file involved. Results go to
bench/flux_results.md and bench/flux_results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
from pathlib import Path

from run import DATA, FLOOR, PY, SRC, evict, measure, mergebuild, models

HERE = Path(__file__).resolve().parent
SIZES = {"1/4": 0.25, "1/2": 0.5, "full": 1.0}
FULL_BYTES = 23.8e9  # one bf16 Flux.1 dev transformer


def inputs(label: str, scale: float) -> dict[str, Path]:
    """Two transformer-only files (bf16, bare keys), made once by run.models."""
    tag = "flux-" + label.replace("/", "_")
    return models("flux", "ab", tag, scale=scale, dtype="bf16", form="bare")


def recipe(path: Path, m: dict[str, Path], out: Path, dtype: str) -> Path:
    path.write_text(
        "mergebuild: 1\nmodels:\n"
        + "".join(f"  {k}: {v}\n" for k, v in m.items())
        + "merges:\n  mix: {method: weighted_sum, a: a, b: b, alpha: 0.5}\n"
        + f"outputs:\n  o: {{from: mix, path: {out}, dtype: {dtype}}}\n"
    )
    return path


def best_of(n: int, cmd: list[str], files: list[Path], out: Path, cache: Path | None) -> tuple:
    best = (float("inf"), 0.0, 0.0, 0.0)
    for _ in range(n):
        if cache is not None:
            shutil.rmtree(cache / "objects", ignore_errors=True)
        out.unlink(missing_ok=True)
        evict(*files)
        best = min(best, measure(cmd))
    out.unlink(missing_ok=True)
    return best


def run_size(label: str, scale: float, repeat: int, rows: list[dict], outputs: list[str]) -> None:
    m = inputs(label, scale)
    size = m["a"].stat().st_size
    out = DATA / "flux-out.safetensors"
    cache = DATA / "flux-cache"
    files = list(m.values())
    for dtype in outputs:
        rcp = recipe(DATA / f"flux-{dtype}.yaml", m, out, dtype)
        subprocess.run(  # hash the inputs once (memoized): the rows measure the merge
            [*mergebuild(rcp, cache), "-n"],
            check=True,
            capture_output=True,
            env={**os.environ, "PYTHONPATH": str(SRC)},
        )
        out_size = size // 2 if dtype.startswith("fp8") else size
        paths = [*map(str, files), str(out), str(out_size)]
        floor_cmd = [PY, "-c", FLOOR, "direct", "overlap", *paths]
        floor = best_of(repeat, floor_cmd, files, out, None)
        got = best_of(repeat, mergebuild(rcp, cache), files, out, cache)
        row = {
            "size": label,
            "input_gb": size / 1e9,
            "output": dtype,
            "floor_s": floor[0],
            "wall_s": got[0],
            "ratio": got[0] / floor[0],
            "rss_gb": got[1],
            "cpu_s": got[2],
            "read_gb": got[3],
        }
        rows.append(row)
        print(
            f"  flux {label:5} {size / 1e9:5.1f} GB ×2 → {dtype:10}  floor {floor[0]:6.1f} s  "
            f"mergebuild {got[0]:6.1f} s = {row['ratio']:.2f}× floor  RSS {got[1]:.2f} GB",
            flush=True,
        )
    shutil.rmtree(cache, ignore_errors=True)


def report(rows: list[dict], skipped: list[str]) -> str:
    lines = [
        "# Flux merges against the overlapped I/O floor",
        "",
        "weighted_sum of two synthetic Flux.1 dev transformers (bf16, bare keys), page cache",
        "emptied before each run, best of the repeats. Floor: both inputs read with O_DIRECT",
        "while the output is written with O_DIRECT (+ fsync), concurrently.",
        "Command: `python bench/flux.py`.",
        "",
        "| size | input | output | floor | mergebuild | ratio | peak RSS |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['size']} | {r['input_gb']:.1f} GB ×2 | {r['output']} | {r['floor_s']:.1f} s "
            f"| {r['wall_s']:.1f} s | {r['ratio']:.2f}× | {r['rss_gb']:.2f} GB |"
        )
    lines += ["", *skipped]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sizes", default="1/4,1/2,full", help="comma-separated: 1/4, 1/2, full")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--keep", action="store_true", help="keep the full-size inputs afterwards")
    args = ap.parse_args()
    DATA.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    skipped: list[str] = []
    for label in args.sizes.split(","):
        scale = SIZES[label]
        outputs = ["bf16", "fp8_e4m3fn"]
        if label == "full":
            have = [p for p in DATA.glob("flux-full-*.safetensors")]
            free = shutil.disk_usage(DATA).free + sum(p.stat().st_size for p in have)
            need = {"bf16": 3 * FULL_BYTES, "fp8_e4m3fn": 2.5 * FULL_BYTES}
            outputs = [o for o in outputs if free > need[o] + 2e9]
            for o in ("bf16", "fp8_e4m3fn"):
                if o not in outputs:
                    line = (
                        f"skipped: full-size Flux → {o} needs {need[o] / 1e9 + 2:.0f} GB free "
                        f"(2 inputs + the output), {free / 1e9:.0f} GB available"
                    )
                    print(line, flush=True)
                    skipped.append(line)
            if not outputs:
                continue
        run_size(label, scale, args.repeat, rows, outputs)
        if label == "full" and not args.keep:
            for p in DATA.glob("flux-full-*.safetensors"):
                p.unlink()
    (HERE / "flux_results.json").write_text(json.dumps(rows, indent=1) + "\n")
    (HERE / "flux_results.md").write_text(report(rows, skipped))
    print(f"wrote {HERE / 'flux_results.md'}")


if __name__ == "__main__":
    main()
