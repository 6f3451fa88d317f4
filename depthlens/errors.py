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


class OutputError(DepthlensError, OSError):
    """An output file or folder cannot be written: its folder cannot be made (a file stands in
    the way, no permission, a read-only disk), the disk is full, or the path names a folder.

    Also an :class:`OSError`, which is what :mod:`depthlens.atomic` raised before, so code that
    catches ``OSError`` around a write keeps working."""


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


class TaskError(DepthlensError):
    """Task data that cannot be used: a missing field, a gold index out of range, an empty or
    mixed-size choice list, an unknown built-in task, or built-in task files that are not
    installed. The message names the example (file and line, or task and index)."""


class ScoreError(DepthlensError):
    """Scores and labels that cannot give an AUROC or a correlation (different lengths, one class
    only, NaN, too few values)."""


class RelationError(DataError):
    """A relation (templates and subject–object pairs) that cannot be used: a malformed relation
    file, too few examples for what was asked, a template without its ``{}``, or a subject that does
    not occur in the prompt."""


class AttributionError(DepthlensError):
    """A logit attribution that cannot be computed as asked: a target that is not exactly one
    token, a position outside the text, or a model whose final norm cannot be linearised."""


class PatchscopeError(EditError):
    """A Patchscope that cannot run: source and target widths that differ without a map, a source
    or target position outside its prompt, a map of the wrong shape."""


class GenerationError(DepthlensError):
    """Generation that cannot run as asked: no tokens to generate, a bad temperature, top-k or
    top-p, or a prompt batch without an attention mask for its padding."""


class CausalError(DepthlensError):
    """A causal analysis that cannot run as asked: more directions than the residual width, too
    few positions for the statistics, an unknown erasure, or a basis file made for another model
    or layer."""


class DriftError(DepthlensError):
    """A drift analysis that cannot run as asked: too few positions or layers, or a transfer
    matrix without a tuned lens."""


class ModelCacheError(DepthlensError):
    """A model cache entry fails its check, or a cache command was given nothing to act on."""
