"""A plain product's ΔW read in chunks forms only the row blocks each chunk needs: every
chunking, in any order and from two threads at once, gives the bytes of the whole ΔW, and of
the float64 numpy product rounded once (LoRA, LoCon 3×3, LoHa)."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from mergebuild.lora import delta as delta_mod
from mergebuild.lora.source import LoraSource

U = "model.diffusion_model."
Q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
Q_KEY = U + "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"
CONV = "lora_unet_down_blocks_1_resnets_0_conv1"
CONV_KEY = U + "input_blocks.4.0.in_layers.2.weight"
RNG = np.random.default_rng(3)


def r(*shape: int) -> np.ndarray:
    return (RNG.standard_normal(shape) * 0.5).astype(np.float32)


def files(tmp_path: Path) -> dict[str, tuple[Path, str, np.ndarray]]:
    """name → (file, key, float64 reference ΔW flattened)."""
    out = {}
    up, down = r(37, 4), r(4, 23)
    p = tmp_path / "lora.safetensors"
    save_file({f"{Q}.lora_up.weight": up, f"{Q}.lora_down.weight": down,
               f"{Q}.alpha": np.array(3.0, np.float32)}, str(p))  # fmt: skip
    out["lora"] = (p, Q_KEY, (up.astype(np.float64) @ down.astype(np.float64) * 0.75).ravel())
    cu, cd = r(19, 3, 1, 1), r(3, 7, 3, 3)
    p = tmp_path / "locon.safetensors"
    save_file({f"{CONV}.lora_up.weight": cu, f"{CONV}.lora_down.weight": cd}, str(p))
    ref = cu.reshape(19, 3).astype(np.float64) @ cd.reshape(3, -1).astype(np.float64)
    out["locon"] = (p, CONV_KEY, ref.ravel())
    w = {
        n: r(*s)
        for n, s in (("w1a", (37, 2)), ("w1b", (2, 23)), ("w2a", (37, 2)), ("w2b", (2, 23)))
    }
    p = tmp_path / "loha.safetensors"
    save_file({f"{Q}.hada_{k[:2]}_{k[2]}": v for k, v in w.items()}, str(p))
    f = {k: v.astype(np.float64) for k, v in w.items()}
    out["loha"] = (p, Q_KEY, ((f["w1a"] @ f["w1b"]) * (f["w2a"] @ f["w2b"])).ravel())  # no alpha
    return out


def chunked(src: LoraSource, key: str, n: int, sizes: list[int]) -> np.ndarray:
    parts, lo, i = [], 0, 0
    while lo < n:
        hi = min(n, lo + sizes[i % len(sizes)])
        parts.append(src.read_flat(key, lo, hi).numpy().copy())
        lo, i = hi, i + 1
    return np.concatenate(parts)


def _work(src: LoraSource, key: str, bounds: list[int], got: np.ndarray, parity: int) -> None:
    for j in range(parity, len(bounds) - 1, 2):
        got[bounds[j] : bounds[j + 1]] = src.read_flat(key, bounds[j], bounds[j + 1])


@pytest.mark.parametrize("algo", ["lora", "locon", "loha"])
@pytest.mark.parametrize("block", [1 << 20, 1 << 18, 40, 7])
def test_row_blocks_equal_the_whole(tmp_path: Path, monkeypatch, algo: str, block: int) -> None:
    monkeypatch.setattr(delta_mod, "ROW_BLOCK", block)
    path, key, ref = files(tmp_path)[algo]
    src = LoraSource(path)
    try:
        whole = src.delta(key).numpy().ravel()
        want = ref.astype(np.float32)  # rounded once (to one ulp: numpy sums in its own order)
        assert np.all(np.abs(whole - want) <= np.spacing(np.abs(want)))
        n = whole.size
        for sizes in ([n], [1], [5], [64, 3, 17], [n - 1]):
            assert np.array_equal(chunked(src, key, n, sizes), whole), sizes
            assert not src._cache  # every element served: nothing held
        bounds = [*range(0, n, 11), n]
        for _ in range(3):  # two threads reading interleaved chunks of the key
            got = np.empty(n, np.float32)
            ts = [threading.Thread(target=_work, args=(src, key, bounds, got, p)) for p in (0, 1)]
            for t in ts:
                t.start()
            for t in ts:
                t.join()
            assert np.array_equal(got, whole)
            assert not src._cache
    finally:
        src.close()
