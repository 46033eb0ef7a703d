"""Hostile `__metadata__` in inputs never breaks a build, `show` or `extract`: foreign
provenance is parsed with bounds, checked, embedded bounded (or omitted, recorded), and the
output's metadata stays strict, deterministic JSON. Files are real safetensors on disk, the CLI
a subprocess; tensors are checked against numpy."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from conftest import run_cli
from test_hostile_models import RECIPE  # the same one-step merge of a hostile `a` with wd13

SHA = "ab" * 32


def metadata_of(path: Path) -> dict[str, str]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]).get("__metadata__", {})


def strict_json(text: str) -> Any:
    """json.loads that refuses what is not JSON (NaN, Infinity) and deep recursion."""

    def refuse(token: str) -> Any:
        raise ValueError(token)

    return json.loads(text, parse_constant=refuse)


def with_metadata(workdir: Path, meta: dict[str, str], name: str = "a") -> Path:
    """models/<name>.safetensors: insta's tensors with `meta` as its header metadata."""
    dst = workdir / "models" / f"{name}.safetensors"
    save_file(load_file(str(workdir / "models/insta.safetensors")), str(dst), metadata=meta)
    return dst


def prov(models: dict[str, Any], merges: dict[str, Any], source: str = "m") -> dict[str, Any]:
    return {
        "format": 2,
        "mergebuild_version": "0.1.0",
        "output": {"name": "o", "from": source, "dtype": "auto"},
        "models": models,
        "merges": merges,
    }


def copy_of(src: str) -> dict[str, Any]:
    return {"method": "copy", "inputs": {"a": src}, "params": {}, "dtype": "auto"}


def chain(generations: int, blob: dict[int, str] | None = None) -> dict[str, Any]:
    """Valid provenance nesting `generations` levels: each level's model x was itself built;
    `blob[level]` puts a large string into that level (1 = the outermost)."""
    p: dict[str, Any] = prov({"x": {"sha256": SHA, "size": 1}}, {"m": copy_of("x")})
    for level in range(generations, 0, -1):
        if blob and level in blob:
            p["output"]["note"] = blob[level]
        if level > 1:
            p = prov({"x": {"sha256": SHA, "size": 1, "provenance": p}}, {"m": copy_of("x")})
    return p


def generations_in(p: dict[str, Any]) -> tuple[int, Any]:
    """How many provenance levels nest (following model `x`/`a`), and the deepest entry."""
    depth, entry = 0, None
    while isinstance(p, dict):
        depth += 1
        entry = next(iter(p["models"].values()))
        p = entry.get("provenance")
    return depth, entry


# What each hostile value did before: "unexpected ValueError" (1e400 → inf → Infinity),
# RecursionError (deep brackets), AttributeError/TypeError (wrong shapes). Expected now: the
# build passes; `mergebuild` records why an input's provenance was left out.
HOSTILE: list[tuple[str, dict[str, str], str | None]] = [
    ("recipe-1e400", {"sd_merge_recipe": '{"multiplier": 1e400}'}, None),
    ("recipe-deep", {"sd_merge_recipe": "[" * 100_000 + "]" * 100_000}, None),
    ("models-list", {"sd_merge_models": "[1, 2]"}, None),
    ("models-inf", {"sd_merge_models": '{"x": {"m": -1e999}}'}, None),
    ("prov-deep", {"mergebuild": "[" * 100_000 + "]" * 100_000}, "bounded JSON"),
    ("prov-deep-dict", {"mergebuild": '{"a":' * 50_000 + "1" + "}" * 50_000}, "bounded JSON"),
    (
        "prov-1e400",
        {"mergebuild": json.dumps(chain(1)).replace('"size": 1', '"size": 1e400')},
        "bounded JSON",
    ),
    ("prov-nan", {"mergebuild": '{"format": 2, "x": NaN}'}, "bounded JSON"),
    ("prov-surrogate", {"mergebuild": '{"format": 2, "x": "\\ud800"}'}, "bounded JSON"),
    ("prov-truncated", {"mergebuild": '{"format": 2, "models": {'}, "bounded JSON"),
    (
        "prov-wrong-types",
        {"mergebuild": '{"format": 2, "models": [1], "merges": "x"}'},
        "malformed",
    ),
    ("prov-list", {"mergebuild": "[1, 2, 3]"}, "malformed"),
    ("prov-format-str", {"mergebuild": json.dumps({**chain(1), "format": "2"})}, "malformed"),
    (
        "prov-merge-inputs-list",
        {"mergebuild": json.dumps(prov({}, {"m": {"method": "copy", "inputs": ["x"]}}))},
        "malformed",
    ),
    (
        "prov-and-webui-wrong",
        {"mergebuild": "7", "sd_merge_recipe": "{", "sd_merge_models": "null"},
        "bounded JSON",
    ),
]


@pytest.fixture(scope="module")
def hostile_built(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> tuple[Path, Any]:
    """Every HOSTILE input in one recipe, one merge and output each (input `hI` merged with
    wd13 into out/oI): one build, whose imports cost seconds, serves every case."""
    work = tmp_path_factory.mktemp("hostile")
    (work / "models").symlink_to(model_dir)
    insta = load_file(str(model_dir / "insta.safetensors"))
    models, merges, outputs = ["  b: models/wd13.safetensors"], [], []
    for i, (_, meta, _) in enumerate(HOSTILE):
        (work / "in").mkdir(exist_ok=True)
        save_file(insta, str(work / "in" / f"h{i}.safetensors"), metadata=meta)
        models.append(f"  h{i}: in/h{i}.safetensors")
        merges.append(f"  m{i}: h{i} * 0.5 + b * 0.5")
        outputs.append(f"  o{i}: {{from: m{i}, path: out/o{i}.safetensors}}")
    recipe = work / "r.yaml"
    recipe.write_text(
        "\n".join(["mergebuild: 1", "models:", *models, "merges:", *merges, "outputs:", *outputs])
        + "\n"
    )
    return work, run_cli(recipe, "-q", cache=work / "cache")


def test_hostile_metadata_never_breaks_the_build(
    hostile_built: tuple[Path, Any], model_dir: Path
) -> None:
    work, r = hostile_built
    assert r.code == 0, r.err
    assert "unexpected" not in r.err and "Traceback" not in r.err
    y, half = load_st(model_dir / "wd13.safetensors"), np.float32(0.5)
    for i, (case, _, omitted) in enumerate(HOSTILE):
        out = work / "out" / f"o{i}.safetensors"
        # the tensors are the merge, whatever the metadata said (independent numpy computation)
        got, x = load_st(out), load_st(work / "in" / f"h{i}.safetensors")
        for k in (
            "model.diffusion_model.out.2.weight",
            "cond_stage_model.transformer.text_model.final_layer_norm.bias",
        ):
            want = x[k].astype(np.float32) * half + y[k].astype(np.float32) * half
            assert np.array_equal(got[k], want.astype(np.float16)), (case, k)
        # every metadata value the output carries is strict JSON, and says what was left out
        values = {k: strict_json(v) for k, v in metadata_of(out).items()}
        entry = values["mergebuild"]["models"][f"h{i}"]
        if omitted is None:
            assert "provenance_omitted" not in entry, case
        else:
            assert omitted in entry["provenance_omitted"] and "provenance" not in entry, case
        assert len(json.dumps(values)) < 64 << 10, case


@pytest.mark.parametrize("i", range(len(HOSTILE)), ids=[c[0] for c in HOSTILE])
def test_hostile_metadata_never_breaks_show_extract(
    hostile_built: tuple[Path, Any], i: int
) -> None:
    work, built = hostile_built
    assert built.code == 0, built.err
    a, out = work / "in" / f"h{i}.safetensors", work / "out" / f"o{i}.safetensors"
    cache, omitted = work / "c", HOSTILE[i][2]
    # show: exit 0; extract: exit 1 with one message (the input carries no usable provenance)
    s = run_cli("show", a, cache=cache)
    assert s.code == 0 and "Traceback" not in s.err, s.err
    e = run_cli("extract", a)
    assert e.code == 1 and "Traceback" not in e.err and "unexpected" not in e.err
    assert "provenance" in e.err
    # show on the output lists the omission under the input
    text = run_cli("show", out, cache=cache).out
    assert ("provenance omitted" in text) == (omitted is not None)


def test_hostile_input_output_is_deterministic(workdir: Path, tmp_path: Path) -> None:
    """Several hostile fields at once; -j 1 and -j 2, two caches: the same bytes, and `show
    --json` is strict JSON."""
    meta = {k: v for _, m, _ in HOSTILE[:4] for k, v in m.items()}
    meta["mergebuild"] = json.dumps(chain(12, {3: "q" * 100_000}))
    a = with_metadata(workdir, meta)
    recipe = workdir / "r.yaml"
    recipe.write_text(RECIPE)
    out = workdir / "out/o.safetensors"
    digests = []
    for jobs in ("1", "2"):
        r = run_cli(recipe, "-q", "-j", jobs, cache=tmp_path / f"c{jobs}")
        assert r.code == 0, r.err
        digests.append(hashlib.sha256(out.read_bytes()).hexdigest())
    assert digests[0] == digests[1]
    sj = run_cli("show", a, "--json", cache=tmp_path / "c1")
    assert sj.code == 0, sj.err
    assert strict_json(sj.out)["sha256"] == hashlib.sha256(a.read_bytes()).hexdigest()


def load_st(path: Path) -> dict:
    return load_file(str(path))


MALFORMED: list[tuple[str, Any, str]] = [
    ("models-list", {**prov({}, {}), "models": [1]}, "models"),
    ("merges-string", {**prov({"x": {"sha256": SHA}}, {}), "merges": "x"}, "merges"),
    ("output-missing", {k: v for k, v in prov({}, {}).items() if k != "output"}, "output"),
    ("output-from-int", {**prov({}, {}), "output": {"name": "o", "from": 3}}, "output.from"),
    (
        "inputs-list",
        prov({"x": {"sha256": SHA}}, {"m": {"method": "copy", "inputs": ["x"]}}),
        "merges.m.inputs",
    ),
    (
        "params-list",
        prov({"x": {"sha256": SHA}}, {"m": {**copy_of("x"), "params": [1]}}),
        "merges.m.params",
    ),
    (
        "size-string",
        prov({"x": {"sha256": SHA, "size": "1"}}, {"m": copy_of("x")}),
        "models.x.size",
    ),
    ("unknown-input", prov({"x": {"sha256": SHA}}, {"m": copy_of("nope")}), "merges.m.inputs"),
    ("self-cycle", prov({"x": {"sha256": SHA}}, {"m": copy_of("m")}), "cycle"),
    ("two-cycle", prov({}, {"m": copy_of("n"), "n": copy_of("m")}), "cycle"),
    ("name-clash", prov({"m": {"sha256": SHA}}, {"m": copy_of("m")}), "a model and a merge"),
    (
        "bad-slot",
        prov({"x": {"sha256": SHA}}, {"m": {"method": "copy", "inputs": {"zz": "x"}}}),
        "merges.m.inputs",
    ),
    (
        "bad-param",
        prov({"x": {"sha256": SHA}}, {"m": {**copy_of("x"), "params": {"method": "x"}}}),
        "not a parameter",
    ),
    (
        "bad-dtype",
        prov({"x": {"sha256": SHA}}, {"m": {**copy_of("x"), "dtype": "fp8\nx: 1"}}),
        "unknown dtype",
    ),
    (
        "vae-unknown",
        {
            **prov({"x": {"sha256": SHA}}, {"m": copy_of("x")}),
            "output": {"name": "o", "from": "m", "vae": "zz"},
        },
        "output.vae",
    ),
    (
        "components-bad",
        {
            **prov({"x": {"sha256": SHA}}, {"m": copy_of("x")}),
            "output": {"name": "o", "from": "m", "components": ["unet\nsearch_paths: [/]"]},
        },
        "output.components",
    ),
]


@pytest.mark.parametrize("p,named", [c[1:] for c in MALFORMED], ids=[c[0] for c in MALFORMED])
def test_malformed_provenance_show_extract_and_build(
    workdir: Path, cache: Path, p: Any, named: str
) -> None:
    a = with_metadata(workdir, {"mergebuild": json.dumps(p)})
    e = run_cli("extract", a)
    assert e.code == 1 and "Traceback" not in e.err and "unexpected" not in e.err, e.err
    assert "malformed" in e.err and named in e.err, e.err
    assert len(e.err.strip().splitlines()) == 1  # one message, foreign newlines stripped
    s = run_cli("show", a, cache=cache)
    assert s.code == 0 and "Traceback" not in s.err, s.err
    assert "Traceback" not in s.out and len(s.out.splitlines()) < 40


def test_cyclic_and_shared_provenance_show_terminates(workdir: Path, cache: Path) -> None:
    # 60 merges each using the previous one twice: 2**60 paths if walked as a tree
    merges = {
        "n0": {"method": "weighted_sum", "inputs": {"a": "x", "b": "x"}, "params": {"alpha": 0.5}}
    }
    for i in range(1, 60):
        merges[f"n{i}"] = {
            "method": "weighted_sum",
            "inputs": {"a": f"n{i - 1}", "b": f"n{i - 1}"},
            "params": {"alpha": 0.5},
        }
    shared = prov({"x": {"sha256": SHA, "size": 1}}, merges, source="n59")
    # a model whose nested provenance "is itself": the same sha256 all the way down, and a
    # merge cycle inside the nested provenance
    inner = prov({"x": {"sha256": SHA}}, {"m": copy_of("m")})
    selfref = prov({"x": {"sha256": SHA, "provenance": inner}}, {"m": copy_of("x")})
    for p, most in ((shared, 200), (selfref, 20), (chain(30), 200)):
        a = with_metadata(workdir, {"mergebuild": json.dumps(p)})
        s = run_cli("show", a, cache=cache, timeout=60)
        assert s.code == 0 and "Traceback" not in s.err, s.err
        lines = s.out.splitlines()
        assert len(lines) < most, len(lines)
    a = with_metadata(workdir, {"mergebuild": json.dumps(shared)})
    out = run_cli("show", a, cache=cache).out
    assert out.count("(see above)") == 60 and "n0 = weighted_sum(a=x, b=x, alpha=0.5)" in out
    # extract of the shared DAG is a valid recipe: every node once
    e = run_cli("extract", a, "-o", workdir / "x.yaml")
    assert e.code == 0, e.err
    d = run_cli(workdir / "x.yaml", "-n", "--models", workdir / "models", cache=cache)
    assert d.code == 1 and SHA in d.err, d.err  # the recipe loads; its pinned input is missing


def test_nested_provenance_is_cut_to_eight_generations(workdir: Path, cache: Path) -> None:
    with_metadata(workdir, {"mergebuild": json.dumps(chain(20))})
    recipe = workdir / "r.yaml"
    recipe.write_text(RECIPE)
    assert run_cli(recipe, "-q", cache=cache).code == 0
    out = workdir / "out/o.safetensors"
    p = strict_json(metadata_of(out)["mergebuild"])
    depth, deepest = generations_in(p)
    assert depth == 1 + 8  # the output's own record, then 8 nested generations
    assert "deeper" in deepest["provenance_omitted"]
    # the output as an input again: still 8 generations, the header does not grow
    size = len(metadata_of(out)["mergebuild"])
    (workdir / "models/a.safetensors").write_bytes(out.read_bytes())
    assert run_cli(recipe, "-q", cache=cache).code == 0
    again = metadata_of(out)["mergebuild"]
    assert generations_in(strict_json(again))[0] == 9
    assert len(again) < 2 * size


def test_large_provenance_is_cut_or_omitted_by_size(workdir: Path, cache: Path) -> None:
    recipe = workdir / "r.yaml"
    recipe.write_text(RECIPE)
    out = workdir / "out/o.safetensors"
    # 300 KB in the 4th level: the first three are kept, the 3rd's input records the cut
    with_metadata(workdir, {"mergebuild": json.dumps(chain(5, {4: "z" * 300_000}))})
    assert run_cli(recipe, "-q", cache=cache).code == 0
    depth, deepest = generations_in(strict_json(metadata_of(out)["mergebuild"]))
    assert depth == 1 + 3 and "deeper" in deepest["provenance_omitted"]
    # 300 KB at the top level of the input's provenance: omitted as too large
    with_metadata(workdir, {"mergebuild": json.dumps(chain(2, {1: "z" * 300_000}))})
    assert run_cli(recipe, "-q", cache=cache).code == 0
    meta = metadata_of(out)
    entry = strict_json(meta["mergebuild"])["models"]["a"]
    assert "larger than 256 KiB" in entry["provenance_omitted"]
    # web UI fields too large to carry over are left out, with a warning
    big = {"sd_merge_recipe": json.dumps({"x": "y" * 300_000})}
    with_metadata(workdir, big)
    r = run_cli(recipe, "-q", cache=cache)
    assert r.code == 0 and "sd_merge_recipe is larger than" in r.err
    assert sum(len(v) for v in metadata_of(out).values()) < 64 << 10


@pytest.mark.parametrize(
    "text,why",
    [
        ('{"a": 1e400}', "out of range"),
        ("[-1e309]", "out of range"),
        ('{"a": NaN}', "NaN"),
        ("[Infinity]", "Infinity"),
        ("[" * 129 + "]" * 129, "nested deeper"),
        ('{"a":' * 129 + "1" + "}" * 129, "nested deeper"),
        ("[" + "[]," * 100_000 + "[]]", "arrays and objects"),
        ('["' + "x" * (2 << 20) + '"]', "larger than"),
        ('["\\udc00"]', "surrogates"),
        ("[1] [2]", "Extra data"),
    ],
)
def test_parse_foreign_json_bounds(text: str, why: str) -> None:
    from mergebuild.provenance import parse_foreign_json

    with pytest.raises(ValueError, match=why):
        parse_foreign_json(text)


def test_parse_foreign_json_accepts_what_is_within_bounds() -> None:
    from mergebuild.provenance import json_depth, parse_foreign_json

    # brackets inside strings (escaped quotes too) do not count as nesting
    text = '{"a": "[[[[\\"[[[[", "b": ' + "[" * 120 + '"]]]]"' + "]" * 120 + "}"
    assert json_depth("[" * 130 + "]" * 130) == 130
    assert json_depth(text) == 121
    value = parse_foreign_json(text)
    assert value["a"] == '[[[["[[[['
    assert parse_foreign_json("[1e308, -0.0, 12345678901234567890]") == [
        1e308,
        -0.0,
        12345678901234567890,
    ]
