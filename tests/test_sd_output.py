"""Output options: VAE bake-in, prune, components, key regexes, .ckpt → fp16 conversion."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from conftest import SCALE, load_st, run_cli

VAE = "first_stage_model."


def f32(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float32)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two SD1 models (one with EMA), a bare VAE file (fp32, no prefix), an fp32 .ckpt."""
    import torch
    from safetensors.numpy import save_file

    from mergebuild.demo import synthesize

    d = tmp_path_factory.mktemp("outopts")
    a = synthesize(d / "a.safetensors", "a", scale=SCALE, ema=True)
    b = synthesize(d / "b.safetensors", "b", scale=SCALE)
    donor = load_st(synthesize(d / "donor.safetensors", "donor", scale=SCALE))
    vae = {k[len(VAE) :]: f32(v) for k, v in donor.items() if k.startswith(VAE)}
    vae["loss.logvar"] = np.zeros((), np.float32)  # training-only entry: never baked in
    save_file(vae, str(d / "vae.safetensors"))
    sd = {k: torch.from_numpy(f32(v) if v.dtype.kind == "f" else v) for k, v in load_st(a).items()}
    torch.save({"state_dict": sd, "epoch": 3, "global_step": 1000}, d / "m.ckpt")
    return {"a": a, "b": b, "vae": d / "vae.safetensors", "ckpt": d / "m.ckpt"}


def write(tmp: Path, files: dict, merges: str, outputs: str) -> Path:
    r = tmp / "r.yaml"
    r.write_text(
        "mergebuild: 1\n"
        f"models: {{a: {files['a']}, b: {files['b']}, myvae: {files['vae']}, "
        f"ck: {files['ckpt']}}}\n"
        f"merges:\n{merges}\noutputs:\n{outputs}\n"
    )
    return r


def test_vae_bake_in_replaces_exactly_the_vae(files: dict, tmp_path: Path, cache: Path) -> None:
    recipe = write(
        tmp_path,
        files,
        "  m: a * 0.5 + b * 0.5",
        "  baked: {from: m, path: baked.safetensors, vae: myvae, dtype: fp16}\n"
        "  plain: {from: m, path: plain.safetensors, dtype: fp16}",
    )
    r = run_cli(recipe, "--json", cache=cache)
    assert r.code == 0, r.err
    a, b, vae = load_st(files["a"]), load_st(files["b"]), load_st(files["vae"])
    baked, plain = load_st(tmp_path / "baked.safetensors"), load_st(tmp_path / "plain.safetensors")
    assert set(baked) == set(plain) == set(a)
    n_vae = 0
    for k, x in a.items():
        if x.dtype.kind != "f":
            np.testing.assert_array_equal(baked[k], x)
            continue
        if k in b:
            merged = (f32(x) * np.float32(0.5) + f32(b[k]) * np.float32(0.5)).astype(np.float16)
        else:
            merged = x.astype(np.float16)  # model_ema.* only in a: kept from a
        np.testing.assert_array_equal(plain[k], merged, err_msg=k)
        if k.startswith(VAE):
            n_vae += 1
            np.testing.assert_array_equal(baked[k], vae[k[len(VAE) :]].astype(np.float16), k)
            assert not np.array_equal(baked[k], merged)
        else:
            np.testing.assert_array_equal(baked[k], merged, err_msg=k)
    assert n_vae == len(vae) - 1 == 248 and "first_stage_model.loss.logvar" not in baked
    import json

    from mergebuild.engine.safetensors_io import read_header

    prov = json.loads(read_header(tmp_path / "baked.safetensors").metadata["mergebuild"])
    assert prov["output"]["vae"] == "myvae" and "myvae" in prov["models"]
    # only the baked output's key depends on the VAE: another VAE rebuilds that output alone
    dry = run_cli(recipe, "--dry-run", "--json", cache=cache)
    assert all(n["status"] == "cached" for n in dry.json["nodes"])
    from safetensors.numpy import save_file

    other = {k[len(VAE) :]: v for k, v in b.items() if k.startswith(VAE)}
    save_file(other, str(tmp_path / "vae2.safetensors"))
    recipe.write_text(
        recipe.read_text().replace(str(files["vae"]), str(tmp_path / "vae2.safetensors"))
    )
    dry = run_cli(recipe, "--dry-run", "--json", cache=cache).json
    assert {n["name"]: n["status"] for n in dry["nodes"]} == {
        "m": "build",  # not stored (it feeds only outputs): recomputed in memory for `baked`
        "baked": "build",
        "plain": "cached",
    }


def test_prune_components_and_regexes(files: dict, tmp_path: Path, cache: Path) -> None:
    recipe = write(
        tmp_path,
        files,
        "  m: a * 0.5 + b * 0.5",
        "  pruned: {from: a, path: pruned.safetensors, prune: true}\n"
        "  unet: {from: m, path: unet.safetensors, components: [unet]}\n"
        "  te_vae: {from: a, path: te_vae.safetensors, components: [text_encoder, vae],"
        " exclude: ['\\.bias$']}\n"
        "  inc: {from: a, path: inc.safetensors, include: ['^model\\.diffusion_model\\.out\\.',"
        " 'position_ids']}",
    )
    r = run_cli(recipe, cache=cache)
    assert r.code == 0, r.err
    a = load_st(files["a"])
    assert any(k.startswith("model_ema.") for k in a)
    pruned = load_st(tmp_path / "pruned.safetensors")
    assert set(pruned) == {k for k in a if not k.startswith("model_ema.")}
    for k, v in pruned.items():
        np.testing.assert_array_equal(v, a[k])
    unet = load_st(tmp_path / "unet.safetensors")
    assert set(unet) == {k for k in a if k.startswith("model.diffusion_model.")}
    te_vae = load_st(tmp_path / "te_vae.safetensors")
    assert set(te_vae) == {
        k
        for k in a
        if k.startswith(("cond_stage_model.", "first_stage_model.")) and not k.endswith(".bias")
    }
    inc = load_st(tmp_path / "inc.safetensors")
    assert set(inc) == {
        "model.diffusion_model.out.0.weight",
        "model.diffusion_model.out.0.bias",
        "model.diffusion_model.out.2.weight",
        "model.diffusion_model.out.2.bias",
        "cond_stage_model.transformer.text_model.embeddings.position_ids",
    }
    # the output options are part of the output's key: changing one rebuilds only that output
    recipe.write_text(recipe.read_text().replace("prune: true", "prune: false"))
    dry = run_cli(recipe, "--dry-run", "--json", cache=cache).json
    status = {n["name"]: n["status"] for n in dry["nodes"]}
    assert status == {"m": "cached", "pruned": "build", "unet": "cached", "te_vae": "cached",
                      "inc": "cached"}  # fmt: skip


def test_convert_ckpt_to_pruned_fp16_safetensors(files: dict, tmp_path: Path, cache: Path) -> None:
    recipe = write(
        tmp_path,
        files,
        "  conv: {method: copy, a: ck, dtype: fp16}",
        "  o: {from: conv, path: converted.safetensors, prune: true}",
    )
    r = run_cli(recipe, cache=cache)
    assert r.code == 0, r.err
    a = load_st(files["a"])  # the ckpt holds a's tensors as fp32
    out = load_st(tmp_path / "converted.safetensors")
    assert set(out) == {k for k in a if not k.startswith("model_ema.")}
    for k, v in out.items():
        if a[k].dtype.kind == "f":
            assert v.dtype == np.float16
        np.testing.assert_array_equal(v, a[k], err_msg=k)  # fp16 → fp32 → fp16 is exact


@pytest.mark.parametrize(
    ("output", "message"),
    [
        ("{from: a, path: o.safetensors, exclude: ['(']}", "is not a valid regular expression"),
        ("{from: a, path: o.safetensors, vae: myvea}", "did you mean 'myvae'?"),
        ("{from: a, path: o.safetensors, prun: true}", "did you mean 'prune'?"),
        (
            "{from: a, path: o.safetensors, components: [unet, vea]}",
            "item 2 of 'components' of output 'o': input should be 'unet', 'diffuser', "
            "'text_encoder', 'clip_l'",
        ),
        (
            "{from: a, path: o.safetensors, vae: myvae, components: [unet]}",
            "leave the VAE out",
        ),
    ],
)
def test_output_option_errors(
    files: dict, tmp_path: Path, cache: Path, output: str, message: str
) -> None:
    recipe = write(tmp_path, files, "  m: a", f"  o: {output}")
    r = run_cli(recipe, "--dry-run", cache=cache)
    assert r.code == 2 and message in r.err and "Traceback" not in r.err, r.err
    assert ":4:" in r.err or ":5:" in r.err or ":6:" in r.err, r.err


def test_sdxl_vae_bake_and_components(tmp_path: Path, cache: Path) -> None:
    from safetensors.numpy import save_file

    from mergebuild.demo import synthesize

    xl = synthesize(tmp_path / "xl.safetensors", "xl", arch="sdxl", scale=SCALE)
    donor = load_st(synthesize(tmp_path / "d.safetensors", "d", arch="sdxl", scale=SCALE))
    vae = {k[len(VAE) :]: v for k, v in donor.items() if k.startswith(VAE)}
    save_file(vae, str(tmp_path / "vae.safetensors"))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "mergebuild: 1\n"
        f"models: {{xl: {xl}, v: {tmp_path / 'vae.safetensors'}}}\n"
        "outputs:\n"
        "  baked: {from: xl, path: baked.safetensors, vae: v}\n"
        "  te: {from: xl, path: te.safetensors, components: [text_encoder]}\n"
    )
    r = run_cli(recipe, cache=cache)
    assert r.code == 0, r.err
    src = load_st(xl)
    baked, te = load_st(tmp_path / "baked.safetensors"), load_st(tmp_path / "te.safetensors")
    assert set(baked) == set(src)
    for k, x in src.items():
        want = vae[k[len(VAE) :]] if k.startswith(VAE) else x
        np.testing.assert_array_equal(baked[k], want, err_msg=k)
    assert set(te) == {k for k in src if k.startswith("conditioner.")}


def test_vae_from_a_full_checkpoint_takes_only_its_vae(
    files: dict, tmp_path: Path, cache: Path
) -> None:
    """A whole model given as `vae:` contributes first_stage_model.* and nothing else."""
    recipe = write(
        tmp_path,
        files,
        "  m: a * 0.5 + b * 0.5",
        "  baked: {from: m, path: baked.safetensors, vae: b}",
    )
    r = run_cli(recipe, "-q", cache=cache)
    assert r.code == 0, r.err
    baked, a, b = (load_st(p) for p in (tmp_path / "baked.safetensors", files["a"], files["b"]))
    assert set(baked) == set(a)  # no first_stage_model.model.diffusion_model.* strays
    for k in baked:
        if k.startswith(VAE):
            np.testing.assert_array_equal(baked[k], b[k], k)


def test_alpha_zero_keeps_a_exactly_even_next_to_inf(
    files: dict, tmp_path: Path, cache: Path
) -> None:
    """Components left out of a per-component alpha are a's tensors: an inf in b stays out."""
    from safetensors.numpy import save_file

    b = load_st(files["b"])
    key = "cond_stage_model.transformer.text_model.final_layer_norm.weight"
    b[key] = b[key].copy()
    b[key][0] = np.inf
    save_file(b, str(tmp_path / "b_inf.safetensors"))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "mergebuild: 1\n"
        f"models: {{a: {files['a']}, b: {tmp_path / 'b_inf.safetensors'}}}\n"
        "merges:\n"
        "  m: {method: weighted_sum, a: a, b: b, alpha: {unet: 0.5}}\n"
        "outputs: {o: {from: m, path: o.safetensors}}\n"
    )
    r = run_cli(recipe, "-q", cache=cache)
    assert r.code == 0, r.err
    out, a = load_st(tmp_path / "o.safetensors"), load_st(files["a"])
    assert np.array_equal(out[key], a[key]) and np.isfinite(out[key]).all()
    unet = "model.diffusion_model.out.2.weight"
    want = f32(a[unet]) * np.float32(0.5) + f32(b[unet]) * np.float32(0.5)
    assert np.array_equal(out[unet], want.astype(a[unet].dtype))
