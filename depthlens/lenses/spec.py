"""Several lens specs at once: the named set of readouts a command or the app compares.

Each spec is read by :mod:`depthlens.lenses.registry` (``"logit"``, or a folder or file of any
registered kind). A readout is named by its kind (``"tuned"``, ``"attribute"``), and by kind and
path where several share a kind (``"tuned (runs/a/lens)"``, ``"tuned (runs/b/lens)"``), so two
readouts never share a name and results written under their names never overwrite each other.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from torch import nn

from depthlens.lenses.readout import Readout
from depthlens.lenses.registry import LOGIT, check_spec, is_logit, load_readout
from depthlens.model.architecture import ModelParts

__all__ = ["load_lenses", "load_readouts", "readout_names"]


def readout_names(specs: Iterable[str | os.PathLike]) -> dict[str, Path | None]:
    """The name of each distinct spec, and its path (``None`` for the logit lens), in order.

    Reads only the specs' ``config.json`` files (:func:`~depthlens.lenses.registry.check_spec`),
    so it runs before any model is loaded and raises :class:`~depthlens.errors.LensFileError` for
    a spec that names no readout. A path given twice counts once.
    """
    distinct = list(dict.fromkeys(LOGIT if is_logit(spec) else Path(spec) for spec in specs))
    kinds = {spec: check_spec(spec) for spec in distinct}
    shared = {kind for kind in kinds.values() if list(kinds.values()).count(kind) > 1}
    return {
        (kind if kind not in shared else f"{kind} ({spec})"): (None if spec == LOGIT else spec)
        for spec, kind in kinds.items()
    }


def load_readouts(model: nn.Module | ModelParts, specs: Iterable[str | os.PathLike]) -> dict[str, Readout]:
    """The readout of each distinct spec on ``model``, by the names of :func:`readout_names`."""
    return _load(model, readout_names(specs))


def load_lenses(
    model: nn.Module | ModelParts, specs: Iterable[str | os.PathLike] = ()
) -> tuple[dict[str, Readout], dict[str, Path]]:
    """The logit lens and the readout of each spec in ``specs``, by name, and the path each
    non-logit readout came from (same names).

    The logit lens (``"logit"``) always comes first; ``"logit"`` in ``specs`` adds nothing. Names
    are those of :func:`readout_names`: one tuned lens is ``"tuned"``, two are
    ``"tuned (DIR)"`` each. Raises :class:`~depthlens.errors.LensFileError` as
    :func:`~depthlens.lenses.registry.load_readout` does.
    """
    names = readout_names([LOGIT, *specs])
    return _load(model, names), {name: path for name, path in names.items() if path is not None}


def _load(model: nn.Module | ModelParts, names: dict[str, Path | None]) -> dict[str, Readout]:
    return {name: load_readout(path or LOGIT, model) for name, path in names.items()}
