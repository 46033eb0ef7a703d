"""Numbers are numbers: a YAML boolean (`yes`, `on`, `true`) or a quoted string ("0.5") where a
number belongs is refused with file:line:col, in the recipe and through `--set`; unquoted
`1e-3` (text to YAML 1.1) is a number. `--set` values are read by the recipe's own strict
loader: duplicate keys, tags and alias bombs are refused there too."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import run_cli

HEAD = """mergebuild: 1
models:
  a: models/anything-v3.safetensors
  b: models/nai-sfw.safetensors
  c: models/nai-full.safetensors
"""
OUT = "outputs:\n  o: {from: m, path: o.safetensors}\n"


def ws(alpha: str) -> str:
    return HEAD + f"merges:\n  m: {{method: weighted_sum, a: a, b: b, alpha: {alpha}}}\n" + OUT


CASES = [
    ("yes", ws("yes"), ":7:", "valid number, not the boolean true"),
    ("on", ws("on"), ":7:", "valid number, not the boolean true"),
    ("true", ws("true"), ":7:", "valid number, not the boolean true"),
    ("off", ws("off"), ":7:", "valid number, not the boolean false"),
    ("quoted", ws('"0.5"'), ":7:", "valid number, not the string '0.5'"),
    ("single_quoted", ws("'1'"), ":7:", "valid number, not the string '1'"),
    (
        "linear_bool",
        HEAD + "merges:\n  m: {method: linear, inputs: [a, b], weights: [0.5, yes]}\n" + OUT,
        ":7:",
        "valid number, not the boolean true",
    ),
    (
        "linear_string",
        HEAD + "merges:\n  m: {method: linear, inputs: [a, b], weights: ['0.5', 0.5]}\n" + OUT,
        ":7:",
        "valid number, not the string '0.5'",
    ),
    ("blocks_bool", ws("{IN00: yes, default: 0}"), ":7:", "block IN00 must be a number"),
    ("blocks_string", ws("{IN00: '0.5', default: 0}"), ":7:", "block IN00 must be a number"),
    ("default_bool", ws("{IN00: 1, default: on}"), ":7:", "default must be a number"),
    ("list_string", ws("[" + ", ".join(["0"] * 25 + ['"1"']) + "]"), ":7:", "must be a number"),
    ("preset_base", ws("{preset: GRAD_V, base: true}"), ":7:", "preset base must be a number"),
    ("preset_base_str", ws("{preset: GRAD_V, base: '0.2'}"), ":7:", "preset base must be"),
    ("component", ws("{unet: 0.5, vae: 'no'}"), ":7:", "vae must be a number"),
    (
        "expr_preset_base",
        HEAD + "merges:\n  m: 'a + (b - c) * preset(\"GRAD_V\", base=True)'\n" + OUT,
        ":7:",
        "must be numbers or quoted names",
    ),
    (
        "expr_blocks_string",
        HEAD + "merges:\n  m: 'a + (b - c) * blocks(IN00=\"0.5\", default=0)'\n" + OUT,
        ":7:",
        "must be a number",
    ),
    ("version_true", ws("0.5").replace("mergebuild: 1", "mergebuild: true"), ":1:", "version"),
    (
        "prune_number",
        ws("0.5").replace("path: o.safetensors}", "path: o.safetensors, prune: 1}"),
        ":9:",
        "prune",
    ),
    (
        "prune_string",
        ws("0.5").replace("path: o.safetensors}", "path: o.safetensors, prune: 'yes'}"),
        ":9:",
        "prune",
    ),
    (
        "cache_number",
        HEAD + "merges:\n  m: {method: weighted_sum, a: a, b: b, alpha: 0.5, cache: 1}\n" + OUT,
        ":7:",
        "cache",
    ),
]


@pytest.mark.parametrize(
    ("text", "where", "message"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_non_number_is_refused(workdir: Path, text: str, where: str, message: str) -> None:
    recipe = workdir / "bad.yaml"
    recipe.write_text(text)
    r = run_cli(recipe, "-n", cache=workdir / "c")
    assert r.code == 2, (r.code, r.err)
    assert "Traceback" not in r.err and "unexpected" not in r.err, r.err
    assert f"bad.yaml{where}" in r.err, r.err
    assert message in r.err, r.err


@pytest.mark.parametrize(
    ("spelling", "value"),
    [("1e-3", 0.001), ("2.5E-1", 0.25), ("1", 1.0), ("0", 0.0), ("+5e-1", 0.5), ("1_0e-2", 0.1)],
)
def test_numbers_still_numbers(workdir: Path, spelling: str, value: float) -> None:
    """Every spelling of a number a user writes is taken at its value: checked in the node's
    canonical form (its identity in the plan), which `--json` reports via the key."""
    recipe = workdir / "ok.yaml"
    recipe.write_text(ws(spelling))
    same = workdir / "same.yaml"
    same.write_text(ws(repr(value)))
    keys = []
    for r in (recipe, same):
        res = run_cli(r, "-n", "--json", cache=workdir / "c")
        assert res.code == 0, res.err
        keys.append(next(n["key"] for n in res.json["nodes"] if n["name"] == "m"))
    assert keys[0] == keys[1]


def test_exponent_numbers_in_block_weights_and_lists(workdir: Path) -> None:
    a = workdir / "a.yaml"
    a.write_text(ws("{IN00: 1e-1, default: 5E-1}"))
    b = workdir / "b.yaml"
    b.write_text(ws("{IN00: 0.1, default: 0.5}"))
    keys = []
    for recipe in (a, b):
        r = run_cli(recipe, "-n", "--json", cache=workdir / "c")
        assert r.code == 0, r.err
        keys.append(next(n["key"] for n in r.json["nodes"] if n["name"] == "m"))
    assert keys[0] == keys[1]


def test_hex_pin_with_an_e_stays_text(workdir: Path) -> None:
    """An AutoV2 pin such as 1234e56789 looks like a number with an exponent: it is a pin."""
    recipe = workdir / "pin.yaml"
    recipe.write_text(
        "mergebuild: 1\nmodels:\n  x: {sha256: 1234e56789}\n"
        "outputs:\n  o: {from: x, path: o.safetensors}\n"
    )
    r = run_cli(recipe, "-n", "--models", workdir / "models", cache=workdir / "c")
    assert r.code == 1 and "Traceback" not in r.err, r.err
    assert "sha256 1234e56789" in r.err and "not found" in r.err


def plan_key(workdir: Path, recipe: Path, *args: str) -> str:
    r = run_cli(recipe, "-n", "--json", *args, cache=workdir / "c")
    assert r.code == 0, r.err
    return next(n["key"] for n in r.json["nodes"] if n["name"] == "m")


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("yes", "valid number, not the boolean true"),
        ("off", "valid number, not the boolean false"),
        ('"0.5"', "valid number, not the string '0.5'"),
        ("{IN00: 1, IN00: 2, default: 0}", "duplicate name 'IN00'"),
        ("{IN00: on, default: 0}", "block IN00 must be a number"),
        ("!!python/object/apply:os.system [touch PWNED]", "is not allowed"),
        ("!!python/name:os.system ''", "invalid YAML"),  # scalar tags: none but YAML's own
        (
            "[&a [1,1,1,1,1,1,1,1,1,1], &b [*a,*a,*a,*a,*a,*a,*a,*a,*a,*a], "
            "&c [*b,*b,*b,*b,*b,*b,*b,*b,*b,*b], &d [*c,*c,*c,*c,*c,*c,*c,*c,*c,*c], "
            "&e [*d,*d,*d,*d,*d,*d,*d,*d,*d,*d], [*e,*e,*e,*e,*e,*e,*e,*e,*e,*e]]",
            "alias bomb",
        ),
    ],
)
def test_set_values_are_read_strictly(workdir: Path, value: str, message: str) -> None:
    recipe = workdir / "r.yaml"
    recipe.write_text(ws("0.5"))
    r = run_cli(recipe, "-n", "--set", f"m.alpha={value}", cache=workdir / "c", cwd=workdir)
    assert r.code == 2, (r.code, r.err)
    assert "Traceback" not in r.err and "unexpected" not in r.err, r.err
    assert message in r.err and "--set" in r.err, r.err
    assert len(r.err) < 2000
    assert not (workdir / "PWNED").exists()


def test_set_values_that_are_fine(workdir: Path) -> None:
    recipe = workdir / "r.yaml"
    recipe.write_text(ws("0.5"))
    want = plan_key(workdir, recipe)
    assert plan_key(workdir, recipe, "--set", "m.alpha=0.5") == want
    assert plan_key(workdir, recipe, "--set", "m.alpha=5e-1") == want
    blocks = workdir / "blocks.yaml"
    blocks.write_text(ws("{IN00: 0.25, default: 0.5}"))
    assert plan_key(workdir, recipe, "--set", "m.alpha={IN00: 0.25, default: 0.5}") == plan_key(
        workdir, blocks
    )
    # a path that is not YAML at all stays the text it is
    r = run_cli(recipe, "-n", "--json", "--set", "o.path=@odd.safetensors", cache=workdir / "c")
    assert r.code == 0, r.err
    out = next(n for n in json.loads(r.out)["nodes"] if n["kind"] == "output")
    assert out["path"] == str(workdir / "@odd.safetensors")
