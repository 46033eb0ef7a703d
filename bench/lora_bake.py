"""Baking two rank-32 LoRAs into a full-size SDXL model, against a `copy` of the same model.

The SDXL model (≈ 6.9 GB fp16, synthetic, real key names) is made once in bench/.data; the two
kohya LoRAs train every UNet attention / feed-forward / proj module and both text encoders
(≈ 230 MB each). Each build runs in a child process with a fresh cache (so both hash the model),
after the page cache is emptied for the inputs; wall time, CPU time and peak RSS are the child's.

  python bench/lora_bake.py            # prints one line per job
"""

from __future__ import annotations

import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"
DATA = HERE / ".data"
sys.path.insert(0, str(SRC))

ATTN = re.compile(r"\.(to_[qkv]|to_out\.0|proj_in|proj_out|ff\.net\.0\.proj|ff\.net\.2)\.weight$")
TE1 = re.compile(r"\.(q_proj|k_proj|v_proj|out_proj|fc1|fc2)\.weight$")
TE2 = {"self_attn_q_proj": (1280, 1280), "self_attn_k_proj": (1280, 1280),
       "self_attn_v_proj": (1280, 1280), "self_attn_out_proj": (1280, 1280),
       "mlp_fc1": (5120, 1280), "mlp_fc2": (1280, 5120)}  # fmt: skip


def make_inputs() -> None:
    import numpy as np
    from safetensors.numpy import save_file

    from mergebuild.demo import model_layout, synthesize

    DATA.mkdir(exist_ok=True)
    if not (DATA / "sdxl.safetensors").exists():
        synthesize(DATA / "sdxl.safetensors", "xl", arch="sdxl", scale=1.0)
    u, te1 = "model.diffusion_model.", "conditioner.embedders.0.transformer."
    for n, seed in (("a", 1), ("b", 2)):
        path = DATA / f"lora_{n}.safetensors"
        if path.exists():
            continue
        rng = np.random.default_rng(seed)
        t = {}

        def add(name: str, o: int, i: int) -> None:
            t[f"{name}.lora_down.weight"] = (rng.standard_normal((32, i)) * 0.02).astype(np.float16)  # noqa: B023
            t[f"{name}.lora_up.weight"] = (rng.standard_normal((o, 32)) * 0.02).astype(np.float16)  # noqa: B023
            t[f"{name}.alpha"] = np.array(16.0, dtype=np.float16)  # noqa: B023

        for k, (_, shape) in model_layout("sdxl", 1.0).items():
            if k.startswith(u) and ATTN.search(k):
                add("lora_unet_" + k[len(u) : -7].replace(".", "_"), shape[0], shape[1])
            elif k.startswith(te1 + "text_model.encoder.layers.") and TE1.search(k):
                add("lora_te1_" + k[len(te1) : -7].replace(".", "_"), shape[0], shape[1])
        for layer in range(32):
            for part, (o, i) in TE2.items():
                add(f"lora_te2_text_model_encoder_layers_{layer}_{part}", o, i)
        save_file(t, str(path))


RECIPES = {
    "copy": "models:\n  xl: sdxl.safetensors\nmerges:\n  r: {method: copy, a: xl}\n",
    "bake": "models:\n  xl: sdxl.safetensors\n  la: lora_a.safetensors\n  lb: lora_b.safetensors\n"
    "merges:\n  r: xl + lora(la, 0.6) + lora(lb, 0.4)\n",
}


def drop_cache(paths: list[Path]) -> None:
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def run(name: str, work: Path) -> str:
    recipe = DATA / f"bench-{name}.yaml"
    out = work / f"{name}.safetensors"
    recipe.write_text(f"mergebuild: 1\n{RECIPES[name]}outputs:\n  r: {{from: r, path: {out}}}\n")
    drop_cache(sorted(DATA.glob("*.safetensors")))
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    cmd = [sys.executable, "-m", "mergebuild", str(recipe), "-q", "-j2", "--allow-outside-paths",
           "--cache-dir", str(work / f"cache-{name}")]  # fmt: skip
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run(cmd, env=env, check=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    shutil.rmtree(work / f"cache-{name}")
    out.unlink()
    return f"{name}: {wall:.1f} s wall, {cpu:.1f} s CPU, peak RSS {after.ru_maxrss / 1e6:.2f} GB"


def main() -> None:
    make_inputs()
    with tempfile.TemporaryDirectory(dir=DATA) as tmp:
        for name in ("copy", "bake"):
            print(run(name, Path(tmp)), flush=True)
    print(f"load average: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
