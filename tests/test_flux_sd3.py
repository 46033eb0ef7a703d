"""Flux.1 and SD3: detection of every file form, block layouts, per-encoder weights, bare vs
prefixed Flux files merged, and fp8 outputs checked bit for bit against torch's own casts.

Expected values come from numpy in float32 on the inputs' values; only the final rounding to
bf16 / fp8 is torch's cast (the reference the issue names), applied to numpy's result.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from conftest import run_cli
from mergebuild.engine.safetensors_io import TensorInfo, read_header
from mergebuild.sd.arch import detect

P = "model.diffusion_model."
SCALE = 1 / 64


@pytest.fixture(scope="session")
def dit(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from mergebuild.demo import synthesize

    d = tmp_path_factory.mktemp("dit")
    specs = {
        "flux_a": ("flux", "all", ""),
        "flux_b": ("flux", "all", ""),
        "flux_bare": ("flux", "bare", ""),
        "flux_tr": ("flux", "transformer", ""),
        "schnell": ("flux", "bare", "schnell"),
        "sd3_a": ("sd3", "all", ""),
        "sd3_b": ("sd3", "all", ""),
    }
    for name, (arch, form, variant) in specs.items():
        synthesize(
            d / f"{name}.safetensors", name, arch, SCALE, dtype="bf16", form=form, variant=variant
        )
    synthesize(d / "sd1.safetensors", "sd1", "sd1", SCALE)
    return d


def f32(path: Path) -> dict[str, np.ndarray]:
    """Every tensor as float32 numpy (safetensors' numpy loader has no bf16 / fp8)."""
    from safetensors.torch import load_file

    return {k: v.float().numpy() for k, v in load_file(str(path)).items()}


def raw(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def torch_round(x: np.ndarray, dtype: str) -> np.ndarray:
    """numpy's float32 result rounded by torch's own cast (bf16, or fp8 after a clamp)."""
    import torch

    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    dt = {
        "bf16": torch.bfloat16,
        "e4m3": torch.float8_e4m3fn,
        "e5m2": torch.float8_e5m2,
    }[dtype]
    top = {"e4m3": 448.0, "e5m2": 57344.0}.get(dtype)
    if top is not None:
        t = t.clamp(-top, top)
    return t.to(dt).float().numpy()


def recipe(workdir: Path, models: dict[str, str], merges: str, outputs: str) -> Path:
    text = "mergebuild: 1\nmodels:\n"
    text += "".join(f"  {n}: {p}\n" for n, p in models.items())
    text += ("merges:\n" + merges if merges else "merges: {}\n") + "outputs:\n" + outputs
    path = workdir / "r.yaml"
    path.write_text(text)
    return path


def infos(path: Path) -> dict[str, TensorInfo]:
    return {k: v[0] for k, v in read_header(path).tensors.items()}


# -- detection ------------------------------------------------------------------------------


def test_every_flux_and_sd3_file_form_is_detected(dit: Path, cache: Path) -> None:
    cases = {
        "flux_a": ("flux", "dev", True, ["clip_l", "t5xxl"], ["unet", "text_encoder", "vae"]),
        "flux_bare": ("flux", "dev", False, [], ["unet"]),
        "flux_tr": ("flux", "dev", True, [], ["unet"]),
        "schnell": ("flux", "schnell", False, [], ["unet"]),
        "sd3_a": ("sd3", "medium", True, ["clip_l", "clip_g", "t5xxl"], None),
    }
    for name, (family, variant, prefixed, tes, comps) in cases.items():
        r = run_cli("inspect", dit / f"{name}.safetensors", "--json", cache=cache)
        assert r.code == 0, r.err
        a = r.json["architecture"]
        assert (a["family"], a["variant"], a["prefixed"]) == (family, variant, prefixed), name
        assert a["text_encoders"] == tes, name
        if comps:
            assert a["components"] == comps, name
        assert a["block_layout"] == {"flux": "flux", "sd3": "sd3"}[family]
    text = run_cli("inspect", dit / "flux_a.safetensors", cache=cache).out
    assert "Flux.1 dev (all-in-one: transformer, clip_l+t5xxl, vae)" in text
    text = run_cli("inspect", dit / "flux_bare.safetensors", cache=cache).out
    assert "Flux.1 dev (transformer only, bare keys)" in text


def test_sd35_sizes_are_told_apart_by_blocks_and_self_attention(dit: Path) -> None:
    medium = infos(dit / "sd3_a.safetensors")
    assert detect(medium).variant == "medium"
    # SD3.5 medium: self-attention (x_block.attn2) in the first joint blocks
    extra = {
        f"{P}joint_blocks.{i}.x_block.attn2.qkv.weight": TensorInfo("BF16", (48, 16))
        for i in range(13)
    }
    assert detect({**medium, **extra}).variant == "3.5 medium"
    # SD3.5 large: 38 joint blocks
    large = dict(medium)
    for k, v in medium.items():
        m = re.match(rf"{re.escape(P)}joint_blocks\.23\.(.*)", k)
        if m:
            for i in range(24, 38):
                large[f"{P}joint_blocks.{i}.{m.group(1)}"] = v
    arch = detect(large)
    assert (arch.variant, arch.block_layout) == ("3.5 large", "sd3_large")
    from mergebuild.sd.arch import merge_compatibility

    why = merge_compatibility(["m", "l"], [detect(medium), arch])
    assert why is not None and "different sizes" in why


def test_blocks_command_prints_the_flux_layout(dit: Path, cache: Path) -> None:
    r = run_cli("blocks", dit / "flux_bare.safetensors", "--json", cache=cache)
    assert r.code == 0, r.err
    keys = r.json["keys"]
    assert r.json["layout"] == "flux"
    assert keys["double_blocks.3.img_attn.qkv.weight"] == "D03"
    assert keys["single_blocks.37.linear1.weight"] == "S37"
    assert keys["final_layer.linear.weight"] == "OUT"
    assert keys["img_in.weight"] == keys["guidance_in.in_layer.weight"] == "BASE"
    r = run_cli("blocks", dit / "sd3_a.safetensors", "--json", cache=cache)
    assert r.json["keys"][f"{P}joint_blocks.23.x_block.attn.qkv.weight"] == "J23"


# -- merges ---------------------------------------------------------------------------------


def block_alpha(key: str) -> float:
    """double_blocks.0-9: 0.3, single_blocks.30-37: 0.9, final_layer (OUT): 0.1, else 0.5."""
    rest = key.removeprefix(P)
    m = re.match(r"(double|single)_blocks\.(\d+)\.", rest)
    if m and m.group(1) == "double" and int(m.group(2)) <= 9:
        return 0.3
    if m and m.group(1) == "single" and int(m.group(2)) >= 30:
        return 0.9
    if rest.startswith("final_layer."):
        return 0.1
    return 0.5


def test_prefixed_and_bare_flux_merge_with_block_ranges(
    dit: Path, workdir: Path, cache: Path
) -> None:
    alpha = "{double_blocks.0-9: 0.3, S30-S37: 0.9, OUT: 0.1, default: 0.5}"
    r = recipe(
        workdir,
        {"a": dit / "flux_a.safetensors", "bare": dit / "flux_bare.safetensors"},
        f"  pb: {{method: weighted_sum, a: a, b: bare, alpha: {alpha}}}\n"
        f"  bp: {{method: weighted_sum, a: bare, b: a, alpha: 0.25}}\n",
        "  pb: {from: pb, path: out/pb.safetensors}\n  bp: {from: bp, path: out/bp.safetensors}\n",
    )
    res = run_cli(r, cache=cache, cwd=workdir)
    assert res.code == 0, res.err
    a, bare = f32(dit / "flux_a.safetensors"), f32(dit / "flux_bare.safetensors")
    pb, bp = f32(workdir / "out/pb.safetensors"), f32(workdir / "out/bp.safetensors")
    assert set(pb) == set(a)  # a's spelling, a's text encoders and VAE
    assert set(bp) == set(bare)
    merged = 0
    for k, x in a.items():
        if not k.startswith(P):
            np.testing.assert_array_equal(pb[k], x, err_msg=k)  # bare has no such key
            continue
        al = block_alpha(k)
        y = bare[k.removeprefix(P)]
        want = torch_round(x * np.float32(1 - al) + y * np.float32(al), "bf16")
        np.testing.assert_array_equal(pb[k], want, err_msg=k)
        merged += 1
    assert merged == sum(k.startswith(P) for k in a)
    for k, y in bare.items():
        want = torch_round(y * np.float32(1 - 0.25) + a[P + k] * np.float32(0.25), "bf16")
        np.testing.assert_array_equal(bp[k], want, err_msg=k)


def test_per_encoder_weights_on_two_all_in_one_flux_files(
    dit: Path, workdir: Path, cache: Path
) -> None:
    alpha = "{diffuser: 0.5, clip_l: 1.0, t5xxl: 0.0, vae: 0.25}"
    r = recipe(
        workdir,
        {"a": dit / "flux_a.safetensors", "b": dit / "flux_b.safetensors"},
        f"  m: {{method: weighted_sum, a: a, b: b, alpha: {alpha}}}\n",
        "  m: {from: m, path: out/m.safetensors}\n",
    )
    res = run_cli(r, cache=cache, cwd=workdir)
    assert res.code == 0, res.err
    a, b = (f32(p) for p in (dit / "flux_a.safetensors", dit / "flux_b.safetensors"))
    m = f32(workdir / "out/m.safetensors")
    seen = set()
    for k, x in a.items():
        group = k.split(".")[1] if k.startswith("text_encoders.") else k.split(".")[0]
        al = {"model": 0.5, "clip_l": 1.0, "t5xxl": 0.0, "vae": 0.25}[group]
        seen.add(group)
        want = torch_round(x * np.float32(1 - al) + b[k] * np.float32(al), "bf16")
        np.testing.assert_array_equal(m[k], want, err_msg=k)
    assert seen == {"model", "clip_l", "t5xxl", "vae"}


def test_sd3_block_mapping_and_layout_errors(dit: Path, workdir: Path, cache: Path) -> None:
    r = recipe(
        workdir,
        {"a": dit / "sd3_a.safetensors", "b": dit / "sd3_b.safetensors"},
        "  m: {method: add_difference, a: a, b: b, c: a,"
        " alpha: {joint_blocks.0-11: 0.2, default: 0.6, layout: sd3}}\n",
        "  m: {from: m, path: out/m.safetensors, dtype: fp32}\n",
    )
    res = run_cli(r, cache=cache, cwd=workdir)
    assert res.code == 0, res.err
    a, b = f32(dit / "sd3_a.safetensors"), f32(dit / "sd3_b.safetensors")
    m = f32(workdir / "out/m.safetensors")
    for k, x in a.items():
        jb = re.match(rf"{re.escape(P)}joint_blocks\.(\d+)\.", k)
        al = np.float32(0.2 if jb and int(jb.group(1)) <= 11 else 0.6)
        want = torch_round(x + (b[k] - x) * al, "bf16")  # the node is bf16 (auto), then fp32
        np.testing.assert_array_equal(m[k], want, err_msg=k)
    # a 26-value list is SD1's layout, an SD1 preset too: both refused on SD3 / Flux, clearly
    for bad, model in (
        ("[" + ", ".join(str(i / 26) for i in range(26)) + "]", "sd3_a"),
        ("{preset: GRAD_V}", "flux_a"),
        ("{IN00: 1, default: 0.5}", "flux_a"),
    ):
        r = recipe(
            workdir,
            {"a": dit / f"{model}.safetensors", "b": dit / f"{model}.safetensors"},
            f"  m: {{method: weighted_sum, a: a, b: b, alpha: {bad}}}\n",
            "  m: {from: m, path: out/bad.safetensors}\n",
        )
        res = run_cli(r, cache=cache, cwd=workdir)
        assert res.code != 0 and "Traceback" not in res.err, res.err
        assert "block layout" in res.err and "SD1/SD2" in res.err, res.err
        assert not (workdir / "out/bad.safetensors").exists()


def test_different_architectures_are_refused_naming_both(
    dit: Path, workdir: Path, cache: Path
) -> None:
    for other in ("sd1", "sd3_a"):
        r = recipe(
            workdir,
            {"flux": dit / "flux_a.safetensors", "other": dit / f"{other}.safetensors"},
            "  m: {method: weighted_sum, a: flux, b: other, alpha: 0.5}\n",
            "  m: {from: m, path: out/x.safetensors}\n",
        )
        res = run_cli(r, cache=cache, cwd=workdir)
        assert res.code != 0 and "Traceback" not in res.err
        assert "'flux' is Flux.1 dev" in res.err and "'other' is" in res.err, res.err
        assert "different architectures" in res.err


# -- fp8 ------------------------------------------------------------------------------------


def test_fp8_outputs_match_torch_casts_and_clamp_instead_of_inf(
    dit: Path, workdir: Path, cache: Path
) -> None:
    # weights 300 and -250 push values far beyond e4m3fn's 448 (and some beyond e5m2's 57344
    # via the 1e4 factor), so clamping is exercised in both formats
    r = recipe(
        workdir,
        {"a": dit / "flux_bare.safetensors", "b": dit / "schnell.safetensors"},
        "  big: {method: linear, models: [a, b], weights: [300, -250], dtype: fp32}\n"
        "  huge: {method: linear, models: [a, b], weights: [30000, 1], dtype: fp8_e5m2}\n"
        "  n8: {method: weighted_sum, a: a, b: b, alpha: 0.3, dtype: fp8_e4m3fn}\n",
        "  e4: {from: big, path: out/e4.safetensors, dtype: fp8_e4m3fn}\n"
        "  e5: {from: big, path: out/e5.safetensors, dtype: fp8_e5m2}\n"
        "  huge: {from: huge, path: out/huge.safetensors}\n"
        "  n8: {from: n8, path: out/n8.safetensors}\n",
    )
    res = run_cli(r, "--json", cache=cache, cwd=workdir)
    assert res.code == 0, res.err
    a, b = f32(dit / "flux_bare.safetensors"), f32(dit / "schnell.safetensors")
    e4, e5 = raw(workdir / "out/e4.safetensors"), raw(workdir / "out/e5.safetensors")
    huge, n8 = raw(workdir / "out/huge.safetensors"), raw(workdir / "out/n8.safetensors")
    import torch

    over4 = 0
    for k, x in a.items():
        if k not in b:  # guidance_in: schnell has none, a's tensor kept (cast)
            continue
        big = x * np.float32(300) + b[k] * np.float32(-250)
        over4 += int(np.count_nonzero(np.abs(big) > 448))
        assert e4[k].dtype == torch.float8_e4m3fn and e5[k].dtype == torch.float8_e5m2
        np.testing.assert_array_equal(e4[k].float().numpy(), torch_round(big, "e4m3"), err_msg=k)
        np.testing.assert_array_equal(e5[k].float().numpy(), torch_round(big, "e5m2"), err_msg=k)
        h = x * np.float32(30000) + b[k] * np.float32(1)
        got = huge[k].float().numpy()
        assert np.isfinite(got).all(), k  # torch alone would give inf for e5m2
        np.testing.assert_array_equal(got, torch_round(h, "e5m2"), err_msg=k)
        # an fp8 node rounds once, from float32 (not through bf16 first)
        w = x * np.float32(0.7) + b[k] * np.float32(0.3)
        np.testing.assert_array_equal(n8[k].float().numpy(), torch_round(w, "e4m3"), err_msg=k)
    assert over4 > 0
    assert f"{over4:,} values beyond the F8_E4M3 range were clamped to ±448" in res.err, res.err
    node = next(n for n in res.json["nodes"] if n["name"] == "huge")
    assert node["clamped_values"] > 0
    assert "merge 'huge'" in res.err and "beyond the F8_E5M2 range" in res.err


def test_fp8_inputs_read_and_widen_exactly(dit: Path, workdir: Path, cache: Path) -> None:
    """fp8 files as inputs: e4m3 and e5m2 values widen exactly, merge in float32."""
    from mergebuild.demo import synthesize

    for dt in ("e4m3", "e5m2"):
        p = workdir / f"in_{dt}.safetensors"
        src = raw(dit / "flux_bare.safetensors")
        import torch

        want = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}[dt]
        synthesize(
            p,
            "x",
            "flux",
            SCALE,
            form="bare",
            overrides={k: v.float().clamp(-448, 448).to(want) for k, v in src.items()},
        )
    r = recipe(
        workdir,
        {"e4": workdir / "in_e4m3.safetensors", "e5": workdir / "in_e5m2.safetensors"},
        "  m: {method: weighted_sum, a: e4, b: e5, alpha: 0.5}\n",
        "  m: {from: m, path: out/m.safetensors}\n",
    )
    res = run_cli(r, "--json", cache=cache, cwd=workdir)
    assert res.code == 0, res.err
    node = next(n for n in res.json["nodes"] if n["name"] == "m")
    assert node["dtype"] == "F16"  # auto: the smallest float holding both exactly
    e4, e5 = f32(workdir / "in_e4m3.safetensors"), f32(workdir / "in_e5m2.safetensors")
    m = raw(workdir / "out/m.safetensors")
    import torch

    for k, x in e4.items():
        want = x * np.float32(0.5) + e5[k] * np.float32(0.5)
        got = m[k]
        assert got.dtype == torch.float16
        np.testing.assert_array_equal(
            got.float().numpy(), torch.from_numpy(want).half().float().numpy(), err_msg=k
        )


def test_scaled_dtype_is_refused_on_merge_nodes(dit: Path, workdir: Path, cache: Path) -> None:
    r = recipe(
        workdir,
        {"a": dit / "flux_bare.safetensors"},
        "  m: {method: weighted_sum, a: a, b: a, alpha: 0.5, dtype: fp8_e4m3fn_scaled}\n",
        "  m: {from: m, path: out/m.safetensors}\n",
    )
    res = run_cli(r, cache=cache, cwd=workdir)
    assert res.code != 0 and "r.yaml:" in res.err and "applies to outputs" in res.err, res.err


def test_scaled_fp8_write_and_read_back_against_float64(
    dit: Path, workdir: Path, cache: Path
) -> None:
    """`fp8_e4m3fn_scaled`: weight matrices as e4m3fn × a float32 scale (amax / 448), other
    tensors bf16, ComfyUI's marker; read back, a scaled file is its dequantized weights and
    its scales never reach another file."""
    import torch

    r = recipe(
        workdir,
        {"a": dit / "flux_bare.safetensors", "b": dit / "schnell.safetensors"},
        "  m: {method: weighted_sum, a: a, b: b, alpha: 0.5, dtype: fp32}\n",
        "  sc: {from: m, path: out/sc.safetensors, dtype: fp8_e4m3fn_scaled}\n",
    )
    res = run_cli(r, cache=cache, cwd=workdir)
    assert res.code == 0, res.err
    a, b = f32(dit / "flux_bare.safetensors"), f32(dit / "schnell.safetensors")
    sc = raw(workdir / "out/sc.safetensors")
    marker = sc.pop("scaled_fp8")
    assert marker.dtype == torch.float8_e4m3fn and marker.numel() == 0
    scaled = 0
    for k, x in a.items():
        m = x * np.float32(0.5) + b[k] * np.float32(0.5) if k in b else x
        if k.endswith(".weight") and x.ndim >= 2:
            scale = np.float32(np.abs(m).max()) / np.float32(448)
            got_scale = sc[k.removesuffix("weight") + "scale_weight"]
            assert got_scale.dtype == torch.float32 and got_scale.shape == ()
            assert got_scale.item() == scale, k
            assert sc[k].dtype == torch.float8_e4m3fn
            want = torch_round(m / scale, "e4m3")
            np.testing.assert_array_equal(sc[k].float().numpy(), want, err_msg=k)
            assert np.abs(sc[k].float().numpy()).max() == 448  # the whole range is used
            scaled += 1
        else:
            assert sc[k].dtype == torch.bfloat16, k
            np.testing.assert_array_equal(sc[k].float().numpy(), torch_round(m, "bf16"))
    assert scaled > 100 and len(sc) == len(a) + scaled
    r = run_cli("inspect", workdir / "out/sc.safetensors", "--json", cache=cache)
    assert r.json["scaled_fp8_weights"] == scaled
    # read back: dequantized exactly (float64 product rounded once to float32), scales hidden
    r = recipe(
        workdir,
        {"sc": workdir / "out/sc.safetensors", "b": dit / "schnell.safetensors"},
        "  w: {method: weighted_sum, a: sc, b: b, alpha: 0.25}\n",
        "  back: {from: sc, path: out/back.safetensors, dtype: fp32}\n"
        "  w: {from: w, path: out/w.safetensors}\n",
    )
    res = run_cli(r, "--json", cache=cache, cwd=workdir)
    assert res.code == 0, res.err
    back, w = raw(workdir / "out/back.safetensors"), raw(workdir / "out/w.safetensors")
    assert set(back) == set(w) == set(a)  # no scale_weight, no marker
    for k in a:
        if k.endswith(".weight") and a[k].ndim >= 2:
            q = sc[k].float().numpy().astype(np.float64)
            s = np.float64(sc[k.removesuffix("weight") + "scale_weight"].item())
            deq = (q * s).astype(np.float32)
        else:
            deq = sc[k].float().numpy()
        np.testing.assert_array_equal(back[k].numpy(), deq, err_msg=k)
        if k in b:
            want = deq * np.float32(0.75) + b[k] * np.float32(0.25)
            assert w[k].dtype == torch.float32  # auto: F32 (dequantized) with BF16 → F32
            np.testing.assert_array_equal(w[k].numpy(), want, err_msg=k)


def test_doctor_knows_flux_sd3_keys_and_fp8_ranges(dit: Path, workdir: Path, cache: Path) -> None:
    import torch

    from mergebuild.demo import synthesize

    for name in ("flux_a", "flux_bare", "schnell", "sd3_a"):
        r = run_cli("doctor", dit / f"{name}.safetensors", "--json", cache=cache)
        assert r.code == 0 and r.json["findings"] == [], (name, r.out)
    src = raw(dit / "flux_bare.safetensors")
    big = "double_blocks.0.img_mlp.0.weight"
    drop = "single_blocks.5.linear2.weight"
    over = {k: v for k, v in src.items() if k != drop}
    over[big] = v = src[big].float() * 1000
    n_big = int((v.abs() > 448).sum())
    assert n_big > 0
    p = synthesize(
        workdir / "odd.safetensors",
        "odd",
        "flux",
        SCALE,
        dtype="bf16",
        form="bare",
        overrides=over,
    )
    # synthesize writes every key of the layout: remove one by rewriting without it
    from safetensors.torch import load_file, save_file

    t = load_file(str(p))
    del t[drop]
    t["extra.weight"] = torch.zeros(2, 2, dtype=torch.bfloat16)
    save_file(t, str(p))
    r = run_cli("doctor", p, "--json", cache=cache)
    checks = {f["check"]: f for f in r.json["findings"]}
    assert checks["fp8_range"]["keys"] == [big]
    assert checks["missing_keys"]["keys"] == [drop]
    assert checks["unexpected_keys"]["keys"] == ["extra.weight"]
    # a scaled fp8 file with a broken scale is an error; its design dtype mix is not warned
    t = {k: v for k, v in load_file(str(dit / "flux_bare.safetensors")).items()}
    w = "double_blocks.1.img_attn.qkv.weight"
    t[w] = t[w].float().clamp(-448, 448).to(torch.float8_e4m3fn)
    t[w.removesuffix("weight") + "scale_weight"] = torch.tensor(float("nan"))
    save_file(t, str(workdir / "bad_scale.safetensors"))
    r = run_cli("doctor", workdir / "bad_scale.safetensors", "--json", cache=cache)
    assert r.code == 1
    checks = {f["check"]: f for f in r.json["findings"]}
    assert checks["fp8_scale"]["keys"] == [w] and "mixed_dtypes" not in checks


def test_flux_fill_merges_the_shared_img_in_columns_and_keeps_the_rest(
    dit: Path, workdir: Path, cache: Path
) -> None:
    """Flux Fill (inpainting): like A1111's SD inpainting rule, img_in's noise-latent inputs
    merge and Fill's image/mask inputs stay; Fill must be `a`."""
    from mergebuild.demo import synthesize

    fill = synthesize(
        workdir / "fill.safetensors", "fill", "flux", SCALE, dtype="bf16", in_channels=96
    )
    r = run_cli("inspect", fill, "--json", cache=cache)
    assert r.json["architecture"]["variant"] == "fill"
    r = recipe(
        workdir,
        {"fill": fill, "a": dit / "flux_a.safetensors", "b": dit / "flux_b.safetensors"},
        "  m: {method: add_difference, a: fill, b: a, c: b, alpha: 0.5}\n"
        "  bad: {method: weighted_sum, a: a, b: fill, alpha: 0.5}\n",
        "  m: {from: m, path: out/m.safetensors}\n",
    )
    res = run_cli(r, "m", cache=cache, cwd=workdir)
    assert res.code == 0, res.err
    f, a, b = (f32(p) for p in (fill, dit / "flux_a.safetensors", dit / "flux_b.safetensors"))
    m = f32(workdir / "out/m.safetensors")
    k = P + "img_in.weight"
    assert f[k].shape == (a[k].shape[0], 6 * a[k].shape[1])
    n = a[k].shape[1]
    want = f[k].copy()
    want[:, :n] = torch_round(f[k][:, :n] + (a[k] - b[k]) * np.float32(0.5), "bf16")
    np.testing.assert_array_equal(m[k], want)
    q = P + "double_blocks.2.img_attn.qkv.weight"
    np.testing.assert_array_equal(m[q], torch_round(f[q] + (a[q] - b[q]) * np.float32(0.5), "bf16"))
    (workdir / "r.yaml").write_text(
        (workdir / "r.yaml").read_text().replace("from: m,", "from: bad,")
    )
    res = run_cli(workdir / "r.yaml", cache=cache, cwd=workdir)
    assert res.code != 0 and "put the Fill model in 'a'" in res.err, res.err


def test_output_components_by_transformer_and_encoder(
    dit: Path, workdir: Path, cache: Path
) -> None:
    r = recipe(
        workdir,
        {"a": dit / "sd3_a.safetensors"},
        "",
        "  tr: {from: a, path: out/tr.safetensors, components: [diffuser]}\n"
        "  two: {from: a, path: out/two.safetensors, components: [unet, clip_l, t5xxl]}\n"
        "  all: {from: a, path: out/all.safetensors,"
        " components: [diffuser, clip_l, clip_g, t5xxl, vae, other]}\n",
    )
    res = run_cli(r, "--json", cache=cache, cwd=workdir)
    assert res.code == 0, res.err
    keys = set(infos(dit / "sd3_a.safetensors"))
    tr, two = (
        set(infos(workdir / "out/tr.safetensors")),
        set(infos(workdir / "out/two.safetensors")),
    )
    assert tr == {k for k in keys if k.startswith(P)}
    want = {k for k in keys if k.startswith((P, "text_encoders.clip_l.", "text_encoders.t5xxl."))}
    assert two == want
    assert set(infos(workdir / "out/all.safetensors")) == keys
    # naming every part is the plain output: one key, so one cache entry
    res = run_cli(r, "-n", "--json", cache=cache, cwd=workdir)
    outs = {n["name"]: n["key"] for n in res.json["nodes"] if n["kind"] == "output"}
    r2 = recipe(
        workdir,
        {"a": dit / "sd3_a.safetensors"},
        "",
        "  all: {from: a, path: out/all.safetensors}\n",
    )
    res = run_cli(r2, "-n", "--json", cache=cache, cwd=workdir)
    assert next(n["key"] for n in res.json["nodes"] if n["kind"] == "output") == outs["all"]


METHODS_ON_FLUX = {
    "ties": "{method: ties, base: X, models: [Y, Z], k: 0.3}",
    "slerp": "{method: slerp, a: X, b: Y, alpha: 0.3}",
    "train_difference": "{method: train_difference, a: X, b: Y, c: Z}",
    "add_cosine_a": "{method: add_cosine_a, a: X, b: Y, alpha: 0.2}",
    "smooth_add": "{method: smooth_add, a: X, b: Y, c: Z, alpha: 0.5}",
    "model_stock": "{method: model_stock, base: X, models: [Y, Z]}",
    "geometric_median": "{method: geometric_median, models: [X, Y, Z]}",
    "sum_twice": "{method: sum_twice, a: X, b: Y, c: Z, alpha: 0.3, beta: 0.4}",
}


@pytest.mark.parametrize("method", list(METHODS_ON_FLUX))  # the first 3 in make test
def test_every_method_runs_on_flux_whatever_the_key_spelling(
    method: str, dit: Path, workdir: Path, cache: Path
) -> None:
    """The same method on the same tensors gives the same bytes whether the inputs are all
    prefixed or mixed with bare-key files (mapped onto `a`'s spelling). The methods' numbers
    are checked against numpy and sd-mecha in test_methods_*.py; here, the mapping is. (Random
    methods are left out: their masks are keyed by the node's content key, which differs when
    the input files do.)"""
    import torch
    from safetensors.torch import load_file, save_file

    # prefixed copies of the bare files: same tensors, model.diffusion_model. keys
    for name in ("flux_bare", "schnell"):
        t = {P + k: v for k, v in load_file(str(dit / f"{name}.safetensors")).items()}
        save_file(t, str(workdir / f"{name}_p.safetensors"))
    spec = METHODS_ON_FLUX[method]
    mixed = spec.replace("X", "a").replace("Y", "bare").replace("Z", "sch")
    same = spec.replace("X", "a").replace("Y", "bare_p").replace("Z", "sch_p")
    r = recipe(
        workdir,
        {
            "a": dit / "flux_tr.safetensors",
            "bare": dit / "flux_bare.safetensors",
            "sch": dit / "schnell.safetensors",
            "bare_p": workdir / "flux_bare_p.safetensors",
            "sch_p": workdir / "schnell_p.safetensors",
        },
        f"  mixed: {mixed}\n  same: {same}\n",
        "  mixed: {from: mixed, path: out/mixed.safetensors}\n"
        "  same: {from: same, path: out/same.safetensors}\n",
    )
    res = run_cli(r, cache=cache, cwd=workdir)
    assert res.code == 0, res.err
    got, want = raw(workdir / "out/mixed.safetensors"), raw(workdir / "out/same.safetensors")
    assert set(got) == set(want) == set(infos(dit / "flux_tr.safetensors"))
    a = raw(dit / "flux_tr.safetensors")
    changed = 0
    for k in want:
        assert torch.equal(got[k], want[k]), k
        changed += not torch.equal(want[k], a[k])
    assert changed > len(want) // 2  # the method did merge (not a's tensors passed through)


def test_scaled_fp8_inputs_keep_their_stored_bytes_for_hashes_and_copies(
    dit: Path, workdir: Path, cache: Path
) -> None:
    """A scaled input's content key is the hash of its file, whether the first build hashes it
    while merging or hashed it first; `doctor --fix` copies it byte for byte, still scaled."""
    import hashlib

    import torch
    from safetensors.torch import load_file, save_file

    t = load_file(str(dit / "flux_bare.safetensors"))
    for k in [k for k in t if k.endswith(".weight") and t[k].ndim == 2][:20]:
        t[k] = (t[k].float() / 0.01).clamp(-448, 448).to(torch.float8_e4m3fn)
        t[k.removesuffix("weight") + "scale_weight"] = torch.tensor(0.01)
    save_file(t, str(workdir / "sc.safetensors"))
    digest = hashlib.sha256((workdir / "sc.safetensors").read_bytes()).hexdigest()
    r = recipe(
        workdir,
        {"sc": workdir / "sc.safetensors", "b": dit / "schnell.safetensors"},
        "  m: {method: weighted_sum, a: sc, b: b, alpha: 0.5}\n",
        "  m: {from: m, path: out/m.safetensors}\n",
    )
    keys = []
    for c, first in ((cache / "fresh", None), (cache / "hashed", "-n")):
        if first:
            assert run_cli(r, first, cache=c, cwd=workdir).code == 0
        res = run_cli(r, "--json", cache=c, cwd=workdir)
        assert res.code == 0, res.err
        keys.append({n["name"]: n["key"] for n in res.json["nodes"]})
    assert keys[0] == keys[1]
    lock = run_cli("lock", r, cache=cache / "hashed", cwd=workdir)
    assert lock.code == 0, lock.err
    assert any(digest in p.read_text() for p in workdir.glob("*.lock*"))
    fix = run_cli("doctor", workdir / "sc.safetensors", "--fix", workdir / "fixed.safetensors")
    assert fix.code == 0, fix.err
    fixed = load_file(str(workdir / "fixed.safetensors"))
    assert set(fixed) == set(t)
    same = [
        torch.equal(fixed[k].reshape(-1).view(torch.uint8), t[k].reshape(-1).view(torch.uint8))
        for k in t
    ]
    assert all(same)


def test_flux_light_paths_do_not_import_torch(dit: Path, workdir: Path, cache: Path) -> None:
    """`-n`, a fully cached build, `inspect` and `blocks` of Flux / scaled-fp8 files read
    headers only: no torch."""
    import os
    import subprocess
    import sys

    import torch
    from safetensors.torch import load_file, save_file

    from conftest import SRC

    t = load_file(str(dit / "flux_bare.safetensors"))
    w = "double_blocks.1.img_attn.qkv.weight"
    t[w] = t[w].float().clamp(-448, 448).to(torch.float8_e4m3fn)
    t[w.removesuffix("weight") + "scale_weight"] = torch.tensor(0.5)
    save_file(t, str(workdir / "sc.safetensors"))
    r = recipe(
        workdir,
        {"sc": workdir / "sc.safetensors", "a": dit / "flux_a.safetensors"},
        "  m: {method: weighted_sum, a: a, b: sc, alpha: {double_blocks.0-9: 0.3, default: 0.5}}\n",
        "  m: {from: m, path: out/m.safetensors, dtype: fp8_e4m3fn_scaled}\n",
    )
    assert run_cli(r, cache=cache, cwd=workdir).code == 0
    probe = (
        "import sys; from mergebuild.cli import main; rc = main(sys.argv[1:]); "
        "assert 'torch' not in sys.modules, 'torch imported'; raise SystemExit(rc)"
    )
    env = {**os.environ, "PYTHONPATH": str(SRC), "MERGEBUILD_CACHE_DIR": str(cache)}
    for args in (
        [str(r), "-n"],
        [str(r)],
        ["inspect", str(workdir / "sc.safetensors")],
        ["blocks", str(dit / "flux_a.safetensors")],
    ):
        p = subprocess.run(
            [sys.executable, "-c", probe, *args],
            env=env,
            capture_output=True,
            text=True,
            cwd=workdir,
        )
        assert p.returncode == 0, (args, p.stderr)
