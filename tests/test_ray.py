"""`--executor ray`: sweep members built as Ray tasks into a shared cache dir.

One real Ray cluster for the module (`ray start --head --block` on loopback, stopped by its
own process group after); the CLI attaches to it through RAY_ADDRESS. Outputs are compared
byte for byte with a local build in another cache dir, and with numpy.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from conftest import SRC, load_st, run_cli

pytest.importorskip("ray")  # the `ray` extra (in `dev`, so `make test` has it)

ALPHAS = ["0.25", "0.5", "0.75", "1"]
RECIPE = f"""\
mergebuild: 1
models:
  anything: models/anything-v3.safetensors
  nai_full: models/nai-full.safetensors
  nai_sfw: models/nai-sfw.safetensors
  insta: models/insta.safetensors
merges:
  base: {{method: weighted_sum, a: anything, b: insta, alpha: 0.3}}
  mix:
    expr: base + (nai_full - nai_sfw) * alpha
    sweep: {{alpha: [{", ".join(ALPHAS)}]}}
outputs:
  mix: {{from: mix, path: "out/mix-{{alpha}}.safetensors"}}
"""
# base feeds the sweep: it is stored and built first; each member is an output built after it
ENTRIES = 1 + len(ALPHAS)
# Ray's own switch for a cluster of this machine only: every service on 127.0.0.1
LOOPBACK = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
# the test cluster's own token (Ray's token authentication), never ~/.ray/auth_token
AUTH = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_address(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A 2-CPU head node on loopback whose workers import this checkout's src/."""
    port = _free_port()
    logs = tmp_path_factory.mktemp("raylog")
    temp = Path(f"/tmp/mbray-{os.getpid()}")  # Ray's unix sockets need a short path
    env = {
        **os.environ,
        **LOOPBACK,
        **AUTH,
        "PYTHONPATH": str(SRC),
        "RAY_agent_register_timeout_ms": "120000",
    }
    ray_cli = Path(sys.executable).parent / "ray"
    with open(logs / "out", "wb") as out:
        head = subprocess.Popen(
            [
                str(ray_cli),
                "start",
                "--head",
                "--block",
                f"--port={port}",
                "--num-cpus=2",
                "--include-dashboard=false",
                "--disable-usage-stats",
                "--object-store-memory=100000000",
                f"--temp-dir={temp}",
            ],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: stopped by its id, nothing else
        )
    try:
        deadline = time.monotonic() + 180
        while b"Ray runtime started" not in (logs / "out").read_bytes():
            if head.poll() is not None or time.monotonic() > deadline:
                pytest.fail("ray start failed:\n" + (logs / "out").read_text()[-3000:])
            time.sleep(0.5)
        yield f"127.0.0.1:{port}"
    finally:
        # its process group holds the services it started: SIGTERM, then SIGKILL what is left
        with contextlib.suppress(ProcessLookupError):
            os.killpg(head.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            head.wait(timeout=5)
        time.sleep(1)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(head.pid, signal.SIGKILL)
        head.wait()
        shutil.rmtree(temp, ignore_errors=True)


def _ray_env(address: str) -> dict[str, str]:
    return {**LOOPBACK, **AUTH, "RAY_ADDRESS": address}


def _work(base: Path, model_dir: Path, name: str) -> Path:
    """A recipe dir using the demo models (by symlink); returns the recipe."""
    w = base / name
    w.mkdir()
    (w / "models").symlink_to(model_dir)
    (w / "r.yaml").write_text(RECIPE)
    return w / "r.yaml"


def _outputs(recipe: Path) -> dict[str, bytes]:
    return {a: (recipe.parent / "out" / f"mix-{a}.safetensors").read_bytes() for a in ALPHAS}


def _fake_ray(tmp: Path) -> str:
    """A PYTHONPATH whose `ray` cannot be imported (as when the extra is not installed)."""
    fake = tmp / "noray"
    (fake / "ray").mkdir(parents=True, exist_ok=True)
    (fake / "ray" / "__init__.py").write_text("raise ImportError(\"No module named 'ray'\")\n")
    return f"{fake}{os.pathsep}{SRC}"


def _f32(a: np.ndarray) -> np.ndarray:
    return a.astype(np.float32)


def _check_numbers(recipe: Path, model_dir: Path) -> None:
    """Each member against numpy: base stored as fp16, then base + (full - sfw) * alpha."""
    m = {n: load_st(model_dir / f"{n}.safetensors") for n in ("anything-v3", "insta")}
    m.update({n: load_st(model_dir / f"{n}.safetensors") for n in ("nai-full", "nai-sfw")})
    for alpha in ALPHAS:
        out = load_st(recipe.parent / "out" / f"mix-{alpha}.safetensors")
        compared = 0
        for k, a in m["anything-v3"].items():
            if a.dtype.kind != "f":
                continue
            base = (_f32(a) * np.float32(0.7) + _f32(m["insta"][k]) * np.float32(0.3)).astype(
                np.float16
            )
            want = _f32(base) + (_f32(m["nai-full"][k]) - _f32(m["nai-sfw"][k])) * np.float32(
                float(alpha)
            )
            np.testing.assert_allclose(
                _f32(out[k]), want, rtol=2e-3, atol=2e-3, err_msg=f"{alpha} {k}"
            )
            compared += 1
        assert compared > 100


def _statuses(report: dict) -> dict[str, str]:
    """key → status of every entry the build writes (outputs and stored nodes)."""
    return {n["key"]: n["status"] for n in report["nodes"] if n["kind"] == "output" or n["path"]}


CLIENT_ARGS = ("--json", "--executor", "ray")


def _clients_held(
    recipe: Path,
    cache: Path,
    address: str,
    tmp: Path,
    clients: int,
    on_submitted: Callable[[], None] | None = None,
) -> list[tuple[int, str, str]]:
    """CLI clients started at once on one cluster and one cache dir; (code, out, err) each.
    The test holds `base`'s cache lock until every client has planned and submitted its tasks
    (then runs `on_submitted`): the tasks then race for each key, deterministically, since no
    client could find anything cached when planning."""
    plan = run_cli(recipe, "-n", "--json", cache=cache)
    assert plan.code == 0, plan.err
    base_key = next(n["key"] for n in plan.json["nodes"] if n["name"] == "base")
    from mergebuild.cache import CacheStore

    env = {**os.environ, **_ray_env(address), "PYTHONPATH": str(SRC)}
    env["MERGEBUILD_CACHE_DIR"] = str(cache)
    lock = CacheStore(cache).lock(base_key)
    lock.acquire()
    procs: list[subprocess.Popen] = []
    outs = [tmp / f"{recipe.parent.name}-out{n}" for n in range(clients)]
    errs = [tmp / f"{recipe.parent.name}-err{n}" for n in range(clients)]
    try:
        for out_path, err_path in zip(outs, errs, strict=True):
            with open(out_path, "wb") as out, open(err_path, "wb") as err:
                cmd = [sys.executable, "-m", "mergebuild", str(recipe), *CLIENT_ARGS]
                procs.append(subprocess.Popen(cmd, env=env, stdout=out, stderr=err))
        deadline = time.monotonic() + 150
        while not all(b"Ray tasks" in e.read_bytes() for e in errs):
            assert all(p.poll() is None for p in procs), [e.read_text() for e in errs]
            assert time.monotonic() < deadline, "clients did not submit their tasks"
            time.sleep(0.2)
        time.sleep(1)  # let the `base` tasks reach the lock
        if on_submitted is not None:
            on_submitted()
    finally:
        lock.release()
        for p in procs:
            try:
                p.wait(timeout=180)
            finally:
                if p.poll() is None:
                    p.kill()
    return [
        (p.returncode, o.read_text(), e.read_text())
        for p, o, e in zip(procs, outs, errs, strict=True)
    ]


def _two_clients(recipe: Path, cache: Path, address: str, tmp: Path) -> list[dict]:
    runs = _clients_held(recipe, cache, address, tmp, 2)
    assert [code for code, _, _ in runs] == [0, 0], runs
    for _, _, err in runs:
        assert f"{ENTRIES} cache entries to build as Ray tasks" in err
    return [json.loads(out) for _, out, _ in runs]


def _task_fails(tmp: Path, model_dir: Path, address: str) -> None:
    """A task's error (an input changed after the driver hashed it) ends the build with its
    one message: exit 1, no traceback, no output, nothing cached for the failed entry."""
    w = tmp / "changed"
    shutil.copytree(model_dir, w / "models")
    (w / "r.yaml").write_text(RECIPE)
    insta = w / "models" / "insta.safetensors"
    cache = tmp / "c-changed"

    def touch() -> None:
        st = insta.stat()
        os.utime(insta, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))

    [(code, out, err)] = _clients_held(w / "r.yaml", cache, address, tmp, 1, touch)
    assert code == 1, (out, err)
    assert "error: 'base': input model 'insta'" in err and "changed during the build" in err
    assert "Traceback" not in err
    assert json.loads(out)["exit_code"] == 1
    assert not (w / "out").exists()
    assert not list((cache / "objects").rglob("*.safetensors"))


def test_sweep_on_ray(tmp_path: Path, model_dir: Path, ray_address: str) -> None:
    """One test, so that `-n 2` starts one cluster: a 4-member sweep built by two clients at
    once equals a local build, builds each entry once, and is then all cached without Ray."""
    local = _work(tmp_path, model_dir, "local")
    r = run_cli(local, "--json", "-j", "2", cache=tmp_path / "c-local")
    assert r.code == 0, r.err
    recipe = _work(tmp_path, model_dir, "ray")
    cache = tmp_path / "c-ray"
    reports = _two_clients(recipe, cache, ray_address, tmp_path)

    # bytes identical to the local build (other cache dir), numbers as numpy computes them
    assert _outputs(recipe) == _outputs(local)
    _check_numbers(recipe, model_dir)
    assert _statuses(reports[0]).keys() == _statuses(r.json).keys()  # the same keys

    # each entry built by exactly one of the two clients, found cached by the other
    statuses = [_statuses(rep) for rep in reports]
    assert len(statuses[0]) == ENTRIES and statuses[0].keys() == statuses[1].keys()
    for key in statuses[0]:
        assert sorted(s[key] for s in statuses) == ["built", "cached"], (key, statuses)
    meanwhile = "in cache (built meanwhile by another build)"
    for rep, st in zip(reports, statuses, strict=True):
        for n in rep["nodes"]:
            if n["key"] in st:
                assert (n["status"] == "cached") == (n["reason"] == meanwhile), n
    # a member of the sweep is computed in its output's pass, by whichever client built that
    for alpha in ALPHAS:
        name = f"mix[alpha={alpha}]"
        built = [
            n["status"]
            for rep in reports
            for n in rep["nodes"]
            if n["name"] == name and n["kind"] == "merge"
        ]
        assert sorted(built) == ["built", "cached"], (name, built)

    # every entry published with its sidecar, no temp left behind
    objects = sorted((cache / "objects").rglob("*"))
    assert sorted(p.stem for p in objects if p.suffix == ".safetensors") == sorted(statuses[0])
    assert sorted(p.stem for p in objects if p.suffix == ".json") == sorted(statuses[0])
    assert not [p for p in objects if p.is_file() and p.suffix not in (".json", ".safetensors")]

    # again: all cached, no task, not even Ray imported (a `ray` that cannot be imported);
    # with --json (the planning path) and without (the no-op stamp)
    outputs = _outputs(recipe)
    for args in (["--json"], [], ["mix[alpha=0.5]", "--json"], ["-n"]):
        again = run_cli(
            recipe,
            *args,
            "--executor",
            "ray",
            cache=cache,
            env={"PYTHONPATH": _fake_ray(tmp_path), "RAY_ADDRESS": "127.0.0.1:1"},
        )
        assert again.code == 0, again.err
        assert "Ray tasks" not in again.err + again.out
        if "--json" in args:
            assert set(_statuses(again.json).values()) == {"cached"}, again.json
    assert _outputs(recipe) == outputs

    # a corrupted entry: the task that rebuilds it says so (its warning reaches the driver)
    out_key = next(
        n["key"]
        for n in reports[0]["nodes"]
        if n["name"] == "mix[alpha=1]" and n["kind"] == "output"
    )
    obj = cache / "objects" / out_key[:2] / f"{out_key}.safetensors"
    data = bytearray(obj.read_bytes())
    data[-3] ^= 0xFF
    obj.unlink()  # a new inode: the published output keeps its bytes
    obj.write_bytes(bytes(data))
    fixed = run_cli(recipe, "--json", "--executor", "ray", cache=cache, env=_ray_env(ray_address))
    assert fixed.code == 0, fixed.err
    assert f"cache entry {out_key} ('mix[alpha=1]') corrupted: checksum mismatch" in fixed.err
    assert [k for k, v in _statuses(fixed.json).items() if v == "built"] == [out_key]
    assert obj.read_bytes() == (local.parent / "out" / "mix-1.safetensors").read_bytes()
    assert _outputs(recipe) == _outputs(local)

    _task_fails(tmp_path, model_dir, ray_address)


def test_units_follow_cache_boundaries(workdir: Path, cache: Path) -> None:
    """A task per file written; nodes without a cache file are computed in each pass that
    needs them; a task waits for the stored nodes it reads."""
    from mergebuild.build import Builder
    from mergebuild.build.ray_executor import plan_units, sub_plan
    from mergebuild.cache import CacheStore
    from mergebuild.recipe import load_recipe

    path = workdir / "u.yaml"
    path.write_text(
        "mergebuild: 1\n"
        "models:\n"
        "  anything: models/anything-v3.safetensors\n"
        "  insta: models/insta.safetensors\n"
        "  wd13: models/wd13.safetensors\n"
        "  nai_full: models/nai-full.safetensors\n"
        "  nai_sfw: models/nai-sfw.safetensors\n"
        "merges:\n"
        "  base: {method: weighted_sum, a: anything, b: insta, alpha: 0.3}\n"
        "  mid: {method: weighted_sum, a: base, b: wd13, alpha: 0.5, cache: false}\n"
        "  top: {method: add_difference, a: mid, b: nai_full, c: nai_sfw, alpha: 0.5}\n"
        "  kept: {method: weighted_sum, a: base, b: anything, alpha: 0.2, cache: true}\n"
        "  side: {method: weighted_sum, a: kept, b: mid, alpha: 0.4}\n"
        "outputs:\n"
        "  o_top: {from: top, path: out/top.safetensors}\n"
        "  o_side: {from: side, path: out/side.safetensors}\n"
        "  o_mid: {from: mid, path: out/mid.safetensors}\n"
    )
    recipe = load_recipe(path, [])
    plan = Builder(recipe, CacheStore(cache)).plan()
    units = plan_units(recipe, plan)
    got = {u.name: (u.kind, u.computes, sorted(units[i].name for i in u.after)) for u in units}
    assert got == {
        "base": ("merge", (), []),
        "kept": ("merge", (), ["base"]),
        "o_top": ("output", ("mid", "top"), ["base"]),
        "o_side": ("output", ("mid", "side"), ["base", "kept"]),
        "o_mid": ("output", ("mid",), ["base"]),
    }
    for n, u in enumerate(units):  # topological: a unit comes after those it waits for
        assert all(i < n for i in u.after)
    sub = sub_plan(plan, next(u for u in units if u.name == "o_side"))
    assert {i.name for i in sub.to_build()} == {"o_side", "mid", "side"}
    assert len(plan.to_build()) == 8  # the driver's plan is left as it was

    # `base` cached already (a local build of one output): no unit for it, nobody waits
    r = run_cli(path, "o_mid", cache=cache)
    assert r.code == 0, r.err
    plan = Builder(recipe, CacheStore(cache)).plan()
    units = plan_units(recipe, plan)
    got = {u.name: (u.computes, [units[i].name for i in u.after]) for u in units}
    assert got == {
        "kept": ((), []),
        "o_top": (("mid", "top"), []),
        "o_side": (("mid", "side"), ["kept"]),
    }

    # a cached build, a dry run and --help with `--executor ray` import neither Ray nor torch
    for args in (["o_mid", "--json"], ["o_mid"], ["-n"], ["--help"]):
        assert _heavy_imports(["build", str(path), *args, "--executor", "ray"], cache) == []


def _heavy_imports(argv: list[str], cache: Path) -> list[str]:
    probe = (
        "import sys\n"
        "from mergebuild.cli import main\n"
        "try:\n"
        "    rc = main(sys.argv[1:])\n"
        "except SystemExit as e:  # --help\n"
        "    rc = e.code\n"
        "print('HEAVY', *[m for m in ('ray', 'torch') if m in sys.modules])\n"
        "raise SystemExit(rc)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(SRC), "MERGEBUILD_CACHE_DIR": str(cache)}
    p = subprocess.run(
        [sys.executable, "-c", probe, *argv], env=env, capture_output=True, text=True
    )
    assert p.returncode == 0, p.stderr
    return p.stdout.splitlines()[-1].split()[1:]


@pytest.mark.parametrize(
    "case",
    ["ray missing", "unknown executor", "no cluster at RAY_ADDRESS"],
)
def test_ray_unavailable_is_one_readable_error(tmp_path: Path, model_dir: Path, case: str) -> None:
    recipe = _work(tmp_path, model_dir, "w")
    cache = tmp_path / "cache"
    env = {**LOOPBACK, "PYTHONPATH": _fake_ray(tmp_path)}
    executor = "ray"
    want = "pip install 'mergebuild[ray]'"
    if case == "unknown executor":
        executor, want = "dask", "invalid choice: 'dask'"
    elif case == "no cluster at RAY_ADDRESS":
        env = {**LOOPBACK, "RAY_ADDRESS": f"127.0.0.1:{_free_port()}"}  # nothing listens
        want = "cannot reach the Ray cluster at 127.0.0.1:"
    r = run_cli(recipe, "--executor", executor, cache=cache, env=env, timeout=240)
    assert r.code != 0
    assert want in r.err, r.err
    assert "Traceback" not in r.err
    assert not (recipe.parent / "out").exists()
    assert not list((cache / "objects").rglob("*.safetensors")) if cache.exists() else True


@pytest.mark.slow  # ~15 s: a second cluster start; make test-reliability runs it
def test_local_cluster_without_address(tmp_path: Path, model_dir: Path) -> None:
    """No RAY_ADDRESS: the CLI starts its own cluster (loopback), builds on it, stops it."""
    one = "mix[alpha=0.5]"
    local = _work(tmp_path, model_dir, "local")
    r = run_cli(local, one, "-q", cache=tmp_path / "c-local")
    assert r.code == 0, r.err
    recipe = _work(tmp_path, model_dir, "ray")
    temp = Path(f"/tmp/mbray-local-{os.getpid()}")  # its sessions, not /tmp/ray (short path)
    # the token in the environment: nothing written to ~/.ray
    env = {**AUTH, "RAY_ADDRESS": "", "RAY_TMPDIR": str(temp)}
    try:
        r = run_cli(recipe, one, "--json", "--executor", "ray", cache=tmp_path / "c", env=env)
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    assert r.code == 0, r.err
    assert "2 cache entries to build as Ray tasks" in r.err  # base, then the one output
    assert set(_statuses(r.json).values()) == {"built"}
    name = "mix-0.5.safetensors"
    assert (recipe.parent / "out" / name).read_bytes() == (local.parent / "out" / name).read_bytes()
    assert sorted(p.name for p in (recipe.parent / "out").iterdir()) == [name]
