"""Baking LoRAs with the CLI: numbers against numpy, untouched keys byte for byte, -j1 == -j2,
and every mix-up (wrong architecture, unmapped modules, LoRA vs checkpoint) as one message."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from conftest import load_st, run_cli

U = "model.diffusion_model."
TE = "cond_stage_model.transformer.text_model.encoder.layers."
# kohya module → LDM key, for the modules the test LoRAs train
DETAIL = {
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q":
        U + "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight",
    "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_attn2_to_k":
        U + "output_blocks.11.1.transformer_blocks.0.attn2.to_k.weight",
    "lora_unet_mid_block_attentions_0_proj_in": U + "middle_block.1.proj_in.weight",
    "lora_te_text_model_encoder_layers_3_self_attn_q_proj": TE + "3.self_attn.q_proj.weight",
}  # fmt: skip
STYLE = {
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q":
        U + "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight",
    "lora_unet_down_blocks_1_resnets_0_conv1": U + "input_blocks.4.0.in_layers.2.weight",
}  # fmt: skip


def kohya(path: Path, model: dict, modules: dict[str, str], seed: int, alpha: float = 1.0) -> dict:
    """Write a kohya LoRA (rank 2) for `modules`, shaped after `model`; return its ΔW per key
    in float64, from the factors as written (fp16)."""
    rng = np.random.default_rng(seed)
    t, deltas = {}, {}
    for name, key in modules.items():
        shape = model[key].shape
        kernel = shape[2:]
        down = (rng.standard_normal((2, shape[1], *kernel)) * 0.3).astype(np.float16)
        up = (rng.standard_normal((shape[0], 2, *(1,) * len(kernel))) * 0.3).astype(np.float16)
        t[f"{name}.lora_down.weight"], t[f"{name}.lora_up.weight"] = down, up
        t[f"{name}.alpha"] = np.array(alpha, dtype=np.float16)
        d = up.reshape(shape[0], 2).astype(np.float64) @ down.reshape(2, -1).astype(np.float64)
        deltas[key] = d.reshape(shape) * alpha / 2
    save_file(t, str(path), metadata={"ss_network_dim": "2"})
    return deltas


@pytest.fixture
def loras(workdir: Path) -> tuple[dict, dict, dict]:
    model = load_st(workdir / "models" / "anything-v3.safetensors")
    d = kohya(workdir / "models" / "detail.safetensors", model, DETAIL, 1, alpha=1.0)
    s = kohya(workdir / "models" / "style.safetensors", model, STYLE, 2, alpha=2.0)
    return model, d, s


RECIPE = """mergebuild: 1
models:
  anything: models/anything-v3.safetensors
  insta: models/insta.safetensors
  detail: models/detail.safetensors
  style: models/style.safetensors
merges:
  baked: {merge}
outputs:
  out: {{from: baked, path: out/baked.safetensors}}
"""


def recipe(workdir: Path, merge: str, name: str = "r.yaml") -> Path:
    path = workdir / name
    path.write_text(RECIPE.format(merge=merge))
    return path


def bake_ref(a: np.ndarray, deltas: list[tuple[np.ndarray, float]]) -> np.ndarray:
    """W + s·ΔW in float32 ops (ΔW rounded once to float32), cast back to a's fp16."""
    out = a.astype(np.float32)
    for d, s in deltas:
        out = out + d.astype(np.float32) * np.float32(s)
    return out.astype(np.float16)


def assert_close_fp16(got: np.ndarray, ref: np.ndarray) -> None:
    assert got.dtype == np.float16 and got.shape == ref.shape
    ulp = np.spacing(np.abs(ref)).astype(np.float32)
    assert np.all(np.abs(got.astype(np.float32) - ref.astype(np.float32)) <= ulp)


@pytest.mark.parametrize(
    "merge",
    [
        "anything + lora(detail, 0.6) + lora(style, 0.4)",
        "{method: bake_lora, a: anything, loras: [detail, style], strength: [0.6, 0.4]}",
    ],
)
def test_bake_numbers_and_untouched_keys(workdir: Path, cache: Path, loras, merge: str) -> None:
    model, d, s = loras
    r = run_cli(recipe(workdir, merge), "--json", cache=cache)
    assert r.code == 0, r.err
    out = load_st(workdir / "out" / "baked.safetensors")
    touched = set(d) | set(s)
    for key in touched:
        parts = [(x[key], w) for x, w in ((d, 0.6), (s, 0.4)) if key in x]
        assert_close_fp16(out[key], bake_ref(model[key], parts))
        assert not np.array_equal(out[key], model[key])
    assert set(out) == set(model)
    for key in set(model) - touched:  # bit-identical, dtype included
        assert out[key].dtype == model[key].dtype
        assert out[key].tobytes() == model[key].tobytes(), key
    node = next(n for n in r.json["nodes"] if n["name"] == "baked")
    assert node["merged"] == len(touched)


def test_expression_and_explicit_share_a_key(workdir: Path, cache: Path, loras) -> None:
    keys = []
    for merge in (
        "anything + lora(detail, 0.6) + lora(style, 0.4)",
        "{method: bake_lora, a: anything, loras: [detail, style], strength: [0.6, 0.4]}",
        "anything + (lora(detail, 1.2) + lora(style, 0.8)) * 0.5",
    ):
        r = run_cli(recipe(workdir, merge), "-n", "--json", cache=cache)
        assert r.code == 0, r.err
        keys.append(next(n["key"] for n in r.json["nodes"] if n["name"] == "baked"))
    assert len(set(keys)) == 1


def test_lora_bytes_are_part_of_the_key(workdir: Path, cache: Path, loras) -> None:
    model, _, _ = loras
    path = recipe(workdir, "anything + lora(detail, 0.5)")
    assert run_cli(path, cache=cache).code == 0
    kohya(workdir / "models" / "detail.safetensors", model, DETAIL, 99)
    r = run_cli(path, "-n", cache=cache)
    assert r.code == 0 and "new input bytes: detail" in r.out, r.out


def test_block_weighted_strength(workdir: Path, cache: Path, loras) -> None:
    model, d, _ = loras
    strength = "{IN01: 0.5, OUT11: 2.0, default: 0.0}"
    merge = f"{{method: bake_lora, a: anything, loras: [detail], strength: {strength}}}"
    r = run_cli(recipe(workdir, merge), cache=cache)
    assert r.code == 0, r.err
    out = load_st(workdir / "out" / "baked.safetensors")
    in01, out11 = DETAIL[next(iter(DETAIL))], list(DETAIL.values())[1]
    assert_close_fp16(out[in01], bake_ref(model[in01], [(d[in01], 0.5)]))
    assert_close_fp16(out[out11], bake_ref(model[out11], [(d[out11], 2.0)]))
    for key in (U + "middle_block.1.proj_in.weight", TE + "3.self_attn.q_proj.weight"):
        assert out[key].tobytes() == model[key].tobytes()  # weight 0: exactly a


def test_preset_strength_in_expression(workdir: Path, cache: Path, loras) -> None:
    a = recipe(workdir, 'anything + lora(detail, preset("GRAD_V"))', "a.yaml")
    b = recipe(
        workdir,
        "{method: bake_lora, a: anything, loras: [detail], strength: {preset: GRAD_V}}",
        "b.yaml",
    )
    ka = run_cli(a, "-n", "--json", cache=cache)
    kb = run_cli(b, "-n", "--json", cache=cache)
    assert ka.code == 0 and kb.code == 0, ka.err + kb.err
    assert ka.json["nodes"][0]["key"] == kb.json["nodes"][0]["key"]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_j1_equals_j2_and_chunked(workdir: Path, tmp_path: Path, loras) -> None:
    path = recipe(workdir, "anything + lora(detail, 0.6) + lora(style, 0.4)")
    out = workdir / "out" / "baked.safetensors"
    shas = []
    for i, (j, env) in enumerate(
        [
            ("1", {}),
            ("2", {}),
            ("2", {"MERGEBUILD_CHUNK_ELEMENTS": "64"}),
            ("1", {"MERGEBUILD_CHUNK_ELEMENTS": "100"}),
        ]
    ):
        r = run_cli(path, "-j", j, cache=tmp_path / f"c{i}", env=env)
        assert r.code == 0, r.err
        shas.append(_sha(out))
    assert len(set(shas)) == 1


def _fails(r, code: int, *needles: str) -> None:
    assert r.code == code, (r.code, r.out, r.err)
    assert "Traceback" not in r.err
    for n in needles:
        assert n in r.err, r.err


@pytest.mark.parametrize(
    ("merge", "needles"),
    [
        ("weighted_sum(anything, detail, 0.5)", ["r.yaml:", "'detail' is a LoRA"]),
        ("anything * 0.5 + detail * 0.5", ["'detail' is a LoRA"]),
        (
            "{method: bake_lora, a: detail, loras: [style]}",
            ["'detail' is a LoRA", "'a' of bake_lora"],
        ),
        (
            "{method: bake_lora, a: anything, loras: [insta]}",
            ["'insta' is a checkpoint, not a LoRA"],
        ),
        ("anything + lora(insta, 0.5)", ["'insta' is a checkpoint, not a LoRA"]),
    ],
)
def test_lora_and_checkpoint_mixups_are_located_errors(
    workdir: Path, cache: Path, loras, merge: str, needles: list[str]
) -> None:
    r = run_cli(recipe(workdir, merge), cache=cache)
    _fails(r, 2, *needles)
    assert not (workdir / "out").exists()


def test_output_from_a_lora_is_an_error(workdir: Path, cache: Path, loras) -> None:
    path = workdir / "o.yaml"
    path.write_text(
        RECIPE.format(merge="anything + lora(detail, 0.5)")
        + "  raw: {from: detail, path: out/x.safetensors}\n"
    )
    _fails(run_cli(path, cache=cache), 2, "output 'raw': 'detail' is a LoRA")


@pytest.mark.parametrize(
    ("merge", "needles"),
    [
        (
            "{method: bake_lora, a: anything, loras: [detail, style], strength: [0.5]}",
            ["'strength' has 1 values for 2 LoRAs"],
        ),
        ("anything + lora(detail, 0.5, 2)", ["lora(NAME, strength)"]),
        ("lora(detail, 0.5)", ["write `model + lora(NAME, 0.6)`"]),
        ("anything + lora(nothere, 0.5)", ["unknown model 'nothere'"]),
    ],
)
def test_bake_recipe_errors(
    workdir: Path, cache: Path, loras, merge: str, needles: list[str]
) -> None:
    _fails(run_cli(recipe(workdir, merge), cache=cache), 2, *needles)


def _kohya_names(path: Path, names: dict[str, tuple[int, ...]]) -> None:
    rng = np.random.default_rng(0)
    t = {}
    for n, shape in names.items():
        t[f"{n}.lora_down.weight"] = rng.standard_normal((2, shape[1])).astype(np.float16)
        t[f"{n}.lora_up.weight"] = rng.standard_normal((shape[0], 2)).astype(np.float16)
    save_file(t, str(path))


@pytest.mark.parametrize(
    ("modules", "needles"),
    [
        # an SDXL LoRA (two text encoders, LDM names) on an SD1 model
        ({"lora_te1_text_model_encoder_layers_0_mlp_fc1": (4, 4),
          "lora_te2_text_model_encoder_layers_0_mlp_fc1": (4, 4)},
         ["LoRA 'bad' is for SDXL", "is SD1.x", "lora_te1_text_model_encoder_layers_0_mlp_fc1"]),
        ({"lora_unet_input_blocks_7_1_transformer_blocks_5_attn1_to_q": (4, 4)},
         ["LoRA 'bad' is for SDXL"]),
        # a module no SD1 model has
        ({"lora_unet_down_blocks_0_attentions_0_proj_out_extra": (4, 4)},
         ["1 modules of LoRA 'bad' map to no tensor", "proj_out_extra (no such module)",
          "strict: false"]),
        # the right module with the wrong shape
        ({"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": (5, 3)},
         ["input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight (ΔW [5, 3], tensor"]),
    ],
)  # fmt: skip
def test_lora_that_does_not_fit_names_the_keys(
    workdir: Path, cache: Path, loras, modules: dict, needles: list[str]
) -> None:
    _kohya_names(workdir / "models" / "bad.safetensors", modules)
    path = workdir / "r.yaml"
    path.write_text(
        RECIPE.format(merge="anything + lora(bad, 0.5)").replace(
            "models:\n", "models:\n  bad: models/bad.safetensors\n"
        )
    )
    _fails(run_cli(path, cache=cache), 1, *needles)
    assert not (workdir / "out").exists()


@pytest.mark.parametrize("bogus", ["attn3_to_q", "attn1_to_qq"])
def test_strict_false_skips_unmapped_modules_with_a_warning(
    workdir: Path, cache: Path, loras, bogus: str
) -> None:
    model, _, _ = loras
    good = next(iter(DETAIL))
    bad = good.replace("attn1_to_q", bogus)
    rng = np.random.default_rng(3)
    t = {}
    for n in (good, bad):
        t[f"{n}.lora_down.weight"] = rng.standard_normal((2, model[DETAIL[good]].shape[1])).astype(
            np.float16
        )
        t[f"{n}.lora_up.weight"] = rng.standard_normal((model[DETAIL[good]].shape[0], 2)).astype(
            np.float16
        )
    save_file(t, str(workdir / "models" / "detail.safetensors"))
    strict = run_cli(recipe(workdir, "anything + lora(detail, 0.5)"), cache=cache)
    _fails(strict, 1, bad)
    merge = "{method: bake_lora, a: anything, loras: [detail], strength: 0.5, strict: false}"
    r = run_cli(recipe(workdir, merge), cache=cache)
    assert r.code == 0, r.err
    assert "skipped 1 modules of LoRA 'detail'" in r.err and bad in r.err
    out = load_st(workdir / "out" / "baked.safetensors")
    key = DETAIL[good]
    ref = t[f"{good}.lora_up.weight"].astype(np.float64) @ t[f"{good}.lora_down.weight"].astype(
        np.float64
    )
    assert_close_fp16(out[key], bake_ref(model[key], [(ref, 0.5)]))


def test_extract_rebuilds_the_bake_bit_for_bit(workdir: Path, cache: Path, loras) -> None:
    r = run_cli(recipe(workdir, "anything + lora(detail, 0.6) + lora(style, 0.4)"), cache=cache)
    assert r.code == 0, r.err
    built = workdir / "out" / "baked.safetensors"
    ex = run_cli("extract", built, "-o", workdir / "ex.yaml")
    assert ex.code == 0, ex.err
    text = (workdir / "ex.yaml").read_text()
    assert "method: bake_lora" in text and "loras:" in text
    again = run_cli(workdir / "ex.yaml", "--models", workdir / "models", cache=workdir / "c2")
    assert again.code == 0, again.err
    rebuilt = next(workdir.glob("*.safetensors"))
    assert _sha(rebuilt) == _sha(built)


def test_lora_on_a_merged_expression_bakes_a_hidden_node(workdir: Path, cache: Path, loras) -> None:
    model, d, _ = loras
    insta = load_st(workdir / "models" / "insta.safetensors")
    r = run_cli(
        recipe(workdir, "anything * 0.5 + insta * 0.5 + lora(detail, 0.6)"), "--json", cache=cache
    )
    assert r.code == 0, r.err
    assert {n["name"] for n in r.json["nodes"]} >= {"baked", "baked/1"}
    out = load_st(workdir / "out" / "baked.safetensors")
    key = next(iter(DETAIL.values()))
    half = model[key].astype(np.float32) * np.float32(0.5) + insta[key].astype(
        np.float32
    ) * np.float32(0.5)
    ws = half.astype(np.float16)  # the weighted sum, cast to its node dtype (fp16)
    assert_close_fp16(out[key], bake_ref(ws, [(d[key], 0.6)]))


def test_a_ckpt_in_loras_says_loras_are_safetensors(workdir: Path, cache: Path, loras) -> None:
    (workdir / "models" / "old.pt").write_bytes(b"not read")
    path = workdir / "r.yaml"
    path.write_text(
        RECIPE.format(merge="anything + lora(old, 0.5)").replace(
            "models:\n", "models:\n  old: models/old.pt\n"
        )
    )
    _fails(run_cli(path, cache=cache), 2, "'old' is not a .safetensors file")


def test_loha_on_an_sd2_style_linear_proj_in(workdir: Path, cache: Path, loras) -> None:
    """A LoHa cannot tell SD1 from SD2; on SD2's linear proj_in its ΔW takes the 2-D shape."""
    model, _, _ = loras
    sd2 = {k: v for k, v in model.items() if k.startswith(U)}
    for k in [k for k in sd2 if k.endswith((".proj_in.weight", ".proj_out.weight"))]:
        sd2[k] = np.ascontiguousarray(sd2[k][:, :, 0, 0])
    save_file(sd2, str(workdir / "models" / "sd2ish.safetensors"))
    key = U + "input_blocks.1.1.proj_in.weight"
    o, i = sd2[key].shape
    rng = np.random.default_rng(11)
    name = "lora_unet_down_blocks_0_attentions_0_proj_in"
    shapes = {"w1_a": (o, 2), "w1_b": (2, i), "w2_a": (o, 2), "w2_b": (2, i)}
    t = {f"{name}.hada_{w}": rng.standard_normal(s).astype(np.float16) for w, s in shapes.items()}
    save_file(t, str(workdir / "models" / "loha.safetensors"))
    path = workdir / "r.yaml"
    path.write_text(
        "mergebuild: 1\nmodels:\n  m: models/sd2ish.safetensors\n  l: models/loha.safetensors\n"
        "merges:\n  baked: m + lora(l, 0.5)\n"
        "outputs:\n  out: {from: baked, path: out/b.safetensors}\n"
    )
    r = run_cli(path, cache=cache)
    assert r.code == 0, r.err
    f = {k: v.astype(np.float64) for k, v in t.items()}
    ref = (f[f"{name}.hada_w1_a"] @ f[f"{name}.hada_w1_b"]) * (
        f[f"{name}.hada_w2_a"] @ f[f"{name}.hada_w2_b"]
    )
    out = load_st(workdir / "out" / "b.safetensors")
    assert_close_fp16(out[key], bake_ref(sd2[key], [(ref, 0.5)]))
