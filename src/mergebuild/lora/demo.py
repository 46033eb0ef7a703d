"""Small synthetic LoRAs for the demo SD1 models: kohya LoRA, LoCon, LoHa and LoKr files.

Names are what kohya's trainer writes for SD1 (diffusers module paths, `lora_te_` for CLIP);
shapes follow the shrunken demo models, values are seeded from (seed, file, tensor name).
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import TYPE_CHECKING

from mergebuild.atomic import atomic_file
from mergebuild.lora.names import modules_of

if TYPE_CHECKING:
    import torch

UNET = "model.diffusion_model."
CLIP = "cond_stage_model.transformer."
RANK = 4
ALPHA = 2.0  # scale alpha/rank = 0.5, as many published LoRAs use
ATTN = re.compile(r"\.(proj_in|proj_out|attn[12]\.to_(q|k|v|out\.0)|ff\.net\.(0\.proj|2))\.weight$")
TE = re.compile(r"\.(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])\.weight$")
CONV = re.compile(
    r"\.(\d+\.(in_layers\.2|out_layers\.3|skip_connection)|\d+\.op|\d+\.conv)\.weight$"
)
# file stem → algorithm, and the modules it trains
DEMO_LORAS = {
    "detail-lora": "lora",  # attention + text encoder, kohya LoRA
    "style-locon": "locon",  # + resnet and sampler convs
    "texture-loha": "loha",
    "pose-lokr": "lokr",
}


def kohya_name(key: str) -> str | None:
    """kohya's SD1 module name for an LDM weight key, or None."""
    found = modules_of([key], "sd1", resnets=True)
    return next(iter(found), None)


def demo_targets(algorithm: str, scale: float) -> dict[str, tuple[int, ...]]:
    """LDM key → shape of every module a demo LoRA of `algorithm` trains."""
    from mergebuild.demo import model_layout

    out = {}
    for key, (_, shape) in model_layout("sd1", scale).items():
        if kohya_name(key) is None:
            continue
        te = algorithm in ("lora", "locon") and TE.search(key)
        conv = algorithm in ("locon", "loha") and CONV.search(key)
        emb = algorithm == "locon" and key.endswith(".emb_layers.1.weight")
        if ATTN.search(key) or te or conv or emb:
            out[key] = shape
    return out


def _split(n: int) -> int:
    """The largest divisor of n not above √n (LoKr's w1 side)."""
    return max(d for d in range(1, math.isqrt(n) + 1) if n % d == 0)


def lora_tensors(algorithm: str, scale: float, seed: int, stem: str) -> dict[str, torch.Tensor]:
    import torch

    from mergebuild.demo import _seed

    out: dict[str, torch.Tensor] = {}

    def rand(name: str, *shape: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(_seed(seed, stem, name))
        return (torch.randn(shape, generator=g) * 0.2).to(torch.float16)

    for key, shape in sorted(demo_targets(algorithm, scale).items()):
        name = kohya_name(key)
        assert name is not None
        o, i, kernel = shape[0], shape[1], tuple(shape[2:])
        if algorithm in ("lora", "locon"):
            out[f"{name}.lora_down.weight"] = rand(f"{name}.d", RANK, i, *kernel)
            out[f"{name}.lora_up.weight"] = rand(f"{name}.u", o, RANK, *(1,) * len(kernel))
        elif algorithm == "loha":
            cols = i * math.prod(kernel)
            for w in ("w1", "w2"):
                out[f"{name}.hada_{w}_a"] = rand(f"{name}.{w}a", o, RANK)
                out[f"{name}.hada_{w}_b"] = rand(f"{name}.{w}b", RANK, cols)
        else:
            a, b = _split(o), _split(i)
            out[f"{name}.lokr_w1"] = rand(f"{name}.w1", a, b)
            out[f"{name}.lokr_w2_a"] = rand(f"{name}.w2a", o // a, RANK)
            out[f"{name}.lokr_w2_b"] = rand(f"{name}.w2b", RANK, i // b)
        out[f"{name}.alpha"] = torch.tensor(ALPHA, dtype=torch.float16)
    return out


def write_lora(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    """Write `tensors` as a safetensors file (atomically), as trainers do."""
    from mergebuild.engine.dtypes import from_torch
    from mergebuild.engine.safetensors_io import TensorInfo
    from mergebuild.engine.stream_writer import StreamingWriter

    infos = {k: TensorInfo(from_torch(t.dtype), tuple(t.shape)) for k, t in tensors.items()}
    with atomic_file(path) as (fd, _), StreamingWriter(fd, infos, metadata) as writer:
        for k, t in tensors.items():
            writer.write(k, t.contiguous())
        writer.finish()
    return path


def write_demo_loras(directory: Path, scale: float = 1 / 32, seed: int = 0) -> list[Path]:
    """The demo LoRAs, skipping files that already exist with the same stamp."""
    from mergebuild.engine.safetensors_io import read_header

    paths = []
    for stem, algorithm in DEMO_LORAS.items():
        path = directory / f"{stem}.safetensors"
        stamp = f"lora:{stem}:{algorithm}:{scale}:{seed}"
        try:
            current = read_header(path).metadata.get("mergebuild.synthetic") == stamp
        except Exception:
            current = False
        if not current:
            meta = {
                "mergebuild.synthetic": stamp,
                "ss_network_dim": str(RANK),
                "ss_network_alpha": str(ALPHA),
                "ss_base_model_version": "sd_v1",
            }
            write_lora(path, lora_tensors(algorithm, scale, seed, stem), meta)
        paths.append(path)
    return paths
