"""PEFT/diffusers LoRAs take alpha from the adapter_config.json next to them (lora_alpha,
alpha_pattern, use_rslora); without it alpha = rank with a warning; the config is part of the
cache identity; a broken config is one message naming it. Numbers against numpy."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from conftest import load_st, run_cli
from test_lora_bake import _fails, assert_close_fp16, bake_ref

U = "model.diffusion_model."
TE = "cond_stage_model.transformer.text_model.encoder.layers."
MODULES = {  # PEFT module path → LDM key
    "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q":
        U + "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight",
    "unet.up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_k":
        U + "output_blocks.11.1.transformer_blocks.0.attn2.to_k.weight",
    "text_encoder.text_model.encoder.layers.3.self_attn.q_proj": TE + "3.self_attn.q_proj.weight",
}  # fmt: skip
RANK = 4

RECIPE = """mergebuild: 1
models:
  anything: models/anything-v3.safetensors
  peft: peft/adapter_model.safetensors
merges:
  baked: anything + lora(peft, 0.8)
outputs:
  out: {from: baked, path: out/baked.safetensors}
"""


def write_peft(workdir: Path, model: dict) -> dict[str, np.ndarray]:
    """A rank-4 PEFT LoRA (lora_A = down, lora_B = up, no alpha); returns up·down per key."""
    rng = np.random.default_rng(11)
    t, prods = {}, {}
    for path, key in MODULES.items():
        o, i = model[key].shape
        a = (rng.standard_normal((RANK, i)) * 0.3).astype(np.float16)
        b = (rng.standard_normal((o, RANK)) * 0.3).astype(np.float16)
        t[f"{path}.lora_A.weight"], t[f"{path}.lora_B.weight"] = a, b
        prods[key] = b.astype(np.float64) @ a.astype(np.float64)
    (workdir / "peft").mkdir(exist_ok=True)
    save_file(t, str(workdir / "peft" / "adapter_model.safetensors"))
    return prods


def config(workdir: Path, **fields) -> None:
    (workdir / "peft" / "adapter_config.json").write_text(json.dumps({"r": RANK, **fields}))


def build(workdir: Path, cache: Path, *args: str):
    path = workdir / "p.yaml"
    path.write_text(RECIPE)
    return run_cli(path, *args, cache=cache)


def check(workdir: Path, model: dict, prods: dict, scales: dict[str, float]) -> None:
    out = load_st(workdir / "out" / "baked.safetensors")
    for key, p in prods.items():
        assert_close_fp16(out[key], bake_ref(model[key], [(p * scales[key], 0.8)]))


Q, K, TQ = MODULES.values()


@pytest.mark.parametrize(
    ("fields", "scales"),
    [
        ({"lora_alpha": 8}, {Q: 2.0, K: 2.0, TQ: 2.0}),
        # alpha_pattern keys are module-path suffixes (PEFT's convention), whole or after a dot
        (
            {"lora_alpha": 8, "alpha_pattern": {"attn1.to_q": 2, "q_proj": 1}},
            {Q: 0.5, K: 2.0, TQ: 0.25},
        ),
        ({"lora_alpha": 8, "use_rslora": True}, {Q: 4.0, K: 4.0, TQ: 4.0}),  # alpha/√r
    ],
)
def test_alpha_from_adapter_config(workdir: Path, cache: Path, fields: dict, scales) -> None:
    model = load_st(workdir / "models" / "anything-v3.safetensors")
    prods = write_peft(workdir, model)
    config(workdir, **fields)
    r = build(workdir, cache)
    assert r.code == 0, r.err
    assert "assumed" not in r.err
    check(workdir, model, prods, scales)
    j = run_cli("inspect", workdir / "peft" / "adapter_model.safetensors", "--json").json
    assert j["alpha_from"] == "adapter_config.json" and "warning" not in j


def test_without_config_alpha_is_rank_with_a_warning(workdir: Path, cache: Path) -> None:
    model = load_st(workdir / "models" / "anything-v3.safetensors")
    prods = write_peft(workdir, model)
    r = build(workdir, cache)
    assert r.code == 0, r.err
    assert "no alpha" in r.err and "alpha = rank (scale 1) assumed" in r.err, r.err
    check(workdir, model, prods, dict.fromkeys(prods, 1.0))
    j = run_cli("inspect", workdir / "peft" / "adapter_model.safetensors", "--json").json
    assert "alpha = rank" in j["warning"]


def test_editing_the_config_rebuilds(workdir: Path, cache: Path) -> None:
    """The config changes ΔW, so it is part of the node's key: an edit is a rebuild with the
    new numbers, not the cached file; a kohya LoRA next to a config ignores it."""
    model = load_st(workdir / "models" / "anything-v3.safetensors")
    prods = write_peft(workdir, model)
    config(workdir, lora_alpha=8)
    first = build(workdir, cache, "--json")
    assert first.code == 0, first.err
    config(workdir, lora_alpha=2)
    again = build(workdir, cache, "--json")
    assert again.code == 0, again.err
    key = [next(n["key"] for n in r.json["nodes"] if n["name"] == "baked") for r in (first, again)]
    assert key[0] != key[1]
    check(workdir, model, prods, dict.fromkeys(prods, 0.5))
    config(workdir, lora_alpha=8)
    back = build(workdir, cache, "--json")
    assert next(n["key"] for n in back.json["nodes"] if n["name"] == "baked") == key[0]


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("{not json", "not a JSON adapter config"),
        ('{"r": 4}', "no 'lora_alpha'"),
        ('{"lora_alpha": "8"}', "'lora_alpha' must be a positive number"),
        ('{"lora_alpha": -1}', "'lora_alpha' must be a positive number"),
        ('{"lora_alpha": 8, "alpha_pattern": [1]}', "'alpha_pattern' must be a mapping"),
        ('{"lora_alpha": 8, "alpha_pattern": {"to_q": true}}', "'alpha_pattern.to_q'"),
    ],
)
def test_broken_config_is_one_message(workdir: Path, cache: Path, text: str, needle: str) -> None:
    model = load_st(workdir / "models" / "anything-v3.safetensors")
    write_peft(workdir, model)
    (workdir / "peft" / "adapter_config.json").write_text(text)
    _fails(build(workdir, cache), 1, "adapter_config.json", needle)
    assert not (workdir / "out").exists()


@pytest.mark.parametrize("suffix", ["lora_magnitude_vector", "lora_magnitude_vector.weight"])
def test_peft_dora_magnitudes_per_output_row(workdir: Path, cache: Path, suffix: str) -> None:
    """PEFT's DoRA: W' = m·(W + s·BA)/‖W + s·BA‖ with the norm of each output row and m
    `lora_magnitude_vector` (one value per row); baked as ΔW' = W' − W at the strength."""
    model = load_st(workdir / "models" / "anything-v3.safetensors")
    prods = write_peft(workdir, model)
    from safetensors.numpy import load_file

    path = workdir / "peft" / "adapter_model.safetensors"
    t = load_file(str(path))
    rng = np.random.default_rng(5)
    mags = {}
    for mod, key in MODULES.items():
        mags[key] = (np.abs(rng.standard_normal(model[key].shape[0])) + 0.5).astype(np.float16)
        t[f"{mod}.{suffix}"] = mags[key]
    save_file(t, str(path))
    config(workdir, lora_alpha=8)  # scale 2
    r = build(workdir, cache)
    assert r.code == 0, r.err
    out = load_st(workdir / "out" / "baked.safetensors")
    for key, p in prods.items():
        w = model[key].astype(np.float64)
        merged = w + 2.0 * p
        norm = np.linalg.norm(merged, axis=1, keepdims=True)
        d = merged * (mags[key].astype(np.float64)[:, None] / norm) - w
        assert_close_fp16(out[key], bake_ref(model[key], [(d, 0.8)]))
