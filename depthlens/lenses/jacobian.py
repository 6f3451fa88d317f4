"""The Jacobian lens (J-lens; Gurnee et al. 2026, "Verbalizable Representations Form a Global
Workspace in Language Models", Transformer Circuits Thread): one fixed ``[d, d]`` matrix per
layer, fitted without training.

For residual state ``l`` (numbered as in :mod:`depthlens.model.hidden_states`; state ``l ≥ 1`` is
the output of block ``l − 1``) the lens holds

    ``J_l = E_prompt[ 1/|V| · Σ_{t ∈ V} Σ_{t' ∈ V} ∂h_L[t'] / ∂h_l[t] ]``,

the Jacobian of the last block's output ``h_L`` (before the final norm) with respect to state
``l``, summed over target positions ``t'``, averaged over source positions ``t`` and prompts
(``V`` = the positions after the first ``skip_first`` and before the last). A state ``h [..., d]``
reads as ``decode(J_l h)``: the model's final norm and unembedding applied to the transported
state, logits ``[..., vocab]``. ``J = I`` is the logit lens; state ``L`` is always read through the
identity, and so is any state the lens holds no matrix for (:attr:`JacobianLens.identity_layers`:
state ``0`` of a lens read from the reference ``.pt`` format, whose first layer is block 0's
output). Fitting lives in :mod:`depthlens.lenses.jacobian_fit`.

Files: a depthlens folder (``config.json`` with ``"kind": "jacobian"`` and the model's fingerprint,
``model.safetensors`` holding float32 ``J.{state}``; :mod:`depthlens.lenses.lens_file`), or the
reference artifact ``.pt`` (:mod:`depthlens.lenses.jacobian_artifact`). :func:`load_jacobian_lens`
reads either, :func:`detect` recognises the ``.pt`` file for the readout registry.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from depthlens._version import __version__
from depthlens.errors import LensFileError
from depthlens.lenses.jacobian_artifact import read_artifact, write_artifact
from depthlens.lenses.lens_file import CONFIG_NAME, fingerprint, model_info, read_lens_dir, write_lens_dir
from depthlens.lenses.readout import Lens, model_parts
from depthlens.model.architecture import ModelParts

KIND = "jacobian"


class JacobianLens(Lens):
    """A fitted Jacobian lens: ``matrices[l]`` (``[d, d]``, float32) transports state ``l`` to the
    space of the last block's output; decoding is the model's own.

    ``n_prompts`` is how many prompts the fit averaged; ``fit_info`` records how it was fitted
    (positions skipped, tokens, seconds, source). Build one with
    :func:`~depthlens.lenses.jacobian_fit.fit_jacobian_lens` or :func:`load_jacobian_lens`.
    """

    kind = KIND

    def __init__(
        self,
        model: nn.Module | ModelParts,
        matrices: Mapping[int, torch.Tensor],
        *,
        n_prompts: int,
        fit_info: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(model)
        d, device = self.parts.d_model, self.parts.unembedding.weight.device
        for state, matrix in matrices.items():
            if not 0 <= state < self.num_layers:
                raise LensFileError(
                    f"a Jacobian lens has matrices for states 0 … {self.num_layers - 1} of this model, not {state}"
                )
            if tuple(matrix.shape) != (d, d):
                raise LensFileError(f"the J-lens matrix of state {state} is {tuple(matrix.shape)}, expected ({d}, {d})")
            self.register_buffer(_buffer(state), matrix.detach().to(device, torch.float32).clone())
        self.states = sorted(int(state) for state in matrices)
        self.n_prompts = int(n_prompts)
        self.fit_info: dict[str, Any] = dict(fit_info or {})

    @property
    def identity_layers(self) -> list[int]:
        """States ``0 … L − 1`` without a matrix, read through the identity as the logit lens reads them."""
        return [state for state in range(self.num_layers) if state not in self.states]

    def matrix(self, layer: int) -> torch.Tensor | None:
        """``J_layer [d, d]`` (float32), or ``None`` where the lens reads ``layer`` through the identity."""
        return getattr(self, _buffer(layer)) if layer in self.states else None

    def transform(self, hidden: torch.Tensor, layer: int) -> torch.Tensor:
        """``J_layer h`` for ``h [..., d]`` (float32); ``h`` itself at a layer without a matrix."""
        matrix = self.matrix(layer)
        if matrix is None:
            return hidden
        return hidden.to(matrix.device, torch.float32) @ matrix.T

    def model_info(self) -> dict[str, Any]:
        """What identifies the model this lens decodes (stored in ``config.json``)."""
        return model_info(self.parts)

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write ``config.json`` + ``model.safetensors`` (float32 ``J.{state}``) atomically into ``directory``."""
        config = {
            "kind": KIND,
            "lens_type": KIND,
            "library_version": __version__,
            "model": self.model_info(),
            "states": self.states,
            "n_prompts": self.n_prompts,
            "fit": self.fit_info,
        }
        tensors = {f"J.{state}": self.matrix(state) for state in self.states}
        return write_lens_dir(directory, config, tensors)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, model: nn.Module | ModelParts) -> JacobianLens:
        """Load a lens saved by :meth:`save_pretrained` onto ``model``; :class:`LensFileError` if the
        folder is damaged, is another kind of lens, or was fitted for another model."""
        config, tensors = read_lens_dir(directory)
        if config.get("kind") != KIND:
            raise LensFileError(f"{directory} holds a {config.get('kind')!r} lens, not a {KIND!r} lens")
        states = config.get("states")
        expected = {f"J.{state}" for state in states} if isinstance(states, list) else set()
        if not expected or expected != set(tensors):
            raise LensFileError(
                f"{directory}: the matrices in the weights ({sorted(tensors)[:3]}) do not match the states "
                f"in {CONFIG_NAME} ({states}); save or copy the lens again"
            )
        parts, found = model_parts(model), config.get("model", {})
        if found.get("fingerprint") != fingerprint(parts):
            raise LensFileError(
                f"the J-lens in {directory} was fitted for {found.get('name_or_path', '?')!r} "
                f"(fingerprint {str(found.get('fingerprint', '?'))[:12]}), but the model given is "
                f"{parts.model_name!r} (fingerprint {fingerprint(parts)[:12]}); load the model it "
                "was fitted for or fit a new lens"
            )
        lens = cls(parts, {int(name.split(".")[1]): t for name, t in tensors.items()},
                   n_prompts=int(config.get("n_prompts", 0)), fit_info=config.get("fit"))
        _check_finite(directory, lens)
        return lens

    def save_artifact(self, path: str | os.PathLike, *, dtype: torch.dtype = torch.float16) -> Path:
        """Write the reference ``.pt`` artifact (matrices in ``dtype``, float16 by default as the
        reference writes them). The format has no slot for state 0, so its matrix is left out. The
        model is named under ``"depthlens_model"``: transformer-lens compares ``"model_name"`` with
        its own name for the model, a Hub id, and refuses a file whose name differs."""
        matrices = {state: self.matrix(state) for state in self.states if state > 0}
        metadata = {"library": "depthlens", "library_version": __version__,
                    "depthlens_model": self.parts.model_name, "fingerprint": fingerprint(self.parts)}
        return write_artifact(path, matrices, n_prompts=self.n_prompts, d_model=self.parts.d_model,
                              metadata=metadata, dtype=dtype)

    @classmethod
    def from_artifact(cls, path: str | os.PathLike, model: nn.Module | ModelParts) -> JacobianLens:
        """Read a reference ``.pt`` artifact onto ``model``: artifact layer ``l`` (block ``l``'s output)
        becomes state ``l + 1``; matrices are widened to float32. :class:`LensFileError` if the file
        is not an artifact or its shapes do not fit the model."""
        artifact = read_artifact(path, model_parts(model))
        lens = cls(model, artifact.matrices, n_prompts=artifact.n_prompts,
                   fit_info={"source": "reference artifact", "metadata": artifact.metadata})
        _check_finite(path, lens)
        return lens


def _buffer(state: int) -> str:
    return f"jacobian_{state}"


def _check_finite(where: str | os.PathLike, lens: JacobianLens) -> None:
    for state in lens.states:
        if not torch.isfinite(lens.matrix(state)).all():
            raise LensFileError(f"{where}: the J-lens matrix of state {state} holds NaN or infinite values")


def detect(path: Path) -> bool:
    """Whether ``path`` looks like a reference J-lens artifact: a ``.pt`` file in PyTorch's zip format."""
    if not (path.is_file() and path.suffix == ".pt" and zipfile.is_zipfile(path)):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("/data.pkl") or name == "data.pkl" for name in archive.namelist())


def load_jacobian_lens(path: Path, parts: ModelParts) -> JacobianLens:
    """The J-lens saved at ``path`` on the model of ``parts``: a depthlens folder or a reference ``.pt``."""
    path = Path(path)
    if path.is_dir():
        return JacobianLens.from_pretrained(path, parts)
    return JacobianLens.from_artifact(path, parts)


__all__ = ["KIND", "JacobianLens", "detect", "load_jacobian_lens"]
