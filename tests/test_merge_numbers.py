"""Merged tensors against an independent numpy computation on the same files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from conftest import load_st, run_cli

POS_IDS = "cond_stage_model.transformer.text_model.embeddings.position_ids"


def write_recipe(workdir: Path, merges: str, outputs: str, name: str = "r.yaml") -> Path:
    models = "\n".join(
        f"  {n}: models/{f}.safetensors"
        for n, f in [
            ("anything", "anything-v3"),
            ("nai_full", "nai-full"),
            ("nai_sfw", "nai-sfw"),
            ("gape", "gape60"),
            ("insta", "insta"),
            ("wd13", "wd13"),
        ]
    )
    path = workdir / name
    path.write_text(f"mergebuild: 1\nmodels:\n{models}\nmerges:\n{merges}\noutputs:\n{outputs}\n")
    return path


def f32(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float32)


def models(workdir: Path) -> dict[str, dict[str, np.ndarray]]:
    names = {
        "anything": "anything-v3",
        "nai_full": "nai-full",
        "nai_sfw": "nai-sfw",
        "gape": "gape60",
        "insta": "insta",
        "wd13": "wd13",
    }
    return {n: load_st(workdir / "models" / f"{f}.safetensors") for n, f in names.items()}


def test_two_step_recipe_matches_numpy(workdir: Path, cache: Path) -> None:
    recipe = write_recipe(
        workdir,
        "  step1: anything + (nai_full - nai_sfw) * 0.3\n"
        "  step2: {method: add_difference, a: step1, b: gape, c: nai_full, alpha: 1.0}",
        "  o: {from: step2, path: out/o.safetensors, dtype: fp16}",
    )
    r = run_cli(recipe, "--json", cache=cache)
    assert r.code == 0, r.err
    m = models(workdir)
    out = load_st(workdir / "out" / "o.safetensors")
    assert set(out) == set(m["anything"])
    compared = 0
    for k, a in m["anything"].items():
        if a.dtype.kind != "f":
            np.testing.assert_array_equal(out[k], a)  # integer buffers copied from A
            continue
        # step1's value is stored as fp16 (its dtype: the inputs' widest, fp16), then reused
        s1 = f32(a) + (f32(m["nai_full"][k]) - f32(m["nai_sfw"][k])) * np.float32(0.3)
        s1 = s1.astype(np.float16)
        s2 = f32(s1) + (f32(m["gape"][k]) - f32(m["nai_full"][k])) * np.float32(1.0)
        np.testing.assert_array_equal(out[k], s2.astype(np.float16), err_msg=k)
        compared += 1
    assert compared > 1000
    np.testing.assert_array_equal(out[POS_IDS], np.arange(77, dtype=np.int64)[None])


WS_DTYPES = ["fp32", "bf16"]


@pytest.fixture(scope="module")
def ws_built(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Path:
    """One weighted sum per dtype (out/ws-<dtype>), in one build: each costs seconds of imports."""
    work = tmp_path_factory.mktemp("ws")
    (work / "models").symlink_to(model_dir)
    recipe = write_recipe(
        work,
        "\n".join(
            f"  ws_{d}: {{method: weighted_sum, a: insta, b: wd13, alpha: 0.35, dtype: {d}}}"
            for d in WS_DTYPES
        ),
        "\n".join(f"  o_{d}: {{from: ws_{d}, path: out/ws-{d}.safetensors}}" for d in WS_DTYPES),
    )
    r = run_cli(recipe, "--json", cache=work / "cache")
    assert r.code == 0, r.err
    return work


@pytest.mark.parametrize("dtype", WS_DTYPES)
def test_weighted_sum_matches_numpy_in_fp32(ws_built: Path, dtype: str) -> None:
    m = models(ws_built)
    import torch
    from safetensors.torch import load_file

    out = load_file(str(ws_built / "out" / f"ws-{dtype}.safetensors"))
    for k, a in m["insta"].items():
        if a.dtype.kind != "f":
            continue
        exp = f32(a) * np.float32(1 - 0.35) + f32(m["wd13"][k]) * np.float32(0.35)
        want = torch.from_numpy(exp).to(torch.float32 if dtype == "fp32" else torch.bfloat16)
        assert torch.equal(out[k], want), k


def test_expression_equals_explicit_form(workdir: Path, cache: Path) -> None:
    recipe = write_recipe(
        workdir,
        "  e: anything + (nai_full - nai_sfw) * 0.3\n"
        "  x: {method: add_difference, a: anything, b: nai_full, c: nai_sfw, alpha: 0.3}\n"
        "  w1: insta * 0.75 + wd13 * 0.25\n"
        "  w2: insta + (wd13 - insta) * 0.25\n"
        "  lin: insta * 0.5 + wd13 * 0.3 + gape * 0.2",
        "  oe: {from: e, path: out/e.safetensors}\n"
        "  ox: {from: x, path: out/x.safetensors}\n"
        "  ow1: {from: w1, path: out/w1.safetensors}\n"
        "  ow2: {from: w2, path: out/w2.safetensors}\n"
        "  olin: {from: lin, path: out/lin.safetensors, dtype: fp32}",
    )
    r = run_cli(recipe, "--json", cache=cache)
    assert r.code == 0, r.err
    nodes = {n["name"]: n for n in r.json["nodes"]}
    assert nodes["e"]["key"] == nodes["x"]["key"]
    assert nodes["w1"]["key"] == nodes["w2"]["key"]
    m = models(workdir)
    lin = load_st(workdir / "out" / "lin.safetensors")
    for k, a in m["insta"].items():
        if a.dtype.kind != "f":
            continue
        acc = f32(a) * np.float32(0.5)
        acc = acc + f32(m["wd13"][k]) * np.float32(0.3)
        acc = acc + f32(m["gape"][k]) * np.float32(0.2)
        # node dtype is fp16 (auto), the output re-casts to fp32: exact fp16 values
        np.testing.assert_array_equal(lin[k], acc.astype(np.float16).astype(np.float32))


def test_missing_and_extra_keys_policy(workdir: Path, cache: Path, model_dir: Path) -> None:
    """Keys missing from b keep A's tensor; keys only in b are dropped; counts reported."""
    import torch
    from safetensors.torch import load_file, save_file

    b = load_file(str(workdir / "models" / "wd13.safetensors"))
    dropped = [k for k in b if k.startswith("first_stage_model.")][:3]
    for k in dropped:
        del b[k]
    b["only.in.b"] = torch.ones(3)
    save_file(b, str(workdir / "models" / "wd13.safetensors"))
    recipe = write_recipe(
        workdir, "  ws: insta * 0.5 + wd13 * 0.5", "  o: {from: ws, path: out/o.safetensors}"
    )
    r = run_cli(recipe, "--json", cache=cache)
    assert r.code == 0, r.err
    node = next(n for n in r.json["nodes"] if n["name"] == "ws")
    assert node["kept_from_a"] == 3
    assert node["dropped"] == 1
    assert node["copied_non_float"] == 1
    out = load_st(workdir / "out" / "o.safetensors")
    insta = load_st(workdir / "models" / "insta.safetensors")
    assert "only.in.b" not in out
    for k in dropped:
        np.testing.assert_array_equal(out[k], insta[k])


def test_shape_mismatch_names_key_and_shapes(workdir: Path, cache: Path) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    path = workdir / "models" / "wd13.safetensors"
    b = load_file(str(path))
    key = "model.diffusion_model.out.2.bias"
    b[key] = torch.zeros(7, dtype=torch.float16)
    save_file(b, str(path))
    recipe = write_recipe(
        workdir, "  ws: insta * 0.5 + wd13 * 0.5", "  o: {from: ws, path: out/o.safetensors}"
    )
    r = run_cli(recipe, cache=cache)
    assert r.code == 1
    assert key in r.err and "[7]" in r.err and "[4]" in r.err
    assert "Traceback" not in r.err
    assert not (workdir / "out").exists() or not any((workdir / "out").iterdir())


def test_two_step_reads_each_input_once(workdir: Path, cache: Path, monkeypatch) -> None:
    """A cold build of the seed recipe reads every input tensor byte exactly once (fused)."""
    from collections import Counter

    from conftest import EXAMPLES
    from mergebuild.build import Builder
    from mergebuild.cache import CacheStore
    from mergebuild.engine.safetensors_io import SafetensorsSource
    from mergebuild.recipe import load_recipe

    reads: Counter = Counter()
    original = SafetensorsSource.read_bytes

    def counting(self, key, lo, hi):
        reads[(self.path.name, key, lo)] += 1
        return original(self, key, lo, hi)

    monkeypatch.setattr(SafetensorsSource, "read_bytes", counting)
    monkeypatch.setenv("MERGEBUILD_CHUNK_ELEMENTS", "4096")
    recipe = workdir / "seed.yaml"
    recipe.write_text((EXAMPLES / "anything_nsfw_gape.yaml").read_text())
    plan, _ = Builder(load_recipe(recipe), CacheStore(cache), jobs=2).run()
    assert [i.status for i in plan.items] == ["built"] * 3
    files = {f for f, _, _ in reads}
    assert files == {
        "anything-v3.safetensors",
        "nai-full.safetensors",
        "nai-sfw.safetensors",
        "gape60.safetensors",
    }
    assert max(reads.values()) == 1
    per_file = Counter(f for f, _, _ in reads)
    assert min(per_file.values()) > 1000  # every tensor (and chunk) of each input
