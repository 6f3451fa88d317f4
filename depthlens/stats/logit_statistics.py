"""Entropy, KL to a reference, cross-entropy and rank of many layers' logits, position by position.

:class:`LogitStatistics` holds one reference distribution (e.g. the model's output over a window
of positions) and scores each layer's logits against it, for trajectories and evaluation. It
uses the definitions of :mod:`~depthlens.stats.divergences` (``tests/test_divergences.py`` pins
one to the other) in one of two ways: eager passes over cache-sized blocks of rows with two
reused scratch buffers, or, on large work, one compiled kernel (:mod:`~depthlens.stats.fused`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from depthlens.stats import fused
from depthlens.stats.divergences import EXP_FLOOR, cross_entropy, entropy, kl

BLOCK_FLOATS = 2**19
""":class:`LogitStatistics` scores rows in blocks of about this many floats (2 MiB, a core's L2
cache on the machines it was tuned on), so that a block's shifted logits and its scratch buffer
stay in cache through the passes over them; only the first pass reads main memory. On smollm2's
and gemma3's vocabularies this made the statistics 2–3× faster than whole-chunk passes."""
LOG2_E = 1 / math.log(2)
"""log₂ e, the factor that turns a natural exponent into a base-2 one (:func:`_exp`)."""
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




def top_k(logits: torch.Tensor, k: int, maxima: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` largest entries of each row of ``logits [n, vocab]`` and their indices, both
    ``[n, k]`` in decreasing order, as ``torch.topk`` gives them (ties may pick other indices).

    Each row is cut into runs of :data:`TOP_K_WIDTH`; the ``k`` largest entries lie in the ``k``
    runs with the largest maxima (and the short last run), so one ``amax`` pass over the row and a
    ``topk`` of ``k · 128`` candidates replace a ``topk`` of the whole vocabulary (about 5× faster
    on 49k–262k tokens). ``maxima [n, vocab // 128]``: the runs' maxima, if already known.
    """
    n, vocab = logits.shape
    whole = vocab // TOP_K_WIDTH * TOP_K_WIDTH
    if whole // TOP_K_WIDTH <= k:
        return logits.topk(k, dim=-1)
    if maxima is None:
        maxima = logits[:, :whole].unflatten(-1, (whole // TOP_K_WIDTH, TOP_K_WIDTH)).amax(-1)
    runs = maxima.topk(k, dim=-1).indices
    columns = (runs[..., None] * TOP_K_WIDTH + torch.arange(TOP_K_WIDTH, device=logits.device)).flatten(1)
    columns = torch.cat([columns, torch.arange(whole, vocab, device=logits.device).expand(n, -1)], 1)
    top = logits.gather(-1, columns).topk(k, dim=-1)
    return top.values, columns.gather(-1, top.indices)


@dataclass
class _RowSums:
    """The per-row sums :class:`LogitStatistics` builds its scores from, each ``[n]``; with
    ``t = z − max z`` and ``q = exp t / Σ exp t``:"""

    log_total: torch.Tensor
    """``log Σ exp t``."""
    lens_dot: torch.Tensor
    """``Σ q t``."""
    reference_dot: torch.Tensor
    """``Σ p t``, ``p`` the reference."""
    target_shifted: torch.Tensor
    """``t`` at the target (at token 0 where there is none)."""
    above_top1: torch.Tensor
    """How many logits exceed the reference top-1's (or, with ``ranks=False``, whether any does)."""
    ties: torch.Tensor | None
    """How many logits equal ``max z`` (only with ``ranks=False``)."""

    @classmethod
    def cat(cls, parts: list[_RowSums]) -> _RowSums:
        return cls(*(None if getattr(parts[0], name) is None else torch.cat([getattr(p, name) for p in parts])
                     for name in cls.__dataclass_fields__))


def _exp(t: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``exp t`` (into ``out``, which may be ``t``), as ``2^(t · log₂ e)``: eager ATen's ``exp2``
    ran 2.5× faster than its ``exp`` on float32 (AVX-512, AMD EPYC), the multiplication included,
    for a relative error of at most about ``|t| · 2⁻²⁴``, 5·10⁻⁶ at :data:`EXP_FLOOR`: float32
    rounding of the exponent."""
    return torch.mul(t, LOG2_E, out=out).exp2_()


def _count(hits: torch.Tensor) -> torch.Tensor:
    """How many entries of each row of ``hits [rows, vocab]`` are 1, as ``torch.long [rows]``, from
    a comparison written into a float32 buffer (``torch.eq(a, b, out=buffer)``): written that way it
    ran about 5× faster than into a new bool tensor here. Exact below 2²⁴ entries a row."""
    return hits.sum(-1).long()


def _row_dots(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``Σ_v a[i, v] · b[i, v]`` for each row ``i`` of ``a, b [rows, vocab]``, as ``[rows]``: one
    ``torch.dot`` per row reads both rows once and writes nothing, where ``(a * b).sum(-1)`` writes
    and reads a product tensor too (about half the time, on the few rows of a cache block)."""
    return torch.stack([torch.dot(x, y) for x, y in zip(a, b)])


class LogitStatistics:
    """Entropy, ``KL(reference ‖ q)``, cross-entropy and reference-top-1 rank of many layers'
    logits over one window of ``n`` positions.

    With ``t = z − shift`` (``z`` a layer's logits, ``shift`` its maximum), ``S = Σ exp t`` and
    ``q = exp(t) / S``: ``H(q) = log S − Σ q t``, ``KL(p ‖ q) = Σ p log p − Σ p t + log S · Σ p``
    and ``−log q(x) = log S − t_x``. The result is :func:`entropy`, :func:`kl` and
    :func:`cross_entropy` of ``log_softmax(z)`` up to float32 rounding; rows with a non-finite
    logit are recomputed with those functions.

    The sums run either as eager passes over cache-sized blocks of rows (:data:`BLOCK_FLOATS`),
    or, with ``fused=True``, in :func:`~depthlens.stats.fused.row_sums`'s compiled kernel, which
    reads each row twice; if that kernel cannot be compiled here, eagerly.
    """

    def __init__(self, reference_logits: torch.Tensor, targets: torch.Tensor, fused: bool = False) -> None:
        """``reference_logits [..., vocab]`` (the distribution ``p``, e.g. the model's output) and
        next-token ``targets [...]`` (negative: none); leading axes are flattened to ``n``.
        ``fused``: use the compiled kernel (see :func:`~depthlens.stats.fused.fused_wanted`)."""
        self.reference = reference_logits.reshape(-1, reference_logits.shape[-1])
        reference = self.reference.float()
        maximum, self.top1 = reference.max(-1, keepdim=True)
        log_reference = torch.empty_like(reference)
        self.reference_ties = _count(torch.eq(reference, maximum, out=log_reference))
        torch.log_softmax(reference, -1, out=log_reference).clamp_min_(EXP_FLOOR)
        self.probs = _exp(log_reference)
        self.mass = self.probs.sum(-1)
        self.neg_entropy = _row_dots(self.probs, log_reference)
        self.targets = targets.reshape(-1, 1).to(reference.device)
        self.fused = fused
        rows = min(len(reference), max(MIN_BLOCK_ROWS, BLOCK_FLOATS // reference.shape[-1]))
        self.shifted = None if fused else reference.new_empty(rows, reference.shape[-1])
        self.work = None if fused else torch.empty_like(self.shifted)

    def __call__(
        self, logits: torch.Tensor, k: int = 0, into: tuple[torch.Tensor, torch.Tensor] | None = None,
        ranks: bool = True,
    ) -> Scores:
        """Scores of ``logits [..., vocab]`` (flattened to ``[n, vocab]``); with ``k > 0`` also
        their top ``k`` (:attr:`Scores.top_logits`, :attr:`Scores.top_ids`). With ``into = (groups
        [n], sums [m, vocab])`` each row's distribution ``q`` is also added to ``sums[groups[i]]``
        (``groups``: ``torch.long`` in ``0 … m-1``), e.g. to build marginal distributions.
        ``ranks=False`` caps :attr:`Scores.rank` at 1."""
        z = logits.reshape(-1, logits.shape[-1])
        found = self._fused_sums(z, k, into) if self.fused else None
        if found is None:
            z = z.float()
            found = self._eager_sums(z, k, into, ranks)
        sums, tops = found
        targets = self.targets.squeeze(-1)
        below = sums.above_top1 > 0
        scores = Scores(
            entropy=sums.log_total - sums.lens_dot,
            kl=(self.neg_entropy - sums.reference_dot + sums.log_total * self.mass).clamp_min(0.0),
            ce=torch.where(targets >= 0, sums.log_total - sums.target_shifted, math.nan),
            rank=sums.above_top1.long() if ranks else below.long(),
            top1_share=None if ranks else self._top1_share(z, below, sums.ties),
            log_normaliser=sums.log_total,
            top_logits=torch.cat([top[0] for top in tops]).float() if tops else z.new_empty(len(z), 0).float(),
            top_ids=torch.cat([top[1] for top in tops]) if tops else z.new_empty(len(z), 0).long(),
        )
        bad = ~torch.isfinite(scores.entropy)
        if bad.any():
            self._exact(z, bad, scores)
        return scores

    def _fused_sums(self, z: torch.Tensor, k: int, into: tuple[torch.Tensor, torch.Tensor] | None,
                    ) -> tuple[_RowSums, list[tuple[torch.Tensor, torch.Tensor]]] | None:
        """The sums of ``z [n, vocab]`` by the compiled kernel (and its top ``k``, and the ``into``
        sums); ``None`` if the kernel cannot be compiled here."""
        found = fused.row_sums(z, self.probs, self.top1, self.targets, EXP_FLOOR, TOP_K_WIDTH, into)
        if found is None:
            self.fused = False
            rows = min(len(z), max(MIN_BLOCK_ROWS, BLOCK_FLOATS // z.shape[-1]))
            self.shifted = self.probs.new_empty(rows, z.shape[-1])
            self.work = torch.empty_like(self.shifted)
            return None
        sums = _RowSums(found["log_total"], found["lens_dot"], found["reference_dot"], found["target_shifted"],
                        found["above_top1"].long(), found["ties"].long())
        return sums, [top_k(z, k, found["runs"])] if k else []

    def _eager_sums(self, z: torch.Tensor, k: int, into: tuple[torch.Tensor, torch.Tensor] | None, ranks: bool,
                    ) -> tuple[_RowSums, list[tuple[torch.Tensor, torch.Tensor]]]:
        """The sums of float32 ``z [n, vocab]`` by eager passes over cache-sized blocks of rows."""
        block, parts, tops = len(self.shifted), [], []
        for start in range(0, len(z), block):
            rows = z[start : start + block]
            if k:
                tops.append(top_k(rows, k))
            shift = tops[-1][0][:, :1] if k else rows.amax(-1, keepdim=True)
            parts.append(self._block(rows, slice(start, start + block), shift, into, ranks))
        return _RowSums.cat(parts), tops

    def _block(self, z: torch.Tensor, rows: slice, shift: torch.Tensor,
               into: tuple[torch.Tensor, torch.Tensor] | None, ranks: bool) -> _RowSums:
        """The sums of the rows ``rows`` of the reference, whose logits are ``z [b, vocab]`` with
        maximum ``shift [b, 1]``; ``into`` and ``ranks`` as in :meth:`__call__`."""
        shifted, work = self.shifted[: len(z)], self.work[: len(z)]
        torch.sub(z, shift, out=shifted)
        _exp(torch.clamp(shifted, min=EXP_FLOOR, out=work), out=work)
        log_total = work.sum(-1).log()
        if into is None:
            lens_dot = _row_dots(work, shifted) * torch.exp(-log_total)
        else:
            work.mul_(torch.exp(-log_total)[:, None])
            into[1].index_add_(0, into[0][rows], work)
            lens_dot = _row_dots(work, shifted)
        target_shifted = shifted.gather(-1, self.targets[rows].clamp_min(0)).squeeze(-1)
        if ranks:
            above, ties = _count(torch.gt(z, z.gather(-1, self.top1[rows]), out=work)), None
        else:
            above = shifted.gather(-1, self.top1[rows]).squeeze(-1) < 0
            ties = _count(torch.eq(shifted, 0.0, out=work))
        return _RowSums(log_total, lens_dot, _row_dots(self.probs[rows], shifted), target_shifted, above, ties)

    def _top1_share(self, z: torch.Tensor, below: torch.Tensor, lens_ties: torch.Tensor) -> torch.Tensor:
        """:attr:`Scores.top1_share` from ``below [n]`` (the reference's top-1 is below the layer's
        maximum) and ``lens_ties [n]`` (how many of ``z [n, vocab]`` sit at the maximum). The
        intersection is counted over the vocabulary only for the rare rows where the reference
        itself ties."""
        shared = (~below).long()
        tied = self.reference_ties > 1
        if tied.any():
            reference, lens = self.reference[tied].float(), z[tied].float()
            both = torch.eq(lens, lens.amax(-1, keepdim=True)) & torch.eq(reference, reference.amax(-1, keepdim=True))
            shared[tied] = both.sum(-1)
        return shared.float() / torch.maximum(lens_ties, self.reference_ties).clamp_min(1).float()

    def _exact(self, z: torch.Tensor, bad: torch.Tensor, scores: Scores) -> None:
        """Recompute the rows ``bad [n]`` (a non-finite logit) with the plain definitions."""
        rows = z[bad].float()
        log_q = rows.log_softmax(-1)
        scores.entropy[bad] = entropy(log_q)
        scores.kl[bad] = kl(self.reference[bad].float().log_softmax(-1), log_q).clamp_min(0.0)
        scores.ce[bad] = cross_entropy(log_q, self.targets[bad].squeeze(-1))
        scores.log_normaliser[bad] = torch.logsumexp(rows - rows.amax(-1, keepdim=True), -1)


__all__ = ["BLOCK_FLOATS", "TOP_K_WIDTH", "LogitStatistics", "Scores", "top_k"]
