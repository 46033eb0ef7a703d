"""Hostile recipes (shared files are not trusted): one clear error, exit 2, no traceback, and
nothing written outside the recipe's directory or over an input."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from conftest import load_st, run_cli

HEAD = """mergebuild: 1
models:
  anything: models/anything-v3.safetensors
  nai_sfw: models/nai-sfw.safetensors
"""
OUT = "outputs:\n  o: {from: m, path: out/o.safetensors}\n"
LAUGHS = "".join(
    f"{c}: &{c} [{', '.join([f'*{p}'] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi", strict=True)
)


def out_to(path: str) -> str:
    return (
        HEAD
        + "merges:\n  m: anything * 0.5 + nai_sfw * 0.5\n"
        + (f"outputs:\n  o: {{from: m, path: '{path}'}}\n")
    )


CASES: dict[str, tuple[bytes, str]] = {
    "alias_bomb": (
        (
            HEAD + "merges:\n  m: anything\n" + OUT + "a: &a [x, x, x, x, x, x, x, x, x]\n" + LAUGHS
        ).encode(),
        "alias bomb",
    ),
    "alias_bomb_merge_keys": (
        (HEAD + "merges:\n  m: anything\n" + OUT).encode()
        + b"x0: &x0 {k: v}\n"
        + b"".join(
            f"x{i}: &x{i} [*x{i - 1}, *x{i - 1}, *x{i - 1}, *x{i - 1}]\n".encode()
            for i in range(1, 12)
        ),
        "alias bomb",
    ),
    "deep_yaml_flow": (
        (HEAD + "merges:\n  m: " + "[" * 50_000 + "\n" + OUT).encode(),
        "nested too deeply",
    ),
    "deep_yaml_mappings": (
        (HEAD + "merges:\n  m: " + "{a: " * 20_000 + "\n" + OUT).encode(),
        "nested too deeply",
    ),
    "deep_expression_chain": (
        (
            HEAD + "  x: models/insta.safetensors\nmerges:\n  m: x" + "+x" * 1500 + "\n" + OUT
        ).encode(),
        "nested too deeply",
    ),
    "deep_expression_unary": (
        (HEAD + "merges:\n  m: " + "-" * 3000 + "anything\n" + OUT).encode(),
        "nested too deeply",
    ),
    "deep_expression_parens": (
        (HEAD + "merges:\n  m: " + "(" * 1000 + "anything" + ")" * 1000 + "\n" + OUT).encode(),
        "too many nested parentheses",
    ),
    "long_expression": (
        (HEAD + "merges:\n  m: anything" + " + 0" * 2000 + "\n" + OUT).encode(),
        "longer than",
    ),
    "non_utf8": (
        (HEAD + "merges:\n  m: anything\n").encode() + b"  n: caf\xe9\n" + OUT.encode(),
        "not valid UTF-8",
    ),
    "utf16_bom": (("\ufeff" + HEAD).encode("utf-16"), "not valid UTF-8"),
    "huge_integer": (
        (
            HEAD
            + "merges:\n  m: {method: weighted_sum, a: anything, b: nai_sfw, alpha: "
            + "9" * 5000
            + "}\n"
            + OUT
        ).encode(),
        "too many digits",
    ),
    "huge_float": (
        (
            HEAD
            + "merges:\n  m: {method: weighted_sum, a: anything, b: nai_sfw, alpha: 1e999}\n"
            + OUT
        ).encode(),
        "finite number",
    ),
    "beyond_float32": (
        (
            HEAD + "merges:\n  m: {method: linear, inputs: [anything, nai_sfw], "
            "weights: [1e300, 1]}\n" + OUT
        ).encode(),
        "float32",
    ),
    "beyond_float32_expression": (
        (HEAD + "merges:\n  m: anything * 1e39 - nai_sfw * 1e39 + nai_sfw\n" + OUT).encode(),
        "too large",
    ),
    "nan_param": (
        (
            HEAD
            + "merges:\n  m: {method: weighted_sum, a: anything, b: nai_sfw, alpha: .nan}\n"
            + OUT
        ).encode(),
        "finite number",
    ),
    "impossible_date": (
        (
            HEAD + "merges:\n  m: {method: weighted_sum, a: anything, b: nai_sfw, "
            "alpha: 2001-02-30}\n" + OUT
        ).encode(),
        "day is out of range",
    ),
    "python_tag": (
        (HEAD + "merges:\n  m: !!python/object/apply:os.system ['touch PWNED']\n" + OUT).encode(),
        "is not allowed in a recipe",
    ),
    "set_tag": (
        (HEAD + "merges:\n  m: anything\n" + OUT.replace("o: {", "o: !!set {")).encode(),
        "is not allowed in a recipe",
    ),
    "python_tag_scalar": (
        (HEAD + "merges:\n  m: !!python/name:os.system ''\n" + OUT).encode(),
        "invalid YAML",
    ),
    "nul_in_path": (out_to("out/o\\0.safetensors").replace("'", '"').encode(), "NUL"),
    "call_in_expression": (
        (HEAD + "merges:\n  m: __import__('os').system('touch PWNED')\n" + OUT).encode(),
        "unknown function",
    ),
    "control_character": (  # found by the fuzzer: PyYAML's reader raised outside the try
        (HEAD + "merges:\n  m: any\x00thing\n" + OUT).encode(),
        "control character",
    ),
    "escape_parent": (out_to("../escaped.safetensors").encode(), "--allow-outside-paths"),
    "escape_absolute": (out_to("/tmp/mergebuild-escaped.safetensors").encode(), "outside"),
    "escape_home": (out_to("~/mergebuild-escaped.safetensors").encode(), "outside"),
    "escape_dotdot_inside": (out_to("out/../../escaped.safetensors").encode(), "outside"),
    "output_is_input": (out_to("models/../models/nai-sfw.safetensors").encode(), "overwrite"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_hostile_recipe_is_refused(workdir: Path, cache: Path, case: str) -> None:
    text, expect = CASES[case]
    recipe = workdir / "hostile.yaml"
    recipe.write_bytes(text)
    before = {p: p.read_bytes() for p in (workdir / "models").iterdir()}
    r = run_cli(recipe, cache=cache, cwd=workdir)
    assert r.code == 2, (r.code, r.err)
    assert "Traceback" not in r.err and r.err.startswith("error"), r.err
    assert expect in r.err, r.err
    assert len(r.err) < 2000, "one readable message, not a dump"
    assert not (workdir / "PWNED").exists()
    assert not (workdir.parent / "escaped.safetensors").exists()
    assert {p: p.read_bytes() for p in (workdir / "models").iterdir()} == before
    assert not (cache / "objects").exists()


def test_outside_paths_allowed_by_flag(workdir: Path, cache: Path, tmp_path: Path) -> None:
    target = tmp_path / "elsewhere" / "o.safetensors"
    recipe = workdir / "r.yaml"
    recipe.write_text(out_to(str(target)))
    refused = run_cli(recipe, "-n", cache=cache)
    assert refused.code == 2 and "--allow-outside-paths" in refused.err
    r = run_cli(recipe, "--allow-outside-paths", cache=cache)
    assert r.code == 0, r.err
    assert load_st(target)


def test_symlinked_directory_escaping_is_refused(
    workdir: Path, cache: Path, tmp_path: Path
) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (workdir / "out").symlink_to(elsewhere)
    recipe = workdir / "r.yaml"
    recipe.write_text(out_to("out/o.safetensors"))
    r = run_cli(recipe, cache=cache)
    assert r.code == 2 and "outside the recipe's directory" in r.err, r.err
    assert not any(elsewhere.iterdir())


def test_output_symlink_to_input_is_refused(workdir: Path, cache: Path) -> None:
    victim = workdir / "models" / "nai-sfw.safetensors"
    before = victim.read_bytes()
    (workdir / "out").mkdir()
    (workdir / "out" / "o.safetensors").symlink_to(victim)
    recipe = workdir / "r.yaml"
    recipe.write_text(out_to("out/o.safetensors"))
    r = run_cli(recipe, cache=cache)
    assert r.code == 2 and "Traceback" not in r.err
    assert "resolves to input model 'nai_sfw'" in r.err, r.err
    assert victim.read_bytes() == before


def test_output_symlink_is_replaced_never_written_through(workdir: Path, cache: Path) -> None:
    """A symlink at the output path (to a file that is not an input) is replaced by the output
    file; whatever it pointed at is untouched."""
    other = workdir / "notes.txt"
    other.write_text("keep me")
    out = workdir / "out" / "o.safetensors"
    out.parent.mkdir()
    out.symlink_to(other)
    recipe = workdir / "r.yaml"
    recipe.write_text(out_to("out/o.safetensors"))
    r = run_cli(recipe, cache=cache)
    assert r.code == 0, r.err
    assert other.read_text() == "keep me"
    assert not out.is_symlink() and load_st(out)


def test_output_symlink_into_cache_is_replaced(workdir: Path, cache: Path) -> None:
    """Even a link to the very cache object is replaced (gc could leave it dangling)."""
    recipe = workdir / "r.yaml"
    recipe.write_text(out_to("out/o.safetensors"))
    r = run_cli(recipe, "--json", cache=cache)
    assert r.code == 0, r.err
    out = workdir / "out" / "o.safetensors"
    key = next(n["key"] for n in r.json["nodes"] if n["kind"] == "output")
    obj = cache / "objects" / key[:2] / f"{key}.safetensors"
    out.unlink()
    out.symlink_to(obj)
    assert run_cli(recipe, cache=cache).code == 0
    assert not out.is_symlink() and os.path.samefile(out, obj)


def test_set_on_malformed_merges_section(workdir: Path, cache: Path) -> None:
    """Found by the fuzzer: `--set` looked names up by substring in a string-valued section."""
    recipe = workdir / "r.yaml"
    recipe.write_text(HEAD + "merges: nsfw_025\n" + OUT)
    r = run_cli(recipe, "-n", "--set", "w.alpha=0.5", cache=cache)
    assert r.code == 2 and "Traceback" not in r.err and "unexpected" not in r.err, r.err
    assert "no merge or output named 'w'" in r.err
