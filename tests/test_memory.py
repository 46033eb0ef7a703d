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


def test_whole_units_held_at_once_stay_under_a_quarter_of_the_budget(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whole-tensor units (TIES here: each key's four inputs held whole) run two at a time
    only while the bytes they read stay within a quarter of --max-memory; one alone may be
    larger (batches of small keys are bounded apart). Recorded by wrapping the worker's unit,
    on a -j2 build, the output compared with -j1's (the cap changes when keys run, never what
    they give)."""
    import threading

    from mergebuild.cli import main
    from mergebuild.demo import synthesize
    from mergebuild.engine import executor

    for name in "abcd":
        synthesize(tmp_path / f"{name}.safetensors", name, scale=1 / 8, dtype="fp16")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "mergebuild: 1\nmodels: {a: a.safetensors, b: b.safetensors, c: c.safetensors, "
        "d: d.safetensors}\nmerges:\n  m: {method: ties, base: a, models: [b, c, d], k: 0.5}\n"
        "outputs:\n  o: {from: m, path: o.safetensors}\n"
    )
    budget = 16 << 20
    held, worst, lock = [0], [0, 0], threading.Lock()
    original = executor.FusedPass._do_unit

    def tracked(self: executor.FusedPass, u: executor.Unit) -> None:
        large = u.whole and u.hi - u.lo >= executor.SMALL_UNIT
        n = sum(length for _, _, length in self._ranges(u)) if large else 0
        with lock:
            held[0] += n
            worst[0] = max(worst[0], held[0])
            worst[1] = max(worst[1], n)
        try:
            original(self, u)
        finally:
            with lock:
                held[0] -= n

    monkeypatch.setattr(executor.FusedPass, "_do_unit", tracked)
    args = [str(recipe), "-q", "--max-memory", str(budget), "--cache-dir"]
    assert main([*args, str(tmp_path / "c2"), "-j", "2"]) == 0
    two = (tmp_path / "o.safetensors").read_bytes()
    assert worst[1] > budget // 4 // 2  # keys large enough for the cap to matter
    assert worst[0] <= max(budget // 4, worst[1])
    (tmp_path / "o.safetensors").unlink()
    assert main([*args, str(tmp_path / "c1"), "-j", "1"]) == 0
    assert (tmp_path / "o.safetensors").read_bytes() == two
