"""The tuned-lens training objective, computed one layer and one block of tokens at a time.

The paper's distillation loss is the forward KL from the model's final distribution to each
layer's lens distribution, ``KL(p_L ‖ q_l) = Σ_v p_L(v) (log p_L(v) − log q_l(v))`` in nats,
averaged over tokens and summed over layers. Next-token cross-entropy is the alternative.

Only ``[tokens_per_block, vocab]`` logits ever exist: :func:`accumulate_gradients` runs the
forward and backward pass of each (layer, block of tokens) before moving on, so the memory cost
does not grow with the number of layers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

from depthlens.lens import Lens

Objective = Literal["kl", "ce"]


def layer_loss(
    log_q: torch.Tensor, target: torch.Tensor, objective: Objective
) -> torch.Tensor:
    """Summed loss over a block of tokens, in nats.

    ``log_q [tokens, vocab]`` are the lens log-probabilities. For ``"kl"``, ``target`` holds the
    model's final log-probabilities ``[tokens, vocab]``; for ``"ce"``, the next-token ids ``[tokens]``.
    """
    if objective == "kl":
        return (target.exp() * (target - log_q)).sum()
    return torch.nn.functional.cross_entropy(log_q, target, reduction="sum")


def accumulate_gradients(
    lens: Lens,
    states: Sequence[torch.Tensor],
    target: torch.Tensor,
    *,
    objective: Objective = "kl",
    layers: Sequence[int] | None = None,
    block_tokens: int = 512,
    scale: float = 1.0,
) -> torch.Tensor:
    """Add ``scale ×`` the gradient of the summed per-layer loss to the lens parameters.

    ``states`` are ``L + 1`` tensors ``[tokens, d]`` (flattened positions); ``target`` is
    ``[tokens, vocab]`` final log-probabilities (``"kl"``) or ``[tokens]`` next-token ids
    (``"ce"``, with ``-100`` for positions to ignore). Returns the loss of each layer, summed over
    tokens, as a float64 tensor ``[len(layers)]`` in nats (no gradient).
    """
    layers = range(lens.num_layers) if layers is None else layers
    totals = torch.zeros(len(layers), dtype=torch.float64)
    tokens = target.shape[0]
    for index, layer in enumerate(layers):
        for start in range(0, tokens, block_tokens):
            block = slice(start, min(start + block_tokens, tokens))
            log_q = lens(states[layer][block], layer).float().log_softmax(-1)
            loss = layer_loss(log_q, target[block], objective)
            if loss.requires_grad:
                (loss * scale).backward()
            totals[index] += loss.item()
    return totals
