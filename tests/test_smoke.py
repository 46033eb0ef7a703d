from pathlib import Path

from conftest import EXAMPLES, run_cli


def test_example_builds_then_is_cached(workdir: Path, cache: Path) -> None:
    recipe = workdir / "r.yaml"
    recipe.write_text((EXAMPLES / "anything_nsfw_gape.yaml").read_text())
    first = run_cli(recipe, "--json", cache=cache)
    assert first.code == 0, first.err
    assert first.json["summary"]["built"] == 3
    second = run_cli(recipe, "--json", cache=cache)
    assert second.code == 0, second.err
    assert second.json["summary"]["built"] == 0
    assert (workdir / "out" / "anything-nsfw-gape.safetensors").is_file()
