"""`--executor ray`: sweep members built as Ray tasks into a shared cache dir.

One real Ray cluster for the module (`ray start --head --block` on loopback, stopped by its
own process group after); the CLI attaches to it through RAY_ADDRESS. Outputs are compared
byte for byte with a local build in another cache dir, and with numpy.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
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
        os.killpg(head.pid, signal.SIGTERM)  # --block: it stops the services it started
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
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
    return {n["key"]: n["status"] for n in report["nodes"] if n["kind"] == "output" or n["path"]}


def test_sweep_on_ray_equals_local_build_and_reruns_cached(
    tmp_path: Path, model_dir: Path, ray_address: str
) -> None:
    local = _work(tmp_path, model_dir, "local")
    r = run_cli(local, "--json", "-j", "2", cache=tmp_path / "c-local")
    assert r.code == 0, r.err
    on_ray = _work(tmp_path, model_dir, "ray")
    r = run_cli(
        on_ray, "--json", "--executor", "ray", cache=tmp_path / "c-ray", env=_ray_env(ray_address)
    )
    assert r.code == 0, r.err
    assert f"{ENTRIES} cache entries to build as Ray tasks" in r.err
    built = _statuses(r.json)
    assert len(built) == ENTRIES and set(built.values()) == {"built"}, built
    members = [n for n in r.json["nodes"] if n["name"].startswith("mix[")]
    assert all(n["status"] == "built" for n in members), members  # computed in its output's pass
    assert _outputs(on_ray) == _outputs(local)
    _check_numbers(on_ray, model_dir)
    # every entry published with its sidecar, no temp left behind
    objects = sorted((tmp_path / "c-ray" / "objects").rglob("*"))
    assert sorted(p.stem for p in objects if p.suffix == ".safetensors") == sorted(built)
    assert sorted(p.stem for p in objects if p.suffix == ".json") == sorted(built)
    assert not [p for p in objects if "tmp" in p.name]

    # again: all cached, no task, not even Ray imported (a `ray` that cannot be imported)
    outputs = _outputs(on_ray)
    for args in (["--json"], []):
        again = run_cli(
            on_ray,
            *args,
            "--executor",
            "ray",
            cache=tmp_path / "c-ray",
            env={"PYTHONPATH": _fake_ray(tmp_path), "RAY_ADDRESS": "127.0.0.1:1"},
        )
        assert again.code == 0, again.err
        assert "Ray tasks" not in again.err + again.out
        if args:
            assert set(_statuses(again.json).values()) == {"cached"}
    assert _outputs(on_ray) == outputs


CLIENT_ARGS = ("--json", "--executor", "ray")


def test_two_clients_on_one_cluster_build_each_entry_once(
    tmp_path: Path, model_dir: Path, ray_address: str
) -> None:
    """The test holds `base`'s cache lock until both clients have planned and submitted every
    entry: their tasks then race for each key, and each key must be built exactly once."""
    recipe = _work(tmp_path, model_dir, "w")
    cache = tmp_path / "cache"
    plan = run_cli(recipe, "-n", "--json", cache=cache)
    assert plan.code == 0, plan.err
    base_key = next(n["key"] for n in plan.json["nodes"] if n["name"] == "base")
    from mergebuild.cache import CacheStore

    env = {
        **os.environ,
        **_ray_env(ray_address),
        "PYTHONPATH": str(SRC),
        "MERGEBUILD_CACHE_DIR": str(cache),
    }
    lock = CacheStore(cache).lock(base_key)
    lock.acquire()
    procs: list[subprocess.Popen] = []
    try:
        for n in range(2):
            with open(tmp_path / f"out{n}", "wb") as out, open(tmp_path / f"err{n}", "wb") as err:
                procs.append(
                    subprocess.Popen(
                        [sys.executable, "-m", "mergebuild", str(recipe), *CLIENT_ARGS],
                        env=env,
                        stdout=out,
                        stderr=err,
                    )
                )
        deadline = time.monotonic() + 120
        while not all(
            b"Ray tasks" in (tmp_path / f"err{n}").read_bytes() for n in range(len(procs))
        ):
            assert all(p.poll() is None for p in procs), [
                (tmp_path / f"err{n}").read_text() for n in range(len(procs))
            ]
            assert time.monotonic() < deadline, "clients did not submit their tasks"
            time.sleep(0.2)
        time.sleep(1)  # let both `base` tasks reach the lock
    finally:
        lock.release()
    for p in procs:
        try:
            assert p.wait(timeout=180) == 0
        finally:
            if p.poll() is None:
                p.kill()
    reports = [json.loads((tmp_path / f"out{n}").read_text()) for n in range(len(procs))]
    statuses = [_statuses(r) for r in reports]
    keys = set(statuses[0])
    assert len(keys) == ENTRIES and set(statuses[1]) == keys
    for key in keys:
        assert sorted(s[key] for s in statuses) == ["built", "cached"], key
    meanwhile = [
        n
        for r in reports
        for n in r["nodes"]
        if n["reason"] == "in cache (built meanwhile by another build)"
    ]
    assert len(meanwhile) == ENTRIES
    _check_numbers(recipe, model_dir)


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
        env = {
            **LOOPBACK,
            "RAY_ADDRESS": f"127.0.0.1:{_free_port()}",  # nothing listens there
            "RAY_gcs_rpc_server_connect_timeout_s": "3",
        }
        want = "cannot reach the Ray cluster at 127.0.0.1:"
    r = run_cli(recipe, "--executor", executor, cache=cache, env=env, timeout=240)
    assert r.code != 0
    assert want in r.err, r.err
    assert "Traceback" not in r.err
    assert not (recipe.parent / "out").exists()
    assert not list((cache / "objects").rglob("*.safetensors")) if cache.exists() else True
