"""Causal bases: extraction at one layer, and files that remember which model they belong to.

:func:`extract_basis` finds ``k`` ordered orthonormal directions of the residual space at a layer
whose erasure changes a readout most (energies in nats, see
:mod:`depthlens.analysis.causal.erasure`), by the batched search (default) or the paper's
sequential reference, the authors' algorithm (:mod:`depthlens.analysis.causal.search`). Works
with any readout: the erasure acts on the residual state, the readout (a tuned lens's translator
included) decodes the erased state.

A set of bases is saved as ``bases.safetensors`` + ``bases.json`` (atomic, through
:func:`depthlens.atomic.write_dir`); the JSON carries the model's decoder fingerprint
(:func:`depthlens.lenses.lens_file.fingerprint`), so :func:`load_bases` refuses a file made for
another model.
"""

from __future__ import annotations

import json
import os
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load, save
from torch import nn

from depthlens.analysis.causal.erasure import MAX_ROWS, ErasureData, prepare
from depthlens.analysis.causal.search import batched_search, sequential_search
from depthlens.atomic import write_dir
from depthlens.errors import CausalError
from depthlens.lenses.lens_file import fingerprint
from depthlens.lenses.readout import Readout, check_layer, model_parts
from depthlens.model.architecture import ModelParts
from depthlens.model.precision import without_subnormals

METHODS = ("batched", "sequential")
BASES_JSON, BASES_TENSORS = "bases.json", "bases.safetensors"
BASES_FORMAT = "depthlens-causal-bases"


@dataclass
class CausalBasis:
    """An ordered orthonormal basis at one layer and the energy of each direction."""

    layer: int
    basis: torch.Tensor
    """``[k, d]`` orthonormal rows, ordered by decreasing energy."""
    energies: torch.Tensor
    """``[k]`` mean ``KL(readout(h) ‖ readout(r(h, v_i)))`` over the positions, nats."""
    mean: torch.Tensor
    """``[d]`` the data mean ``μ`` the mean erasure uses."""
    mode: str
    readout: str
    method: str
    fingerprint: str
    model_name: str = ""
    seconds: float = 0.0
    positions: int = 0
    evaluations: float = 0.0
    """Cost in full-data energy evaluations (decoded direction–position pairs / positions)."""
    info: dict[str, Any] = field(default_factory=dict)
    per_position: torch.Tensor | None = None
    """``[k, N]`` each direction's energy at each of the ``N`` positions it was extracted from,
    nats; held in memory only (a loaded basis has none), so fidelity on the same data need not
    decode them again (:meth:`energy_at`)."""
    source: weakref.ref[ErasureData] | None = field(default=None, repr=False, compare=False)
    """A weak reference to the data :attr:`per_position` was computed on (it keeps nothing alive)."""

    def energy_at(self, data: ErasureData) -> torch.Tensor | None:
        """:attr:`per_position` if ``data`` is the very object this basis was extracted from,
        else ``None``."""
        same = self.source is not None and self.source() is data
        return self.per_position if same else None

    @property
    def k(self) -> int:
        return self.basis.shape[0]

    def captured(self, k: int) -> float:
        """Total energy of the first ``k`` directions, nats."""
        return float(self.energies[:k].sum())

    def summary(self) -> dict[str, Any]:
        """Everything but the tensors, JSON-ready."""
        return {
            "layer": self.layer, "k": self.k, "mode": self.mode, "readout": self.readout, "method": self.method,
            "fingerprint": self.fingerprint, "model_name": self.model_name, "seconds": self.seconds,
            "positions": self.positions, "evaluations": self.evaluations, "info": self.info,
            "energies_nats": [round(float(e), 6) for e in self.energies],
        }


def check_directions(k: int, d_model: int) -> None:
    """:class:`CausalError` unless ``1 ≤ k ≤ d_model``."""
    if not 1 <= k <= d_model:
        raise CausalError(f"k = {k} directions cannot be found in a residual stream of width {d_model}: "
                          f"choose k between 1 and {d_model}")


def check_readout(model: nn.Module | ModelParts, readout: Readout) -> ModelParts:
    """The model's parts; :class:`CausalError` if ``readout`` decodes another model."""
    parts = model_parts(model)
    if readout.parts.unembedding is parts.unembedding:
        return parts
    if readout.parts.num_layers != parts.num_layers or fingerprint(readout.parts) != fingerprint(parts):
        raise CausalError(f"the {readout.kind} readout was made for {readout.parts.model_name!r}, not for "
                          f"{parts.model_name!r}: load the readout on the model you analyse")
    return parts


def extract_basis(
    readout: Readout,
    data: ErasureData | torch.Tensor,
    layer: int,
    k: int,
    *,
    mode: str = "mean",
    method: str = "batched",
    seed: int = 0,
    max_rows: int = MAX_ROWS,
    progress: bool = False,
    **options: Any,
) -> CausalBasis:
    """The causal basis of ``readout`` at ``layer``: ``k`` directions from states
    ``data [N, d]`` / ``[batch, seq, d]`` (or prepared :class:`ErasureData`).

    ``method`` is ``"batched"`` or ``"sequential"``; ``options`` go to the search
    (e.g. ``max_iter`` and ``tolerance`` for the sequential one, ``refine_steps`` for the batched
    one); ``seed`` draws the resample derangement and the batched search's minibatches. Bad ``k``,
    layer, method or mode are refused before any work."""
    check_layer(layer, readout.num_layers)
    check_directions(k, readout.parts.d_model)
    if method not in METHODS:
        raise CausalError(f"unknown extraction method {method!r}: choose batched or sequential")
    if not isinstance(data, ErasureData):
        data = prepare(readout, data, layer, mode, seed=seed, max_rows=max_rows)
    elif data.layer != layer:
        raise CausalError(f"the prepared data are of layer {data.layer}, not {layer}: prepare them for layer {layer}")
    with without_subnormals():
        if method == "batched":
            result = batched_search(readout, data, k, seed=seed, max_rows=max_rows, progress=progress, **options)
        else:
            result = sequential_search(readout, data, k, max_rows=max_rows, progress=progress, **options)
    return CausalBasis(
        layer=layer, basis=result.basis.detach(), energies=result.energies.detach(), mean=data.mean, mode=data.mode,
        readout=readout.kind, method=method, fingerprint=fingerprint(readout.parts),
        model_name=readout.parts.model_name, seconds=result.seconds, positions=data.num_positions,
        evaluations=result.evaluations, info={key: value for key, value in options.items()},
        per_position=result.per_position.detach(), source=weakref.ref(data),
    )


def bases_files(bases: list[CausalBasis]) -> dict[str, bytes]:
    """The files of a bases folder (name → content): ``bases.safetensors`` and ``bases.json``."""
    tensors: dict[str, torch.Tensor] = {}
    for basis in bases:
        for name in ("basis", "energies", "mean"):
            tensors[f"layer.{basis.layer}.{name}"] = getattr(basis, name).detach().float().cpu().contiguous()
    config = {"format": BASES_FORMAT, "format_version": 1, "bases": [basis.summary() for basis in bases]}
    return {BASES_TENSORS: save(tensors), BASES_JSON: (json.dumps(config, indent=2) + "\n").encode()}


def save_bases(directory: str | os.PathLike, bases: list[CausalBasis]) -> Path:
    """Write ``bases`` (one per layer) atomically as ``bases.safetensors`` + ``bases.json``."""
    return write_dir(directory, bases_files(bases))


def load_bases(directory: str | os.PathLike, model: nn.Module | ModelParts) -> dict[int, CausalBasis]:
    """The bases saved in ``directory`` by layer; :class:`CausalError` if the folder is not a
    bases folder or was made for another model (by decoder fingerprint)."""
    path = Path(directory)
    if not (path / BASES_JSON).is_file() or not (path / BASES_TENSORS).is_file():
        raise CausalError(f"{path} is not a causal-bases folder ({BASES_JSON} and {BASES_TENSORS}): "
                          "pass the --out folder of depthlens causal")
    try:
        config = json.loads((path / BASES_JSON).read_text())
        tensors = load((path / BASES_TENSORS).read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError, Exception) as error:  # noqa: BLE001 - any damage is one error
        raise CausalError(f"{path} is damaged ({type(error).__name__}): extract the bases again") from None
    if config.get("format") != BASES_FORMAT:
        raise CausalError(f"{path / BASES_JSON} is not a causal-bases file: extract the bases again")
    parts = model_parts(model)
    ours = fingerprint(parts)
    out: dict[int, CausalBasis] = {}
    for entry in config["bases"]:
        if entry["fingerprint"] != ours:
            raise CausalError(f"the bases in {path} were extracted on {entry.get('model_name')!r}, not on "
                              f"{parts.model_name!r} (decoder fingerprints differ): extract them on this model")
        layer = int(entry["layer"])
        out[layer] = CausalBasis(
            layer=layer, basis=tensors[f"layer.{layer}.basis"], energies=tensors[f"layer.{layer}.energies"],
            mean=tensors[f"layer.{layer}.mean"], mode=entry["mode"], readout=entry["readout"],
            method=entry["method"], fingerprint=entry["fingerprint"], model_name=entry.get("model_name", ""),
            seconds=entry.get("seconds", 0.0), positions=entry.get("positions", 0),
            evaluations=entry.get("evaluations", 0.0), info=entry.get("info", {}),
        )
    return out


__all__ = [
    "METHODS", "CausalBasis", "bases_files", "check_directions", "check_readout", "extract_basis", "load_bases",
    "save_bases",
]
