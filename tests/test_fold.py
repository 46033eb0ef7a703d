"""`fold: true`: a linear subgraph evaluated as one float32 Σ cᵢ·Mᵢ, whatever the merge order.

Coefficients are computed by hand below (exact `Fraction`s of the recipe's numbers, written
out per formula); the reference sums are numpy, in float64 and in float32 in the canonical
order (first term, then the others by the content key the build reports for each model).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from fractions import Fraction as F
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import SRC, load_st, run_cli

MODELS = {
    "A": "anything-v3",
    "B": "nai-full",
    "C": "nai-sfw",
    "D": "gape60",
    "E": "insta",
    "G": "wd13",
}
POS_IDS = "cond_stage_model.transformer.text_model.embeddings.position_ids"

# 26 block weights (BASE, IN00…IN11, M00, OUT00…OUT11): 0 and 1 included (terms skipped there)
ALPHA = [0.25, 0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 0.15]
ALPHA += [0.35, 0.45, 0.55, 0.65, 0.75, 0.85, 0.95, 1.0, 0.0, 0.05, 0.5, 0.33, 0.66]
SDXL = [0.5] * 19 + [1.0]  # 20 values: the SDXL layout (not all equal, or it is one number)


def write(workdir: Path, name: str, merges: str, source: str = "y", dtype: str = "") -> Path:
    models = "".join(f"  {n}: models/{f}.safetensors\n" for n, f in MODELS.items())
    body = textwrap.indent(textwrap.dedent(merges), "  ")
    dt = f", dtype: {dtype}" if dtype else ""
    out = f"outputs:\n  o: {{from: {source}, path: out/{name}.safetensors{dt}}}\n"
    path = workdir / f"{name}.yaml"
    path.write_text(f"mergebuild: 1\nmodels:\n{models}merges:\n{body}{out}")
    return path


def build(recipe: Path, cache: Path, *args: str) -> dict:
    r = run_cli(recipe, "--json", *args, cache=cache)
    assert r.code == 0, r.err
    return r.json | {"stderr": r.err}


def node(report: dict, name: str) -> dict:
    return next(n for n in report["nodes"] if n["kind"] == "merge" and n["name"] == name)


def merge_entries(cache: Path) -> set[str]:
    """Cache objects holding a merge node's value (their sidecar says so)."""
    out = set()
    for side in (cache / "objects").glob("*/*.json"):
        if json.loads(side.read_text()).get("kind") == "merge":
            out.add(side.stem)
    return out


def output_bytes(workdir: Path, name: str) -> bytes:
    return (workdir / "out" / f"{name}.safetensors").read_bytes()


def load_models(workdir: Path) -> dict[str, dict[str, np.ndarray]]:
    return {n: load_st(workdir / "models" / f"{f}.safetensors") for n, f in MODELS.items()}


def block_index(key: str) -> int:
    """Index into ALPHA of a key (SD1 MBW layout), written out from domain.md §4: non-UNet
    keys and the UNet's time embedding take BASE."""
    prefix = "model.diffusion_model."
    if not key.startswith(prefix):
        return 0
    rest = key[len(prefix) :]
    m = re.match(r"(input|output)_blocks\.(\d+)\.", rest)
    if m:
        return (1 if m[1] == "input" else 14) + int(m[2])
    if rest.startswith("middle_block."):
        return 13
    if rest.startswith("out."):
        return 25
    return 0


# -- the shapes: two merge orders of one linear form, `y` folded in both -----------------------

a_ = F(0.3), F(0.5), F(0.2), F(0.7)  # the chain's alphas
SHAPES = {
    "seed_tip": (
        """\
        x: A + (B - C)
        y: {method: add_difference, a: x, b: D, c: B, alpha: 1.0, fold: true, cache: true}
        """,
        """\
        x: A + (D - B)
        y: {expr: "x + (B - C)", fold: true, cache: true}
        """,
        {"A": F(1), "C": F(-1), "D": F(1)},
    ),
    "chain_of_4": (
        """\
        s1: A + (B - C) * 0.3
        s2: {method: add_difference, a: s1, b: D, c: E, alpha: 0.5}
        s3: s2 + (G - B) * 0.2
        y: {method: add_difference, a: s3, b: C, c: D, alpha: 0.7, fold: true, cache: true}
        """,
        """\
        s1: A + (C - D) * 0.7
        s2: s1 + (G - B) * 0.2
        s3: {method: add_difference, a: s2, b: D, c: E, alpha: 0.5}
        y: {expr: "s3 + (B - C) * 0.3", fold: true, cache: true}
        """,
        {
            "A": F(1),
            "B": a_[0] - a_[2],
            "C": -a_[0] + a_[3],
            "D": a_[1] - a_[3],
            "E": -a_[1],
            "G": a_[2],
        },
    ),
    "weighted_sum_of_expressions_by_block": (
        f"""\
        X: A + (B - C) * 0.5
        Y: {{method: weighted_sum, a: A, b: D, alpha: 0.4}}
        y: {{method: weighted_sum, a: X, b: Y, alpha: {ALPHA}, fold: true, cache: true}}
        """,
        f"""\
        Y: A + (D - A) * 0.4
        X: {{method: linear, models: [A, B, C], weights: [1.0, 0.5, -0.5]}}
        y: {{method: add_difference, a: X, b: Y, c: X, alpha: {ALPHA}, fold: true, cache: true}}
        """,
        None,  # per block: block_coefficients()
    ),
}


def block_coefficients(i: int) -> dict[str, F]:
    """(1−α)·X + α·Y with X = A + 0.5·(B − C), Y = (1 − 0.4)·A + 0.4·D, at block i."""
    al, half, w = F(ALPHA[i]), F(0.5), F(0.4)
    return {
        "A": (1 - al) + al * (1 - w),
        "B": (1 - al) * half,
        "C": -(1 - al) * half,
        "D": al * w,
    }


@pytest.mark.parametrize("shape", list(SHAPES))
def test_two_merge_orders_fold_to_one_file_and_one_cache_entry(
    workdir: Path, cache: Path, shape: str
) -> None:
    one, two, _ = SHAPES[shape]
    r1 = build(write(workdir, "one", one), cache)
    assert merge_entries(cache) == {node(r1, "y")["key"]}  # intermediates: not built at all
    assert [n["name"] for n in r1["nodes"] if n["kind"] == "merge"] == ["y"]
    r2 = build(write(workdir, "two", two), cache)
    assert node(r2, "y")["key"] == node(r1, "y")["key"]
    assert node(r2, "y")["status"] == "cached"  # the second order reuses the first's entry
    assert merge_entries(cache) == {node(r1, "y")["key"]}
    assert output_bytes(workdir, "one") == output_bytes(workdir, "two")


def test_a_non_linear_term_stays_an_ordinary_node(workdir: Path, cache: Path) -> None:
    """slerp's output is one term of the fold: built and cached once, shared by both orders."""
    one = """\
        S: slerp(B, C, 0.3)
        x: A + (S - C) * 0.5
        y: {method: add_difference, a: x, b: D, c: S, alpha: 1.0, fold: true, cache: true}
        """
    two = """\
        S: {method: slerp, a: B, b: C, alpha: 0.3}
        x: A + (D - S)
        y: {expr: "x + (S - C) * 0.5", fold: true, cache: true}
        """
    r1 = build(write(workdir, "one", one), cache)
    r2 = build(write(workdir, "two", two), cache)
    keys = {node(r1, "S")["key"], node(r1, "y")["key"]}
    assert merge_entries(cache) == keys
    assert node(r2, "y")["key"] == node(r1, "y")["key"] and node(r2, "y")["status"] == "cached"
    assert output_bytes(workdir, "one") == output_bytes(workdir, "two")
    expl = run_cli("explain", workdir / "one.yaml", "y")
    assert expl.code == 0, expl.err
    assert "y = A − 0.5·C + D − 0.5·S" in expl.out, expl.out


# -- numbers ----------------------------------------------------------------------------------


def _order(report: dict, terms: list[str], first: str) -> list[str]:
    """The canonical order: `first` (the key set's source), then by content key."""
    keys = {n: m["key"] for n, m in report["models"].items()}
    return [first, *sorted((t for t in terms if t != first), key=lambda t: keys[t])]


@pytest.mark.parametrize("shape", ["chain_of_4", "weighted_sum_of_expressions_by_block"])
@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_folded_values_match_numpy(workdir: Path, cache: Path, shape: str, dtype: str) -> None:
    one, _, coeffs = SHAPES[shape]
    report = build(write(workdir, "one", one.replace("cache: true", f"dtype: {dtype}")), cache)
    m = load_models(workdir)
    out = load_st(workdir / "out" / "one.safetensors")
    assert set(out) == set(m["A"])
    np.testing.assert_array_equal(out[POS_IDS], m["A"][POS_IDS])  # non-float: from A
    want = np.float32 if dtype == "fp32" else np.float16
    checked = 0
    for k, a in m["A"].items():
        if a.dtype.kind != "f":
            continue
        cs = coeffs if coeffs is not None else block_coefficients(block_index(k))
        terms = _order(report, [t for t, c in cs.items() if c != 0], "A")
        # float64 reference: within float32 rounding of the sum (and of each coefficient)
        ref = sum(float(cs[t]) * m[t][k].astype(np.float64) for t in terms)
        scale = sum(abs(float(cs[t])) * np.abs(m[t][k].astype(np.float64)) for t in terms)
        got = out[k].astype(np.float64)
        bound = (len(terms) + 2) * 2.0**-23 * scale
        if dtype == "fp16":
            bound = bound + np.abs(ref) * 2.0**-11 + 2.0**-25  # plus the one rounding to fp16
        assert np.all(np.abs(got - ref) <= bound), k
        # float32, terms in the canonical order, one rounding to the node's dtype: bit-exact
        acc = m[terms[0]][k].astype(np.float32) * np.float32(float(cs[terms[0]]))
        for t in terms[1:]:
            acc = acc + m[t][k].astype(np.float32) * np.float32(float(cs[t]))
        np.testing.assert_array_equal(out[k], acc.astype(want), err_msg=k)
        assert out[k].dtype == want
        checked += 1
    assert checked > 1000


def test_without_fold_each_order_keeps_its_per_node_rounding(workdir: Path, cache: Path) -> None:
    """Regression: no `fold`, no change. Each order rounds its intermediate to fp16."""
    one, two, _ = SHAPES["seed_tip"]
    r1 = build(write(workdir, "one", one.replace("fold: true, ", "")), cache)
    r2 = build(write(workdir, "two", two.replace(", fold: true", "")), cache)
    assert node(r1, "y")["key"] != node(r2, "y")["key"]
    m = load_models(workdir)
    f32 = {
        n: {k: v.astype(np.float32) for k, v in t.items() if v.dtype.kind == "f"}
        for n, t in m.items()
    }
    o1, o2 = (load_st(workdir / "out" / f"{n}.safetensors") for n in ("one", "two"))
    differ = 0
    for k, a in f32["A"].items():
        x1 = (a + (f32["B"][k] - f32["C"][k])).astype(np.float16).astype(np.float32)
        y1 = x1 + (f32["D"][k] - f32["B"][k])
        np.testing.assert_array_equal(o1[k], y1.astype(np.float16), err_msg=k)
        x2 = (a + (f32["D"][k] - f32["B"][k])).astype(np.float16).astype(np.float32)
        y2 = x2 + (f32["B"][k] - f32["C"][k])
        np.testing.assert_array_equal(o2[k], y2.astype(np.float16), err_msg=k)
        differ += int(not np.array_equal(o1[k], o2[k]))
    assert differ > 0  # the per-node roundings really differ: what fold is for
    # and folding changes the node's identity, so its key
    r3 = build(write(workdir, "three", one), cache)
    assert node(r3, "y")["key"] not in (node(r1, "y")["key"], node(r2, "y")["key"])


# -- determinism, cache, reporting --------------------------------------------------------------


def test_jobs_chunking_and_cache_do_not_change_the_bytes(workdir: Path, tmp_path: Path) -> None:
    _, two, _ = SHAPES["weighted_sum_of_expressions_by_block"]
    recipe = write(workdir, "two", two)
    build(recipe, tmp_path / "c1", "-j1")
    first = output_bytes(workdir, "two")
    build(recipe, tmp_path / "c2", "-j2")
    assert output_bytes(workdir, "two") == first
    r = run_cli(
        recipe, "--json", "-j2", cache=tmp_path / "c3", env={"MERGEBUILD_CHUNK_ELEMENTS": "1000"}
    )
    assert r.code == 0, r.err
    assert output_bytes(workdir, "two") == first
    again = build(recipe, tmp_path / "c1", "-j2")  # cached rebuild: nothing computed
    assert again["summary"]["built"] == 0 and node(again, "y")["status"] == "cached"
    assert output_bytes(workdir, "two") == first


def test_a_cancelling_model_is_reported_and_never_read(workdir: Path, cache: Path) -> None:
    one, _, _ = SHAPES["seed_tip"]
    recipe = write(workdir, "one", one)
    dry = run_cli(recipe, "-n", cache=cache)
    assert dry.code == 0, dry.err
    assert "folded add_difference: A − C + D (B cancels out)" in dry.out
    assert "B cancels out (total coefficient 0)" in dry.err  # the warning
    expl = run_cli("explain", recipe, "--json")
    rep = expl.json["nodes"]["y"]
    assert rep["folded"] is True and rep["folded_from"] == "add_difference"
    assert rep["terms"] == {"A": 1.0, "C": -1.0, "D": 1.0}
    assert ("cancels", "B") in [(f["kind"], f.get("term")) for f in rep["flags"]]
    text = run_cli("explain", recipe).out
    assert "y = A − C + D  [folded add_difference" in text
    # B is out of the sum: the build never opens it (a missing file is no error)
    (workdir / "models" / "nai-full.safetensors").rename(workdir / "nai-full.moved")
    r = run_cli(recipe, cache=cache)
    assert r.code == 0, r.err
    assert "B cancels out" in r.err
    unfolded = write(workdir, "plain", one.replace("fold: true, ", ""))
    assert run_cli(unfolded, cache=cache).code == 1  # without fold, B is needed


def test_an_intermediate_needed_elsewhere_is_still_built(workdir: Path, cache: Path) -> None:
    one, _, _ = SHAPES["seed_tip"]
    recipe = write(workdir, "one", one)
    text = recipe.read_text() + "  x_out: {from: x, path: out/x.safetensors}\n"
    recipe.write_text(text)
    r = build(recipe, cache)
    assert {n["name"] for n in r["nodes"] if n["kind"] == "merge"} == {"x", "y"}
    m = load_models(workdir)
    x = load_st(workdir / "out" / "x.safetensors")
    k = "model.diffusion_model.out.2.weight"
    ref = m["A"][k].astype(np.float32) + (m["B"][k].astype(np.float32) - m["C"][k])
    np.testing.assert_array_equal(x[k], ref.astype(np.float16))


def test_lock_provenance_and_extract_record_the_fold(workdir: Path, cache: Path) -> None:
    one, _, _ = SHAPES["chain_of_4"]
    recipe = write(workdir, "one", one)
    r = run_cli(recipe, "--update-lock", cache=cache)
    assert r.code == 0, r.err
    lock = yaml.safe_load(recipe.with_suffix(".lock").read_text())
    y = lock["nodes"]["y"]
    assert y["method"] == "fold" and y["inputs"]["m0"] == "A"
    # the lock pairs each term with its weight (terms after the first sorted by content key)
    names = [y["inputs"][f"m{i}"] for i in range(len(y["inputs"]))]
    assert dict(zip(names, y["params"]["weights"], strict=True)) == {
        t: float(c) for t, c in SHAPES["chain_of_4"][2].items()
    }
    assert set(lock["nodes"]) == {"y"}  # the folded intermediates are not part of the build
    show = run_cli("show", workdir / "out" / "one.safetensors", "--json")
    assert show.code == 0, show.err
    assert '"fold"' in show.out
    extracted = workdir / "x" / "recipe.yaml"
    ex = run_cli("extract", workdir / "out" / "one.safetensors", "-o", extracted)
    assert ex.code == 0, ex.err
    doc = yaml.safe_load(extracted.read_text())
    assert doc["merges"]["y"]["method"] == "fold"
    b = run_cli(extracted, "--json", "--models", workdir / "models", cache=workdir / "c2")
    assert b.code == 0, b.err
    out = next(n for n in b.json["nodes"] if n["kind"] == "output")
    assert Path(out["path"]).read_bytes() == output_bytes(workdir, "one")


# -- recipe errors ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("merges", "method"),
    [
        ("y: {method: ties, base: A, models: [B, C], k: 0.5, fold: true}\n", "ties"),
        ("y: {expr: 'slerp(A, B, 0.3)', fold: true}\n", "slerp"),
        (
            "y:\n  method: train_difference\n  a: A\n  b: B\n  c: C\n  alpha: 1.0\n  fold: true\n",
            "train_difference",
        ),
        ("y: {method: dare, base: A, models: [B], p: 0.3, fold: true}\n", "dare"),
    ],
)
def test_fold_on_a_non_linear_node_is_a_located_error(
    workdir: Path, cache: Path, merges: str, method: str
) -> None:
    recipe = write(workdir, "bad", merges)
    r = run_cli(recipe, cache=cache)
    assert r.code == 2 and "Traceback" not in r.err
    line = next(i for i, s in enumerate(recipe.read_text().splitlines(), 1) if "fold" in s)
    assert re.search(rf"bad\.yaml:{line}:\d+: .*{method} is not linear", r.err), r.err
    assert not (workdir / "out").exists()


@pytest.mark.parametrize(
    "merges",
    [
        # the folded subgraph mixes SD1 (26) and SDXL (20) block weights
        f"x: {{method: weighted_sum, a: A, b: B, alpha: {ALPHA}}}\n"
        f"y: {{method: weighted_sum, a: x, b: C, alpha: {SDXL}, fold: true}}\n",
        f"x: {{method: add_difference, a: A, b: B, c: C, alpha: {SDXL}}}\n"
        f"y: {{expr: 'x * 0.5 + D * 0.5', fold: true}}\n"
        f"z: {{method: weighted_sum, a: y, b: x, alpha: {ALPHA}}}\n"
        f"w: {{method: copy, a: z, fold: true}}\n",
        # written out as a fold node: its weights mix the layouts
        f"y: {{method: fold, models: [A, B], weights: [{ALPHA}, {SDXL}]}}\n",
    ],
)
def test_fold_with_mixed_block_layouts_is_an_error(workdir: Path, cache: Path, merges: str) -> None:
    recipe = write(workdir, "bad", merges)
    r = run_cli(recipe, cache=cache)
    assert r.code == 2 and "Traceback" not in r.err, r.err
    assert re.search(r"bad\.yaml:\d+:\d+: .*(mix|mixes) block weights of the sd1 and sdxl", r.err)


def test_fold_with_weights_of_another_architecture_fails_the_build(
    workdir: Path, cache: Path
) -> None:
    """SDXL block weights on SD1 models: the executor's check sees fold's per-term weights."""
    merges = (
        "x: A + (B - C) * 0.5\n"
        f"y: {{method: weighted_sum, a: x, b: D, alpha: {SDXL}, fold: true}}\n"
    )
    r = run_cli(write(workdir, "bad", merges), cache=cache)
    assert r.code == 1 and "SDXL (20 values) block layout" in r.err, r.err
    assert not (workdir / "out" / "bad.safetensors").exists()


@pytest.mark.parametrize(
    ("merges", "message"),
    [
        ("x: A + (B - C)\ny: {expr: 'x - A - B + C', fold: true}\n", "every model cancels out"),
        (
            "x: A + (B - C)\n"
            "y: {method: linear, models: [x, A, B, C], weights: [1, -1, -1, 1], fold: true}\n",
            "every model cancels out",
        ),
        ("y: {expr: 'A + (B - C)', fold: 'yes'}\n", "fold"),
        ("y: {expr: 'A + (B - C)', fold: 1}\n", "fold"),
    ],
)
def test_bad_fold_values(workdir: Path, cache: Path, merges: str, message: str) -> None:
    r = run_cli(write(workdir, "bad", merges), cache=cache)
    assert r.code == 2 and message in r.err and "Traceback" not in r.err, r.err
    assert re.search(r"bad\.yaml:\d+:\d+: ", r.err), r.err


def test_set_turns_fold_on(workdir: Path, cache: Path) -> None:
    one, _, _ = SHAPES["seed_tip"]
    recipe = write(workdir, "one", one.replace("fold: true, ", ""))
    r = run_cli(recipe, "-n", "--set", "y.fold=true", cache=cache)
    assert r.code == 0 and "folded add_difference: A − C + D" in r.out, r.err


def test_example_recipe_folds_both_orders(workdir: Path, cache: Path) -> None:
    example = Path(__file__).resolve().parents[1] / "examples" / "fold_merge_order.yaml"
    recipe = workdir / example.name
    shutil.copy(example, recipe)
    r = build(recipe, cache)
    outs = [Path(n["path"]) for n in r["nodes"] if n["kind"] == "output"]
    assert len(outs) == 2
    a, b = (load_st(p) for p in outs)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    folded = [n for n in r["nodes"] if n["kind"] == "merge"]
    assert len({n["key"] for n in folded}) == 1


def test_dry_run_with_fold_does_not_import_torch(workdir: Path, cache: Path) -> None:
    _, two, _ = SHAPES["weighted_sum_of_expressions_by_block"]
    recipe = write(workdir, "two", two)
    code = (
        "import sys\n"
        "from mergebuild.cli import main\n"
        f"assert main(['-n', {str(recipe)!r}]) == 0\n"
        "print('TORCH', 'torch' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "PYTHONPATH": str(SRC), "MERGEBUILD_CACHE_DIR": str(cache)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "fold" in out.stdout and out.stdout.splitlines()[-1] == "TORCH False"


def test_a_fold_through_an_included_recipe(workdir: Path, cache: Path) -> None:
    """An included recipe's folded node is one more linear node to the includer: folding
    through it gives the flat recipe's key (names differ, content does not)."""
    models = "".join(f"  {n}: ../models/{f}.safetensors\n" for n, f in MODELS.items())
    (workdir / "sub").mkdir()
    (workdir / "sub" / "sub.yaml").write_text(
        f"mergebuild: 1\nmodels:\n{models}merges:\n  x: A + (B - C)\n"
        "  s: {method: add_difference, a: x, b: D, c: B, alpha: 1.0, fold: true}\n"
        "outputs:\n  s: {from: s, path: s.safetensors}\n"
    )
    top = workdir / "top.yaml"
    top.write_text(
        "mergebuild: 1\ninclude: {sub: sub/sub.yaml}\n"
        "models:\n  E: models/insta.safetensors\n"
        "merges:\n  t: {expr: 'sub.s * 0.5 + E * 0.5', fold: true}\n"
        "outputs:\n  o: {from: t, path: out/top.safetensors}\n"
    )
    rep = run_cli("explain", top, "t", "--json").json["nodes"]["t"]
    assert rep["terms"] == {"sub.A": 0.5, "sub.C": -0.5, "sub.D": 0.5, "E": 0.5}
    assert ("cancels", "sub.B") in [(f["kind"], f.get("term")) for f in rep["flags"]]
    r1 = build(top, cache)
    flat = write(
        workdir,
        "flat",
        """\
        x: A + (B - C)
        s: {method: add_difference, a: x, b: D, c: B, alpha: 1.0}
        y: {expr: 's * 0.5 + E * 0.5', fold: true}
        """,
    )
    r2 = build(flat, cache)
    assert node(r2, "y")["key"] == node(r1, "t")["key"]
    a, b = (
        load_st(workdir / "out" / "top.safetensors"),
        load_st(workdir / "out" / "flat.safetensors"),
    )
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
