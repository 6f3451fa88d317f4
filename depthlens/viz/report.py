"""Write an evaluation: JSON, tidy CSV, per-layer curves (HTML and PNG), and a terminal table."""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

from rich.table import Table

from depthlens.atomic import write_file
from depthlens.analysis.evaluate import EvalReport

CURVE_METRICS = (("kl", "nats"), ("ce", "nats"), ("entropy", "nats"), ("bias", "nats"), ("top1", "fraction"))
TITLES = {
    "kl": "KL(final ‖ lens)",
    "ce": "cross-entropy to next token",
    "entropy": "entropy",
    "bias": "bias (KL of marginals)",
    "top1": "top-1 agreement with final",
}


def write_report(report: EvalReport, directory: str | os.PathLike) -> dict[str, Path]:
    """Write ``eval.json``, ``eval.csv``, ``curves.html`` and ``curves.png`` into ``directory``."""
    target = Path(directory)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(report.table[0]))
    writer.writeheader()
    writer.writerows(report.table)
    return {
        "json": write_file(target / "eval.json", json.dumps(report.to_json(), indent=1).encode()),
        "csv": write_file(target / "eval.csv", buffer.getvalue().encode()),
        "html": write_file(target / "curves.html", _plotly_curves(report).to_html(include_plotlyjs="cdn").encode()),
        "png": write_file(target / "curves.png", _matplotlib_curves(report)),
    }


def _series(report: EvalReport, lens: str, metric: str, unit: str) -> tuple[list[int], list[float], list[float], list[float]]:
    rows = sorted((r for r in report.table if (r["lens"], r["metric"], r["unit"]) == (lens, metric, unit)), key=lambda r: r["layer"])
    return [r["layer"] for r in rows], [r["value"] for r in rows], [r["ci_low"] for r in rows], [r["ci_high"] for r in rows]


def _lenses(report: EvalReport) -> list[str]:
    return list(dict.fromkeys(r["lens"] for r in report.table))


def _plotly_curves(report: EvalReport):
    from plotly.subplots import make_subplots

    figure = make_subplots(rows=1, cols=len(CURVE_METRICS), subplot_titles=[TITLES[m] for m, _ in CURVE_METRICS])
    colours = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd")
    for index, lens in enumerate(_lenses(report)):
        colour = colours[index % len(colours)]
        for column, (metric, unit) in enumerate(CURVE_METRICS, start=1):
            layers, values, low, high = _series(report, lens, metric, unit)
            figure.add_scatter(x=layers + layers[::-1], y=high + low[::-1], fill="toself", fillcolor=colour,
                               opacity=0.2, line={"width": 0}, hoverinfo="skip", showlegend=False, row=1, col=column)
            figure.add_scatter(x=layers, y=values, mode="lines+markers", name=f"{lens} lens", line={"color": colour},
                               legendgroup=lens, showlegend=column == 1, row=1, col=column,
                               hovertemplate=f"{lens} layer %{{x}}: %{{y:.3f}} {unit}<extra></extra>")
            figure.update_xaxes(title_text="layer", row=1, col=column)
    figure.update_layout(height=380, width=320 * len(CURVE_METRICS), title=f"per-layer evaluation on {report.tokens} tokens (95% bootstrap intervals)")
    return figure


def _matplotlib_curves(report: EvalReport) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(CURVE_METRICS), figsize=(4 * len(CURVE_METRICS), 3.4), constrained_layout=True)
    for lens in _lenses(report):
        for axis, (metric, unit) in zip(axes, CURVE_METRICS):
            layers, values, low, high = _series(report, lens, metric, unit)
            (line,) = axis.plot(layers, values, marker=".", label=f"{lens} lens")
            axis.fill_between(layers, low, high, color=line.get_color(), alpha=0.2)
            axis.set_title(TITLES[metric], fontsize=10)
            axis.set_xlabel("layer")
            axis.set_ylabel(unit)
    axes[0].legend()
    figure.suptitle(f"per-layer evaluation on {report.tokens} tokens (95% bootstrap intervals)")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    return buffer.getvalue()


def comparison_table(report: EvalReport, every: int = 1) -> Table:
    """Per-layer KL and cross-entropy (nats) and top-1 agreement of each lens, side by side."""
    lenses = _lenses(report)
    table = Table(title=f"per-layer evaluation on {report.tokens} held-out tokens (nats; top-1 = agreement with the model)")
    table.add_column("layer", justify="right")
    for metric in ("kl", "ce", "top1"):
        for lens in lenses:
            table.add_column(f"{lens} {metric}", justify="right")
    columns = {(lens, metric): _series(report, lens, metric, "fraction" if metric == "top1" else "nats")[1]
               for lens in lenses for metric in ("kl", "ce", "top1")}
    layers = _series(report, lenses[0], "kl", "nats")[0]
    shown = sorted({*layers[::every], layers[-1]})
    for layer in shown:
        cells = [f"{columns[(lens, metric)][layer]:.3f}" for metric in ("kl", "ce", "top1") for lens in lenses]
        table.add_row(str(layer), *cells)
    means = [f"{sum(columns[(lens, metric)][:-1]) / max(len(layers) - 1, 1):.3f}" for metric in ("kl", "ce", "top1") for lens in lenses]
    table.add_row("mean 0…L−1", *means, style="bold")
    return table
