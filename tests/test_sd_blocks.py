"""Block weights (MBW): key → block table, spellings → one cache key, numbers vs numpy."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from conftest import SCALE, SRC, load_st, run_cli
from mergebuild.demo import key_table
from mergebuild.sd.blocks import LAYOUTS, block_of

# Real key names (from the packaged SD1 / SDXL key lists) and the block each belongs to.
SD1_TABLE = [
    ("model.diffusion_model.time_embed.0.weight", "BASE"),
    ("model.diffusion_model.input_blocks.0.0.weight", "IN00"),
    ("model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight", "IN01"),
    ("model.diffusion_model.input_blocks.3.0.op.weight", "IN03"),
    ("model.diffusion_model.input_blocks.10.0.in_layers.2.weight", "IN10"),
    ("model.diffusion_model.input_blocks.11.0.out_layers.3.bias", "IN11"),
    ("model.diffusion_model.middle_block.1.proj_in.weight", "M00"),
    ("model.diffusion_model.middle_block.2.emb_layers.1.weight", "M00"),
    ("model.diffusion_model.output_blocks.0.0.skip_connection.weight", "OUT00"),
    ("model.diffusion_model.output_blocks.2.1.conv.weight", "OUT02"),
    ("model.diffusion_model.output_blocks.11.1.transformer_blocks.0.ff.net.2.weight", "OUT11"),
    ("model.diffusion_model.out.0.weight", "OUT11"),
    ("model.diffusion_model.out.2.bias", "OUT11"),
    ("cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight", "BASE"),
    ("cond_stage_model.transformer.text_model.embeddings.position_ids", "BASE"),
    ("first_stage_model.decoder.conv_out.weight", "BASE"),
    ("alphas_cumprod", "BASE"),
]
SDXL_TABLE = [
    ("model.diffusion_model.time_embed.2.bias", "BASE"),
    ("model.diffusion_model.label_emb.0.0.weight", "BASE"),
    ("model.diffusion_model.input_blocks.0.0.bias", "IN00"),
    ("model.diffusion_model.input_blocks.4.1.transformer_blocks.1.attn2.to_k.weight", "IN04"),
    ("model.diffusion_model.input_blocks.8.1.transformer_blocks.9.norm3.weight", "IN08"),
    ("model.diffusion_model.middle_block.1.transformer_blocks.9.ff.net.0.proj.weight", "M00"),
    ("model.diffusion_model.output_blocks.0.1.proj_out.weight", "OUT00"),
    ("model.diffusion_model.output_blocks.8.0.out_layers.3.weight", "OUT08"),
    ("model.diffusion_model.out.2.weight", "OUT08"),
    ("conditioner.embedders.0.transformer.text_model.final_layer_norm.weight", "BASE"),
    ("conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight", "BASE"),
    ("first_stage_model.encoder.down.0.block.0.conv1.weight", "BASE"),
]


@pytest.mark.parametrize(("arch", "table"), [("sd1", SD1_TABLE), ("sdxl", SDXL_TABLE)])
def test_key_to_block_table(arch: str, table: list[tuple[str, str]]) -> None:
    keys = key_table(arch)
    for key, block in table:
        assert key in keys, key
        assert block_of(key, arch) == block, key
    # every block of the layout has UNet keys, and every key gets a block of the layout
    seen = {block_of(k, arch) for k in keys}
    assert seen == set(LAYOUTS[arch])


def test_unprefixed_unet_file() -> None:
    assert block_of("input_blocks.4.1.proj_in.weight", "sd1", root="") == "IN04"
    assert block_of("out.2.weight", "sdxl", root="") == "OUT08"


# -- an independent model of the rules, for the numeric tests -----------------------------------


def expected_block(key: str, n_blocks: int) -> str:
    """domain.md §4, written independently of the code under test."""
    prefix = "model.diffusion_model."
    if not key.startswith(prefix):
        return "BASE"
    parts = key[len(prefix) :].split(".")
    if parts[0] == "input_blocks":
        return f"IN{int(parts[1]):02}"
    if parts[0] == "output_blocks":
        return f"OUT{int(parts[1]):02}"
    if parts[0] == "middle_block":
        return "M00"
    if parts[0] == "out":
        return f"OUT{n_blocks - 1:02}"
    return "BASE"


def preset_table() -> dict[str, list[float]]:
    path = SRC / "mergebuild" / "data" / "mbw_presets.tsv"
    with open(path, newline="") as f:
        rows = [r for r in csv.reader(f, delimiter="\t") if r and not r[0].startswith("#")]
    return {r[0]: [float(x) for x in r[1].split(",")] for r in rows[1:]}


def sd1_names() -> list[str]:
    return ["BASE", *[f"IN{i:02}" for i in range(12)], "M00", *[f"OUT{i:02}" for i in range(12)]]


def f32(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float32)


HEAD = """mergebuild: 1
models:
  anything: models/anything-v3.safetensors
  nai_full: models/nai-full.safetensors
  nai_sfw: models/nai-sfw.safetensors
  insta: models/insta.safetensors
  wd13: models/wd13.safetensors
merges:
"""


def test_block_weighted_merges_match_numpy(workdir: Path, cache: Path) -> None:
    recipe = workdir / "r.yaml"
    recipe.write_text(
        HEAD
        + '  p: anything + (nai_full - nai_sfw) * preset("TRUE_CUBIC_HERMITE")\n'
        + "  ws:\n    method: weighted_sum\n    a: insta\n    b: wd13\n"
        + "    alpha: {BASE: 0.3, IN00: 0.1, IN05: 0.7, M00: 0.25, OUT11: 0.9, default: 0.5}\n"
        + "  comp: {method: weighted_sum, a: insta, b: wd13,"
        + " alpha: {unet: 0.5, text_encoder: 0.25, vae: 1}}\n"
        + "outputs:\n"
        + "  op: {from: p, path: out/p.safetensors}\n"
        + "  ows: {from: ws, path: out/ws.safetensors}\n"
        + "  ocomp: {from: comp, path: out/comp.safetensors}\n"
    )
    r = run_cli(recipe, "--json", cache=cache)
    assert r.code == 0, r.err
    m = {n: load_st(workdir / "models" / f"{n}.safetensors") for n in
         ("anything-v3", "nai-full", "nai-sfw", "insta", "wd13")}  # fmt: skip
    preset = dict(zip(sd1_names(), [0.0, *preset_table()["TRUE_CUBIC_HERMITE"]], strict=True))
    ws_alpha = {b: 0.5 for b in sd1_names()}
    ws_alpha.update(BASE=0.3, IN00=0.1, IN05=0.7, M00=0.25, OUT11=0.9)
    outs = {n: load_st(workdir / "out" / f"{n}.safetensors") for n in ("p", "ws", "comp")}
    blocks_hit = set()
    for k, a in m["anything-v3"].items():
        if a.dtype.kind != "f":
            for o in outs.values():
                np.testing.assert_array_equal(o[k], a)
            continue
        blk = expected_block(k, 12)
        blocks_hit.add(blk)
        w = np.float32(preset[blk])
        want = f32(a) + (f32(m["nai-full"][k]) - f32(m["nai-sfw"][k])) * w
        np.testing.assert_array_equal(outs["p"][k], want.astype(np.float16), err_msg=k)
        x, y = f32(m["insta"][k]), f32(m["wd13"][k])
        al = ws_alpha[blk]
        want = x * np.float32(1 - al) + y * np.float32(al)
        np.testing.assert_array_equal(outs["ws"][k], want.astype(np.float16), err_msg=k)
        al = {"model": 0.5, "cond_stage_model": 0.25, "first_stage_model": 1.0}.get(
            k.split(".")[0], 0.0
        )
        want = x * np.float32(1 - al) + y * np.float32(al)
        np.testing.assert_array_equal(outs["comp"][k], want.astype(np.float16), err_msg=k)
    assert blocks_hit == set(sd1_names())
    # the per-component merge kept the scheduler buffers ("other") from a
    np.testing.assert_array_equal(outs["comp"]["betas"], m["insta"]["betas"])


def test_equivalent_spellings_share_one_cache_key(workdir: Path, cache: Path) -> None:
    values = [0.0, *preset_table()["GRAD_V"]]
    as_list = "[" + ", ".join(repr(v) for v in values) + "]"
    as_map = "{" + ", ".join(f"{n}: {v!r}" for n, v in zip(sd1_names(), values, strict=True))
    ad = "method: add_difference, a: anything, b: nai_full, c: nai_sfw"
    recipe = workdir / "r.yaml"
    recipe.write_text(
        HEAD
        + "  a1: {method: add_difference, a: anything, b: nai_full, c: nai_sfw,"
        + " alpha: {preset: GRAD_V}}\n"
        + f"  a2: {{{ad}, alpha: {as_list}}}\n"
        + f"  a3: {{{ad}, alpha: {as_map}}}}}\n"
        + '  a4: anything + (nai_full - nai_sfw) * preset("GRAD_V")\n'
        + "  a5: {method: add_difference, a: anything, b: nai_full, c: nai_sfw,"
        + " alpha: {unet: {preset: GRAD_V}, default: 0}}\n"
        + "  u1: {method: weighted_sum, a: insta, b: wd13, alpha: 0.4}\n"
        + "  u2: {method: weighted_sum, a: insta, b: wd13, alpha: {unet: 0.4, default: 0.4}}\n"
        + "  u3: {method: weighted_sum, a: insta, b: wd13, alpha: [0.4, "
        + "0.4, " * 24
        + "0.4]}\n"
        + "  u4: insta * (1 - blocks(default=0.4)) + wd13 * blocks(default=0.4)\n"
        + "  d1: {method: weighted_sum, a: insta, b: wd13, alpha: {IN00: 1, default: 0.4}}\n"
        + "outputs:\n"
        + "".join(
            f"  o{n}: {{from: {n}, path: out/{n}.safetensors}}\n"
            for n in ("a1", "a2", "a3", "a4", "a5", "u1", "u2", "u3", "u4", "d1")
        )
    )
    r = run_cli(recipe, "--dry-run", "--json", cache=cache)
    assert r.code == 0, r.err
    keys = {n["name"]: n["key"] for n in r.json["nodes"] if n["kind"] == "merge"}
    assert len({keys[n] for n in ("a1", "a2", "a3", "a4", "a5")}) == 1
    assert len({keys[n] for n in ("u1", "u2", "u3", "u4")}) == 1
    assert keys["d1"] != keys["u1"]


@pytest.mark.parametrize(
    ("alpha", "where", "message"),
    [
        ("{preset: TRUE_CUBIC_HERMIT}", ":9:", "did you mean 'TRUE_CUBIC_HERMITE'?"),
        ("{preset: grad_v}", ":9:", "did you mean 'GRAD_V'?"),
        ("[0.5, 0.5, 0.5]", ":9:", "alpha list has 3 values; block weights take 26"),
        ("{IN13: 1, default: 0}", ":9:", "unknown block 'IN13' for the SD1/SD2"),
        ("{IN10: 1, default: 0, layout: sdxl}", ":9:", "(it exists in the sd1 layout"),
        ("{IN00: 1}", ":9:", "add 'default: V' for the blocks not listed"),
        ("{unet: 1, vea: 0}", ":9:", "unknown component 'vea' — did you mean 'vae'?"),
    ],
)
def test_block_weight_errors(
    workdir: Path, cache: Path, alpha: str, where: str, message: str
) -> None:
    recipe = workdir / "r.yaml"
    recipe.write_text(
        HEAD
        + f"  m: {{method: weighted_sum, a: insta, b: wd13, alpha: {alpha}}}\n"
        + "outputs: {o: {from: m, path: out/o.safetensors}}\n"
    )
    r = run_cli(recipe, "--dry-run", cache=cache)
    assert r.code == 2, r.err
    assert where in r.err and message in r.err, r.err
    assert "Traceback" not in r.err


def test_expression_block_weight_errors(workdir: Path, cache: Path) -> None:
    recipe = workdir / "r.yaml"
    recipe.write_text(
        HEAD
        + '  m: anything + (nai_full - nai_sfw) * preset("NOPE")\n'
        + "  n: insta * 0.2 + wd13 * 0.3 + anything * blocks(default=0.5, IN00=1)\n"
        + "outputs: {o: {from: m, path: out/o.safetensors}, p: {from: n, path: out/p.ss}}\n"
    )
    r = run_cli(recipe, "--dry-run", cache=cache)
    assert r.code == 2 and "Traceback" not in r.err
    assert ":9:" in r.err and "unknown block-weight preset 'NOPE'" in r.err
    assert ":10:" in r.err and "work only in expressions that reduce to" in r.err


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from mergebuild.demo import synthesize

    d = tmp_path_factory.mktemp("sdxl")
    for n in ("xa", "xb"):
        synthesize(d / f"{n}.safetensors", n, arch="sdxl", scale=SCALE)
    synthesize(d / "one.safetensors", "one", arch="sd1", scale=SCALE)
    return d


def test_sdxl_block_weights_match_numpy(sdxl_dir: Path, tmp_path: Path, cache: Path) -> None:
    values = [round(0.05 * i, 2) for i in range(20)]
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "mergebuild: 1\n"
        f"models: {{xa: {sdxl_dir}/xa.safetensors, xb: {sdxl_dir}/xb.safetensors}}\n"
        f"merges: {{m: {{method: weighted_sum, a: xa, b: xb, alpha: {values}, dtype: fp32}}}}\n"
        "outputs: {o: {from: m, path: out.safetensors}}\n"
    )
    r = run_cli(recipe, cache=cache)
    assert r.code == 0, r.err
    names = ["BASE", *[f"IN{i:02}" for i in range(9)], "M00", *[f"OUT{i:02}" for i in range(9)]]
    alpha = dict(zip(names, values, strict=True))
    xa, xb = load_st(sdxl_dir / "xa.safetensors"), load_st(sdxl_dir / "xb.safetensors")
    out = load_st(tmp_path / "out.safetensors")
    hit = set()
    for k, a in xa.items():
        if a.dtype.kind != "f":
            np.testing.assert_array_equal(out[k], a)
            continue
        blk = expected_block(k, 9)
        hit.add(blk)
        al = alpha[blk]
        want = f32(a) * np.float32(1 - al) + f32(xb[k]) * np.float32(al)
        np.testing.assert_array_equal(out[k], want, err_msg=k)
    assert hit == set(names)


def test_layout_must_match_architecture(sdxl_dir: Path, tmp_path: Path, cache: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "mergebuild: 1\n"
        f"models: {{xa: {sdxl_dir}/xa.safetensors, xb: {sdxl_dir}/xb.safetensors}}\n"
        'merges: {m: xa * (1 - preset("GRAD_V")) + xb * preset("GRAD_V")}\n'
        "outputs: {o: {from: m, path: out.safetensors}}\n"
    )
    r = run_cli(recipe, cache=cache)
    assert r.code == 1 and "Traceback" not in r.err
    assert "uses the SD1/SD2 (26 values) block layout but 'xa' is SDXL base" in r.err
    assert "layout: sdxl" in r.err


def test_blocks_command(sdxl_dir: Path) -> None:
    r = run_cli("blocks", sdxl_dir / "xa.safetensors")
    assert r.code == 0, r.err
    assert "SDXL (20 values) block layout" in r.out
    assert [ln.split()[0] for ln in r.out.splitlines()[1:]][-1] == "OUT08"
    keys = run_cli("blocks", sdxl_dir / "one.safetensors", "--keys")
    rows = dict(reversed(ln.split("\t")) for ln in keys.out.splitlines())
    for key, block in SD1_TABLE:
        if key in rows:
            assert rows[key] == block
    j = run_cli("blocks", sdxl_dir / "one.safetensors", "--json").json
    assert j["layout"] == "sd1" and j["keys"]["model.diffusion_model.out.2.bias"] == "OUT11"


def test_changing_a_preset_rebuilds_with_a_short_reason(workdir: Path, cache: Path) -> None:
    recipe = workdir / "r.yaml"
    recipe.write_text(
        HEAD
        + "  m: {method: weighted_sum, a: insta, b: wd13, alpha: {preset: GRAD_V}}\n"
        + "  n: {method: weighted_sum, a: m, b: anything, alpha: 0.5}\n"
        + "outputs: {o: {from: n, path: out/o.safetensors}}\n"
    )
    assert run_cli(recipe, cache=cache).code == 0
    recipe.write_text(recipe.read_text().replace("GRAD_V", "GRAD_A"))
    dry = run_cli(recipe, "--dry-run", "--json", cache=cache).json
    m = next(n for n in dry["nodes"] if n["name"] == "m")
    assert m["status"] == "build" and m["reason"] == "parameter changed: alpha (block weights)"


def test_block_weight_dry_run_does_not_import_torch(workdir: Path, cache: Path) -> None:
    import os
    import subprocess
    import sys

    recipe = workdir / "r.yaml"
    recipe.write_text(
        HEAD
        + "  m: insta * (1 - blocks(unet=0.3, vae=1)) + wd13 * blocks(unet=0.3, vae=1)\n"
        + "  p: anything + (nai_full - nai_sfw) * preset('SMOOTHSTEP*2')\n"
        + "outputs: {o: {from: m, path: out/o.safetensors}, q: {from: p, path: out/p.st}}\n"
    )
    probe = (
        "import sys; from mergebuild.cli import main; rc = main(sys.argv[1:]); "
        "assert 'torch' not in sys.modules, 'torch imported'; raise SystemExit(rc)"
    )
    env = {**os.environ, "PYTHONPATH": str(SRC), "MERGEBUILD_CACHE_DIR": str(cache)}
    for args in ([str(recipe), "--dry-run", "--json"], ["graph", str(recipe)]):
        p = subprocess.run(
            [sys.executable, "-c", probe, *args], env=env, capture_output=True, text=True
        )
        assert p.returncode == 0, p.stderr
    r = run_cli(recipe, "--dry-run", "--json", cache=cache)
    assert r.code == 0, r.err
    nodes = {n["name"]: n for n in r.json["nodes"]}
    assert nodes["m"]["status"] == "build" and nodes["p"]["status"] == "build"
    graph = run_cli("graph", recipe).out
    assert "weighted_sum(a=insta, b=wd13, alpha={" in graph
    assert "'text_encoder': 0.0, 'vae': 1.0" in graph
