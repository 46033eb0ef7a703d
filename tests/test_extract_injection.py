"""`extract` on provenance whose strings are hostile (newlines, `\\r`, U+0085/U+2028, YAML
indicators, document markers, very long text): the extracted recipe parses back to exactly the
structure extract meant (mergebuild/models/merges/outputs, safe unique names), never to extra
keys such as `search_paths` or `include`; the CLI variants also load it with mergebuild."""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import run_cli
from mergebuild.errors import BuildError
from mergebuild.extract import NAME, OUTPUT_NAME, extract

HOSTILE = [
    "x\nsearch_paths: [/]",
    "y\r\ninclude: {x: /etc/passwd}",
    "z\u2028search_paths: [/]",
    "w\x85include: {a: /etc/passwd}",
    "v\u2029search_paths: [/]",
    "&a *a !!python/object/apply:os.system ['id'] |> %TAG @ `",
    "# not a comment",
    "k: v",
    "---\nsearch_paths: [/]\n...\n",
    "é" * 5000,
    "\x1b]0;title\x07\x1b[31m",
    "..",
    "../../etc/passwd",
    "",
    " ",
    "0digit",
    "dotted.name",
    "a..b",
    "\ufeffbom",
]
RECIPE = """mergebuild: 1
models: {a: models/insta.safetensors, b: models/wd13.safetensors, c: models/gape60.safetensors}
merges:
  m: a * 0.5 + b * 0.5
  n: {method: add_difference, a: m, b: c, c: a, alpha: 0.25}
outputs: {o: {from: n, path: out/o.safetensors, exclude: ['^model_ema[.]'], vae: b}}
"""
TOP = {"mergebuild", "models", "merges", "outputs"}


def set_metadata(path: Path, key: str, value: str) -> None:
    """Rewrite a safetensors file's `__metadata__[key]`, tensors untouched."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    header.setdefault("__metadata__", {})[key] = value
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n :])


def renamed(prov: dict[str, Any], names: dict[str, str], version: str, out: str) -> dict:
    """The provenance with models/merges renamed (references too) and hostile text around."""
    p = json.loads(json.dumps(prov))
    p["models"] = {names.get(k, k): v for k, v in p["models"].items()}
    p["merges"] = {
        names.get(k, k): {**v, "inputs": {s: names.get(r, r) for s, r in v["inputs"].items()}}
        for k, v in p["merges"].items()
    }
    p["output"]["from"] = names.get(p["output"]["from"], p["output"]["from"])
    p["output"]["vae"] = names.get(p["output"]["vae"], p["output"]["vae"])
    p["output"]["name"] = out
    p["mergebuild_version"] = version
    return p


def check_structure(text: str, comments: int) -> dict[str, Any]:
    """What any extracted recipe must be, independently of how extract built it."""
    lines = text.split("\n")
    for line in lines[:comments]:
        assert line.startswith("# ") and len(line) <= 202 and line.isprintable(), line
    assert not lines[comments].startswith("#")
    doc = yaml.safe_load(text)
    assert set(doc) == TOP and doc["mergebuild"] == 1
    names = [*doc["models"], *doc["merges"]]
    assert len(set(names)) == len(names)
    for n in names:
        assert NAME.fullmatch(n) and len(n) <= 80, n
    for m in doc["models"].values():
        assert m == {} or (set(m) == {"sha256"} and re.fullmatch("[0-9a-f]{64}", m["sha256"]))
    for entry in doc["merges"].values():
        refs = entry.get("inputs") or [entry[s] for s in ("a", "b", "c") if s in entry]
        assert refs and all(r in names for r in refs)
    [(oname, out)] = doc["outputs"].items()
    assert OUTPUT_NAME.fullmatch(oname) and out["path"] == f"{oname}.safetensors"
    assert "/" not in out["path"] and out["from"] in names
    assert out.get("vae") is None or out["vae"] in doc["models"]
    return doc


@pytest.fixture(scope="module")
def built_once(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> bytes:
    """RECIPE's output, built once for the module (each build costs seconds of imports)."""
    work = tmp_path_factory.mktemp("extract")
    (work / "models").symlink_to(model_dir)
    (work / "r.yaml").write_text(RECIPE)
    assert run_cli(work / "r.yaml", "-q", cache=work / "c").code == 0
    return (work / "out/o.safetensors").read_bytes()


def built_in(workdir: Path, data: bytes) -> Path:
    """RECIPE and its built output in workdir, as if it had just been built there."""
    (workdir / "r.yaml").write_text(RECIPE)
    built = workdir / "out/o.safetensors"
    built.parent.mkdir(exist_ok=True)
    built.write_bytes(data)
    return built


@pytest.mark.parametrize("start", [0, 5, 10, 14])
def test_extract_cli_with_hostile_names(
    workdir: Path, tmp_path: Path, built_once: bytes, start: int
) -> None:
    built = built_in(workdir, built_once)
    raw = built.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    prov = json.loads(json.loads(raw[8 : 8 + n])["__metadata__"]["mergebuild"])
    h = [HOSTILE[(start + i) % len(HOSTILE)] for i in range(7)]
    # names that collide once made safe: "x\n…" and "x_…" must stay two different models
    names = {"a": h[0], "b": h[1], "c": h[2], "m": h[3], "n": h[4]}
    if start == 0:
        names["c"] = re.sub("[^A-Za-z0-9_]", "_", h[0])
    hostile = built.with_name("hostile.safetensors")
    hostile.write_bytes(raw)
    set_metadata(hostile, "mergebuild", json.dumps(renamed(prov, names, h[5], h[6])))
    out = tmp_path / "x" / "r.yaml"
    r = run_cli("extract", hostile, "-o", out)
    assert r.code == 0, r.err
    text = out.read_text()
    doc = check_structure(text, 2)
    assert not re.search(r"^(search_paths|include|---|\.\.\.)", text, re.M)
    assert len(doc["models"]) == 3 and len(doc["merges"]) == 2
    # the same pins as the original provenance, under the safe names
    assert sorted(m["sha256"] for m in doc["models"].values()) == sorted(
        m["sha256"] for m in prov["models"].values()
    )
    # mergebuild loads it and finds every pinned input (a dry run: nothing is written)
    d = run_cli(out, "-n", "--json", "--models", workdir / "models", cache=tmp_path / "c")
    assert d.code == 0, d.err
    assert sorted(d.json["models"]) == sorted(doc["models"])


def test_extract_cli_bad_sha256_is_dropped_with_a_warning(workdir: Path, built_once: bytes) -> None:
    built = built_in(workdir, built_once)
    raw = built.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    prov = json.loads(json.loads(raw[8 : 8 + n])["__metadata__"]["mergebuild"])
    good = prov["models"]["b"]["sha256"]
    prov["models"]["a"]["sha256"] = "00\nsearch_paths: [/]"
    prov["models"]["b"]["sha256"] = good.upper()  # still 64 hex: kept, lowercased
    prov["models"]["c"]["sha256"] = 12
    set_metadata(built, "mergebuild", json.dumps(prov))
    r = run_cli("extract", built)
    assert r.code == 1 and "models.c.sha256" in r.err  # not a string: malformed
    prov["models"]["c"]["sha256"] = "g" * 64
    set_metadata(built, "mergebuild", json.dumps(prov))
    r = run_cli("extract", built)
    assert r.code == 0, r.err
    assert r.err.count("warning:") == 2 and "model 'a'" in r.err and "model 'c'" in r.err
    doc = check_structure(r.out, 4)
    assert doc["models"] == {"a": {}, "b": {"sha256": good}, "c": {}}
    assert not re.search(r"^(search_paths|include|---|\.\.\.)", r.out, re.M)


# -- property: arbitrary text in every string field --------------------------------------------

text = st.one_of(
    st.text(max_size=40),
    st.sampled_from(HOSTILE),
    st.builds(lambda a, b: a + b, st.sampled_from(HOSTILE), st.text(max_size=10)),
)
dtypes = st.sampled_from(["auto", "fp16", "bf16", "float32"])
number = st.floats(allow_nan=False, allow_infinity=False, min_value=-2, max_value=2)


@st.composite
def provenances(draw: st.DrawFn) -> dict[str, Any]:
    names = draw(st.lists(text, min_size=2, max_size=6, unique=True))
    split = draw(st.integers(1, len(names) - 1))
    model_names, merge_names = names[:split], names[split:]
    if draw(st.integers(0, 19)) == 0:  # now and then a merge named like a model: refused
        merge_names.append(model_names[0])

    def dtype() -> str:  # hostile one time in ten: most examples should get through
        return draw(text) if draw(st.integers(0, 9)) == 0 else draw(dtypes)

    models = {
        n: {"sha256": draw(st.one_of(st.just("ab" * 32), text)), "size": 1} for n in model_names
    }
    merges: dict[str, Any] = {}
    for i, n in enumerate(merge_names):
        pool = [*model_names, *merge_names[:i]]  # earlier merges only: acyclic
        a, b = draw(st.sampled_from(pool)), draw(st.sampled_from(pool))
        alpha = draw(st.one_of(number, text, st.dictionaries(text, number, max_size=2)))
        merges[n] = {
            "method": "weighted_sum",
            "inputs": {"a": a, "b": b},
            "params": {"alpha": alpha},
            "dtype": dtype(),
        }
    output = {
        "name": draw(text),
        "from": draw(st.sampled_from([*merge_names, *model_names])),
        "dtype": draw(st.one_of(st.none(), st.builds(dtype))),
        "exclude": draw(st.lists(text, max_size=2)),
    }
    if draw(st.booleans()):
        output["vae"] = draw(st.sampled_from(model_names))
    return {
        "format": 2,
        "mergebuild_version": draw(text),
        "output": output,
        "models": models,
        "merges": merges,
    }


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(provenances())
def test_extract_reparses_to_exactly_what_it_meant(prov: dict[str, Any]) -> None:
    names_clash = set(prov["models"]) & set(prov["merges"])
    try:
        result = extract(prov)
    except BuildError as e:
        # refused only for what the provenance structurally gets wrong, in one line
        assert "\n" not in str(e)
        assert names_clash or "dtype" in str(e) or "the provenance is malformed" in str(e)
        return
    assert not names_clash
    text = result.text()
    doc = check_structure(text, len(result.comments))
    assert doc == result.doc  # exactly the structure extract built, nothing more
    # every model and merge of the provenance is there once, under its own safe name
    assert len(doc["models"]) == len(prov["models"])
    assert len(doc["merges"]) == len(prov["merges"])
