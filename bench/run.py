"""`make bench`: mergebuild against the I/O floor and other mergers, measured in one run.

Full-size synthetic models (SD1 ≈ 2.1 GB, SDXL ≈ 6.9 GB fp16; real key names) are generated once
into bench/.data. Before every measured run the page cache is emptied for every file involved
(posix_fadvise DONTNEED: no root needed), so each run reads from disk. Each run is a child process;
wall time and peak RSS (VmHWM, polled) are those of that child. Results: bench/results.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATA = HERE / ".data"
SRC = HERE.parent / "src"
PY = sys.executable
SD_MECHA_VERSION = "1.1.8"


def evict(*paths: Path) -> None:
    """Drop these files (or every file under these dirs) from the page cache, then flush
    every pending write and journal commit.

    Why the flush: every caller measures next, after deleting gigabytes (the last run's
    outputs and cache). On this VM's ext4 (mounted `discard`) those blocks are trimmed at
    the next journal commit, which otherwise lands inside the measured run: sweep rows
    right after a deletion varied 9-13 s for the same work."""
    for p in paths:
        files = (
            [p] if p.is_file() else [f for f in p.rglob("*") if f.is_file()] if p.is_dir() else []
        )
        for f in files:
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fdatasync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
    os.sync()


def measure(cmd: list[str], env: dict | None = None) -> tuple[float, float, float, float]:
    """(wall seconds, peak RSS GB, CPU seconds, GB read from storage) of one child process.

    Peak RSS is the child's VmHWM, polled from /proc every 20 ms: rusage's ru_maxrss would also
    count the parent's high-water mark, which a child inherits at fork/exec. CPU time (user +
    system, from wait4) is what a busy shared machine disturbs least. Bytes read from storage:
    wait4's ru_inblock (512-byte units, O_DIRECT reads included, page-cache hits not), which
    also counts the children the child waited for.
    """
    t0 = time.perf_counter()
    p = subprocess.Popen(
        cmd,
        env={**os.environ, "PYTHONPATH": str(SRC), **(env or {})},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    hwm_kb = 0
    status = Path(f"/proc/{p.pid}/status")
    while True:
        pid, code, usage = os.wait4(p.pid, os.WNOHANG)
        if pid:
            break
        try:
            for line in status.read_text().splitlines():
                if line.startswith("VmHWM"):
                    hwm_kb = max(hwm_kb, int(line.split()[1]))
        except (OSError, ValueError, IndexError):
            pass
        time.sleep(0.02)
    wall = time.perf_counter() - t0
    p.returncode = os.waitstatus_to_exitcode(code)
    err = p.stderr.read().decode() if p.stderr else ""
    if p.returncode != 0:
        raise SystemExit(f"benchmark command failed ({p.returncode}): {' '.join(cmd)}\n{err}")
    cpu = usage.ru_utime + usage.ru_stime
    return wall, hwm_kb / 1024 / 1024, cpu, usage.ru_inblock * 512 / 1e9


def models(
    arch: str, names: str = "abcd", tag: str | None = None, **synth: object
) -> dict[str, Path]:
    """`DATA/{tag}-{name}.safetensors` (tag: the arch), each made once by `synthesize` (full
    size unless `synth` says otherwise) in a child process: the parent stays small, because a
    child inherits the parent's peak RSS at fork/exec and would report it as its own."""
    DATA.mkdir(parents=True, exist_ok=True)
    kwargs = {"scale": 1, **synth}
    out = {}
    for name in names:
        path = DATA / f"{tag or arch}-{name}.safetensors"
        if not path.exists():
            print(f"generating {path.name} (once)...", flush=True)
            code = (
                "from pathlib import Path; from mergebuild.demo import synthesize;"
                f"synthesize(Path({str(path)!r}), {name!r}, arch={arch!r}, **{kwargs!r})"
            )
            subprocess.run([PY, "-c", code], check=True, env={**os.environ, "PYTHONPATH": str(SRC)})
        out[name] = path
    return out


def data_digest(path: Path) -> str:
    """sha256 of the tensor bytes only (the header's metadata differs between recipes)."""
    import hashlib
    import struct

    h = hashlib.sha256()
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        f.seek(8 + n)
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def digest(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


FLOOR = """
import ctypes, mmap, os, sys, threading
read, mode = sys.argv[1], sys.argv[2]
inputs, out, size = sys.argv[3:-2], sys.argv[-2], int(sys.argv[-1])
step, window = 64 << 20, 1 << 30
ends = [os.path.getsize(p) for p in inputs]

def aligned(n):  # malloc'd and 4 KiB-aligned, as O_DIRECT needs
    raw = (ctypes.c_char * (n + 4096))()
    pad = -ctypes.addressof(raw) % 4096
    return memoryview(raw).cast("B")[pad : pad + n]

def write_output():  # `out`: one path, or several separated by commas (a sweep's outputs)
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | (os.O_DIRECT if mode != "buffered" else 0)
    buf = aligned(step)
    for o in out.split(","):
        fd = os.open(o, flags, 0o644)
        pos = 0
        while pos < size:
            n = min(len(buf), size - pos)
            pos += os.pwrite(fd, buf[: -(-n // 4096) * 4096 if mode != "buffered" else n], pos)
        os.ftruncate(fd, size)
        os.fsync(fd)
        os.close(fd)

if mode == "overlap":  # the write runs while the reads do (as a streaming merge's does)
    writer = threading.Thread(target=write_output)
    writer.start()

if read == "buffered":  # the kernel reads a window ahead on every input at once (deep queue)
    fds = [os.open(p, os.O_RDONLY) for p in inputs]
    done = [0]  # bytes consumed by the reader
    cond = threading.Condition()

    def ahead():
        issued = 0
        for off in range(0, max(ends), step):
            for fd, end in zip(fds, ends):
                if off < end:
                    with cond:
                        while issued - done[0] > window:
                            cond.wait()
                    os.posix_fadvise(fd, off, step, os.POSIX_FADV_WILLNEED)
                    issued += min(step, end - off)

    threading.Thread(target=ahead, daemon=True).start()
    buf = mmap.mmap(-1, step)
    for off in range(0, max(ends), step):
        for fd, end in zip(fds, ends):
            if off < end:
                n = os.preadv(fd, [buf], off)
                with cond:
                    done[0] += n
                    cond.notify()
else:  # O_DIRECT: 16 threads, 4 MiB requests, all inputs interleaved
    fds = [os.open(p, os.O_RDONLY | os.O_DIRECT) for p in inputs]
    req = 4 << 20
    work = iter([(fd, off) for off in range(0, max(ends), req)
                 for fd, end in zip(fds, ends) if off < end])
    lock = threading.Lock()

    def reader():
        b = aligned(req)
        while True:
            with lock:
                w = next(work, None)
            if w is None:
                return
            os.preadv(w[0], [b], w[1])

    ts = [threading.Thread(target=reader) for _ in range(16)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
if mode == "overlap":
    writer.join()
else:
    write_output()
"""

IN_MEMORY = """
import os, sys, torch
from safetensors.torch import load_file, save_file
a, b, c, out = sys.argv[1:5]
A, B, C = load_file(a), load_file(b), load_file(c)
res = {}
for k, t in A.items():
    if t.is_floating_point() and k in B and k in C:
        res[k] = (t.float() + (B[k].float() - C[k].float()) * 0.5).half()
    else:
        res[k] = t
save_file(res, out)
fd = os.open(out, os.O_RDONLY); os.fsync(fd); os.close(fd)
"""

MECHA = """
import os, sys, torch, sd_mecha
a, b, c, out = sys.argv[1:5]
class Quiet:
    def __init__(self, *a, **k): pass
    def __enter__(self): return self
    def __exit__(self, *a): pass
    def update(self, *a, **k): pass
    def set_postfix(self, *a, **k): pass
    def close(self): pass
r = sd_mecha.add_difference(sd_mecha.model(a), sd_mecha.model(b), sd_mecha.model(c), alpha=0.5)
sd_mecha.merge(r, output=out, threads=2, merge_dtype=torch.float32, output_dtype=torch.float16,
               tqdm=Quiet)
fd = os.open(out, os.O_RDONLY); os.fsync(fd); os.close(fd)
"""


def recipe(path: Path, m: dict[str, Path], two_step: bool, alpha2: float = 1.0) -> Path:
    merges = (
        "  s1: a + (b - c) * 0.3\n"
        f"  s2: {{method: add_difference, a: s1, b: d, c: b, alpha: {alpha2}}}\n"
        if two_step
        else "  s2: a + (b - c) * 0.5\n"
    )
    models = "".join(f"  {k}: {v}\n" for k, v in m.items())
    out = DATA / "out.safetensors"
    path.write_text(
        f"mergebuild: 1\nmodels:\n{models}merges:\n{merges}"
        f"outputs:\n  o: {{from: s2, path: {out}, dtype: fp16}}\n"
    )
    return path


def mergebuild(rcp: Path, cache: Path, jobs: int = 2) -> list[str]:
    return [PY, "-m", "mergebuild", str(rcp), "-q", "-j", str(jobs), "--cache-dir", str(cache)]


class Runner:
    """One architecture's measured runs: inputs, the output path, the cache, the kept rows."""

    def __init__(self, arch: str, rows: list[dict], repeat: int) -> None:
        self.arch, self.rows, self.repeat = arch, rows, repeat
        self.m = models(arch)
        self.out = DATA / "out.safetensors"
        self.cache = DATA / "cache"
        self.size = self.m["a"].stat().st_size
        self.group = "floor"  # the --rows group being measured, kept in each row

    def cold(self) -> None:
        shutil.rmtree(self.cache / "objects", ignore_errors=True)

    def run(
        self,
        label: str,
        cmd: list[str],
        extra: Sequence[Path] = (),
        prepare: Callable[[], None] | None = None,
        repeat: int | None = None,
    ) -> dict:
        best = (float("inf"), 0.0, 0.0, 0.0)
        for _ in range(repeat or self.repeat):  # disks on shared machines are noisy: keep the best
            if prepare:
                prepare()
            if self.out.exists():
                self.out.unlink()
            evict(*self.m.values(), *extra)
            best = min(best, measure(cmd))
        wall, rss, cpu, read = best
        row = {
            "arch": self.arch,
            "group": self.group,
            "job": label,
            "wall": wall,
            "rss": rss,
            "cpu": cpu,
            "read_gb": read,
        }
        self.rows.append(row)
        print(
            f"  {self.arch:5} {label:46} {wall:7.1f} s  {rss:6.2f} GB  {cpu:7.1f} s CPU"
            f"  {read:6.2f} GB read",
            flush=True,
        )
        return row

    def floor(self, label: str, inputs: list[str]) -> dict:
        """The floor is the fastest of three ways to do the I/O: reads through the page cache
        (a deep fadvise window) or with O_DIRECT, writes buffered or with O_DIRECT (on this VM
        filling fresh page-cache pages is CPU-bound, and which is faster varies)."""
        rows_ = [
            self.run(
                f"{label} ({read} read, {mode} write)",
                [PY, "-c", FLOOR, read, mode, *inputs, str(self.out), str(self.size)],
            )
            for read, mode in (
                ("buffered", "buffered"),
                ("buffered", "direct"),
                ("direct", "direct"),
            )
        ]
        best = min(rows_, key=lambda r: r["wall"])
        for r in rows_:
            r["floor"] = best["wall"]
        return best

    def overlapped(self, label: str, inputs: list[str]) -> dict:
        """The floor of a streaming merge: the inputs read with O_DIRECT while the output is
        written with O_DIRECT in a thread of its own, then fsync (a merge writes as it reads)."""
        row = self.run(
            label, [PY, "-c", FLOOR, "direct", "overlap", *inputs, str(self.out), str(self.size)]
        )
        row["overlap"] = row["wall"]
        return row

    def check(self, job: str, ok: bool) -> None:
        self.rows.append({"arch": self.arch, "group": self.group, "job": job, "ok": ok})

    def dry_run(self, rcp: Path) -> None:
        """Hash the inputs once (memoized), so the measured builds do not include it."""
        subprocess.run(
            [*mergebuild(rcp, self.cache), "-n"],
            check=True,
            capture_output=True,
            env={**os.environ, "PYTHONPATH": str(SRC)},
        )


def core_rows(r: Runner, floor: dict, floor2: dict, others: bool) -> None:
    """The floor's companions: baselines, add_difference -j1/-j2 and the two-step recipes."""
    m, out, cache, cold, run, rows, arch = r.m, r.out, r.cache, r.cold, r.run, r.rows, r.arch
    abc = [str(m[k]) for k in "abc"]
    if others:
        run("in-memory web-UI style (load all, fp32, save)", [PY, "-c", IN_MEMORY, *abc, str(out)])
        run(f"sd-mecha {SD_MECHA_VERSION}, threads=2", [PY, "-c", MECHA, *abc, str(out)])
    single = DATA / f"{arch}-single.yaml"
    recipe(single, m, two_step=False)
    r.dry_run(single)
    for jobs in (1, 2):
        row = run(
            f"mergebuild add_difference -j{jobs}", mergebuild(single, cache, jobs), [cache], cold
        )
        row["floor"] = floor["wall"]
        row["sha256"] = digest(out)
    j1, j2 = rows[-2]["sha256"], rows[-1]["sha256"]
    print(f"  -j1 and -j2 outputs identical: {j1 == j2}")
    single_wall = rows[-1]["wall"]

    def never_seen() -> None:  # a fresh cache: no hash memo, no objects
        shutil.rmtree(cache, ignore_errors=True)

    row = run(
        "mergebuild add_difference, first build (inputs never hashed)",
        mergebuild(single, cache),
        [cache],
        never_seen,
    )
    row["floor"] = floor["wall"]
    first = digest(out)
    hash_first = " ".join([*mergebuild(single, cache), "-n", "&&", *mergebuild(single, cache)])
    row = run(
        "mergebuild add_difference, hash first (-n), then build",
        ["sh", "-c", hash_first],
        [cache],
        never_seen,
    )
    row["floor"] = floor["wall"]
    r.check("check: first build output == memo-warm output", first == j2)
    two = DATA / f"{arch}-two.yaml"
    recipe(two, m, two_step=True)

    def two_step_row(label: str, cmd: list[str], prepare: Callable[[], None]) -> None:
        """A two-step row: against the four-input floor and the single add_difference."""
        row = run(label, cmd, [cache], prepare)
        row["floor"] = floor2["wall"]
        row["vs_single"] = row["wall"] / single_wall

    r.dry_run(two)  # the memo again (the first-build rows emptied the cache)
    two_step_row("mergebuild two-step recipe, cold cache", mergebuild(two, cache), cold)
    two_step_row(
        "mergebuild two-step, first build (inputs never hashed)", mergebuild(two, cache), never_seen
    )
    r.dry_run(two)
    fused = data_digest(out)
    two_step_row(
        "mergebuild two-step, s1 `cache: false` (one pass)",
        [*mergebuild(two, cache), "--set", "s1.cache=false"],
        cold,
    )
    # fold: the two steps as one sum a − 0.7·b − 0.3·c + d, rounded once (target ≤ 1.15× single)
    two_step_row(
        "mergebuild two-step, s2 `fold: true` (one sum)",
        [*mergebuild(two, cache), "--set", "s2.fold=true"],
        cold,
    )
    # the unfused, step-by-step build: s1 materialized as its own output, then step 2 from it
    step1 = DATA / f"{arch}-step1.yaml"
    step1.write_text(
        two.read_text().replace("outputs:\n  o: {from: s2", "outputs:\n  o: {from: s1")
    )
    cold()
    subprocess.run(mergebuild(step1, cache), check=True, env={**os.environ, "PYTHONPATH": str(SRC)})
    s1_file = DATA / f"{arch}-s1.safetensors"
    shutil.move(out, s1_file)
    step2 = DATA / f"{arch}-step2.yaml"
    step2.write_text(
        f"mergebuild: 1\nmodels:\n  s1: {s1_file}\n  b: {m['b']}\n  d: {m['d']}\n"
        "merges:\n  s2: s1 + (d - b) * 1.0\n"
        f"outputs:\n  o: {{from: s2, path: {out}, dtype: fp16}}\n"
    )
    subprocess.run(mergebuild(step2, cache), check=True, env={**os.environ, "PYTHONPATH": str(SRC)})
    same = data_digest(out) == fused
    s1_file.unlink()
    print(f"  fused == step-by-step tensors: {same}")
    r.check("check: -j1 output == -j2 output", j1 == j2)
    r.check("check: fused tensors == step-by-step", same)

    def first_step_cached() -> None:
        cold()
        recipe(two, m, two_step=True)
        subprocess.run(
            mergebuild(two, cache), check=True, env={**os.environ, "PYTHONPATH": str(SRC)}
        )
        recipe(two, m, two_step=True, alpha2=0.7)

    row = run(
        "mergebuild two-step, first step cached", mergebuild(two, cache), [cache], first_step_cached
    )
    row["floor"] = floor["wall"]


def run_arch(arch: str, rows: list[dict], groups: set[str], others: bool, repeat: int) -> None:
    r = Runner(arch, rows, repeat)
    first = len(rows)
    abc = [str(r.m[k]) for k in "abc"]
    shutil.rmtree(r.cache, ignore_errors=True)
    floor = r.floor("I/O floor: read a,b,c once + write out, fsync", abc)
    floor2 = r.floor("I/O floor, two-step: read a,b,c,d + write out", [*abc, str(r.m["d"])])
    over = r.overlapped("I/O floor, overlapped: read a,b,c while writing out", abc)
    over2 = r.overlapped(
        "I/O floor, two-step, overlapped: read a,b,c,d while writing out", [*abc, str(r.m["d"])]
    )
    for row in (over, over2):
        row["floor"] = (floor if row is over else floor2)["wall"]
    if "core" in groups:
        r.group = "core"
        core_rows(r, floor, floor2, others)
        for row in rows[first:]:  # every core row against the overlapped floor too
            if "wall" in row and "overlap" not in row and row.get("group") == "core":
                row["overlap"] = (over2 if "two-step" in row["job"] else over)["wall"]
    if "methods" in groups:
        import method_rows

        floor_ab = r.floor("I/O floor, two inputs: read a,b + write out", abc[:2])
        floors = {"ab": floor_ab["wall"], "abc": floor["wall"], "abcd": floor2["wall"]}
        r.group = "methods"
        method_rows.add(r, floors, mecha=others)
    for row in rows[first:]:
        if "floor" not in row and "wall" in row:
            row["floor"] = floor["wall"] if "two-step" not in row["job"] else floor2["wall"]
    shutil.rmtree(r.cache, ignore_errors=True)
    r.out.unlink(missing_ok=True)


def report(rows: list[dict]) -> str:
    lines = [
        "| model | job | wall (s) | × floor | × overlapped floor | × single job "
        "| peak RSS (GB) | CPU (s) | read (GB) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "ok" in r:
            lines.append(f"| {r['arch']} | {r['job']} | {'yes' if r['ok'] else 'NO'} | | | | | | |")
            continue
        ratio = r["wall"] / r["floor"] if r.get("floor") else float("nan")
        single = f"{r['vs_single']:.2f}" if "vs_single" in r else ""
        over = f"{r['wall'] / r['overlap']:.2f}" if r.get("overlap") else ""
        cpu = f"{r['cpu']:.1f}" if "cpu" in r else ""
        read = f"{r['read_gb']:.2f}" if "read_gb" in r else ""
        lines.append(
            f"| {r['arch']} | {r['job']} | {r['wall']:.1f} | {ratio:.2f} | {over} | {single} "
            f"| {r['rss']:.2f} | {cpu} | {read} |"
        )
    return "\n".join(lines)


GROUPS = ("core", "methods")


def write_results(
    name: str, title: str, about: str, rows: list[dict], load_start: float, table: str
) -> None:
    """bench/NAME: a title, what was measured, the load average, the command, the table and
    the rows as JSON (the format every bench script writes)."""
    script = Path(sys.argv[0]).name
    text = (
        f"# mergebuild benchmark: {title}\n\nMachine: {os.cpu_count()} cores. {about} Load "
        f"average (1 min) at the start and the end of the run: {load_start:.1f}, "
        f"{os.getloadavg()[0]:.1f}.\n\nCommand: `python bench/{script} "
        f"{' '.join(sys.argv[1:])}`\n\n{table}\n\n```json\n{json.dumps(rows, indent=1)}\n```\n"
    )
    (HERE / name).write_text(text)
    print(f"\nwritten to {HERE / name}")


def earlier_rows(rows: list[dict]) -> list[dict]:
    """Rows of the previous results.md that this run did not measure again (a partial run,
    e.g. `--rows methods`, keeps the others, shown apart: their × floor is their own run's)."""
    path = HERE / "results.md"
    try:
        text = path.read_text()
        old = json.loads(text[text.index("```json") + 7 : text.rindex("```")])
    except (OSError, ValueError):
        return []
    done = {(r["arch"], r["job"]) for r in rows} | {(r["arch"], r["group"]) for r in rows}
    return [
        r
        for r in old
        if isinstance(r, dict)
        and (r.get("arch"), r.get("job")) not in done
        and (r.get("arch"), r.get("group")) not in done
    ]


def warm_compiled() -> None:
    """Compile numba's loops before timing (as `make install` does): a row should not pay the
    one-time compile that follows an edit of _kernels.py."""
    code = "from mergebuild.engine.methods import _kernels; _kernels.warm()"
    subprocess.run([PY, "-c", code], check=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--arch", default="sd1,sdxl", help="comma list of sd1, sdxl")
    ap.add_argument(
        "--rows",
        default=",".join(GROUPS),
        help="comma list of row groups: core (baselines, add_difference, two-step), methods "
        "(train_difference, triple_sum, add_cosine_a, ties, slerp, dare_ties and their sd-mecha "
        "rows); the floors always run",
    )
    ap.add_argument(
        "--no-others", action="store_true", help="skip the in-memory and sd-mecha baselines"
    )
    ap.add_argument("--repeat", type=int, default=3, help="runs per row; the fastest is kept")
    args = ap.parse_args()
    warm_compiled()
    groups = set(args.rows.split(","))
    if not groups <= set(GROUPS):
        ap.error(f"--rows: unknown group(s) {', '.join(sorted(groups - set(GROUPS)))}")
    try:
        import sd_mecha  # noqa: F401

        have_mecha = True
    except ImportError:
        have_mecha = False
        print(f"sd-mecha not installed (pip install sd-mecha=={SD_MECHA_VERSION}); skipping it")
    rows: list[dict] = []
    for arch in args.arch.split(","):
        # loading three SDXL models fully would need ~21 GB: baselines run on SD1 only
        run_arch(
            arch,
            rows,
            groups,
            others=(arch == "sd1" and not args.no_others and have_mecha),
            repeat=args.repeat,
        )
    table = report(rows)
    print("\n" + table)
    earlier = earlier_rows(rows)
    header = (
        f"# mergebuild benchmark\n\nMachine: {os.cpu_count()} cores. Page cache emptied "
        "(posix_fadvise DONTNEED) before every run; wall time and peak RSS of the child "
        "process (VmHWM); best of the runs per row (sd-mecha method rows: one run). Floor = "
        "reading the inputs once, all at "
        "once (through the page cache with a 1 GiB posix_fadvise window ahead, or with O_DIRECT "
        "and 16 requests in flight) + then writing the output with fsync (buffered or "
        "O_DIRECT), in the same run; × floor is against the fastest of these for the same "
        "inputs (a method reading a,b is compared with the a,b floor, one reading a,b,c,d "
        "with the a,b,c,d floor). × overlapped floor: against reading the inputs with O_DIRECT "
        "while a thread writes the output with O_DIRECT, then fsync (what a streaming merge "
        "can at best do; core and method rows). × single job: against `mergebuild "
        "add_difference -j2` (the same command on the one-step recipe).\n\n"
        f"Command: `python bench/run.py {' '.join(sys.argv[1:])}`\n\n"
    )
    if earlier:
        table += (
            "\n\nRows of an earlier run that this one did not measure again (their × floor "
            "is against that run's floor):\n\n" + report(earlier)
        )
    (HERE / "results.md").write_text(
        header + table + "\n\n```json\n" + json.dumps(rows + earlier, indent=1) + "\n```\n"
    )
    print(f"\nwritten to {HERE / 'results.md'}")


if __name__ == "__main__":
    main()
