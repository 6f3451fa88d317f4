"""One finished layer of a causal run on disk, so that a long run resumes where it stopped.

:func:`save_layer` writes a folder holding the layer's basis (the files of
:func:`~depthlens.analysis.causal.basis.save_bases`) and its fidelity (``fidelity.json``), with
the settings that made them; :func:`load_layer` gives both back only for the very same settings,
and ``None`` for anything else (another lens, other tokens, a damaged folder), which is then
computed again. The folder is written atomically, so an interruption leaves it whole or absent.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from depthlens.analysis.causal.basis import CausalBasis, bases_files, load_bases
from depthlens.analysis.causal.fidelity import Fidelity
from depthlens.atomic import write_dir
from depthlens.errors import CausalError
from depthlens.lenses.readout import Readout

FIDELITY_JSON = "fidelity.json"
LAYER_FORMAT = "depthlens-causal-layer"


def readout_digest(readout: Readout) -> str:
    """sha256 of a readout's kind and every tensor of its state (a tuned lens's translators): two
    readouts of one model with the same digest decode alike."""
    digest = hashlib.sha256(readout.kind.encode())
    if isinstance(readout, nn.Module):
        for name, tensor in sorted(readout.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def save_layer(
    directory: str | os.PathLike, basis: CausalBasis, fidelity: Fidelity, settings: dict[str, Any]
) -> Path:
    """Write ``basis`` and ``fidelity`` of one layer and the JSON-ready ``settings`` that made them."""
    record = {"format": LAYER_FORMAT, "settings": settings,
              "fidelity": {"layer": fidelity.layer, "rho": fidelity.rho, "low": fidelity.low, "high": fidelity.high,
                           "readout_kl": fidelity.readout_kl.tolist(), "model_kl": fidelity.model_kl.tolist()}}
    files = {**bases_files([basis]), FIDELITY_JSON: (json.dumps(record, indent=1) + "\n").encode()}
    return write_dir(directory, files)


def load_layer(
    directory: str | os.PathLike, model: nn.Module, settings: dict[str, Any]
) -> tuple[CausalBasis, Fidelity] | None:
    """The basis and fidelity :func:`save_layer` wrote in ``directory`` with these ``settings``;
    ``None`` if there are none, they were made with other settings or on another model, or the
    folder is damaged."""
    path = Path(directory) / FIDELITY_JSON
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("format") != LAYER_FORMAT or record.get("settings") != settings:
        return None
    saved = record["fidelity"]
    try:
        basis = load_bases(directory, model)[saved["layer"]]
    except (CausalError, KeyError):
        return None
    fidelity = Fidelity(saved["layer"], torch.tensor(saved["readout_kl"]), torch.tensor(saved["model_kl"]),
                        saved["rho"], saved["low"], saved["high"])
    return basis, fidelity


__all__ = ["FIDELITY_JSON", "load_layer", "readout_digest", "save_layer"]
