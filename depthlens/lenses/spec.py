"""Lens specs: the strings a user names a readout with (``--lens`` on the command line).

A spec is ``"logit"`` (the logit lens: every state decoded by the model's own final norm and
unembedding) or the path of a tuned-lens directory written by
:meth:`~depthlens.lenses.tuned.TunedLens.save_pretrained` (``depthlens train`` writes one to
``runs/<model>/lens``). :func:`load_readout` turns one spec into a readout, :func:`load_lenses`
turns several into the named set of lenses the app offers. Anything else is a
:class:`~depthlens.errors.LensFileError` naming the spec and what to pass instead.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from torch import nn

from depthlens.errors import LensFileError
from depthlens.lenses.logit import LogitLens
from depthlens.lenses.readout import Lens, Readout
from depthlens.lenses.tuned import TunedLens
from depthlens.model.architecture import ModelParts

LOGIT = "logit"
"""The spec of the logit lens."""

__all__ = ["LOGIT", "check_spec", "is_logit", "lens_directory", "load_lenses", "load_readout"]


def is_logit(spec: str | os.PathLike) -> bool:
    """Whether ``spec`` names the logit lens (``"logit"``, not a directory of that name)."""
    return os.fspath(spec) == LOGIT


def lens_directory(spec: str | os.PathLike) -> Path:
    """The tuned-lens directory ``spec`` names; raises :class:`LensFileError` if there is none.

    A spec that is neither ``"logit"`` nor an existing directory is refused here, with the fix,
    before any file is read (``"./logit"`` names a directory called ``logit``).
    """
    path = Path(spec).expanduser()
    if path.is_dir():
        return path
    problem = "is a file, not a lens directory" if path.exists() else "is neither 'logit' nor an existing directory"
    raise LensFileError(
        f"lens {os.fspath(spec)!r} {problem}: pass --lens logit, or the directory a tuned lens "
        "was saved to (depthlens train writes runs/<model>/lens)"
    )


def check_spec(spec: str | os.PathLike) -> None:
    """Raise :class:`LensFileError` now, before a model is loaded, for a spec that is neither
    ``"logit"`` nor a directory (the lens files themselves are checked when loaded)."""
    if not is_logit(spec):
        lens_directory(spec)


def load_readout(spec: str | os.PathLike, model: nn.Module | ModelParts) -> Readout:
    """The readout ``spec`` names, on ``model``: a :class:`LogitLens` for ``"logit"``, else the
    :class:`TunedLens` saved in directory ``spec``.

    Raises :class:`LensFileError` for a spec that is neither, a damaged lens directory, or a lens
    trained for another model.
    """
    if is_logit(spec):
        return LogitLens(model)
    return TunedLens.from_pretrained(lens_directory(spec), model)


def load_lenses(
    model: nn.Module | ModelParts, specs: Iterable[str | os.PathLike] = ()
) -> tuple[dict[str, Lens], dict[str, Path]]:
    """The logit lens and a tuned lens from each directory in ``specs``, by name, and the
    directory each tuned lens came from (same names).

    The logit lens (``"logit"``) always comes first; ``"logit"`` in ``specs`` adds nothing, and
    a directory named twice is loaded once. One tuned lens is called ``"tuned"``; several are
    ``"tuned (DIR)"``. Raises :class:`LensFileError` as :func:`load_readout` does.
    """
    folders = list(dict.fromkeys(Path(spec) for spec in specs if not is_logit(spec)))
    lenses: dict[str, Lens] = {LOGIT: LogitLens(model)}
    sources: dict[str, Path] = {}
    for folder in folders:
        name = "tuned" if len(folders) == 1 else f"tuned ({folder})"
        lenses[name] = TunedLens.from_pretrained(lens_directory(folder), model)
        sources[name] = folder
    return lenses, sources
