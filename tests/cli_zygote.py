"""Start CLI runs as children forked from a process that has imported torch already.

The suite runs the CLI as hundreds of child processes, and each fresh interpreter spent about
2.5 s of CPU importing torch and friends: most of `make test`'s time. A zygote (one per test
worker) imports those third-party libraries once — never mergebuild itself, so every child
imports mergebuild afresh with its own environment, as `python -m mergebuild` does — and
forks a child per run: its own pid, argv, environment, working directory, stdin (/dev/null),
stdout and stderr (files), exit code (or -signal, like subprocess). Tests that check what the
CLI imports, or that signal a running build, start real interpreters as before, and
`MERGEBUILD_TEST_FRESH=1` (`make test-reliability`) makes every run a fresh interpreter.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import threading

SERVER = r"""
import json, os, runpy, sys, traceback, atexit
import numpy, torch, safetensors, yaml, pydantic, networkx, xxhash  # the slow imports, once
control_in = os.fdopen(os.dup(0), "r")
control_out = os.fdopen(os.dup(1), "w")
null = os.open(os.devnull, os.O_RDONLY)
os.dup2(null, 0)
for line in control_in:
    req = json.loads(line)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            control_in.close(); control_out.close()
            out = os.open(req["out"], os.O_WRONLY)
            err = os.open(req["err"], os.O_WRONLY)
            os.dup2(out, 1); os.dup2(err, 2); os.close(out); os.close(err)
            os.chdir(req["cwd"])
            os.environ.clear(); os.environ.update(req["env"])
            sys.path[:0] = [p for p in req["env"].get("PYTHONPATH", "").split(os.pathsep) if p]
            sys.argv = ["-m", *req["argv"]]
            try:
                runpy.run_module("mergebuild", run_name="__main__", alter_sys=True)
                code = 0
            except SystemExit as e:
                if e.code is None:
                    code = 0
                elif isinstance(e.code, int):
                    code = e.code
                else:
                    print(e.code, file=sys.stderr)
                    code = 1
            except BaseException:
                traceback.print_exc()
                code = 1
            atexit._run_exitfuncs()
        finally:
            try:
                sys.stdout.flush(); sys.stderr.flush()
            finally:
                os._exit(code)
    control_out.write(json.dumps({"pid": pid}) + "\n"); control_out.flush()
    _, status = os.waitpid(pid, 0)
    control_out.write(json.dumps({"code": os.waitstatus_to_exitcode(status)}) + "\n")
    control_out.flush()
"""


class Zygote:
    """One server process; `run` is called by one thread at a time (a lock makes sure)."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", SERVER],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
        )
        self.lock = threading.Lock()
        self.pending = b""  # bytes read from the server past the last line

    def _line(self, timeout: float | None) -> dict | None:
        """The server's next JSON line, or None if none came within `timeout` seconds."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        while b"\n" not in self.pending:
            ready, _, _ = select.select([fd], [], [], timeout)
            if not ready:
                return None
            chunk = os.read(fd, 4096)
            if not chunk:
                raise RuntimeError("the CLI zygote died")
            self.pending += chunk
        line, self.pending = self.pending.split(b"\n", 1)
        return json.loads(line)

    def run(
        self, argv: list[str], env: dict[str, str], cwd: str | None, timeout: float
    ) -> tuple[int, str, str]:
        assert self.proc.stdin is not None
        with self.lock, tempfile.TemporaryDirectory(prefix="cli-") as d:
            out, err = os.path.join(d, "out"), os.path.join(d, "err")
            open(out, "w").close()
            open(err, "w").close()
            req = {"argv": argv, "env": env, "cwd": cwd or os.getcwd(), "out": out, "err": err}
            self.proc.stdin.write((json.dumps(req) + "\n").encode())
            self.proc.stdin.flush()
            started = self._line(None)
            assert started is not None
            done = self._line(timeout)
            if done is None:
                os.kill(started["pid"], signal.SIGKILL)
                self._line(None)
                raise subprocess.TimeoutExpired(argv, timeout)
            code = done["code"]
            with open(out, encoding="utf-8", errors="replace", newline=None) as f:
                stdout = f.read()
            with open(err, encoding="utf-8", errors="replace", newline=None) as f:
                stderr = f.read()
            return code, stdout, stderr

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


_zygote: Zygote | None = None


def zygote() -> Zygote | None:
    """The worker's zygote (started on first use); None when fresh interpreters are wanted."""
    global _zygote
    if os.environ.get("MERGEBUILD_TEST_FRESH") == "1" or not hasattr(os, "fork"):
        return None
    if _zygote is None or _zygote.proc.poll() is not None:
        _zygote = Zygote()
    return _zygote
