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
