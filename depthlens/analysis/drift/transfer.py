"""Translator transfer (Belrose et al. 2023, representational drift, introduced in its §1; what
this module quotes of the paper's transfer-penalty experiment is from memory, unverified): decode
layer ``j``'s states with the translator trained for layer ``i`` and measure how much worse that
is than ``j``'s own.

``ce[i, j]`` is the mean next-token cross-entropy (nats) of ``decode(T_i(h_j))``, ``kl[i, j]``
the mean ``KL(model output ‖ decode(T_i(h_j)))``; ``T_L`` is the identity (the logit lens). The
*transfer penalty* subtracts each column's diagonal entry, so the diagonal is exactly 0. Bits
per byte divide nats by ``ln 2`` and multiply by tokens per byte of the text.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from depthlens.errors import DriftError
from depthlens.lenses.mid import site_of
from depthlens.lenses.readout import check_layer
from depthlens.lenses.tuned import TunedLens
from depthlens.model.hidden_states import capture
from depthlens.stats.divergences import cross_entropy, kl


@dataclass
class Transfer:
    """Cross-entropy and KL of every (translator ``i``, state ``j``) pair."""

    layers: list[int]
    ce: torch.Tensor
    """``[n, n]`` nats; rows are translators, columns states."""
    kl: torch.Tensor
    """``[n, n]`` nats: ``KL(model output ‖ decode(T_i(h_j)))``."""
    tokens_per_byte: float | None = None
    group_ce: torch.Tensor | None = None
    """With ``groups``: per group of sequences, the summed cross-entropy ``[groups, n, n]`` (nats, float64)."""
    group_targets: torch.Tensor | None = None
    """With ``groups``: next-token targets per group ``[groups]`` float64."""

    def resampled_ce_penalty(self, counts: torch.Tensor) -> torch.Tensor:
        """:attr:`ce_penalty` ``[n, n]`` of the data set holding group ``g`` ``counts[g]`` times."""
        if self.group_ce is None or self.group_targets is None:
            raise DriftError("this transfer matrix kept no per-group sums: pass groups= to transfer_matrix")
        ce = torch.einsum("g,gij->ij", counts, self.group_ce) / (counts @ self.group_targets)
        return ce - ce.diagonal().unsqueeze(0)

    @property
    def ce_penalty(self) -> torch.Tensor:
        """``ce[i, j] − ce[j, j]`` (nats), 0 on the diagonal."""
        return self.ce - self.ce.diagonal().unsqueeze(0)

    @property
    def kl_penalty(self) -> torch.Tensor:
        """``kl[i, j] − kl[j, j]`` (nats), 0 on the diagonal."""
        return self.kl - self.kl.diagonal().unsqueeze(0)

    def bits_per_byte(self, nats: torch.Tensor) -> torch.Tensor:
        """``nats`` per token as bits per byte (NaN without a tokens-per-byte ratio)."""
        return nats / math.log(2) * (self.tokens_per_byte if self.tokens_per_byte else math.nan)


@torch.no_grad()
def transfer_matrix(
    model: torch.nn.Module,
    lens: TunedLens,
    input_ids: torch.Tensor,
    layers: Iterable[int] | None = None,
    *,
    tokens_per_byte: float | None = None,
    batch_size: int = 4,
    groups: int = 0,
    progress: bool = False,
) -> Transfer:
    """The transfer matrices of ``lens`` over ``layers`` (default ``0 … L``) on ``input_ids
    [B, T]``; each row's last token has no target and counts only in the KL. With ``groups > 0``
    the cross-entropy is also summed per group of rows (row ``b`` in group ``b mod groups``, as in
    :func:`~depthlens.analysis.drift.covariance.stream_covariances`)."""
    if not isinstance(lens, TunedLens) or site_of(lens) != "block":
        raise DriftError("the transfer matrix needs a block-output tuned lens (translators to swap between block "
                         "outputs): pass --lens DIR of a lens trained without --site mid")
    layers = list(range(lens.num_layers + 1)) if layers is None else sorted(set(layers))
    for layer in layers:
        check_layer(layer, lens.num_layers)
    if input_ids.shape[1] < 2:
        raise DriftError("the transfer matrix needs sequences of at least 2 tokens (next-token targets)")
    n, kept = len(layers), max(groups, 1)
    group_ce, kl_sum = torch.zeros(kept, n, n, dtype=torch.float64), torch.zeros(n, n, dtype=torch.float64)
    group_targets = torch.zeros(kept, dtype=torch.float64)
    positions_total = 0
    for i in tqdm(range(0, input_ids.shape[0], batch_size), desc="transfer", disable=not progress, unit="batch"):
        ids = input_ids[i : i + batch_size]
        row_groups = torch.arange(i, i + len(ids)).remainder(kept)
        states = capture(model, ids, parts=lens.parts, layers=layers)
        reference = states.logits.float().log_softmax(-1)
        targets = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], 1)
        for col, state in enumerate(layers):
            for row, translator in enumerate(layers):
                log_q = lens.parts.decode(lens.transform(states[state], translator)).float().log_softmax(-1)
                group_ce[:, row, col].index_add_(0, row_groups, cross_entropy(log_q, targets).nansum(-1).double())
                kl_sum[row, col] += kl(reference, log_q).clamp_min(0).sum().double()
        group_targets.index_add_(0, row_groups, (targets >= 0).sum(-1).double())
        positions_total += ids.numel()
    ce = (group_ce.sum(0) / group_targets.sum()).float()
    transfer = Transfer(layers, ce, (kl_sum / positions_total).float(), tokens_per_byte)
    if groups:
        transfer.group_ce, transfer.group_targets = group_ce, group_targets
    return transfer


def tokens_per_byte(tokenizer, input_ids: torch.Tensor) -> float:
    """Tokens per UTF-8 byte of the decoded text of ``input_ids [B, T]``."""
    text_bytes = sum(len(tokenizer.decode(row.tolist()).encode("utf-8")) for row in input_ids)
    return input_ids.numel() / max(1, text_bytes)


def drift_correlation(similarity: torch.Tensor, penalty: torch.Tensor) -> float:
    """Spearman ``ρ`` between covariance similarity and transfer penalty over the off-diagonal
    pairs ``i ≠ j`` (the paper: ``ρ = −0.78`` on Pythia-12B, from memory, unverified)."""
    from depthlens.analysis.causal.fidelity import spearman

    mask = ~torch.eye(similarity.shape[0], dtype=torch.bool)
    return float(spearman(similarity[mask].double(), penalty[mask].double()))


__all__ = ["Transfer", "drift_correlation", "tokens_per_byte", "transfer_matrix"]
