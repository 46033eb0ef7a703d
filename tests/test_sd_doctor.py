"""`doctor` finds damage and `--fix` repairs position_ids bit-exactly; merges never spread it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from conftest import SCALE, load_st, run_cli

POS = "cond_stage_model.transformer.text_model.embeddings.position_ids"


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """healthy; the same model with float-interpolated position_ids; an int64 non-arange one."""
    import torch

    from mergebuild.demo import synthesize

    d = tmp_path_factory.mktemp("doctor")
    # what an old merger produced: a weighted sum (alpha 0.35) of two arange(77) in float32;
    # a few values land just below a whole number and truncate to the wrong position
    x = torch.arange(77, dtype=torch.float32)
    damaged = x * (1 - 0.35) + x * 0.35
    assert (damaged.long() != torch.arange(77)).any()
    shuffled = torch.arange(77)
    shuffled[[3, 4]] = shuffled[[4, 3]]
    return {
        "healthy": synthesize(d / "healthy.safetensors", "m", scale=SCALE),
        "damaged": synthesize(
            d / "damaged.safetensors", "m", scale=SCALE, overrides={POS: damaged[None]}
        ),
        "swapped": synthesize(
            d / "swapped.safetensors", "m", scale=SCALE, overrides={POS: shuffled[None]}
        ),
        "other": synthesize(d / "other.safetensors", "o", scale=SCALE),
    }


def test_doctor_flags_float_position_ids_and_fix_is_bit_exact(models: dict, tmp_path: Path) -> None:
    r = run_cli("doctor", models["damaged"])
    assert r.code == 1 and "Traceback" not in r.err
    assert "position_ids" in r.out and "stored as F32, not int64" in r.out
    assert "are wrong" in r.out
    fixed = tmp_path / "fixed.safetensors"
    f = run_cli("doctor", models["damaged"], "--fix", fixed)
    assert f.code == 0, f.out + f.err
    assert f"{POS}: F32 → I64 arange(77)" in f.out
    # the damaged file is the healthy one with only position_ids replaced: the repair restores
    # the healthy file byte for byte (same tensors, same metadata, same layout)
    assert fixed.read_bytes() == models["healthy"].read_bytes()
    again = run_cli("doctor", fixed, "--json")
    assert again.code == 0 and again.json["healthy"] and again.json["findings"] == []


def test_doctor_int64_non_arange(models: dict, tmp_path: Path) -> None:
    j = run_cli("doctor", models["swapped"], "--json")
    assert j.code == 1
    (finding,) = j.json["findings"]
    assert finding["check"] == "position_ids" and "positions 3, 4 are wrong" in finding["message"]
    fixed = tmp_path / "f.safetensors"
    assert run_cli("doctor", models["swapped"], "--fix", fixed).code == 0
    assert fixed.read_bytes() == models["healthy"].read_bytes()


def test_doctor_other_checks(models: dict, tmp_path: Path) -> None:
    from safetensors.numpy import save_file

    t = load_st(models["healthy"])
    t = {k: (v.astype(np.float32) if v.dtype == np.float16 else v) for k, v in t.items()}
    nan_key = "model.diffusion_model.input_blocks.1.0.in_layers.2.weight"
    big_key = "first_stage_model.decoder.conv_out.bias"
    t[nan_key] = t[nan_key].copy()
    t[nan_key].flat[5] = np.nan
    t[big_key] = t[big_key].copy()
    t[big_key][0] = 70000.0
    t["model.diffusion_model.out.2.bias"] = t["model.diffusion_model.out.2.bias"].astype(np.float16)
    del t["model.diffusion_model.out.0.weight"]
    t["lora_unet_extra.weight"] = np.zeros(3, np.float32)
    path = tmp_path / "odd.safetensors"
    save_file(t, str(path))
    r = run_cli("doctor", path, "--json")
    assert r.code == 1  # NaN is damage; the rest are warnings
    found = {f["check"]: f for f in r.json["findings"]}
    assert found["nonfinite"]["keys"] == [nan_key] and found["nonfinite"]["severity"] == "error"
    assert found["fp16_overflow"]["keys"] == [big_key]
    assert found["missing_keys"]["keys"] == ["model.diffusion_model.out.0.weight"]
    assert found["unexpected_keys"]["keys"] == ["lora_unet_extra.weight"]
    assert "F16 ×1, F32 ×" in found["mixed_dtypes"]["message"]
    assert "position_ids" not in found
    fix = run_cli("doctor", path, "--fix", tmp_path / "o.safetensors")
    assert fix.code == 1 and "not repaired: nonfinite" in fix.out  # doctor repairs nothing else


def recipe(tmp: Path, a: Path, b: Path) -> Path:
    r = tmp / "r.yaml"
    r.write_text(
        "mergebuild: 1\n"
        f"models: {{a: {a}, b: {b}}}\n"
        "merges: {m: a * 0.5 + b * 0.5}\n"
        "outputs: {o: {from: m, path: out.safetensors, dtype: fp16}}\n"
    )
    return r


def test_damaged_b_does_not_reach_the_output(models: dict, tmp_path: Path, cache: Path) -> None:
    r = run_cli(recipe(tmp_path, models["other"], models["damaged"]), cache=cache)
    assert r.code == 0, r.err
    out = load_st(tmp_path / "out.safetensors")
    assert out[POS].dtype == np.int64
    np.testing.assert_array_equal(out[POS], np.arange(77, dtype=np.int64)[None])
    assert run_cli("doctor", tmp_path / "out.safetensors").code == 0


def test_damaged_a_is_copied_unchanged_with_a_warning(
    models: dict, tmp_path: Path, cache: Path
) -> None:
    """Decision: position_ids are never merged or re-cast, even when `a` stores them as floats;
    the build copies a's bytes and warns (a silent repair would change what the model renders)."""
    r = run_cli(recipe(tmp_path, models["damaged"], models["other"]), cache=cache)
    assert r.code == 0, r.err
    assert "warning:" in r.err and "damaged" in r.err and "doctor" in r.err
    out = load_st(tmp_path / "out.safetensors")
    a = load_st(models["damaged"])
    assert out[POS].dtype == np.float32  # not cast to the fp16 output dtype
    np.testing.assert_array_equal(out[POS], a[POS])


def test_doctor_sdxl_position_ids(tmp_path: Path) -> None:
    import torch

    from mergebuild.demo import synthesize

    key = "conditioner.embedders.0.transformer.text_model.embeddings.position_ids"
    x = torch.arange(77, dtype=torch.float32)
    healthy = synthesize(tmp_path / "ok.safetensors", "x", arch="sdxl", scale=SCALE)
    damaged = synthesize(
        tmp_path / "bad.safetensors",
        "x",
        arch="sdxl",
        scale=SCALE,
        overrides={key: (x * (1 - 0.1) + x * 0.1)[None]},
    )
    r = run_cli("doctor", damaged, "--json")
    assert r.code == 1 and r.json["architecture"]["family"] == "sdxl"
    assert [f["keys"] for f in r.json["findings"]] == [[key]]
    fixed = tmp_path / "fixed.safetensors"
    assert run_cli("doctor", damaged, "--fix", fixed).code == 0
    assert fixed.read_bytes() == healthy.read_bytes()


def test_large_finite_values_are_not_reported_as_nan(models: dict, tmp_path: Path) -> None:
    """The fast check sums each chunk; a sum that overflows must not be mistaken for Inf."""
    from safetensors.numpy import save_file

    from mergebuild.sd.doctor import examine

    t = {
        k: (v.astype(np.float32) if v.dtype.kind == "f" else v)
        for k, v in load_st(models["healthy"]).items()
    }
    key = "first_stage_model.decoder.conv_out.bias"
    t[key] = np.full(t[key].shape, 3e38, np.float32)  # finite; their float32 sum is inf
    save_file(t, str(tmp_path / "big.safetensors"))
    _, _, findings = examine(tmp_path / "big.safetensors")
    # beyond fp16's range, so beyond fp8's too: both warnings, no NaN/Inf error
    assert [(f.check, f.keys) for f in findings] == [
        ("fp16_overflow", [key]),
        ("fp8_range", [key]),
    ]
