"""The app's Evaluation tab: the per-layer curves and table that ``depthlens train`` and
``depthlens eval`` wrote next to a lens (read with :func:`depthlens.viz.report.read_report`)."""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import gradio as gr
import pandas as pd

from depthlens.errors import ReportError
from depthlens.viz.report import read_report, report_files, wide_table

_LISTED = ("html", "csv", "json")
"""The report files the tab offers for download, by kind."""


@dataclass(frozen=True)
class Evaluation:
    """What the evaluation tab shows for one lens: a note, the curves picture, the per-layer
    table and the files to download (copies Gradio may serve)."""

    note: str
    image: str | None
    table: pd.DataFrame | None
    files: list[str]


def read_evaluation(directory: str | Path, copy_to: Path) -> Evaluation:
    """Copy the report files ``depthlens eval`` wrote in ``directory`` to the new folder
    ``copy_to`` (Gradio serves files from there) and read the report's per-layer table."""
    directory = Path(directory)
    present = report_files(directory)
    if not present:
        return Evaluation(f"No evaluation in `{directory}`: run `depthlens eval` to make one.", None, None, [])
    copy_to.mkdir(parents=True)
    copies = {kind: str(shutil.copyfile(path, copy_to / path.name)) for kind, path in present.items()}
    note, table = f"Evaluation from `{directory}`.", None
    try:
        report = read_report(directory)
        table = wide_table(report)
        note = (f"Per-layer means on {report.tokens:,} held-out tokens, from `{directory}`: "
                "KL and cross-entropy in nats, top-1 agreement with the model as a fraction.")
    except ReportError as error:
        note = f"{error}; the curves are shown as written."
    return Evaluation(note, copies.get("png"), table, [copies[kind] for kind in _LISTED if kind in copies])


def read_evaluations(eval_dirs: Mapping[str, str | Path], root: Path) -> dict[str, Evaluation]:
    """:func:`read_evaluation` for each lens name's folder, copying into ``root/eval-<i>``."""
    return {name: read_evaluation(folder, root / f"eval-{index}") for index, (name, folder) in enumerate(eval_dirs.items())}


def evaluation_tab(evaluations: Mapping[str, Evaluation]) -> None:
    """The tab's contents (inside a ``gr.Tab``): a lens chooser, the note, curves, table and
    files of the chosen lens's evaluation, or a note on how to make one."""
    if not evaluations:
        gr.Markdown(
            "No evaluation was found for these lenses. `depthlens train` writes one next to the lens "
            "it trains (`runs/<model>/eval/`), and `depthlens eval --lens DIR` makes one for an existing lens.",
            elem_id="evaluation-note",
        )
        return

    def evaluation(name: str) -> tuple:
        if name not in evaluations:
            return (f"**unknown lens {name!r}: evaluations exist for {', '.join(map(repr, evaluations))}**", None, None, None)
        chosen = evaluations[name]
        return (chosen.note, chosen.image, chosen.table, chosen.files or None)

    first = next(iter(evaluations))
    note, image, table, listed = evaluation(first)
    choice = gr.Dropdown(list(evaluations), value=first, label="lens", elem_id="evaluation-lens")
    outputs = [
        gr.Markdown(note, elem_id="evaluation-note"),
        gr.Image(image, type="filepath", interactive=False, label="per-layer curves",
                 buttons=["download", "fullscreen"], elem_id="evaluation-curves"),
        gr.Dataframe(table, interactive=False, label="per-layer table", elem_id="evaluation-table"),
        gr.File(listed, file_count="multiple", interactive=False, label="files", elem_id="evaluation-files"),
    ]
    choice.change(evaluation, choice, outputs, api_name="evaluation")
