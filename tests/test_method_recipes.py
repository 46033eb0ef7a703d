"""The new methods through real recipes and the real CLI: numbers against numpy, determinism
across -j and chunk sizes, recipe forms and their errors, expression calls, `methods`."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import SRC, load_st, run_cli
from test_methods_numbers import (
    EPS,
    extract_ref,
    gauss,
    median3,
    slerp_ref,
    train_difference_ref,
)

FILES = {
    "anything": "anything-v3",
    "nai_full": "nai-full",
    "nai_sfw": "nai-sfw",
    "gape": "gape60",
    "insta": "insta",
    "wd13": "wd13",
    "sd15": "v1-5-pruned",
}


def write_recipe(workdir: Path, merges: str, outputs: str, name: str = "r.yaml") -> Path:
    models = "\n".join(f"  {n}: models/{f}.safetensors" for n, f in FILES.items())
    path = workdir / name
    path.write_text(f"mergebuild: 1\nmodels:\n{models}\nmerges:\n{merges}\noutputs:\n{outputs}\n")
    return path


def inputs(workdir: Path, *names: str) -> list[dict[str, np.ndarray]]:
    return [load_st(workdir / "models" / f"{FILES[n]}.safetensors") for n in names]


def float_keys(*models: dict[str, np.ndarray]) -> Iterator[str]:
    for k, v in models[0].items():
        if (
            v.dtype.kind == "f"
            and "position_ids" not in k
            and all(k in m and m[k].shape == v.shape for m in models[1:])
        ):
            yield k


def check(out: np.ndarray, ref: np.ndarray, scale: np.ndarray, k: float = 16) -> None:
    err = np.abs(out.astype(np.float64) - ref)
    assert np.all(err <= k * EPS * np.maximum(scale, 1e-30)), err.max()


MERGES = """\
  t: {method: triple_sum, a: anything, b: nai_full, c: insta, alpha: 0.3, beta: 0.2, dtype: fp32}
  w: {method: sum_twice, a: anything, b: nai_full, c: insta, alpha: 0.6, beta: 0.25, dtype: fp32}
  d: {method: train_difference, a: anything, b: nai_full, c: nai_sfw, alpha: 0.8, dtype: fp32}
"""
WHOLE = """\
  s: {method: slerp, a: anything, b: insta, alpha: 0.3, dtype: fp32}
  x: {method: extract, a: sd15, b: anything, c: insta, alpha: 0.4, beta: 0.2, gamma: 2, dtype: fp32}
  m: {method: smooth_add, a: anything, b: nai_full, c: nai_sfw, alpha: 0.5, dtype: fp32}
"""


def outs(names: str) -> str:
    return "\n".join(f"  o{n}: {{from: {n}, path: out/{n}.safetensors}}" for n in names)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Path:
    """MERGES and WHOLE in one recipe, built once with the default -j and chunks: each build
    costs seconds of imports, and every test below reads these outputs."""
    work = tmp_path_factory.mktemp("methods")
    (work / "models").symlink_to(model_dir)
    r = run_cli(write_recipe(work, MERGES + WHOLE, outs("twdsxm")), cache=work / "cache")
    assert r.code == 0, r.err
    return work


def test_elementwise_methods_match_numpy(built: Path) -> None:
    workdir = built
    A, B, C, S = inputs(workdir, "anything", "nai_full", "insta", "nai_sfw")
    t, w, d = (load_st(workdir / "out" / f"{n}.safetensors") for n in "twd")
    n = 0
    for k in float_keys(A, B, C, S):
        a, b, c, s = (m[k].astype(np.float64) for m in (A, B, C, S))
        scale = np.abs(a) + np.abs(b) + np.abs(c)
        check(t[k], a * 0.5 + b * 0.3 + c * 0.2, scale)
        check(w[k], (a * 0.4 + b * 0.6) * 0.75 + c * 0.25, scale)
        check(d[k], train_difference_ref(a, b, s, 0.8), np.abs(a) + 1.8 * np.abs(b - s))
        assert t[k].dtype == np.float32
        n += 1
    assert n > 100


def test_whole_tensor_methods_match_numpy(built: Path) -> None:
    workdir = built
    A, In, F, S, V = inputs(workdir, "anything", "insta", "nai_full", "nai_sfw", "sd15")
    s, x, m = (load_st(workdir / "out" / f"{n}.safetensors") for n in "sxm")
    n = 0
    for k in float_keys(A, In, F, S, V):
        a, i, f, sf, v = (mm[k].astype(np.float64) for mm in (A, In, F, S, V))
        check(s[k], slerp_ref(a, i, 0.3), np.abs(a) + np.abs(i))
        check(x[k], extract_ref(v, a, i, 0.4, 0.2, 2.0), np.abs(v) + np.abs(a) + np.abs(i))
        if a.size <= 1 << 16:  # keep the reference median filter's memory small
            bound = np.abs(a) + 4 * (np.abs(f).max() + np.abs(sf).max())
            check(m[k], a + 0.5 * gauss(median3(f - sf), 1.0), bound, k=32)
        n += 1
    assert n > 100


def test_bytes_do_not_depend_on_jobs_or_chunks(built: Path, workdir: Path, tmp_path: Path) -> None:
    """Elementwise (twd) and whole-tensor (sxm) methods: the `built` outputs (-j 2, default
    chunks) and three other -j / chunk combinations, each in a cache of its own."""
    names = "twdsxm"
    recipe = write_recipe(workdir, MERGES + WHOLE, outs(names))
    results = [{n: (built / "out" / f"{n}.safetensors").read_bytes() for n in names}]
    for i, (jobs, chunk) in enumerate([("1", None), ("2", "1000"), ("1", "333")]):
        env = {"MERGEBUILD_CHUNK_ELEMENTS": chunk} if chunk else {}
        r = run_cli(recipe, "-j", jobs, cache=tmp_path / f"c{i}", env=env)
        assert r.code == 0, r.err
        results.append({n: (workdir / "out" / f"{n}.safetensors").read_bytes() for n in names})
    for other in results[1:]:
        for n in names:
            a, b = load_st_bytes(results[0][n]), load_st_bytes(other[n])
            assert a.keys() == b.keys()
            assert all(a[k].tobytes() == b[k].tobytes() for k in a), n


def load_st_bytes(data: bytes) -> dict[str, np.ndarray]:
    from safetensors.numpy import load

    return load(data)


# -- expression calls -------------------------------------------------------------------------


def keys(workdir: Path, cache: Path, merges: str, names: list[str]) -> dict[str, str]:
    outputs = "\n".join(f"  o_{n}: {{from: {n}, path: out/{n}.safetensors}}" for n in names)
    r = run_cli(write_recipe(workdir, merges, outputs), "-n", "--json", cache=cache)
    assert r.code == 0, r.err
    return {n["name"]: n["key"] for n in r.json["nodes"] if n["kind"] == "merge"}


def test_expression_calls_have_the_explicit_forms_keys(workdir: Path, cache: Path) -> None:
    merges = """\
  s1: slerp(anything, insta, 0.3)
  s2: slerp(a=anything, b=insta, alpha=0.3)
  s3: {method: slerp, a: anything, b: insta, alpha: 0.3}
  t1: triple_sum(anything, nai_full, insta, alpha=0.3, beta=0.2)
  t2: {method: triple_sum, a: anything, b: nai_full, c: insta, alpha: 0.3, beta: 0.2}
  mix1: slerp(anything, insta, 0.3) * 0.5 + gape * 0.5
  mix2: s3 * 0.5 + gape * 0.5
  nest1: slerp(anything + (nai_full - nai_sfw) * 0.5, insta, 0.3)
  ad: anything + (nai_full - nai_sfw) * 0.5
  nest2: {method: slerp, a: ad, b: insta, alpha: 0.3}
  p1: "extract(sd15, anything, insta, alpha=preset('GRAD_V'), gamma=2)"
  p2: {method: extract, a: sd15, b: anything, c: insta, alpha: {preset: GRAD_V}, gamma: 2}
  l1: linear(models=[anything, insta], weights=[0.25, 0.75])
  l2: anything * 0.25 + insta * 0.75
"""
    k = keys(workdir, cache, merges, ["s1", "s2", "t1", "mix1", "mix2", "nest1", "nest2", "p1"])
    k2 = keys(workdir, cache, merges, ["s3", "t2", "p2", "l1", "l2"])
    assert k["s1"] == k["s2"] == k2["s3"]
    assert k["t1"] == k2["t2"]
    assert k["mix1"] == k["mix2"] and k["mix1/1"] == k2["s3"]
    assert k["nest1"] == k["nest2"] and k["nest1/1"] == k["ad"]
    assert k["p1"] == k2["p2"]
    assert k2["l1"] != k2["l2"]  # linear vs the canonical weighted_sum: different nodes
    assert len({k["s1"], k["t1"], k["mix1"], k["nest1"], k["p1"]}) == 5


def test_expression_call_builds_same_tensors(workdir: Path, cache: Path) -> None:
    merges = """\
  e: slerp(anything, insta, 0.3) * 0.5 + gape * 0.5
  s: {method: slerp, a: anything, b: insta, alpha: 0.3}
  x: s * 0.5 + gape * 0.5
"""
    r = run_cli(write_recipe(workdir, merges, outs("ex")), cache=cache)
    assert r.code == 0, r.err
    e, x = (load_st(workdir / "out" / f"{n}.safetensors") for n in "ex")
    assert e.keys() == x.keys() and all(np.array_equal(e[k], x[k]) for k in e)


# -- recipe errors ----------------------------------------------------------------------------

ERRORS = [
    (  # out of range
        "  m: {method: extract, a: sd15, b: anything, c: insta, alpha: 1.5}",
        r":\d+:\d+: 'alpha' of merge 'm': input should be less than or equal to 1",
        "signature: extract(a, b, c, alpha=0.5 in [0, 1]",
    ),
    (  # block weights where the method takes one number
        "  m: {method: smooth_add, a: anything, b: nai_full, c: nai_sfw, sigma: [1, 2]}",
        r":\d+:\d+: merge 'm': 'sigma' of smooth_add takes one number, not block weights",
        "signature: smooth_add(a, b, c, alpha=1.0 (or block weights), size=3 in [1, 7]",
    ),
    (  # a block value outside the range
        "  m: {method: extract, a: sd15, b: anything, c: insta, beta: {default: 0, IN00: 2}}",
        r":\d+:\d+: merge 'm': block value 2 of 'beta' is out of its range",
        "signature: extract(",
    ),
    (  # too few models
        "  m: {method: linear, models: [], weights: []}",
        r":\d+:\d+: merge 'm': linear needs at least 1 models, got 0",
        "signature: linear(models=[..], weights)",
    ),
    (
        "  m: {method: linear, models: [anything, insta], weights: [1.0]}",
        r":\d+:\d+: merge 'm': 'weights' has 1 values for 2 models",
        "signature: linear(",
    ),
    (
        "  m: {method: linear, models: [anything], inputs: [insta], weights: [1.0]}",
        r":\d+:\d+: merge 'm': give 'models:' or its alias 'inputs:', not both",
        "",
    ),
    (
        "  m: {method: slerp, a: anything, b: insta, seed: 3}",
        r":\d+:\d+: merge 'm': slerp is not random, 'seed' does not apply",
        "signature: slerp(a, b, alpha=0.5 (or block weights))",
    ),
    (
        "  m: {method: slerp, a: anything, models: [insta]}",
        r":\d+:\d+: merge 'm' \(slerp\) takes inputs a, b, not 'models:'",
        "signature: slerp(",
    ),
    (
        "  m: {method: add_cosine_a, a: anything, b: insta, sim_min: 0.9, sim_max: 0.5}",
        r":\d+:\d+: .*sim_max \(0.5\) must be greater than sim_min \(0.9\)",
        "signature: add_cosine_a(",
    ),
    (  # in an expression: located at the call
        "  m: anything * 0.5 + extract(sd15, anything, insta, 1.5) * 0.5",
        r":\d+:23: 'alpha' of merge 'm/1': input should be less than or equal to 1",
        "signature: extract(",
    ),
    ("  m: slerp(anything, insta, 0.3, 4)", r":\d+:6: in merge 'm': too many arguments", ""),
    ("  m: slerp(anything, b=insta, a=gape)", r":\d+:6: in merge 'm': slerp\(\) got 'a' twice", ""),
    ("  m: slerp(anything, insta, alpha=gape)", r":\d+:35: in merge 'm': a parameter is", ""),
    ("  m: slerpp(anything, insta)", r":\d+:6: in merge 'm': unknown function 'slerpp'", ""),
    ("  m: slerp(anything, insta2, 0.3)", r":\d+:22: unknown model 'insta2'", ""),
]


@pytest.mark.parametrize("merge,pattern,signature", ERRORS)
def test_recipe_errors(workdir: Path, cache: Path, merge: str, pattern: str, signature: str):
    r = run_cli(
        write_recipe(workdir, merge, "  o: {from: m, path: out/o.safetensors}"), cache=cache
    )
    assert r.code == 2, r.err
    assert "Traceback" not in r.err
    assert re.search(r"r\.yaml" + pattern, r.err), r.err
    assert signature in r.err
    assert not (workdir / "out").exists()


def test_base_models_form_in_process(tmp_path: Path) -> None:
    """`base: X` + `models: [..]`, per-model weights and seed, with a method registered here."""
    from pydantic import Field

    from mergebuild.engine.methods import REGISTRY, register
    from mergebuild.engine.methods.base import Method, SeedParams
    from mergebuild.errors import RecipeError
    from mergebuild.recipe import load_recipe

    class TvParams(SeedParams):
        k: float = Field(0.2, gt=0, le=1)
        weights: list[float] | None = None

    class Tv(Method):
        name = "tv_probe"
        inputs_form = "base_models"
        min_models = 2
        random = True
        Params = TvParams
        elementwise = False

        @staticmethod
        def compute(params, xs):  # never run here
            raise AssertionError

    register(Tv)
    try:
        head = "mergebuild: 1\nmodels:\n" + "".join(f"  {n}: {n}.st\n" for n in "abcd")
        out = "outputs:\n  o: {from: m, path: o.st}\n"

        def load(merge: str) -> object:
            p = tmp_path / "r.yaml"
            p.write_text(head + "merges:\n" + merge + out)
            return load_recipe(p)

        r = load("  m: {method: tv_probe, base: a, models: [b, c], weights: [0.5, 1], seed: 7}\n")
        node = r.nodes["m"]  # type: ignore[attr-defined]
        assert list(node.inputs.values()) == ["a", "b", "c"]
        assert node.params == {"seed": 7, "k": 0.2, "weights": [0.5, 1.0]}
        assert load("  m: tv_probe(base=a, models=[b, c, d], k=0.5)\n").nodes["m"].params == {
            "seed": 0, "k": 0.5, "weights": None
        }  # fmt: skip
        assert load("  m: tv_probe(a, [b, c], 0.5)\n").nodes["m"].params["k"] == 0.5
        bad = {
            "  m: {method: tv_probe, base: a, models: [b]}\n": "needs at least 2 models, got 1",
            "  m: {method: tv_probe, models: [b, c]}\n": "(tv_probe) is missing 'base:'",
            "  m: {method: tv_probe, base: a, models: [b, c], k: 0}\n": "greater than 0",
            "  m: {method: tv_probe, base: a, models: [b, c], k: [1]}\n": "takes one number",
            "  m: {method: tv_probe, base: a, models: [b, c], seed: -1}\n": "'seed'",
            "  m: {method: tv_probe, base: a, models: [b, c], seed: true}\n": "'seed'",
            "  m: {method: tv_probe, base: a, models: [b, c], weights: [1]}\n": "1 values for 2",
            "  m: {method: tv_probe, base: a, models: [b, c], c: d}\n": "unknown parameter 'c'",
            "  m: {method: tv_probe, a: a, b: b}\n": "(tv_probe) is missing 'base:'",
            "  m: tv_probe(base=a, models=[b])\n": "at least 2 models",
            "  m: tv_probe(base=a, models=b)\n": "models= takes a list",
        }
        for merge, message in bad.items():
            with pytest.raises(RecipeError) as e:
                load(merge)
            text = str(e.value)
            assert message in text, (merge, text)
            assert re.search(r"r\.yaml:8:\d+:", text), text
            if "takes a list" not in message:
                assert (
                    "tv_probe(base, models=[..], k=0.2 in (0, 1], weights=None, "
                    "seed=0 in [0, 2**63-1])" in text
                )
    finally:
        REGISTRY.pop("tv_probe", None)


# -- `mergebuild methods` ---------------------------------------------------------------------


def test_methods_lists_every_method_with_its_formula() -> None:
    from mergebuild.engine.methods import REGISTRY

    r = run_cli("methods")
    assert r.code == 0, r.err
    lines = r.out.splitlines()
    assert lines[0].split() == ["METHOD", "FORMULA", "INPUTS", "RANDOM", "STREAMING"]
    for m in REGISTRY.values():
        row = next(line for line in lines if line.startswith(m.name + " "))
        assert m.formula in row and row.endswith(m.streaming)
    assert "slerp" in r.out and "whole_tensor" in r.out and "elementwise" in r.out


@pytest.mark.parametrize("name", ["slerp", "train_difference", "extract", "linear"])
def test_methods_name_describes_one(name: str) -> None:
    from mergebuild.engine.methods import REGISTRY

    m = REGISTRY[name]
    r = run_cli("methods", name)
    assert r.code == 0, r.err
    assert r.out.startswith(m.signature())
    assert m.description.splitlines()[0] in r.out
    assert "\n".join(f"  {x}" for x in m.example.splitlines()) in r.out


def test_methods_unknown_name() -> None:
    r = run_cli("methods", "slrp")
    assert r.code == 2 and "did you mean 'slerp'" in r.err and "Traceback" not in r.err


def test_every_example_is_a_valid_recipe(tmp_path: Path) -> None:
    """Each method's example snippet, under `merges:`, loads as written."""
    from mergebuild.engine.methods import REGISTRY
    from mergebuild.recipe import load_recipe

    for m in REGISTRY.values():
        entry = yaml.safe_load(m.example)
        ((name, node),) = entry.items()
        refs = [node[f] for f in (*m.slots, m.base_name) if isinstance(node.get(f), str)]
        refs += node.get(m.models_name) or node.get("inputs") or []
        models = "".join(f"  {r}: {r}.safetensors\n" for r in dict.fromkeys(refs))
        snippet = "\n".join(f"  {line}" for line in m.example.splitlines())
        p = tmp_path / f"{m.name}.yaml"
        p.write_text(
            f"mergebuild: 1\nmodels:\n{models}merges:\n{snippet}\n"
            f"outputs:\n  o: {{from: {name}, path: o.safetensors}}\n"
        )
        recipe = load_recipe(p)
        assert recipe.nodes[name].method == m.name


def test_methods_command_does_not_import_torch() -> None:
    code = (
        "import sys; from mergebuild.cli import main; "
        "assert main(['methods']) == 0; assert main(['methods', 'slerp']) == 0; "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    p = subprocess.run(
        [sys.executable, "-c", code],
        env={"PYTHONPATH": str(SRC), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
    )
    assert p.returncode == 0, p.stderr
    assert "slerp" in p.stdout


def test_extract_rebuilds_a_recipe_with_expression_calls(workdir: Path, tmp_path: Path) -> None:
    """`mergebuild extract` turns the anonymous `m/1` into a valid name and the same tensors."""
    merges = "  m: slerp(anything, insta, 0.3) * 0.5 + sd15 * 0.5\n"
    recipe = write_recipe(workdir, merges, "  o: {from: m, path: out/o.safetensors}")
    assert run_cli(recipe, "-q", cache=tmp_path / "c").code == 0
    extracted = tmp_path / "x" / "recipe.yaml"
    r = run_cli("extract", workdir / "out" / "o.safetensors", "-o", extracted)
    assert r.code == 0, r.err
    doc = yaml.safe_load(extracted.read_text())
    hidden = [n for n in doc["merges"] if n != "m"]  # `m/1` made a safe identifier
    assert len(hidden) == 1 and doc["merges"][hidden[0]]["method"] == "slerp", doc
    assert "/" not in hidden[0]
    b = run_cli(extracted, "--json", "--models", workdir / "models", cache=tmp_path / "c2")
    assert b.code == 0, b.err
    rebuilt = load_st(Path(next(n for n in b.json["nodes"] if n["kind"] == "output")["path"]))
    first = load_st(workdir / "out" / "o.safetensors")
    assert rebuilt.keys() == first.keys()
    assert all(np.array_equal(rebuilt[k], first[k]) for k in first)
