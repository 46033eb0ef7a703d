"""`make bench` rows for sweeps (issue 16): a family of models in one pass.

On full-size SD1 (bench/.data/sd1-[abc].safetensors, made once by bench/run.py), the same
add_difference swept over 3 alphas in one recipe, against the same three merges built by three
separate `mergebuild` runs, and against the I/O floor of the sweep: read a, b, c once and write
the 3 outputs (fsync), measured in the same run like bench/run.py's floors (best of buffered and
O_DIRECT reads and writes). Then 3 alphas × 3 presets (9 members) against its own floor.
Page cache emptied before every measured run, cache cold; wall and peak RSS of the child.

Targets (issue 16, "Benchmark"): sweep of 3 ≤ 1.3× its floor and ≤ 0.45× the three separate
builds; sweep of 9 ≤ 1.3× its floor, peak RSS ≤ 0.8 GB. Each target is a `check:` row.
Results: bench/sweep_results.md. `python bench/sweep.py [--repeat N] [--no-nine]`.
"""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

from run import (
    DATA,
    FLOOR,
    PY,
    Runner,
    data_digest,
    evict,
    measure,
    mergebuild,
    report,
    write_results,
)

OUT = DATA / "sweep-out"
ALPHAS = (0.25, 0.5, 0.75)
PRESETS = ("GRAD_V", "COSINE", "SMOOTHSTEP")


def sweep_recipe(path: Path, m: dict[str, Path], sweep: str, template: str) -> Path:
    models = "".join(f"  {k}: {m[k]}\n" for k in "abc")
    path.write_text(
        f"mergebuild: 1\nmodels:\n{models}merges:\n"
        f"  s: {{method: add_difference, a: a, b: b, c: c, sweep: {sweep}}}\n"
        f'outputs:\n  o: {{from: s, path: "{OUT}/{template}", dtype: fp16}}\n'
    )
    return path


def clear_outputs() -> None:
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir(parents=True)


def floor_n(r: Runner, label: str, n: int) -> dict:
    """Read a, b, c once, write `n` outputs of a model's size: the fastest of three ways."""
    outs = ",".join(str(OUT / f"floor-{i}.safetensors") for i in range(n))
    abc = [str(r.m[k]) for k in "abc"]
    rows = [
        r.run(
            f"{label} ({read} read, {mode} write)",
            [PY, "-c", FLOOR, read, mode, *abc, outs, str(r.size)],
            prepare=clear_outputs,
        )
        for read, mode in (("buffered", "buffered"), ("buffered", "direct"), ("direct", "direct"))
    ]
    best = min(rows, key=lambda x: x["wall"])
    for x in rows:
        x["floor"] = best["wall"]
    return best


def separate_builds(r: Runner, label: str) -> dict:
    """The same three merges as three single-node recipes, one `mergebuild` run each (each
    from a cold page cache and cache, like every measured run): what a sweep replaces."""
    wall = rss = cpu = 0.0
    for alpha in ALPHAS:
        rcp = DATA / f"sweep-single-{alpha}.yaml"
        rcp.write_text(
            "mergebuild: 1\nmodels:\n"
            + "".join(f"  {k}: {r.m[k]}\n" for k in "abc")
            + f"merges:\n  s: {{method: add_difference, a: a, b: b, c: c, alpha: {alpha}}}\n"
            f"outputs:\n  o: {{from: s, path: {OUT}/o-{alpha}.safetensors, dtype: fp16}}\n"
        )
        r.dry_run(rcp)
        best = (float("inf"), 0.0, 0.0, 0.0)
        for _ in range(r.repeat):  # the best of the runs, as for every other row
            r.cold()
            evict(*r.m.values(), r.cache)
            best = min(best, measure(mergebuild(rcp, r.cache)))
        w, s, c, _ = best
        wall, rss, cpu = wall + w, max(rss, s), cpu + c
    row = {"arch": r.arch, "group": "sweep", "job": label, "wall": wall, "rss": rss, "cpu": cpu}
    r.rows.append(row)
    print(f"  {r.arch:5} {label:46} {wall:7.1f} s  {rss:6.2f} GB  {cpu:7.1f} s CPU", flush=True)
    return row


def digests(n: int) -> dict[str, str]:
    return {p.name: data_digest(p) for p in sorted(OUT.glob("o-*.safetensors"))[:n]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeat", type=int, default=1, help="runs per row; the fastest is kept")
    ap.add_argument("--no-nine", action="store_true", help="skip the 3 × 3 sweep")
    args = ap.parse_args()
    rows: list[dict] = []
    load_start = os.getloadavg()[0]  # a shared machine: how busy it was, in the report
    r = Runner("sd1", rows, args.repeat)
    r.group = "sweep"
    shutil.rmtree(r.cache, ignore_errors=True)

    def cold() -> None:
        r.cold()
        clear_outputs()

    clear_outputs()
    separate = separate_builds(r, "3 separate builds (alpha 0.25, 0.5, 0.75)")
    single = digests(3)
    floor3 = floor_n(r, "I/O floor: read a,b,c once + write 3 outputs", 3)
    three = sweep_recipe(DATA / "sweep-3.yaml", r.m, f"{{alpha: {list(ALPHAS)}}}",
                         "o-{alpha}.safetensors")  # fmt: skip
    r.dry_run(three)
    row = r.run("sweep of 3 alphas, one recipe (cold cache)", mergebuild(three, r.cache), [r.cache],
                cold)  # fmt: skip
    row["floor"] = floor3["wall"]
    row["vs_separate"] = row["wall"] / separate["wall"]
    separate["floor"] = floor3["wall"]
    same = digests(3) == single and len(single) == 3
    print(f"  sweep members == separate builds (tensor bytes): {same}")
    r.check("check: sweep members' tensors == the separate builds'", same)
    r.check("check: sweep of 3 ≤ 1.3× its floor", row["wall"] <= 1.3 * floor3["wall"])
    r.check("check: sweep of 3 ≤ 0.45× three separate builds", row["vs_separate"] <= 0.45)
    if not args.no_nine:
        floor9 = floor_n(r, "I/O floor: read a,b,c once + write 9 outputs", 9)
        nine = sweep_recipe(
            DATA / "sweep-9.yaml",
            r.m,
            f"{{alpha: {list(ALPHAS)}, preset: {list(PRESETS)}}}",
            "o-{alpha}-{preset}.safetensors",
        )
        r.dry_run(nine)
        row9 = r.run("sweep of 3 alphas × 3 presets (cold cache)", mergebuild(nine, r.cache),
                     [r.cache], cold)  # fmt: skip
        row9["floor"] = floor9["wall"]
        r.check("check: sweep of 9 ≤ 1.3× its floor", row9["wall"] <= 1.3 * floor9["wall"])
        r.check("check: sweep of 9 peak RSS ≤ 0.8 GB", row9["rss"] <= 0.8)
    shutil.rmtree(OUT, ignore_errors=True)
    shutil.rmtree(r.cache, ignore_errors=True)
    table = report(rows)
    print("\n" + table)
    write_results(
        "sweep_results.md",
        "sweeps",
        "Full-size SD1 (fp16, 2.1 GB each), add_difference, fp16 outputs, `-j2`. Page cache "
        "emptied (posix_fadvise DONTNEED) before every run, cache cold; wall time and peak RSS "
        "of the child (VmHWM); best of the runs per row. × floor: against reading a, b, c once "
        "and writing every output of the row (fsync), the fastest of buffered / O_DIRECT reads "
        "and writes, in the same run. The separate builds are three runs, one alpha each (the "
        "best of the runs for each), each from a cold page cache (wall and CPU summed, RSS the "
        "largest); the sweep row's "
        "`vs_separate` in the JSON is its wall over theirs.",
        rows,
        load_start,
        table,
    )


if __name__ == "__main__":
    main()
