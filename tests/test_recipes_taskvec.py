"""Task-vector methods through the real CLI: recipe forms, seeds, -j, errors.

Most need the recipe forms `base:` / `models:`, `seed:` and the executor's ComputeContext,
which arrive with the "methods" helper's branch: until both are merged those are skipped
(feature check: `Method.input_names`, part of that infrastructure). Slot and `inputs:`
methods (add_perpendicular, n_average, geometric_median) run with either loader.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from conftest import load_st, run_cli
from mergebuild.engine.methods.base import Method
from test_methods_taskvec import ref_gmed, ref_perp, ref_ties

needs_forms = pytest.mark.skipif(
    not hasattr(Method, "input_names"), reason="recipe forms base:/models: not merged yet"
)

FILES = {"anything": "anything-v3", "nai_full": "nai-full", "nai_sfw": "nai-sfw", "gape": "gape60"}


def write_recipe(workdir: Path, merges: str, outputs: str) -> Path:
    models = "\n".join(f"  {n}: models/{f}.safetensors" for n, f in FILES.items())
    path = workdir / "r.yaml"
    path.write_text(f"mergebuild: 1\nmodels:\n{models}\nmerges:\n{merges}\noutputs:\n{outputs}\n")
    return path


def loaded(workdir: Path) -> dict[str, dict[str, np.ndarray]]:
    return {n: load_st(workdir / "models" / f"{f}.safetensors") for n, f in FILES.items()}


def float_keys(m: dict[str, np.ndarray]) -> list[str]:
    return [k for k, a in m.items() if a.dtype.kind == "f" and a.size > 1]


TIES = [(0.2, "magnitude"), (1.0, "count")]


@pytest.fixture(scope="module")
def ties_built(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Path:
    """Every TIES variant as its own merge and output (out/tI), in one build: each build
    costs seconds of imports."""
    work = tmp_path_factory.mktemp("ties")
    (work / "models").symlink_to(model_dir)
    merges = [
        f"  t{i}: {{method: ties, base: nai_sfw, models: [anything, nai_full, gape], k: {k},"
        f" vote: {vote}, alpha: 0.9, dtype: fp32}}"
        for i, (k, vote) in enumerate(TIES)
    ]
    outputs = [f"  o{i}: {{from: t{i}, path: out/t{i}.safetensors}}" for i in range(len(TIES))]
    recipe = write_recipe(work, "\n".join(merges), "\n".join(outputs))
    r = run_cli(recipe, "--json", cache=work / "cache")
    assert r.code == 0, r.err
    return work


@needs_forms
@pytest.mark.parametrize(("i", "k", "vote"), [(i, *v) for i, v in enumerate(TIES)])
def test_ties_recipe_matches_numpy(ties_built: Path, i: int, k: float, vote: str) -> None:
    m = loaded(ties_built)
    out = load_st(ties_built / "out" / f"t{i}.safetensors")
    keys = float_keys(m["nai_sfw"])
    assert len(keys) > 100
    for key in keys:
        arrays = [m[n][key] for n in ("nai_sfw", "anything", "nai_full", "gape")]
        want = ref_ties(arrays, k=k, vote=vote, alpha=0.9)
        scale = max(1.0, float(np.abs(want).max()))
        np.testing.assert_allclose(out[key], want, rtol=2e-6, atol=4e-6 * scale, err_msg=key)


@needs_forms
def test_dare_recipe_is_seeded_and_independent_of_jobs(workdir: Path, cache: Path) -> None:
    """Seeds 1 and 2 side by side in one recipe, built with -j 1 and -j 2 (separate caches)."""
    recipe = write_recipe(
        workdir,
        "\n".join(
            f"  d{seed}: {{method: dare, base: nai_sfw, models: [anything, gape], p: 0.5,"
            f" seed: {seed}}}"
            for seed in (1, 2)
        ),
        "\n".join(
            f"  o{seed}: {{from: d{seed}, path: out/d{seed}.safetensors}}" for seed in (1, 2)
        ),
    )

    def build(jobs: int) -> dict[int, tuple[bytes, str]]:
        r = run_cli(recipe, "--json", "-j", str(jobs), cache=cache / f"j{jobs}")
        assert r.code == 0, r.err
        keys = {n["name"]: n["key"] for n in r.json["nodes"]}
        return {
            seed: ((workdir / "out" / f"d{seed}.safetensors").read_bytes(), keys[f"d{seed}"])
            for seed in (1, 2)
        }

    one, two = build(1), build(2)
    (a, key_a), (b, key_b), (c, key_c) = one[1], two[1], two[2]
    assert a == b and key_a == key_b
    assert one[2] == two[2]
    assert a != c and key_a != key_c  # the seed is part of the node key


@needs_forms
def test_expression_call_equals_explicit_form(workdir: Path, cache: Path) -> None:
    recipe = write_recipe(
        workdir,
        "  e: ties(base=nai_sfw, models=[anything, nai_full], k=0.3)\n"
        "  x: {method: ties, base: nai_sfw, models: [anything, nai_full], k: 0.3}",
        "  oe: {from: e, path: out/e.safetensors}\n  ox: {from: x, path: out/x.safetensors}",
    )
    r = run_cli(recipe, "--json", cache=cache)
    assert r.code == 0, r.err
    nodes = {n["name"]: n for n in r.json["nodes"]}
    assert nodes["e"]["key"] == nodes["x"]["key"]


@needs_forms
@pytest.mark.parametrize(
    ("entry", "fragment"),
    [
        ("{method: ties, base: nai_sfw, models: [anything], k: 1.5}", "ties("),
        ("{method: ties, base: nai_sfw, models: [anything], k: 0}", "ties("),
        ("{method: dare, base: nai_sfw, models: [anything], p: 1.0}", "dare("),
        ("{method: model_stock, base: nai_sfw, models: [anything]}", "model_stock"),
        ("{method: ties, base: nai_sfw, models: [anything, gape], weights: [1]}", "weights"),
        ("{method: della, base: nai_sfw, models: [anything], eps: -1}", "della("),
    ],
)
def test_bad_parameters_are_recipe_errors(
    workdir: Path, cache: Path, entry: str, fragment: str
) -> None:
    recipe = write_recipe(workdir, f"  t: {entry}", "  o: {from: t, path: out/t.safetensors}")
    r = run_cli(recipe, cache=cache)
    assert r.code != 0
    assert "Traceback" not in r.err
    assert "r.yaml:" in r.err and fragment in r.err, r.err
    assert not (workdir / "out" / "t.safetensors").exists()


def test_slot_and_inputs_methods_through_the_cli(workdir: Path, cache: Path) -> None:
    recipe = write_recipe(
        workdir,
        "  p: {method: add_perpendicular, a: anything, b: gape, c: nai_sfw, alpha: 0.7,"
        " dtype: fp32}\n"
        "  n: {method: n_average, inputs: [anything, nai_full, gape], weights: [1, 2, 1],"
        " dtype: fp32}\n"
        "  g: {method: geometric_median, inputs: [anything, nai_full, gape, nai_sfw],"
        " max_iter: 5, tol: 0, dtype: fp32}",
        "  op: {from: p, path: out/p.safetensors}\n"
        "  on: {from: n, path: out/n.safetensors}\n"
        "  og: {from: g, path: out/g.safetensors}",
    )
    r = run_cli(recipe, "-j", "2", cache=cache)
    assert r.code == 0, r.err
    m = loaded(workdir)
    outs = {x: load_st(workdir / "out" / f"{x}.safetensors") for x in "png"}
    keys = float_keys(m["anything"])
    assert len(keys) > 100
    for key in keys:
        a, full, gape, sfw = (m[x][key] for x in ("anything", "nai_full", "gape", "nai_sfw"))
        want_p = ref_perp(a, gape, sfw.astype(np.float32), 0.7)
        want_n = (a.astype(np.float64) + 2 * full.astype(np.float64) + gape) / 4
        want_g = ref_gmed([a, full, gape, sfw], max_iter=5)
        for x, want in (("p", want_p), ("n", want_n), ("g", want_g)):
            scale = max(1.0, float(np.abs(want).max()))
            np.testing.assert_allclose(
                outs[x][key], want, rtol=4e-6, atol=4e-6 * scale, err_msg=f"{x} {key}"
            )
