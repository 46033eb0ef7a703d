"""extract_lora: factors against numpy's SVD (kohya's recipe, sign convention written here),
the full-rank round trip (extract, then bake = the fine-tune), format, determinism, misuse."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from conftest import load_st, run_cli

U = "model.diffusion_model."
Q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
Q_KEY = U + "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"
CONV = "lora_unet_down_blocks_1_resnets_0_conv1"
CONV_KEY = U + "input_blocks.4.0.in_layers.2.weight"
TE = "lora_te_text_model_encoder_layers_2_mlp_fc1"
TE_KEY = "cond_stage_model.transformer.text_model.encoder.layers.2.mlp.fc1.weight"


def write(workdir: Path, node: str, dtype: str = "", extra: str = "") -> Path:
    path = workdir / "x.yaml"
    path.write_text(
        "mergebuild: 1\nmodels:\n  anything: models/anything-v3.safetensors\n"
        "  sd15: models/v1-5-pruned.safetensors\n"
        f"merges:\n  ex: {node}\n{extra}"
        f"outputs:\n  lora: {{from: ex, path: out/ex.safetensors{dtype}}}\n"
    )
    return path


def ref_factors(delta: np.ndarray, r: int, q: float) -> tuple[np.ndarray, np.ndarray]:
    """kohya: SVD, up = U·S, down = Vh; here each component's sign makes the largest-|.| entry
    of its down row positive; clamp both to ±(q-quantile of their values)."""
    mat = delta.reshape(delta.shape[0], -1).astype(np.float64)
    u, s, vh = np.linalg.svd(mat, full_matrices=False)
    up, down = u[:, :r] * s[:r], vh[:r].copy()
    for i in range(r):
        j = int(np.argmax(np.abs(down[i])))
        if down[i, j] < 0:
            down[i], up[:, i] = -down[i], -up[:, i]
    if q < 1:
        hi = np.quantile(np.concatenate([up.ravel(), down.ravel()]), q)
        up, down = np.clip(up, -hi, hi), np.clip(down, -hi, hi)
    return up, down


@pytest.mark.parametrize("q", [1.0, 0.99])
def test_factors_match_numpy_svd(workdir: Path, cache: Path, q: float) -> None:
    node = (
        "{method: extract_lora, a: anything, base: sd15, rank: 3, conv_rank: 2, "
        f"clamp_quantile: {q}, dtype: fp32}}"
    )
    r = run_cli(write(workdir, node), cache=cache)
    assert r.code == 0, r.err
    out = load_st(workdir / "out" / "ex.safetensors")
    a = load_st(workdir / "models" / "anything-v3.safetensors")
    b = load_st(workdir / "models" / "v1-5-pruned.safetensors")
    for name, key, rank in ((Q, Q_KEY, 3), (CONV, CONV_KEY, 2), (TE, TE_KEY, 3)):
        delta = a[key].astype(np.float32) - b[key].astype(np.float32)
        up, down = ref_factors(delta, rank, q)
        got_down, got_up = out[f"{name}.lora_down.weight"], out[f"{name}.lora_up.weight"]
        assert got_down.shape == (rank, *delta.shape[1:])
        assert got_up.shape == (delta.shape[0], rank, *(1,) * (delta.ndim - 2))
        assert float(out[f"{name}.alpha"]) == rank
        tol = 2e-4 * max(1.0, float(np.abs(up).max()))
        assert np.allclose(got_up.reshape(up.shape), up, atol=tol), name
        assert np.allclose(got_down.reshape(down.shape), down, atol=2e-4), name


def test_full_rank_round_trip(workdir: Path, cache: Path) -> None:
    """Extract at full rank (no clamp, fp32 factors), bake into the base: the fine-tune again,
    to fp16 rounding, on every extracted tensor; the rest of the base untouched."""
    node = (
        "{method: extract_lora, a: anything, base: sd15, rank: 4096, conv_rank: 4096, "
        "clamp_quantile: 1.0, dtype: fp32}"
    )
    r = run_cli(write(workdir, node), cache=cache)
    assert r.code == 0, r.err
    (workdir / "models" / "ex.safetensors").write_bytes(
        (workdir / "out" / "ex.safetensors").read_bytes()
    )
    bake = workdir / "b.yaml"
    bake.write_text(
        "mergebuild: 1\nmodels:\n  sd15: models/v1-5-pruned.safetensors\n"
        "  ex: models/ex.safetensors\nmerges:\n  back: sd15 + lora(ex, 1.0)\n"
        "outputs:\n  back: {from: back, path: out/back.safetensors}\n"
    )
    r = run_cli(bake, "--json", cache=cache)
    assert r.code == 0, r.err
    back = load_st(workdir / "out" / "back.safetensors")
    a = load_st(workdir / "models" / "anything-v3.safetensors")
    b = load_st(workdir / "models" / "v1-5-pruned.safetensors")
    touched = next(n for n in r.json["nodes"] if n["name"] == "back")["merged"]
    assert touched > 300
    changed = same = total = 0
    for key in a:
        if back[key].tobytes() == b[key].tobytes():
            continue
        changed += 1
        # float32 SVD reconstructs ΔW to ~1e-6: one fp16 step, or a few 1e-6 near zero
        err = np.abs(back[key].astype(np.float32) - a[key].astype(np.float32))
        assert np.all(err <= np.spacing(np.abs(a[key])).astype(np.float32) + 2e-5), key
        same += int((back[key] == a[key]).sum())
        total += a[key].size
    assert changed >= touched * 0.95  # fp16 ties aside, every extracted tensor became a's
    assert same >= 0.99 * total
    for key in (Q_KEY, CONV_KEY, TE_KEY):
        assert back[key].tobytes() != b[key].tobytes()


def test_output_is_a_kohya_lora_with_metadata(workdir: Path, cache: Path) -> None:
    node = "{method: extract_lora, a: anything, base: sd15, rank: 4}"
    r = run_cli(write(workdir, node, ", dtype: fp16"), cache=cache)
    assert r.code == 0, r.err
    path = workdir / "out" / "ex.safetensors"
    from safetensors import safe_open

    with safe_open(str(path), "np") as f:
        meta = f.metadata()
        keys = set(f.keys())
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "4"
    assert meta["ss_base_model_version"] == "sd_v1" and meta["ss_network_module"] == "networks.lora"
    assert f"{Q}.lora_down.weight" in keys and f"{TE}.alpha" in keys
    assert f"{CONV}.lora_down.weight" not in keys  # no conv_rank: 3×3 convs not extracted
    j = run_cli("inspect", path, "--json").json
    assert j["format"] == "kohya" and j["base_architecture"] == "sd1" and not j["unmapped"]


def test_extract_is_deterministic_across_j(workdir: Path, tmp_path: Path) -> None:
    node = "{method: extract_lora, a: anything, base: sd15, rank: 6, conv_rank: 3}"
    path = write(workdir, node)
    shas = []
    for i, j in enumerate(("1", "2", "2")):
        r = run_cli(path, "-j", j, cache=tmp_path / f"c{i}")
        assert r.code == 0, r.err
        shas.append(hashlib.sha256((workdir / "out" / "ex.safetensors").read_bytes()).hexdigest())
    assert len(set(shas)) == 1


@pytest.mark.parametrize(
    "use",
    [
        "  again: ex * 0.5 + anything * 0.5\n",
        "  again: {method: bake_lora, a: ex, loras: [ex], strength: 0.5}\n",
        "  again: {method: bake_lora, a: anything, loras: [ex]}\n  ex2: {cache: false}\n",
    ],
)
def test_extracted_node_is_not_a_checkpoint(workdir: Path, cache: Path, use: str) -> None:
    node = "{method: extract_lora, a: anything, base: sd15, rank: 4}"
    if "cache: false" in use:  # a LoRA made in the recipe is read back from the cache
        node = "{method: extract_lora, a: anything, base: sd15, rank: 4, cache: false}"
        use = use.replace("  ex2: {cache: false}\n", "")
    r = run_cli(write(workdir, node, extra=use), cache=cache)
    assert r.code == 2 and "Traceback" not in r.err
    assert "'ex' is an extracted LoRA" in r.err and "x.yaml:" in r.err
    assert "cache: false" in r.err if "bake_lora, a: anything" in use else True


def test_extracted_lora_baked_and_merged_in_the_same_recipe(
    workdir: Path, cache: Path, tmp_path: Path
) -> None:
    """extract_lora → bake_lora and → merge_loras in one recipe: the LoRA is built in a pass
    of its own, then read from the cache like a LoRA file; the same bytes as writing it out
    and baking the file with a second recipe."""
    node = "{method: extract_lora, a: anything, base: sd15, rank: 8}"
    extra = (
        "  back: sd15 + lora(ex, 0.7)\n"
        "  both: {method: merge_loras, loras: [ex, ex], weights: [0.5, 0.25]}\n"
        "  back2: {method: bake_lora, a: sd15, loras: [both]}\n"
    )
    recipe = write(workdir, node, extra=extra)
    recipe.write_text(
        recipe.read_text()
        + "  back: {from: back, path: out/back.safetensors}\n"
        + "  back2: {from: back2, path: out/back2.safetensors}\n"
    )
    r = run_cli(recipe, "--json", cache=cache)
    assert r.code == 0, r.err
    assert {n["name"] for n in r.json["nodes"] if n["status"] == "built"} >= {"ex", "back"}
    again = run_cli(recipe, "--json", cache=cache)
    assert all(n["status"] == "cached" for n in again.json["nodes"] if n["kind"] == "merge")
    # the two-recipe way, in another cache
    (workdir / "models" / "ex.safetensors").write_bytes(
        (workdir / "out/ex.safetensors").read_bytes()
    )
    two = workdir / "two.yaml"
    two.write_text(
        "mergebuild: 1\nmodels:\n  sd15: models/v1-5-pruned.safetensors\n"
        "  ex: models/ex.safetensors\nmerges:\n  back: sd15 + lora(ex, 0.7)\n"
        "  back2: {method: bake_lora, a: sd15, loras: [ex], strength: 0.75}\n"
        "outputs:\n  back: {from: back, path: out/back-two.safetensors}\n"
        "  back2: {from: back2, path: out/back2-two.safetensors}\n"
    )
    r = run_cli(two, cache=tmp_path / "other")
    assert r.code == 0, r.err
    one = load_st(workdir / "out/back.safetensors")
    ref = load_st(workdir / "out/back-two.safetensors")
    base = load_st(workdir / "models/v1-5-pruned.safetensors")
    assert set(one) == set(ref)
    assert all(one[k].tobytes() == ref[k].tobytes() for k in ref)
    assert sum(one[k].tobytes() != base[k].tobytes() for k in base) > 200
    # merge_loras of [ex, ex] with weights 0.5, 0.25 is ex at 0.75 (exact when ranks add up):
    # baked at strength 1 it is within fp16 rounding of ex baked at 0.75
    b2, r2 = (
        load_st(workdir / "out/back2.safetensors"),
        load_st(workdir / "out/back2-two.safetensors"),
    )
    for k in r2:
        x, y = b2[k].astype(np.float32), r2[k].astype(np.float32)
        step = np.spacing(np.abs(r2[k])).astype(np.float32)  # one step of the file's dtype
        assert np.all(np.abs(x - y) <= 2 * step), k


def test_json_reports_each_modules_relative_error(workdir: Path, cache: Path) -> None:
    """lora_error per module = ‖Δ − up·down‖/‖Δ‖: numpy's tail of singular values (no clamp);
    0 for a module whose rank is full."""
    node = (
        "{method: extract_lora, a: anything, base: sd15, rank: 2, conv_rank: 4096, "
        "clamp_quantile: 1.0, dtype: fp32}"
    )
    r = run_cli(write(workdir, node), "--json", cache=cache)
    assert r.code == 0, r.err
    errors = next(n for n in r.json["nodes"] if n["name"] == "ex")["lora_error"]
    out = load_st(workdir / "out" / "ex.safetensors")
    assert set(errors) == {k.removesuffix(".alpha") for k in out if k.endswith(".alpha")}
    a = load_st(workdir / "models" / "anything-v3.safetensors")
    b = load_st(workdir / "models" / "v1-5-pruned.safetensors")
    for name, key in ((Q, Q_KEY), (TE, TE_KEY)):
        delta = (a[key].astype(np.float32) - b[key].astype(np.float32)).astype(np.float64)
        s = np.linalg.svd(delta.reshape(delta.shape[0], -1), compute_uv=False)
        want = np.sqrt((s[2:] ** 2).sum()) / np.sqrt((s**2).sum())
        assert want > 1e-3
        assert errors[name] == pytest.approx(want, rel=1e-3), name
    assert errors[CONV] < 1e-5  # conv_rank covers its full rank
