"""Pictures of the trajectory applications: ROC curves and per-layer curves (matplotlib).

Depth maps are :class:`~depthlens.stats.grid.Grid` objects and are drawn by
:func:`depthlens.viz.pictures.save_figure` like any grid; the figures here are written with it too
(``.png``, ``.pdf``, ``.svg``).
"""

from __future__ import annotations

from matplotlib.figure import Figure

from depthlens.analysis.applications.injection import InjectionResult
from depthlens.analysis.applications.overthinking import OverthinkingResult

_COLOURS = {"logit": "#1f77b4", "tuned": "#d62728", "hidden": "#7f7f7f"}


def roc_figure(result: InjectionResult) -> Figure:
    """ROC curves (first seed) of every method of a prompt-injection experiment, AUROC and its
    95 % interval in the legend."""
    figure = Figure(figsize=(5.5, 5), layout="constrained")
    axes = figure.add_subplot()
    styles = {"isolation-forest": "-", "lof": "--", "srm": ":"}
    for method in result.methods:
        fpr, tpr = method.roc
        axes.plot(fpr, tpr, styles.get(method.detector, "-"), color=_COLOURS.get(method.readout.split()[0]),
                  label=f"{method.method}: {method.auroc:.3f} [{method.low:.3f}, {method.high:.3f}]", drawstyle="steps-post")
    axes.plot([0, 1], [0, 1], color="#bbbbbb", linewidth=0.8)
    axes.set(xlabel="false positive rate", ylabel="true positive rate", xlim=(0, 1), ylim=(0, 1.01),
             title=f"prompt injection · {result.task} ({result.n_clean} clean, {result.n_injected} injected)")
    axes.legend(fontsize=7, loc="lower right", title="AUROC [95% interval]", title_fontsize=7)
    return figure


def overthinking_figure(result: OverthinkingResult) -> Figure:
    """Per-layer calibrated accuracy with correct and with permuted demonstrations (top) and their
    gap (bottom), one colour per readout, each curve in its 95 % bootstrap band; the critical layer
    of each readout is marked."""
    figure = Figure(figsize=(7, 6), layout="constrained")
    accuracy, gap = figure.subplots(2, 1, sharex=True, height_ratios=(3, 2))
    for name, curves in result.curves.items():
        colour = _COLOURS.get(name.split()[0])
        layers = range(len(curves.correct))
        for values, low, high, style, what in ((curves.correct, curves.correct_low, curves.correct_high, "-", "correct"),
                                               (curves.permuted, curves.permuted_low, curves.permuted_high, "--",
                                                "permuted")):
            line, = accuracy.plot(layers, values, style, color=colour, label=f"{name} lens · {what} demos")
            colour = line.get_color()  # a readout without a colour of its own keeps the first one it gets
            accuracy.fill_between(layers, low, high, color=colour, alpha=0.12, linewidth=0)
        gap.plot(layers, curves.gap, "-", color=colour, label=f"{name} lens")
        gap.fill_between(layers, curves.gap_low, curves.gap_high, color=colour, alpha=0.2, linewidth=0)
        if curves.critical_layer is not None:
            for axes in (accuracy, gap):
                axes.axvline(curves.critical_layer, color=colour, linewidth=0.7, alpha=0.6)
    n = len(next(iter(result.curves.values())).correct)
    accuracy.axhline(1 / result.num_choices, color="#999999", linewidth=0.7, linestyle=":")
    gap.axhline(0, color="#999999", linewidth=0.7, linestyle=":")
    accuracy.set(ylabel="calibrated accuracy", xlim=(0, n - 1),
                 title=f"overthinking · {result.task}, {result.shots}-shot ({result.examples} examples; "
                       f"bands: {result.intervals['level']:.0%} bootstrap intervals over examples)")
    gap.set(xlabel="layer", ylabel="gap (correct − permuted)")
    accuracy.title.set_fontsize(9)
    accuracy.legend(fontsize=7)
    gap.legend(fontsize=7)
    return figure


def layer_curves_figure(curves: dict[str, list[float]], *, title: str, ylabel: str) -> Figure:
    """Generic per-layer curves ``{label: [L + 1 values]}`` on one axis."""
    figure = Figure(figsize=(7, 4), layout="constrained")
    axes = figure.add_subplot()
    for label, values in curves.items():
        axes.plot(range(len(values)), values, label=label, color=_COLOURS.get(label.split()[0]))
    axes.set(xlabel="layer", ylabel=ylabel, title=title)
    axes.legend(fontsize=8)
    return figure


__all__ = ["layer_curves_figure", "overthinking_figure", "roc_figure"]
