"""Per-method compute time and memory on one SD-size tensor, single torch thread (as the
executor runs each key; a whole-tensor method's tiles cast into an fp16 result as the per-key
stage does), optionally against sd-mecha's ties_sum on the same inputs.

    python bench/taskvec_methods.py [--numel N] [--models N] [--sd-mecha] [METHOD ...]

Each method runs in a fresh subprocess so that peak RSS (VmHWM, reset after the inputs are
made) is the method's own. Not a test: prints figures only.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
METHODS = ["ties", "dare_ties", "della", "model_stock", "add_perpendicular", "geometric_median"]
PARAMS = {
    "ties": {"k": 0.2},
    "dare_ties": {"p": 0.9},
    "della": {"p": 0.9, "eps": 0.1},
    "slerp": {"alpha": 0.3},
    "add_cosine_a": {"alpha": 0.0},
    "triple_sum": {"alpha": 0.3, "beta": 0.2},
    "train_difference": {"alpha": 1.0},
}

CHILD = r"""
import sys, time, torch
sys.path.insert(0, {src!r})
torch.set_num_threads(1)
from mergebuild.engine.tuning import keep_freed_memory
keep_freed_memory()  # as the executor does for a build: freed tiles are reused, not re-faulted
name, numel, n = {name!r}, {numel}, {n}
g = torch.Generator().manual_seed(0)
base = torch.randn(numel, generator=g).half()
xs = [base] + [(base.float() + 0.01 * torch.randn(numel, generator=g)).half() for _ in range(n)]
def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) / 1024
if name == "sd_mecha_ties_sum":
    from sd_mecha.extensions.builtin.merge_methods import ties
    open("/proc/self/clear_refs", "w").write("5")
    rss0, t, cpu = status("VmRSS"), time.perf_counter(), time.process_time()
    b = xs[0].float()
    out = b + ties.ties_sum.__wrapped__(*[x.float() - b for x in xs[1:]], k=0.2, vote_sgn=True)
else:
    from mergebuild.engine.methods import REGISTRY
    from mergebuild.engine.methods.base import ComputeContext
    m = REGISTRY[name]
    if m.inputs_form == "slots":
        xs = xs[: len(m.slots)]
    p = m.Params(**{params!r})
    c = ComputeContext("w", 0, numel, "ab" * 16, 0)
    open("/proc/self/clear_refs", "w").write("5")
    rss0, t, cpu = status("VmRSS"), time.perf_counter(), time.process_time()
    # as the per-key stage does: tiles cast into an fp16 result when the method splits
    from mergebuild.engine.compute import _from_tiles
    tiles = m.split(p, xs, c if m.needs_context else None)
    done = None if tiles is None else _from_tiles(tiles, torch.float16)
    if done is None:
        out = (m.compute(p, xs, c) if m.needs_context else m.compute(p, xs)).half()
dt, dcpu = time.perf_counter() - t, time.process_time() - cpu
print(f"{{name:20}} {{dt:7.2f}} s wall {{dcpu:7.2f}} s CPU  "
      f"{{dcpu / numel / n * 1e9:6.1f}} ns CPU/element/model  "
      f"+{{status('VmHWM') - rss0:5.0f}} MB peak over inputs")
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("methods", nargs="*", default=METHODS)
    ap.add_argument("--numel", type=int, default=49408 * 768)  # SD1's token embedding
    ap.add_argument("--models", type=int, default=3)
    ap.add_argument("--sd-mecha", action="store_true")
    a = ap.parse_args()
    names = a.methods + (["sd_mecha_ties_sum"] if a.sd_mecha else [])
    for name in names:
        code = CHILD.format(
            src=str(SRC), name=name, numel=a.numel, n=a.models, params=PARAMS.get(name, {})
        )
        subprocess.run([sys.executable, "-c", code], check=True)


if __name__ == "__main__":
    main()
