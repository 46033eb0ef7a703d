"""A 4-member sweep built locally, on Ray with a cluster the CLI starts, and on Ray attached to a
running head node: wall time of each, and the outputs compared byte for byte with the local build.

The models are the demo's (`mergebuild.demo.synthesize`, a few MB each): the rows show what Ray
costs per build on this machine, not a speed-up (one machine has no more cores to add). Every
run starts from a cache where only the inputs' hashes are memoized, so it builds all 5 entries.
The head node listens on 127.0.0.1 only, with token auth, and is stopped (its process group) at
the end. Results: bench/results/ray_sweep.json.

    python bench/ray_sweep.py [--repeat 3] [--work /tmp/ray-sweep-bench] [--keep]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from remote import finish, free_ports  # noqa: E402
from run import PY, SRC, measure  # noqa: E402
from run import digest as sha256  # noqa: E402

MEMBERS = ["0.2", "0.4", "0.6", "0.8"]
RECIPE = """\
mergebuild: 1
models:
  a: models/a.safetensors
  b: models/b.safetensors
  c: models/c.safetensors
  d: models/d.safetensors
merges:
  mixed: {method: weighted_sum, a: a, b: d, alpha: 0.4}
  family:
    expr: mixed + (b - c) * strength
    sweep: {strength: [%s]}
outputs:
  family: {from: family, path: "out/family-{strength}.safetensors"}
""" % ", ".join(MEMBERS)  # noqa: UP031 (the YAML's braces)
LOOPBACK = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}


def start_head(work: Path, auth: dict[str, str]) -> tuple[subprocess.Popen, str]:
    """`ray start --head --block` on loopback; (its process, its address) once it is up."""
    port = free_ports(1)[0]
    log = work / "ray-head.log"
    with open(log, "wb") as out:
        head = subprocess.Popen(
            [
                *(str(Path(PY).parent / "ray"), "start", "--head", "--block"),
                *(f"--port={port}", "--node-ip-address=127.0.0.1", "--num-cpus=2"),
                *("--include-dashboard=false", "--disable-usage-stats"),
                *("--object-store-memory=100000000", f"--temp-dir=/tmp/mbray-{os.getpid()}"),
            ],
            env={**os.environ, **LOOPBACK, **auth, "PYTHONPATH": str(SRC)},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: stopped by its id, nothing else
        )
    deadline = time.monotonic() + 180
    while b"Ray runtime started" not in log.read_bytes():
        if head.poll() is not None or time.monotonic() > deadline:
            stop_head(head)
            raise SystemExit("ray start failed:\n" + log.read_text()[-3000:])
        time.sleep(0.5)
    return head, f"127.0.0.1:{port}"


def stop_head(head: subprocess.Popen) -> None:
    """SIGTERM to the head's process group, SIGKILL to what is left; then its temp dir."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(head.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        head.wait(timeout=5)
    time.sleep(1)  # the services it started stop after it
    with contextlib.suppress(ProcessLookupError):
        os.killpg(head.pid, signal.SIGKILL)
    head.wait()
    shutil.rmtree(f"/tmp/mbray-{os.getpid()}", ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeat", type=int, default=3, help="runs per row (the best is kept)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/ray-sweep-bench"))
    ap.add_argument("--keep", action="store_true", help="keep --work afterwards")
    args = ap.parse_args()
    work: Path = args.work
    shutil.rmtree(work, ignore_errors=True)
    (work / "models").mkdir(parents=True)
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    make = "import sys; from pathlib import Path; from mergebuild.demo import synthesize\n"
    make += "for n in 'abcd': synthesize(Path(sys.argv[1]) / f'{n}.safetensors', n)\n"
    subprocess.run([PY, "-c", make, str(work / "models")], check=True, env=env)
    rcp = work / "sweep.yaml"
    rcp.write_text(RECIPE)
    hashed = work / "hashed"  # a cache holding only the inputs' hashes
    subprocess.run([PY, "-m", "mergebuild", "build", str(rcp), "-n", "-q", "--cache-dir",
                    str(hashed)], check=True, env=env, stdout=subprocess.DEVNULL)  # fmt: skip
    outs = [work / "out" / f"family-{m}.safetensors" for m in MEMBERS]
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}

    def best(label: str, extra: list[str], env_extra: dict[str, str]) -> dict:
        walls, sums = [], set()
        for _ in range(args.repeat):
            cache = work / "cache"
            shutil.rmtree(cache, ignore_errors=True)
            shutil.copytree(hashed, cache, symlinks=True)
            shutil.rmtree(work / "out", ignore_errors=True)
            cmd = [PY, "-m", "mergebuild", "build", str(rcp), "-q", "--cache-dir", str(cache)]
            walls.append(measure([*cmd, *extra], env_extra)[0])
            sums.add(tuple(sha256(o) for o in outs))
        if len(sums) != 1:
            raise SystemExit(f"{label}: the runs wrote different bytes")
        print(f"  {label:52} {min(walls):6.1f} s  (runs: {', '.join(f'{w:.1f}' for w in walls)})")
        return {"wall": min(walls), "walls": walls, "sums": sums.pop()}

    rows = {"local": best("local build", [], {})}
    ray = ["--executor", "ray"]
    rows["ray_own_cluster"] = best("--executor ray, the CLI starts a cluster", ray,
                                   {**LOOPBACK})  # fmt: skip
    head, address = start_head(work, auth)
    try:
        rows["ray_attached"] = best("--executor ray, attached to a running head node", ray,
                                    {**LOOPBACK, **auth, "RAY_ADDRESS": address})  # fmt: skip
    finally:
        stop_head(head)
    local = rows["local"]["sums"]
    result = {
        "command": f"python bench/ray_sweep.py {' '.join(sys.argv[1:])}",
        "machine": f"{os.cpu_count()} cores",
        "members": len(MEMBERS),
        "model_bytes": (work / "models" / "a.safetensors").stat().st_size,
        "seconds": {k: round(v["wall"], 2) for k, v in rows.items()},
        "runs": {k: [round(w, 2) for w in v["walls"]] for k, v in rows.items()},
        "over_local": {k: round(v["wall"] / rows["local"]["wall"], 2) for k, v in rows.items()},
        "identical_to_local": all(v["sums"] == local for v in rows.values()),
    }
    finish(result, "ray_sweep.json", work, args.keep)
    if not result["identical_to_local"]:
        raise SystemExit("a Ray build wrote other bytes than the local one")


if __name__ == "__main__":
    main()
