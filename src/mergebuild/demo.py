"""Synthetic SD-shaped models: real key names and ranks, shrunken dims, deterministic values.

Tests, the demo and the benchmarks need checkpoints without downloading any. Values are
`base(key) + 0.5 · own(model, key)` so the models resemble fine-tunes of one base and merges
between them are meaningful; every tensor is seeded from (seed, model, key) and streamed to disk
one at a time, so even full-size (scale=1) models need little memory.
"""

from __future__ import annotations

import json
import math
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import xxhash

from mergebuild.atomic import atomic_file

DEMO_MODELS = {
    "anything-v3": "anything",
    "nai-full": "nai_full",
    "nai-sfw": "nai_sfw",
    "gape60": "gape",
    "insta": "insta",
    "wd13": "wd13",
    "v1-5-pruned": "sd15",
    "sd-v1-5-inpainting": "sd15_inpainting",
}
# UNet input channels of demo models that are not plain 4-channel ones (examples/inpainting.yaml)
DEMO_IN_CHANNELS = {"sd-v1-5-inpainting": 9}
# `demo-models --arch flux|sd3` (examples/flux_mix.yaml): file stem → file form. Flux models come
# as ComfyUI all-in-one files and as transformer-only files with bare or prefixed keys.
DIT_DEMO_MODELS = {
    "flux": {
        "flux1-dev": "all",
        "flux-realism": "bare",
        "flux-anime": "transformer",
        "flux1-schnell": "bare",
    },
    "sd3": {"sd3-medium": "all", "sd3-finetune": "all"},
}
FORMS = ("all", "transformer", "bare")  # all-in-one; transformer/UNet only; that with bare keys

SMALL_DIM = 16


@cache
def key_table(arch: str = "sd1") -> dict[str, dict[str, Any]]:
    """The packaged key list (name → shape, dtype, component, optional) for `sd1`, `sdxl`,
    `flux` (ComfyUI all-in-one names) or `sd3`."""
    text = resources.files("mergebuild.data").joinpath(f"{arch}_keys.json").read_text()
    return json.loads(text)["keys"]


def scaled_shape(shape: list[int], scale: float) -> tuple[int, ...]:
    if scale >= 1:
        return tuple(shape)
    return tuple(d if d <= SMALL_DIM else max(SMALL_DIM, math.ceil(d * scale)) for d in shape)


CONV_IN = "model.diffusion_model.input_blocks.0.0.weight"


def model_layout(
    arch: str = "sd1",
    scale: float = 1 / 32,
    dtype: str = "F16",
    ema: bool = False,
    in_channels: int = 4,
    form: str = "all",
    variant: str = "",
) -> dict[str, tuple[str, tuple[int, ...]]]:
    """key → (safetensors dtype, shape) of a synthetic model.

    `in_channels` 9 makes an inpainting UNet, 8 an instruct-pix2pix one (only the first conv
    differs, as in the real models). `form` "transformer" keeps only the diffusion model's keys,
    "bare" also drops their `model.diffusion_model.` prefix. `variant` "schnell" makes a Flux
    schnell (no guidance_in).
    """
    from mergebuild.sd.arch import UNET_PREFIX

    out = {}
    for key, spec in key_table(arch).items():
        if key.startswith("model_ema.") and not ema:
            continue
        if form != "all" and not key.startswith(UNET_PREFIX):
            continue
        if variant == "schnell" and ".guidance_in." in key:
            continue
        if form == "bare":
            key = key.removeprefix(UNET_PREFIX)
        if spec["dtype"].startswith("int"):
            out[key] = ({"int64": "I64", "int32": "I32"}[spec["dtype"]], tuple(spec["shape"]))
        else:
            out[key] = (dtype, scaled_shape(spec["shape"], scale))
    if in_channels != 4:  # SD: the UNet's first conv; Flux: img_in (Fill: 6× final_layer's)
        first = CONV_IN if arch != "flux" else UNET_PREFIX + "img_in.weight"
        if form == "bare":
            first = first.removeprefix(UNET_PREFIX)
        dt, shape = out[first]
        out[first] = (dt, (shape[0], in_channels, *shape[2:]))
    return out


def _seed(*parts: object) -> int:
    return xxhash.xxh3_64_intdigest(":".join(map(str, parts)).encode()) & ((1 << 63) - 1)


def synthesize(
    path: Path,
    name: str,
    arch: str = "sd1",
    scale: float = 1 / 32,
    seed: int = 0,
    dtype: str = "fp16",
    ema: bool = False,
    overrides: dict[str, Any] | None = None,
    in_channels: int = 4,
    form: str = "all",
    variant: str = "",
) -> Path:
    """Write one synthetic model to `path` (atomically). `overrides`: key → tensor to use.

    `arch` is "sd1", "sdxl", "flux" or "sd3" (the packaged key lists); `in_channels` 9/8 gives
    the inpainting / instruct-pix2pix variant; `form` and `variant` as in `model_layout`. Values
    are seeded by the key's ldm name, so a bare-key Flux file holds the same numbers as the
    prefixed one of the same name.
    """
    import torch

    from mergebuild.engine.dtypes import RECIPE_TO_ST, to_torch
    from mergebuild.engine.safetensors_io import TensorInfo
    from mergebuild.engine.stream_writer import StreamingWriter
    from mergebuild.sd.arch import UNET_PREFIX

    st = RECIPE_TO_ST[dtype]
    lay = model_layout(arch, scale, st, ema, in_channels, form, variant)
    overrides = overrides or {}
    infos = {}
    for k, (dt, shape) in lay.items():
        if k in overrides:
            t = overrides[k]
            from mergebuild.engine.dtypes import from_torch

            infos[k] = TensorInfo(from_torch(t.dtype), tuple(t.shape))
        else:
            infos[k] = TensorInfo(dt, shape)
    with atomic_file(path) as (fd, _):
        meta = {"mergebuild.synthetic": f"{arch}:{name}:{seed}"}
        with StreamingWriter(fd, infos, meta) as writer:
            for k, info in infos.items():
                if k in overrides:
                    t = overrides[k]
                elif not info.dtype.startswith(("F", "B")):
                    numel = math.prod(info.shape)
                    t = torch.arange(numel, dtype=to_torch(info.dtype)).reshape(info.shape)
                else:
                    ldm = UNET_PREFIX + k if form == "bare" else k
                    g = torch.Generator().manual_seed(_seed(seed, "base", ldm))
                    t = torch.randn(info.shape, generator=g)
                    g.manual_seed(_seed(seed, name, ldm))
                    t.add_(torch.randn(info.shape, generator=g), alpha=0.5)
                    t = t.to(to_torch(info.dtype))
                writer.write(k, t)
            writer.finish()
    return path


def write_demo_models(
    directory: Path, scale: float = 1 / 32, seed: int = 0, dtype: str = "fp16"
) -> list[Path]:
    """The models the example recipes name, skipping files that already exist unchanged."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for stem in DEMO_MODELS:
        path = directory / f"{stem}.safetensors"
        stamp = f"sd1:{stem}:{seed}"
        channels = DEMO_IN_CHANNELS.get(stem, 4)
        if not _is_current(path, stamp, scale, dtype, channels):
            synthesize(path, stem, scale=scale, seed=seed, dtype=dtype, in_channels=channels)
        paths.append(path)
    from mergebuild.lora.demo import write_demo_loras  # small LoRAs for examples/lora_bake.yaml

    return paths + write_demo_loras(directory, scale, seed)


def write_dit_models(
    directory: Path, arch: str, scale: float = 1 / 32, seed: int = 0, dtype: str = "bf16"
) -> list[Path]:
    """Synthetic Flux or SD3 models (`DIT_DEMO_MODELS`), in the file forms people have."""
    from mergebuild.engine.dtypes import RECIPE_TO_ST

    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for stem, form in DIT_DEMO_MODELS[arch].items():
        path = directory / f"{stem}.safetensors"
        variant = "schnell" if "schnell" in stem else ""
        want = model_layout(arch, scale, RECIPE_TO_ST[dtype], form=form, variant=variant)
        if not _is_current(path, f"{arch}:{stem}:{seed}", scale, dtype, want=want):
            synthesize(path, stem, arch, scale, seed, dtype, form=form, variant=variant)
        paths.append(path)
    return paths


def _is_current(
    path: Path,
    stamp: str,
    scale: float,
    dtype: str,
    in_channels: int = 4,
    want: dict[str, tuple[str, tuple[int, ...]]] | None = None,
) -> bool:
    if not path.is_file():
        return False
    from mergebuild.engine.dtypes import RECIPE_TO_ST
    from mergebuild.engine.safetensors_io import read_header

    try:
        header = read_header(path)
    except Exception:
        return False
    if want is None:
        want = model_layout("sd1", scale, RECIPE_TO_ST[dtype], in_channels=in_channels)
    have = {k: (v[0].dtype, v[0].shape) for k, v in header.tensors.items()}
    return header.metadata.get("mergebuild.synthetic") == stamp and have == want
