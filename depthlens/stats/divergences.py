"""The one home of every divergence depthlens reports: KL, cross-entropy, entropy, JS, TV.

All functions reduce over the **last axis** (the vocabulary), take **normalised
log-probabilities** (e.g. ``logits.float().log_softmax(-1)``, see :func:`log_probs`) of shape
``[..., vocab]`` and return ``[...]`` in **nats** (TV is a probability, unitless). Entries may be
``-inf`` (probability 0): ``0 · log 0`` counts as 0, so no NaN appears, and gradients stay finite
wherever the value is. KL is ``+inf`` where ``p > 0 = q``, as it should be. (The plain formula
runs first; only if it meets a ``0 · log 0`` term, seen as a NaN, is the masked one computed, so
finite inputs cost no extra pass over the vocabulary.)

:class:`LogitStatistics` computes entropy, ``KL(reference ‖ q)`` and cross-entropy of many
layers' logits against one reference distribution in two shared scratch buffers, for the
trajectory's speed; it uses the same definitions (``tests/test_divergences.py`` pins one to the
other) and falls back to the plain functions for rows with non-finite logits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

EXP_FLOOR = -80.0
"""Shifted logits are raised to at least this before ``exp`` in :class:`LogitStatistics`:
``exp(-80) ≈ 2e-35`` is nothing next to the top token's 1, and it keeps ``exp`` off the very slow
subnormal path."""


def log_probs(logits: torch.Tensor) -> torch.Tensor:
    """Normalised float32 log-probabilities ``[..., vocab]`` (nats) from logits ``[..., vocab]``."""
    return logits.float().log_softmax(-1)


def kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """``KL(p ‖ q) = Σ_v p(v) (log p(v) − log q(v))`` over the last axis, in nats.

    ``log_p, log_q [..., vocab]`` → ``[...]``. Terms with ``p(v) = 0`` are 0; ``+inf`` where
    ``p(v) > 0`` and ``q(v) = 0``. Not clamped: rounding may leave about ``-1e-7`` for equal
    distributions.
    """
    p = log_p.exp()
    fast = (p * (log_p - log_q)).sum(-1)
    if not fast.isnan().any():  # no 0 · log 0 term: the plain formula is exact
        return fast
    return (p * torch.where(p > 0, log_p - log_q, 0.0)).sum(-1)


def entropy(log_p: torch.Tensor) -> torch.Tensor:
    """``H(p) = −Σ_v p(v) log p(v)`` over the last axis, in nats; ``log_p [..., vocab]`` → ``[...]``."""
    p = log_p.exp()
    fast = -(p * log_p).sum(-1)
    if not fast.isnan().any():
        return fast
    return -(p * torch.where(p > 0, log_p, 0.0)).sum(-1)


def cross_entropy(log_q: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``−log q(target)`` in nats, per position: ``log_q [..., vocab]``, ``targets [...]`` (token
    ids, ``torch.long``) → ``[...]``.

    Positions whose target is negative (no next token, padding, ``-100``) are **NaN**; sum with
    ``nansum`` or mask them (``torch.where(targets >= 0, ce, 0)`` keeps gradients finite).
    """
    targets = targets.to(log_q.device)
    picked = log_q.gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return torch.where(targets >= 0, -picked, math.nan)


def js(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Jensen–Shannon divergence ``½ KL(p ‖ m) + ½ KL(q ‖ m)`` with ``m = (p + q) / 2``, in nats,
    between 0 and ``ln 2`` (clamped there against rounding); ``[..., vocab]`` → ``[...]``."""
    log_m = torch.logaddexp(log_p, log_q) - math.log(2)
    return (0.5 * kl(log_p, log_m) + 0.5 * kl(log_q, log_m)).clamp(0.0, math.log(2))


def tv(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Total variation distance ``½ Σ_v |p(v) − q(v)|``, between 0 and 1 (clamped there against
    rounding), unitless; ``[..., vocab]`` → ``[...]``."""
    return (0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1)).clamp(0.0, 1.0)


@dataclass
class Scores:
    """What :class:`LogitStatistics` gives for one layer's logits over ``n`` positions; every
    tensor is ``[n]``, float32 unless said otherwise."""

    entropy: torch.Tensor
    """Entropy of the layer's distribution ``q``, nats."""
    kl: torch.Tensor
    """``KL(reference ‖ q)``, nats, clamped at 0."""
    ce: torch.Tensor
    """``−log q(target)``, nats; NaN where the target is negative."""
    rank: torch.Tensor
    """How many tokens have a strictly higher logit than the reference's top-1 token, ``torch.long``."""
    log_normaliser: torch.Tensor
    """``log Σ_v exp(z_v − shift)``, so that ``log q(v) = z_v − shift − log_normaliser``."""


class LogitStatistics:
    """Entropy, ``KL(reference ‖ q)``, cross-entropy and reference-top-1 rank of many layers'
    logits over one block of ``n`` positions, reusing two scratch buffers ``[n, vocab]``.

    With ``t = z − shift`` (``z`` a layer's logits, ``shift`` its maximum), ``S = Σ exp t`` and
    ``q = exp(t) / S``: ``H(q) = log S − Σ q t``, ``KL(p ‖ q) = Σ p log p − Σ p t + log S · Σ p``
    and ``−log q(x) = log S − t_x``; each sum is one pass over the block. The result is
    :func:`entropy`, :func:`kl` and :func:`cross_entropy` of ``log_softmax(z)`` up to float32
    rounding; rows with a non-finite logit are recomputed with those functions.
    """

    def __init__(self, reference_logits: torch.Tensor, targets: torch.Tensor) -> None:
        """``reference_logits [..., vocab]`` (the distribution ``p``, e.g. the model's output) and
        next-token ``targets [...]`` (negative: none); leading axes are flattened to ``n``."""
        self.reference = reference_logits.reshape(-1, reference_logits.shape[-1])
        reference = self.reference.float()
        log_reference = reference.log_softmax(-1)
        self.probs = log_reference.exp()
        self.mass = self.probs.sum(-1)
        self.neg_entropy = -entropy(log_reference)
        self.top1 = reference.argmax(-1, keepdim=True)
        self.targets = targets.reshape(-1, 1).to(reference.device)
        self.shifted = torch.empty_like(reference)
        self.work = torch.empty_like(reference)

    def __call__(self, logits: torch.Tensor, shift: torch.Tensor | None = None) -> Scores:
        """Scores of ``logits [..., vocab]`` (flattened to ``[n, vocab]``); ``shift [n, 1]`` is
        their row maximum, if the caller has it already (e.g. from ``topk``)."""
        z = logits.reshape(-1, logits.shape[-1]).float()
        shifted, work = self.shifted, self.work
        torch.sub(z, z.amax(-1, keepdim=True) if shift is None else shift, out=shifted)
        log_total = torch.clamp(shifted, min=EXP_FLOOR, out=work).exp_().sum(-1).log()
        lens_expectation = work.mul_(shifted).sum(-1)
        reference_expectation = torch.mul(self.probs, shifted, out=work).sum(-1)
        target_shifted = shifted.gather(-1, self.targets.clamp_min(0)).squeeze(-1)
        rank = torch.gt(z, z.gather(-1, self.top1), out=work).sum(-1)
        scores = Scores(
            entropy=log_total - lens_expectation * torch.exp(-log_total),
            kl=(self.neg_entropy - reference_expectation + log_total * self.mass).clamp_min(0.0),
            ce=torch.where(self.targets.squeeze(-1) >= 0, log_total - target_shifted, math.nan),
            rank=rank.long(),
            log_normaliser=log_total,
        )
        bad = ~torch.isfinite(scores.entropy)
        if bad.any():
            self._exact(z, shifted, bad, scores)
        return scores

    def _exact(self, z: torch.Tensor, shifted: torch.Tensor, bad: torch.Tensor, scores: Scores) -> None:
        """Recompute the rows ``bad [n]`` (a non-finite logit) with the plain definitions."""
        log_q = z[bad].log_softmax(-1)
        scores.entropy[bad] = entropy(log_q)
        scores.kl[bad] = kl(self.reference[bad].float().log_softmax(-1), log_q).clamp_min(0.0)
        scores.ce[bad] = cross_entropy(log_q, self.targets[bad].squeeze(-1))
        scores.log_normaliser[bad] = torch.logsumexp(shifted[bad], -1)


__all__ = [
    "EXP_FLOOR",
    "LogitStatistics",
    "Scores",
    "cross_entropy",
    "entropy",
    "js",
    "kl",
    "log_probs",
    "tv",
]
