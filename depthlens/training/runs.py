"""Run folders: where ``depthlens train`` and ``depthlens eval`` write, and where readers look.

A run on a model writes into one folder, ``runs/<model name>`` unless told otherwise::

    runs/smollm2-135m/
        lens/          the trained tuned lens   (TunedLens.save_pretrained / from_pretrained)
        checkpoint/    the latest training state (training.checkpoint)
        eval/          its evaluation on held-out text (viz.report.write_report / read_report)
            ood/       its evaluation on out-of-domain text (depthlens train --ood, default mixed:dataset-descriptions)
        mid/           the run of the lens inside the blocks (depthlens train --site mid), laid out alike

Every path convention lives here, each with its reader: :func:`run_dir` and the three subpaths
name where things are written; :func:`run_of_lens` and :func:`eval_dir_of_lens` go back from a
lens directory to its run and evaluation; :func:`trained_lens` and :func:`find_evaluations` say
which of those exist (:func:`require_trained_lens` refuses with the fix when there is none). Paths are relative to the current directory, like the command's defaults.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from depthlens.errors import LensFileError

RUNS = Path("runs")
"""The folder that holds the default run folders."""
LENS = "lens"
CHECKPOINT = "checkpoint"
EVAL = "eval"
OOD = "ood"
MID = "mid"
"""The run folder, inside a model's, of its lens inside the blocks (``depthlens train --site mid``)."""

__all__ = [
    "CHECKPOINT",
    "EVAL",
    "LENS",
    "MID",
    "OOD",
    "RUNS",
    "checkpoint_dir",
    "default_lens",
    "eval_dir",
    "eval_dir_of_lens",
    "find_evaluations",
    "lens_dir",
    "ood_eval_dir",
    "require_trained_lens",
    "run_dir",
    "run_of_lens",
    "trained_lens",
]


def run_dir(model: str | os.PathLike, out: str | os.PathLike | None = None, site: str = "block") -> Path:
    """The run folder: ``out`` if given, else ``runs/<model name>`` (the last part of a model
    path or hub name, without ``.gguf``), and its ``mid/`` for a lens inside the blocks
    (``site="mid"``)."""
    if out:
        return Path(out)
    folder = RUNS / Path(os.fspath(model).rstrip("/")).name.removesuffix(".gguf")
    return folder / MID if site == "mid" else folder


def lens_dir(run: str | os.PathLike) -> Path:
    """Where a run's trained lens is saved: ``<run>/lens``."""
    return Path(run) / LENS


def checkpoint_dir(run: str | os.PathLike) -> Path:
    """Where a run's training checkpoint is kept: ``<run>/checkpoint``."""
    return Path(run) / CHECKPOINT


def eval_dir(run: str | os.PathLike) -> Path:
    """Where a run's evaluation is written: ``<run>/eval``."""
    return Path(run) / EVAL


def ood_eval_dir(evaluation: str | os.PathLike) -> Path:
    """Where the out-of-domain evaluation goes, inside an evaluation folder: ``<eval>/ood``."""
    return Path(evaluation) / OOD


def run_of_lens(lens: str | os.PathLike) -> Path:
    """The run folder a lens directory belongs to (the inverse of :func:`lens_dir`)."""
    return Path(lens).parent


def eval_dir_of_lens(lens: str | os.PathLike) -> Path:
    """Where the evaluation of the lens in directory ``lens`` is written: its run's ``eval/``."""
    return eval_dir(run_of_lens(lens))


def default_lens(model: str | os.PathLike) -> Path:
    """Where the default run on ``model`` saves its lens: ``runs/<model>/lens``."""
    return lens_dir(run_dir(model))


def trained_lens(model: str | os.PathLike) -> Path | None:
    """The lens the default run on ``model`` trained (:func:`default_lens`), or ``None`` if
    there is none yet."""
    path = default_lens(model)
    return path if path.is_dir() else None


def require_trained_lens(model: str | os.PathLike) -> Path:
    """:func:`trained_lens`, or :class:`~depthlens.errors.LensFileError` saying how to make one."""
    path = trained_lens(model)
    if path is None:
        raise LensFileError(f"there is no trained lens in {default_lens(model)}: run depthlens train "
                            f"--model {os.fspath(model)} first, or pass --lens DIR")
    return path


def find_evaluations(lens_dirs: Mapping[str, str | os.PathLike]) -> dict[str, Path]:
    """For lens directories by name, the evaluation folders that exist next to them (same names;
    lenses without one are left out)."""
    found = {name: eval_dir_of_lens(folder) for name, folder in lens_dirs.items()}
    return {name: folder for name, folder in found.items() if folder.is_dir()}
