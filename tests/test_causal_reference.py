"""The sequential reference is the authors' causal basis extraction: it starts from the
unembedding's top singular vectors, converges, sorts by energy, and finds the most influential
directions of a readout where they can be found by brute force."""

import math

import pytest
import torch
from tiny_models import LinearReadout, random_tuned_lens, tiny_model

from depthlens import LogitLens, capture
from depthlens.analysis.causal import prepare
from depthlens.analysis.causal.erasure import energy_and_grad, per_position_energy
from depthlens.analysis.causal.search import sequential_search, unembedding_start

IDS = torch.randint(3, 300, (4, 16), generator=torch.Generator().manual_seed(0))
EPS = torch.finfo(torch.float32).eps


def _direct_energy(weight: torch.Tensor, states: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``mean_n KL(softmax(W h_n) ‖ softmax(W (h_n − ((h_n − μ)·v) v)))`` in float64 for every row
    of ``v [M, d]`` (unit rows), ``[M]`` nats: the mean erasure written out."""
    w, h, v = weight.double(), states.double(), v.double()
    delta = h - h.mean(0)
    erased = h.unsqueeze(0) - (delta @ v.T).T.unsqueeze(-1) * v.unsqueeze(1)  # [M, N, d]
    log_p = (h @ w.T).log_softmax(-1)
    log_q = (erased @ w.T).log_softmax(-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean(-1)


def _sphere(points: int) -> torch.Tensor:
    """``[points, 3]`` unit vectors spread evenly over the sphere (Fibonacci lattice)."""
    i = torch.arange(points, dtype=torch.float64) + 0.5
    z = 1 - 2 * i / points
    phi = math.pi * (1 + 5**0.5) * i
    r = (1 - z**2).sqrt()
    return torch.stack([r * phi.cos(), r * phi.sin(), z], -1)


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", initializer_range=0.3)


def test_the_most_influential_directions_are_those_found_by_brute_force():
    generator = torch.Generator().manual_seed(5)
    weight = 2.0 * torch.randn(7, 3, generator=generator)
    states = torch.randn(96, 3, generator=generator) * torch.tensor([1.5, 1.0, 0.5])
    readout = LinearReadout(weight)
    result = sequential_search(readout, prepare(readout, states, 0, "mean"), 3)
    grid = _sphere(40_000)
    energies = _direct_energy(weight, states, grid)
    best = int(energies.argmax())
    # The grid's best point is within ~0.02 rad of the optimum, where E is flat to second order;
    # float32 energies of O(1) nats carry ~1e-6 of rounding.
    assert float(result.energies[0]) >= float(energies[best]) - 1e-5
    assert float(result.energies[0]) <= float(_direct_energy(weight, states, result.basis[:1])[0]) + 1e-5
    assert abs(float(result.basis[0].double() @ grid[best])) > math.cos(0.05)
    # The second direction is the best one orthogonal to the first: brute force on that circle.
    first = result.basis[0].double()
    a = torch.linalg.svd(torch.eye(3, dtype=torch.float64) - first[:, None] * first[None]).U[:, :2].T
    angles = torch.linspace(0, math.pi, 20_001, dtype=torch.float64)
    circle = angles.cos()[:, None] * a[0] + angles.sin()[:, None] * a[1]
    assert float(result.energies[1]) >= float(_direct_energy(weight, states, circle).max()) - 1e-5
    torch.testing.assert_close(result.energies.double(), _direct_energy(weight, states, result.basis),
                               atol=1e-5, rtol=1e-5)


def test_the_start_is_the_effective_unembeddings_top_singular_vectors(model):
    """Against float64 eigenvectors of ``MᵀM``, ``M = W (I + A)`` built from the translator."""
    tuned = random_tuned_lens(model, seed=1, std=0.2)
    mean = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(2))
    w = model.lm_head.weight.detach().double()
    translated = w @ (torch.eye(w.shape[1], dtype=torch.float64) + tuned.translators[1].weight.double())
    for readout, matrix in ((LogitLens(model), w), (tuned, translated)):
        start = unembedding_start(readout, 1, 4, mean).double()
        _, vectors = torch.linalg.eigh(matrix.T @ matrix)
        expected = vectors[:, -4:].flip(-1).T
        # Singular vectors of a float32 SVD are off by ~eps·σ₁/gap (the gaps of σ₁ … σ₅ here are ≥ 0.9% of σ₁):
        # |cos| is then 1 − O(1e-10); 1e-6 leaves a wide margin and catches any other direction.
        assert torch.all((start * expected).sum(-1).abs() > 1 - 1e-6)


def test_directions_converge_orthonormal_and_sorted_by_exact_energy(model):
    lens = LogitLens(model)
    data = prepare(lens, capture(model, IDS, layers=[2])[2], 2, "mean")
    k, max_iter = 6, 100  # at this layer the greedy order is not the energy order (3rd > 2nd)
    result = sequential_search(lens, data, k, max_iter=max_iter)
    torch.testing.assert_close(result.basis @ result.basis.T, torch.eye(k), atol=10 * EPS * k, rtol=0)
    assert torch.all(result.energies[:-1] >= result.energies[1:])
    exact = per_position_energy(lens, data, result.basis).mean(-1)
    assert torch.equal(result.energies, exact)
    assert result.evaluations < k * (max_iter + 1)  # the convergence test stopped some direction early
    # The first direction found is a maximum on the sphere: its energy gradient is radial.
    (first,) = sequential_search(lens, data, 1, max_iter=max_iter).basis
    _, grad = energy_and_grad(lens, data, first[None], torch.ones(1))
    tangent = grad[0] - (grad[0] @ first) * first
    # Converged, it is ~1e-4 of the gradient; a run cut after a few L-BFGS steps leaves ~10%.
    assert float(tangent.norm()) < 1e-2 * float(grad[0].norm())
