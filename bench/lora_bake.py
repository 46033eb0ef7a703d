"""`make bench` rows for LoRA baking (issue 15): two rank-32 LoRAs into a full-size SDXL model.

The SDXL model (≈ 6.9 GB fp16, synthetic, real key names) is made once in bench/.data; the two
kohya LoRAs train every UNet attention / feed-forward / proj module and both text encoders
(≈ 230 MB each). Against the I/O floor of the same job, measured in the same run: read the
model and both LoRAs once and write a model-sized output with fsync (bench/run.py's floor, the
fastest of buffered / O_DIRECT reads and writes), and the overlapped floor (reads while a thread
writes). Rows: `copy` of the model (the engine's own floor), the bake with the inputs hashed
already (memo-warm), and the bake as a first build (fresh cache: the model is hashed while it
is merged). Page cache emptied before every run; wall, CPU and peak RSS of the child.

Target (issue 15, "Benchmark"): the bake ≤ 1.3× the I/O floor, peak RSS ≤ 1 GB; `check:` rows.
Results: bench/lora_results.md. `python bench/lora_bake.py [--repeat N]`.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"
DATA = HERE / ".data"
sys.path.insert(0, str(SRC))
sys.path.insert(0, str(HERE))

from run import FLOOR, PY, evict, measure, report, write_results  # noqa: E402

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
INPUTS = ("sdxl.safetensors", "lora_a.safetensors", "lora_b.safetensors")


def recipe(name: str, out: Path) -> Path:
    path = DATA / f"bench-{name}.yaml"
    path.write_text(f"mergebuild: 1\n{RECIPES[name]}outputs:\n  r: {{from: r, path: {out}}}\n")
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeat", type=int, default=1, help="runs per row; the fastest is kept")
    args = ap.parse_args()
    make_inputs()
    load_start = os.getloadavg()[0]
    rows: list[dict] = []
    inputs = [DATA / n for n in INPUTS]
    out = DATA / "lora-out.safetensors"
    cache = DATA / "lora-cache"
    size = inputs[0].stat().st_size

    def run(label: str, cmd: list[str], prepare=None) -> dict:
        best = (float("inf"), 0.0, 0.0, 0.0)
        for _ in range(args.repeat):
            if prepare:
                prepare()
            evict(*inputs)
            out.unlink(missing_ok=True)
            best = min(best, measure(cmd))
        wall, rss, cpu, read = best
        row = {
            "arch": "sdxl",
            "group": "lora",
            "job": label,
            "wall": wall,
            "rss": rss,
            "cpu": cpu,
            "read_gb": read,
        }
        rows.append(row)
        print(f"  {label:60} {wall:7.1f} s  {rss:5.2f} GB  {cpu:6.1f} s CPU", flush=True)
        return row

    floors = [
        run(
            f"I/O floor: read model + 2 LoRAs, write out ({r} read, {w} write)",
            [PY, "-c", FLOOR, r, w, *map(str, inputs), str(out), str(size)],
        )
        for r, w in (("buffered", "buffered"), ("buffered", "direct"), ("direct", "direct"))
    ]
    floor = min(floors, key=lambda x: x["wall"])
    over = run(
        "I/O floor, overlapped: reads while writing out",
        [PY, "-c", FLOOR, "direct", "overlap", *map(str, inputs), str(out), str(size)],
    )
    for x in (*floors, over):
        x["floor"] = floor["wall"]

    def fresh() -> None:
        shutil.rmtree(cache, ignore_errors=True)

    def cold() -> None:
        shutil.rmtree(cache / "objects", ignore_errors=True)

    def build(name: str) -> list[str]:
        return [
            PY,
            "-m",
            "mergebuild",
            str(recipe(name, out)),
            "-q",
            "-j2",
            "--allow-outside-paths",
            "--cache-dir",
            str(cache),
        ]

    fresh()
    subprocess.run(
        [*build("bake"), "-n"],
        check=True,
        env={**os.environ, "PYTHONPATH": str(SRC)},
        stdout=subprocess.DEVNULL,
    )  # hashes every input once
    rows_ = [
        run("mergebuild copy of the model (memo-warm)", build("copy"), cold),
        run("mergebuild bake 2 LoRAs (memo-warm)", build("bake"), cold),
        run("mergebuild bake 2 LoRAs, first build (inputs never hashed)", build("bake"), fresh),
    ]
    for x in rows_:
        x["floor"] = floor["wall"]
    bake, first = rows_[1], rows_[2]
    for x, what in ((bake, "memo-warm"), (first, "first build")):
        ratio = x["wall"] / floor["wall"]
        rows.append(
            {
                "arch": "sdxl",
                "group": "lora",
                "ok": ratio <= 1.3,
                "job": f"check: bake ({what}) ≤ 1.3× the I/O floor ({ratio:.2f}×)",
            }
        )
        rows.append(
            {
                "arch": "sdxl",
                "group": "lora",
                "ok": x["rss"] <= 1.0,
                "job": f"check: bake ({what}) peak RSS ≤ 1 GB ({x['rss']:.2f} GB)",
            }
        )
    fresh()
    out.unlink(missing_ok=True)
    table = report(rows)
    print("\n" + table)
    write_results(
        "lora_results.md",
        "baking LoRAs",
        "Full-size synthetic SDXL (fp16, 6.9 GB) and two kohya rank-32 LoRAs (UNet attention/"
        "feed-forward/proj, both text encoders; 230 MB each): `xl + lora(la, 0.6) + lora(lb, "
        "0.4)`, `-j2`. Page cache emptied before every run; wall time and peak RSS of the child "
        "(VmHWM); best of the runs per row. × floor: against reading the three inputs once and "
        "writing a model-sized output (fsync), the fastest of buffered / O_DIRECT reads and "
        "writes, in the same run.",
        rows,
        load_start,
        table,
    )


if __name__ == "__main__":
    main()
