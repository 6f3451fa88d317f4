"""depthlens: see what a transformer language model predicts at every layer.

The data flows model → hidden states → lens → distributions::

    import depthlens
    model, tokenizer = depthlens.load_model("smollm2-135m")
    states = depthlens.capture(model, tokenizer("Fair is foul", return_tensors="pt").input_ids)
    lens = depthlens.LogitLens(model)
    for layer, logits in lens.iter_logits(states):   # logits: [batch, seq, vocab]
        ...
"""

from depthlens._version import __version__
from depthlens.model.architecture import (
    FAMILY_RULES,
    FamilyRule,
    ModelParts,
    find_parts,
    register_family,
)
from depthlens.errors import (
    DataError,
    DepthlensError,
    LayerError,
    LensFileError,
    ModelLoadError,
    UnsupportedModelError,
)
from depthlens.model.hidden_states import HiddenStates, capture
from depthlens.lenses import Lens, LogitLens, Readout, TunedLens
from depthlens.model.load import BUILTIN_MODELS, load_model
from depthlens.analysis.compare import LensDivergence, compare_lenses
from depthlens.analysis.trajectory import Trajectory

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
]
