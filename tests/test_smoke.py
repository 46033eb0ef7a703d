from pathlib import Path

import pytest

from conftest import EXAMPLES, SCALE, run_cli


def test_example_builds_then_is_cached(workdir: Path, cache: Path) -> None:
    recipe = workdir / "r.yaml"
    recipe.write_text((EXAMPLES / "anything_nsfw_gape.yaml").read_text())
    first = run_cli(recipe, "--json", cache=cache)
    assert first.code == 0, first.err
    assert first.json["summary"]["built"] == 3
    outs = [Path(n["path"]) for n in first.json["nodes"] if n["kind"] == "output"]
    assert outs and all(p.is_file() and p.stat().st_size > 0 for p in outs)
    second = run_cli(recipe, "--json", cache=cache)
    assert second.code == 0, second.err
    assert second.json["summary"]["built"] == 0
    assert (workdir / "out" / "anything-nsfw-gape.safetensors").is_file()


def _examples() -> list[Path]:
    """Every shipped example but the seed one: the test above builds that (cold) already."""
    return sorted(p for p in EXAMPLES.glob("*.yaml") if p.name != "anything_nsfw_gape.yaml")


@pytest.mark.parametrize("example", _examples(), ids=lambda p: p.stem)
def test_every_example_builds(workdir: Path, cache: Path, example: Path) -> None:
    """Each shipped example builds on the demo models and writes every output it declares."""
    recipe = workdir / example.name
    recipe.write_text(example.read_text())
    if "--arch flux" in example.read_text():  # its models: `demo-models DIR --arch flux`
        from mergebuild.demo import write_dit_models

        write_dit_models(workdir / "models", "flux", scale=SCALE)
    r = run_cli(recipe, "--json", cache=cache)
    assert r.code == 0, r.err
    outs = [Path(n["path"]) for n in r.json["nodes"] if n["kind"] == "output"]
    assert outs and all(p.is_file() and p.stat().st_size > 0 for p in outs)
