"""Stimulus–response alignment (Belrose et al. 2023, §4): does an edit at layer ``i`` move the
readout at ``i`` the way it moves the model's output?

A direction ``v`` is resample-ablated at layer ``i`` (its component taken from another position,
a derangement ``π``): ``h_n ↦ h_n − ((h_n − h_π(n)) · v) v``. The readout's response is the
log-ratio vector ``log q_i − log p_i`` over the vocabulary, the model's ``log q_out − log p_out``
(or the readout at a later layer ``j``). Alignment is their **Aitchison similarity**: the cosine of
the two centred log-ratio (clr) vectors, ``clr(x) = x − Σ_v w_v x_v``, under token weights ``w``
(uniform, or the model's clean output probabilities), averaged over positions and directions.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from depthlens.analysis.causal.basis import check_readout
from depthlens.analysis.causal.erasure import decode_layer
from depthlens.analysis.causal.fidelity import _erasure
from depthlens.errors import CausalError
from depthlens.lenses.readout import Readout, check_layer
from depthlens.model.edits import derangement
from depthlens.model.hidden_states import capture
from depthlens.model.hooks import run_with_hooks
from depthlens.stats.bootstrap import group_bootstrap


def clr(log_x: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Centred log-ratio of compositions given as logs ``[..., V]``: ``x − Σ_v w_v x_v`` (``w``
    sums to 1 over the last axis; uniform by default)."""
    centre = log_x.mean(-1, keepdim=True) if weights is None else (weights * log_x).sum(-1, keepdim=True)
    return log_x - centre


def aitchison_similarity(log_x: torch.Tensor, log_y: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Cosine of ``clr(x)`` and ``clr(y)`` under the weighted inner product ``Σ_v w_v a_v b_v``,
    ``[...]`` from ``[..., V]``; in ``[−1, 1]``, 1 for a vector with itself, NaN for a constant one.
    ``log_x``/``log_y`` are log-ratios (e.g. ``log q − log p``) or log-probabilities."""
    a, b = clr(log_x, weights), clr(log_y, weights)
    w = torch.full_like(a[..., :1], 1.0 / a.shape[-1]) if weights is None else weights
    inner = (w * a * b).sum(-1)
    return inner / ((w * a * a).sum(-1) * (w * b * b).sum(-1)).sqrt()


@dataclass
class Alignment:
    """Mean Aitchison similarity per readout and layer, with 95% bootstrap intervals."""

    layers: list[int]
    similarity: dict[str, list[float]]
    low: dict[str, list[float]]
    high: dict[str, list[float]]
    target: str

    def summary(self) -> dict[str, object]:
        return {"layers": self.layers, "target": self.target, "similarity": self.similarity,
                "low": self.low, "high": self.high}


def random_directions(d: int, count: int, seed: int) -> torch.Tensor:
    """``count`` random orthonormal directions ``[count, d]`` (QR of a Gaussian matrix)."""
    gaussian = torch.randn(d, count, generator=torch.Generator().manual_seed(seed))
    return torch.linalg.qr(gaussian).Q.T.contiguous()


@torch.no_grad()
def stimulus_response(
    model: nn.Module,
    readouts: Mapping[str, Readout],
    input_ids: torch.Tensor,
    layers: Iterable[int],
    *,
    directions: int = 8,
    target: int | None = None,
    weights: str = "uniform",
    group_tokens: int = 32,
    batch_size: int = 4,
    seed: int = 0,
    progress: bool = False,
) -> Alignment:
    """Alignment of every readout at every layer in ``layers`` with the model's output (or the
    same readout at layer ``target``), over ``directions`` random directions per layer (the same
    for every readout) on ``input_ids [B, T]``."""
    layers = list(layers)
    parts = None
    for readout in readouts.values():
        parts = check_readout(model, readout)
        for layer in [*layers, *([target] if target is not None else [])]:
            check_layer(layer, readout.num_layers)
    if parts is None or weights not in ("uniform", "model") or input_ids.numel() < 2:
        raise CausalError("alignment needs at least one readout, weights 'uniform' or 'model', and 2 tokens")
    states = capture(model, input_ids, parts=parts, layers=[*layers, *([target] if target is not None else [])])
    rows, seq = input_ids.shape
    scores = {name: torch.zeros(len(layers), rows * seq) for name in readouts}
    generator = torch.Generator().manual_seed(seed)
    clean = [run_with_hooks(model, input_ids[i : i + batch_size]).logits.float().log_softmax(-1)
             for i in range(0, rows, batch_size)]
    for li, layer in enumerate(tqdm(layers, desc="alignment", disable=not progress, unit="layer")):
        h = states[layer].float().reshape(-1, parts.d_model)
        for v in random_directions(parts.d_model, directions, seed + layer):
            reference = h[derangement(h.shape[0], generator)].reshape(rows, seq, -1)
            for i in range(0, rows, batch_size):
                _score_batch(model, readouts, states, input_ids, layer, target, v, reference, weights,
                             slice(i, i + batch_size), clean[i // batch_size], scores, li)
    return _summarise(layers, scores, directions, group_tokens, target)


def _score_batch(model, readouts, states, input_ids, layer, target, v, reference, weights, rows, clean,
                 scores, li) -> None:
    """Add one direction's similarities on one batch of rows into ``scores`` (in place);
    ``clean [b, seq, vocab]`` are the model's clean log-probabilities on those rows."""
    ids, seq = input_ids[rows], input_ids.shape[1]
    point = f"resid.{layer}"
    read = [f"resid.{target}"] if target is not None else []
    run = run_with_hooks(model, ids, edits=[_erasure(point, v, reference[rows])], read=read)
    ablated = run.logits.float().log_softmax(-1)
    w = clean.exp() if weights == "model" else None
    h = states[layer][rows].float()
    erased = h - ((h - reference[rows]) @ v).unsqueeze(-1) * v
    positions = slice(rows.start * seq, rows.start * seq + ids.numel())
    for name, readout in readouts.items():
        stimulus = (decode_layer(readout, erased, layer).float().log_softmax(-1)
                    - decode_layer(readout, h, layer).float().log_softmax(-1))
        if target is None:
            response = ablated - clean
        else:
            response = (decode_layer(readout, run.values[f"resid.{target}"].float(), target).float().log_softmax(-1)
                        - decode_layer(readout, states[target][rows].float(), target).float().log_softmax(-1))
        scores[name][li, positions] += aitchison_similarity(stimulus, response, w).nan_to_num(0.0).reshape(-1).cpu()


def _summarise(layers: list[int], scores: dict[str, torch.Tensor], directions: int, group_tokens: int,
               target: int | None) -> Alignment:
    similarity, low, high = {}, {}, {}
    for name, table in scores.items():
        per_position = table / directions
        groups = torch.arange(per_position.shape[1]) // max(1, group_tokens)
        count = int(groups.max()) + 1
        similarity[name], low[name], high[name] = [], [], []
        for row in per_position:
            sums = torch.zeros(count, dtype=torch.float64).index_add_(0, groups, row.double())
            totals = torch.bincount(groups, minlength=count).double()
            similarity[name].append(float(row.mean()))
            lo, hi = group_bootstrap(sums, totals) if count >= 2 else (float("nan"), float("nan"))
            low[name].append(lo)
            high[name].append(hi)
    return Alignment(layers, similarity, low, high, "output" if target is None else f"layer {target}")


__all__ = ["Alignment", "aitchison_similarity", "clr", "random_directions", "stimulus_response"]
