"""Sweeps: `sweep:` expands into member nodes; members build like hand-written nodes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import load_st, run_cli
from mergebuild.errors import RecipeError
from mergebuild.recipe import load_recipe

MODELS = """\
mergebuild: 1
models:
  anything: models/anything-v3.safetensors
  nai_full: models/nai-full.safetensors
  nai_sfw: models/nai-sfw.safetensors
  insta: models/insta.safetensors
  wd13: models/wd13.safetensors
merges:
"""  # merges start on line 9


def recipe(tmp: Path, merges: str, outputs: str, name: str = "r.yaml") -> Path:
    path = tmp / name
    path.write_text(MODELS + merges + "outputs:\n" + outputs)
    return path


def load(tmp: Path, merges: str, outputs: str, *sets: str):
    return load_recipe(recipe(tmp, merges, outputs), list(sets))


# -- expansion ------------------------------------------------------------------------------


def test_list_range_product_and_names(tmp_path: Path) -> None:
    r = load(
        tmp_path,
        "  nsfw:\n"
        "    expr: anything + (nai_full - nai_sfw) * alpha\n"
        "    sweep: {alpha: [0.25, 0.5, 1]}\n"
        "  mix:\n"
        "    method: weighted_sum\n"
        "    a: insta\n"
        "    b: wd13\n"
        "    sweep: {alpha: {range: [0.1, 0.9, 0.2]}}\n"
        "  grid: {method: weighted_sum, a: insta, sweep: {alpha: [0, 1], b: [wd13, anything]}}\n",
        '  nsfw: {from: nsfw, path: "out/nsfw-{alpha}.safetensors"}\n'
        '  mix: {from: mix, path: "out/mix-{alpha:.2f}.safetensors"}\n',
    )
    assert r.node_members["nsfw"] == ["nsfw[alpha=0.25]", "nsfw[alpha=0.5]", "nsfw[alpha=1]"]
    # exact decimal steps: never 0.30000000000000004 or 0.7000000000000001
    assert r.node_members["mix"] == [f"mix[alpha={v}]" for v in ("0.1", "0.3", "0.5", "0.7", "0.9")]
    assert r.nodes["mix[alpha=0.7]"].params["alpha"] == 0.7
    # product: first key slowest; a swept input names the model
    assert r.node_members["grid"] == [
        "grid[alpha=0,b=wd13]",
        "grid[alpha=0,b=anything]",
        "grid[alpha=1,b=wd13]",
        "grid[alpha=1,b=anything]",
    ]
    assert r.nodes["grid[alpha=1,b=anything]"].inputs == {"a": "insta", "b": "anything"}
    # an expression member lowers to the node written by hand with that number
    e = r.nodes["nsfw[alpha=0.25]"]
    assert (e.method, e.params, e.inputs) == (
        "add_difference",
        {"alpha": 0.25},
        {"a": "anything", "b": "nai_full", "c": "nai_sfw"},
    )
    paths = {n: o.path.name for n, o in r.outputs.items()}
    assert paths["nsfw[alpha=0.5]"] == "nsfw-0.5.safetensors"
    assert paths["mix[alpha=0.1]"] == "mix-0.10.safetensors"
    assert r.output_members["mix"] == [
        f"mix[alpha={v}]" for v in ("0.1", "0.3", "0.5", "0.7", "0.9")
    ]
    assert r.select_outputs(["nsfw"]) == r.output_members["nsfw"]


@pytest.mark.parametrize(
    ("spec", "spelled"),
    [
        (
            "{range: [0, 1, 0.1]}",
            ["0", "0.1", "0.2", "0.3", "0.4", "0.5", "0.6", "0.7", "0.8", "0.9", "1"],
        ),
        ("{range: [1, 0, -0.25]}", ["1", "0.75", "0.5", "0.25", "0"]),
        ("{range: [0.1, 0.35, 0.1]}", ["0.1", "0.2", "0.3"]),  # stop not reached: not included
        (
            "{range: [0, 1, 0.333333333333]}",
            ["0", "0.333333333333", "0.666666666666", "0.999999999999"],
        ),
        ("{range: [0.5, 0.5, 0.1]}", ["0.5"]),
        ("[1e-3, 0.30, -2, 1.0e1]", ["0.001", "0.3", "-2", "10"]),
    ],
)
def test_value_spelling(tmp_path: Path, spec: str, spelled: list[str]) -> None:
    r = load(
        tmp_path,
        f"  s: {{expr: 'insta * (1 - t) + wd13 * t', sweep: {{t: {spec}}}}}\n",
        '  s: {from: s, path: "out/s-{t}.safetensors"}\n',
    )
    assert r.node_members["s"] == [f"s[t={v}]" for v in spelled]
    for v in spelled:
        if v not in ("0", "1"):  # 0 and 1 lower to a copy of one model
            assert r.nodes[f"s[t={v}]"].params["alpha"] == float(v)
        assert r.outputs[f"s[t={v}]"].path.name == f"s-{v}.safetensors"


def test_int_range_stays_int(tmp_path: Path) -> None:
    r = load(
        tmp_path,
        "  d: {method: dare, base: anything, models: [insta, wd13],\n"
        "      sweep: {seed: {range: [1, 3, 1]}}}\n",
        '  d: {from: d, path: "out/d-{seed}.safetensors"}\n',
    )
    assert [r.nodes[m].params["seed"] for m in r.node_members["d"]] == [1, 2, 3]


def test_zip_pairs_and_downstream_follows(tmp_path: Path) -> None:
    r = load(
        tmp_path,
        "  z: {method: sum_twice, a: anything, b: insta, c: wd13,\n"
        "      sweep: {alpha: [0.1, 0.2], beta: [0.3, 0.4], zip: true}}\n"
        "  n: {expr: 'anything + (nai_full - nai_sfw) * k', sweep: {k: [0.5, 1]}}\n"
        "  prod: z * 0.5 + n * 0.5\n"
        "  pair: {method: weighted_sum, a: z, b: n, alpha: 0.5, sweep: {zip: true}}\n"
        "  diamond: {method: weighted_sum, a: prod, b: z, alpha: 0.5}\n",
        '  pair: {from: pair, path: "out/pair-{alpha}-{k}.safetensors"}\n',
    )
    assert r.node_members["z"] == ["z[alpha=0.1,beta=0.3]", "z[alpha=0.2,beta=0.4]"]
    assert len(r.node_members["prod"]) == 4  # product of 2 × 2
    assert r.node_members["pair"] == [
        "pair[alpha=0.1,beta=0.3,k=0.5]",
        "pair[alpha=0.2,beta=0.4,k=1]",
    ]
    assert r.nodes["pair[alpha=0.2,beta=0.4,k=1]"].inputs == {
        "a": "z[alpha=0.2,beta=0.4]",
        "b": "n[k=1]",
    }
    # z reached twice (directly and through prod) is one sweep: 4 members, each consistent
    assert len(r.node_members["diamond"]) == 4
    for m in r.node_members["diamond"]:
        node = r.nodes[m]
        z_in = node.inputs["b"]
        assert z_in in r.nodes[node.inputs["a"]].inputs.values()


def test_same_param_in_two_sweeps_is_qualified(tmp_path: Path) -> None:
    r = load(
        tmp_path,
        "  a1: {method: weighted_sum, a: anything, b: insta, sweep: {alpha: [0.2, 0.4]}}\n"
        "  a2: {method: weighted_sum, a: anything, b: wd13, sweep: {alpha: [0.6]}}\n"
        "  both: a1 * 0.5 + a2 * 0.5\n",
        '  both: {from: both, path: "out/both-{a1.alpha}-{a2.alpha}.safetensors"}\n',
    )
    assert r.node_members["both"] == [
        "both[a1.alpha=0.2,a2.alpha=0.6]",
        "both[a1.alpha=0.4,a2.alpha=0.6]",
    ]
    assert r.outputs["both[a1.alpha=0.4,a2.alpha=0.6]"].path.name == "both-0.4-0.6.safetensors"


def test_swept_preset_and_block_weights(tmp_path: Path) -> None:
    r = load(
        tmp_path,
        "  mix: {method: weighted_sum, a: insta, b: wd13,\n"
        "        sweep: {alpha: [0.3, 0.5], preset: [GRAD_V, COSINE]}}\n"
        "  hand: {method: weighted_sum, a: insta, b: wd13, alpha: {preset: COSINE, base: 0.5}}\n"
        "  wb: {method: weighted_sum, a: insta, b: wd13, sweep: {alpha: [{preset: FLAT_25},\n"
        f"      [0, {'1, ' * 12}0.5, {'0, ' * 11}0]]}}}}\n"
        "  e: {expr: 'insta * (1 - w) + wd13 * w', sweep: {w: [{preset: FLAT_25}]}}\n"
        "  base_only: {method: add_difference, a: anything, b: nai_full, c: nai_sfw,\n"
        "              alpha: 0.7, sweep: {preset: [GRAD_V]}}\n",
        "  h: {from: hand, path: out/h.safetensors}\n",
    )
    assert len(r.node_members["mix"]) == 4
    # preset swept with alpha: alpha is the curve's BASE value, as {preset: P, base: alpha}
    assert r.nodes["mix[alpha=0.5,preset=COSINE]"].params == r.nodes["hand"].params
    names = r.node_members["wb"]
    assert names[0] == "wb[alpha=FLAT_25]" and names[1].startswith("wb[alpha=blocks-")
    assert r.nodes["e[w=FLAT_25]"].params == r.nodes["wb[alpha=FLAT_25]"].params
    assert r.nodes["base_only[preset=GRAD_V]"].params["alpha"]["unet"][0] == 0.7


def test_set_on_sweep(tmp_path: Path) -> None:
    merges = "  nsfw: {expr: 'anything + (nai_full - nai_sfw) * alpha', sweep: {alpha: [0.5]}}\n"
    outs = '  o: {from: nsfw, path: "out/o-{alpha}.safetensors"}\n'
    r = load(tmp_path, merges, outs, "nsfw.sweep.alpha=[0.2, 0.4]")
    assert r.node_members["nsfw"] == ["nsfw[alpha=0.2]", "nsfw[alpha=0.4]"]
    r = load(tmp_path, merges, outs, "nsfw.sweep.alpha={range: [0, 0.2, 0.1]}")
    assert r.node_members["nsfw"] == ["nsfw[alpha=0]", "nsfw[alpha=0.1]", "nsfw[alpha=0.2]"]
    # a node without a sweep gets one from the command line (string form included)
    r = load(
        tmp_path,
        "  e: anything + (nai_full - nai_sfw) * k\n",
        '  o: {from: e, path: "out/o-{k}.safetensors"}\n',
        "e.sweep.k=[1, 2]",
    )
    assert r.output_members["o"] == ["o[k=1]", "o[k=2]"]
    with pytest.raises(RecipeError) as e:
        load(tmp_path, merges, outs, "nsfw.sweep.alpha=[]")
    assert "--set:1:1: merge 'nsfw': the sweep of 'alpha' has no values" in str(e.value)


# -- errors: file:line, once ----------------------------------------------------------------

ERRORS = [
    # a parameter or name the node does not have
    (
        "  m: {method: weighted_sum, a: insta, b: wd13, sweep: {beta: [0.1]}}\n",
        9,
        "cannot sweep 'beta': weighted_sum has no parameter or input 'beta'",
    ),
    (
        "  m: {method: add_difference, a: insta, b: wd13, c: anything, sweep: {alpah: [0.1]}}\n",
        9,
        "did you mean 'alpha'",
    ),
    (
        "  m: {method: extract, a: insta, b: wd13, c: anything, sweep: {preset: [GRAD_V]}}\n",
        9,
        "extract has several block-weight parameters (alpha, beta)",
    ),
    (
        "  m:\n    expr: anything + (nai_full - nai_sfw) * alpha\n    sweep:\n      beta: [0.1]\n",
        12,
        "the expression does not use the name 'beta' (names it leaves free: alpha)",
    ),
    (
        "  m: {expr: 'anything + (nai_full - nai_sfw) * 0.5', sweep: {anything: [0.1]}}\n",
        9,
        "'anything' is a model, not a number the expression uses",
    ),
    # empty lists and malformed sweeps
    (
        "  m:\n    method: weighted_sum\n    a: insta\n    b: wd13\n    sweep: {alpha: []}\n",
        13,
        "the sweep of 'alpha' has no values",
    ),
    (
        "  m: {method: weighted_sum, a: insta, b: wd13, sweep: [0.1, 0.2]}\n",
        9,
        "sweep is a mapping of parameter → values",
    ),
    (
        "  m: {method: weighted_sum, a: insta, b: wd13, sweep: {alpha: 0.5}}\n",
        9,
        "the sweep of 'alpha' is a list of values or {range: [start, stop, step]}",
    ),
    # ranges
    (
        "  m:\n    method: weighted_sum\n    a: insta\n    b: wd13\n    sweep:\n"
        "      alpha: {range: [0.9, 0.1, 0.2]}\n",
        14,
        "it goes down from 0.9 to 0.1, so the step must be negative (got 0.2)",
    ),
    (
        "  m: {method: weighted_sum, a: insta, b: wd13, sweep: {alpha: {range: [0, 1, -0.5]}}}\n",
        9,
        "it goes up from 0 to 1, so the step must be positive (got -0.5)",
    ),
    (
        "  m: {method: weighted_sum, a: insta, b: wd13, sweep: {alpha: {range: [0, 1, 0]}}}\n",
        9,
        "the step cannot be 0",
    ),
    (
        "  m: {method: weighted_sum, a: insta, b: wd13, sweep: {alpha: {range: [0, 1]}}}\n",
        9,
        "range of 'alpha' is [start, stop, step] (stop included): three numbers",
    ),
    # too many members
    (
        "  m: {method: weighted_sum, a: insta, b: wd13, sweep: {alpha: {range: [0, 1, 0.0001]}}}\n",
        9,
        "the range of 'alpha' (10001 values) makes the recipe more than 1000 sweep members",
    ),
    (
        "  a1: {method: weighted_sum, a: insta, b: wd13, sweep: {alpha: {range: [0, 0.3, 0.01]}}}\n"
        "  a2: {method: weighted_sum, a: wd13, b: insta, sweep: {alpha: {range: [0, 0.3, 0.01]}}}\n"
        "  both:\n    expr: a1 * 0.5 + a2 * 0.5\n",
        11,
        "merge 'both': the product of its sweeps makes the recipe more than 1000 sweep members",
    ),
    (
        "  m: {method: weighted_sum, a: insta, b: wd13, sweep: {alpha: [0, 1], preset: [GRAD_V]}}\n"
        "  n: {method: weighted_sum, a: m, b: wd13, alpha: 0.5,\n"
        "      sweep: {alpha: {range: [0, 1, 0.001]}}}\n",
        11,
        "merge 'n': 'alpha' is both given (line 10) and swept",  # reported, not counted
    ),
    # duplicate and conflicting values
    (
        "  m:\n    method: weighted_sum\n    a: insta\n    b: wd13\n    sweep:\n"
        "      alpha:\n        - 0.5\n        - 0.50\n",
        16,
        "alpha=0.5 is swept twice (line 15); each value once",
    ),
    (
        "  m:\n    method: weighted_sum\n    a: insta\n    b: wd13\n    alpha: 0.3\n"
        "    sweep: {alpha: [0.1]}\n",
        14,
        "'alpha' is both given (line 13) and swept; remove one",
    ),
    (
        "  m: {method: weighted_sum, a: insta, b: wd13, sweep: {alpha: ['a b']}}\n",
        9,
        "swept text 'a b' of 'alpha' must be a name",
    ),
    # zip
    (
        "  m:\n    method: sum_twice\n    a: insta\n    b: wd13\n    c: anything\n"
        "    sweep: {alpha: [0.1, 0.2], beta: [0.3], zip: true}\n",
        14,
        "zip: true pairs values of equal count; got alpha: 2, beta: 1",
    ),
    (
        "  m: {method: weighted_sum, a: insta, b: wd13, sweep: {alpha: [0.1, 0.2]}}\n"
        "  n: {method: weighted_sum, a: insta, b: wd13, sweep: {alpha: [0.1]}}\n"
        "  z:\n    method: weighted_sum\n    a: m\n    b: n\n    sweep: {zip: true}\n",
        15,
        "zip: true pairs sweeps of equal length; these have m: 2, n: 1 members",
    ),
    (
        "  m: {method: weighted_sum, a: insta, b: wd13, sweep: {alpha: [0.1], zip: true}}\n",
        9,
        "only one sweep to pair",
    ),
    # a value the method refuses: located at the value in the sweep, reported once
    (
        "  m:\n    method: weighted_sum\n    a: insta\n    b: wd13\n    sweep:\n"
        "      alpha: [0.1, 0.2, true]\n",
        14,
        "merge 'm[alpha=true]'",
    ),
    (
        "  m:\n    method: dare\n    base: anything\n    models: [insta]\n    sweep:\n"
        "      p: [0.5, 1.5]\n",
        14,
        "'p' of merge 'm[p=1.5]'",
    ),
    (
        "  m: {method: weighted_sum, a: insta, b: wd13, sweep: {alpha: [{preset: NOPE}]}}\n",
        9,
        "unknown block-weight preset 'NOPE'",
    ),
    (
        "  m: {expr: 'insta * (1 - w) + wd13 * w', sweep: {w: [0.5, NOPE]}}\n",
        9,
        "'w' is swept over the text 'NOPE'",
    ),
    (
        "  m: {method: weighted_sum, a: insta, b: nope, sweep: {alpha: [0.1, 0.2]}}\n",
        9,
        "unknown model 'nope'",
    ),
    # a swept input that is itself swept
    (
        "  n: {method: weighted_sum, a: insta, b: wd13, sweep: {alpha: [0.1, 0.2]}}\n"
        "  m: {method: weighted_sum, a: insta, alpha: 0.5, sweep: {b: [wd13, n]}}\n",
        10,
        "input 'b' is swept over 'n', itself swept",
    ),
    # names
    (
        "  'm[1]': {method: weighted_sum, a: insta, b: wd13, alpha: 0.5}\n",
        9,
        "'[' and ']' are reserved for sweep members",
    ),
]

TEMPLATE_ERRORS = [
    ("out/plain.safetensors", "its path must be a template that tells them apart"),
    ("out/m-{alpha}.safetensors", "gives the same file 'out/m-0.1.safetensors' for members"),
    ("out/m-{alpah}-{preset}.safetensors", "has no value for {alpah} — did you mean 'alpha'?"),
    ("out/m-{alpha!r}-{preset}.safetensors", "takes a number format like {alpha:.2f}"),
    ("out/m-{alpha:99999}-{preset}.safetensors", "takes a number format like {alpha:.2f}"),
    ("out/m-{alpha:.0f}-{preset}.safetensors", "for members [alpha=0.1,preset=GRAD_V] and"),
    ("out/m-{alpha}-{preset}.safetensors}", "Single '}' encountered"),
]


@pytest.mark.parametrize(("merges", "line", "message"), ERRORS)
def test_sweep_errors_are_located(tmp_path: Path, merges: str, line: int, message: str) -> None:
    with pytest.raises(RecipeError) as e:
        load(tmp_path, merges, "  o: {from: insta, path: out/o.safetensors}\n")
    text = str(e.value)
    assert message in text
    hits = [p for p in e.value.problems if message in p.message]
    assert len(hits) == 1, text  # once, not once per member
    assert hits[0].location is not None and hits[0].location.line == line, text
    assert hits[0].location.file.endswith("r.yaml")


@pytest.mark.parametrize(("path", "message"), TEMPLATE_ERRORS)
def test_output_template_errors(tmp_path: Path, path: str, message: str) -> None:
    merges = (
        "  m: {method: weighted_sum, a: insta, b: wd13,\n"
        "      sweep: {alpha: [0.1, 0.2], preset: [GRAD_V, COSINE]}}\n"
    )
    with pytest.raises(RecipeError) as e:
        load(tmp_path, merges, f"  o:\n    from: m\n    path: '{path}'\n")
    assert message in str(e.value)
    assert e.value.problems[0].location.line == 14, str(e.value)


def test_every_bad_sweep_is_reported(tmp_path: Path) -> None:
    with pytest.raises(RecipeError) as e:
        load(
            tmp_path,
            "  m: {method: weighted_sum, a: insta, b: wd13, sweep: {alpha: []}}\n"
            "  n: {method: weighted_sum, a: insta, b: wd13, sweep: {beta: [1]}}\n"
            "  z: {method: weighted_sum, a: m, b: n, sweep: {zip: true}}\n",  # reads bad ones
            "  o: {from: insta, path: out/o.safetensors}\n",
        )
    lines = [(p.location.line if p.location else None) for p in e.value.problems]
    assert lines == [9, 10], str(e.value)


def test_member_output_name_taken_by_hand(tmp_path: Path) -> None:
    with pytest.raises(RecipeError) as e:
        load(
            tmp_path,
            "  m: {method: weighted_sum, a: insta, b: wd13, sweep: {alpha: [0.1, 0.2]}}\n",
            "  'o[alpha=0.2]': {from: insta, path: out/x.safetensors}\n"
            '  o: {from: m, path: "out/o-{alpha}.safetensors"}\n',
        )
    assert "r.yaml:12:" in str(e.value)
    assert "output 'o[alpha=0.2]' is also a member of swept output 'o'" in str(e.value)


def test_an_included_sweep_is_named_by_member(tmp_path: Path) -> None:
    """A swept node of an included recipe: referring to it as a whole is one located error
    naming its members; one member, named in the explicit form, is a node like any other."""
    recipe(
        tmp_path,
        "  nsfw:\n    expr: anything + (nai_full - nai_sfw) * alpha\n"
        "    sweep: {alpha: [0.25, 0.5]}\n",
        '  nsfw: {from: nsfw, path: "out/nsfw-{alpha}.safetensors"}\n',
        name="base.yaml",
    )
    top = tmp_path / "top.yaml"
    head = "mergebuild: 1\ninclude: {b: base.yaml}\nmodels: {gape: models/gape60.safetensors}\n"
    tail = "outputs:\n  g: {from: g, path: out/g.safetensors}\n"
    top.write_text(head + "merges:\n  g: b.nsfw + (gape - b.nai_full) * 0.5\n" + tail)
    with pytest.raises(RecipeError) as e:
        load_recipe(top, [])
    assert "top.yaml:5:6: 'b.nsfw' is swept in the included recipe" in str(e.value)
    assert "b.nsfw[alpha=0.25], b.nsfw[alpha=0.5]" in str(e.value)
    top.write_text(
        head + 'merges:\n  g: {method: add_difference, a: "b.nsfw[alpha=0.5]", b: gape, '
        "c: b.nai_full, alpha: 0.5}\n" + tail
    )
    assert load_recipe(top, []).nodes["g"].inputs["a"] == "b.nsfw[alpha=0.5]"


def test_cap_can_be_raised(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    merges = (
        "  m: {method: weighted_sum, a: insta, b: wd13, sweep: {alpha: {range: [0, 1, 0.001]}}}\n"
    )
    outs = '  o: {from: m, path: "out/m-{alpha}.safetensors"}\n'
    with pytest.raises(RecipeError):
        load(tmp_path, merges, outs)
    monkeypatch.setenv("MERGEBUILD_SWEEP_MAX", "1001")
    r = load(tmp_path, merges, outs)
    assert len(r.nodes) == len(r.outputs) == 1001


def test_cli_error_is_one_message_and_writes_nothing(tmp_path: Path, cache: Path) -> None:
    path = recipe(
        tmp_path,
        "  m: {method: weighted_sum, a: insta, b: wd13, sweep: {alpha: [0.1, 0.2]}}\n",
        '  o: {from: m, path: "out/same.safetensors"}\n',
    )
    r = run_cli(path, cache=cache)
    assert r.code == 2
    assert "Traceback" not in r.err
    assert "r.yaml:11:" in r.err and "must be a template" in r.err
    assert not (tmp_path / "out").exists() and not cache.exists()


# -- builds ---------------------------------------------------------------------------------

SWEPT = (
    "  nsfw:\n"
    "    expr: anything + (nai_full - nai_sfw) * alpha\n"
    "    sweep: {alpha: [0.25, 0.5]}\n"
    "  mix:\n"
    "    method: weighted_sum\n"
    "    a: nsfw\n"
    "    b: insta\n"
    "    sweep: {alpha: [0.3, 0.6], zip: true}\n"
)
SWEPT_OUT = (
    '  nsfw: {from: nsfw, path: "out/nsfw-{alpha}.safetensors", dtype: fp16}\n'
    '  mix: {from: mix, path: "out/mix-{nsfw.alpha}-{mix.alpha}.safetensors", dtype: fp32}\n'
)
BY_HAND = (
    "  n025: anything + (nai_full - nai_sfw) * 0.25\n"
    "  n050: {method: add_difference, a: anything, b: nai_full, c: nai_sfw, alpha: 0.5}\n"
    "  m1: {method: weighted_sum, a: n025, b: insta, alpha: 0.3}\n"
    "  m2: {method: weighted_sum, a: n050, b: insta, alpha: 0.6}\n"
)
BY_HAND_OUT = (
    "  a: {from: n025, path: out/nsfw-0.25.safetensors, dtype: fp16}\n"
    "  b: {from: n050, path: out/nsfw-0.5.safetensors, dtype: fp16}\n"
    "  c: {from: m1, path: out/mix-0.25-0.3.safetensors, dtype: fp32}\n"
    "  d: {from: m2, path: out/mix-0.5-0.6.safetensors, dtype: fp32}\n"
)
FILES = [
    "nsfw-0.25.safetensors",
    "nsfw-0.5.safetensors",
    "mix-0.25-0.3.safetensors",
    "mix-0.5-0.6.safetensors",
]


def _copy_models(src: Path, dst: Path) -> Path:
    dst.mkdir()
    (dst / "models").symlink_to(src / "models")
    return dst


def _without_metadata(path: Path) -> tuple[dict, bytes]:
    """A safetensors file's tensor table and data bytes (its header minus __metadata__)."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    header.pop("__metadata__", None)
    return header, raw[8 + n :]


def f32(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float32)


def test_members_equal_hand_written_nodes_and_numpy(workdir: Path, tmp_path: Path) -> None:
    swept = recipe(workdir, SWEPT, SWEPT_OUT)
    r = run_cli(swept, "--json", "-j", "2", cache=tmp_path / "c1")
    assert r.code == 0, r.err
    keys = {n["name"]: n["key"] for n in r.json["nodes"] if n["kind"] != "output"}
    assert {n for n in keys if n.startswith("mix[")} == {
        "mix[nsfw.alpha=0.25,mix.alpha=0.3]",
        "mix[nsfw.alpha=0.5,mix.alpha=0.6]",
    }
    hand_dir = _copy_models(workdir, tmp_path / "hand")
    hand = recipe(hand_dir, BY_HAND, BY_HAND_OUT)
    h = run_cli(hand, "--json", "-j", "1", cache=tmp_path / "c2")  # its own cache, its own pass
    assert h.code == 0, h.err
    hkeys = {n["name"]: n["key"] for n in h.json["nodes"] if n["kind"] != "output"}
    assert keys["nsfw[alpha=0.25]"] == hkeys["n025"] and keys["nsfw[alpha=0.5]"] == hkeys["n050"]
    for f in FILES:  # provenance names the nodes: everything else is byte for byte the same
        assert _without_metadata(workdir / "out" / f) == _without_metadata(hand_dir / "out" / f)
    # numbers: numpy on the same tensors (float32 ops, the node's fp16, the output's dtype)
    files = {
        "anything": "anything-v3",
        "nai_full": "nai-full",
        "nai_sfw": "nai-sfw",
        "insta": "insta",
    }
    m = {n: load_st(workdir / "models" / f"{f}.safetensors") for n, f in files.items()}
    out = {f: load_st(workdir / "out" / f) for f in FILES}
    compared = 0
    for k, a in m["anything"].items():
        if a.dtype.kind != "f":
            continue
        for alpha, beta, nf, mf in [
            (0.25, 0.3, FILES[0], FILES[2]),
            (0.5, 0.6, FILES[1], FILES[3]),
        ]:
            n = (
                f32(a) + (f32(m["nai_full"][k]) - f32(m["nai_sfw"][k])) * np.float32(alpha)
            ).astype(np.float16)
            np.testing.assert_array_equal(out[nf][k], n, err_msg=k)
            mix = f32(n) * np.float32(1 - beta) + f32(m["insta"][k]) * np.float32(beta)
            want = mix.astype(np.float16).astype(np.float32)  # node dtype auto: fp16
            np.testing.assert_array_equal(out[mf][k], want, err_msg=k)
            compared += 1
    assert compared > 1000


def _statuses(report: dict) -> dict[str, str]:
    return {n["name"]: n["status"] for n in report["nodes"]}


def test_adding_a_value_builds_only_the_new_member(workdir: Path, cache: Path) -> None:
    path = recipe(
        workdir,
        "  nsfw:\n"
        "    expr: anything + (nai_full - nai_sfw) * alpha\n"
        "    sweep: {alpha: [0.25, 0.5]}\n"
        "  soft: {method: weighted_sum, a: nsfw, b: insta, alpha: 0.5}\n",
        '  nsfw: {from: nsfw, path: "out/nsfw-{alpha:.2f}.safetensors", dtype: fp16}\n'
        '  soft: {from: soft, path: "out/soft-{alpha}.safetensors"}\n',
    )
    first = run_cli(path, "--json", cache=cache)
    assert first.code == 0, first.err
    assert set(_statuses(first.json).values()) == {"built"}
    assert len(first.json["nodes"]) == 8  # 2 × (nsfw, soft) nodes + 2 × 2 outputs
    bigger = ("--set", "nsfw.sweep.alpha=[0.25, 0.5, 0.75]")
    dry = run_cli(path, "-n", *bigger, cache=cache)
    assert dry.code == 0, dry.err
    lines = {ln.split()[1]: ln.split()[0] for ln in dry.out.splitlines() if ln.strip()[:1] in "bc"}
    assert lines["nsfw[alpha=0.25]"] == "cached" and lines["nsfw[alpha=0.5]"] == "cached"
    assert lines["nsfw[alpha=0.75]"] == "build" and lines["soft[alpha=0.75]"] == "build"
    second = run_cli(path, "--json", *bigger, cache=cache)
    assert second.code == 0, second.err
    built = {n for n, s in _statuses(second.json).items() if s == "built"}
    assert built == {"nsfw[alpha=0.75]", "soft[alpha=0.75]"}, _statuses(second.json)
    assert sorted(p.name for p in (workdir / "out").iterdir()) == [
        "nsfw-0.25.safetensors",
        "nsfw-0.50.safetensors",
        "nsfw-0.75.safetensors",
        "soft-0.25.safetensors",
        "soft-0.5.safetensors",
        "soft-0.75.safetensors",
    ]
    # one output by its swept name builds (here: finds cached) all its members
    one = run_cli(path, "soft", "--json", cache=cache)
    assert one.code == 0, one.err
    assert {n["name"] for n in one.json["nodes"] if n["kind"] == "output"} == {
        "soft[alpha=0.25]",
        "soft[alpha=0.5]",
    }
    graph = run_cli("graph", path, cache=cache)
    assert graph.code == 0, graph.err
    assert "merge  soft[alpha=0.5]" in graph.out and "a=nsfw[alpha=0.5]" in graph.out
    shutil.rmtree(workdir / "out")


def test_members_in_one_tile_run_equal_numpy_and_the_unit_path(workdir: Path, cache: Path) -> None:
    """A sweep's members on the same inputs go out together tile by tile (sharing b − c);
    a hand-written twin that feeds another node takes the unit-by-unit path: both equal
    numpy bit for bit, and only the members that really hold an inf report it."""
    from safetensors.numpy import save_file

    full = load_st(workdir / "models" / "nai-full.safetensors")
    key = max((k for k, v in full.items() if v.dtype.kind == "f"), key=lambda k: full[k].size)
    poisoned = full[key].copy()
    poisoned.flat[17] = np.inf
    save_file({**full, key: poisoned}, str(workdir / "models" / "nai-inf.safetensors"))
    path = workdir / "tiles.yaml"
    path.write_text(
        "mergebuild: 1\nmodels:\n"
        "  anything: models/anything-v3.safetensors\n"
        "  nai_inf: models/nai-inf.safetensors\n"
        "  nai_sfw: models/nai-sfw.safetensors\n"
        "  insta: models/insta.safetensors\n"
        "merges:\n"
        "  nsfw: {method: add_difference, a: anything, b: nai_inf, c: nai_sfw,\n"
        "         sweep: {alpha: [0, 0.5, 2]}}\n"
        "  twin: {method: add_difference, a: anything, b: nai_inf, c: nai_sfw, alpha: 0.5}\n"
        "  soft: {method: weighted_sum, a: twin, b: insta, alpha: 0.5}\n"
        "  mix: {method: weighted_sum, a: anything, b: insta, sweep: {alpha: [0, 0.3, 1]}}\n"
        "outputs:\n"
        '  mix: {from: mix, path: "out/m-{alpha}.safetensors"}\n'
        '  nsfw: {from: nsfw, path: "out/n-{alpha}.safetensors"}\n'
        "  twin: {from: twin, path: out/twin.safetensors}\n"
        "  soft: {from: soft, path: out/soft.safetensors}\n"
    )
    r = run_cli(path, "--json", "-j", "2", cache=cache)
    assert r.code == 0, r.err
    flagged = {n["name"]: n["nonfinite_keys"] for n in r.json["nodes"] if n["kind"] == "merge"}
    assert flagged["nsfw[alpha=0]"] == []
    assert flagged["nsfw[alpha=0.5]"] == [key] and flagged["nsfw[alpha=2]"] == [key]
    assert flagged["twin"] == [key]
    a = load_st(workdir / "models" / "anything-v3.safetensors")
    sfw = load_st(workdir / "models" / "nai-sfw.safetensors")
    b = {**full, key: poisoned}
    members = {alpha: load_st(workdir / "out" / f"n-{alpha}.safetensors") for alpha in (0, 0.5, 2)}
    twin = load_st(workdir / "out" / "twin.safetensors")
    insta = load_st(workdir / "models" / "insta.safetensors")
    mixed = {alpha: load_st(workdir / "out" / f"m-{alpha}.safetensors") for alpha in (0, 0.3, 1)}
    compared = 0
    with np.errstate(invalid="ignore", over="ignore"):
        for k, x in a.items():
            if x.dtype.kind != "f":
                continue
            for alpha, got in members.items():
                want = (
                    f32(x) if alpha == 0 else f32(x) + (f32(b[k]) - f32(sfw[k])) * np.float32(alpha)
                )
                np.testing.assert_array_equal(got[k], want.astype(x.dtype), err_msg=k)
            assert twin[k].tobytes() == members[0.5][k].tobytes(), k
            y, w = f32(insta[k]), np.float32(0.3)
            np.testing.assert_array_equal(mixed[0][k], x, err_msg=k)
            np.testing.assert_array_equal(mixed[1][k], insta[k], err_msg=k)
            want = (f32(x) * (np.float32(1) - w) + y * w).astype(x.dtype)
            np.testing.assert_array_equal(mixed[0.3][k], want, err_msg=k)
            compared += 1
    assert compared > 100
