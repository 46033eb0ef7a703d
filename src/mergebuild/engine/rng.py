"""Counter-based uniforms: element j of a tensor always gets the same number.

Random methods (DARE, DELLA) must give the same bytes whatever the tile size, chunking, -j,
device or cache state, so there is no generator state to advance: the value for element j is a
pure function of (seed, node key, tensor name, j).

Definition (pinned by tests/test_rng.py against a pure-Python implementation):

    key  = xxh3_64(json.dumps([seed, node_key, tensor]) as UTF-8)   # the stream key
    x    = key + (j + 1) · 0x9E3779B97F4A7C15          (mod 2**64)   # splitmix64's Weyl step
    z    = (x ^ (x >> 30)) · 0xBF58476D1CE4E5B9        (mod 2**64)   # splitmix64's finaliser
    z    = (z ^ (z >> 27)) · 0x94D049BB133111EB        (mod 2**64)
    z    =  z ^ (z >> 31)
    u_j  = (z >> 11) · 2**-53                                        # in [0, 1), 53 bits

i.e. u_j is the (j+1)-th output of splitmix64 seeded with `key`. numpy uint64 arithmetic wraps
modulo 2**64 by definition, so the integers are the same on every machine.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

GAMMA = np.uint64(0x9E3779B97F4A7C15)
MIX1 = np.uint64(0xBF58476D1CE4E5B9)
MIX2 = np.uint64(0x94D049BB133111EB)
# Uniforms are produced in blocks of this many elements: the two uint64 temporaries (512 KB
# each) stay in L2, and a whole-tensor caller never holds 8 bytes per element of a 60 M tensor
# at once. keep_mask over 14.7 M elements: 2.9 ns per element, against 6.8 with 1 << 18 (4 MB
# of temporaries). The values are a function of the element index alone, whatever the block.
BLOCK = 1 << 16


def stream_key(seed: int, node_key: str, tensor: str) -> int:
    """The 64-bit key of one tensor's stream (JSON keeps the three parts unambiguous)."""
    import xxhash

    text = json.dumps([int(seed), node_key, tensor], ensure_ascii=True)
    return xxhash.xxh3_64_intdigest(text.encode("ascii"))


_STEPS: np.ndarray | None = None  # (1..BLOCK) · GAMMA, the Weyl steps of one block


def _mixed(key: int, start: int, n: int, x: np.ndarray, t: np.ndarray) -> np.ndarray:
    """splitmix64 outputs z for elements start..start+n (n <= BLOCK), written into x[:n]."""
    global _STEPS
    if _STEPS is None:
        _STEPS = np.arange(1, BLOCK + 1, dtype=np.uint64) * GAMMA
    x, t = x[:n], t[:n]
    np.add(_STEPS[:n], np.uint64((key + start * int(GAMMA)) % 2**64), out=x)
    np.right_shift(x, np.uint64(30), out=t)
    x ^= t
    x *= MIX1
    np.right_shift(x, np.uint64(27), out=t)
    x ^= t
    x *= MIX2
    np.right_shift(x, np.uint64(31), out=t)
    x ^= t
    return x


def uniform(seed: int, node_key: str, tensor: str, offset: int, n: int) -> torch.Tensor:
    """float64 uniforms in [0, 1) for elements offset..offset+n of `tensor`'s stream."""
    import torch

    if offset < 0 or n < 0:
        raise ValueError(f"bad element range: offset {offset}, n {n}")
    key = stream_key(seed, node_key, tensor)
    out = np.empty(n, dtype=np.float64)
    x, t = np.empty(min(n, BLOCK), np.uint64), np.empty(min(n, BLOCK), np.uint64)
    for lo in range(0, n, BLOCK):
        z = _mixed(key, offset + lo, min(BLOCK, n - lo), x, t)
        z >>= np.uint64(11)
        np.multiply(z, 2.0**-53, out=out[lo : lo + len(z)])
    return torch.from_numpy(out)


def keep_limit(keep: float) -> np.uint64:
    """u < keep  <=>  (z >> 11) < ceil(keep · 2**53)  <=>  z < ceil(keep · 2**53) · 2**11: exact,
    because u = (z >> 11) · 2**-53 and keep · 2**53 is an exact float64 product. For
    0 < keep < 1 the limit is at most (2**53 - 1) · 2**11, so it fits in 64 bits."""
    import math

    return np.uint64(math.ceil(keep * 2.0**53) << 11)


def keep_mask(
    seed: int, node_key: str, tensor: str, offset: int, n: int, keep: float
) -> torch.Tensor:
    """Bool mask `uniform(...) < keep` for a scalar keep probability, computed on integers
    (see keep_limit): skips 8 bytes per element of float conversion."""
    import torch

    if offset < 0 or n < 0:
        raise ValueError(f"bad element range: offset {offset}, n {n}")
    if keep >= 1.0:
        return torch.ones(n, dtype=torch.bool)
    if keep <= 0.0:
        return torch.zeros(n, dtype=torch.bool)
    limit = keep_limit(keep)
    key = stream_key(seed, node_key, tensor)
    out = np.empty(n, dtype=np.bool_)
    x, t = np.empty(min(n, BLOCK), np.uint64), np.empty(min(n, BLOCK), np.uint64)
    for lo in range(0, n, BLOCK):
        z = _mixed(key, offset + lo, min(BLOCK, n - lo), x, t)
        np.less(z, limit, out=out[lo : lo + len(z)])
    return torch.from_numpy(out)


def drop_(
    d: torch.Tensor,
    seed: int,
    node_key: str,
    tensor: str,
    offset: int,
    keep: float,
    loops: Any | None = None,
) -> torch.Tensor:
    """d (flat float32, contiguous) times keep_mask(...) as float 0/1, in place: DARE's drop of
    elements offset..offset+len(d). With the compiled loops (reduce.loops_for), one pass that
    never makes the mask (_kernels.drop); the same bits either way (a non-finite dropped
    element still gives NaN, as 0 · inf does)."""
    if keep >= 1.0:
        return d
    if loops is None or keep <= 0.0:
        mask = keep_mask(seed, node_key, tensor, offset, d.numel(), keep)
        np.multiply(d.numpy(), mask.numpy(), out=d.numpy())  # bools cast to 1.0/0.0
        return d
    if offset < 0:
        raise ValueError(f"bad element range: offset {offset}, n {d.numel()}")
    key = stream_key(seed, node_key, tensor)
    loops.drop(d.numpy(), np.uint64(key), np.uint64(offset), keep_limit(keep))
    return d
