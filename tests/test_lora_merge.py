"""merge_loras through the CLI: the merged factors against a float64 numpy sum of the inputs'
ΔW (concatenation when ranks add up, numpy's SVD otherwise), LyCORIS inputs, bake(merged) vs
baking the inputs, the --json error report, determinism, and the refusals."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from conftest import load_st, run_cli
from test_lora_bake import DETAIL, STYLE, _fails, kohya

U = "model.diffusion_model."
Q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
CONV = "lora_unet_down_blocks_1_resnets_0_conv1"
FF = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_ff_net_2"
FF_KEY = U + "input_blocks.4.1.transformer_blocks.0.ff.net.2.weight"
NAME_OF = {k: n for n, k in {**DETAIL, **STYLE}.items()} | {FF_KEY: FF}

RECIPE = """mergebuild: 1
models:
  anything: models/anything-v3.safetensors
  insta: models/insta.safetensors
  detail: models/detail.safetensors
  style: models/style.safetensors
  hada: models/hada.safetensors
merges:
  merged: {merge}
{extra}outputs:
  lora: {{from: merged, path: out/merged.safetensors}}
{outputs}"""


def recipe(workdir: Path, merge: str, extra: str = "", outputs: str = "") -> Path:
    path = workdir / "m.yaml"
    path.write_text(RECIPE.format(merge=merge, extra=extra, outputs=outputs))
    return path


def loha(path: Path, model: dict, key: str, seed: int, rank: int = 2, alpha: float = 1.0):
    """A LoHa for one module; its ΔW = (w1a·w1b)⊙(w2a·w2b)·alpha/rank in float64."""
    rng = np.random.default_rng(seed)
    shape = model[key].shape
    cols = int(np.prod(shape[1:]))
    t = {}
    for w in ("w1", "w2"):
        t[f"{NAME_OF[key]}.hada_{w}_a"] = (rng.standard_normal((shape[0], rank)) * 0.5).astype(
            np.float16
        )
        t[f"{NAME_OF[key]}.hada_{w}_b"] = (rng.standard_normal((rank, cols)) * 0.5).astype(
            np.float16
        )
    t[f"{NAME_OF[key]}.alpha"] = np.array(alpha, dtype=np.float16)
    save_file(t, str(path))
    n = NAME_OF[key]

    def p(w: str) -> np.ndarray:
        return t[f"{n}.hada_{w}_a"].astype(np.float64) @ t[f"{n}.hada_{w}_b"].astype(np.float64)

    return {key: (p("w1") * p("w2") * alpha / rank).reshape(shape)}


@pytest.fixture
def loras(workdir: Path) -> tuple[dict, dict, dict, dict]:
    """detail (4 modules, alpha 1) and style (2 modules, alpha 2; one shared with detail), both
    rank 2; hada: a LoHa on an ff module and on the shared to_q."""
    model = load_st(workdir / "models" / "anything-v3.safetensors")
    d = kohya(workdir / "models" / "detail.safetensors", model, DETAIL, 1, alpha=1.0)
    s = kohya(workdir / "models" / "style.safetensors", model, STYLE, 2, alpha=2.0)
    h = loha(workdir / "models" / "hada.safetensors", model, FF_KEY, 3, rank=3, alpha=1.5)
    return model, d, s, h


def product(out: dict, name: str, shape: tuple[int, ...]) -> np.ndarray:
    """ΔW of a module of the merged file, in float64, as any LoRA reader forms it."""
    down = out[f"{name}.lora_down.weight"].astype(np.float64)
    up = out[f"{name}.lora_up.weight"].astype(np.float64)
    r = down.shape[0]
    alpha = float(out[f"{name}.alpha"])
    return (up.reshape(up.shape[0], r) @ down.reshape(r, -1) * alpha / r).reshape(shape)


def targets(parts: list[tuple[dict, float]]) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for deltas, w in parts:
        for key, d in deltas.items():
            out[key] = out.get(key, 0) + w * d.astype(np.float32).astype(np.float64)
    return out


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def node_of(r, name: str = "merged") -> dict:
    return next(n for n in r.json["nodes"] if n["name"] == name)


def test_exact_when_ranks_add_up(workdir: Path, cache: Path, loras) -> None:
    """rank 64 ≥ 2 + 2: every module is the concatenation, its ΔW the weighted sum to float32
    rounding, ranks add up (4 on the shared to_q), alpha = rank, kohya names and metadata."""
    _, d, s, _ = loras
    merge = "{method: merge_loras, loras: [detail, style], weights: [0.6, 0.4], rank: 64}"
    r = run_cli(recipe(workdir, merge), "--json", cache=cache)
    assert r.code == 0, r.err
    path = workdir / "out" / "merged.safetensors"
    out = load_st(path)
    want = targets([(d, 0.6), (s, 0.4)])
    assert {k.rsplit(".", 2)[0] if "lora_" in k else k[:-6] for k in out} == {
        NAME_OF[k] for k in want
    }
    for key, t in want.items():
        name = NAME_OF[key]
        rank = 4 if key in d and key in s else 2
        assert out[f"{name}.lora_down.weight"].shape[0] == rank
        assert float(out[f"{name}.alpha"]) == rank
        assert rel(product(out, name, t.shape), t) < 1e-6, name
    errors = node_of(r)["lora_error"]
    assert set(errors) == {NAME_OF[k] for k in want}
    assert max(errors.values()) < 1e-6
    meta = r_meta(path)
    assert meta["ss_network_module"] == "networks.lora"
    assert meta["ss_network_dim"] == "64" and meta["ss_base_model_version"] == "sd_v1"
    j = run_cli("inspect", path, "--json").json  # our reader: a kohya LoRA for SD1
    assert j["format"] == "kohya" and j["algorithms"] == {"lora": 4, "locon": 1}
    assert j["unmapped"] == []


def r_meta(path: Path) -> dict[str, str]:
    import json
    import struct

    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n))["__metadata__"]


def test_svd_when_ranks_exceed(workdir: Path, cache: Path, loras) -> None:
    """rank 3 < 2 + 2 on to_q: numpy's rank-3 SVD of the weighted sum (same products, same
    reported error); the other modules still concatenate (2 ≤ 3)."""
    _, d, s, _ = loras
    merge = "{method: merge_loras, loras: [detail, style], weights: [1.5, -0.5], rank: 3}"
    r = run_cli(recipe(workdir, merge), "--json", cache=cache)
    assert r.code == 0, r.err
    out = load_st(workdir / "out" / "merged.safetensors")
    want = targets([(d, 1.5), (s, -0.5)])
    q_key = DETAIL[Q]
    t = want[q_key].reshape(want[q_key].shape[0], -1)
    u, sv, vh = np.linalg.svd(t, full_matrices=False)
    approx = (u[:, :3] * sv[:3]) @ vh[:3]
    got = product(out, Q, want[q_key].shape).reshape(t.shape)
    assert out[f"{Q}.lora_down.weight"].shape[0] == 3
    assert rel(got, approx) < 1e-5
    ref_err = float(np.sqrt((sv[3:] ** 2).sum()) / np.linalg.norm(t))
    assert ref_err > 1e-3  # the test would not tell SVD from concatenation otherwise
    errors = node_of(r)["lora_error"]
    assert errors[Q] == pytest.approx(ref_err, rel=1e-3)
    for key, w in want.items():
        if key != q_key:
            assert rel(product(out, NAME_OF[key], w.shape), w) < 1e-6
            assert errors[NAME_OF[key]] < 1e-6


def test_conv_rank_separate(workdir: Path, cache: Path, loras) -> None:
    """conv_rank 1 re-ranks the 3×3 conv module only (numpy's best rank-1), rank 64 the rest."""
    model, _, s, _ = loras
    merge = "{method: merge_loras, loras: [style], rank: 64, conv_rank: 1}"
    r = run_cli(recipe(workdir, merge), "--json", cache=cache)
    assert r.code == 0, r.err
    out = load_st(workdir / "out" / "merged.safetensors")
    ckey = STYLE[CONV]
    assert out[f"{CONV}.lora_down.weight"].shape == (1, *model[ckey].shape[1:])
    assert out[f"{CONV}.lora_up.weight"].shape == (model[ckey].shape[0], 1, 1, 1)
    t = s[ckey].astype(np.float32).astype(np.float64).reshape(model[ckey].shape[0], -1)
    u, sv, vh = np.linalg.svd(t, full_matrices=False)
    got = product(out, CONV, model[ckey].shape).reshape(t.shape)
    assert rel(got, (u[:, :1] * sv[:1]) @ vh[:1]) < 1e-5
    assert out[f"{Q}.lora_down.weight"].shape[0] == 2


@pytest.mark.parametrize("weights", ["[1.0, 0.7]", "[0.5, -1.0]"])
def test_lycoris_input_goes_through_svd(workdir: Path, cache: Path, loras, weights: str) -> None:
    """A LoHa has no factors to concatenate: its ΔW (plus detail's on the shared modules) is
    re-ranked by SVD; at a rank that holds it all, the merge is its ΔW to float32 rounding."""
    _, d, _, h = loras
    w = [float(x) for x in weights.strip("[]").split(",")]
    merge = f"{{method: merge_loras, loras: [hada, detail], weights: {weights}, rank: 512}}"
    r = run_cli(recipe(workdir, merge), "--json", cache=cache)
    assert r.code == 0, r.err
    out = load_st(workdir / "out" / "merged.safetensors")
    want = targets([(h, w[0]), (d, w[1])])
    for key, t in want.items():
        assert rel(product(out, NAME_OF[key], t.shape), t) < 1e-5, key
    assert node_of(r)["lora_error"][FF] < 1e-5


def test_bake_of_merged_equals_baking_both(workdir: Path, cache: Path, loras) -> None:
    """bake(merged, 1) vs bake(detail, 0.6) + bake(style, 0.4) on the fp16 model: within one
    fp16 step on every tensor (the merged factors are the same ΔW to float32 rounding)."""
    model, d, s, _ = loras
    merge = "{method: merge_loras, loras: [detail, style], weights: [0.6, 0.4]}"
    first = recipe(workdir, merge)
    assert (r := run_cli(first, cache=cache)).code == 0, r.err
    both = workdir / "b.yaml"
    both.write_text(
        "mergebuild: 1\nmodels:\n  anything: models/anything-v3.safetensors\n"
        "  detail: models/detail.safetensors\n  style: models/style.safetensors\n"
        "  merged: out/merged.safetensors\n"
        "merges:\n  one: anything + lora(merged, 1.0)\n"
        "  two: anything + lora(detail, 0.6) + lora(style, 0.4)\n"
        "outputs:\n  one: {from: one, path: out/one.safetensors}\n"
        "  two: {from: two, path: out/two.safetensors}\n"
    )
    assert (r := run_cli(both, cache=cache)).code == 0, r.err
    one, two = (
        load_st(workdir / "out" / "one.safetensors"),
        load_st(workdir / "out" / "two.safetensors"),
    )
    assert set(one) == set(two) == set(model)
    for key in model:
        a, b = one[key].astype(np.float32), two[key].astype(np.float32)
        assert np.all(
            np.abs(a - b) <= np.spacing(np.abs(b).astype(np.float16)).astype(np.float32)
        ), key
    changed = [k for k in model if one[k].tobytes() != model[k].tobytes()]
    assert set(changed) == set(d) | set(s)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_j1_equals_j2_and_cached(workdir: Path, tmp_path: Path, loras) -> None:
    merge = "{method: merge_loras, loras: [detail, style, hada], weights: [0.6, 0.4, 1], rank: 3}"
    path = recipe(workdir, merge)
    out = workdir / "out" / "merged.safetensors"
    shas = []
    for i, j in enumerate(("1", "2", "2")):
        r = run_cli(path, "-j", j, cache=tmp_path / f"c{min(i, 1)}")
        assert r.code == 0, r.err
        shas.append(_sha(out))
    assert len(set(shas)) == 1


def _dora(path: Path, model: dict) -> None:
    key = DETAIL[Q]
    o, i = model[key].shape
    t = {
        f"{Q}.lora_down.weight": np.ones((2, i), np.float16),
        f"{Q}.lora_up.weight": np.ones((o, 2), np.float16),
        f"{Q}.dora_scale": np.ones((1, i), np.float16),
    }
    save_file(t, str(path))


@pytest.mark.parametrize(
    ("merge", "code", "needles"),
    [
        (
            "{method: merge_loras, loras: [detail, insta]}",
            2,
            ["m.yaml:", "'insta' is a checkpoint, not a LoRA", "merge_loras"],
        ),
        (
            "{method: merge_loras, loras: [detail, style], weights: [0.5]}",
            2,
            ["'weights' has 1 values for 2"],
        ),
        ("{method: merge_loras, loras: [detail], rank: 0}", 2, ["rank"]),
        ("{method: merge_loras, loras: [detail, sdxl]}", 1, ["different architectures", "'sdxl'"]),
        (
            "{method: merge_loras, loras: [detail, dora]}",
            1,
            ["'dora' uses DoRA", "cannot be merged"],
        ),
    ],
)
def test_refusals(workdir: Path, cache: Path, loras, merge: str, code: int, needles) -> None:
    model = loras[0]
    _dora(workdir / "models" / "dora.safetensors", model)
    save_file(
        {
            "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": np.ones(
                (2, 4), np.float16
            ),
            "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": np.ones(
                (4, 2), np.float16
            ),
        },
        str(workdir / "models" / "sdxl.safetensors"),
    )
    extra_models = "  dora: models/dora.safetensors\n  sdxl: models/sdxl.safetensors\n"
    path = recipe(workdir, merge)
    path.write_text(path.read_text().replace("merges:\n", extra_models + "merges:\n"))
    _fails(run_cli(path, cache=cache), code, *needles)
    assert not (workdir / "out").exists()


@pytest.mark.parametrize(
    "use",
    [
        "  mixed: weighted_sum(anything, merged, 0.5)\n",
        "  mixed: {method: bake_lora, a: merged, loras: [style]}\n",
    ],
)
def test_merged_node_is_not_a_checkpoint(workdir: Path, cache: Path, loras, use: str) -> None:
    merge = "{method: merge_loras, loras: [detail, style]}"
    _fails(run_cli(recipe(workdir, merge, extra=use), cache=cache), 2, "'merged' is a merged LoRA")


@pytest.mark.parametrize(
    "use",
    [
        "  baked: anything + lora(merged, 0.5)\n",
        "  again: {method: merge_loras, loras: [merged, style]}\n",
    ],
)
def test_merged_node_feeds_loras_in_the_same_recipe(
    workdir: Path, cache: Path, loras, use: str
) -> None:
    """A merged LoRA is built in a pass of its own, then baked or merged again as a LoRA
    (the numbers of a cached LoRA's bake are checked in test_lora_extract.py)."""
    merge = "{method: merge_loras, loras: [detail, style]}"
    name = use.split(":")[0].strip()
    out = f"  {name}: {{from: {name}, path: out/{name}.safetensors}}\n"
    r = run_cli(recipe(workdir, merge, extra=use, outputs=out), "--json", cache=cache)
    assert r.code == 0, r.err
    built = {n["name"] for n in r.json["nodes"] if n["status"] == "built"}
    assert {"merged", name} <= built
    assert (workdir / f"out/{name}.safetensors").stat().st_size > 0
