"""Long and wide recipes: where does planning and building time go as a DAG grows?

Generates tiny models (a few keys, safetensors.numpy) and recipes of N merge nodes:
  chain    nK: n(K-1) * 0.5 + b * 0.5          (depth N)
  diamond  lK, rK from m(K-1), mK from lK, rK  (2^K paths from the first node to the last)
  wide     N independent merges of a and b, reduced by a binary tree (depth log2 N)
  outputs  N independent merges, each its own output (N outputs)
each with or without `cache: false` on every merge node, then times `-n`, a cold build and a
fully cached rebuild, each in a child process (what a user waits for, imports included).

  python bench/chains.py                     # chain, N = 100 300 1000, cached and cache:false
  python bench/chains.py --shape diamond --n 300 --no-false
  python bench/chains.py --dry-only --n 10000
  python bench/chains.py --profile build --n 1000   # cProfile of one cold build, top 25
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"
SHAPES = ("chain", "diamond", "wide", "outputs")
CPU_SECONDS: list[float] = []  # of each run(), in order


def write_models(directory: Path, keys: int = 4, numel: int = 64, seed: int = 0) -> None:
    """Two float16 models `a` and `b` with `keys` tensors of `numel` elements each."""
    import numpy as np
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    for name in ("a", "b"):
        tensors = {
            f"w{i}": rng.standard_normal(numel).astype(np.float16).reshape(-1, 8)
            for i in range(keys)
        }
        save_file(tensors, str(directory / f"{name}.safetensors"))


def recipe_text(shape: str, n: int, no_cache: bool = False, explicit: bool = False) -> str:
    """A recipe of `n` merge nodes (about n for diamond) over models/a and models/b."""
    lines = [
        "mergebuild: 1",
        "models:",
        "  a: models/a.safetensors",
        "  b: models/b.safetensors",
        "merges:",
    ]
    outputs: list[tuple[str, str]] = []

    def node(name: str, a: str, b: str, alpha: float) -> None:
        if explicit or no_cache:
            extra = ", cache: false" if no_cache else ""
            lines.append(
                f"  {name}: {{method: weighted_sum, a: {a}, b: {b}, alpha: {alpha}{extra}}}"
            )
        else:
            lines.append(f"  {name}: {a} * {1 - alpha} + {b} * {alpha}")

    if shape == "chain":
        node("n1", "a", "b", 0.5)
        for k in range(2, n + 1):
            node(f"n{k}", f"n{k - 1}", "b", 0.5)
        outputs.append(("final", f"n{n}"))
    elif shape == "diamond":
        layers = max(1, n // 3)
        node("m0", "a", "b", 0.5)
        for k in range(1, layers + 1):
            node(f"l{k}", f"m{k - 1}", "a", 0.25)
            node(f"r{k}", f"m{k - 1}", "b", 0.75)
            node(f"m{k}", f"l{k}", f"r{k}", 0.5)
        outputs.append(("final", f"m{layers}"))
    elif shape in ("wide", "outputs"):
        level = []
        for k in range(n):
            node(f"w{k}", "a", "b", round((k % 97 + 1) / 99, 6))
            level.append(f"w{k}")
        if shape == "outputs":
            outputs += [(f"o{k}", name) for k, name in enumerate(level)]
        else:
            depth = 0
            while len(level) > 1:
                depth += 1
                nxt = []
                for i in range(0, len(level) - 1, 2):
                    name = f"t{depth}_{i // 2}"
                    node(name, level[i], level[i + 1], 0.5)
                    nxt.append(name)
                if len(level) % 2:
                    nxt.append(level[-1])
                level = nxt
            outputs.append(("final", level[0]))
    else:
        raise ValueError(shape)
    lines.append("outputs:")
    for name, src in outputs:
        lines.append(f"  {name}: {{from: {src}, path: out/{name}.safetensors}}")
    return "\n".join(lines) + "\n"


def run(args: list[str], cache: Path, cwd: Path, timeout: float = 3600) -> float:
    """Wall seconds of one CLI run; its CPU seconds (user + system) go to CPU_SECONDS.

    CPU time is the steadier figure on a shared machine: wall time counts other processes."""
    env = {**os.environ, "PYTHONPATH": str(SRC), "MERGEBUILD_CACHE_DIR": str(cache)}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    p = subprocess.run(
        [sys.executable, "-m", "mergebuild", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    dt = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    CPU_SECONDS.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
    if p.returncode != 0:
        tail = (p.stderr or p.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f"{' '.join(args)}: exit {p.returncode}: {' | '.join(tail)}")
    return dt


def measure(
    shape: str, n: int, no_cache: bool, dry_only: bool, timeout: float, size: tuple[int, int]
) -> dict:
    with tempfile.TemporaryDirectory(prefix="mb-chains-") as tmp:
        work = Path(tmp) / "work"
        write_models(work / "models", *size)
        (work / "r.yaml").write_text(recipe_text(shape, n, no_cache))
        cache = Path(tmp) / "cache"
        row = {"shape": shape, "n": n, "cache": "false" if no_cache else "default"}
        row["dry"] = run(["r.yaml", "-n", "-q"], cache, work, timeout)
        row["dry_cpu"] = CPU_SECONDS[-1]
        if dry_only:
            return row
        try:
            row["cold"] = run(["r.yaml", "-q"], cache, work, timeout)
            row["cold_cpu"] = CPU_SECONDS[-1]
            row["cached"] = run(["r.yaml", "-q"], cache, work, timeout)
            row["cached_cpu"] = CPU_SECONDS[-1]
        except subprocess.TimeoutExpired:
            row.setdefault("cold", f">{timeout:.0f}")
        except RuntimeError as e:
            row.setdefault("cold", "error")
            row["error"] = str(e)
        shutil.rmtree(cache, ignore_errors=True)
        return row


def profile(shape: str, n: int, no_cache: bool, what: str, top: int, size: tuple[int, int]) -> None:
    """cProfile of one `-n`, cold build or cached rebuild, run in a child process."""
    with tempfile.TemporaryDirectory(prefix="mb-chains-") as tmp:
        work = Path(tmp) / "work"
        write_models(work / "models", *size)
        (work / "r.yaml").write_text(recipe_text(shape, n, no_cache))
        cache = Path(tmp) / "cache"
        if what == "cached":
            run(["r.yaml", "-q"], cache, work)
        prof = Path(tmp) / "prof"
        env = {**os.environ, "PYTHONPATH": str(SRC), "MERGEBUILD_CACHE_DIR": str(cache)}
        flags = ["-n"] if what == "dry" else []
        cmd = [sys.executable, "-m", "cProfile", "-o", str(prof), "-m", "mergebuild"]
        subprocess.run([*cmd, "r.yaml", "-q", *flags], cwd=work, env=env, check=True)
        import pstats

        pstats.Stats(str(prof)).sort_stats("cumulative").print_stats(top)
        pstats.Stats(str(prof)).sort_stats("tottime").print_stats(top)


def _cell(row: dict, k: str) -> str:
    v, cpu = row.get(k), row.get(f"{k}_cpu")
    if isinstance(v, float):
        return f"{v:7.2f} ({cpu:5.1f})" if cpu is not None else f"{v:14.2f}"
    return f"{v or '-':>14}"


def main() -> None:
    global SRC
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=SHAPES, default="chain")
    ap.add_argument("--n", type=int, nargs="+", default=[100, 300, 1000])
    ap.add_argument("--no-false", action="store_true", help="skip the cache: false variant")
    ap.add_argument("--only-false", action="store_true", help="only the cache: false variant")
    ap.add_argument("--dry-only", action="store_true", help="time only `-n`")
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--profile", choices=["dry", "build", "cached"])
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--keys", type=int, default=4, help="tensors per model")
    ap.add_argument("--numel", type=int, default=64, help="elements per tensor (fp16)")
    ap.add_argument("--src", type=Path, default=SRC, help="mergebuild sources to measure")
    a = ap.parse_args()
    SRC = a.src.resolve()
    size = (a.keys, a.numel)
    variants = [True] if a.only_false else [False] if a.no_false else [False, True]
    if a.profile:
        profile(a.shape, a.n[0], variants[0], a.profile, a.top, size)
        return
    print("wall seconds (CPU seconds: user + system)")
    print(f"{'shape':<8} {'n':>6} {'cache':<8} {'-n':>14} {'cold':>14} {'cached':>14}")
    for n in a.n:
        for no_cache in variants:
            r = measure(a.shape, n, no_cache, a.dry_only, a.timeout, size)

            cells = " ".join(_cell(r, k) for k in ("dry", "cold", "cached"))
            print(f"{r['shape']:<8} {r['n']:>6} {r['cache']:<8} {cells}", flush=True)
            if "error" in r:
                print(f"  {r['error']}", flush=True)


if __name__ == "__main__":
    main()
