"""The tuned lens (Belrose et al. 2023): a per-layer affine translator before the model's decoding.

Layer ``l`` (``0 ≤ l < L``) maps a state ``h [..., d]`` to ``h + A_l h + b_l`` and decodes it with
the model's final norm and unembedding into logits ``[..., vocab]``. Translators start at zero, so
an untrained tuned lens *is* the logit lens; layer ``L`` has no translator, since the model's own
decoding is already exact there. Lenses are saved as a directory (``config.json`` +
``model.safetensors``, see :mod:`depthlens.lenses.lens_file`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from depthlens._version import __version__
from depthlens.errors import LensFileError
from depthlens.lenses.lens_file import model_info, read_lens_dir, write_lens_dir
from depthlens.lenses.readout import Lens
from depthlens.model.architecture import ModelParts
from depthlens.model.precision import full_precision


class TunedLens(Lens):
    """One affine translator per layer, trained so each layer's decoding matches the final output.

    ``translators[l]`` maps state ``l`` to ``h + A_l h + b_l`` (weights ``A_l: [d, d]``,
    ``b_l: [d]``, float32). Save with :meth:`save_pretrained`, load with :meth:`from_pretrained`.
    """

    kind = "tuned"

    def __init__(self, model: nn.Module | ModelParts, training: dict[str, Any] | None = None) -> None:
        super().__init__(model)
        d = self.parts.d_model
        device = self.parts.unembedding.weight.device
        self.translators = nn.ModuleList(nn.Linear(d, d, device=device) for _ in range(self.num_layers))
        for translator in self.translators:
            nn.init.zeros_(translator.weight)
            nn.init.zeros_(translator.bias)
        self.training_info: dict[str, Any] = dict(training or {})

    def transform(self, hidden: torch.Tensor, layer: int) -> torch.Tensor:
        """``h + A_l h + b_l`` for ``h [..., d]`` at ``layer < L`` (float32, even inside a bfloat16
        :func:`~depthlens.model.precision.computing_in` block: :func:`~depthlens.model.precision.full_precision`);
        ``h`` itself at ``L``."""
        if layer == self.num_layers:
            return hidden
        translator = self.translators[layer]
        hidden = hidden.to(translator.weight.device, translator.weight.dtype)
        with full_precision(hidden.device):
            return hidden + translator(hidden)

    def model_info(self) -> dict[str, Any]:
        """What identifies the model this lens decodes (stored in ``config.json``)."""
        return model_info(self.parts)

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write ``config.json`` (with ``"kind": "tuned"``, which the readout registry reads) +
        ``model.safetensors`` atomically into ``directory``."""
        config = {
            "kind": self.kind,
            "lens_type": self.kind,
            "library_version": __version__,
            "model": self.model_info(),
            "training": self.training_info,
        }
        return write_lens_dir(directory, config, self.state_dict())

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, model: nn.Module | ModelParts) -> TunedLens:
        """Load a lens saved by :meth:`save_pretrained` onto ``model``.

        Raises :class:`LensFileError` if the directory is damaged or the lens was trained for a
        different model (its fingerprint names both).
        """
        config, tensors = read_lens_dir(directory)
        lens = cls(model, training=config.get("training"))
        others = {config.get(key, cls.kind) for key in ("kind", "lens_type")} - {cls.kind}
        if others:
            raise LensFileError(f"{directory} holds a {others.pop()!r} lens, not a {cls.kind!r} lens")
        expected, actual = config.get("model", {}), lens.model_info()
        if expected.get("fingerprint") != actual["fingerprint"]:
            raise LensFileError(
                f"the lens in {directory} was trained for {_describe(expected)}, "
                f"but the model given is {_describe(actual)}; load the model it was trained for "
                "or train a new lens"
            )
        _check_tensors(directory, tensors, lens.state_dict())
        lens.load_state_dict(tensors)
        return lens


def _describe(info: dict[str, Any]) -> str:
    return (
        f"{info.get('name_or_path', '?')!r} ({info.get('model_type', '?')}, "
        f"{info.get('num_layers', '?')} layers, vocab {info.get('vocab_size', '?')}, "
        f"fingerprint {str(info.get('fingerprint', '?'))[:12]})"
    )


def _check_tensors(directory: str | os.PathLike, found: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    missing, extra = sorted(expected.keys() - found.keys()), sorted(found.keys() - expected.keys())
    if missing or extra:
        raise LensFileError(f"{directory} has the wrong tensors (missing {missing[:3]}, unexpected {extra[:3]})")
    for name, tensor in found.items():
        if tensor.shape != expected[name].shape:
            raise LensFileError(
                f"{directory}: tensor {name} has shape {tuple(tensor.shape)}, expected {tuple(expected[name].shape)}"
            )
        if not torch.isfinite(tensor).all():
            raise LensFileError(f"{directory}: tensor {name} holds NaN or infinite values")


__all__ = ["TunedLens"]
