"""Prediction depth (Baldock et al. 2021, read with a lens as in Belrose et al. 2023, §5.3
and Table 2).

The **prediction depth** of a token (or an example) is the first layer from which the readout's
top-1 prediction equals the final one at every later layer: ``0`` if the top-1 never changes,
``L`` if it changes only at the last layer. The **iteration learned** is the same over training
checkpoints: the first checkpoint after which the model's prediction equals the final
checkpoint's at every later one. Both come from :func:`settling_index`.

- :func:`token_depths` — per token, from a :class:`~depthlens.analysis.trajectory.Trajectory`;
- :func:`example_depths` — per multiple-choice example, from per-layer choice log-likelihoods;
- :func:`depth_vs_training` — Spearman ρ between prediction depth (last checkpoint, each readout)
  and iteration learned, per token, over a list of checkpoints (model specs);
- :func:`depth_grid` — a :class:`~depthlens.stats.grid.Grid` of per-token depth over the text
  (like the paper's Figure 11), drawn by :func:`depthlens.viz.pictures.save_figure`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from depthlens.analysis.trajectory import Trajectory
from depthlens.errors import ScoreError
from depthlens.lenses.readout import Readout
from depthlens.model.hidden_states import capture
from depthlens.model.unwrap import unwrap_model
from depthlens.stats.grid import Grid


def settling_index(predictions: torch.Tensor | np.ndarray) -> torch.Tensor:
    """For ``predictions [steps, ...]`` (layers or checkpoints, in order), the first step from
    which every later prediction equals the last one, ``[...]`` long, in ``0 … steps − 1``."""
    p = torch.as_tensor(predictions)
    same = (p == p[-1:]).flip(0).long().cumprod(0)  # 1 while every step from the end agrees
    return p.shape[0] - same.sum(0)


def token_depths(trajectory: Trajectory) -> torch.Tensor:
    """Prediction depth of every token ``[batch, seq]`` (long; ``-1`` at padding). The trajectory
    must hold every layer ``0 … L``."""
    if list(trajectory.layers) != list(range(trajectory.num_layers + 1)):
        raise ScoreError("prediction depth needs every layer 0 … L: build the trajectory without layers=")
    depth = settling_index(trajectory.top_ids[..., 0])
    return torch.where(trajectory.attention_mask, depth, -1)


def example_depths(loglik: np.ndarray) -> np.ndarray:
    """Prediction depth of each example from per-layer choice log-likelihoods
    ``[examples, L + 1, choices]`` (the top-1 is the likeliest choice), ``[examples]`` int64."""
    top = torch.as_tensor(np.asarray(loglik).argmax(-1)).T  # [layers, examples]
    return settling_index(top).numpy()


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks of ``x`` (1-based), ties given their average rank."""
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(1, len(x) + 1)
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    return (sums / counts)[inverse]


def spearman(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> float:
    """Spearman's rank correlation ρ of ``x [n]`` and ``y [n]`` (ties at average ranks); NaN if
    either is constant."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1 or len(x) < 2:
        raise ScoreError(f"Spearman's ρ needs two equally long lists of at least 2 values, got {x.shape} and {y.shape}")
    rx, ry = _ranks(x) - (len(x) + 1) / 2, _ranks(y) - (len(y) + 1) / 2
    denominator = np.sqrt((rx**2).sum() * (ry**2).sum())
    return float((rx * ry).sum() / denominator) if denominator > 0 else float("nan")


@torch.no_grad()
def model_top1(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The model's own top-1 next token at every position ``[batch, seq]`` (long)."""
    model = unwrap_model(model)
    device = next(model.parameters()).device
    logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.long().to(device)).logits
    return logits.argmax(-1).cpu()


@dataclass
class DepthCorrelation:
    """Spearman ρ between per-token prediction depth and iteration learned, per readout."""

    rho: dict[str, float]
    mean_depth: dict[str, float]
    tokens: int
    checkpoints: int
    mean_iteration: float

    def to_dict(self) -> dict:
        return dict(vars(self))


def depth_vs_training(
    checkpoints: Sequence[str | nn.Module],
    final_model: nn.Module,
    readouts: Mapping[str, Readout],
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    load: Callable[[str], nn.Module] | None = None,
    progress: bool = True,
) -> DepthCorrelation:
    """ρ between the prediction depth of every token under each readout (which decode
    ``final_model``, the last checkpoint) and the checkpoint at which the model learned its final
    prediction there.

    ``checkpoints`` are in training order, as models or model specs (loaded one at a time with
    ``load``, default :func:`depthlens.load_model`); ``input_ids``/``attention_mask`` ``[batch, seq]``."""
    if len(checkpoints) < 2:
        raise ScoreError(f"iteration learned needs at least 2 checkpoints, got {len(checkpoints)}")
    if load is None:
        from depthlens.model.load import load_model

        def load(spec: str) -> nn.Module:
            return load_model(spec)[0]

    predictions = []
    for checkpoint in tqdm(checkpoints, desc="checkpoints", disable=not progress):
        model = load(checkpoint) if isinstance(checkpoint, str) else checkpoint
        predictions.append(model_top1(model, input_ids, attention_mask))
    learned = settling_index(torch.stack(predictions))
    keep = attention_mask.bool()
    first = next(iter(readouts.values()))
    states = capture(final_model, input_ids, attention_mask, parts=first.parts)
    rho, mean_depth = {}, {}
    for name, readout in readouts.items():
        depth = settling_index(torch.stack([logits.argmax(-1).cpu() for _, logits in readout.iter_logits(states)]))
        rho[name] = spearman(depth[keep].numpy(), learned[keep].numpy())
        mean_depth[name] = float(depth[keep].float().mean())
    return DepthCorrelation(rho, mean_depth, int(keep.sum()), len(checkpoints), float(learned[keep].float().mean()))


def depth_grid(
    trajectory: Trajectory, *, batch: int = 0, width: int = 16, max_chars: int = 8, name: str | None = None
) -> Grid:
    """Per-token prediction depth over the text of one trajectory row ``batch``: the tokens in
    reading order, ``width`` per grid row (first line at the top), each cell coloured by depth
    and showing its token. Lines are evened out (at most ``width`` tokens, as many lines as
    ``width`` needs, all but the last full), so the last line is nearly full and a text shorter
    than ``width`` is one line of its own length: few empty cells."""
    if width < 1:
        raise ScoreError(f"--width {width}: a line of the depth picture needs at least 1 token; use e.g. --width 16")
    depth = token_depths(trajectory)[batch]
    ids = trajectory.input_ids[batch][trajectory.attention_mask[batch]].tolist()
    depth = depth[trajectory.attention_mask[batch]].tolist()
    lines = max(1, -(-len(ids) // width))
    width = max(1, -(-len(ids) // lines))
    values = np.full((lines, width), np.nan)
    text = [[""] * width for _ in range(lines)]
    for i, (token, d) in enumerate(zip(ids, depth)):
        row, col = lines - 1 - i // width, i % width
        values[row, col] = d
        text[row][col] = trajectory.labels.get(token, f"#{token}")[:max_chars]
    label = name or trajectory.lens_name
    return Grid(
        values=values, row_labels=[f"{(lines - 1 - r) * width}" for r in range(lines)],
        col_labels=[str(c) for c in range(width)], cell_text=text, title=f"prediction depth · {label}",
        name=label, source=trajectory.model_name, quantity="prediction depth", unit="",
        value_range=(0.0, float(trajectory.num_layers)), row_title="first token of line", col_title="token in line",
        value_format=".0f",
    )


__all__ = [
    "DepthCorrelation", "depth_grid", "depth_vs_training", "example_depths", "model_top1", "settling_index",
    "spearman", "token_depths",
]
