"""The counter-based RNG: values depend only on (seed, node key, tensor, element index)."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import xxhash

from mergebuild.engine import rng

M64 = (1 << 64) - 1


def reference_uniform(seed: int, node_key: str, tensor: str, j: int) -> float:
    """The documented definition, in plain Python integers (independent of numpy)."""
    key = xxhash.xxh3_64_intdigest(json.dumps([seed, node_key, tensor]).encode("ascii"))
    x = (key + (j + 1) * 0x9E3779B97F4A7C15) & M64
    z = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    z ^= z >> 31
    return (z >> 11) / 2.0**53


@pytest.mark.parametrize(
    ("seed", "node_key", "tensor", "offset"),
    [
        (0, "00ff", "model.diffusion_model.out.2.weight", 0),
        (42, "deadbeef" * 4, "cond_stage_model.transformer.text_model.embeddings.x", 12345),
        (2**63 - 1, "", "t#3", 2**40),
        (7, "k", "ünïcode ключ", (1 << 18) - 3),  # straddles an internal block boundary
    ],
)
def test_values_match_the_pure_python_definition(seed, node_key, tensor, offset):
    got = rng.uniform(seed, node_key, tensor, offset, 8).numpy()
    want = [reference_uniform(seed, node_key, tensor, offset + j) for j in range(8)]
    assert got.tolist() == want


def test_pinned_values():
    """Fixed numbers: a change of the definition (and so of every DARE mask) must be deliberate."""
    got = rng.uniform(0, "ab", "t", 0, 3).numpy().tolist()
    assert got == [0.3170435028656511, 0.203937777117279, 0.4911003046118648]


@pytest.mark.parametrize("splits", [[0, 1, 2, 3], [0, 262143, 262145, 600000], [0, 600000]])
def test_chunking_does_not_change_values(splits):
    n = 600000
    whole = rng.uniform(5, "node", "w", 0, n).numpy()
    bounds = [*splits, n] if splits[-1] != n else splits
    parts = [
        rng.uniform(5, "node", "w", lo, hi - lo).numpy() for lo, hi in itertools.pairwise(bounds)
    ]
    assert np.array_equal(np.concatenate(parts), whole)
    masks = [
        rng.keep_mask(5, "node", "w", lo, hi - lo, 0.3).numpy()
        for lo, hi in itertools.pairwise(bounds)
    ]
    assert np.array_equal(np.concatenate(masks), whole < 0.3)


@pytest.mark.parametrize("keep", [1e-9, 0.1, 0.5, 0.7, 1 - 1e-12])
def test_keep_mask_equals_the_float_comparison(keep):
    u = rng.uniform(1, "n", "x", 100, 200000).numpy()
    assert np.array_equal(rng.keep_mask(1, "n", "x", 100, 200000, keep).numpy(), u < keep)


def test_keep_mask_extremes():
    assert rng.keep_mask(1, "n", "x", 0, 1000, 1.0).all()
    assert not rng.keep_mask(1, "n", "x", 0, 1000, 0.0).any()


def test_uniformity_on_a_million_samples():
    u = rng.uniform(123, "stats", "tensor", 0, 1_000_000).numpy()
    n = u.size
    assert u.min() >= 0.0 and u.max() < 1.0
    # mean ~ N(1/2, 1/(12n)), variance ~ 1/12 ± sqrt(1/180 n): 6 sigma bounds
    assert abs(u.mean() - 0.5) < 6 * math.sqrt(1 / 12 / n)
    assert abs(u.var() - 1 / 12) < 6 * math.sqrt(1 / 180 / n)
    counts = np.bincount((u * 100).astype(np.int64), minlength=100)
    chi2 = float(((counts - n / 100) ** 2 / (n / 100)).sum())
    assert chi2 < 99 + 6 * math.sqrt(2 * 99)  # chi-square, 99 degrees of freedom
    # neighbours are not correlated (a weak counter mixer would show up here)
    r = np.corrcoef(u[:-1], u[1:])[0, 1]
    assert abs(r) < 6 / math.sqrt(n)


@pytest.mark.parametrize(
    "other",
    [(1, "node", "t"), (0, "node2", "t"), (0, "node", "t2"), (0, "node", "t#1"), (0, "nod", "et")],
)
def test_streams_differ(other):
    a = rng.uniform(0, "node", "t", 0, 10000).numpy()
    b = rng.uniform(*other, 0, 10000).numpy()
    assert np.mean(a == b) < 0.001
    assert abs(np.corrcoef(a, b)[0, 1]) < 6 / math.sqrt(10000)


def test_bad_ranges_are_refused():
    with pytest.raises(ValueError):
        rng.uniform(0, "n", "t", -1, 3)
    with pytest.raises(ValueError):
        rng.keep_mask(0, "n", "t", 0, -3, 0.5)


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize(("keep", "offset"), [(0.1, 0), (0.5, 2**40 + 3), (1 - 1e-12, 77)])
def test_drop_multiplies_by_the_float_comparison(compiled, keep, offset):
    """rng.drop_ (numpy mask, or the compiled loop that never builds one) against the
    definition: d · (u < keep) in float32, non-finite values included (0 · inf is NaN)."""
    import torch

    from mergebuild.engine.methods import reduce

    loops = reduce.kernels() if compiled else None
    if compiled and loops is None:
        pytest.skip("compiled loops unavailable here")
    n = 70_001  # more than one numpy block, and a tail
    g = np.random.default_rng(3)
    d = g.standard_normal(n).astype(np.float32)
    d[[5, 70_000]], d[6], d[7] = np.inf, -np.inf, np.nan
    u = rng.uniform(4, "node", "w#2", offset, n).numpy()
    want = d * (u < keep).astype(np.float32)
    got = rng.drop_(torch.from_numpy(d.copy()), 4, "node", "w#2", offset, keep, loops).numpy()
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))
