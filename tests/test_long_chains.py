"""Long and deep recipes: thousands of nodes build (no recursion per node), give the numbers a
step-by-step numpy computation gives, and `-n` plans ten thousand nodes.

Models are a few tiny tensors written with safetensors.numpy, so a 1000-node build costs
seconds. The reference rounds every node to its dtype, as the engine does for cached and
uncached nodes alike; it never calls mergebuild code. No timing is asserted.
"""

from __future__ import annotations

import json
import os
import resource
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from conftest import SRC, load_st, run_cli

FLOAT_KEYS = {"w0": (4, 8), "w1": (16,), "w2": (2, 3, 4)}
DTYPES = {"fp16": np.float16, "fp32": np.float32}


def f32(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float32)


def write_models(d: Path, seed: int = 0) -> dict[str, dict[str, np.ndarray]]:
    """`a` and `b` (fp16 weights, an int64 buffer); `only_a` is missing from `b` (kept from a),
    `only_b` is missing from `a` (dropped)."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    d.mkdir(parents=True, exist_ok=True)
    models = {}
    for name, extra in (("a", "only_a"), ("b", "only_b")):
        t = {k: rng.standard_normal(s).astype(np.float16) for k, s in FLOAT_KEYS.items()}
        t[extra] = rng.standard_normal(8).astype(np.float16)
        t["counter"] = rng.integers(0, 1000, 5).astype(np.int64)
        save_file(t, str(d / f"{name}.safetensors"))
        models[name] = t
    return models


@dataclass
class Node:
    name: str
    method: str  # weighted_sum (a=prev, b=b) | add_difference (a=prev, b=b, c=a)
    alpha: float
    dtype: str  # auto | fp16 | fp32
    cache: bool | None


def chain(n: int, pattern: str) -> list[Node]:
    """`n` nodes, each consuming the one before; alphas with two decimals (no power of two,
    so every step rounds)."""
    nodes = []
    for k in range(1, n + 1):
        alpha = ((k * 37) % 89 + 5) / 100
        method = "add_difference" if k % 7 == 0 else "weighted_sum"
        if method == "add_difference":
            alpha = ((k * 13) % 17 + 1) / 100
        dtype, cache = "auto", None
        if pattern == "no_cache":
            cache = False
        elif pattern == "mixed":  # odd nodes in memory only; dtypes switch along the chain
            cache = False if k % 2 else None
            dtype = "fp32" if k % 3 == 0 else "fp16" if k % 5 == 0 else "auto"
        nodes.append(Node(f"n{k}", method, alpha, dtype, cache))
    return nodes


def recipe(nodes: list[Node], expressions: bool) -> str:
    lines = ["mergebuild: 1", "models:", "  a: models/a.safetensors", "  b: models/b.safetensors"]
    lines.append("merges:")
    prev = "a"
    for nd in nodes:
        if expressions and nd.dtype == "auto" and nd.cache is None:
            if nd.method == "weighted_sum":
                lines.append(f"  {nd.name}: {prev} * {round(1 - nd.alpha, 2)} + b * {nd.alpha}")
            else:
                lines.append(f"  {nd.name}: {prev} + (b - a) * {nd.alpha}")
        else:
            slots = f"a: {prev}, b: b" + (", c: a" if nd.method == "add_difference" else "")
            extra = f", dtype: {nd.dtype}" if nd.dtype != "auto" else ""
            extra += ", cache: false" if nd.cache is False else ""
            lines.append(f"  {nd.name}: {{method: {nd.method}, {slots}, alpha: {nd.alpha}{extra}}}")
        prev = nd.name
    lines += ["outputs:", f"  final: {{from: {prev}, path: out/final.safetensors}}"]
    return "\n".join(lines) + "\n"


def reference(models: dict, nodes: list[Node]) -> dict[str, np.ndarray]:
    """The chain computed step by step in float32, each node rounded to its dtype."""
    a, b = models["a"], models["b"]
    x = {k: v for k, v in a.items()}
    for nd in nodes:
        widest = np.float32 if any(v.dtype == np.float32 for v in x.values()) else np.float16
        dt = DTYPES[nd.dtype] if nd.dtype != "auto" else widest
        al = np.float32(nd.alpha)
        y = {}
        for k, v in x.items():
            if v.dtype == np.int64:
                y[k] = v  # integer buffers are copied from a
            elif k not in b:
                y[k] = v.astype(dt)  # kept from a, in the node's dtype
            elif nd.method == "weighted_sum":
                y[k] = (f32(v) * np.float32(1 - nd.alpha) + f32(b[k]) * al).astype(dt)
            else:
                y[k] = ((f32(b[k]) - f32(a[k])) * al + f32(v)).astype(dt)
        x = y
    return x


def header_bytes(path: Path) -> int:
    with open(path, "rb") as f:
        return struct.unpack("<Q", f.read(8))[0]


def run_with_file_limit(
    recipe_path: Path, cache: Path, soft: int = 1024
) -> subprocess.CompletedProcess[str]:
    """A build under the soft open-file limit many systems default to (1024), where the
    hard limit allows more: a lock held per node must not exhaust it."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    limit = soft if hard == resource.RLIM_INFINITY else min(soft, hard)
    return subprocess.run(
        [sys.executable, "-m", "mergebuild", str(recipe_path), "--json", "-q"],
        env={**os.environ, "PYTHONPATH": str(SRC), "MERGEBUILD_CACHE_DIR": str(cache)},
        capture_output=True,
        text=True,
        timeout=900,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard)),
    )


@pytest.fixture
def chain_dir(tmp_path: Path) -> tuple[Path, dict]:
    work = tmp_path / "work"
    return work, write_models(work / "models")


@pytest.mark.parametrize(
    ("pattern", "expressions"),
    [("cached", True), ("no_cache", False), ("mixed", False)],
    ids=["cached-expressions", "cache-false-explicit", "mixed-cache-and-dtypes"],
)
def test_1000_node_chain_builds_and_matches_numpy(
    chain_dir: tuple[Path, dict], cache: Path, pattern: str, expressions: bool
) -> None:
    work, models = chain_dir
    nodes = chain(1000, pattern)
    (work / "r.yaml").write_text(recipe(nodes, expressions))
    r = run_with_file_limit(work / "r.yaml", cache)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "RecursionError" not in r.stderr
    report = json.loads(r.stdout)
    assert report["summary"]["built"] == 1001
    out = load_st(work / "out" / "final.safetensors")
    want = reference(models, nodes)
    assert set(out) == set(want) == {*FLOAT_KEYS, "only_a", "counter"}
    for k, v in want.items():
        assert out[k].dtype == v.dtype, k
        np.testing.assert_array_equal(out[k], v, err_msg=k)
    # a cache object for every node but the cache: false ones and the last (the output's)
    stored = {n["name"] for n in report["nodes"] if n["kind"] == "merge" and n["path"]}
    assert stored == {nd.name for nd in nodes[:-1] if nd.cache is not False}
    # provenance grows linearly with the chain: one entry per node, a few hundred bytes each
    size = header_bytes(work / "out" / "final.safetensors")
    assert size < 1000 * 1200, size
    # a rebuild is fully cached and gives the same file
    before = (work / "out" / "final.safetensors").read_bytes()
    again = run_cli(work / "r.yaml", "--json", "-q", cache=cache, timeout=900)
    assert again.code == 0, again.err[-2000:]
    assert again.json["summary"]["built"] == 0
    assert (work / "out" / "final.safetensors").read_bytes() == before


def test_chain_cached_in_several_passes_equals_one_pass_in_memory(
    chain_dir: tuple[Path, dict], tmp_path: Path
) -> None:
    """A long cached chain is written in several passes, each reading the previous pass's
    results from the cache; with `cache: false` everything stays in one pass, in memory.
    The bytes must not differ (provenance included: `cache` is not part of it)."""
    work, _ = chain_dir
    nodes = chain(150, "cached")
    (work / "cached.yaml").write_text(recipe(nodes, False).replace("final.", "cached."))
    for nd in nodes:
        nd.cache = False
    (work / "memory.yaml").write_text(recipe(nodes, False).replace("final.", "memory."))
    for name in ("cached", "memory"):
        r = run_cli(work / f"{name}.yaml", "-q", cache=tmp_path / f"cache-{name}", timeout=600)
        assert r.code == 0, r.err[-2000:]
    cached = (work / "out" / "cached.safetensors").read_bytes()
    assert cached == (work / "out" / "memory.safetensors").read_bytes()
    objects = list((tmp_path / "cache-cached" / "objects").glob("*/*.safetensors"))
    assert len(objects) == 150  # 149 nodes and the output (n150 lives in it), over passes
    assert len(list((tmp_path / "cache-memory" / "objects").glob("*/*.safetensors"))) == 1


def test_changing_the_middle_of_a_long_chain_rebuilds_the_rest(
    chain_dir: tuple[Path, dict], cache: Path
) -> None:
    work, models = chain_dir
    nodes = chain(400, "cached")
    (work / "r.yaml").write_text(recipe(nodes, False))
    assert run_cli(work / "r.yaml", "-q", cache=cache, timeout=600).code == 0
    nodes[199].alpha = 0.11
    (work / "r.yaml").write_text(recipe(nodes, False))
    r = run_cli(work / "r.yaml", "--json", "-q", cache=cache, timeout=600)
    assert r.code == 0, r.err[-2000:]
    built = {n["name"] for n in r.json["nodes"] if n["status"] == "built"}
    assert built == {f"n{k}" for k in range(200, 401)} | {"final"}
    out = load_st(work / "out" / "final.safetensors")
    for k, v in reference(models, nodes).items():
        np.testing.assert_array_equal(out[k], v, err_msg=k)


def diamonds(layers: int) -> tuple[str, list[tuple[str, str, str, float]]]:
    """m0 from a, b; per layer lK, rK from m(K-1) and mK from both: 2**layers paths."""
    steps = [("m0", "a", "b", 0.5)]
    for k in range(1, layers + 1):
        steps += [
            (f"l{k}", f"m{k - 1}", "a", 0.25),
            (f"r{k}", f"m{k - 1}", "b", 0.75),
            (f"m{k}", f"l{k}", f"r{k}", 0.5),
        ]
    return f"m{layers}", steps


@pytest.mark.parametrize("cache_false", [False, True], ids=["cached", "cache-false"])
def test_diamond_dag_with_exponentially_many_paths(
    chain_dir: tuple[Path, dict], cache: Path, cache_false: bool
) -> None:
    """100 stacked diamonds (2**100 paths): each node is evaluated once per key."""
    work, models = chain_dir
    last, steps = diamonds(100)
    extra = ", cache: false" if cache_false else ""
    lines = ["mergebuild: 1", "models: {a: models/a.safetensors, b: models/b.safetensors}"]
    lines.append("merges:")
    for name, x, y, al in steps:
        lines.append(f"  {name}: {{method: weighted_sum, a: {x}, b: {y}, alpha: {al}{extra}}}")
    lines += ["outputs:", f"  final: {{from: {last}, path: out/final.safetensors}}"]
    (work / "r.yaml").write_text("\n".join(lines) + "\n")
    r = run_cli(work / "r.yaml", "-q", cache=cache, timeout=600)
    assert r.code == 0, r.err[-2000:]
    out = load_st(work / "out" / "final.safetensors")
    for k in FLOAT_KEYS:
        vals = {"a": models["a"][k], "b": models["b"][k]}
        for name, x, y, al in steps:
            s = f32(vals[x]) * np.float32(1 - al) + f32(vals[y]) * np.float32(al)
            vals[name] = s.astype(np.float16)
        np.testing.assert_array_equal(out[k], vals[last], err_msg=k)


def test_wide_dag_of_many_outputs(chain_dir: tuple[Path, dict], cache: Path) -> None:
    """80 independent merges, each its own output (more files than one pass writes)."""
    work, models = chain_dir
    lines = ["mergebuild: 1", "models: {a: models/a.safetensors, b: models/b.safetensors}"]
    lines.append("merges:")
    alphas = [round((k + 1) / 83, 6) for k in range(80)]
    for k, al in enumerate(alphas):
        lines.append(f"  w{k}: {{method: weighted_sum, a: a, b: b, alpha: {al}}}")
    lines.append("outputs:")
    lines += [f"  o{k}: {{from: w{k}, path: out/o{k}.safetensors}}" for k in range(80)]
    (work / "r.yaml").write_text("\n".join(lines) + "\n")
    r = run_cli(work / "r.yaml", "-q", cache=cache, timeout=600)
    assert r.code == 0, r.err[-2000:]
    for k, al in enumerate(alphas):
        out = load_st(work / "out" / f"o{k}.safetensors")
        for key in FLOAT_KEYS:
            want = f32(models["a"][key]) * np.float32(1 - al) + f32(models["b"][key]) * (
                np.float32(al)
            )
            np.testing.assert_array_equal(out[key], want.astype(np.float16), err_msg=key)


@pytest.mark.parametrize("pattern", ["cached", "no_cache"])
def test_dry_run_plans_10000_nodes(chain_dir: tuple[Path, dict], cache: Path, pattern: str) -> None:
    work, _ = chain_dir
    nodes = chain(10_000, pattern)
    (work / "r.yaml").write_text(recipe(nodes, pattern == "cached"))
    r = run_cli(work / "r.yaml", "-n", "--json", cache=cache, timeout=900)
    assert r.code == 0, r.err[-2000:]
    report = json.loads(r.out)
    assert report["summary"]["to_build"] == 10_001
    assert [n["name"] for n in report["nodes"][:3]] == ["n1", "n2", "n3"]
    assert not (work / "out").exists()
    g = run_cli("graph", work / "r.yaml", cache=cache, timeout=900)
    assert g.code == 0, g.err[-2000:]
    assert g.out.count("\nmerge ") == 10_000
