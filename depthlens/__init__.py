"""depthlens: see what a transformer language model predicts at every layer.

The data flows model → hidden states → lens → distributions::

    import depthlens
    model, tokenizer = depthlens.load_model("smollm2-135m")
    states = depthlens.capture(model, tokenizer("Fair is foul", return_tensors="pt").input_ids)
    lens = depthlens.LogitLens(model)
    for layer, logits in lens.iter_logits(states):   # logits: [batch, seq, vocab]
        ...

The names below are imported on first use (PEP 562), so ``import depthlens`` — and the
``depthlens`` command, which imports its submodules — does not import torch until a name that
needs it is asked for.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from depthlens._version import __version__

_HOMES = {
    "BUILTIN_MODELS": "depthlens.model.load",
    "FAMILY_RULES": "depthlens.model.architecture",
    "DataError": "depthlens.errors",
    "DepthlensError": "depthlens.errors",
    "FamilyRule": "depthlens.model.architecture",
    "HiddenStates": "depthlens.model.hidden_states",
    "LayerError": "depthlens.errors",
    "Lens": "depthlens.lenses.readout",
    "LensDivergence": "depthlens.analysis.compare",
    "LensFileError": "depthlens.errors",
    "LogitLens": "depthlens.lenses.logit",
    "MidTunedLens": "depthlens.lenses.mid",
    "ModelLoadError": "depthlens.errors",
    "ModelParts": "depthlens.model.architecture",
    "Readout": "depthlens.lenses.readout",
    "Trajectory": "depthlens.analysis.trajectory",
    "TunedLens": "depthlens.lenses.tuned",
    "UnsupportedModelError": "depthlens.errors",
    "capture": "depthlens.model.hidden_states",
    "compare_lenses": "depthlens.analysis.compare",
    "find_parts": "depthlens.model.architecture",
    "load_model": "depthlens.model.load",
    "register_family": "depthlens.model.architecture",
    "unwrap_model": "depthlens.model.unwrap",
}
"""The module each public name lives in."""

__all__ = [
    "BUILTIN_MODELS",
    "FAMILY_RULES",
    "DataError",
    "DepthlensError",
    "FamilyRule",
    "HiddenStates",
    "LayerError",
    "Lens",
    "LensDivergence",
    "LensFileError",
    "LogitLens",
    "MidTunedLens",
    "ModelLoadError",
    "ModelParts",
    "Readout",
    "Trajectory",
    "TunedLens",
    "UnsupportedModelError",
    "__version__",
    "capture",
    "compare_lenses",
    "find_parts",
    "load_model",
    "register_family",
    "unwrap_model",
]


_SUBMODULES = ("analysis", "apps", "atomic", "errors", "lenses", "model", "stats", "text", "training", "viz")
"""Subpackages and modules reachable as attributes (``depthlens.model.load``) after ``import depthlens``."""


def __getattr__(name: str) -> Any:
    """Import the module that defines ``name`` (or the submodule ``name``) and return it (kept, so
    this runs once per name)."""
    if name in _SUBMODULES:
        return importlib.import_module(f"depthlens.{name}")
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'depthlens' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_HOMES})


if TYPE_CHECKING:
    from depthlens.analysis.compare import LensDivergence, compare_lenses
    from depthlens.analysis.trajectory import Trajectory
    from depthlens.errors import (
        DataError,
        DepthlensError,
        LayerError,
        LensFileError,
        ModelLoadError,
        UnsupportedModelError,
    )
    from depthlens.lenses.logit import LogitLens
    from depthlens.lenses.mid import MidTunedLens
    from depthlens.lenses.readout import Lens, Readout
    from depthlens.lenses.tuned import TunedLens
    from depthlens.model.architecture import FAMILY_RULES, FamilyRule, ModelParts, find_parts, register_family
    from depthlens.model.hidden_states import HiddenStates, capture
    from depthlens.model.load import BUILTIN_MODELS, load_model
    from depthlens.model.unwrap import unwrap_model
