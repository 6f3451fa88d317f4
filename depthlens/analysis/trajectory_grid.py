"""The grid of a trajectory: one statistic over layers × input positions of one text.

:func:`trajectory_grid` turns a :class:`~depthlens.analysis.trajectory.Trajectory` into the
:class:`~depthlens.stats.grid.Grid` that pictures draw (Belrose et al. 2023, Figure 1): rows are
the layers (``"output"`` for the model's own last row, ``"3.5"`` for a half-layer row of a lens
inside the blocks), columns the real input tokens of one batch
item, each cell shows the lens's top-1 next token and hovers its top-``k``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from depthlens.analysis.cells import statistic
from depthlens.errors import TrajectoryError
from depthlens.model.hidden_states import depth_label
from depthlens.stats.grid import Grid

if TYPE_CHECKING:
    from depthlens.analysis.trajectory import Trajectory


def _quantity_and_unit(text: str) -> tuple[str, str]:
    """``"entropy (nats)"`` → ``("entropy", "nats")``; text without a trailing ``(unit)`` has
    unit ``""``."""
    if text.endswith(")") and " (" in text:
        quantity, unit = text[:-1].rsplit(" (", 1)
        return quantity, unit
    return text, ""


def trajectory_grid(
    traj: Trajectory, stat: str = "entropy", *, batch: int = 0, layer_stride: int = 1, max_chars: int = 8
) -> Grid:
    """The grid of statistic ``stat`` (see :data:`~depthlens.analysis.trajectory.STATISTICS`)
    over the layers × real positions of batch item ``batch`` of ``traj``.

    ``values [rows, positions]`` are the statistic (nats for entropy, KL and cross-entropy; a
    count for rank, coloured on a log scale; a probability for prob, coloured from 0 to 1). Cells
    show the top-1 label, the top axis the next input token, both cut to ``max_chars``; hover
    shows the position, the input and next tokens, the statistic and the top-``k`` tokens with
    their probabilities. ``layer_stride`` keeps the layers that are multiples of it and the output
    row. Raises :class:`~depthlens.errors.TrajectoryError` for an unknown statistic, batch item or
    stride.
    """
    described = statistic(stat)
    if not 0 <= batch < traj.input_ids.shape[0]:
        raise TrajectoryError(f"batch item {batch} does not exist: the trajectory has {traj.input_ids.shape[0]}")
    if max_chars < 1:
        raise TrajectoryError(f"max_chars must be at least 1, got {max_chars}")
    traj = traj.strided(layer_stride)
    mask = traj.attention_mask[batch]
    values = traj.stat(stat)[:, batch, mask].numpy()
    top_ids = traj.top_ids[:, batch, mask].tolist()
    top_probs = traj.top_probs[:, batch, mask].tolist()
    words = traj.input_labels(batch)
    nexts = [*words[1:], ""]
    rows = [depth_label(layer, traj.num_layers) for layer in traj.layers]
    value_format = ".0f" if stat == "rank" else ".4g"

    def hover(row: int, position: int) -> str:
        lines = [
            f"layer {rows[row]} · position {position}: {words[position]!r} → next {nexts[position]!r}",
            f"{described.title}: {values[row, position]:{value_format}}",
        ]
        pairs = zip(top_ids[row][position], top_probs[row][position])
        lines += [f"{i + 1}. {traj.label(t)!r} {p:.3f}" for i, (t, p) in enumerate(pairs)]
        return "\n".join(lines)

    short = traj.input_labels(batch, max_chars)
    quantity, unit = _quantity_and_unit(described.short)
    return Grid(
        values=values,
        row_labels=rows,
        col_labels=short,
        top_labels=[*short[1:], ""],
        cell_text=[[traj.label(ids[0], max_chars) for ids in row] for row in top_ids],
        hover=[[hover(r, p) for p in range(len(words))] for r in range(len(rows))],
        title=f"{traj.lens_name} · {traj.model_name}",
        name=traj.lens_name,
        source=traj.model_name,
        quantity=quantity,
        unit=unit,
        scale="log" if stat == "rank" else "sequential",
        value_range=(0.0, 1.0) if stat == "prob" else None,
        row_title="layer",
        col_title="input token",
        value_format=value_format,
    )


def trajectory_grids(
    traj_a: Trajectory,
    traj_b: Trajectory,
    stat: str = "entropy",
    *,
    batch: int = 0,
    layer_stride: int = 1,
    max_chars: int = 8,
) -> tuple[Grid, Grid]:
    """The grids of two trajectories of the same text and layers (two lenses of one model),
    ready to be drawn side by side; :class:`~depthlens.errors.TrajectoryError` if their texts or
    layers differ. The other arguments are those of :func:`trajectory_grid`."""
    if traj_a.input_ids.shape != traj_b.input_ids.shape or not bool((traj_a.input_ids == traj_b.input_ids).all()):
        raise TrajectoryError("the two trajectories are of different texts: build both from the same input")
    if traj_a.layers != traj_b.layers:
        raise TrajectoryError(f"the two trajectories have different layers: {traj_a.layers} and {traj_b.layers}")
    options = {"batch": batch, "layer_stride": layer_stride, "max_chars": max_chars}
    return trajectory_grid(traj_a, stat, **options), trajectory_grid(traj_b, stat, **options)


__all__ = ["trajectory_grid", "trajectory_grids"]
