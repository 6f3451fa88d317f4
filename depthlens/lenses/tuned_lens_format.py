"""tuned-lens files in and out: the ``config.json`` + ``params.pt`` folders of the tuned-lens package
(Belrose et al. 2023; PyPI ``tuned-lens``, the ``AlignmentResearch/tuned-lens`` Space ``lens/<model>``).

**Layer numbering.** tuned-lens applies translator ``i`` (``0 ≤ i < L``) to
``output_hidden_states[i]`` of a Hugging Face model: ``i = 0`` is the embedding output (after
position embeddings), ``i > 0`` the output of block ``i - 1``. That is exactly depthlens's residual
state ``i`` (:mod:`depthlens.model.hidden_states`), so translator ``i`` becomes translator ``i`` of a
:class:`~depthlens.lenses.tuned.TunedLens`, with the same residual form ``h + W_i h + b_i``
(``W_i [d, d]`` in ``nn.Linear``'s ``[out, in]`` order, ``b_i [d]``). Neither package has a translator
for state ``L``: tuned-lens uses the model's own logits there, depthlens decodes state ``L`` as it is,
which is the same thing. A lens read here is a plain :class:`TunedLens` (float32), so it can be saved
in depthlens's format, or exported back with :func:`export_tuned_lens`.

**Layouts read.**

- tuned-lens 0.1 and 0.2 (2023–): ``params.pt`` holds ``"{i}.weight"``, ``"{i}.bias"`` for
  ``i < L``; ``config.json`` has ``num_hidden_layers``, ``d_model``, ``bias`` and the unembedding hash,
  spelled ``unemebd_hash`` by 0.1.0 (the April 2023 lenses) and ``unembed_hash`` since 0.1.1;
- tuned-lens 0.0.x (early 2023): the whole module's state, ``"input_translator.*"`` for state 0 and
  ``"layer_translators.{j}.*"`` for state ``j + 1``, beside copies of the final norm
  (``"layer_norm.*"``) and unembedding (``"unembedding.weight"``); ``config.json`` has ``num_layers``.
  A ``"layer_translators.{i}.*"`` state without ``input_translator`` is read as translator ``i``.

Weights may be float16, bfloat16 or float32; they are widened to float32. ``params.pt`` is read with
``torch.load(weights_only=True)`` only, so a pickle that holds anything but tensors is refused.

**The unembedding check.** tuned-lens identifies the model a lens was trained for by a hash of its
unembedding matrix: SHA-256 of ``numpy.array_str(W.float().numpy(), precision=1)`` with numpy's
default print options (which summarise a matrix of more than 1000 entries to its corners).
:func:`unembedding_hash` computes the same. A lens whose hash differs from the model's (or, for
0.0.x files, whose stored unembedding differs) was trained for another unembedding: another model,
revision or fine-tune, whose per-layer predictions it will not reproduce. Loading it warns with
:class:`TunedLensHashWarning`, as tuned-lens itself does; shapes that do not fit the model are an
error (:class:`~depthlens.errors.LensFileError`).

**Export.** :func:`export_tuned_lens` writes a depthlens tuned lens in the 0.2 layout, which
tuned-lens 0.2.0's ``TunedLens.from_model_and_pretrained`` loads onto the same model
(``benchmarks/golden/tuned_lens_golden.sh`` checks this with tuned-lens itself).

The readout registry (:mod:`depthlens.lenses.registry`) knows these folders as kind
``"tuned-lens"``: :func:`detect` recognises one, :func:`load_tuned_lens_folder` loads it.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from depthlens.atomic import write_dir
from depthlens.errors import LensFileError
from depthlens.lenses.mid import site_of
from depthlens.lenses.readout import model_parts
from depthlens.lenses.tuned import TunedLens
from depthlens.model.architecture import ModelParts

CONFIG_NAME = "config.json"
PARAMS_NAME = "params.pt"
LENS_TYPE = "linear_tuned_lens"
HASH_KEYS = ("unembed_hash", "unemebd_hash")
"""The hash key as tuned-lens 0.1.1+ spells it, and as 0.1.0 (April 2023) misspelled it."""
_NUMPY_DEFAULT_PRINT = {
    "precision": 8, "threshold": 1000, "edgeitems": 3, "linewidth": 75, "suppress": False, "nanstr": "nan",
    "infstr": "inf", "sign": "-", "floatmode": "maxprec", "legacy": False,
}
"""numpy's default print options, which tuned-lens's hash relies on (whatever the caller set)."""
_NEW_KEY = re.compile(r"^(\d+)\.(weight|bias)$")
_OLD_KEY = re.compile(r"^layer_translators\.(\d+)\.(weight|bias)$")
_INPUT_KEY = re.compile(r"^input_translator\.(weight|bias)$")
_DECODER_COPY = ("layer_norm.", "unembedding.", "unembed.")

__all__ = [
    "TunedLensHashWarning", "detect", "export_tuned_lens", "load_tuned_lens_folder",
    "read_translators", "unembedding_hash",
]


class TunedLensHashWarning(UserWarning):
    """A tuned-lens file made for another unembedding than the model's."""


def unembedding_hash(parts: ModelParts) -> str:
    """tuned-lens's hash of the model's unembedding weight ``[vocab, d]`` (64 hex digits)."""
    weight = parts.unembedding.weight.detach().to("cpu", torch.float32).numpy()
    with np.printoptions(**_NUMPY_DEFAULT_PRINT):
        text = np.array_str(weight, precision=1)
    return hashlib.sha256(text.encode()).hexdigest()


def detect(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a tuned-lens folder: ``config.json`` (without depthlens's ``kind`` or
    ``format`` keys, with ``d_model`` and a layer count) beside ``params.pt``."""
    folder = Path(path)
    if not (folder / CONFIG_NAME).is_file() or not (folder / PARAMS_NAME).is_file():
        return False
    try:
        config = json.loads((folder / CONFIG_NAME).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return (
        isinstance(config, dict) and "kind" not in config and "format" not in config
        and "d_model" in config and ("num_hidden_layers" in config or "num_layers" in config)
    )


def _read_folder(folder: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``config.json`` and the tensors of ``params.pt``, or one clear :class:`LensFileError`."""
    for name in (CONFIG_NAME, PARAMS_NAME):
        if not (folder / name).is_file():
            raise LensFileError(f"{folder} is not a tuned-lens folder: {name} is missing")
    try:
        config = json.loads((folder / CONFIG_NAME).read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise LensFileError(f"{folder / CONFIG_NAME} is not valid JSON ({error}); copy the lens again") from None
    try:
        state = torch.load(folder / PARAMS_NAME, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise LensFileError(
            f"{folder / PARAMS_NAME} holds objects other than tensors; depthlens reads only tensor "
            "files (torch.load weights_only=True): re-save the lens's state dict"
        ) from None
    except (RuntimeError, EOFError, ValueError) as error:
        raise LensFileError(f"{folder / PARAMS_NAME} is not a readable torch file ({error}); copy the lens again") from None
    if not isinstance(config, dict) or not isinstance(state, dict) or not all(
        isinstance(value, torch.Tensor) for value in state.values()
    ):
        raise LensFileError(f"{folder} is not a tuned-lens folder: expected a config object and a dict of tensors")
    return config, state


def _translator_index(key: str, shifted: bool) -> tuple[int, str] | None:
    """``(state index, "weight" | "bias")`` for a translator key, ``None`` for a decoder copy."""
    if key.startswith(_DECODER_COPY):
        return None
    for pattern, offset in ((_NEW_KEY, 0), (_OLD_KEY, 1 if shifted else 0)):
        match = pattern.match(key)
        if match:
            return int(match.group(1)) + offset, match.group(2)
    match = _INPUT_KEY.match(key)
    if match:
        return 0, match.group(1)
    raise LensFileError(f"unexpected tensor {key!r} in a tuned-lens params.pt; this layout is not one depthlens reads")


def _check_config(folder: Path, config: dict[str, Any], parts: ModelParts) -> None:
    """Refuse a lens type or shape that cannot decode ``parts``'s model, in one line."""
    if config.get("lens_type", LENS_TYPE) != LENS_TYPE:
        raise LensFileError(f"{folder} holds a {config['lens_type']!r} lens; depthlens reads only {LENS_TYPE!r} tuned lenses")
    if not config.get("reuse_unembedding", True) or config.get("extra_layers", 0) or not config.get("include_input", True):
        raise LensFileError(
            f"{folder} is a tuned-lens 0.0.x lens with reuse_unembedding=false, extra_layers or "
            "include_input=false; depthlens reads only lenses that decode through the model's own unembedding "
            "and have a translator for the embeddings"
        )
    layers = config.get("num_hidden_layers", config.get("num_layers"))
    width = config.get("d_model")
    if (layers, width) != (parts.num_layers, parts.d_model):
        raise LensFileError(
            f"{folder} is a tuned lens for a model with {layers} layers of width {width} "
            f"({config.get('base_model_name_or_path', '?')!r}), but {parts.model_name!r} has "
            f"{parts.num_layers} layers of width {parts.d_model}; load the model it was made for"
        )


def read_translators(
    folder: str | os.PathLike, parts: ModelParts
) -> tuple[dict[str, Any], list[tuple[torch.Tensor, torch.Tensor]]]:
    """The config and the ``L`` translators ``(W [d, d], b [d])`` (float32, CPU) of a tuned-lens
    folder, indexed by depthlens state (see the module docstring), checked against ``parts``.

    Raises :class:`LensFileError` for a missing or unreadable file, an unknown layout, a missing or
    extra translator, or a shape that does not fit the model.
    """
    folder = Path(folder)
    config, state = _read_folder(folder)
    _check_config(folder, config, parts)
    shifted = any(_INPUT_KEY.match(key) for key in state)
    found: dict[tuple[int, str], torch.Tensor] = {}
    for key, tensor in state.items():
        index = _translator_index(key, shifted)
        if index is not None:
            found[index] = tensor
    d, count = parts.d_model, parts.num_layers
    if sorted({i for i, _ in found}) != list(range(count)):
        raise LensFileError(
            f"{folder}: params.pt has translators for states {sorted({i for i, _ in found})}, "
            f"expected 0 … {count - 1} for this {count}-layer model; the file is damaged or for another model"
        )
    translators = []
    for i in range(count):
        weight = found.get((i, "weight"))
        bias = found.get((i, "bias"), torch.zeros(d) if not config.get("bias", True) else None)
        for name, tensor, shape in (("weight", weight, (d, d)), ("bias", bias, (d,))):
            if tensor is None or tuple(tensor.shape) != shape:
                got = "missing" if tensor is None else f"shape {tuple(tensor.shape)}"
                raise LensFileError(f"{folder}: translator {i} {name} is {got}, expected {shape} for this model")
            if not tensor.is_floating_point() or not torch.isfinite(tensor).all():
                raise LensFileError(f"{folder}: translator {i} {name} is not finite floating point; copy the lens again")
        translators.append((weight.to(torch.float32), bias.to(torch.float32)))
    _check_unembedding(folder, config, state, parts)
    return config, translators


def _check_unembedding(folder: Path, config: dict[str, Any], state: dict[str, torch.Tensor], parts: ModelParts) -> None:
    """Warn (:class:`TunedLensHashWarning`) if the lens was made for another unembedding."""
    meaning = (
        "the lens was trained for another unembedding matrix (another model, revision or fine-tune), "
        "so its per-layer predictions do not apply to this model; load the model it was made for "
        f"({config.get('base_model_name_or_path', '?')!r})"
    )
    stored = next((config[key] for key in HASH_KEYS if config.get(key)), None)
    if stored is not None and str(stored) != unembedding_hash(parts):
        warnings.warn(
            f"{folder}: the lens's unembedding hash {str(stored)[:12]}… differs from this model's "
            f"{unembedding_hash(parts)[:12]}…: {meaning}", TunedLensHashWarning, stacklevel=3,
        )
    # 0.0.x stored a float32 copy of the unembedding: a model loaded in bfloat16 differs from it by
    # its rounding (relative 2⁻⁸), another model by the size of the weights themselves.
    copy = state.get("unembedding.weight")
    weight = parts.unembedding.weight.detach().to("cpu", torch.float32)
    if copy is not None and (copy.shape != weight.shape or not torch.allclose(copy.float(), weight, rtol=1e-2, atol=1e-3)):
        warnings.warn(f"{folder}: the lens's copy of the unembedding differs from this model's: {meaning}",
                      TunedLensHashWarning, stacklevel=3)


def load_tuned_lens_folder(path: str | os.PathLike, parts: nn.Module | ModelParts) -> TunedLens:
    """A tuned-lens folder as a depthlens :class:`TunedLens` on ``parts``'s model (its
    ``training_info`` records where it came from). Raises :class:`LensFileError` as
    :func:`read_translators` does; warns :class:`TunedLensHashWarning` for another unembedding."""
    parts = model_parts(parts)
    config, translators = read_translators(path, parts)
    source = {key: config.get(key) for key in ("base_model_name_or_path", "base_model_revision", "lens_type")}
    lens = TunedLens(parts, training={"imported_from": "tuned-lens", **source})
    with torch.no_grad():
        for translator, (weight, bias) in zip(lens.translators, translators):
            translator.weight.copy_(weight)
            translator.bias.copy_(bias)
    return lens


def export_tuned_lens(lens: TunedLens, folder: str | os.PathLike, dtype: torch.dtype = torch.float32) -> Path:
    """Write ``lens`` as a tuned-lens 0.2 folder (``config.json`` + ``params.pt``, a plain dict of
    ``dtype`` tensors saved with ``torch.save``) that ``TunedLens.from_model_and_pretrained`` of the
    tuned-lens package loads onto the same model. The folder is replaced atomically.

    Raises :class:`~depthlens.errors.LensFileError` for a lens inside blocks (tuned-lens reads only
    block outputs, so its translators would be applied to the wrong states)."""
    if site_of(lens) != "block":
        raise LensFileError(f"a {lens.kind} lens reads states inside blocks, which tuned-lens has no place for: "
                            "export a block-output tuned lens (depthlens train without --site mid)")
    parts = lens.parts
    state: dict[str, torch.Tensor] = {}
    for i, translator in enumerate(lens.translators):
        state[f"{i}.weight"] = translator.weight.detach().to("cpu", dtype).contiguous()
        state[f"{i}.bias"] = translator.bias.detach().to("cpu", dtype).contiguous()
    config = {
        "base_model_name_or_path": parts.model_name, "d_model": parts.d_model,
        "num_hidden_layers": parts.num_layers, "bias": True, "base_model_revision": None,
        "unembed_hash": unembedding_hash(parts), "lens_type": LENS_TYPE,
    }
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return write_dir(folder, {CONFIG_NAME: json.dumps(config, indent=2).encode() + b"\n", PARAMS_NAME: buffer.getvalue()})
