"""Lens directories on disk: ``config.json`` + ``model.safetensors``, never a pickle.

``config.json`` records which model the lens belongs to (a fingerprint of every weight that
decodes the residual stream), its shapes, the library version, training metadata, and the
SHA-256 of ``model.safetensors`` so that a truncated or edited file is caught before use.
Both files are written to a temporary directory first and moved into place, so a crash never
leaves half a lens behind.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

from depthlens.atomic import write_dir
from depthlens.errors import LensFileError
from depthlens.model.architecture import ModelParts

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT = "depthlens-lens"
FORMAT_VERSION = 1


def fingerprint(parts: ModelParts) -> str:
    """SHA-256 over the full final-norm and unembedding weights and the logit transforms.

    Weights are hashed after rounding to bfloat16, so one model loaded in float32 or bfloat16
    gets one fingerprint, while any real change to the decoder changes it. A float16 copy gets
    another: rounding through float16 first moves about 6% of the weights to a neighbouring
    bfloat16 value, so load the model in float32 or bfloat16 to use its lenses.
    """
    digest = hashlib.sha256()
    for name, tensor in parts.decoding_tensors():
        rounded = tensor.detach().to("cpu", torch.bfloat16).contiguous()
        digest.update(f"{name}:{tuple(rounded.shape)};".encode())
        digest.update(rounded.view(torch.int16).numpy().tobytes())
    constants = (parts.logit_multiplier, parts.logit_divisor, parts.logit_softcap)
    digest.update(repr(constants).encode())
    return digest.hexdigest()


def model_info(parts: ModelParts) -> dict[str, Any]:
    """What identifies the model a lens decodes, as its ``config.json`` stores it: name, family,
    ``L``, ``d``, vocabulary size and :func:`fingerprint`."""
    return {
        "name_or_path": parts.model_name,
        "model_type": parts.model_type,
        "num_layers": parts.num_layers,
        "d_model": parts.d_model,
        "vocab_size": parts.vocab_size,
        "fingerprint": fingerprint(parts),
    }


def write_lens_dir(directory: str | os.PathLike, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Path:
    """Atomically write ``config`` and ``tensors`` as a lens directory; returns its path."""
    payload = save({name: t.detach().to("cpu").contiguous() for name, t in tensors.items()})
    config = {**config, "format": FORMAT, "format_version": FORMAT_VERSION,
              "weights_sha256": hashlib.sha256(payload).hexdigest()}
    files = {WEIGHTS_NAME: payload, CONFIG_NAME: (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()}
    return write_dir(directory, files)


def read_lens_dir(directory: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read and verify a lens directory; returns ``(config, tensors)``.

    Raises :class:`LensFileError` if a file is missing, the config is not a depthlens lens, or the
    weights do not match the checksum in the config (truncated or tampered).
    """
    path = Path(directory)
    config_path, weights_path = path / CONFIG_NAME, path / WEIGHTS_NAME
    for required in (config_path, weights_path):
        if not required.is_file():
            raise LensFileError(f"{path} is not a lens directory: {required.name} is missing")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise LensFileError(f"{config_path} is not valid JSON ({error}); the lens is damaged, train or copy it again") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise LensFileError(f"{config_path} is not a depthlens lens config (no \"format\": \"{FORMAT}\")")
    if config.get("format_version", 0) > FORMAT_VERSION:
        raise LensFileError(
            f"{path} uses lens format {config['format_version']}, newer than this depthlens "
            f"understands ({FORMAT_VERSION}); upgrade depthlens"
        )
    payload = weights_path.read_bytes()
    if hashlib.sha256(payload).hexdigest() != config.get("weights_sha256"):
        raise LensFileError(
            f"{weights_path} does not match the checksum in {CONFIG_NAME}: the file is truncated "
            "or was modified; train or copy the lens again"
        )
    try:
        tensors = load(payload)
    except SafetensorError as error:
        raise LensFileError(f"{weights_path} is not a valid safetensors file ({error})") from None
    return config, tensors
