"""The one home of every divergence depthlens reports: KL, cross-entropy, entropy, JS, TV.

All functions reduce over the **last axis** (the vocabulary), take **normalised
log-probabilities** (e.g. ``logits.float().log_softmax(-1)``, see :func:`log_probs`) of shape
``[..., vocab]`` and return ``[...]`` in **nats** (TV is a probability, unitless). Entries may be
``-inf`` (probability 0): ``0 · log 0`` counts as 0, so no NaN appears, and gradients stay finite
wherever the value is. KL is ``+inf`` where ``p > 0 = q``, as it should be. (The plain formula
runs first; only if it meets a ``0 · log 0`` term, seen as a NaN, is the masked one computed, so
finite inputs cost no extra pass over the vocabulary.)

:func:`kl_to_logits_` takes raw logits and a :class:`KLReference` instead (the causal checks'
many KLs against one clean distribution), overwriting the logits.

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


def floored_exp(x: torch.Tensor) -> torch.Tensor:
    """``exp(max(x, EXP_FLOOR))``, elementwise: ``exp`` of log-probabilities or shifted logits
    without its subnormal path (on a near one-hot distribution, ``exp`` of the raw values ran
    10–25× slower). Each floored entry is off by under ``2e-35``."""
    return x.clamp_min(EXP_FLOOR).exp()


def floored_logsumexp(logits: torch.Tensor) -> torch.Tensor:
    """``log Σ_v exp z_v`` over the last axis, ``[..., vocab]`` → ``[...]``, with the shifted
    terms ``z_v − max z`` floored at :data:`EXP_FLOOR` (:func:`floored_exp`): relative error under
    ``vocab · 2e-35``; differentiable, its gradient the softmax."""
    top = logits.detach().amax(-1, keepdim=True)
    return top.squeeze(-1) + floored_exp(logits - top).sum(-1).log()


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


@dataclass(frozen=True)
class KLReference:
    """A distribution ``p`` made ready for many ``KL(p ‖ softmax z)`` by :func:`kl_to_logits_`:
    :meth:`of` computes, once, its floored probabilities, their sum and ``Σ p log p`` (it keeps no
    log-probabilities, so the caller may free them). Index it (``reference[rows]``) to take some
    rows of the leading axes."""

    probs: torch.Tensor
    """``[..., vocab]`` :func:`floored_exp` of the log-probabilities: every entry positive."""
    mass: torch.Tensor
    """``[...]`` ``Σ_v p(v)``: 1 up to the rounding of the log-probabilities' normaliser (up to
    about ``1e-5`` for a float32 ``log_softmax`` over 49 152 tokens)."""
    neg_entropy: torch.Tensor
    """``[...]`` ``Σ_v p(v) log p(v)``, nats."""

    @classmethod
    def of(cls, log_p: torch.Tensor) -> KLReference:
        """From log-probabilities ``log_p [..., vocab]`` (nats, normalised)."""
        probs = floored_exp(log_p)
        return cls(probs, probs.sum(-1), -entropy(log_p))

    def __getitem__(self, rows: slice | torch.Tensor) -> KLReference:
        return KLReference(self.probs[rows], self.mass[rows], self.neg_entropy[rows])

    def log_probs(self) -> torch.Tensor:
        """``log p [..., vocab]``, with the entries at the floor (below ``e^EXP_FLOOR``) as ``-inf``."""
        floor = torch.tensor(EXP_FLOOR, dtype=self.probs.dtype).exp()  # what floored_exp gives there
        return torch.where(self.probs > floor, self.probs.log(), -math.inf)


@torch.no_grad()
def kl_to_logits_(reference: KLReference, logits: torch.Tensor) -> torch.Tensor:
    """``KL(p̂ ‖ softmax z)`` over the last axis, in nats, straight from raw logits ``z``, **which it
    overwrites**: ``p̂`` is ``reference``'s distribution normalised exactly, ``logits [..., vocab]``
    float32 (leading axes may broadcast the reference's) → ``[...]``. No autograd.

    With ``S = Σ p``: ``KL = (Σ p log p − Σ p z) / S − log S + logsumexp z``, the shifted ``z``
    floored at :data:`EXP_FLOOR` and exponentiated in place: two passes fewer than :func:`kl` of
    ``log_softmax z`` and one ``[..., vocab]`` temporary (about 2× faster on 256 rows of the built-in
    models' vocabularies, ``benchmarks/causal_kl.py``). Dividing by ``S`` matters: a float32
    ``log_softmax`` leaves ``S − 1`` up to about ``1e-5``, which the plain formula would multiply
    by ``logsumexp z`` (tens of nats). Logits with a non-finite entry go to :func:`kl` (exact
    ``0 · log 0`` handling, ``p`` below ``e^EXP_FLOOR`` taken as 0); every floored ``p`` is
    positive, so such an entry shows in ``Σ p z`` or the maximum, and finite logits cost no extra
    pass."""
    cross = (logits * reference.probs).sum(-1)
    top = logits.amax(-1, keepdim=True)
    if not (cross.isfinite().all() and top.isfinite().all()):
        return kl(reference.log_probs().log_softmax(-1), logits.log_softmax(-1))
    log_total = logits.sub_(top).clamp_(min=EXP_FLOOR).exp_().sum(-1).log()
    mass = reference.mass
    return (reference.neg_entropy - cross) / mass - mass.log() + top.squeeze(-1) + log_total


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


BLOCK_FLOATS = 2**19
""":class:`LogitStatistics` scores rows in blocks of about this many floats (2 MiB, a core's L2
cache on the machines it was tuned on), so that a block's shifted logits and its scratch buffer
stay in cache through the passes over them; only the first pass reads main memory. On smollm2's
and gemma3's vocabularies this made the statistics 2–3× faster than whole-chunk passes."""
MIN_BLOCK_ROWS = 4
"""Blocks hold at least this many rows, so that on large vocabularies (262k tokens: 2 rows per
:data:`BLOCK_FLOATS`) the cost of issuing each operation stays small next to its work."""


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
    """How many tokens have a strictly higher logit than the reference's top-1 token, ``torch.long``
    (called with ``ranks=False``: only whether any has, 0 or 1, which saves two passes)."""
    top1_share: torch.Tensor | None
    """With ``ranks=False``: how far the layer's top-1 is the reference's, ``|T_q ∩ T_p| /
    max(|T_q|, |T_p|)`` for the sets ``T`` of tokens tied at each distribution's largest logit:
    1 or 0 without ties; ``1 / m`` when the reference's top-1 is one of ``m`` tokens tied in the
    layer; 1 for the reference itself, ties and all (float32; ``None`` with ``ranks=True``, where it
    would cost a pass that trajectories do not need). Ties are common in bfloat16
    logits (on smollm2-135m's middle layers, 7–8% of positions), and counting a tie as agreement
    would raise top-1 agreement by about a point."""
    log_normaliser: torch.Tensor
    """``log Σ_v exp(z_v − max_v z_v)``, so that ``log q(v) = z_v − max_v z_v − log_normaliser``."""
    top_logits: torch.Tensor
    """The ``k`` largest logits ``[n, k]`` when asked for (``[n, 0]`` otherwise), in decreasing order."""
    top_ids: torch.Tensor
    """Their token ids ``[n, k]``, ``torch.long``."""


TOP_K_WIDTH = 128
""":func:`top_k` splits each row into runs of this many logits."""


def top_k(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` largest entries of each row of ``logits [n, vocab]`` and their indices, both
    ``[n, k]`` in decreasing order, as ``torch.topk`` gives them (ties may pick other indices).

    Each row is cut into runs of :data:`TOP_K_WIDTH`; the ``k`` largest entries lie in the ``k``
    runs with the largest maxima (and the short last run), so one ``amax`` pass over the row and a
    ``topk`` of ``k · 128`` candidates replace a ``topk`` of the whole vocabulary (about 5× faster
    on 49k–262k tokens).
    """
    n, vocab = logits.shape
    whole = vocab // TOP_K_WIDTH * TOP_K_WIDTH
    if whole // TOP_K_WIDTH <= k:
        return logits.topk(k, dim=-1)
    maxima = logits[:, :whole].unflatten(-1, (whole // TOP_K_WIDTH, TOP_K_WIDTH)).amax(-1)
    runs = maxima.topk(k, dim=-1).indices
    columns = (runs[..., None] * TOP_K_WIDTH + torch.arange(TOP_K_WIDTH, device=logits.device)).flatten(1)
    columns = torch.cat([columns, torch.arange(whole, vocab, device=logits.device).expand(n, -1)], 1)
    top = logits.gather(-1, columns).topk(k, dim=-1)
    return top.values, columns.gather(-1, top.indices)


@dataclass
class _BlockScores:
    """The per-row :class:`Scores` of one block of rows."""

    entropy: torch.Tensor
    kl: torch.Tensor
    ce: torch.Tensor
    rank: torch.Tensor
    top1_share: torch.Tensor | None
    log_normaliser: torch.Tensor


def _row_dots(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``Σ_v a[i, v] · b[i, v]`` for each row ``i`` of ``a, b [rows, vocab]``, as ``[rows]``: one
    ``torch.dot`` per row reads both rows once and writes nothing, where ``(a * b).sum(-1)`` writes
    and reads a product tensor too (about half the time, on the few rows of a cache block)."""
    return torch.stack([torch.dot(x, y) for x, y in zip(a, b)])


class LogitStatistics:
    """Entropy, ``KL(reference ‖ q)``, cross-entropy and reference-top-1 rank of many layers'
    logits over one block of ``n`` positions, in cache-sized row blocks with two reused scratch
    buffers (see :data:`BLOCK_FLOATS`).

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
        self.reference_ties = torch.eq(reference, reference.amax(-1, keepdim=True)).sum(-1)
        self.targets = targets.reshape(-1, 1).to(reference.device)
        rows = min(len(reference), max(MIN_BLOCK_ROWS, BLOCK_FLOATS // reference.shape[-1]))
        self.shifted = reference.new_empty(rows, reference.shape[-1])
        self.work = torch.empty_like(self.shifted)

    def __call__(
        self, logits: torch.Tensor, k: int = 0, into: tuple[torch.Tensor, torch.Tensor] | None = None,
        ranks: bool = True,
    ) -> Scores:
        """Scores of ``logits [..., vocab]`` (flattened to ``[n, vocab]``); with ``k > 0`` also
        their top ``k`` (:attr:`Scores.top_logits`, :attr:`Scores.top_ids`). With ``into = (groups
        [n], sums [m, vocab])`` each row's distribution ``q`` is also added to ``sums[groups[i]]``
        (``groups``: ``torch.long`` in ``0 … m-1``), e.g. to build marginal distributions.
        ``ranks=False`` caps :attr:`Scores.rank` at 1."""
        z = logits.reshape(-1, logits.shape[-1]).float()
        block = len(self.shifted)
        parts, tops = [], []
        for start in range(0, len(z), block):
            rows = z[start : start + block]
            tops.append(top_k(rows, k) if k else (z.new_empty(len(rows), 0), z.new_empty(len(rows), 0).long()))
            parts.append(self._block(rows, slice(start, start + block), tops[-1][0][:, :1], into, ranks))
        fields = {name: torch.cat([getattr(part, name) for part in parts])
                  for name in ("entropy", "kl", "ce", "rank", "log_normaliser")}
        fields["top1_share"] = None if ranks else torch.cat([part.top1_share for part in parts])
        return Scores(**fields, top_logits=torch.cat([top[0] for top in tops]),
                      top_ids=torch.cat([top[1] for top in tops]))

    def _block(self, z: torch.Tensor, rows: slice, shift: torch.Tensor,
               into: tuple[torch.Tensor, torch.Tensor] | None, ranks: bool) -> _BlockScores:
        """The scores of the rows ``rows`` of the reference, whose logits are ``z [b, vocab]``;
        ``shift [b, 1]`` is their maximum if known (``[b, 0]``: not); ``into`` and ``ranks`` as
        in :meth:`__call__`."""
        shifted, work = self.shifted[: len(z)], self.work[: len(z)]
        torch.sub(z, shift if shift.numel() else z.amax(-1, keepdim=True), out=shifted)
        torch.clamp(shifted, min=EXP_FLOOR, out=work).exp_()
        log_total = work.sum(-1).log()
        if into is None:
            lens_expectation = _row_dots(work, shifted) * torch.exp(-log_total)
        else:
            work.mul_(torch.exp(-log_total)[:, None])
            into[1].index_add_(0, into[0][rows], work)
            lens_expectation = _row_dots(work, shifted)
        reference_expectation = _row_dots(self.probs[rows], shifted)
        targets = self.targets[rows]
        target_shifted = shifted.gather(-1, targets.clamp_min(0)).squeeze(-1)
        top1_share = None
        if ranks:
            rank = torch.gt(z, z.gather(-1, self.top1[rows]), out=work).sum(-1)
        else:
            rank = shifted.gather(-1, self.top1[rows]).squeeze(-1) < 0
            top1_share = self._top1_share(shifted, rows, rank)
        scores = _BlockScores(
            entropy=log_total - lens_expectation,
            kl=(self.neg_entropy[rows] - reference_expectation + log_total * self.mass[rows]).clamp_min(0.0),
            ce=torch.where(targets.squeeze(-1) >= 0, log_total - target_shifted, math.nan),
            rank=rank.long(),
            top1_share=top1_share,
            log_normaliser=log_total,
        )
        bad = ~torch.isfinite(scores.entropy)
        if bad.any():
            self._exact(z, shifted, bad, rows, scores)
        return scores

    def _top1_share(self, shifted: torch.Tensor, rows: slice, below: torch.Tensor) -> torch.Tensor:
        """:attr:`Scores.top1_share` of a block: ``shifted [b, vocab]`` (0 at the layer's maxima),
        ``below [b]`` whether the reference's top-1 is below the layer's maximum. The intersection
        is counted over the vocabulary only for the rare rows where the reference itself ties."""
        at_max = torch.eq(shifted, 0.0)
        lens_ties, reference_ties = at_max.sum(-1), self.reference_ties[rows]
        shared = (~below).long()
        tied = reference_ties > 1
        if tied.any():
            reference = self.reference[rows][tied].float()
            both = at_max[tied] & torch.eq(reference, reference.amax(-1, keepdim=True))
            shared[tied] = both.sum(-1)
        return shared.float() / torch.maximum(lens_ties, reference_ties).clamp_min(1).float()

    def _exact(self, z: torch.Tensor, shifted: torch.Tensor, bad: torch.Tensor, rows: slice,
               scores: _BlockScores) -> None:
        """Recompute the rows ``bad [b]`` of a block (a non-finite logit) with the plain definitions."""
        log_q = z[bad].log_softmax(-1)
        scores.entropy[bad] = entropy(log_q)
        scores.kl[bad] = kl(self.reference[rows][bad].float().log_softmax(-1), log_q).clamp_min(0.0)
        scores.ce[bad] = cross_entropy(log_q, self.targets[rows][bad].squeeze(-1))
        scores.log_normaliser[bad] = torch.logsumexp(shifted[bad], -1)


__all__ = [
    "BLOCK_FLOATS",
    "EXP_FLOOR",
    "KLReference",
    "LogitStatistics",
    "Scores",
    "cross_entropy",
    "entropy",
    "floored_exp",
    "floored_logsumexp",
    "js",
    "kl",
    "kl_to_logits_",
    "log_probs",
    "top_k",
    "tv",
]
