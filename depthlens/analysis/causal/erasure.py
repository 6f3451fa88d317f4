"""The readout side of an erasure: one layer's states, what each mode erases towards, and the
*energy* of directions, ``E(v) = mean_n KL(readout(h_n) ‖ readout(r(h_n, v)))`` in nats.

Every erasure mode of :func:`depthlens.model.edits.erase` sets the component of ``h_n`` along an
orthonormal direction ``v`` to that of a *reference* state ``ρ_n``:

    ``r(h_n, v) = h_n − ((h_n − ρ_n) · v) v``

with ``ρ_n = 0`` (zero), ``ρ_n = μ`` (mean over the data) or ``ρ_n = h_π(n)`` (resample, ``π`` a
derangement of the positions). :class:`ErasureData` holds ``h`` and ``δ = h − ρ`` once, so a
direction's erasure is the rank-one update ``h − (δ v) vᵀ`` and the model side
(:mod:`depthlens.analysis.causal.fidelity`) applies the very same one through the hook layer.

KL is computed as ``KL(p ‖ q) = Σ p log p − Σ p z + logsumexp z`` from the erased logits ``z``
(equal to :func:`depthlens.stats.divergences.kl` of ``log_softmax z``, without materialising it),
with ``exp`` kept off its slow subnormal path (:func:`~depthlens.stats.divergences.floored_exp`);
the exact energies divide by ``Σ p`` as well and overwrite the logits in place
(:func:`~depthlens.stats.divergences.kl_to_logits_`).
Work is cut into blocks of at most ``max_rows`` (direction, position) pairs, so
``[positions, vocab]`` exists for one block at a time, never for all candidate directions.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property

import torch

from depthlens.errors import CausalError
from depthlens.lenses.readout import Lens, Readout, check_layer
from depthlens.model.edits import ERASURES, derangement
from depthlens.stats.divergences import KLReference, entropy, floored_exp, floored_logsumexp, kl_to_logits_

MAX_ROWS = 256
"""Default largest number of (direction, position) pairs decoded at once: 256 × vocab floats."""


def decode_layer(readout: Readout, hidden: torch.Tensor, layer: int) -> torch.Tensor:
    """Logits ``[..., vocab]`` of ``readout`` at ``layer`` for states ``hidden [..., d]`` (any
    leading shape). A :class:`Lens` is called directly; any other readout through ``iter_logits``."""
    if isinstance(readout, Lens):
        return readout(hidden, layer)
    shape = hidden.shape
    flat = hidden.reshape(1, -1, shape[-1])
    states: list[torch.Tensor | None] = [None] * (readout.num_layers + 1)
    states[layer] = flat
    _, logits = next(iter(readout.iter_logits(states, [layer])))  # type: ignore[arg-type]
    return logits.reshape(*shape[:-1], logits.shape[-1])


@dataclass
class ErasureData:
    """One layer's states and their erasure references, with the clean readout cached."""

    layer: int
    mode: str
    states: torch.Tensor
    """``h [N, d]`` float32, the positions (batch × sequence flattened)."""
    delta: torch.Tensor
    """``δ = h − ρ [N, d]``: the erased component along ``v`` is ``δ · v``."""
    mean: torch.Tensor
    """``μ [d]``, the mean state over the ``N`` positions."""
    permutation: torch.Tensor | None
    """``π [N]`` (resample only), a derangement: position ``n`` takes its component from ``π(n)``."""
    log_probs: torch.Tensor
    """Clean readout log-probabilities ``[N, vocab]`` (nats)."""
    neg_entropy: torch.Tensor
    """``Σ_v p log p`` per position ``[N]`` (nats)."""
    groups: torch.Tensor
    """``[N]`` long: the group (block of consecutive positions) of each position, for bootstrap."""

    @property
    def num_positions(self) -> int:
        return self.states.shape[0]

    @cached_property
    def clean(self) -> KLReference:
        """The clean distributions made ready, once, for the exact energies
        (:func:`~depthlens.stats.divergences.kl_to_logits_`)."""
        return KLReference.of(self.log_probs)

    @property
    def reference(self) -> torch.Tensor:
        """``ρ = h − δ [N, d]``: what each position's erased component is set to."""
        return self.states - self.delta


def prepare(
    readout: Readout,
    states: torch.Tensor,
    layer: int,
    mode: str = "mean",
    *,
    group_tokens: int = 32,
    seed: int = 0,
    max_rows: int = MAX_ROWS,
) -> ErasureData:
    """Erasure data for ``states [N, d]`` or ``[batch, seq, d]`` of ``layer``.

    ``group_tokens`` consecutive positions form one bootstrap group; ``seed`` draws the resample
    derangement. Raises :class:`CausalError` for an unknown mode or fewer than 2 positions, and
    :class:`~depthlens.errors.LayerError` for a layer outside ``0 … L``."""
    check_layer(layer, readout.num_layers)
    if mode not in ERASURES:
        raise CausalError(f"unknown erasure {mode!r}: choose one of {', '.join(ERASURES)}")
    h = states.detach().reshape(-1, states.shape[-1]).float()
    if h.shape[0] < 2:
        raise CausalError(f"only {h.shape[0]} position(s) of data: give at least 2 (more text or longer chunks)")
    mean = h.mean(0)
    permutation = None
    if mode == "zero":
        delta = h.clone()
    elif mode == "mean":
        delta = h - mean
    else:
        permutation = derangement(h.shape[0], torch.Generator().manual_seed(seed))
        delta = h - h[permutation]
    with torch.no_grad():
        log_probs = torch.cat([decode_layer(readout, h[i : i + max_rows], layer).float().log_softmax(-1)
                               for i in range(0, h.shape[0], max_rows)])
    groups = torch.arange(h.shape[0]) // max(1, group_tokens)
    return ErasureData(layer, mode, h, delta, mean, permutation, log_probs, -entropy(log_probs), groups)


def erased_states(data: ErasureData, frame: torch.Tensor, rows: slice = slice(None)) -> torch.Tensor:
    """``r(h_n, v_i)`` for every direction ``v_i`` (rows of ``frame [K, d]``) and position ``n``
    in ``rows``: ``[K, n, d]``."""
    h, delta = data.states[rows], data.delta[rows]
    amount = (delta @ frame.T).T  # [K, n]
    return h.unsqueeze(0) - amount.unsqueeze(-1) * frame.unsqueeze(1)


def _blocks(k: int, n: int, max_rows: int) -> Iterator[tuple[slice, slice]]:
    """(direction slice, position slice) blocks of at most ``max_rows`` pairs (at least one)."""
    if k * n <= max_rows:
        step_k, step_n = k, n
    elif n >= max_rows:
        step_k, step_n = 1, max_rows
    else:
        step_k, step_n = max(1, max_rows // n), n
    for i in range(0, k, step_k):
        for j in range(0, n, step_n):
            yield slice(i, i + step_k), slice(j, j + step_n)


def block_kl(
    readout: Readout,
    data: ErasureData,
    frame: torch.Tensor,
    positions: torch.Tensor,
    shortlist: Shortlist | None = None,
) -> torch.Tensor:
    """``KL(clean ‖ erased)`` per direction and position, ``[K, n]`` nats (differentiable in
    ``frame [K, d]``), for the positions ``positions [n]`` (long); over the ``shortlist``'s
    tokens only (both distributions renormalised there) if one is given."""
    h, delta = data.states[positions], data.delta[positions]
    amount = (delta @ frame.T).T
    erased = h.unsqueeze(0) - amount.unsqueeze(-1) * frame.unsqueeze(1)
    if shortlist is None:
        logits = decode_layer(readout, erased, data.layer).float()
        log_p, neg_entropy = data.log_probs[positions], data.neg_entropy[positions]
    else:
        logits = _decode_tokens(readout, erased, data.layer, shortlist.tokens)
        log_p, neg_entropy = shortlist.log_probs[positions], shortlist.neg_entropy[positions]
    cross = (logits * floored_exp(log_p)).sum(-1)
    return neg_entropy - cross + floored_logsumexp(logits)


def _decode_tokens(readout: Readout, hidden: torch.Tensor, layer: int, tokens: torch.Tensor) -> torch.Tensor:
    """Logits of ``tokens [S]`` only, ``[..., S]`` float32 (cheap for a :class:`Lens`)."""
    if isinstance(readout, Lens):
        return readout(hidden, layer, tokens).float()
    return decode_layer(readout, hidden, layer).float()[..., tokens]


@dataclass
class Shortlist:
    """A vocabulary subset for a cheaper proxy energy: the clean distribution renormalised on it."""

    tokens: torch.Tensor
    """``[S]`` token ids."""
    log_probs: torch.Tensor
    """``[N, S]`` clean log-probabilities renormalised over the subset, nats."""
    neg_entropy: torch.Tensor
    """``[N]`` ``Σ p log p`` over the subset."""


def shortlist(data: ErasureData, size: int = 2048, top: int = 8, seed: int = 0) -> Shortlist:
    """The union of every position's ``top`` likeliest clean tokens, filled up to ``size`` with
    tokens drawn uniformly from the rest of the vocabulary."""
    vocab = data.log_probs.shape[1]
    chosen = torch.zeros(vocab, dtype=torch.bool)
    chosen[data.log_probs.topk(min(top, vocab), -1).indices.reshape(-1)] = True
    rest = (~chosen).nonzero().squeeze(-1)
    extra = max(0, min(size - int(chosen.sum()), rest.shape[0]))
    chosen[rest[torch.randperm(rest.shape[0], generator=torch.Generator().manual_seed(seed))[:extra]]] = True
    tokens = chosen.nonzero().squeeze(-1)
    log_probs = data.log_probs[:, tokens].log_softmax(-1)
    return Shortlist(tokens, log_probs, -entropy(log_probs))


def per_position_energy(
    readout: Readout, data: ErasureData, frame: torch.Tensor, *, max_rows: int = MAX_ROWS
) -> torch.Tensor:
    """``KL(clean ‖ erased)`` of every direction (rows of ``frame [K, d]``, orthonormal) at every
    position, ``[K, N]`` nats, without gradients."""
    frame = frame.detach().float()
    out = torch.empty(frame.shape[0], data.num_positions)
    with torch.no_grad():
        for ks, ns in _blocks(frame.shape[0], data.num_positions, max_rows):
            logits = decode_layer(readout, erased_states(data, frame[ks], ns), data.layer).float()
            out[ks, ns] = kl_to_logits_(data.clean[ns], logits)
    return out.clamp_min(0.0)


def energy_and_grad(
    readout: Readout,
    data: ErasureData,
    frame: torch.Tensor,
    weights: torch.Tensor,
    positions: torch.Tensor | None = None,
    *,
    max_rows: int = MAX_ROWS,
    tokens: Shortlist | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean energy of each direction over ``positions`` (default all), ``[K]`` nats, and the
    gradient of ``Σ_i weights_i · E_i`` with respect to ``frame [K, d]`` (``[K, d]``); over a
    vocabulary ``tokens`` shortlist (a proxy) if one is given.

    Blocks are back-propagated one at a time, so only one block's graph exists at once."""
    frame = frame.detach().float().requires_grad_(True)
    index = torch.arange(data.num_positions) if positions is None else positions
    n = index.shape[0]
    totals = torch.zeros(frame.shape[0])
    grad = torch.zeros_like(frame)
    if tokens is not None:
        max_rows *= max(1, data.log_probs.shape[1] // tokens.tokens.shape[0])
    for ks, ns in _blocks(frame.shape[0], n, max_rows):
        sub = frame[ks].detach().requires_grad_(True)
        kl = block_kl(readout, data, sub, index[ns], tokens)
        totals[ks] += kl.detach().sum(-1)
        (kl.sum(-1) @ weights[ks] / n).backward()
        grad[ks] += sub.grad
    return totals / n, grad


__all__ = [
    "MAX_ROWS",
    "ErasureData",
    "Shortlist",
    "block_kl",
    "decode_layer",
    "energy_and_grad",
    "erased_states",
    "per_position_energy",
    "prepare",
    "shortlist",
]
