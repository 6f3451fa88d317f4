"""Causal fidelity (Belrose et al. 2023, §4, Figure 20): does the readout rely on the features the model uses?

For each direction ``v_i`` of a causal basis at layer ``ℓ``, the *same* erasure
``h ↦ h − ((h − ρ) · v_i) v_i`` is applied (a) to the readout's input and (b) to the model's
residual stream at ``resid.ℓ`` through the hook layer, the forward pass continuing from there.
The readout's influence is ``mean_n KL(readout(h_n) ‖ readout(r(h_n)))``, the model's is
``mean_n KL(model(x)_n ‖ model_ablated(x)_n)`` (nats). Fidelity is Spearman's ``ρ`` between the two
over the ``k`` directions, with two 95% bootstrap intervals: over groups of consecutive positions
for these directions, and over the directions themselves (:func:`direction_interval`), since a
basis of ``k`` directions is a sample too: a readout a little different, such as a tuned lens
retrained on another CPU, gets a basis with some directions swapped. At layer ``L`` the readout
*is* the model's decoding, so the two agree exactly and ``ρ = 1``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import nn
from tqdm.auto import tqdm

from depthlens.analysis.causal.basis import CausalBasis, check_readout
from depthlens.analysis.causal.erasure import MAX_ROWS, ErasureData, per_position_energy
from depthlens.errors import CausalError
from depthlens.lenses.readout import Readout
from depthlens.model.hooks import Edit, run_with_hooks
from depthlens.model.precision import without_subnormals
from depthlens.stats.bootstrap import bootstrap_samples, interval, resample_indices, weighted_means
from depthlens.stats.divergences import KLReference, kl_to_logits_

MIN_GROUPS = 4
"""Fewest bootstrap groups (blocks of consecutive positions) the interval is computed from."""
RESOLUTION = 1e-6
"""Mean KLs (nats) are ranked at the 6 decimals the results report: two closer than this tie. Below
it a direction's energy is float32 rounding (a readout blind to the direction), and the order of
such directions would be decided by rounding, moving ρ between two runs."""


def ranks(values: torch.Tensor) -> torch.Tensor:
    """Ranks ``0 … k−1`` along the last axis, tied values given their average rank, float64
    (``[..., k]`` from ``[..., k]``; builds one ``[..., k, k]`` comparison)."""
    below = (values.unsqueeze(-1) > values.unsqueeze(-2)).sum(-1)
    tied = (values.unsqueeze(-1) == values.unsqueeze(-2)).sum(-1)
    return below.double() + (tied.double() - 1) / 2


def spearman(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Spearman's rank correlation of ``x`` and ``y`` along the last axis, ``[...]``; NaN when
    one side is constant."""
    rx, ry = ranks(x), ranks(y)
    rx, ry = rx - rx.mean(-1, keepdim=True), ry - ry.mean(-1, keepdim=True)
    return (rx * ry).sum(-1) / (rx.norm(dim=-1) * ry.norm(dim=-1))


def check_statistics(positions: int, group_tokens: int, k: int) -> None:
    """:class:`CausalError` unless there are enough groups for a bootstrap and directions for a
    rank correlation."""
    groups = -(-positions // max(1, group_tokens))
    if groups < MIN_GROUPS:
        raise CausalError(f"{positions} positions make {groups} groups of {group_tokens} tokens, but the bootstrap "
                          f"needs at least {MIN_GROUPS}: use more tokens or a smaller group size")
    if k < 3:
        raise CausalError(f"a rank correlation over k = {k} directions means nothing: use k ≥ 3")


@dataclass
class Fidelity:
    """Readout and model influence of each direction at one layer, and their rank correlation."""

    layer: int
    readout_kl: torch.Tensor
    """``[k]`` mean KL of the readout under each direction's erasure, nats."""
    model_kl: torch.Tensor
    """``[k]`` mean KL of the model's output under the same erasure in its residual stream, nats."""
    rho: float
    """Spearman ``ρ`` between the two."""
    low: float
    high: float
    """The 95% bootstrap interval of ``ρ`` over groups of positions."""

    @cached_property
    def directions(self) -> tuple[float, float]:
        """The 95% bootstrap interval of ``ρ`` over the directions (:func:`direction_interval`)."""
        return direction_interval(self.readout_kl.tolist(), self.model_kl.tolist())

    def summary(self) -> dict[str, object]:
        low, high = self.directions
        return {"layer": self.layer, "rho": self.rho, "rho_low": self.low, "rho_high": self.high,
                "rho_directions_low": low, "rho_directions_high": high,
                "readout_kl_nats": [round(float(x), 6) for x in self.readout_kl],
                "model_kl_nats": [round(float(x), 6) for x in self.model_kl]}


def _erasure(point: str, direction: torch.Tensor, reference: torch.Tensor) -> Edit:
    """The edit ``h − ((h − ρ) · v) v`` at ``point``, ``reference [b, seq, d]`` (or ``[d]``)."""
    def fn(h: torch.Tensor) -> torch.Tensor:
        v = direction.to(h.device, h.dtype)
        amount = (h - reference.to(h.device, h.dtype)) @ v
        return h - amount.unsqueeze(-1) * v
    return Edit(point, fn)


@torch.no_grad()
def model_kl(
    model: nn.Module,
    input_ids: torch.Tensor,
    data: ErasureData,
    basis: torch.Tensor,
    *,
    batch_size: int = 4,
    progress: bool = False,
) -> torch.Tensor:
    """``KL(model(x) ‖ model with v_i erased at resid.ℓ)`` per direction and position, ``[k, N]``
    nats. ``input_ids [B, T]`` must be the tokens ``data`` was captured from (``N = B·T``)."""
    rows, seq = input_ids.shape
    if rows * seq != data.num_positions:
        raise CausalError(f"the tokens ({rows}×{seq}) are not the {data.num_positions} positions the data were "
                          "captured from: pass the same input_ids")
    reference = data.reference.reshape(rows, seq, -1)
    clean = [KLReference.of(run_with_hooks(model, input_ids[i : i + batch_size]).logits.float().log_softmax(-1))
             for i in range(0, rows, batch_size)]
    out = torch.empty(basis.shape[0], data.num_positions)
    point = f"resid.{data.layer}"
    for index in tqdm(range(basis.shape[0]), desc=f"model ablations, layer {data.layer}", disable=not progress, unit="dir"):
        for batch, i in enumerate(range(0, rows, batch_size)):
            edit = _erasure(point, basis[index], reference[i : i + batch_size])
            ablated = run_with_hooks(model, input_ids[i : i + batch_size], edits=[edit]).logits.float()
            out[index, i * seq : (i + batch_size) * seq] = kl_to_logits_(clean[batch], ablated).reshape(-1)
    return out.clamp_min(0.0)


def causal_fidelity(
    model: nn.Module,
    readout: Readout,
    input_ids: torch.Tensor,
    data: ErasureData,
    basis: CausalBasis | torch.Tensor,
    *,
    batch_size: int = 4,
    resamples: int = 1000,
    seed: int = 0,
    max_rows: int = MAX_ROWS,
    progress: bool = False,
) -> Fidelity:
    """Fidelity of ``readout`` at ``data.layer`` over the directions of ``basis`` (``[k, d]`` or
    a :class:`CausalBasis`), on the tokens ``input_ids [B, T]`` that ``data`` came from. The
    readout side is decoded unless ``basis`` was extracted from these very ``data`` and still
    holds their per-position energies (:meth:`CausalBasis.energy_at`)."""
    check_readout(model, readout)
    frame = basis.basis if isinstance(basis, CausalBasis) else basis
    groups = int(data.groups.max()) + 1
    check_statistics(data.num_positions, -(-data.num_positions // groups), frame.shape[0])  # as many groups as data
    known = basis.energy_at(data) if isinstance(basis, CausalBasis) else None
    with without_subnormals():
        lens_side = per_position_energy(readout, data, frame, max_rows=max_rows) if known is None else known
        model_side = model_kl(model, input_ids, data, frame, batch_size=batch_size, progress=progress)
    rho, low, high = rank_correlation(lens_side, model_side, data.groups, resamples=resamples, seed=seed)
    return Fidelity(data.layer, lens_side.mean(-1), model_side.mean(-1), rho, low, high)


def rank_correlation(
    lens_side: torch.Tensor, model_side: torch.Tensor, groups: torch.Tensor, *, resamples: int = 1000, seed: int = 0
) -> tuple[float, float, float]:
    """Spearman ``ρ`` over the directions between the mean KLs of ``lens_side`` and ``model_side``
    (``[k, N]`` nats per direction and position), ranked at :data:`RESOLUTION`, and its 95%
    bootstrap interval over the position ``groups [N]`` (long, ``0 … G−1``): ``(ρ, low, high)``."""
    count = int(groups.max()) + 1
    sums = torch.zeros(count, lens_side.shape[0], 2, dtype=torch.float64)
    sums[..., 0].index_add_(0, groups, lens_side.T.double())
    sums[..., 1].index_add_(0, groups, model_side.T.double())
    sizes = torch.bincount(groups, minlength=count).double()

    def resolved_rho(means: torch.Tensor) -> torch.Tensor:
        steps = torch.round(means / RESOLUTION)
        return spearman(steps[..., 0], steps[..., 1])

    samples = bootstrap_samples(sums, sizes, resamples=resamples, seed=seed,
                                statistic=lambda s, t: resolved_rho(weighted_means(s, t)))
    low, high = interval(samples[torch.isfinite(samples)]) if torch.isfinite(samples).any() else (float("nan"),) * 2
    return float(resolved_rho(sums.sum(0) / sizes.sum())), low, high


def direction_interval(
    readout_kl: Sequence[float], model_kl: Sequence[float], *, resamples: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """The 95% bootstrap interval ``(low, high)`` of Spearman ``ρ`` between ``readout_kl [k]`` and
    ``model_kl [k]`` (each direction's mean KL, nats) over the directions: each resample draws ``k``
    of the pairs with replacement (a direction drawn twice ties with itself). The means are first
    rounded to the 6 decimals the results report and ranked at :data:`RESOLUTION`, so the interval
    is a function of the reported numbers alone. Resamples whose ``ρ`` is undefined (one side
    constant) are left out; ``(nan, nan)`` if all are."""
    if len(readout_kl) != len(model_kl):
        raise CausalError(f"{len(readout_kl)} readout KLs against {len(model_kl)} model KLs: give one of each per "
                          "direction")
    steps = torch.tensor([[round(round(float(r), 6) / RESOLUTION), round(round(float(m), 6) / RESOLUTION)]
                          for r, m in zip(readout_kl, model_kl)], dtype=torch.float64)
    drawn = steps[resample_indices(len(steps), resamples, seed)]
    samples = spearman(drawn[..., 0], drawn[..., 1])
    finite = samples[torch.isfinite(samples)]
    return interval(finite) if len(finite) else (float("nan"), float("nan"))


__all__ = [
    "MIN_GROUPS", "RESOLUTION", "Fidelity", "causal_fidelity", "check_statistics", "direction_interval", "model_kl",
    "rank_correlation", "ranks", "spearman",
]
