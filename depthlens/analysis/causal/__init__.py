"""Causal checks of a readout (Belrose et al. 2023, §4): causal basis extraction, causal
fidelity against the model, and stimulus–response alignment."""

from depthlens.analysis.causal.alignment import (
    Alignment,
    aitchison_similarity,
    clr,
    random_directions,
    stimulus_response,
)
from depthlens.analysis.causal.basis import (
    CausalBasis,
    check_directions,
    check_readout,
    extract_basis,
    load_bases,
    save_bases,
)
from depthlens.analysis.causal.erasure import ErasureData, per_position_energy, prepare
from depthlens.analysis.causal.fidelity import (
    Fidelity,
    causal_fidelity,
    check_statistics,
    direction_interval,
    model_kl,
    spearman,
)
from depthlens.analysis.causal.search import batched_search, sequential_search

__all__ = [
    "Alignment",
    "CausalBasis",
    "ErasureData",
    "Fidelity",
    "aitchison_similarity",
    "batched_search",
    "causal_fidelity",
    "check_directions",
    "check_readout",
    "check_statistics",
    "clr",
    "direction_interval",
    "extract_basis",
    "load_bases",
    "model_kl",
    "per_position_energy",
    "prepare",
    "random_directions",
    "save_bases",
    "sequential_search",
    "spearman",
    "stimulus_response",
]
