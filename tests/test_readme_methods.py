"""README.md's methods table is the catalogue's own (`mergebuild methods --markdown`)."""

from __future__ import annotations

from pathlib import Path

from conftest import run_cli

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_methods_table_is_generated_from_the_specs() -> None:
    r = run_cli("methods", "--markdown")
    assert r.code == 0, r.err
    table = r.out.strip()
    assert table.count("\n") >= 20  # every registered method has a row
    assert table in README.read_text(), "regenerate: mergebuild methods --markdown"
