"""ΔW of every LoRA/LyCORIS algorithm, read from real files, against float64 numpy references
written from the published formulas (A1111 `networks`, LyCORIS), not from mergebuild's code."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from mergebuild.lora.source import LoraSource

RNG = np.random.default_rng(7)
Q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
Q_KEY = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"
CONV = "lora_unet_down_blocks_0_resnets_0_conv1"  # a 3×3 conv
CONV_KEY = "model.diffusion_model.input_blocks.1.0.in_layers.2.weight"
PROJ = "lora_unet_down_blocks_0_attentions_0_proj_in"  # SD1: a 1×1 conv
PROJ_KEY = "model.diffusion_model.input_blocks.1.1.proj_in.weight"


def r(*shape: int, dtype: type = np.float32) -> np.ndarray:
    return (RNG.standard_normal(shape) * 0.5).astype(dtype)


def f64(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float64)


def delta_of(tmp_path: Path, tensors: dict[str, np.ndarray], key: str) -> np.ndarray:
    path = tmp_path / "l.safetensors"
    save_file(tensors, str(path))
    src = LoraSource(path)
    try:
        return src.delta(key).numpy()
    finally:
        src.close()


def assert_rounded_once(got: np.ndarray, ref: np.ndarray) -> None:
    """`got` is float32 and within one float32 ulp of the float64 reference."""
    assert got.dtype == np.float32 and got.shape == ref.shape
    want = ref.astype(np.float32)
    ulp = np.spacing(np.abs(want))
    assert np.all(np.abs(got.astype(np.float64) - ref) <= ulp), np.max(np.abs(got - want))


def kron(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Kronecker product, written out: block (i, j) is a[i, j] · b."""
    out = np.zeros((a.shape[0] * b.shape[0], a.shape[1] * b.shape[1], *b.shape[2:]))
    for i in range(a.shape[0]):
        for j in range(a.shape[1]):
            out[i * b.shape[0] : (i + 1) * b.shape[0], j * b.shape[1] : (j + 1) * b.shape[1]] = a[
                i, j
            ] * f64(b)
    return out


def test_lora_linear_alpha(tmp_path: Path) -> None:
    up, down = r(12, 4), r(4, 10)
    t = {f"{Q}.lora_up.weight": up, f"{Q}.lora_down.weight": down, f"{Q}.alpha": np.array(2.0)}
    ref = f64(up) @ f64(down) * (2.0 / 4)
    assert_rounded_once(delta_of(tmp_path, t, Q_KEY), ref)


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_lora_without_alpha_has_scale_one(tmp_path: Path, dtype: type) -> None:
    up, down = r(8, 3, dtype=dtype), r(3, 8, dtype=dtype)
    t = {f"{Q}.lora_up.weight": up, f"{Q}.lora_down.weight": down}
    assert_rounded_once(delta_of(tmp_path, t, Q_KEY), f64(up) @ f64(down))


def test_peft_lora_a_b_is_down_up(tmp_path: Path) -> None:
    up, down = r(12, 4), r(4, 10)
    prefix = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    t = {f"{prefix}.lora_B.weight": up, f"{prefix}.lora_A.weight": down}
    assert_rounded_once(delta_of(tmp_path, t, Q_KEY), f64(up) @ f64(down))


def test_locon_3x3(tmp_path: Path) -> None:
    up, down = r(6, 3, 1, 1), r(3, 5, 3, 3)
    t = {
        f"{CONV}.lora_up.weight": up,
        f"{CONV}.lora_down.weight": down,
        f"{CONV}.alpha": np.asarray(r() + 2),
    }
    alpha = float(t[f"{CONV}.alpha"])
    ref = np.zeros((6, 5, 3, 3))
    for o in range(6):
        for i in range(5):
            for a in range(3):
                ref[o, i] += f64(up)[o, a, 0, 0] * f64(down)[a, i]
    assert_rounded_once(delta_of(tmp_path, t, CONV_KEY), ref * alpha / 3)


def test_lora_1x1_conv(tmp_path: Path) -> None:
    up, down = r(7, 2, 1, 1), r(2, 7, 1, 1)
    t = {f"{PROJ}.lora_up.weight": up, f"{PROJ}.lora_down.weight": down}
    ref = (f64(up)[:, :, 0, 0] @ f64(down)[:, :, 0, 0])[:, :, None, None]
    assert_rounded_once(delta_of(tmp_path, t, PROJ_KEY), ref)


def test_locon_tucker(tmp_path: Path) -> None:
    """down (1×1, in→r), mid (3×3, r→r), up (1×1, r→out) composed into one 3×3 conv."""
    up, mid, down = r(6, 3, 1, 1), r(3, 3, 3, 3), r(3, 5, 1, 1)
    t = {
        f"{CONV}.lora_up.weight": up,
        f"{CONV}.lora_mid.weight": mid,
        f"{CONV}.lora_down.weight": down,
        f"{CONV}.alpha": np.array(1.5, dtype=np.float16),
    }
    ref = np.zeros((6, 5, 3, 3))
    for o in range(6):
        for i in range(5):
            for a in range(3):
                for b in range(3):
                    ref[o, i] += f64(up)[o, a, 0, 0] * f64(mid)[a, b] * f64(down)[b, i, 0, 0]
    assert_rounded_once(delta_of(tmp_path, t, CONV_KEY), ref * 1.5 / 3)


def test_loha_linear(tmp_path: Path) -> None:
    w1a, w1b, w2a, w2b = r(12, 4), r(4, 10), r(12, 4), r(4, 10)
    t = {
        f"{Q}.hada_w1_a": w1a,
        f"{Q}.hada_w1_b": w1b,
        f"{Q}.hada_w2_a": w2a,
        f"{Q}.hada_w2_b": w2b,
        f"{Q}.alpha": np.array(1.0),
    }
    ref = (f64(w1a) @ f64(w1b)) * (f64(w2a) @ f64(w2b)) * (1.0 / 4)
    assert_rounded_once(delta_of(tmp_path, t, Q_KEY), ref)


def test_loha_conv_flattened(tmp_path: Path) -> None:
    """A conv LoHa stores w*_b as [rank, in·3·3]; the kernel comes from the layer."""
    w1a, w1b, w2a, w2b = r(6, 2), r(2, 45), r(6, 2), r(2, 45)
    t = {
        f"{CONV}.hada_w1_a": w1a,
        f"{CONV}.hada_w1_b": w1b,
        f"{CONV}.hada_w2_a": w2a,
        f"{CONV}.hada_w2_b": w2b,
    }
    ref = ((f64(w1a) @ f64(w1b)) * (f64(w2a) @ f64(w2b))).reshape(6, 5, 3, 3)
    assert_rounded_once(delta_of(tmp_path, t, CONV_KEY), ref)


def test_loha_tucker(tmp_path: Path) -> None:
    t1, w1a, w1b = r(2, 2, 3, 3), r(2, 6), r(2, 5)
    t2, w2a, w2b = r(2, 2, 3, 3), r(2, 6), r(2, 5)
    t = {
        f"{CONV}.hada_t1": t1,
        f"{CONV}.hada_w1_a": w1a,
        f"{CONV}.hada_w1_b": w1b,
        f"{CONV}.hada_t2": t2,
        f"{CONV}.hada_w2_a": w2a,
        f"{CONV}.hada_w2_b": w2b,
        f"{CONV}.alpha": np.array(4.0),
    }

    def core(tc: np.ndarray, wa: np.ndarray, wb: np.ndarray) -> np.ndarray:
        out = np.zeros((6, 5, 3, 3))
        for o in range(6):
            for i in range(5):
                for a in range(2):
                    for b in range(2):
                        out[o, i] += f64(tc)[a, b] * f64(wa)[a, o] * f64(wb)[b, i]
        return out

    ref = core(t1, w1a, w1b) * core(t2, w2a, w2b) * (4.0 / 2)
    assert_rounded_once(delta_of(tmp_path, t, CONV_KEY), ref)


def test_lokr_both_full_has_scale_one(tmp_path: Path) -> None:
    w1, w2 = r(3, 2), r(4, 5)
    t = {f"{Q}.lokr_w1": w1, f"{Q}.lokr_w2": w2, f"{Q}.alpha": np.array(8.0)}
    assert_rounded_once(delta_of(tmp_path, t, Q_KEY), kron(w1, w2))


def test_lokr_factored_w2(tmp_path: Path) -> None:
    w1, w2a, w2b = r(3, 2), r(4, 2), r(2, 5)
    t = {
        f"{Q}.lokr_w1": w1,
        f"{Q}.lokr_w2_a": w2a,
        f"{Q}.lokr_w2_b": w2b,
        f"{Q}.alpha": np.asarray(r() + 2),
    }
    alpha = float(t[f"{Q}.alpha"])
    ref = kron(w1, f64(w2a) @ f64(w2b)) * alpha / 2
    assert_rounded_once(delta_of(tmp_path, t, Q_KEY), ref)


def test_lokr_factored_w1_rank_comes_from_w1(tmp_path: Path) -> None:
    w1a, w1b, w2a, w2b = r(3, 3), r(3, 2), r(4, 2), r(2, 5)
    t = {
        f"{Q}.lokr_w1_a": w1a,
        f"{Q}.lokr_w1_b": w1b,
        f"{Q}.lokr_w2_a": w2a,
        f"{Q}.lokr_w2_b": w2b,
        f"{Q}.alpha": np.array(1.0),
    }
    ref = kron(f64(w1a) @ f64(w1b), f64(w2a) @ f64(w2b)) * (1.0 / 3)  # rank: w1_b's
    assert_rounded_once(delta_of(tmp_path, t, Q_KEY), ref)


def test_lokr_conv_full(tmp_path: Path) -> None:
    w1, w2 = r(2, 5), r(3, 1, 3, 3)
    t = {f"{CONV}.lokr_w1": w1, f"{CONV}.lokr_w2": w2}
    assert_rounded_once(delta_of(tmp_path, t, CONV_KEY), kron(w1, w2))


def test_lokr_tucker(tmp_path: Path) -> None:
    w1, t2, w2a, w2b = r(2, 5), r(2, 2, 3, 3), r(2, 3), r(2, 1)
    t = {
        f"{CONV}.lokr_w1": w1,
        f"{CONV}.lokr_t2": t2,
        f"{CONV}.lokr_w2_a": w2a,
        f"{CONV}.lokr_w2_b": w2b,
        f"{CONV}.alpha": np.array(1.0),
    }
    w2 = np.zeros((3, 1, 3, 3))
    for c in range(3):
        for d in range(1):
            for a in range(2):
                for b in range(2):
                    w2[c, d] += f64(t2)[a, b] * f64(w2a)[a, c] * f64(w2b)[b, d]
    assert_rounded_once(delta_of(tmp_path, t, CONV_KEY), kron(w1, w2) * (1.0 / 2))


@pytest.mark.parametrize("per_row", [False, True])
def test_dora_renormalises_to_the_stored_magnitudes(per_row: bool) -> None:
    import torch

    from mergebuild.lora.delta import dora

    w, dw = r(6, 5), r(6, 5)
    m = r(6, 1) if per_row else r(1, 5)
    merged = f64(w) + f64(dw)
    norm = np.sqrt((merged**2).sum(axis=1, keepdims=True) if per_row else (merged**2).sum(axis=0))
    ref = merged * f64(m) / norm - f64(w)
    got = dora(torch.from_numpy(w), torch.from_numpy(dw), torch.from_numpy(m)).numpy()
    assert_rounded_once(got, ref)


def test_chunked_reads_give_the_whole_delta(tmp_path: Path) -> None:
    """The engine reads a large key in chunks: the pieces are the whole ΔW's, computed once."""
    up, down = r(12, 4), r(4, 10)
    path = tmp_path / "l.safetensors"
    save_file({f"{Q}.lora_up.weight": up, f"{Q}.lora_down.weight": down}, str(path))
    src = LoraSource(path)
    whole = src.delta(Q_KEY).numpy().reshape(-1)
    parts = [src.read_flat(Q_KEY, lo, min(lo + 7, 120)).numpy() for lo in range(0, 120, 7)]
    assert not src._cache  # every element served: nothing held any more
    src.close()
    assert np.array_equal(np.concatenate(parts), whole)
