"""The task-vector methods against sd-mecha 1.1.8 (the bench's pinned baseline) on small tensors.

sd-mecha's merge functions are called undecorated (`__wrapped__`) on plain tensors. Its random
masks come from torch.bernoulli; the tests substitute our counter-based uniforms (u < probs),
so both sides drop the same elements and the rest of the pipeline is compared exactly.

Intended differences (documented in the methods' descriptions, checked here where testable):
- ties: none (same trim rule, both votes). Default vote differs: ours magnitude, sd-mecha count.
- dare_ties: sd-mecha 1.1.8's ties_sum_extended multiplies by the model-stock factor when
  `apply_stock` is False (the flag is inverted); we compare against apply_stock=True (plain
  TIES), which is what its docs call TIES + DARE.
- della: sd-mecha divides the merged result by 1 − p; we rescale each kept element by its own
  1/qⱼ (DELLA paper, mergekit). Same keep probabilities; same result when eps = 0.
- add_perpendicular: where a == c sd-mecha returns a; we add b − c (add_difference).
- model_stock: sd-mecha averages cosines of consecutive pairs per row of the last dimension
  with an eps clamp; we average all pairs over the whole tensor (mergekit). Equal for 1-D
  tensors with two models.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mergebuild.engine import rng
from mergebuild.engine.methods import REGISTRY
from mergebuild.engine.methods.base import ComputeContext

sd_ties = pytest.importorskip("sd_mecha.extensions.builtin.merge_methods.ties")
sd_linear = pytest.importorskip("sd_mecha.extensions.builtin.merge_methods.linear")

NODE = "feedface" * 8
MAX_DIFF: dict[str, float] = {}


def ours(name: str, xs: list[torch.Tensor], seed: int = 0, **params) -> torch.Tensor:
    m = REGISTRY[name]
    p = m.Params(**params)
    if m.needs_context:
        c = ComputeContext("w", 0, xs[0].numel(), NODE, seed)
        return m.compute(p, xs, c)
    return m.compute(p, xs)


def compare(label: str, got: torch.Tensor, want: torch.Tensor, atol: float) -> None:
    diff = float((got.double() - want.double()).abs().max())
    MAX_DIFF[label] = max(MAX_DIFF.get(label, 0.0), diff)
    print(f"sd-mecha {label}: max abs diff {diff:.3g}")
    assert diff <= atol, f"{label}: {diff}"


def inputs(seed: int, n: int, shape: tuple[int, ...], on_grid: bool) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    if on_grid:
        return [torch.randint(-64, 65, shape, generator=g).float() / 32 for _ in range(n + 1)]
    base = torch.randn(shape, generator=g)
    return [base] + [base + 0.1 * torch.randn(shape, generator=g) for _ in range(n)]


class FakeBernoulli:
    """torch.bernoulli replacement: model i's mask is u < probs with our stream for model i."""

    def __init__(self, seed: int) -> None:
        self.seed, self.calls, self.probs = seed, 0, []

    def __call__(self, probs: torch.Tensor, generator=None) -> torch.Tensor:
        self.calls += 1
        self.probs.append(probs.clone())
        u = rng.uniform(self.seed, NODE, f"w#{self.calls}", 0, probs.numel()).reshape(probs.shape)
        return (u < probs.double()).to(probs.dtype)


@pytest.mark.parametrize("n", [1, 2, 3, 5])
@pytest.mark.parametrize("k", [0.1, 0.2, 0.5, 1.0])
@pytest.mark.parametrize("vote", ["magnitude", "count"])
@pytest.mark.parametrize("on_grid", [True, False])
def test_ties_equals_sd_mecha_add_difference_ties(n, k, vote, on_grid):
    xs = inputs(n * 7 + int(k * 10), n, (24, 40), on_grid)
    deltas = [m - xs[0] for m in xs[1:]]
    res = sd_ties.ties_sum.__wrapped__(*deltas, k=k, vote_sgn=vote == "magnitude")
    want = xs[0].addcmul(res, torch.tensor(0.8))
    compare("ties", ours("ties", xs, k=k, vote=vote, alpha=0.8), want, 2e-6 * 4)


@pytest.mark.parametrize(
    ("p", "k", "n"), [(0.0, 1.0, 2), (0.5, 1.0, 3), (0.9, 1.0, 2), (0.7, 0.4, 4)]
)
@pytest.mark.parametrize("vote", ["magnitude", "count"])
def test_dare_ties_equals_sd_mecha_ties_with_dare(monkeypatch, p, k, n, vote):
    xs = inputs(int(p * 10) + n, n, (30, 31), on_grid=False)
    deltas = [m - xs[0] for m in xs[1:]]
    monkeypatch.setattr(torch, "bernoulli", FakeBernoulli(seed=12))
    res = sd_ties.ties_sum_with_dropout.__wrapped__(
        *deltas, probability=p, della_eps=0.0, rescale=True, k=k, vote_sgn=vote == "magnitude",
        apply_stock=True, cos_eps=1e-6, apply_median=False, eps=1e-6, maxiter=100, ftol=1e-20,
        seed=1,
    )  # fmt: skip
    monkeypatch.undo()
    want = xs[0] + res
    got = ours("dare_ties", xs, seed=12, p=p, k=k, vote=vote)
    compare("dare_ties", got, want, 2e-5 * 4)


@pytest.mark.parametrize(("p", "n"), [(0.3, 2), (0.8, 3)])
def test_della_eps0_equals_sd_mecha(monkeypatch, p, n):
    xs = inputs(n + 30, n, (50, 20), on_grid=False)
    deltas = [m - xs[0] for m in xs[1:]]
    monkeypatch.setattr(torch, "bernoulli", FakeBernoulli(seed=4))
    res = sd_ties.ties_sum_with_dropout.__wrapped__(
        *deltas, probability=p, della_eps=0.0, rescale=True, k=1.0, vote_sgn=True,
        apply_stock=True, cos_eps=1e-6, apply_median=False, eps=1e-6, maxiter=100, ftol=1e-20,
        seed=1,
    )  # fmt: skip
    monkeypatch.undo()
    compare("della (eps 0)", ours("della", xs, seed=4, p=p, eps=0.0), xs[0] + res, 1e-4)


@pytest.mark.parametrize(("p", "eps"), [(0.5, 0.2), (0.8, 0.3), (0.1, 0.15)])
def test_della_keep_probabilities_and_masks_equal_sd_mecha(monkeypatch, p, eps):
    """Same rank window: the same elements are kept (one model, so no sign election)."""
    base = torch.zeros(4000)
    m = torch.randn(4000, generator=torch.Generator().manual_seed(2))
    fake = FakeBernoulli(seed=9)
    monkeypatch.setattr(torch, "bernoulli", fake)
    res = sd_ties.ties_sum_with_dropout.__wrapped__(
        m, probability=p, della_eps=eps, rescale=True, k=1.0, vote_sgn=True,
        apply_stock=True, cos_eps=1e-6, apply_median=False, eps=1e-6, maxiter=100, ftol=1e-20,
        seed=1,
    )  # fmt: skip
    monkeypatch.undo()
    got = ours("della", [base, m], seed=9, p=p, eps=eps)
    assert torch.equal(got != 0, res != 0)
    # values: ours δ/qⱼ, sd-mecha δ/(1 − p); qⱼ is sd-mecha's float32 probability
    q = fake.probs[0].double()
    kept = got != 0
    scaled = got.double()[kept] * q[kept] / (1 - p)
    compare("della (eps>0, rescaled to sd-mecha's 1/(1-p))", scaled, res.double()[kept], 1e-5)


@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_add_perpendicular_equals_sd_mecha(alpha):
    a, b, c = inputs(5, 2, (64, 33), on_grid=False)
    perp = sd_linear.perpendicular_component.__wrapped__(a - c, b - c)
    want = a.addcmul(perp, torch.tensor(alpha))
    compare("add_perpendicular", ours("add_perpendicular", [a, b, c], alpha=alpha), want, 1e-5)
    # a == c: sd-mecha adds nothing, we add b − c (documented difference)
    perp0 = sd_linear.perpendicular_component.__wrapped__(a - a, b - a)
    assert torch.equal(perp0, torch.zeros_like(a))
    got = ours("add_perpendicular", [a, b, a.clone()], alpha=alpha)
    assert torch.allclose(got, a + alpha * (b - a), atol=1e-6)


def test_model_stock_equals_sd_mecha_for_two_vectors():
    g = torch.Generator().manual_seed(3)
    base = torch.randn(5000, generator=g)
    shared = torch.randn(5000, generator=g)
    xs = [base] + [base + shared + torch.randn(5000, generator=g) for _ in range(2)]
    res = sd_ties.model_stock.__wrapped__(*[m - base for m in xs[1:]], cos_eps=1e-6)
    compare("model_stock (1-D, n=2)", ours("model_stock", xs), base + res, 1e-5)


@pytest.mark.parametrize("n", [2, 3, 5])
def test_geometric_median_equals_sd_mecha(n):
    xs = inputs(n + 50, n, (40, 25), on_grid=False)[1:]
    xs.append(xs[0] + 3)
    want = sd_ties.geometric_median.__wrapped__(*xs, eps=1e-6, maxiter=40, ftol=0.0)
    got = ours("geometric_median", xs, max_iter=40, tol=0.0)
    # sd-mecha iterates in float32 throughout; run in float64 it is the exact reference, and
    # ours (float64 distances, float32 iterate) is closer to it than sd-mecha's float32 run
    exact = sd_ties.geometric_median.__wrapped__(
        *[x.double() for x in xs], eps=1e-6, maxiter=40, ftol=0.0
    )
    compare("geometric_median (vs its float64 run)", got, exact, 4e-6)
    assert (got.double() - exact).abs().max() <= (want.double() - exact).abs().max()
    compare("geometric_median (vs its float32 run)", got, want, 1e-2)


def test_n_average_equals_sd_mecha():
    xs = inputs(77, 4, (33, 17), on_grid=False)
    want = sd_linear.n_average.__wrapped__(*[{"k": x} for x in xs], key="k")
    compare("n_average", ours("n_average", xs), want, 1e-6)


def test_report_max_differences():
    """Prints the figures for the notes (run with -s after the comparisons above)."""
    for label, diff in sorted(MAX_DIFF.items()):
        print(f"sd-mecha max abs diff, {label}: {diff:.3g}")
    assert all(np.isfinite(v) for v in MAX_DIFF.values())
