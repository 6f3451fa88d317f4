"""Representational drift (Belrose et al. 2023, introduced in §1): how much the residual stream's geometry
changes from layer to layer.

:func:`stream_covariances` accumulates every layer's residual covariance ``[d, d]`` in one
streaming pass over the data (float64 sums ``Σ h`` and ``Σ h hᵀ``; no layer's states are kept
beyond one batch). :func:`similarity_matrix` compares them by Frobenius cosine similarity
``⟨C_i, C_j⟩_F / (‖C_i‖_F ‖C_j‖_F)`` into a ``[layers, layers]`` matrix, optionally after
removing each covariance's top principal components (which, in many models, are a few rogue
dimensions that would dominate the comparison).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from depthlens.errors import DriftError
from depthlens.lenses.readout import check_layer
from depthlens.model.architecture import find_parts
from depthlens.model.hidden_states import capture


@dataclass
class LayerCovariances:
    """Per-layer residual means and covariances over ``count`` positions."""

    layers: list[int]
    mean: torch.Tensor
    """``[layers, d]`` float64."""
    covariance: torch.Tensor
    """``[layers, d, d]`` float64, the (biased) covariance of the states."""
    count: int
    group_sums: torch.Tensor | None = None
    """With ``groups``: per group of sequences, ``Σ h`` ``[groups, layers, d]`` float64."""
    group_outer: torch.Tensor | None = None
    """With ``groups``: per group, ``Σ h hᵀ`` ``[groups, layers, d, d]`` float64."""
    group_counts: torch.Tensor | None = None
    """With ``groups``: positions per group ``[groups]`` float64."""

    def resampled(self, counts: torch.Tensor) -> torch.Tensor:
        """The covariances ``[layers, d, d]`` of the data set that holds group ``g`` ``counts[g]``
        times (``counts [groups]``, e.g. one bootstrap draw); needs the per-group sums."""
        if self.group_outer is None or self.group_sums is None or self.group_counts is None:
            raise DriftError("these covariances kept no per-group sums: pass groups= to stream_covariances")
        total = counts @ self.group_counts
        mean = torch.einsum("g,gld->ld", counts, self.group_sums) / total
        outer = torch.einsum("g,glde->lde", counts, self.group_outer) / total
        return outer - mean.unsqueeze(-1) * mean.unsqueeze(-2)


@torch.no_grad()
def stream_covariances(
    model: nn.Module,
    input_ids: torch.Tensor,
    layers: Iterable[int] | None = None,
    *,
    batch_size: int = 4,
    groups: int = 0,
    progress: bool = False,
) -> LayerCovariances:
    """Covariances of the residual states ``layers`` (default ``0 … L``) over ``input_ids
    [B, T]``, from one pass in batches of ``batch_size`` rows. With ``groups > 0`` the sums are
    also kept per group of rows (row ``b`` in group ``b mod groups``), for a bootstrap over groups
    (:mod:`depthlens.analysis.drift.interval`; ``groups · layers · d²`` floats of memory)."""
    parts = find_parts(model)
    layers = list(range(parts.num_layers + 1)) if layers is None else sorted(set(layers))
    for layer in layers:
        check_layer(layer, parts.num_layers)
    if input_ids.numel() < 2 or len(layers) < 2:
        raise DriftError(f"drift needs at least 2 layers and 2 tokens, got {len(layers)} layers and "
                         f"{input_ids.numel()} tokens: give more text or layers")
    if not 0 <= groups <= input_ids.shape[0]:
        raise DriftError(f"groups must be between 0 and the {input_ids.shape[0]} sequences, got {groups}: "
                         "give more text or fewer groups")
    d, kept = parts.d_model, max(groups, 1)
    sums = torch.zeros(kept, len(layers), d, dtype=torch.float64)
    outer = torch.zeros(kept, len(layers), d, d, dtype=torch.float64)
    counts = torch.zeros(kept, dtype=torch.float64)
    for i in tqdm(range(input_ids.shape[0]), desc="covariances", disable=not progress, unit="sequence"):
        if i % batch_size == 0:
            states = capture(model, input_ids[i : i + batch_size], parts=parts, layers=layers)
        group = i % kept
        for index, layer in enumerate(layers):
            h = states[layer][i % batch_size].double()
            sums[group, index] += h.sum(0)
            outer[group, index] += h.T @ h
        counts[group] += input_ids.shape[1]
    count = int(counts.sum())
    mean = sums.sum(0) / count
    covariance = outer.sum(0) / count - mean.unsqueeze(-1) * mean.unsqueeze(-2)
    if not groups:
        return LayerCovariances(layers, mean, covariance, count)
    return LayerCovariances(layers, mean, covariance, count, sums, outer, counts)


def remove_top_components(covariance: torch.Tensor, components: int) -> torch.Tensor:
    """``C − Σ_{top components} λ u uᵀ`` for each ``[..., d, d]`` covariance (top by eigenvalue)."""
    if components <= 0:
        return covariance
    values, vectors = torch.linalg.eigh(covariance)
    top_values, top_vectors = values[..., -components:], vectors[..., -components:]
    return covariance - (top_vectors * top_values.unsqueeze(-2)) @ top_vectors.transpose(-1, -2)


def similarity_matrix(covariance: torch.Tensor, remove_top: int = 0) -> torch.Tensor:
    """Frobenius cosine similarity of every pair of ``[n, d, d]`` covariances, ``[n, n]`` float64
    (1 on the diagonal), after removing ``remove_top`` principal components from each."""
    flat = remove_top_components(covariance.double(), remove_top).flatten(1)
    flat = flat / flat.norm(dim=-1, keepdim=True)
    return flat @ flat.T


__all__ = ["LayerCovariances", "remove_top_components", "similarity_matrix", "stream_covariances"]
