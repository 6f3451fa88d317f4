"""The exceptions depthlens raises for bad input.

Every error a user can cause derives from :class:`DepthlensError`, names the problem and says
what to do about it. The command-line tool prints these as one line instead of a traceback.
"""


class DepthlensError(Exception):
    """Base class of every error caused by a user's input or environment."""


class ModelLoadError(DepthlensError):
    """A model spec could not be resolved or loaded."""


class UnsupportedModelError(DepthlensError):
    """The model's parts (embedding, blocks, final norm, unembedding) could not be discovered."""


class LensFileError(DepthlensError):
    """A lens directory is missing, truncated, tampered with, or made for another model."""


class DataError(DepthlensError):
    """A text source is empty, unreadable, or too small for what was asked."""


class TrajectoryError(DepthlensError):
    """A statistic, layer selection, output path or pair of trajectories that cannot be used."""


class CheckpointError(DepthlensError):
    """A checkpoint is missing, damaged, or from a run with another configuration."""


class AppError(DepthlensError):
    """A request the app refuses: a text that is empty or too long, or a lens, statistic or top-k
    that it does not offer."""


class TrainingError(DepthlensError):
    """Training cannot start or cannot go on (bad budget, non-finite loss)."""


class LayerError(DepthlensError):
    """A layer number outside ``0 … L`` for the model at hand."""


class EvaluationError(DepthlensError):
    """An evaluation that cannot run as asked (a lens bound to another model object)."""


class EditError(DepthlensError):
    """An edit of the forward pass that cannot be applied: an unknown hook point, a layer or
    position out of range, a value of the wrong shape, an erasure without what it needs."""


class OutputError(DepthlensError):
    """An output file or folder cannot be written: its folder cannot be made (a file stands in
    the way, no permission, a read-only disk), the disk is full, or the path names a folder."""


class ReportError(DepthlensError):
    """An evaluation folder has no report, or its ``eval.json`` is damaged."""


class GridError(TrajectoryError):
    """A :class:`~depthlens.stats.grid.Grid` whose parts disagree (labels, text or hover that do not
    match the values' shape), two grids that cannot be compared, or a picture that cannot be drawn
    or written. It derives from :class:`TrajectoryError` because pictures raised that before grids
    existed, so ``except TrajectoryError`` keeps catching it."""


class UsageError(DepthlensError):
    """A command-line option or argument with a value the command cannot use (an empty text, a
    count below 1, two options that exclude each other)."""
