"""Inputs by URL: downloads from a real HTTP server on loopback, verified, resumable.

The server (ThreadingHTTPServer on 127.0.0.1, a free port) serves bytes from memory with Range
support and records every request, so a test can tell whether the network was used, whether
a resume asked for the right range, and what the client sent to an imitation of the Hugging
Face hub. Every build's output is compared with the seed example built from local files.
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from conftest import EXAMPLES, SEED_OUT, SeedBuild, run_cli

GAPE = "gape60.safetensors"


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]


@dataclass
class FileServer:
    """What the server serves and what it was asked."""

    files: dict[str, bytes] = field(default_factory=dict)
    requests: list[Request] = field(default_factory=list)
    cut: dict[str, int] = field(default_factory=dict)  # path → bytes sent before closing (once)
    no_range: set[str] = field(default_factory=set)  # paths served whole whatever the Range
    status: dict[str, int] = field(default_factory=dict)  # path → an error status to answer
    redirects: dict[str, str] = field(default_factory=dict)  # path → Location (302)
    headers: dict[str, dict[str, str]] = field(default_factory=dict)
    slow: dict[str, float] = field(default_factory=dict)  # path → seconds to spread the body over
    stall: float = 0.0  # after a cut: hold the connection open this long, sending nothing
    port: int = 0

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def gets(self) -> list[Request]:
        return [r for r in self.requests if r.method == "GET"]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    state: FileServer

    def log_message(self, *args: object) -> None:
        pass

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def do_GET(self) -> None:
        self._serve(body=True)

    def _serve(self, body: bool) -> None:
        st = self.state
        path = urlsplit(self.path).path
        st.requests.append(Request(self.command, path, dict(self.headers)))
        if path in st.redirects:
            self.send_response(302)
            self.send_header("Location", st.redirects[path])
            for k, v in st.headers.get(path, {}).items():
                self.send_header(k, v)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        data = st.files.get(path)
        if path in st.status or data is None:
            self.send_error(st.status.get(path, 404))
            return
        start, rng = 0, self.headers.get("Range")
        if rng and path not in st.no_range:
            start = int(re.fullmatch(r"bytes=(\d+)-", rng).group(1))
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(len(data) - start))
        for k, v in st.headers.get(path, {}).items():
            self.send_header(k, v)
        self.end_headers()
        if not body:
            return
        cut = st.cut.pop(path, None)
        if path in st.slow:
            step = max(1, (len(data) - start) // 10)
            for at in range(start, len(data), step):
                self.wfile.write(data[at : at + step])
                self.wfile.flush()
                time.sleep(st.slow[path] / 10)
            return
        if cut is None:
            self.wfile.write(data[start:])
            return
        self.wfile.write(data[start : start + cut])  # then the connection dies mid-body
        self.wfile.flush()
        time.sleep(st.stall)
        self.connection.shutdown(socket.SHUT_RDWR)
        self.close_connection = True


@pytest.fixture
def server() -> Iterator[FileServer]:
    state = FileServer()
    handler = type("Handler", (_Handler,), {"state": state})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True
    state.port = httpd.server_address[1]
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield state
    httpd.shutdown()
    httpd.server_close()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def seed_recipe(work: Path, model_dir: Path, gape: dict) -> Path:
    """The seed example with `gape` given as `gape` says (by URL, hf…) instead of a path."""
    work.mkdir(parents=True, exist_ok=True)
    if not (work / "models").exists():
        (work / "models").symlink_to(model_dir)
    doc = yaml.safe_load((EXAMPLES / "anything_nsfw_gape.yaml").read_text())
    doc["models"]["gape"] = gape
    recipe = work / "seed.yaml"
    recipe.write_text(yaml.safe_dump(doc, sort_keys=False))
    return recipe


def store_files(cache: Path) -> list[str]:
    d = cache / "models" / "sha256"
    return sorted(p.name for p in d.iterdir()) if d.is_dir() else []


def served_gape(server: FileServer, model_dir: Path, path: str = "/m/gape60.safetensors") -> bytes:
    data = (model_dir / GAPE).read_bytes()
    server.files[path] = data
    return data


# -- the main path ------------------------------------------------------------------------------


def test_downloaded_input_builds_the_local_bytes_and_is_fetched_once(
    server: FileServer, model_dir: Path, seed_build: SeedBuild, tmp_path: Path
) -> None:
    data = served_gape(server, model_dir)
    cache = tmp_path / "cache"
    recipe = seed_recipe(
        tmp_path / "w", model_dir, {"sha256": sha256(data), "urls": [server.url("/m/" + GAPE)]}
    )
    dry = run_cli(recipe, "-n", cache=cache)
    assert dry.code == 0, dry.err
    assert re.search(r"^download\s+gape\s+http://127\.0\.0\.1:\d+/m/gape60", dry.out, re.M)
    assert server.requests == [] and store_files(cache) == []  # a dry run never downloads
    first = run_cli(recipe, cache=cache)
    assert first.code == 0, first.err
    assert (tmp_path / "w" / SEED_OUT).read_bytes() == seed_build.output
    assert len(server.gets()) == 1
    stored = cache / "models" / "sha256" / f"{sha256(data)}.safetensors"
    assert store_files(cache) == [stored.name] and stored.read_bytes() == data
    # the output's provenance does not depend on where the input came from
    again = run_cli(recipe, "--json", cache=cache)
    assert again.code == 0, again.err
    assert len(server.requests) == 1  # present in the store: no network at all
    assert all(n["status"] == "cached" for n in again.json["nodes"])
    assert again.json["models"]["gape"]["path"] == str(stored)
    # a second recipe dir, the same cache: the store serves it too; -n plans it as cached
    other = seed_recipe(
        tmp_path / "w2", model_dir, {"sha256": sha256(data), "urls": [server.url("/gone")]}
    )
    dry2 = run_cli(other, "-n", cache=cache)
    assert dry2.code == 0 and "download" not in dry2.out and "0 to build" in dry2.out
    assert len(server.requests) == 1


@pytest.mark.parametrize("kind", ["other model", "one flipped byte", "shorter file"])
def test_wrong_bytes_are_refused_naming_both_hashes(
    server: FileServer, model_dir: Path, tmp_path: Path, kind: str
) -> None:
    data = (model_dir / GAPE).read_bytes()
    if kind == "other model":
        served = (model_dir / "insta.safetensors").read_bytes()
    elif kind == "one flipped byte":
        served = bytearray(data)
        served[len(data) // 2] ^= 0x01
        served = bytes(served)
    else:
        served = data[:-4096]
    server.files["/m/x.safetensors"] = served
    cache = tmp_path / "cache"
    url = server.url("/m/x.safetensors")
    recipe = seed_recipe(tmp_path / "w", model_dir, {"sha256": sha256(data), "urls": [url]})
    r = run_cli(recipe, cache=cache)
    assert r.code == 1
    assert sha256(data) in r.err and sha256(served) in r.err and url in r.err
    assert "Traceback" not in r.err
    assert store_files(cache) == []  # nothing kept: not the model, not a partial
    assert not (tmp_path / "w" / SEED_OUT).exists()


@pytest.mark.parametrize("cut", [1, 300_000, -1])  # bytes received before the cut (-1: all but 1)
def test_truncated_download_is_kept_and_resumed_with_a_range(
    server: FileServer, model_dir: Path, tmp_path: Path, cut: int
) -> None:
    data = served_gape(server, model_dir)
    cut = cut % len(data)
    server.cut["/m/" + GAPE] = cut
    cache = tmp_path / "cache"
    url = server.url("/m/" + GAPE)
    recipe = seed_recipe(tmp_path / "w", model_dir, {"sha256": sha256(data), "urls": [url]})
    first = run_cli(recipe, cache=cache)  # a build: it downloads first, builds nothing
    assert first.code == 1 and "Traceback" not in first.err
    assert f"stopped after {cut:,} of {len(data):,} bytes" in first.err and url in first.err
    partial = cache / "models" / "sha256" / f".mergebuild-tmp-{sha256(data)}.part"
    assert store_files(cache) == [partial.name] and partial.read_bytes() == data[:cut]
    assert not (tmp_path / "w" / SEED_OUT).exists()
    second = run_cli("fetch", recipe, cache=cache)  # the same download, without a build
    assert second.code == 0, second.err
    assert server.gets()[-1].headers.get("Range") == f"bytes={cut}-"
    assert len(server.gets()) == 2
    assert store_files(cache) == [f"{sha256(data)}.safetensors"]
    assert (cache / "models" / "sha256" / f"{sha256(data)}.safetensors").read_bytes() == data


def test_a_stalled_transfer_times_out_and_resumes(
    server: FileServer, model_dir: Path, tmp_path: Path
) -> None:
    data = served_gape(server, model_dir)
    server.cut["/m/" + GAPE], server.stall = 200_000, 3.0
    cache = tmp_path / "cache"
    recipe = seed_recipe(
        tmp_path / "w", model_dir, {"sha256": sha256(data), "urls": [server.url("/m/" + GAPE)]}
    )
    env = {"MERGEBUILD_FETCH_TIMEOUT": "0.5"}
    first = run_cli("fetch", recipe, cache=cache, env=env)
    assert first.code == 1 and "Traceback" not in first.err
    assert f"stopped after 200,000 of {len(data):,} bytes (TimeoutError)" in first.err
    second = run_cli("fetch", recipe, cache=cache, env=env)
    assert second.code == 0, second.err
    assert server.gets()[-1].headers.get("Range") == "bytes=200000-"
    assert (cache / "models" / "sha256" / f"{sha256(data)}.safetensors").read_bytes() == data


def test_resume_against_a_server_without_ranges_starts_over(
    server: FileServer, model_dir: Path, tmp_path: Path
) -> None:
    data = served_gape(server, model_dir)
    server.cut["/m/" + GAPE] = 500_000
    server.no_range.add("/m/" + GAPE)
    cache = tmp_path / "cache"
    recipe = seed_recipe(
        tmp_path / "w", model_dir, {"sha256": sha256(data), "urls": [server.url("/m/" + GAPE)]}
    )
    assert run_cli("fetch", recipe, cache=cache).code == 1
    r = run_cli("fetch", recipe, cache=cache)
    assert r.code == 0, r.err
    assert server.gets()[-1].headers.get("Range") == "bytes=500000-"  # asked; answered 200
    assert store_files(cache) == [f"{sha256(data)}.safetensors"]
    assert (cache / "models" / "sha256" / f"{sha256(data)}.safetensors").read_bytes() == data


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed when the block ends: nothing listens there


@pytest.mark.parametrize("first", ["404", "500", "refused", "missing file://"])
def test_a_failing_source_is_followed_by_the_next(
    server: FileServer, model_dir: Path, tmp_path: Path, first: str
) -> None:
    data = served_gape(server, model_dir)
    bad = {
        "404": server.url("/nowhere.safetensors"),
        "500": server.url("/broken.safetensors"),
        "refused": f"http://127.0.0.1:{closed_port()}/m.safetensors",
        "missing file://": f"file://{tmp_path}/no-such.safetensors",
    }[first]
    server.files["/broken.safetensors"] = b"x"
    server.status["/broken.safetensors"] = 500
    cache = tmp_path / "cache"
    urls = [bad, server.url("/m/" + GAPE)]
    recipe = seed_recipe(tmp_path / "w", model_dir, {"sha256": sha256(data), "urls": urls})
    r = run_cli("fetch", recipe, cache=cache)
    assert r.code == 0, r.err
    assert bad in r.out  # the failed source is mentioned
    assert [g.path for g in server.gets()][-1] == "/m/" + GAPE
    assert (cache / "models" / "sha256" / f"{sha256(data)}.safetensors").read_bytes() == data


def test_no_source_reachable_is_one_readable_error(
    server: FileServer, model_dir: Path, tmp_path: Path
) -> None:
    data = (model_dir / GAPE).read_bytes()
    urls = [
        server.url("/nowhere.safetensors"),
        f"http://127.0.0.1:{closed_port()}/m.safetensors",
        "file:///dev/zero",
    ]
    cache = tmp_path / "cache"
    recipe = seed_recipe(tmp_path / "w", model_dir, {"sha256": sha256(data), "urls": urls})
    r = run_cli(recipe, cache=cache)
    assert r.code == 1 and "Traceback" not in r.err
    assert r.err.startswith("error:") and "could not be downloaded" in r.err
    assert all(u in r.err for u in urls)
    assert "HTTP 404" in r.err and "not a regular file" in r.err
    assert store_files(cache) == []
    assert not (tmp_path / "w" / SEED_OUT).exists()


def test_file_url_through_fsspec(model_dir: Path, tmp_path: Path) -> None:
    data = (model_dir / GAPE).read_bytes()
    src = tmp_path / "mirror" / "gape v1.safetensors"
    src.parent.mkdir()
    src.write_bytes(data)
    url = "file://" + str(src).replace(" ", "%20")
    recipe = seed_recipe(tmp_path / "w", model_dir, {"sha256": sha256(data), "urls": [url]})
    r = run_cli("fetch", recipe, cache=tmp_path / "cache")
    assert r.code == 0, r.err
    stored = tmp_path / "cache" / "models" / "sha256" / f"{sha256(data)}.safetensors"
    assert stored.read_bytes() == data


# -- fetch, lock --------------------------------------------------------------------------------


def test_fetch_command_downloads_without_building(
    server: FileServer, model_dir: Path, tmp_path: Path
) -> None:
    data = served_gape(server, model_dir)
    cache = tmp_path / "cache"
    recipe = seed_recipe(
        tmp_path / "w", model_dir, {"sha256": sha256(data), "urls": [server.url("/m/" + GAPE)]}
    )
    dry = run_cli("fetch", recipe, "-n", cache=cache)
    assert dry.code == 0 and re.search(r"^download\s+gape\s", dry.out, re.M)
    assert server.requests == []
    r = run_cli("fetch", recipe, "--json", cache=cache)
    assert r.code == 0, r.err
    assert r.json["models"]["gape"]["status"] == "downloaded"
    assert r.json["models"]["gape"]["sha256"] == sha256(data)
    assert not (tmp_path / "w" / "out").exists()  # nothing built
    again = run_cli("fetch", recipe, cache=cache)
    assert again.code == 0 and re.search(r"^present\s+gape\s", again.out, re.M)
    assert len(server.requests) == 1
    stored = cache / "models" / "sha256" / f"{sha256(data)}.safetensors"
    assert stored.read_bytes() == data
    deps = run_cli("deps", recipe, cache=cache)  # make sees the stored file as a prerequisite
    assert deps.code == 0, deps.err
    assert str(stored) in deps.out


def test_lock_and_extract_keep_sources_so_a_shared_recipe_is_self_contained(
    server: FileServer, model_dir: Path, seed_build: SeedBuild, tmp_path: Path
) -> None:
    """The author's recipe gets every input by URL; `lock` records the sources; `extract
    --sources LOCK` on the output gives a recipe that builds the same bytes on a machine that
    has nothing but that recipe (fresh cache, no models)."""
    names = {
        "anything": "anything-v3.safetensors",
        "nai_full": "nai-full.safetensors",
        "nai_sfw": "nai-sfw.safetensors",
        "gape": GAPE,
    }
    hf = "someone/gape/gape60.safetensors@abc123"
    author = tmp_path / "author"
    recipe = seed_recipe(author, model_dir, {})
    doc = yaml.safe_load(recipe.read_text())
    for name, file in names.items():
        data = (model_dir / file).read_bytes()
        server.files[f"/m/{file}"] = data
        doc["models"][name] = {"sha256": sha256(data), "urls": [server.url(f"/m/{file}")]}
    doc["models"]["gape"]["hf"] = hf
    recipe.write_text(yaml.safe_dump(doc, sort_keys=False))
    r = run_cli("lock", recipe, "-q", cache=tmp_path / "cache")
    assert r.code == 0, r.err
    lock = yaml.safe_load(recipe.with_suffix(".lock").read_text())
    for name, file in names.items():
        assert lock["models"][name]["urls"] == [server.url(f"/m/{file}")]
    assert lock["models"]["gape"]["hf"] == hf and "hf" not in lock["models"]["anything"]
    out = author / SEED_OUT
    assert out.read_bytes() == seed_build.output  # where inputs come from is not in the bytes
    v = run_cli("verify", recipe, cache=tmp_path / "cache")  # the lock reads back
    assert v.code == 0, v.err

    friend = tmp_path / "friend"
    friend.mkdir()
    x = run_cli(
        "extract", out, "--sources", recipe.with_suffix(".lock"), "-o", "shared.yaml", cwd=friend
    )
    assert x.code == 0, x.err
    shared = yaml.safe_load((friend / "shared.yaml").read_text())
    assert shared["models"]["gape"]["hf"] == hf
    assert {n: m["urls"] for n, m in shared["models"].items()} == {
        n: [server.url(f"/m/{f}")] for n, f in names.items()
    }
    before = len(server.gets())
    b = run_cli(friend / "shared.yaml", cache=tmp_path / "friend-cache", cwd=friend)
    assert b.code == 0, b.err
    assert len(server.gets()) == before + 4
    assert (friend / "anything-nsfw-gape.safetensors").read_bytes() == seed_build.output


@pytest.mark.parametrize(
    ("entry", "why"),
    [
        ({"sha256": "abc", "urls": ["http://h/x"]}, "no full sha256"),
        ({"sha256": "F" * 64, "urls": "http://h/x"}, "must be a list"),
        ({"sha256": "F" * 64, "urls": ["http://u:p@h/x"]}, "credentials"),
        ({"sha256": "F" * 64, "hf": "../x"}, "owner/repo/path"),
    ],
)
def test_extract_sources_skips_bad_entries(
    model_dir: Path, seed_build: SeedBuild, tmp_path: Path, entry: dict, why: str
) -> None:
    out = seed_build.cache.parent / SEED_OUT
    sources = tmp_path / "catalogue.yaml"
    sha = sha256((model_dir / GAPE).read_bytes())
    good = {"sha256": sha, "urls": ["https://mirror.example/gape60.safetensors"]}
    sources.write_text(yaml.safe_dump({"models": {"bad": entry, "gape": good}}))
    r = run_cli("extract", out, "--sources", sources)
    assert r.code == 0, r.err
    assert "model 'bad' skipped" in r.err and why in r.err
    doc = yaml.safe_load(r.out)
    assert doc["models"]["gape"]["urls"] == good["urls"]
    assert sum("urls" in m or "hf" in m for m in doc["models"].values()) == 1


# -- the Hugging Face hub, imitated -------------------------------------------------------------


def test_hf_source_through_hf_endpoint(
    server: FileServer, model_dir: Path, seed_build: SeedBuild, tmp_path: Path
) -> None:
    """`hf:` goes to $HF_ENDPOINT/<repo>/resolve/<rev>/<path>, which (like the hub for LFS
    files) redirects to a CDN URL; the token goes to the hub only, never to the CDN."""
    data = (model_dir / GAPE).read_bytes()
    resolve = "/someone/gape-model/resolve/0123abcd/sub/gape60.safetensors"
    cdn = f"/cdn/{sha256(data)}"
    server.files[cdn] = data
    server.redirects[resolve] = server.url(cdn)
    server.headers[resolve] = {
        "X-Repo-Commit": "0123abcd" * 5,
        "ETag": f'"{sha256(data)}"',
        "X-Linked-Etag": f'"{sha256(data)}"',
        "X-Linked-Size": str(len(data)),
    }
    hf = "someone/gape-model/sub/gape60.safetensors@0123abcd"
    recipe = seed_recipe(tmp_path / "w", model_dir, {"sha256": sha256(data), "hf": hf})
    env = {"HF_ENDPOINT": f"http://127.0.0.1:{server.port}", "HF_TOKEN": "hf_testtoken123"}
    r = run_cli(recipe, cache=tmp_path / "cache", env=env)
    assert r.code == 0, r.err
    assert [g.path for g in server.gets()] == [resolve, cdn]
    hub, cdn_req = server.gets()
    assert hub.headers.get("Authorization") == "Bearer hf_testtoken123"
    assert "Authorization" not in cdn_req.headers
    assert (tmp_path / "w" / SEED_OUT).read_bytes() == seed_build.output


# -- recipe errors ------------------------------------------------------------------------------

BAD_SOURCES = [
    ({"sha256": "SHORT", "urls": ["http://127.0.0.1:1/x.safetensors"]}, "full 'sha256'"),
    ({"sha256": "SHORT", "hf": "a/b/c.safetensors@main"}, "full 'sha256'"),
    ({"path": "models/gape60.safetensors", "urls": ["http://h/x"]}, "full 'sha256'"),
    ({"sha256": "FULL", "urls": ["https://user:pw@h/x.safetensors"]}, "credentials"),
    ({"sha256": "FULL", "urls": ["models/gape60.safetensors"]}, "expected a URL with a scheme"),
    ({"sha256": "FULL", "urls": []}, "at least 1 item"),
    ({"sha256": "FULL", "hf": "just-a-name"}, "owner/repo/path"),
    ({"sha256": "FULL", "hf": "a/b/../etc/passwd"}, "'..'"),
    ({"sha256": "FULL", "url": ["http://h/x"]}, "did you mean 'urls'"),
]


@pytest.mark.parametrize(("gape", "says"), BAD_SOURCES)
def test_bad_sources_are_recipe_errors_with_a_line(
    model_dir: Path, tmp_path: Path, gape: dict, says: str
) -> None:
    full = sha256((model_dir / GAPE).read_bytes())
    if "sha256" in gape:
        gape = {**gape, "sha256": {"SHORT": full[:10], "FULL": full}[gape["sha256"]]}
    recipe = seed_recipe(tmp_path / "w", model_dir, gape)
    r = run_cli(recipe, "-n", cache=tmp_path / "cache")
    assert r.code == 2, (r.out, r.err)
    lines = recipe.read_text().splitlines()
    first = next(i for i, t in enumerate(lines) if t == "  gape:")
    last = next(i for i in range(first + 1, len(lines)) if not lines[i].startswith("    "))
    where = {int(n) for n in re.findall(r"seed\.yaml:(\d+):", r.err)}
    assert where and where <= set(range(first + 1, last + 1)), (r.err, first, last)
    assert says in r.err
    assert "Traceback" not in r.err
    assert not (tmp_path / "cache").exists()


def test_dry_run_and_cached_build_import_no_network_library(
    server: FileServer, model_dir: Path, tmp_path: Path
) -> None:
    import subprocess
    import sys

    from conftest import SRC

    data = served_gape(server, model_dir)
    cache = tmp_path / "cache"
    recipe = seed_recipe(
        tmp_path / "w", model_dir, {"sha256": sha256(data), "urls": [server.url("/m/" + GAPE)]}
    )
    probe = (
        "import sys; from mergebuild.cli import main; rc = main(sys.argv[1:]); "
        "bad = [m for m in ('torch', 'fsspec', 'huggingface_hub') if m in sys.modules]; "
        "assert not bad, bad; raise SystemExit(rc)"
    )
    env = {**os.environ, "PYTHONPATH": str(SRC), "MERGEBUILD_CACHE_DIR": str(cache)}

    def light(*args: str) -> None:
        p = subprocess.run([sys.executable, "-c", probe, *args], env=env, capture_output=True)
        assert p.returncode == 0, p.stderr.decode()

    light(str(recipe), "-n")
    assert run_cli(recipe, cache=cache).code == 0
    light(str(recipe), "--json")  # fully cached, the input in the store


def test_two_processes_download_one_model_once(
    server: FileServer, model_dir: Path, tmp_path: Path
) -> None:
    """The second waits on the partial's lock, then finds the model stored."""
    import subprocess
    import sys

    from conftest import SRC

    data = served_gape(server, model_dir)
    server.slow["/m/" + GAPE] = 1.0
    cache = tmp_path / "cache"
    recipe = seed_recipe(
        tmp_path / "w", model_dir, {"sha256": sha256(data), "urls": [server.url("/m/" + GAPE)]}
    )
    env = {**os.environ, "PYTHONPATH": str(SRC), "MERGEBUILD_CACHE_DIR": str(cache)}
    cmd = [sys.executable, "-m", "mergebuild", "fetch", str(recipe), "--json"]
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True) for _ in (0, 1)]
    outs = [p.communicate(timeout=60)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert len(server.gets()) == 1
    statuses = sorted(yaml.safe_load(o)["models"]["gape"]["status"] for o in outs)
    assert statuses == ["downloaded", "present"] or statuses == ["downloaded", "downloaded"]
    assert store_files(cache) == [f"{sha256(data)}.safetensors"]
    assert (cache / "models" / "sha256" / f"{sha256(data)}.safetensors").read_bytes() == data


@pytest.mark.parametrize("planted", ["models", "models/sha256", "partial"])
def test_planted_symlinks_in_the_store_are_refused(
    server: FileServer, model_dir: Path, tmp_path: Path, planted: str
) -> None:
    from mergebuild.cacheroot import ensure_marker

    data = served_gape(server, model_dir)
    cache, elsewhere = tmp_path / "cache", tmp_path / "elsewhere"
    ensure_marker(cache)
    elsewhere.mkdir()
    victim = elsewhere / "victim"
    victim.write_bytes(b"not yours")
    if planted == "partial":
        (cache / "models" / "sha256").mkdir(parents=True)
        link = cache / "models" / "sha256" / f".mergebuild-tmp-{sha256(data)}.part"
        link.symlink_to(victim)
    else:
        (cache / planted).parent.mkdir(parents=True, exist_ok=True)
        (cache / planted).symlink_to(elsewhere, target_is_directory=True)
    recipe = seed_recipe(
        tmp_path / "w", model_dir, {"sha256": sha256(data), "urls": [server.url("/m/" + GAPE)]}
    )
    r = run_cli("fetch", recipe, cache=cache)
    assert r.code == 1 and "Traceback" not in r.err
    assert server.requests == []
    assert sorted(p.name for p in elsewhere.iterdir()) == ["victim"]
    assert victim.read_bytes() == b"not yours"


def test_cache_clean_empties_the_store_and_gc_keeps_it(
    server: FileServer, model_dir: Path, tmp_path: Path
) -> None:
    data = served_gape(server, model_dir)
    cache = tmp_path / "cache"
    recipe = seed_recipe(
        tmp_path / "w", model_dir, {"sha256": sha256(data), "urls": [server.url("/m/" + GAPE)]}
    )
    assert run_cli("fetch", recipe, cache=cache).code == 0
    stored = cache / "models" / "sha256" / f"{sha256(data)}.safetensors"
    gc = run_cli("cache", "gc", cache=cache)
    assert gc.code == 0 and stored.read_bytes() == data  # a download is not a build product
    partial = stored.with_name(f".mergebuild-tmp-{'0' * 64}.part")
    partial.write_bytes(b"half")
    mine = stored.with_name("my-notes.txt")
    mine.write_bytes(b"mine")
    r = run_cli("cache", "clean", cache=cache)
    assert r.code == 0, r.err
    assert not stored.exists() and not partial.exists()
    assert mine.read_bytes() == b"mine" and "models/sha256/my-notes.txt" in r.out + r.err


@pytest.mark.parametrize("partial", ["complete", "longer than the file", "wrong bytes"])
def test_a_stale_partial_is_finished_restarted_or_dropped(
    server: FileServer, model_dir: Path, tmp_path: Path, partial: str
) -> None:
    from mergebuild.cacheroot import ensure_marker

    data = served_gape(server, model_dir)
    cache = tmp_path / "cache"
    ensure_marker(cache)
    d = cache / "models" / "sha256"
    d.mkdir(parents=True)
    part = d / f".mergebuild-tmp-{sha256(data)}.part"
    wrong = bytearray(data[:400_000])
    wrong[10] ^= 0xFF
    part.write_bytes(
        {"complete": data, "longer than the file": data + b"x" * 10, "wrong bytes": wrong}[partial]
    )
    url = server.url("/m/" + GAPE)
    recipe = seed_recipe(tmp_path / "w", model_dir, {"sha256": sha256(data), "urls": [url]})
    r = run_cli("fetch", recipe, cache=cache)
    if partial == "wrong bytes":  # resumed from byte 400 000, then refused as a whole
        assert r.code == 1 and sha256(data) in r.err and url in r.err
        assert store_files(cache) == []
        assert server.gets()[-1].headers.get("Range") == "bytes=400000-"
        r = run_cli("fetch", recipe, cache=cache)  # starts from nothing
    assert r.code == 0, r.err
    assert (d / f"{sha256(data)}.safetensors").read_bytes() == data
    assert store_files(cache) == [f"{sha256(data)}.safetensors"]
    gets = server.gets()
    if partial == "complete":
        assert gets == []
    elif partial == "longer than the file":  # 416, then the whole file
        assert [g.headers.get("Range") for g in gets] == [f"bytes={len(data) + 10}-", None]
    else:
        assert gets[-1].headers.get("Range") is None
