"""Every validation error names file:line:column and says how to fix it; exit 2, no traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import run_cli

HEAD = """mergebuild: 1
models:
  anything: models/anything-v3.safetensors
  nai_full: models/nai-full.safetensors
  nai_sfw: models/nai-sfw.safetensors
"""
OUT = """outputs:
  o: {from: m, path: out/o.safetensors}
"""

CASES = [
    (
        "unknown_ref_expr",
        HEAD + "merges:\n  m: anything + (nai_ful - nai_sfw) * 0.3\n" + OUT,
        ":7:18:",
        "unknown model 'nai_ful' — did you mean 'nai_full'?",
    ),
    (
        "unknown_ref_explicit",
        HEAD + "merges:\n  m: {method: weighted_sum, a: anything, b: nai_sfww, alpha: 0.5}\n" + OUT,
        ":7:",
        "unknown model 'nai_sfww' — did you mean 'nai_sfw'?",
    ),
    (
        "cycle",
        HEAD + "merges:\n  m: x * 0.5 + anything * 0.5\n  x: m * 0.5 + nai_sfw * 0.5\n" + OUT,
        ":7:",
        "merge cycle: m → x → m",
    ),
    (
        "duplicate_key",
        HEAD + "merges:\n  m: anything\n  m: nai_full\n" + OUT,
        ":8:3:",
        "duplicate name 'm' (first defined at line 7)",
    ),
    (
        "duplicate_across",
        HEAD + "merges:\n  anything: nai_full\n  m: anything\n" + OUT,
        ":7:3:",
        "duplicate name 'anything': already a model (line 3)",
    ),
    (
        "wrong_type",
        HEAD + "merges:\n  m: {method: weighted_sum, a: anything, b: nai_sfw, alpha: half}\n" + OUT,
        ":7:",
        "'alpha' of merge 'm': input should be a valid number",
    ),
    (
        "missing_param",
        HEAD + "merges:\n  m:\n    method: add_difference\n    a: anything\n"
        "    b: nai_full\n    c: nai_sfw\n" + OUT,
        ":7:3:",
        "merge 'm' (add_difference) is missing required parameter 'alpha'",
    ),
    (
        "missing_input",
        HEAD + "merges:\n  m:\n    method: add_difference\n    a: anything\n"
        "    b: nai_full\n    alpha: 1\n" + OUT,
        ":7:3:",
        "is missing input 'c'",
    ),
    (
        "typo_param",
        HEAD + "merges:\n  m: {method: weighted_sum, a: anything, b: nai_sfw, "
        "alpha: 1, alhpa: 2}\n" + OUT,
        ":7:",
        "unknown parameter 'alhpa' for weighted_sum — did you mean 'alpha'?",
    ),
    (
        "unknown_method",
        HEAD + "merges:\n  m: {method: add_diference, a: anything}\n" + OUT,
        ":7:",
        "unknown method 'add_diference' — did you mean 'add_difference'?",
    ),
    (
        "output_no_node",
        HEAD + "merges:\n  m: anything\noutputs:\n  o: {from: mm, path: o.st}\n",
        ":9:",
        "output 'o' is from unknown node 'mm' — did you mean 'm'?",
    ),
    (
        "two_outputs_one_path",
        HEAD + "merges:\n  m: anything\noutputs:\n"
        "  o: {from: m, path: out/x.safetensors}\n  p: {from: m, path: ./out/x.safetensors}\n",
        ":10:",
        "outputs 'o' and 'p' write the same file",
    ),
    (
        "output_over_input",
        HEAD + "merges:\n  m: anything\noutputs:\n"
        "  o: {from: m, path: models/nai-sfw.safetensors}\n",
        ":9:",
        "would overwrite input model 'nai_sfw'",
    ),
    (
        "bad_dtype",
        HEAD + "merges:\n  m: anything\noutputs:\n"
        "  o: {from: m, path: o.safetensors, dtype: fp61}\n",
        ":9:",
        "did you mean 'fp16'?",
    ),
    (
        "bad_version",
        "mergebuild: 7\n" + HEAD.split("\n", 1)[1] + "merges:\n  m: anything\n" + OUT,
        ":1:13:",
        "unsupported recipe version 7",
    ),
    (
        "expr_syntax",
        HEAD + "merges:\n  m: anything + (nai_full - \n" + OUT,
        ":7:",
        "invalid expression",
    ),
    (
        "expr_product",
        HEAD + "merges:\n  m: anything * nai_full\n" + OUT,
        ":7:",
        "cannot multiply two models together",
    ),
    (
        "expr_constant",
        HEAD + "merges:\n  m: anything + 1\n" + OUT,
        ":7:",
        "adds a bare number to a model",
    ),
    ("yaml_syntax", HEAD + "merges:\n  m: [unclosed\n" + OUT, ":", "invalid YAML"),
    ("hyphen_name", HEAD + "merges:\n  my-merge: anything\n" + OUT, ":7:3:", "(e.g. 'my_merge')"),
    (
        "empty_model_path",
        HEAD + "  blank: ''\nmerges:\n  m: anything\n" + OUT,
        ":6:10:",
        "model 'blank' has an empty path",
    ),
    ("no_outputs", HEAD + "merges:\n  m: anything\noutputs: {}\n", ":", "has no outputs"),
    (
        "unknown_top_field",
        HEAD + "merge:\n  m: anything\n" + OUT,
        ":6:1:",
        "unknown field 'merge' in the recipe — did you mean 'merges'?",
    ),
]


@pytest.mark.parametrize(
    ("text", "where", "message"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_recipe_error(tmp_path: Path, text: str, where: str, message: str) -> None:
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(text)
    r = run_cli(recipe, "--dry-run", cache=tmp_path / "c")
    assert r.code == 2, (r.out, r.err)
    assert "Traceback" not in r.err
    assert f"bad.yaml{where}" in r.err, r.err
    assert message in r.err, r.err


def test_debug_shows_traceback(tmp_path: Path) -> None:
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(CASES[0][1])
    r = run_cli(recipe, "--debug", cache=tmp_path / "c")
    assert r.code != 0 and "Traceback" in r.err


def test_all_problems_reported_at_once(tmp_path: Path) -> None:
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(
        HEAD + "merges:\n  m: anything + (nai_ful - nai_sfw) * 0.3\n"
        "  n: {method: weighted_sum, a: anything, b: nai_sfw}\n" + OUT
    )
    r = run_cli(recipe, cache=tmp_path / "c")
    assert r.code == 2
    assert "nai_ful" in r.err and "missing required parameter 'alpha'" in r.err


def test_missing_model_file_is_a_build_error(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(HEAD + "merges:\n  m: anything\n" + OUT)
    r = run_cli(recipe, cache=tmp_path / "c")
    assert r.code == 1
    assert "input model not found" in r.err and "anything-v3.safetensors" in r.err
    assert "Traceback" not in r.err


def test_set_unknown_target_suggests(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        HEAD + "merges:\n  m: {method: weighted_sum, a: anything, b: nai_sfw, alpha: 0.5}\n" + OUT
    )
    r = run_cli(recipe, "-n", "--set", "mm.alpha=0.2", cache=tmp_path / "c")
    assert r.code == 2 and "did you mean 'm'?" in r.err
