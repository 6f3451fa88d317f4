"""The reference J-lens artifact: the ``.pt`` file of Anthropic's reference implementation, which
``transformer-lens`` 4.3's ``JacobianLens.save``/``load`` also read and write, and in which the
published lenses ship.

It is a ``torch.save`` dict:

- ``"J"``: ``{layer: [d, d]}`` (often float16), where ``layer`` is the index of a **block** and the
  matrix transports that block's output: artifact layer ``l`` is depthlens's residual state
  ``l + 1``. Layers ``0 … L − 2`` at most; the last block's output is the target itself;
- ``"n_prompts"``: prompts the fit averaged; ``"source_layers"``: the sorted keys of ``"J"``;
  ``"d_model"``: the residual width;
- ``"metadata"`` (optional): provenance, plain values only (``target_layer``, when present, must be
  the last block).

It is read with ``torch.load(weights_only=True)`` only, so a pickle that holds anything but
tensors and plain values is refused, and written atomically (:mod:`depthlens.atomic`).
"""

from __future__ import annotations

import io
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from depthlens.atomic import write_file
from depthlens.errors import LensFileError
from depthlens.model.architecture import ModelParts


@dataclass
class Artifact:
    """A reference artifact read onto a model, in depthlens's numbering."""

    matrices: dict[int, torch.Tensor]
    """``{state: [d, d]}`` float32, ``state = artifact layer + 1``."""
    n_prompts: int
    metadata: dict[str, Any]


def read_artifact(path: str | os.PathLike, parts: ModelParts) -> Artifact:
    """Read the artifact at ``path`` for the model of ``parts``.

    Raises :class:`LensFileError` (one line, naming the fix) if the file is not a ``weights_only``
    pickle, lacks the ``"J"`` dict, or its width, layers or matrix shapes do not fit the model.
    """
    payload = _load(Path(path))
    if "J" not in payload:
        hint = " (it is a fit checkpoint with running sums; load it with transformer-lens and save the lens)" \
            if "jacobian_sum" in payload else ""
        raise LensFileError(f"{path} is not a J-lens artifact: it has no \"J\" key{hint}")
    table = payload["J"]
    if not isinstance(table, dict) or not table:
        raise LensFileError(f"{path}: \"J\" must map block indices to [d, d] matrices; it holds {type(table).__name__}")
    d, last = parts.d_model, parts.num_layers - 1
    width = payload.get("d_model", d)
    if width != d:
        raise LensFileError(
            f"{path} was fitted for a residual width of {width}, but this model's is {d}: "
            "load the model the lens was fitted for"
        )
    matrices: dict[int, torch.Tensor] = {}
    for layer, matrix in table.items():
        if not isinstance(layer, int) or not 0 <= layer < last:
            raise LensFileError(
                f"{path} has a matrix for block {layer!r}, but this model's source blocks are 0 … {last - 1}: "
                "load the model the lens was fitted for"
            )
        if not isinstance(matrix, torch.Tensor) or tuple(matrix.shape) != (d, d):
            shape = tuple(matrix.shape) if isinstance(matrix, torch.Tensor) else type(matrix).__name__
            raise LensFileError(f"{path}: the matrix of block {layer} is {shape}, expected ({d}, {d}) for this model")
        matrices[layer + 1] = matrix.to(torch.float32)
    _check_header(path, payload, sorted(table), last)
    metadata = payload.get("metadata") or {}
    return Artifact(matrices=matrices, n_prompts=int(payload.get("n_prompts", 0)), metadata=dict(metadata))


def _load(path: Path) -> dict[str, Any]:
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise LensFileError(
            f"{path} holds objects other than tensors and plain values, which depthlens does not unpickle "
            "(torch.load weights_only=True): re-save the lens with transformer-lens's JacobianLens.save"
        ) from None
    except (OSError, RuntimeError, EOFError, ValueError) as error:
        raise LensFileError(f"{path} cannot be read as a PyTorch file ({str(error).splitlines()[0]})") from None
    if not isinstance(payload, dict):
        raise LensFileError(f"{path} is not a J-lens artifact: it holds a {type(payload).__name__}, not a dict")
    return payload


def _check_header(path: str | os.PathLike, payload: dict[str, Any], layers: list[int], last: int) -> None:
    listed = payload.get("source_layers", layers)
    if list(listed) != layers:
        raise LensFileError(f"{path}: \"source_layers\" {list(listed)} disagrees with the layers of \"J\" {layers}")
    metadata = payload.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise LensFileError(f"{path}: \"metadata\" must be a dict, not {type(metadata).__name__}")
    target = metadata.get("target_layer", last)
    if target != last:
        raise LensFileError(
            f"{path} targets block {target}, but a J-lens reads into the last block's output (block {last}): "
            "refit it with the final block as target"
        )


def write_artifact(
    path: str | os.PathLike,
    matrices: dict[int, torch.Tensor],
    *,
    n_prompts: int,
    d_model: int,
    metadata: dict[str, Any] | None = None,
    dtype: torch.dtype = torch.float16,
) -> Path:
    """Write ``matrices`` (``{state: [d, d]}``, states ``1 … L − 1``) as a reference artifact at
    ``path``: state ``s`` is stored as block ``s − 1``, in ``dtype``. ``metadata`` must hold plain
    values only. Raises :class:`LensFileError` if a matrix does not fit in ``dtype``."""
    table = {}
    for state, matrix in sorted(matrices.items()):
        stored = matrix.detach().to("cpu", dtype).contiguous()
        if not torch.isfinite(stored).all():
            raise LensFileError(f"the J-lens matrix of state {state} overflows {dtype}: save it with dtype=torch.float32")
        table[state - 1] = stored
    payload: dict[str, Any] = {"J": table, "n_prompts": int(n_prompts), "source_layers": sorted(table),
                               "d_model": int(d_model)}
    if metadata:
        payload["metadata"] = dict(metadata)
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    return write_file(path, buffer.getvalue())


__all__ = ["Artifact", "read_artifact", "write_artifact"]
