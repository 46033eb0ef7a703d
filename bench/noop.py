"""No-op speed: a fully cached build, `-n`, and make over 20 cached recipes.

Run by `make bench` after bench/run.py. Model size does not matter here (nothing is read), so
small demo models are used. Baselines measured in the same run: the interpreter's own start
(`python -c pass`) and the normal cached path (`--json` always takes it). Each row is the median
of N runs. Results go to bench/noop_results.md.

Targets (issue 16): ≤ 0.25 s wall for a cached build and for `-n`; make over 20 cached recipes
in ≤ 5 s.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"
WORK = HERE / ".data" / "noop"
PY = sys.executable
RUNS = 10
RECIPES = 20
ENV = {**os.environ, "PYTHONPATH": str(SRC), "MERGEBUILD_CACHE_DIR": str(WORK / "cache")}
RECIPE = """mergebuild: 1
models:
  a: models/anything-v3.safetensors
  b: models/nai-full.safetensors
  c: models/nai-sfw.safetensors
merges:
  m: a + (b - c) * {alpha}
outputs:
  o: {{from: m, path: out/r{i}.safetensors}}
"""


def timed(cmd: list[str], cwd: Path = WORK) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=cwd, env=ENV, check=True, capture_output=True)
    return time.perf_counter() - t0


def median(cmd: list[str], runs: int = RUNS) -> float:
    return statistics.median(timed(cmd) for _ in range(runs))


def main() -> None:
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    mb = [PY, "-m", "mergebuild"]
    subprocess.run([*mb, "demo-models", "models", "--scale", "0.03125"], cwd=WORK, env=ENV,
                   check=True, capture_output=True)  # fmt: skip
    for i in range(RECIPES):
        (WORK / f"r{i}.yaml").write_text(RECIPE.format(alpha=0.05 * (i + 1), i=i))
        mk = subprocess.run([*mb, "makefile", f"r{i}.yaml"], cwd=WORK, env=ENV, check=True,
                            capture_output=True, text=True).stdout  # fmt: skip
        (WORK / f"r{i}.mk").write_text(mk)
    includes = " ".join(f"r{i}.mk" for i in range(RECIPES))
    (WORK / "Makefile").write_text(
        f"MERGEBUILD := {PY} -m mergebuild\ninclude {includes}\nall: $(MERGEBUILD_OUTPUTS)\n"
    )
    subprocess.run(["make", "-j2", "all"], cwd=WORK, env=ENV, check=True, capture_output=True)
    rows = []
    floor = median([PY, "-c", "pass"])
    rows.append(("python -c pass (interpreter start)", floor, None))
    normal = median([*mb, "r0.yaml", "--json"])
    rows.append(("cached build, normal path (--json)", normal, None))
    rows.append(("cached build (no-op stamp)", median([*mb, "r0.yaml", "-q"]), 0.25))
    rows.append(("-n (no-op stamp)", median([*mb, "r0.yaml", "-n"]), 0.25))
    loop = [
        "sh", "-c", " && ".join(f"{PY} -m mergebuild r{i}.yaml -q" for i in range(RECIPES)),
    ]  # fmt: skip
    rows.append((f"{RECIPES} cached recipes, one mergebuild each", median(loop, 3), 5.0))
    rows.append(
        (f"make over {RECIPES} cached recipes (nothing to do)", median(["make", "all"]), 5.0)
    )

    def touched() -> float:
        os.utime(WORK / "models/nai-sfw.safetensors")  # every rule runs; every build a hit
        return timed(["make", "-j2", "all"])

    rows.append((f"make -j2 after touching an input of all {RECIPES}", statistics.median(
        touched() for _ in range(3)), None))  # fmt: skip
    lines = [
        "# mergebuild no-op benchmark",
        "",
        f"Machine: {os.cpu_count()} cores. Median of {RUNS} runs (3 for the loops). "
        "× start: against `python -c pass` measured in the same run. Command: "
        "`python bench/noop.py`.",
        "",
        "| job | wall (s) | × start | × normal cached path | target (s) | met |",
        "|---|---|---|---|---|---|",
    ]
    for label, wall, target in rows:
        met = "" if target is None else ("yes" if wall <= target else "NO")
        lines.append(
            f"| {label} | {wall:.3f} | {wall / floor:.1f} | {wall / normal:.2f} | "
            f"{'' if target is None else target} | {met} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    (HERE / "noop_results.md").write_text(text)


if __name__ == "__main__":
    main()
