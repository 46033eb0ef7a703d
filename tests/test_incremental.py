"""Incremental builds through the CLI: what rebuilds, what is a cache hit, and why."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from conftest import EXAMPLES, SeedBuild, run_cli


def setup(workdir: Path) -> Path:
    recipe = workdir / "seed.yaml"
    recipe.write_text((EXAMPLES / "anything_nsfw_gape.yaml").read_text())
    return recipe


def warm(seed: SeedBuild, cache: Path) -> Path:
    """A copy of the session's built seed-example cache, for tests whose first build only
    fills the cache: a cache hit saves the seconds of importing the engine."""
    shutil.copytree(seed.cache, cache, dirs_exist_ok=True)
    return cache


def statuses(report: dict) -> dict[str, str]:
    return {n["name"]: n["status"] for n in report["nodes"]}


def build(recipe: Path, cache: Path, *extra: str) -> dict:
    r = run_cli(recipe, "--json", *extra, cache=cache)
    assert r.code == 0, r.err
    return r.json


def test_second_alpha_changed_rebuilds_only_second_step(workdir: Path, cache: Path) -> None:
    recipe = setup(workdir)
    first = build(recipe, cache)
    assert statuses(first) == {
        "anything_nsfw": "built",
        "anything_nsfw_gape": "built",
        "anything-nsfw-gape": "built",
    }
    dry = run_cli(recipe, "-n", "--set", "anything_nsfw_gape.alpha=0.5", cache=cache)
    assert dry.code == 0
    assert "parameter changed: alpha 1.0 → 0.5" in dry.out
    second = build(recipe, cache, "--set", "anything_nsfw_gape.alpha=0.5")
    assert statuses(second) == {
        "anything_nsfw": "cached",
        "anything_nsfw_gape": "built",
        "anything-nsfw-gape": "built",
    }
    # going back to 1.0: the output object is still cached
    assert build(recipe, cache)["summary"]["built"] == 0


def test_input_bytes_changed_rebuilds_dependents(
    workdir: Path, cache: Path, seed_build: SeedBuild
) -> None:
    recipe = setup(workdir)
    build(recipe, warm(seed_build, cache))
    nai = workdir / "models" / "nai-sfw.safetensors"
    data = bytearray(nai.read_bytes())
    data[-1] ^= 0x01  # last byte of the last tensor
    nai.write_bytes(bytes(data))
    dry = run_cli(recipe, "-n", "--json", cache=cache).json
    why = {n["name"]: n["reason"] for n in dry["nodes"]}
    assert "new input bytes: nai_sfw" in why["anything_nsfw"]
    assert "upstream 'anything_nsfw' changed" in why["anything_nsfw_gape"]
    report = build(recipe, cache)
    assert statuses(report) == {
        "anything_nsfw": "built",
        "anything_nsfw_gape": "built",
        "anything-nsfw-gape": "built",
    }

    gape = workdir / "models" / "gape60.safetensors"
    data = bytearray(gape.read_bytes())
    data[-1] ^= 0x01
    gape.write_bytes(bytes(data))
    report = build(recipe, cache)
    assert statuses(report)["anything_nsfw"] == "cached"
    assert statuses(report)["anything_nsfw_gape"] == "built"


def test_touch_rebuilds_nothing_and_rehashes(
    workdir: Path, cache: Path, seed_build: SeedBuild
) -> None:
    recipe = setup(workdir)
    build(recipe, warm(seed_build, cache))
    again = build(recipe, cache)
    assert not any(m["hashed"] for m in again["models"].values())  # memo: no re-read
    for f in (workdir / "models").iterdir():
        os.utime(f, ns=(1_000_000_000, 1_000_000_000))
    touched = build(recipe, cache)
    assert touched["summary"]["built"] == 0
    assert all(m["hashed"] for m in touched["models"].values())  # re-read, same key


def test_reformatted_renamed_recipe_rebuilds_nothing(
    workdir: Path, cache: Path, seed_build: SeedBuild
) -> None:
    recipe = setup(workdir)
    first = build(recipe, warm(seed_build, cache))
    text = recipe.read_text()
    reformatted = "# a different layout, comments, flow style, other file name\n" + text.replace(
        "anything + (nai_full - nai_sfw) * 0.3", '"anything+(nai_full-nai_sfw)*0.30"  # same thing'
    ).replace("alpha: 1.0", "alpha: 1")
    moved = workdir / "renamed-recipe.yaml"
    moved.write_text(reformatted)
    recipe.unlink()
    second = build(moved, cache)
    assert second["summary"]["built"] == 0
    keys1 = {n["name"]: n["key"] for n in first["nodes"]}
    keys2 = {n["name"]: n["key"] for n in second["nodes"]}
    assert keys1 == keys2


def test_output_bytes_independent_of_jobs_and_cache_state(workdir: Path, tmp_path: Path) -> None:
    recipe = setup(workdir)
    out = workdir / "out" / "anything-nsfw-gape.safetensors"
    build(recipe, tmp_path / "c1", "-j", "1")
    one = out.read_bytes()
    build(recipe, tmp_path / "c2", "-j", "2", "--max-memory", "64K")
    assert out.read_bytes() == one
    # tensors cut into many small chunks, computed by two workers in any order
    r = run_cli(
        recipe,
        "--json",
        "-j",
        "2",
        cache=tmp_path / "c4",
        env={"MERGEBUILD_CHUNK_ELEMENTS": "1000"},
    )
    assert r.code == 0 and r.json["summary"]["built"] == 3, r.err
    assert out.read_bytes() == one
    # partially cached: only the first step is in the cache
    shutil.rmtree(tmp_path / "c2" / "objects")
    r = run_cli(
        recipe,
        "anything-nsfw-gape",
        "--json",
        "--set",
        "anything_nsfw.cache=true",
        cache=tmp_path / "c3",
    )
    assert r.code == 0
    os.unlink(out)
    report = build(recipe, tmp_path / "c3")
    assert out.read_bytes() == one
    assert report["summary"]["built"] == 0


def test_fused_equals_step_by_step(workdir: Path, cache: Path, seed_build: SeedBuild) -> None:
    """Materializing step 1 as a file and merging it in a second recipe gives the same tensors."""
    from conftest import load_st

    recipe = setup(workdir)
    build(recipe, warm(seed_build, cache))
    step1 = workdir / "step1.yaml"
    step1.write_text(
        recipe.read_text().split("outputs:")[0].replace("  anything_nsfw_gape:", "  unused_gape:")
        + "outputs:\n  s1: {from: anything_nsfw, "
        "path: models/step1.safetensors}\n"
    )
    assert run_cli(step1, cache=cache).code == 0
    step2 = workdir / "step2.yaml"
    step2.write_text(
        "mergebuild: 1\nmodels:\n  s1: models/step1.safetensors\n"
        "  gape: models/gape60.safetensors\n  nai_full: models/nai-full.safetensors\n"
        "merges:\n  g: s1 + (gape - nai_full) * 1.0\n"
        "outputs:\n  o: {from: g, path: out/stepwise.safetensors, dtype: fp16}\n"
    )
    assert run_cli(step2, cache=cache).code == 0
    fused = load_st(workdir / "out" / "anything-nsfw-gape.safetensors")
    stepwise = load_st(workdir / "out" / "stepwise.safetensors")
    assert fused.keys() == stepwise.keys()
    for k in fused:
        assert fused[k].tobytes() == stepwise[k].tobytes(), k


def test_output_is_hardlink_of_cache_object(
    workdir: Path, cache: Path, seed_build: SeedBuild
) -> None:
    recipe = setup(workdir)
    report = build(recipe, warm(seed_build, cache))
    out = next(n for n in report["nodes"] if n["kind"] == "output")
    obj = cache / "objects" / out["key"][:2] / f"{out['key']}.safetensors"
    assert os.path.samefile(obj, out["path"])
    assert out["bytes"] == obj.stat().st_size
    os.unlink(out["path"])
    again = build(recipe, cache)
    assert again["summary"]["built"] == 0
    assert os.path.samefile(obj, out["path"])


def test_cache_commands(workdir: Path, cache: Path) -> None:
    recipe = setup(workdir)
    build(recipe, cache)
    ls = run_cli("cache", "ls", "--json", cache=cache)
    assert ls.code == 0
    kinds = sorted(o["kind"] for o in ls.json["objects"])
    assert kinds == ["merge", "output"]
    assert ls.json["bytes"] == sum(o["size"] for o in ls.json["objects"])
    # a variant adds an output object (the final node lives only in its output file);
    # gc keeps only what the latest build of each recipe uses
    build(recipe, cache, "--set", "anything_nsfw_gape.alpha=0.5")
    assert len(run_cli("cache", "ls", "--json", cache=cache).json["objects"]) == 3
    gc = run_cli("cache", "gc", cache=cache)
    assert gc.code == 0 and "removed 1 objects" in gc.out
    assert len(run_cli("cache", "ls", "--json", cache=cache).json["objects"]) == 2
    assert run_cli("cache", "du", cache=cache).code == 0
    assert run_cli("cache", "clean", cache=cache).code == 0
    assert not cache.exists()


def test_graph_text_and_dot(workdir: Path) -> None:
    recipe = setup(workdir)
    text = run_cli("graph", recipe)
    assert text.code == 0
    lines = text.out.splitlines()
    order = [ln.split()[1] for ln in lines]
    assert order.index("anything_nsfw") < order.index("anything_nsfw_gape")
    assert "add_difference(a=anything, b=nai_full, c=nai_sfw, alpha=0.3)" in text.out
    dot = run_cli("graph", recipe, "--format", "dot")
    assert dot.out.startswith("digraph") and '"merge:anything_nsfw" -> ' in dot.out


def test_light_paths_do_not_import_torch(workdir: Path, cache: Path, seed_build: SeedBuild) -> None:
    recipe = setup(workdir)
    probe = (
        "import sys; from mergebuild.cli import main; rc = main(sys.argv[1:]); "
        "heavy = [m for m in ('torch', 'numba', 'numpy') if m in sys.modules]; "
        "assert not heavy, f'imported: {heavy}'; raise SystemExit(rc)"
    )
    import subprocess
    import sys

    from conftest import SRC

    def light(*args: str) -> None:
        env = {**os.environ, "PYTHONPATH": str(SRC), "MERGEBUILD_CACHE_DIR": str(cache)}
        p = subprocess.run(
            [sys.executable, "-c", probe, *args], env=env, capture_output=True, text=True
        )
        assert p.returncode == 0, p.stderr

    light("--help")
    light(str(recipe), "--dry-run")
    warm(seed_build, cache)
    light(str(recipe))  # fully cached build
    assert (workdir / "out" / "anything-nsfw-gape.safetensors").read_bytes() == seed_build.output
    light("graph", str(recipe))


def test_device_cuda_same_bytes_or_clear_error(
    workdir: Path, tmp_path: Path, seed_build: SeedBuild
) -> None:
    import torch

    recipe = setup(workdir)
    out = workdir / "out" / "anything-nsfw-gape.safetensors"
    cpu_bytes = seed_build.output  # a cpu build in a cache of its own
    r = run_cli(recipe, "--device", "cuda", cache=tmp_path / "gpu")
    if not torch.cuda.is_available():
        assert r.code == 1 and "CUDA is not available" in r.err and "Traceback" not in r.err
        return
    assert r.code == 0, r.err
    assert out.read_bytes() == cpu_bytes
