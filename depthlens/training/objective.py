"""The tuned-lens training objective, computed one layer and one block of tokens at a time.

The paper's distillation loss is the forward KL from the model's final distribution to each
layer's lens distribution, ``KL(p_L ‖ q_l) = Σ_v p_L(v) (log p_L(v) − log q_l(v))`` in nats,
averaged over tokens and summed over layers. Next-token cross-entropy is the alternative.

Only ``[tokens_per_block, vocab]`` logits ever exist: :func:`accumulate_gradients` runs the
forward and backward pass of each (layer, block of tokens) before moving on, so the memory cost
does not grow with the number of layers.

Almost all of a step's cost is the unembedding (``tokens × d × vocab`` multiply-adds forward and
again backward, per layer). A :class:`Shortlist` estimates the KL from a sample of the vocabulary
instead: the tokens that carry the final distribution's mass at some position of the block, plus
tokens drawn uniformly from the rest, importance-weighted so that the normaliser
``log Σ_v exp z_v`` and the cross term ``Σ_v p_L(v) z_v`` are estimated from the sample. On
smollm2-135m the default shortlist (8 per position + 512 sampled, about 1.2k of the 49k tokens
for 256 positions) makes a step over all 30 layers about 36× cheaper, for a little less progress
per step than the exact KL (``benchmarks/train_efficiency.py``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from depthlens.lenses.readout import Lens
from depthlens.stats.divergences import cross_entropy, entropy, kl

Objective = Literal["kl", "ce"]


@dataclass(frozen=True)
class Shortlist:
    """Which vocabulary entries an estimated KL looks at, for one block of tokens: the ``top_k``
    most likely final tokens of every position, plus ``negatives`` tokens drawn uniformly (with
    replacement, from the torch RNG) among the others."""

    top_k: int = 8
    negatives: int = 512

    def sample(self, target: torch.Tensor) -> ShortlistTarget:
        """Draw the shortlist of a block whose final log-probabilities are ``target [tokens, vocab]``."""
        vocab = target.shape[-1]
        top = target.topk(min(self.top_k, vocab), dim=-1).indices.unique()
        others = torch.ones(vocab, dtype=torch.bool, device=target.device)
        others[top] = False
        rest = others.nonzero().squeeze(1)
        ids, log_weights = top, torch.zeros(len(top))
        if self.negatives > 0 and len(rest) > 0:
            drawn = rest[torch.randint(len(rest), (self.negatives,)).to(target.device)]
            ids = torch.cat([top, drawn])
            log_weights = torch.cat([log_weights, torch.full((self.negatives,), math.log(len(rest) / self.negatives))])
        log_weights = log_weights.to(target.device)
        return ShortlistTarget(
            vocab=ids,
            log_weights=log_weights,
            weighted_target=target[:, ids].exp() * log_weights.exp(),
            negative_entropy=-entropy(target).sum(),
        )


@dataclass(frozen=True)
class ShortlistTarget:
    """One block's shortlist and what the KL estimate needs of the final distribution ``p_L``.

    ``vocab [k]`` are token ids; ``log_weights [k]`` their log importance weights (0 for the top
    tokens, ``log(rest / negatives)`` for each sampled one); ``weighted_target [tokens, k]`` is
    ``p_L`` on the shortlist times the weights; ``negative_entropy`` is ``Σ_tokens Σ_v p_L log p_L``
    over the whole vocabulary (exact), in nats.
    """

    vocab: torch.Tensor
    log_weights: torch.Tensor
    weighted_target: torch.Tensor
    negative_entropy: torch.Tensor

    def kl(self, logits: torch.Tensor) -> torch.Tensor:
        """Estimated ``Σ_tokens KL(p_L ‖ q)`` in nats from the lens logits on the shortlist,
        ``logits [tokens, k]``: the cross term ``Σ_v p_L(v) z_v`` and the normaliser
        ``log Σ_v exp z_v`` are importance-weighted sums over the shortlist."""
        logits = logits.float()
        cross = (self.weighted_target * logits).sum()
        normaliser = torch.logsumexp(logits + self.log_weights, dim=-1).sum()
        return self.negative_entropy - cross + normaliser


def layer_loss(log_q: torch.Tensor, target: torch.Tensor, objective: Objective) -> torch.Tensor:
    """Summed loss over a block of tokens, in nats.

    ``log_q [tokens, vocab]`` are the lens log-probabilities. For ``"kl"``, ``target`` holds the
    model's final log-probabilities ``[tokens, vocab]`` and the loss is ``Σ KL(p_L ‖ q)``; for
    ``"ce"``, the next-token ids ``[tokens]`` (negative ids, e.g. ``-100``, are left out) and the
    loss is ``Σ −log q(next)``. Both are :mod:`depthlens.stats.divergences`.
    """
    if objective == "kl":
        return kl(target, log_q).sum()
    losses = cross_entropy(log_q, target)
    return torch.where(target.to(losses.device) >= 0, losses, 0.0).sum()


def accumulate_gradients(
    lens: Lens,
    states: Sequence[torch.Tensor],
    target: torch.Tensor,
    *,
    objective: Objective = "kl",
    layers: Sequence[int] | None = None,
    block_tokens: int = 512,
    scale: float = 1.0,
    shortlist: Shortlist | None = None,
) -> torch.Tensor:
    """Add ``scale ×`` the gradient of the summed per-layer loss to the lens parameters.

    ``states`` are ``L + 1`` tensors ``[tokens, d]`` (flattened positions); ``target`` is
    ``[tokens, vocab]`` final log-probabilities (``"kl"``) or ``[tokens]`` next-token ids
    (``"ce"``, with ``-100`` for positions to ignore). With a ``shortlist`` the KL is estimated
    from a sample of the vocabulary, drawn once per block and shared by all layers (cross-entropy
    is always exact). Returns the loss of each layer, summed over tokens, as a float64 tensor
    ``[len(layers)]`` in nats (no gradient).
    """
    layers = range(lens.num_layers) if layers is None else layers
    totals = torch.zeros(len(layers), dtype=torch.float64)
    tokens = target.shape[0]
    blocks = [slice(start, min(start + block_tokens, tokens)) for start in range(0, tokens, block_tokens)]
    samples = [shortlist.sample(target[block]) for block in blocks] if shortlist and objective == "kl" else None
    for index, layer in enumerate(layers):
        for number, block in enumerate(blocks):
            if samples is None:
                log_q = lens(states[layer][block], layer).float().log_softmax(-1)
                loss = layer_loss(log_q, target[block], objective)
            else:
                loss = samples[number].kl(lens(states[layer][block], layer, samples[number].vocab))
            if loss.requires_grad:
                (loss * scale).backward()
            totals[index] += loss.item()
    return totals
