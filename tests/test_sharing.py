"""Reproducible sharing through the CLI: pinned inputs, lock/verify, provenance, show/extract,
include. Hashes are checked against hashlib on the files' bytes, tensors against numpy."""

from __future__ import annotations

import hashlib
import json
import shutil
import socket
import struct
from pathlib import Path

import numpy as np
import yaml

from conftest import EXAMPLES, SeedBuild, load_st, run_cli

OUT = "out/anything-nsfw-gape.safetensors"


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def header_metadata(path: Path) -> dict[str, str]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n])["__metadata__"]


def seed_recipe(workdir: Path) -> Path:
    recipe = workdir / "seed.yaml"
    recipe.write_text((EXAMPLES / "anything_nsfw_gape.yaml").read_text())
    return recipe


def pinned_recipe(workdir: Path, models: Path, digits: int, with_path: bool = False) -> Path:
    """The seed recipe with every input pinned by the first `digits` hex of its sha256."""
    doc = yaml.safe_load((EXAMPLES / "anything_nsfw_gape.yaml").read_text())
    for name, entry in doc["models"].items():
        pin = {"sha256": sha(workdir / entry["path"])[:digits]}
        doc["models"][name] = {**entry, **pin} if with_path else pin
    recipe = workdir / "pinned" / "recipe.yaml"
    recipe.parent.mkdir(exist_ok=True)
    recipe.write_text(yaml.safe_dump(doc, sort_keys=False))
    return recipe


def warm(seed: SeedBuild, cache: Path) -> Path:
    """A copy of the session's built seed-example cache: building the seed recipe there is a
    cache hit (no engine import, seconds saved) that publishes the same bytes."""
    shutil.copytree(seed.cache, cache, dirs_exist_ok=True)
    return cache


def flip_tensor_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01  # inside the last tensor's data: a different model, same layout
    path.write_bytes(bytes(data))


def test_autov2_pin_resolves_from_search_paths(
    workdir: Path, tmp_path: Path, seed_build: SeedBuild
) -> None:
    recipe = pinned_recipe(workdir, workdir / "models", 10)
    # nothing to search: the error names the model, the hash and that there is nowhere to look
    r = run_cli(recipe, cache=tmp_path / "c1")
    assert r.code == 1 and "Traceback" not in r.err
    assert "sha256 " + sha(workdir / "models/anything-v3.safetensors")[:10] in r.err
    assert "no search paths" in r.err
    # via --models, via $MERGEBUILD_MODEL_PATH, via the recipe's own search_paths
    r = run_cli(recipe, "--json", "--models", workdir / "models", cache=tmp_path / "c2")
    assert r.code == 0, r.err
    assert r.json["models"]["anything"]["path"] == str(workdir / "models/anything-v3.safetensors")
    (recipe.parent / OUT).unlink()
    # the next two resolve again (the same cache: a cache hit needs the inputs' hashes too)
    env = {"MERGEBUILD_MODEL_PATH": str(workdir / "models")}
    assert run_cli(recipe, "-q", cache=tmp_path / "c2", env=env).code == 0
    (recipe.parent / OUT).unlink()
    doc = yaml.safe_load(recipe.read_text())
    doc["search_paths"] = ["../models"]
    recipe.write_text(yaml.safe_dump(doc, sort_keys=False))
    assert run_cli(recipe, "-q", cache=tmp_path / "c2").code == 0
    # same inputs by content, same recipe semantics → the very same output bytes
    assert (recipe.parent / OUT).read_bytes() == seed_build.output


def test_pinned_model_missing_says_where_it_looked(workdir: Path, cache: Path) -> None:
    recipe = pinned_recipe(workdir, workdir / "models", 64)
    empty = workdir / "empty"
    empty.mkdir()
    r = run_cli(recipe, "--models", empty, cache=cache)
    assert r.code == 1 and "Traceback" not in r.err
    assert "model 'anything'" in r.err and str(empty) in r.err
    assert sha(workdir / "models/anything-v3.safetensors") in r.err


def test_swapped_input_is_refused_with_both_hashes(workdir: Path, cache: Path) -> None:
    recipe = pinned_recipe(workdir, workdir / "models", 64, with_path=True)
    gape = recipe.parent / "models" / "gape60.safetensors"
    recipe.parent.joinpath("models").symlink_to(workdir / "models")
    pinned = sha(gape)
    shutil.copyfile(workdir / "models/nai-sfw.safetensors", workdir / "models/gape60.safetensors")
    r = run_cli(recipe, cache=cache)
    assert r.code == 1 and "Traceback" not in r.err
    assert pinned in r.err and sha(gape) in r.err and "model 'gape'" in r.err
    assert not (recipe.parent / OUT).exists()


def test_lock_records_hashes_and_verify_in_fresh_cache(
    workdir: Path, tmp_path: Path, seed_build: SeedBuild
) -> None:
    recipe = seed_recipe(workdir)
    r = run_cli("lock", recipe, "-q", cache=warm(seed_build, tmp_path / "author"))
    assert r.code == 0, r.err
    lock = yaml.safe_load(recipe.with_suffix(".lock").read_text())
    for name, entry in yaml.safe_load(recipe.read_text())["models"].items():
        f = workdir / entry["path"]
        assert lock["models"][name]["sha256"] == sha(f)
        assert lock["models"][name]["size"] == f.stat().st_size
    assert lock["outputs"]["anything-nsfw-gape"]["sha256"] == sha(workdir / OUT)
    assert lock["nodes"]["anything_nsfw"]["params"] == {"alpha": 0.3}
    assert str(tmp_path) not in recipe.with_suffix(".lock").read_text()  # publishable
    published = sha(workdir / OUT)
    (workdir / OUT).unlink()
    # someone else, empty cache: rebuilds everything and gets the author's bytes
    v = run_cli("verify", recipe, "--json", cache=tmp_path / "other")
    assert v.code == 0, v.err
    assert v.json["ok"] and v.json["outputs"][0]["actual"] == published
    assert sha(workdir / OUT) == published


def test_verify_fails_after_one_input_byte_changes(
    workdir: Path, tmp_path: Path, seed_build: SeedBuild
) -> None:
    recipe = seed_recipe(workdir)
    assert run_cli("lock", recipe, "-q", cache=warm(seed_build, tmp_path / "c")).code == 0
    flip_tensor_byte(workdir / "models/gape60.safetensors")
    v = run_cli("verify", recipe, cache=tmp_path / "fresh")
    assert v.code != 0 and "Traceback" not in v.err
    assert "model 'gape'" in v.err and "lock file" in v.err
    # a plain build refuses too; --update-lock accepts and records the new bytes
    b = run_cli(recipe, "-q", cache=tmp_path / "fresh")
    assert b.code == 1 and "--update-lock" in b.err
    u = run_cli(recipe, "-q", "--update-lock", cache=tmp_path / "fresh")
    assert u.code == 0, u.err
    lock = yaml.safe_load(recipe.with_suffix(".lock").read_text())
    assert lock["models"]["gape"]["sha256"] == sha(workdir / "models/gape60.safetensors")
    assert run_cli("verify", recipe, "-q", cache=tmp_path / "fresh").code == 0


def test_verify_reports_changed_recipe(workdir: Path, cache: Path, seed_build: SeedBuild) -> None:
    recipe = seed_recipe(workdir)
    assert run_cli("lock", recipe, "-q", cache=warm(seed_build, cache)).code == 0
    recipe.write_text(recipe.read_text().replace("alpha: 1.0", "alpha: 0.75"))
    v = run_cli("verify", recipe, cache=cache)
    assert v.code == 1 and "Traceback" not in v.err
    assert "MISMATCH" in v.out and "node 'anything_nsfw_gape' differs" in v.out


def test_web_ui_metadata_fields(workdir: Path, cache: Path, seed_build: SeedBuild) -> None:
    recipe = seed_recipe(workdir)
    assert run_cli(recipe, "-q", cache=warm(seed_build, cache)).code == 0
    meta = header_metadata(workdir / OUT)
    top = json.loads(meta["sd_merge_recipe"])
    models = json.loads(meta["sd_merge_models"])
    assert top["interp_method"] == "Add difference" and top["multiplier"] == 1.0
    assert top["save_as_half"] is True
    inputs = {
        n: workdir / e["path"] for n, e in yaml.safe_load(recipe.read_text())["models"].items()
    }
    assert top["secondary_model_hash"] == sha(inputs["gape"])
    assert top["tertiary_model_hash"] == sha(inputs["nai_full"])
    for name, f in inputs.items():
        raw = f.read_bytes()
        entry = models[sha(f)]
        assert entry["name"] == name
        assert entry["legacy_hash"] == hashlib.sha256(raw[0x100000:0x110000]).hexdigest()[:8]
    # the first step has no file: it is listed under its node key with its own recipe
    step1 = models[top["primary_model_hash"]]
    assert top["primary_model_hash"].startswith("mergebuild:")
    assert step1["name"] == "anything_nsfw"
    assert step1["sd_merge_recipe"]["multiplier"] == 0.3
    assert step1["sd_merge_recipe"]["primary_model_hash"] == sha(inputs["anything"])


def test_outputs_identical_across_checkouts_and_caches(model_dir: Path, tmp_path: Path) -> None:
    digests = []
    for where in ("one/checkout", "two/somewhere/else"):
        root = tmp_path / where
        shutil.copytree(model_dir, root / "models")
        recipe = seed_recipe(root)
        r = run_cli(recipe, "-q", "-j", "1" if "one" in where else "2", cache=root / "cache")
        assert r.code == 0, r.err
        out = root / OUT
        digests.append(sha(out))
        header = out.read_bytes()[: 8 + struct.unpack("<Q", out.read_bytes()[:8])[0]]
        for leak in (str(tmp_path), socket.gethostname(), "cache"):
            assert leak.encode() not in header, leak
    assert digests[0] == digests[1]


def test_extract_rebuilds_the_same_file(
    workdir: Path, tmp_path: Path, seed_build: SeedBuild
) -> None:
    recipe = seed_recipe(workdir)
    assert run_cli(recipe, "-q", cache=warm(seed_build, tmp_path / "c")).code == 0
    extracted = tmp_path / "extracted" / "recipe.yaml"
    r = run_cli("extract", workdir / OUT, "-o", extracted)
    assert r.code == 0, r.err
    doc = yaml.safe_load(extracted.read_text())
    assert doc["models"]["gape"] == {"sha256": sha(workdir / "models/gape60.safetensors")}
    b = run_cli(extracted, "--json", "--models", workdir / "models", cache=tmp_path / "c2")
    assert b.code == 0, b.err
    rebuilt = next(n for n in b.json["nodes"] if n["kind"] == "output")["path"]
    assert sha(Path(rebuilt)) == sha(workdir / OUT)
    bad = run_cli("extract", workdir / "models/gape60.safetensors")
    assert bad.code == 1 and "no mergebuild provenance" in bad.err


def test_show_and_nested_provenance(workdir: Path, cache: Path, seed_build: SeedBuild) -> None:
    recipe = seed_recipe(workdir)
    assert run_cli(recipe, "-q", cache=warm(seed_build, cache)).code == 0
    first = json.loads(header_metadata(workdir / OUT)["mergebuild"])
    second = workdir / "second.yaml"
    second.write_text(
        "mergebuild: 1\n"
        "models:\n"
        f"  merged: {OUT}\n"
        "  insta: models/insta.safetensors\n"
        "merges:\n"
        "  mix: merged * 0.5 + insta * 0.5\n"
        "outputs:\n"
        "  final: {from: mix, path: out/final.safetensors}\n"
    )
    assert run_cli(second, "-q", cache=cache).code == 0
    final = workdir / "out/final.safetensors"
    prov = json.loads(header_metadata(final)["mergebuild"])
    assert prov["models"]["merged"]["provenance"] == first
    webui = json.loads(header_metadata(final)["sd_merge_models"])
    assert webui[sha(workdir / OUT)]["sd_merge_recipe"]["interp_method"] == "Add difference"
    s = run_cli("show", final, "--json", cache=cache)
    assert s.code == 0, s.err
    info = s.json
    raw = final.read_bytes()
    assert info["sha256"] == hashlib.sha256(raw).hexdigest()
    assert info["autov2"] == info["sha256"][:10]
    assert info["legacy_hash"] == hashlib.sha256(raw[0x100000:0x110000]).hexdigest()[:8]
    assert info["architecture"] == "SD1.x" and info["tensors"] == len(load_st(final))
    text = run_cli("show", final, cache=cache).out
    assert "mix = weighted_sum(a=merged, b=insta, alpha=0.5)" in text
    assert "anything_nsfw = add_difference" in text  # the nested history of `merged`


def test_include_makes_outputs_models(workdir: Path, cache: Path) -> None:
    seed = seed_recipe(workdir)
    sub = workdir / "composed" / "recipe.yaml"
    sub.parent.mkdir()
    sub.write_text(
        "mergebuild: 1\n"
        "include:\n"
        "  seed: ../seed.yaml\n"
        "models:\n"
        "  insta: ../models/insta.safetensors\n"
        "merges:\n"
        "  blend: seed.anything-nsfw-gape * 0.25 + insta * 0.75\n"
        "outputs:\n"
        "  blend: {from: blend, path: blend.safetensors, dtype: fp32}\n"
    )
    # `anything-nsfw-gape` is not a valid expression name: the explicit form is needed
    r = run_cli(sub, "-q", cache=cache)
    assert r.code == 2 and "recipe.yaml:7" in r.err
    seed.write_text(seed.read_text().replace("anything-nsfw-gape:", "gape_mix:"))
    sub.write_text(sub.read_text().replace("seed.anything-nsfw-gape", "seed.gape_mix"))
    r = run_cli(sub, "--json", cache=cache)
    assert r.code == 0, r.err
    assert not (workdir / OUT).exists()  # the included recipe's own outputs are not written
    assert run_cli(seed, "-q", cache=cache).code == 0
    included = load_st(workdir / OUT)  # what the seed recipe publishes (fp16)
    insta = load_st(workdir / "models/insta.safetensors")
    got = load_st(sub.parent / "blend.safetensors")
    for k in ("model.diffusion_model.out.2.weight", "first_stage_model.decoder.conv_in.bias"):
        # weighted_sum(a=seed.gape_mix, b=insta, alpha=0.75) in fp32, stored as the widest
        # input dtype (fp16), published as fp32
        x = included[k].astype(np.float32)
        expect = x * np.float32(1 - 0.75) + insta[k].astype(np.float32) * np.float32(0.75)
        assert got[k].dtype == np.float32
        assert np.array_equal(got[k], expect.astype(np.float16).astype(np.float32)), k
    cyc = workdir / "cycle.yaml"
    cyc.write_text(
        "mergebuild: 1\ninclude: {me: cycle.yaml}\nmodels: {m: models/insta.safetensors}\n"
        "outputs: {o: {from: m, path: o.safetensors}}\n"
    )
    r = run_cli(cyc, cache=cache)
    assert r.code == 2 and "include cycle" in r.err


def test_ambiguous_prefix_lists_the_candidates(tmp_path: Path) -> None:
    """Two files sharing a 10-hex prefix cannot be made for real; the memo is stubbed."""
    import pytest

    from mergebuild.errors import BuildError
    from mergebuild.hashing import FileHashes
    from mergebuild.locate import resolve_model
    from mergebuild.recipe.model import ModelInput

    for name in ("x.safetensors", "y.safetensors"):
        (tmp_path / name).write_bytes(b"model")

    class Memo:
        def hashes(self, path: Path) -> tuple[FileHashes, bool]:
            tail = "1" if path.name == "x.safetensors" else "2"
            return FileHashes("k", "abcdef0123" + tail * 54, "00000000", 5), True

    with pytest.raises(BuildError) as e:
        resolve_model(ModelInput("m", None, None, "abcdef0123"), Memo(), [tmp_path])  # type: ignore[arg-type]
    assert "matches different files" in str(e.value)
    assert "x.safetensors" in str(e.value) and "y.safetensors" in str(e.value)
    found = resolve_model(ModelInput("m", None, None, "abcdef01232"), Memo(), [tmp_path])  # type: ignore[arg-type]
    assert found.path.name == "y.safetensors"


def test_extract_round_trips_block_weights_and_output_options(
    workdir: Path, tmp_path: Path
) -> None:
    recipe = workdir / "mbw.yaml"
    recipe.write_text(
        "mergebuild: 1\n"
        "models:\n"
        "  a: models/anything-v3.safetensors\n"
        "  b: models/nai-full.safetensors\n"
        "  c: models/nai-sfw.safetensors\n"
        "merges:\n"
        '  x: a + (b - c) * preset("TRUE_CUBIC_HERMITE")\n'
        "  y: {method: weighted_sum, a: x, b: c, alpha: {unet: 0.5, vae: 0.25}}\n"
        "outputs:\n"
        "  y: {from: y, path: out/mbw.safetensors, dtype: bf16, prune: true,\n"
        "      exclude: ['^cond_stage_model[.].*[.]bias$'], vae: c}\n"
    )
    r = run_cli(recipe, "-q", cache=tmp_path / "c")
    assert r.code == 0, r.err
    extracted = tmp_path / "x" / "r.yaml"
    assert run_cli("extract", workdir / "out/mbw.safetensors", "-o", extracted).code == 0
    r = run_cli(extracted, "-q", "--models", workdir / "models", cache=tmp_path / "fresh")
    assert r.code == 0, r.err
    assert sha(extracted.parent / "y.safetensors") == sha(workdir / "out/mbw.safetensors")


def test_included_outputs_are_what_the_recipe_publishes(workdir: Path, cache: Path) -> None:
    inner = workdir / "inner" / "r.yaml"
    inner.parent.mkdir()
    inner.write_text(
        "mergebuild: 1\n"
        "models: {a: ../models/insta.safetensors, b: ../models/wd13.safetensors}\n"
        "merges: {mix: a * 0.5 + b * 0.5}\n"
        "outputs:\n"
        "  mix: {from: mix, path: mix.safetensors}\n"  # same name as its node: an alias
        "  a: {from: mix, path: a.safetensors, dtype: fp32}\n"  # same name as a model
    )
    outer = workdir / "outer.yaml"
    outer.write_text(
        "mergebuild: 1\n"
        "include: {inner: inner/r.yaml}\n"
        "merges: {both: inner.mix * 0.5 + inner.a * 0.5}\n"
        "outputs:\n"
        "  o_mix: {from: inner.mix, path: o/mix.safetensors}\n"
        "  o_a: {from: inner.a, path: o/a.safetensors}\n"
        "  both: {from: both, path: o/both.safetensors}\n"
    )
    r = run_cli(outer, "-q", cache=cache)
    assert r.code == 0, r.err
    assert run_cli(inner, "-q", cache=cache).code == 0
    for mine, theirs in (("o/mix", "inner/mix"), ("o/a", "inner/a")):
        got, want = (
            load_st(workdir / f"{mine}.safetensors"),
            load_st(workdir / f"{theirs}.safetensors"),
        )
        assert got.keys() == want.keys()
        for k in want:
            assert got[k].dtype == want[k].dtype and np.array_equal(got[k], want[k]), k


def test_lock_subsets_and_unused_nodes(workdir: Path, cache: Path) -> None:
    recipe = workdir / "two.yaml"
    recipe.write_text(
        "mergebuild: 1\n"
        "models: {a: models/insta.safetensors, b: models/wd13.safetensors,\n"
        "         c: models/gape60.safetensors}\n"
        "merges:\n"
        "  m1: a * 0.5 + b * 0.5\n"
        "  m2: a * 0.5 + c * 0.5\n"
        "  unused: b * 0.5 + c * 0.5\n"
        "outputs:\n"
        "  o1: {from: m1, path: out/o1.safetensors}\n"
        "  o2: {from: m2, path: out/o2.safetensors}\n"
    )
    assert run_cli("lock", recipe, "-q", cache=cache).code == 0
    v = run_cli("verify", recipe, cache=cache)
    assert v.code == 0, v.out + v.err  # a node no output uses is not "changed"
    before = yaml.safe_load(recipe.with_suffix(".lock").read_text())
    assert run_cli(recipe, "o1", "-q", "--update-lock", cache=cache).code == 0
    after = yaml.safe_load(recipe.with_suffix(".lock").read_text())
    assert after["models"]["c"] == before["models"]["c"] and "m2" in after["nodes"]
    assert after["outputs"]["o2"] == before["outputs"]["o2"]


def test_odd_inputs_and_command_lines(workdir: Path, cache: Path) -> None:
    from safetensors.numpy import load_file, save_file

    # metadata with NaN (json.loads accepts it; canonical JSON cannot carry it)
    src = workdir / "models/insta.safetensors"
    odd = workdir / "models/odd.safetensors"
    save_file(load_file(str(src)), str(odd), metadata={"sd_merge_recipe": '{"m": NaN}'})
    recipe = workdir / "odd.yaml"
    recipe.write_text(
        "mergebuild: 1\n"
        "models: {a: models/odd.safetensors, b: models/wd13.safetensors}\n"
        "merges:\n"
        "  m: {method: linear, inputs: [a, b], weights: [0.5, 0.5]}\n"
        "outputs: {o: {from: m, path: out/o.safetensors}}\n"
    )
    # options before the recipe: still the implicit `build`
    r = run_cli("-q", "--cache-dir", cache, recipe)
    assert r.code == 0, r.err
    # `linear` takes inputs: [..]; a stray `a:` is an unknown parameter, not silently dropped
    recipe.write_text(recipe.read_text().replace("inputs: [a, b]", "inputs: [a, b], a: a"))
    r = run_cli(recipe, cache=cache)
    assert r.code == 2 and "unknown parameter 'a'" in r.err
