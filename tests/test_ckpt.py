"""Torch .ckpt inputs: loaded weights-only; code in a pickle never runs."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import SRC, load_st, run_cli

# Run torch.save in a child process: the classes it pickles exist only there, like a checkpoint
# written by a training run whose code the merging machine does not have.
MAKE = r"""
import os, sys, types, torch
from safetensors.torch import load_file
src, dst, kind, marker = sys.argv[1:5]
sd = load_file(src)
if kind == "evil":
    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))
    obj = {"state_dict": sd, "payload": Evil()}
elif kind == "evil_exec":
    class Evil:
        def __reduce__(self):
            return (exec, (f"open({marker!r}, 'w').close()",))
    obj = {"state_dict": sd, "payload": [{"nested": Evil()}]}
elif kind == "evil_eval":
    import builtins
    class Evil:
        def __reduce__(self):
            return (builtins.eval, (f"open({marker!r}, 'w').close()",))
    obj = {"state_dict": sd, "payload": Evil()}
elif kind == "evil_nested_global":
    # the callable is itself unpickled from globals: importlib.import_module, then getattr
    import importlib
    class Mod:
        def __reduce__(self):
            return (importlib.import_module, ("os",))
    class System:
        def __call__(self, *a):
            pass
        def __reduce__(self):
            return (getattr, (Mod(), "system"))
    class Evil:
        def __reduce__(self):
            return (System(), (f"touch {marker}",))
    obj = {"state_dict": sd, "payload": (1, {"deep": [Evil()]})}
elif kind == "evil_legacy":
    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))
    obj = {"state_dict": sd, "payload": Evil()}
elif kind == "evil_lightning_name":
    # a class named like a lightning callback that tries to run code when rebuilt
    for parent in ("pytorch_lightning", "pytorch_lightning.callbacks"):
        sys.modules[parent] = types.ModuleType(parent)
    mod = types.ModuleType("pytorch_lightning.callbacks.evil")
    class Evil:
        def __reduce__(self):
            return (Evil, (f"touch {marker}",))
        def __init__(self, *a):
            pass
    Evil.__module__ = mod.__name__
    mod.Evil = Evil
    sys.modules[mod.__name__] = mod
    obj = {"state_dict": sd, "payload": Evil()}
elif kind == "expand_bomb":
    sd = dict(sd)
    k = next(k for k, v in sd.items() if v.is_floating_point())
    sd[k] = torch.zeros(1, dtype=sd[k].dtype).expand(10**10)
    obj = {"state_dict": sd}
elif kind == "lightning":
    for parent in ("pytorch_lightning", "pytorch_lightning.callbacks"):
        sys.modules[parent] = types.ModuleType(parent)
    mod = types.ModuleType("pytorch_lightning.callbacks.model_checkpoint")
    class ModelCheckpoint:
        def __init__(self):
            self.best_model_score = torch.tensor(0.5)
            self.dirpath = "/somewhere"
    ModelCheckpoint.__module__ = mod.__name__
    mod.ModelCheckpoint = ModelCheckpoint
    sys.modules[mod.__name__] = mod
    obj = {"state_dict": sd, "epoch": 6, "global_step": 123,
           "callbacks": {ModelCheckpoint: {"best_model_score": 0.5}},
           "hyper_parameters": {"cb": ModelCheckpoint()}}
else:
    obj = {"state_dict": sd, "epoch": 1}
torch.save(obj, dst, _use_new_zipfile_serialization=kind not in ("legacy", "evil_legacy"))
"""


# One child writes every kind: each child spends seconds importing torch. MAKE runs in the
# child's __main__ namespace, as it would alone, so pickled classes resolve the same way.
MAKE_ALL = r"""
import sys
make, specs = sys.argv[1], sys.argv[2:]
for spec in specs:
    sys.argv = ["make", *spec.split("\t")]
    exec(make, globals())
"""
KINDS = [
    "evil",
    "evil_exec",
    "evil_eval",
    "evil_nested_global",
    "evil_legacy",
    "evil_lightning_name",
    "expand_bomb",
    "lightning",
    "legacy",
    "plain",
]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Path:
    """<dir>/<kind>.ckpt for every kind, from insta's tensors; an evil payload would create
    <dir>/PWNED-<kind>."""
    d = tmp_path_factory.mktemp("ckpts")
    src = model_dir / "insta.safetensors"
    specs = [f"{src}\t{d / kind}.ckpt\t{kind}\t{d / f'PWNED-{kind}'}" for kind in KINDS]
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    subprocess.run([sys.executable, "-c", MAKE_ALL, MAKE, *specs], check=True, env=env)
    return d


def make_ckpt(ckpts: Path, dst: Path, kind: str) -> Path:
    """The `kind` checkpoint copied to dst; returns the marker its payload would create."""
    shutil.copyfile(ckpts / f"{kind}.ckpt", dst)
    marker = ckpts / f"PWNED-{kind}"
    assert not marker.exists(), "the pickle's payload ran while it was written"
    return marker


def recipe_with(workdir: Path, model_file: str) -> Path:
    r = workdir / "ckpt.yaml"
    r.write_text(
        f"mergebuild: 1\nmodels:\n  a: {model_file}\n  b: models/wd13.safetensors\n"
        "merges:\n  m: a * 0.5 + b * 0.5\n"
        "outputs:\n  o: {from: m, path: out/o.safetensors}\n"
    )
    return r


@pytest.mark.parametrize(
    ("kind", "names"),
    [
        ("evil", "system"),
        ("evil_exec", "exec"),
        ("evil_eval", "eval"),
        ("evil_nested_global", "getattr"),
        ("evil_legacy", "system"),
    ],
)
def test_malicious_pickle_is_refused_and_never_runs(
    workdir: Path, cache: Path, ckpts: Path, kind: str, names: str
) -> None:
    marker = make_ckpt(ckpts, workdir / "models" / "evil.ckpt", kind)
    r = run_cli(recipe_with(workdir, "models/evil.ckpt"), cache=cache)
    assert r.code == 1
    assert "refused to load" in r.err and names in r.err, r.err
    assert "Traceback" not in r.err
    assert not marker.exists(), "the pickle's payload ran"
    assert not (workdir / "out" / "o.safetensors").exists()


@pytest.mark.parametrize("kind", ["lightning", "legacy", "plain"])
def test_checkpoint_merges_like_its_safetensors_twin(
    workdir: Path, cache: Path, ckpts: Path, kind: str
) -> None:
    make_ckpt(ckpts, workdir / "models" / "a.ckpt", kind)
    r = run_cli(recipe_with(workdir, "models/a.ckpt"), cache=cache)
    assert r.code == 0, r.err
    if kind == "legacy":
        assert "warning:" in r.err and "legacy" in r.err
    got = load_st(workdir / "out" / "o.safetensors")
    a = load_st(workdir / "models" / "insta.safetensors")
    b = load_st(workdir / "models" / "wd13.safetensors")
    for k, x in a.items():
        if x.dtype.kind != "f":
            np.testing.assert_array_equal(got[k], x)
            continue
        exp = x.astype(np.float32) * np.float32(0.5) + b[k].astype(np.float32) * np.float32(0.5)
        np.testing.assert_array_equal(got[k], exp.astype(np.float16), err_msg=k)


def test_corrupt_checkpoint_is_a_clear_error(workdir: Path, cache: Path) -> None:
    (workdir / "models" / "broken.ckpt").write_bytes(b"PK\x03\x04 not really a zip" * 10)
    r = run_cli(recipe_with(workdir, "models/broken.ckpt"), cache=cache)
    assert r.code == 1 and "broken.ckpt" in r.err and "Traceback" not in r.err


def test_lightning_named_payload_stays_inert(workdir: Path, cache: Path, ckpts: Path) -> None:
    """Names under pytorch_lightning map to inert stand-ins: rebuilding one with arguments
    runs nothing, whatever the pickle asks."""
    marker = make_ckpt(ckpts, workdir / "models" / "l.ckpt", "evil_lightning_name")
    r = run_cli(recipe_with(workdir, "models/l.ckpt"), cache=cache)
    assert "Traceback" not in r.err
    assert not marker.exists(), "the pickle's payload ran"


def test_checkpoint_view_claiming_more_than_stored_is_refused(
    workdir: Path, cache: Path, ckpts: Path
) -> None:
    """Found by this suite: a stride-0 view in a 2 KB pickle claimed 10^10 elements; reading it
    would allocate (and write) tens of gigabytes."""
    make_ckpt(ckpts, workdir / "models" / "b.ckpt", "expand_bomb")
    r = run_cli(recipe_with(workdir, "models/b.ckpt"), cache=cache, timeout=120)
    assert r.code == 1 and "Traceback" not in r.err, r.err
    assert "claims" in r.err and "b.ckpt" in r.err, r.err
