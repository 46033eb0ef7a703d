"""`mergebuild compare`: per-group distances checked against numpy float64 on the same files,
recipe references, the PNG, determinism across threads, and errors."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import EXAMPLES, load_st, run_cli

REF, X1, X2, BASE = "anything-v3", "nai-full", "insta", "v1-5-pruned"


def group(key: str, by: str) -> str:
    """domain.md §4, written out again here: IN/M/OUT by UNet block, the final `out.` with
    OUT11, the rest of the UNet BASE; other components by their prefix."""
    if key.startswith("model.diffusion_model."):
        if by == "component":
            return "unet"
        rest = key.removeprefix("model.diffusion_model.")
        if m := re.match(r"input_blocks\.(\d+)\.", rest):
            return f"IN{int(m.group(1)):02}"
        if m := re.match(r"output_blocks\.(\d+)\.", rest):
            return f"OUT{int(m.group(1)):02}"
        if rest.startswith("middle_block."):
            return "M00"
        return "OUT11" if rest.startswith("out.") else "BASE"
    if key.startswith("cond_stage_model."):
        return "text_encoder"
    return "vae" if key.startswith("first_stage_model.") else "other"


def expected(models: Path, by: str, others: list[str], base: str | None) -> dict:
    y = load_st(models / f"{REF}.safetensors")
    b = load_st(models / f"{base}.safetensors") if base else None
    out = {}
    for name in others:
        x = load_st(models / f"{name}.safetensors")
        acc: dict[str, list[float]] = {}
        for k, yv in y.items():
            if k.endswith("position_ids") or k not in x or x[k].shape != yv.shape:
                continue
            if yv.dtype.kind != "f":
                continue
            g = group(k, by) if by != "key" else k
            yd, xd = yv.astype(np.float64).ravel(), x[k].astype(np.float64).ravel()
            s = acc.setdefault(g, [0.0] * 5)
            s[0] += float(((xd - yd) ** 2).sum())
            s[1] += float((yd**2).sum())
            if b is not None:
                bd = b[k].astype(np.float64).ravel()
                s[2] += float(((xd - bd) * (yd - bd)).sum())
                s[3] += float(((xd - bd) ** 2).sum())
                s[4] += float(((yd - bd) ** 2).sum())
        out[name] = {
            g: (math.sqrt(s[0]) / math.sqrt(s[1]), s[2] / math.sqrt(s[3] * s[4]) if b else None)
            for g, s in acc.items()
        }
    return out


@pytest.mark.parametrize(("by", "base"), [("block", BASE), ("component", None), ("key", BASE)])
def test_figures_equal_numpy(by: str, base: str | None, model_dir: Path) -> None:
    args = [model_dir / f"{n}.safetensors" for n in (REF, X1, X2)]
    extra = ["--base", model_dir / f"{base}.safetensors"] if base else []
    r = run_cli("compare", *args, *extra, "--by", by, "--json")
    assert r.code == 0, r.err
    want = expected(model_dir, by, [X1, X2], base)
    rows = r.json["rows"]
    got = {(row["model"], row["group"]): row for row in rows}
    for name in (X1, X2):
        label = f"{name}.safetensors"
        assert {g for m, g in got if m == label} == set(want[name])
        for g, (rel, cos) in want[name].items():
            row = got[(label, g)]
            assert row["rel_l2"] == pytest.approx(rel, rel=1e-9)
            if base:
                assert row["cosine"] == pytest.approx(cos, rel=1e-9, abs=1e-12)
            else:
                assert row["cosine"] is None
    if by == "block":
        assert r.json["groups"][:3] == ["BASE", "IN00", "IN01"]
        assert r.json["groups"][-3:] == ["text_encoder", "vae", "other"]


def test_threads_do_not_change_a_figure(model_dir: Path) -> None:
    args = ["compare", *(model_dir / f"{n}.safetensors" for n in (REF, X1, X2)), "--json"]
    base = ["--base", model_dir / f"{BASE}.safetensors"]
    one = run_cli(*args, *base, "-j", "1")
    two = run_cli(*args, *base, "-j", "2")
    assert one.code == two.code == 0
    assert one.out == two.out


def test_a_model_against_itself_is_zero(model_dir: Path) -> None:
    m = model_dir / f"{REF}.safetensors"
    r = run_cli("compare", m, m, "--by", "component", "--json")
    assert r.code == 0, r.err
    assert {row["rel_l2"] for row in r.json["rows"]} == {0.0}


def test_recipe_references_and_png(workdir: Path, cache: Path) -> None:
    recipe = workdir / "r.yaml"
    shutil.copy(EXAMPLES / "anything_nsfw_gape.yaml", recipe)
    ref = workdir / "models" / f"{REF}.safetensors"
    # not built yet: a readable refusal that names the command to run
    r = run_cli("compare", ref, f"{recipe}:anything-nsfw-gape", "--cache-dir", cache)
    assert r.code != 0 and "Traceback" not in r.err and "not built" in r.err
    r = run_cli("compare", ref, f"{recipe}:anything_nsfw", "--cache-dir", cache)
    assert r.code != 0 and "not in the cache" in r.err
    assert run_cli(recipe, cache=cache).code == 0
    png = workdir / "plots" / "cmp.png"
    r = run_cli(
        "compare", ref, f"{recipe}:anything-nsfw-gape", f"{recipe}:anything_nsfw",
        "--base", workdir / "models" / f"{BASE}.safetensors", "--png", png,
        "--cache-dir", cache, "--json",
    )  # fmt: skip
    assert r.code == 0, r.err
    assert r.json["models"] == ["anything-nsfw-gape", "anything_nsfw"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in png.parent.iterdir()] == ["cmp.png"]  # no temp left behind
    # the output reference is the published file's bytes
    out = workdir / "out" / "anything-nsfw-gape.safetensors"
    direct = run_cli("compare", ref, out, "--json")
    via = {(row["group"], row["rel_l2"]) for row in r.json["rows"]
           if row["model"] == "anything-nsfw-gape"}  # fmt: skip
    assert via == {(row["group"], row["rel_l2"]) for row in direct.json["rows"]}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["missing.safetensors", "other.safetensors"], "no such file"),
        (["{m}"], "at least one model"),
        (["{m}", "r.yaml:nothing"], "no such file"),
    ],
)
def test_errors_are_one_readable_line(args: list[str], message: str, model_dir: Path) -> None:
    m = str(model_dir / f"{REF}.safetensors")
    r = run_cli("compare", *[a.format(m=m) for a in args])
    assert r.code != 0
    assert message in r.err and "Traceback" not in r.err
    assert json.loads(run_cli("compare", *[a.format(m=m) for a in args], "--json").out)["error"]


def test_a_swept_node_compares_all_its_members_and_plots_them(workdir: Path, cache: Path) -> None:
    """`RECIPE:nsfw` of a sweep stands for its members; X − ref = alpha·(full − sfw), so each
    group's distance grows in proportion to alpha (checked from the members' own figures)."""
    recipe = workdir / "s.yaml"
    recipe.write_text(
        "mergebuild: 1\nmodels:\n  anything: models/anything-v3.safetensors\n"
        "  nai_full: models/nai-full.safetensors\n  nai_sfw: models/nai-sfw.safetensors\n"
        "merges:\n  nsfw:\n    expr: anything + (nai_full - nai_sfw) * alpha\n"
        "    sweep: {alpha: [0.25, 0.5, 1.0]}\n"
        'outputs:\n  nsfw: {from: nsfw, path: "out/nsfw-{alpha}.safetensors"}\n'
    )
    assert run_cli(recipe, "-q", cache=cache).code == 0
    png = workdir / "sweep.png"
    ref = workdir / "models" / f"{REF}.safetensors"
    r = run_cli(
        "compare", ref, f"{recipe}:nsfw", "--png", png, "--cache-dir", cache, "--json",
        "--by", "component",
    )  # fmt: skip
    assert r.code == 0, r.err
    members = ["nsfw[alpha=0.25]", "nsfw[alpha=0.5]", "nsfw[alpha=1]"]
    assert r.json["models"] == members
    rel = {(row["model"], row["group"]): row["rel_l2"] for row in r.json["rows"]}
    for group in ("unet", "text_encoder"):
        quarter, half, one = (rel[(m, group)] for m in members)
        assert quarter > 0 and math.isclose(half / quarter, 2, rel_tol=2e-2), group
        assert math.isclose(one / quarter, 4, rel_tol=2e-2), group
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # a member by its own name, and the published file, give the same figures
    one = run_cli(
        "compare", ref, workdir / "out" / "nsfw-0.5.safetensors", "--json", "--by", "component"
    )
    assert {(row["group"], row["rel_l2"]) for row in one.json["rows"]} == {
        (g, v) for (m, g), v in rel.items() if m == "nsfw[alpha=0.5]"
    }


@pytest.mark.parametrize("with_base", [False, True])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
def test_compiled_chunk_sums_equal_numpy(with_base: bool, dtype: str) -> None:
    """The compiled sums (_kernels.difference_sums, used for full-size models) give
    numpy's float64 figures, every lane and the partial last tile included, and the same bits
    on every call."""
    import torch

    from mergebuild import compare

    g = np.random.default_rng(7)
    n = 3 * compare.SUM_TILE * 8 + 1234  # three full tiles and a ragged one
    t = getattr(torch, dtype)
    base = g.standard_normal(n).astype(np.float32)
    y = torch.from_numpy(base + 0.01 * g.standard_normal(n).astype(np.float32)).to(t)
    x = torch.from_numpy(base + 0.02 * g.standard_normal(n).astype(np.float32)).to(t)
    b = torch.from_numpy(base).to(t) if with_base else None
    got = compare._chunk_sums(y, x, b, 0, n, compiled=True)
    assert got == compare._chunk_sums(y, x, b, 0, n, compiled=True)
    yd, xd = y.double().numpy(), x.double().numpy()
    want = [((xd - yd) ** 2).sum(), (yd**2).sum()]
    if b is not None:
        bd = b.double().numpy()
        want += [((xd - bd) * (yd - bd)).sum(), ((xd - bd) ** 2).sum(), ((yd - bd) ** 2).sum()]
    have = [got.dxy, got.yy] + ([got.ab, got.aa, got.bb] if b is not None else [])
    assert have == pytest.approx(want, rel=1e-12)
    assert got.elements == n
    if b is None:
        assert got.ab == got.aa == got.bb == 0.0


ADVICE_PROBE = """
import json, os, sys
from pathlib import Path
from mergebuild import compare
from mergebuild.engine import readahead

seen = {}
start = readahead.Readahead.start
def recorded_start(self):
    seen["torch"] = "torch" in sys.modules
    return start(self)
readahead.Readahead.start = recorded_start
advised = []
fadvise = os.posix_fadvise
def recorded(fd, offset, length, advice):
    if advice == os.POSIX_FADV_WILLNEED:
        advised.append((os.readlink(f"/proc/self/fd/{fd}"), offset, length))
    return fadvise(fd, offset, length, advice)
os.posix_fadvise = recorded
paths = [Path(p) for p in sys.argv[1:]]
compare.compare(paths[:3], [p.name for p in paths[:3]], paths[3])
print(json.dumps({"torch": "torch" in sys.modules, "before": seen["torch"], "advised": advised}))
"""


def _data_ranges(path: Path) -> dict[str, tuple[int, int, str, list[int]]]:
    """key → (file offset, end, dtype, shape), from the safetensors header (its format: an
    8-byte little-endian length, then JSON with offsets relative to the data start)."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    header.pop("__metadata__", None)
    start = 8 + n
    return {
        k: (start + v["data_offsets"][0], start + v["data_offsets"][1], v["dtype"], v["shape"])
        for k, v in header.items()
    }


def test_every_compared_byte_is_asked_for_before_torch_loads(model_dir: Path) -> None:
    """The disk must not idle while torch and the compiled loops load: the reads of every
    compared tensor, in every file, are advised ahead, from a process without torch yet."""
    import subprocess
    import sys

    files = [model_dir / f"{n}.safetensors" for n in (REF, X1, X2, BASE)]
    r = subprocess.run(
        [sys.executable, "-c", ADVICE_PROBE, *map(str, files)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    got = json.loads(r.stdout)
    assert got["before"] is False and got["torch"] is True
    layouts = [_data_ranges(f) for f in files]
    compared = [
        k
        for k, (_, _, dtype, shape) in layouts[0].items()
        if dtype in ("F16", "BF16", "F32", "F64") and not k.endswith("position_ids")
        and all(k in lay and lay[k][3] == shape for lay in layouts)
    ]  # fmt: skip
    assert len(compared) > 100
    for f, lay in zip(files, layouts, strict=True):
        spans = sorted((o, o + n) for p, o, n in got["advised"] if p == str(f.resolve()))
        for k in compared:
            lo, hi = lay[k][:2]
            assert any(a <= lo and hi <= b for a, b in spans), (f.name, k)
