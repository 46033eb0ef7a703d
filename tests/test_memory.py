"""Peak memory does not grow with model size (measured, not timed)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import SRC

# Runs the CLI in-process and reports this process's own peak RSS. VmHWM belongs to the address
# space created at exec, so unlike rusage it does not inherit the (large) pytest parent's peak.
PROBE = """
import sys
from mergebuild.cli import main
rc = main(sys.argv[1:])
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]
print("HWM", hwm, file=sys.stderr)
raise SystemExit(rc)
"""


def peak_rss_kb(recipe: Path, cache: Path) -> int:
    env = {**os.environ, "PYTHONPATH": str(SRC), "MERGEBUILD_CHUNK_ELEMENTS": "65536"}
    p = subprocess.run(
        [sys.executable, "-c", PROBE, str(recipe), "-q", "-j", "1", "--cache-dir", str(cache)],
        env=env,
        capture_output=True,
        text=True,
    )
    assert p.returncode == 0, p.stderr
    return int(p.stderr.split("HWM")[-1].split()[0])


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_peak_rss_independent_of_model_size(tmp_path: Path) -> None:
    from mergebuild.demo import synthesize

    rss = {}
    for label, scale in (("tiny", 1 / 256), ("small", 1 / 8), ("large", 1 / 4)):
        d = tmp_path / label
        for name in ("a", "b", "c"):
            synthesize(d / f"{name}.safetensors", name, scale=scale, dtype="fp16")
        recipe = d / "r.yaml"
        recipe.write_text(
            "mergebuild: 1\nmodels: {a: a.safetensors, b: b.safetensors, "
            "c: c.safetensors}\nmerges:\n  m: a + (b - c) * 0.5\n"
            "outputs:\n  o: {from: m, path: o.safetensors}\n"
        )
        rss[label] = peak_rss_kb(recipe, tmp_path / f"cache-{label}")
        size = sum((d / f"{n}.safetensors").stat().st_size for n in "abc")
        rss[label + "_inputs_kb"] = size // 1024
    # the large inputs are ~4x the small ones (~100 MB more); memory above the interpreter and
    # torch baseline (the tiny run) must not grow with them
    grow_inputs = rss["large_inputs_kb"] - rss["small_inputs_kb"]
    grow_rss = rss["large"] - rss["small"]
    assert grow_inputs > 200_000
    assert grow_rss < 0.1 * grow_inputs, rss
    assert rss["large"] - rss["tiny"] < 0.25 * rss["large_inputs_kb"], rss
