"""The two searches for a causal basis (Belrose et al. 2023, §4, "causal basis extraction").

Both return an ordered orthonormal frame ``[k, d]`` whose rows have high energy
``E(v) = mean_n KL(readout(h_n) ‖ readout(r(h_n, v)))`` (nats, see
:mod:`depthlens.analysis.causal.erasure`).

- :func:`sequential_search` is the reference, the authors' algorithm as their code has it
  (``tuned_lens.causal.extract_causal_bases``; the paper excerpt's Appendix D gives no details):
  for ``i = 1 … k`` one L-BFGS run maximises ``E`` over one direction, projected orthogonal to
  ``v_1 … v_{i−1}`` and normalised at every evaluation. It starts from the ``i``-th right
  singular vector of the (effective) unembedding and stops when the energy changes by less than
  a relative ``1e-4`` between two evaluations, or after about 100 evaluations (a line search
  under way may finish); the frame is then sorted by exact energy. Cost: ``k`` × (evaluations per
  direction) × ``N`` decodes with gradients.
- :func:`batched_search` optimises the whole ``k``-frame at once, as the paper's §6 suggests:
  it maximises the *Brockett* objective ``Σ_i w_i E(v_i)`` with decreasing weights ``w_i`` over
  orthonormal frames (a QR retraction), whose maximiser for a quadratic ``E`` is exactly the
  ordered greedy solution (the eigenvectors in order) — so the directions stay ordered instead
  of mixing inside the subspace. It runs in three phases:

  1. a start: the top ``k`` principal directions of ``δ = h − ρ`` (where the erasure moves the
     state most); optionally (``samples > 0``) refitted to a second-order surrogate
     ``KL ≈ ½ (δ_n·v)² vᵀ F_n v`` with the readout's Fisher sketched by sampled score vectors —
     off by default, because mean erasures are too large for a second-order model;
  2. ``refine_steps`` Adam steps (cosine schedule) on the Brockett objective over random
     minibatches of positions, with the KL taken over a vocabulary shortlist (every position's
     top tokens plus random ones, both distributions renormalised) — a proxy ~20× cheaper;
  3. the exact energy of every direction on all positions and the whole vocabulary, then the
     frame sorted by it. Reported energies are always exact.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from depthlens.analysis.causal.erasure import (
    MAX_ROWS,
    ErasureData,
    decode_layer,
    energy_and_grad,
    per_position_energy,
    shortlist,
)
from depthlens.lenses.readout import Lens, Readout


@dataclass
class SearchResult:
    """A frame, its exact energies and what it cost."""

    basis: torch.Tensor
    """``[k, d]`` orthonormal rows, in decreasing order of energy."""
    energies: torch.Tensor
    """``[k]`` mean KL per direction over the positions, nats."""
    seconds: float
    """Wall time of the search."""
    evaluations: float
    """Decoded (direction, position) pairs divided by ``N``: full-data energy evaluations."""
    per_position: torch.Tensor
    """``[k, N]`` the exact energy of each direction at each position, nats (``energies`` is its mean)."""


def orthonormal_rows(params: torch.Tensor) -> torch.Tensor:
    """The rows of ``params [k, d]`` made orthonormal by QR (signs fixed so that it is smooth)."""
    q, r = torch.linalg.qr(params.T)
    signs = torch.sign(torch.diagonal(r))
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    return (q * signs).T


def brockett_weights(k: int) -> torch.Tensor:
    """Decreasing weights ``[k]``: ``1, (k−1)/k, …, 1/k``."""
    return (k - torch.arange(k, dtype=torch.float32)) / k


def _sorted(readout: Readout, data: ErasureData, frame: torch.Tensor, max_rows: int) -> tuple[torch.Tensor, ...]:
    """``frame``, its mean energies and its per-position energies ``[k, N]``, in decreasing order of energy."""
    per_position = per_position_energy(readout, data, frame, max_rows=max_rows)
    energies = per_position.mean(-1)
    order = energies.argsort(descending=True)
    return frame[order].contiguous(), energies[order], per_position[order]


def unembedding_start(readout: Readout, layer: int, k: int, mean: torch.Tensor) -> torch.Tensor:
    """The reference's start, ``[k, d]``: the top ``k`` right singular vectors of the effective
    unembedding ``W J`` (``W [vocab, d]`` the model's unembedding weight, ``J [d, d]`` the
    Jacobian of the lens's transform at ``mean [d]``: ``I + A_l`` for a tuned lens, ``I`` for
    the logit lens; ``W`` alone for a readout that is not a :class:`Lens`). The final norm is
    left out, as in the authors' code, who take the left singular vectors of ``(W J)ᵀ``."""
    weight = readout.parts.unembedding.weight.detach().float()[: readout.parts.vocab_limit]
    if isinstance(readout, Lens):
        jacobian = torch.autograd.functional.jacobian(lambda h: readout.transform(h, layer).float(), mean.float(),
                                                      vectorize=True)
        weight = weight @ jacobian
    return torch.linalg.svd(weight, full_matrices=False).Vh[:k].contiguous()


def _one_direction(
    readout: Readout, data: ErasureData, previous: torch.Tensor, start: torch.Tensor, max_iter: int,
    tolerance: float, max_rows: int,
) -> tuple[torch.Tensor, int]:
    """Maximise the energy of ``v = P⊥u / ‖P⊥u‖`` (``P⊥`` projects orthogonal to the rows of
    ``previous [i, d]``) from ``u = start [d]``: L-BFGS steps (strong Wolfe) until the relative
    change of the energy between the last two evaluations is below ``tolerance`` or ``max_iter``
    evaluations are spent; ``u`` is projected back onto the sphere after each step. Returns
    ``v [d]`` and the number of energy evaluations."""
    def direction(raw: torch.Tensor) -> torch.Tensor:
        projected = raw - previous.T @ (previous @ raw)
        return projected / (projected.norm() + torch.finfo(projected.dtype).eps)

    u = direction(start).requires_grad_(True)
    optimizer = torch.optim.LBFGS([u], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")
    history: list[float] = []

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        v = direction(u)
        energy, grad = energy_and_grad(readout, data, v.detach()[None], torch.ones(1), max_rows=max_rows)
        v.backward(-grad[0])
        history.append(float(energy[0]))
        return -energy[0]

    while len(history) < max_iter:
        optimizer.param_groups[0]["max_eval"] = max_iter - len(history)
        optimizer.step(closure)
        with torch.no_grad():
            u.copy_(direction(u))
        last, change = history[-1], history[-1] - (history[-2] if len(history) > 1 else 0.0)
        if last == 0.0 or abs(change / last) < tolerance:
            break
    with torch.no_grad():
        return direction(direction(u.detach())), len(history)  # projected twice, against rounding


def sequential_search(
    readout: Readout,
    data: ErasureData,
    k: int,
    *,
    max_iter: int = 100,
    tolerance: float = 1e-4,
    max_rows: int = MAX_ROWS,
    progress: bool = False,
) -> SearchResult:
    """The reference, the authors' algorithm (``tuned_lens.causal.extract_causal_bases``): direction
    ``i`` starts from the ``i``-th right singular vector of the effective unembedding
    (:func:`unembedding_start`), projected orthogonal to ``v_1 … v_{i−1}``, and is refined by
    L-BFGS under their convergence test (relative energy change below ``tolerance``, at most
    ``max_iter`` evaluations). The energies are then recomputed exactly at the final directions
    (one no-gradient evaluation each, counted) and the frame is sorted by them."""
    start = time.perf_counter()
    starts = unembedding_start(readout, data.layer, k, data.mean)
    basis = torch.zeros(0, data.states.shape[1])
    evaluations = 0
    for i in tqdm(range(k), desc=f"sequential CBE, layer {data.layer}", disable=not progress, unit="dir"):
        v, used = _one_direction(readout, data, basis, starts[i], max_iter, tolerance, max_rows)
        basis = torch.cat([basis, v[None]])
        evaluations += used + 1
    frame, energies, per_position = _sorted(readout, data, basis, max_rows)
    return SearchResult(frame, energies, time.perf_counter() - start, float(evaluations), per_position)


def score_samples(
    readout: Readout, data: ErasureData, samples: int, *, seed: int = 0, max_rows: int = MAX_ROWS
) -> torch.Tensor:
    """``s_{n,j} = ∇_h log p(y_{n,j} | h_n)`` for ``samples`` tokens ``y ∼ p_n`` per position,
    ``[N, samples, d]``: ``E[s sᵀ]`` is the readout's Fisher information at ``h_n``."""
    generator = torch.Generator().manual_seed(seed)
    out = torch.empty(data.num_positions, samples, data.states.shape[1])
    for i in range(0, data.num_positions, max_rows):
        h = data.states[i : i + max_rows].clone().requires_grad_(True)
        log_q = decode_layer(readout, h, data.layer).float().log_softmax(-1)
        tokens = torch.multinomial(data.log_probs[i : i + max_rows].exp(), samples, replacement=True, generator=generator)
        for j in range(samples):
            (grad,) = torch.autograd.grad(log_q.gather(-1, tokens[:, j : j + 1]).sum(), h, retain_graph=j < samples - 1)
            out[i : i + max_rows, j] = grad
    return out


def _surrogate(delta: torch.Tensor, scores: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """``frame [K, d] → [K]``: ``½ mean_{n,j} (δ_n·v)² (s_{n,j}·v)²``, the second-order energy."""
    def energies(frame: torch.Tensor) -> torch.Tensor:
        amount = delta @ frame.T  # [N, K]
        response = scores @ frame.T  # [N, m, K]
        return 0.5 * (amount.unsqueeze(1) * response).pow(2).mean((0, 1))
    return energies


def _fit_surrogate(data: ErasureData, scores: torch.Tensor, k: int, iterations: int) -> torch.Tensor:
    """Phase 1: the Brockett objective on the surrogate, by L-BFGS from the top eigenvectors of
    ``(Σ F + F Σ) / 2`` (``Σ`` the covariance of ``δ``, ``F`` the mean Fisher), ``[k, d]``."""
    delta = data.delta
    sigma = delta.T @ delta / delta.shape[0]
    flat = scores.reshape(-1, scores.shape[-1])
    fisher = flat.T @ flat / flat.shape[0]
    product = sigma @ fisher / (sigma.trace() * fisher.trace()).clamp_min(1e-30)
    _, vectors = torch.linalg.eigh((product + product.T) / 2)
    params = vectors[:, -k:].flip(-1).T.contiguous().requires_grad_(True)
    surrogate, weights = _surrogate(delta, scores), brockett_weights(k)
    scale = 1.0 / surrogate(params.detach()).sum().clamp_min(1e-30)
    optimizer = torch.optim.LBFGS([params], lr=1.0, max_iter=iterations, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = -(surrogate(orthonormal_rows(params)) @ weights) * scale
        loss.backward()
        return loss

    optimizer.step(closure)
    return orthonormal_rows(params.detach())


def batched_search(
    readout: Readout,
    data: ErasureData,
    k: int,
    *,
    samples: int = 0,
    surrogate_iter: int = 200,
    refine_steps: int = 30,
    refine_positions: int = 64,
    shortlist_size: int = 2048,
    learning_rate: float = 0.3,
    seed: int = 0,
    max_rows: int = MAX_ROWS,
    progress: bool = False,
) -> SearchResult:
    """The whole ``k``-frame at once (see the module docstring): surrogate fit, ``refine_steps``
    Adam steps on the exact objective over ``refine_positions`` random positions each, then exact
    energies on all positions and sorting."""
    start = time.perf_counter()
    n = data.num_positions
    bar = tqdm(total=3, desc=f"batched CBE, layer {data.layer}", disable=not progress, unit="phase")
    if samples > 0:
        scores = score_samples(readout, data, samples, seed=seed, max_rows=max_rows)
        frame = _fit_surrogate(data, scores, k, surrogate_iter)
    else:
        frame = torch.linalg.svd(data.delta, full_matrices=False).Vh[:k]
    bar.update()
    evaluations = samples * 2.0
    params = frame.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([params], lr=learning_rate / math.sqrt(data.states.shape[1]))
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(1, refine_steps))
    generator = torch.Generator().manual_seed(seed + 1)
    weights = brockett_weights(k)
    tokens = shortlist(data, shortlist_size, seed=seed) if shortlist_size else None
    vocab_share = 1.0 if tokens is None else tokens.tokens.shape[0] / data.log_probs.shape[1]
    for _ in range(refine_steps):
        positions = torch.randperm(n, generator=generator)[: min(n, refine_positions)]
        current = orthonormal_rows(params)
        _, grad = energy_and_grad(readout, data, current.detach(), weights, positions, max_rows=max_rows, tokens=tokens)
        optimizer.zero_grad()
        current.backward(-grad)
        optimizer.step()
        schedule.step()
        evaluations += k * positions.shape[0] / n * vocab_share
    bar.update()
    frame, energies, per_position = _sorted(readout, data, orthonormal_rows(params.detach()), max_rows)
    evaluations += k
    bar.update()
    bar.close()
    return SearchResult(frame, energies, time.perf_counter() - start, evaluations, per_position)


def energy_captured(energies: torch.Tensor, k: int) -> float:
    """Total energy of the first ``k`` directions, nats (``nan`` if there are fewer)."""
    return float(energies[:k].sum()) if energies.shape[0] >= k else math.nan


__all__ = [
    "SearchResult",
    "batched_search",
    "brockett_weights",
    "energy_captured",
    "orthonormal_rows",
    "score_samples",
    "sequential_search",
]
