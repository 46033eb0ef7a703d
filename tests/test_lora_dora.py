"""Baking DoRA LoRAs (dora_scale) through the CLI against a float64 numpy reference written
from the formula A1111 and ComfyUI apply: W_dora = m·(W + ΔW)/‖W + ΔW‖ (norm per input column
for a [1, in] magnitude, per output row for [out, 1]), result W + strength·(W_dora − W)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from conftest import load_st, run_cli
from test_lora_bake import DETAIL, STYLE, _fails, assert_close_fp16, kohya

U = "model.diffusion_model."
Q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
K = "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_attn2_to_k"
CONV = "lora_unet_down_blocks_1_resnets_0_conv1"
KEYS = {Q: DETAIL[Q], K: DETAIL[K], CONV: STYLE[CONV]}


def dora_file(path: Path, model: dict, axes: dict[str, str], seed: int, alpha: float = 1.0):
    """A rank-2 DoRA LoRA on `axes` (module → "col" | "row"); returns key → (ΔW, m, axis) in
    float64 from the factors as written (fp16)."""
    rng = np.random.default_rng(seed)
    t, out = {}, {}
    for name, axis in axes.items():
        key = KEYS[name]
        w = model[key].astype(np.float64)
        shape, kernel = w.shape, w.shape[2:]
        down = (rng.standard_normal((2, shape[1], *kernel)) * 0.3).astype(np.float16)
        up = (rng.standard_normal((shape[0], 2, *(1,) * len(kernel))) * 0.3).astype(np.float16)
        dw = up.reshape(shape[0], 2).astype(np.float64) @ down.reshape(2, -1).astype(np.float64)
        dw = dw.reshape(shape) * alpha / 2
        norm = col_norm(w) if axis == "col" else row_norm(w)
        m = (norm * rng.uniform(0.5, 1.5, norm.shape)).astype(np.float16)
        t[f"{name}.lora_down.weight"], t[f"{name}.lora_up.weight"] = down, up
        t[f"{name}.alpha"] = np.array(alpha, dtype=np.float16)
        t[f"{name}.dora_scale"] = m
        out[key] = (dw, m.astype(np.float64), axis)
    save_file(t, str(path))
    return out


def col_norm(w: np.ndarray) -> np.ndarray:
    """‖·‖ over every axis but the input one: shape [1, in, 1, 1] (conv) or [1, in]."""
    axes = tuple(i for i in range(w.ndim) if i != 1)
    return np.sqrt((w**2).sum(axis=axes, keepdims=True))


def row_norm(w: np.ndarray) -> np.ndarray:
    axes = tuple(range(1, w.ndim))
    return np.sqrt((w**2).sum(axis=axes, keepdims=True))


def dora_ref(w16: np.ndarray, dw: np.ndarray, m: np.ndarray, axis: str, s: float) -> np.ndarray:
    w = w16.astype(np.float64)
    merged = w + dw.astype(np.float32).astype(np.float64)
    norm = col_norm(merged) if axis == "col" else row_norm(merged)
    w_dora = merged * m.reshape(norm.shape) / norm
    return (w + s * (w_dora - w)).astype(np.float16)


RECIPE = """mergebuild: 1
models:
  anything: models/anything-v3.safetensors
  insta: models/insta.safetensors
  dora: models/dora.safetensors
  detail: models/detail.safetensors
merges:
  baked: {merge}
outputs:
  out: {{from: baked, path: out/baked.safetensors}}
"""


def recipe(workdir: Path, merge: str) -> Path:
    path = workdir / "d.yaml"
    path.write_text(RECIPE.format(merge=merge))
    return path


@pytest.mark.parametrize(
    ("axes", "strength"),
    [
        ({Q: "col"}, 1.0),  # kohya / LyCORIS (older) and A1111: one magnitude per input column
        ({Q: "row", K: "col"}, 0.5),  # PEFT / LyCORIS wd_on_out: one per output row
        ({CONV: "col", K: "row"}, 0.7),  # a 3×3 LoCon with DoRA
    ],
)
def test_dora_bake_matches_numpy(workdir: Path, cache: Path, axes: dict, strength: float) -> None:
    model = load_st(workdir / "models" / "anything-v3.safetensors")
    ref = dora_file(workdir / "models" / "dora.safetensors", model, axes, 7, alpha=1.5)
    r = run_cli(recipe(workdir, f"anything + lora(dora, {strength})"), "--json", cache=cache)
    assert r.code == 0, r.err
    out = load_st(workdir / "out" / "baked.safetensors")
    for key, (dw, m, axis) in ref.items():
        want = dora_ref(model[key], dw, m, axis, strength)
        assert_close_fp16(out[key], want)
        plain = (model[key].astype(np.float64) + strength * dw).astype(np.float16)
        assert not np.array_equal(out[key], plain)  # the renormalisation did happen
    for key in set(model) - set(ref):
        assert out[key].tobytes() == model[key].tobytes(), key


def test_dora_with_a_plain_lora_and_chunks_j1_j2(workdir: Path, tmp_path: Path) -> None:
    """A DoRA LoRA and a plain one in one bake: numbers, and the same bytes at -j1/-j2 and
    when the engine reads the keys in small chunks (the ΔW' is formed whole, once)."""
    model = load_st(workdir / "models" / "anything-v3.safetensors")
    ref = dora_file(workdir / "models" / "dora.safetensors", model, {Q: "col", CONV: "row"}, 8)
    d = kohya(workdir / "models" / "detail.safetensors", model, DETAIL, 1)
    path = recipe(workdir, "anything + lora(dora, 0.8) + lora(detail, 0.3)")
    target = workdir / "out" / "baked.safetensors"
    shas = []
    for i, (j, env) in enumerate([("1", {}), ("2", {"MERGEBUILD_CHUNK_ELEMENTS": "16"})]):
        r = run_cli(path, "-j", j, cache=tmp_path / f"c{i}", env=env)
        assert r.code == 0, r.err
        shas.append(hashlib.sha256(target.read_bytes()).hexdigest())
    assert shas[0] == shas[1]
    out = load_st(target)
    dw, m, axis = ref[KEYS[CONV]]
    assert_close_fp16(out[KEYS[CONV]], dora_ref(model[KEYS[CONV]], dw, m, axis, 0.8))
    # on Q both apply: W + 0.8·(W_dora − W) + 0.3·ΔW_detail (two float32 additions)
    dw, m, axis = ref[KEYS[Q]]
    first = dora_ref(model[KEYS[Q]], dw, m, axis, 0.8).astype(np.float64)
    want = first + 0.3 * d[KEYS[Q]]
    got = out[KEYS[Q]].astype(np.float64)
    assert np.all(np.abs(got - want) <= 2 * np.spacing(np.abs(want).astype(np.float16)))


def test_dora_refusals(workdir: Path, cache: Path) -> None:
    model = load_st(workdir / "models" / "anything-v3.safetensors")
    dora_file(workdir / "models" / "dora.safetensors", model, {Q: "col"}, 9)
    # into a merge computed in the same build: its weights are not a file to read
    r = run_cli(recipe(workdir, "anything * 0.5 + insta * 0.5 + lora(dora, 1.0)"), cache=cache)
    _fails(r, 1, "uses DoRA", "computed in this build")
    # a magnitude vector of the wrong size
    o, i = model[KEYS[Q]].shape
    t = {
        f"{Q}.lora_down.weight": np.ones((2, i), np.float16),
        f"{Q}.lora_up.weight": np.ones((o, 2), np.float16),
        f"{Q}.dora_scale": np.ones((1, i + o + 1), np.float16),
    }
    save_file(t, str(workdir / "models" / "dora.safetensors"))
    r = run_cli(recipe(workdir, "anything + lora(dora, 1.0)"), cache=cache)
    _fails(r, 1, "dora_scale", Q, "one per output row or per input column")
    assert not (workdir / "out").exists()
