"""slerp, train_difference and the cosine methods against sd-mecha 1.1.8 on small tensors.

sd-mecha's merge functions are called undecorated (`__wrapped__`) on plain tensors.
- slerp: same formula (whole-tensor norms, lerp fallback); ours sums norms in float64.
- train_difference: sd-mecha spells it add_difference with `train_difference_mask` as alpha;
  the same per-element result.
- add_cosine_b: the same.
- add_cosine_a: intended difference. Ours follows SuperMerger's cosineA, where the similarity
  of column j is (cosⱼ + mean of cos over columns) / 2, min-max normalised; sd-mecha uses cosⱼ
  alone. Both keep a where b == a.
"""

from __future__ import annotations

import pytest
import torch

from mergebuild.engine.methods import REGISTRY

sd_mecha = pytest.importorskip("sd_mecha")

SHAPES = [(257,), (32, 16), (8, 4, 3, 3), (77, 768)]


def ours(name: str, xs: list[torch.Tensor], **params) -> torch.Tensor:
    m = REGISTRY[name]
    return m.compute(m.Params(**params), xs)


def triple(shape: tuple[int, ...], seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(shape, generator=g)
    return a, a + 0.3 * torch.randn(shape, generator=g), a + 0.2 * torch.randn(shape, generator=g)


def max_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    return float((x.double() - y.double()).abs().max())


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("alpha", [0.0, 0.2, 0.5, 0.9])
def test_slerp_equals_sd_mecha(shape, alpha):
    a, b, _ = triple(shape, 1)
    want = sd_mecha.slerp.__wrapped__(a, b, torch.tensor(alpha))
    assert max_diff(ours("slerp", [a, b], alpha=alpha), want) <= 2e-6


def test_slerp_parallel_falls_back_to_lerp_like_sd_mecha():
    a = torch.linspace(-1, 1, 100)
    b = 2 * a  # parallel: Ω = 0, both take the lerp
    want = sd_mecha.slerp.__wrapped__(a, b, torch.tensor(0.25))
    assert max_diff(ours("slerp", [a, b], alpha=0.25), want) <= 1e-6


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("alpha", [0.3, 1.0])
def test_train_difference_equals_sd_mecha_mask(shape, alpha):
    a, b, c = triple(shape, 2)
    mask = sd_mecha.train_difference_mask.__wrapped__(a, b, c, torch.tensor(alpha))
    assert max_diff(ours("train_difference", [a, b, c], alpha=alpha), a + (b - c) * mask) <= 1e-6


@pytest.mark.parametrize("shape", SHAPES[1:])
@pytest.mark.parametrize("alpha", [0.0, 0.3])
def test_add_cosine_b_equals_sd_mecha(shape, alpha):
    a, b, _ = triple(shape, 3)
    want = sd_mecha.add_cosine_b.__wrapped__(a, b, torch.tensor(alpha))
    assert max_diff(ours("add_cosine_b", [a, b], alpha=alpha), want) <= 1e-6


@pytest.mark.parametrize("alpha", [0.0, 0.3])
def test_add_cosine_a_intended_difference(alpha):
    """Ours (SuperMerger's cosineA) and sd-mecha's differ on a general tensor; both keep a
    where b == a."""
    a, b, _ = triple((64, 12), 4)
    got = ours("add_cosine_a", [a, b], alpha=alpha)
    want = sd_mecha.add_cosine_a.__wrapped__(a, b, torch.tensor(alpha))
    assert max_diff(got, want) > 1e-3
    assert max_diff(ours("add_cosine_a", [a, a.clone()], alpha=alpha), a) <= 1e-6
    assert max_diff(sd_mecha.add_cosine_a.__wrapped__(a, a.clone(), torch.tensor(alpha)), a) <= 1e-6
