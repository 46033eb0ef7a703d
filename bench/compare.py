"""`make bench` rows for `mergebuild compare` (issue 16): distances of full-size models, streamed.

On full-size SD1 (bench/.data/sd1-[abc].safetensors, made once by bench/run.py):
`mergebuild compare b c --base a` (every block and component: relative L2 distance to the
reference b and cosine similarity of the deltas against a) reads the three models once. It is
measured against the read floor of the same files, in the same run: read a, b, c once, through
the page cache with a deep window or with O_DIRECT (bench/run.py's floor, writing nothing), the
faster of the two. Page cache emptied before every run; wall and peak RSS of the child.

Target (issue 16, "`mergebuild compare`"): ≤ 1.2× the read floor. A `check:` row says whether it
was met. Results: bench/compare_results.md. `python bench/compare.py [--repeat N]`.
"""

from __future__ import annotations

import argparse
import os

from run import FLOOR, PY, Runner, report, warm_compiled, write_results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeat", type=int, default=2, help="runs per row; the fastest is kept")
    args = ap.parse_args()
    warm_compiled()
    rows: list[dict] = []
    load_start = os.getloadavg()[0]
    r = Runner("sd1", rows, args.repeat)
    r.group = "compare"
    abc = [str(r.m[k]) for k in "abc"]
    # bench/run.py's floor with an empty output: the reads alone
    floors = [
        r.run(
            f"read floor: a,b,c once ({read} read)",
            [PY, "-c", FLOOR, read, "direct", *abc, str(r.out), "0"],
        )
        for read in ("buffered", "direct")
    ]
    floor = min(floors, key=lambda x: x["wall"])
    for x in floors:
        x["floor"] = floor["wall"]
    cmd = [PY, "-m", "mergebuild", "compare", abc[1], abc[2], "--base", abc[0], "--json"]
    row = r.run("mergebuild compare b c --base a (blocks, -j2)", cmd)
    row["floor"] = floor["wall"]
    r.check(
        f"check: compare ≤ 1.2× the read floor ({row['wall'] / floor['wall']:.2f}×)",
        row["wall"] <= 1.2 * floor["wall"],
    )
    table = report(rows)
    print("\n" + table)
    write_results(
        "compare_results.md",
        "compare",
        "Full-size SD1 (fp16, 2.1 GB each). Page cache emptied (posix_fadvise DONTNEED) before "
        "every run; wall time and peak RSS of the child (VmHWM); best of the runs per row. "
        "× floor: against reading a, b, c once (the faster of a deep page-cache window and "
        "O_DIRECT), in the same run.",
        rows,
        load_start,
        table,
    )


if __name__ == "__main__":
    main()
