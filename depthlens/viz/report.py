"""Write and read an evaluation: JSON, tidy CSV, per-layer curves (HTML and PNG), and tables.

A report without bootstrap intervals (too little text) says so everywhere: ``"intervals": "no
intervals: …"`` and ``null`` bounds in the JSON, ``no interval`` in the CSV's ``ci_low``/``ci_high``
cells, and no bands, with the reason in the title, in the pictures.

:func:`write_report` writes the files named in :data:`REPORT_FILES` into a folder;
:func:`read_report` reads the report back from ``eval.json`` and :func:`report_files` lists the
files present. :func:`comparison_table` (terminal) and :func:`wide_table` (one row per layer)
show a report.
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.table import Table

from depthlens.analysis.evaluate import EvalReport
from depthlens.atomic import write_file
from depthlens.errors import ReportError

if TYPE_CHECKING:
    import pandas as pd

REPORT_FILES = {"json": "eval.json", "csv": "eval.csv", "html": "curves.html", "png": "curves.png"}
"""The files :func:`write_report` writes, by kind."""
WIDE_METRICS = ("kl", "ce", "top1")
"""The metrics :func:`wide_table` and :func:`comparison_table` show."""
_ROW_KEYS = ("lens", "metric", "unit", "layer", "value")
NO_INTERVAL = "no interval"
"""What the CSV holds in ``ci_low``/``ci_high`` where a row has no interval."""

CURVE_METRICS = (("kl", "nats"), ("ce", "nats"), ("entropy", "nats"), ("bias", "nats"), ("top1", "fraction"))
TITLES = {
    "kl": "KL(final ‖ lens)",
    "ce": "cross-entropy to next token",
    "entropy": "entropy",
    "bias": "bias (KL of marginals)",
    "top1": "top-1 agreement with final",
}


def write_report(report: EvalReport, directory: str | os.PathLike) -> dict[str, Path]:
    """Write ``eval.json``, ``eval.csv``, ``curves.html`` and ``curves.png`` into ``directory``
    (made if missing); returns their paths by kind (``json``, ``csv``, ``html``, ``png``).
    ``curves.html`` embeds plotly.js (:func:`~depthlens.viz.plotly_draw.write_html` ``"inline"``):
    it is the folder's only page, so a shared copy would save nothing, and the web app offers it
    for download alone, where it must still open offline.

    Raises :class:`~depthlens.errors.OutputError` if ``directory`` cannot be written.
    """
    from depthlens.viz.plotly_draw import write_html

    target = Path(directory)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(report.table[0]))
    writer.writeheader()
    writer.writerows({key: NO_INTERVAL if key in ("ci_low", "ci_high") and value is None else value
                      for key, value in row.items()} for row in report.table)
    document = {**report.to_json(), "intervals": report.interval_label()}
    return {
        "json": write_file(target / REPORT_FILES["json"], json.dumps(document, indent=1, allow_nan=False).encode()),
        "csv": write_file(target / REPORT_FILES["csv"], buffer.getvalue().encode()),
        "html": write_html(_plotly_curves(report), target / REPORT_FILES["html"], "inline"),
        "png": write_file(target / REPORT_FILES["png"], _matplotlib_curves(report)),
    }


def report_files(directory: str | os.PathLike) -> dict[str, Path]:
    """The files of :data:`REPORT_FILES` present in ``directory``, by kind (empty if none)."""
    folder = Path(directory)
    return {kind: folder / name for kind, name in REPORT_FILES.items() if (folder / name).is_file()}


def read_report(directory: str | os.PathLike) -> EvalReport:
    """The report :func:`write_report` wrote into ``directory``, read from its ``eval.json``.

    Raises :class:`~depthlens.errors.ReportError` if there is no ``eval.json`` or it is not a
    report (not JSON, or missing the token count or the per-layer rows).
    """
    path = Path(directory) / REPORT_FILES["json"]
    if not path.is_file():
        raise ReportError(f"no evaluation in {Path(directory)} ({path.name} is missing): run depthlens eval to make one")
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ReportError(f"{path} cannot be read ({error}): run depthlens eval again") from None
    return _report_from_json(document, path)


def _report_from_json(document: Any, path: Path) -> EvalReport:
    """Check and convert what :meth:`EvalReport.to_json` wrote."""
    damaged = f"{path} is not an evaluation report"
    if not isinstance(document, dict) or not isinstance(document.get("table"), list) or not document["table"]:
        raise ReportError(f"{damaged} (no per-layer table): run depthlens eval again")
    if not isinstance(document.get("tokens"), int):
        raise ReportError(f"{damaged} (no token count): run depthlens eval again")
    for row in document["table"]:
        if not isinstance(row, dict) or any(key not in row for key in _ROW_KEYS):
            raise ReportError(f"{damaged} (a row lacks one of {', '.join(_ROW_KEYS)}): run depthlens eval again")
    meta = document.get("meta")
    return EvalReport(table=document["table"], tokens=document["tokens"], bytes=int(document.get("bytes") or 0),
                      meta=meta if isinstance(meta, dict) else {})


def wide_table(report: EvalReport, metrics: tuple[str, ...] = WIDE_METRICS) -> pd.DataFrame:
    """One row per layer and a column ``"<metric> · <lens>"`` per metric and lens (KL and
    cross-entropy in nats, top-1 agreement as a fraction), rounded to 3 decimals."""
    import pandas as pd

    frame = pd.DataFrame(report.table)
    frame = frame[frame["metric"].isin(metrics) & frame["unit"].isin(["nats", "fraction"])]
    wide = frame.pivot_table(index="layer", columns=["metric", "lens"], values="value", sort=False)
    wide = wide[[column for metric in metrics for column in wide.columns if column[0] == metric]]
    wide.columns = [f"{metric} · {lens}" for metric, lens in wide.columns]
    return wide.round(3).reset_index()


def _series(report: EvalReport, lens: str, metric: str, unit: str) -> tuple[list[int], list[float], list[float], list[float]]:
    rows = sorted((r for r in report.table if (r["lens"], r["metric"], r["unit"]) == (lens, metric, unit)), key=lambda r: r["layer"])
    return [r["layer"] for r in rows], [r["value"] for r in rows], [r.get("ci_low") for r in rows], [r.get("ci_high") for r in rows]


def _band(layers: list[int], low: list[float | None], high: list[float | None]) -> tuple[list[int], list[float], list[float]]:
    """The layers that have an interval, with its bounds (empty where there are none)."""
    kept = [(x, a, b) for x, a, b in zip(layers, low, high) if a is not None and b is not None]
    return [x for x, _, _ in kept], [a for _, a, _ in kept], [b for _, _, b in kept]


def curves_title(report: EvalReport) -> str:
    """The curves' title: the token count and the report's intervals, or why there are none."""
    return f"per-layer evaluation on {report.tokens} tokens ({report.interval_label()})"


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
            band, low, high = _band(layers, low, high)
            if band:
                figure.add_scatter(x=band + band[::-1], y=high + low[::-1], fill="toself", fillcolor=colour,
                                   opacity=0.2, line={"width": 0}, hoverinfo="skip", showlegend=False, row=1, col=column)
            figure.add_scatter(x=layers, y=values, mode="lines+markers", name=f"{lens} lens", line={"color": colour},
                               legendgroup=lens, showlegend=column == 1, row=1, col=column,
                               hovertemplate=f"{lens} layer %{{x}}: %{{y:.3f}} {unit}<extra></extra>")
            figure.update_xaxes(title_text="layer", row=1, col=column)
    figure.update_layout(height=380, width=320 * len(CURVE_METRICS), title=curves_title(report))
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
            band, low, high = _band(layers, low, high)
            if band:
                axis.fill_between(band, low, high, color=line.get_color(), alpha=0.2)
            axis.set_title(TITLES[metric], fontsize=10)
            axis.set_xlabel("layer")
            axis.set_ylabel(unit)
    axes[0].legend()
    figure.suptitle(curves_title(report))
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
    columns = {(lens, metric): dict(zip(*_series(report, lens, metric, "fraction" if metric == "top1" else "nats")[:2]))
               for lens in lenses for metric in ("kl", "ce", "top1")}
    layers = sorted({layer for series in columns.values() for layer in series})  # half-layers of a lens inside blocks too
    shown = sorted({*layers[::every], layers[-1]})
    for layer in shown:
        cells = [f"{columns[key][layer]:.3f}" if layer in columns[key] else ""
                 for key in ((lens, metric) for metric in ("kl", "ce", "top1") for lens in lenses)]
        table.add_row(f"{layer:g}", *cells)
    means = [f"{sum(list(columns[(lens, metric)].values())[:-1]) / max(len(columns[(lens, metric)]) - 1, 1):.3f}"
             for metric in ("kl", "ce", "top1") for lens in lenses]
    table.add_row("mean 0…L−1", *means, style="bold")
    return table
