"""The readout registry: every kind of readout a lens spec (``--lens``) can name, and its loader.

A spec is ``"logit"`` (the model's own decoding at every layer), the path of a lens folder or
file of a registered kind, or such a folder on the Hugging Face Hub,
``hf:[spaces/|datasets/]OWNER/NAME[/SUBFOLDER][@REVISION]`` (:mod:`depthlens.lenses.hub`). A depthlens lens folder holds ``config.json`` with a top-level
``"kind"`` key (folders written before that key existed are tuned lenses, or name their kind in
``"lens_type"``) beside its safetensors weights. A foreign format without our key is recognised
by the ``detect`` function its kind registered (a tuned-lens folder with ``params.pt``, say).

The built-in kinds are the rows of :data:`BUILTIN_KINDS`: each names its loader (and detector)
as ``"module:attribute"``, imported the first time that kind is needed, so neither this module
nor ``import depthlens`` imports every lens, and no lens module imports this one. A readout
defined anywhere else registers itself with :func:`register_readout` and is then accepted by
every command and the app::

    register_readout("mine", lambda path, parts: MyReadout.load(path, parts))

For the ``depthlens`` command to see it, an installed package names the registering module in
the ``depthlens.readouts`` entry-point group (``[project.entry-points."depthlens.readouts"]
mine = "my_package.my_readout"``); those modules are imported the first time a spec names a kind
that is not registered yet.

:func:`locate` is the one place a spec becomes a local path.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from depthlens.errors import LensFileError
from depthlens.lenses import hub
from depthlens.lenses.logit import LogitLens
from depthlens.lenses.readout import Readout, model_parts
from depthlens.model.architecture import ModelParts

LOGIT = "logit"
"""The spec of the logit lens."""
CONFIG_NAME = "config.json"
"""The file of a lens folder that names its kind."""

ReadoutLoader = Callable[[Path, ModelParts], Readout]
"""Loads the readout saved at a path onto a model's parts; raises :class:`LensFileError` if it cannot."""
Detector = Callable[[Path], bool]
"""Whether a path without our ``"kind"`` key holds a readout of one foreign format."""


@dataclass(frozen=True)
class BuiltinKind:
    """A readout kind of depthlens itself: its loader and optional detector as ``"module:attribute"``
    references, imported on first use."""

    kind: str
    load: str
    detect: str | None = None
    description: str = ""


BUILTIN_KINDS = (
    BuiltinKind("tuned", "depthlens.lenses.tuned:TunedLens.from_pretrained",
                description="tuned lens trained by depthlens train"),
    BuiltinKind("attribute", "depthlens.lenses.attribute:AttributeLens.from_pretrained",
                description="attribute lens saved by depthlens attribute --save-lens"),
    BuiltinKind("tuned-lens", "depthlens.lenses.tuned_lens_format:load_tuned_lens_folder",
                "depthlens.lenses.tuned_lens_format:detect",
                description="tuned-lens package folder (config.json + params.pt), read as a tuned lens"),
    BuiltinKind("jacobian", "depthlens.lenses.jacobian:load_jacobian_lens", "depthlens.lenses.jacobian:detect",
                description="Jacobian lens: a depthlens folder, or a reference .pt artifact (transformer-lens JacobianLens)"),
    BuiltinKind("tuned-mid", "depthlens.lenses.mid:MidTunedLens.from_pretrained",
                description="tuned lens inside the blocks (after attention, before the MLP): depthlens train --site mid"),
)
"""Depthlens's own readout kinds; adding one is one row here."""


@dataclass(frozen=True)
class ReadoutKind:
    """A registered readout kind: how to load it, how to recognise a foreign file of it, and a
    line saying what it is."""

    kind: str
    load: ReadoutLoader
    detect: Detector | None = None
    description: str = ""


ENTRY_POINT_GROUP = "depthlens.readouts"
"""The entry-point group whose modules register readout kinds when imported."""

_REGISTERED: dict[str, ReadoutKind] = {}
"""Kinds registered with :func:`register_readout` and built-in kinds already imported."""
_PLUGINS_IMPORTED: list[str] = []
"""The entry points of :data:`ENTRY_POINT_GROUP` imported so far (they are imported once)."""


def register_readout(kind: str, load: ReadoutLoader, *, detect: Detector | None = None, description: str = "") -> None:
    """Make folders (or files) of readout ``kind`` loadable by every command and the app.

    ``load(path, parts)`` returns the readout saved at ``path`` for the model whose
    :class:`~depthlens.model.architecture.ModelParts` are ``parts``. A folder whose
    ``config.json`` says ``"kind": kind`` goes to ``load``; ``detect(path)`` recognises files of
    a foreign format without that key. Registering a kind again replaces it; ``"logit"`` and the
    built-in kinds cannot be replaced (a :class:`ValueError`).
    """
    if not kind or kind == LOGIT or any(kind == builtin.kind for builtin in BUILTIN_KINDS):
        raise ValueError(f"cannot register a readout kind named {kind!r}: it is empty or built in")
    _REGISTERED[kind] = ReadoutKind(kind, load, detect, description)


def registered_kinds() -> list[str]:
    """Every kind a spec can name: ``"logit"``, the built-in kinds, then the registered ones."""
    return list(dict.fromkeys([LOGIT, *(builtin.kind for builtin in BUILTIN_KINDS), *_REGISTERED]))


def _folder_kinds() -> list[str]:
    return registered_kinds()[1:]


def is_logit(spec: str | os.PathLike) -> bool:
    """Whether ``spec`` names the logit lens (``"logit"``, not a folder of that name: ``./logit``)."""
    return os.fspath(spec) == LOGIT


def locate(spec: str | os.PathLike) -> Path:
    """The local folder or file ``spec`` names: an existing path (which always wins), else a
    Hugging Face Hub spec ``hf:OWNER/NAME[/SUBFOLDER][@REVISION]`` downloaded into
    huggingface_hub's cache (:mod:`depthlens.lenses.hub`); :class:`LensFileError` with the fix if
    neither."""
    path = Path(spec).expanduser()
    if path.exists():
        return path
    if hub.is_hub_spec(spec):
        return hub.download(hub.parse_hub_spec(os.fspath(spec)))
    raise LensFileError(
        f"lens {os.fspath(spec)!r} is neither 'logit' nor an existing lens folder or file: pass --lens logit, "
        f"or a lens folder of a registered kind ({', '.join(_folder_kinds())}; depthlens train writes "
        f"runs/<model>/lens), or a Hugging Face Hub lens as {hub.GRAMMAR}"
    )


def kind_of(path: Path) -> str:
    """The registered kind of the readout saved at ``path``: the ``"kind"`` in its
    ``config.json``, else the kind whose detector recognises it, else ``"lens_type"`` or
    ``"tuned"`` for a depthlens folder written before kinds were recorded.

    Raises :class:`LensFileError` for a path no registered kind recognises.
    """
    config = _read_config(path / CONFIG_NAME) if path.is_dir() and (path / CONFIG_NAME).is_file() else None
    declared = config.get("kind") if config else None
    if isinstance(declared, str):
        if declared not in _folder_kinds():
            _import_plugins()
        if declared not in _folder_kinds():
            raise LensFileError(
                f"{path} holds a readout of kind {declared!r}, which nothing has registered (registered: "
                f"{', '.join(_folder_kinds())}): import the module that registers it, or install the package "
                f"that names it in the {ENTRY_POINT_GROUP!r} entry points"
            )
        return declared
    _import_plugins()
    for kind in _folder_kinds():
        detect = _kind(kind).detect
        if detect is not None and detect(path):
            return kind
    if config is not None and config.get("format") == "depthlens-lens":
        return str(config.get("lens_type", "tuned"))
    what = "folder" if path.is_dir() else "file"
    raise LensFileError(
        f"{path} is a {what} that no registered readout kind recognises ({', '.join(_folder_kinds())}): "
        "pass --lens logit, or a lens folder that holds a config.json naming its kind"
    )


def check_spec(spec: str | os.PathLike) -> str:
    """The kind of readout ``spec`` names, found from its files alone, before any model is loaded;
    :class:`LensFileError` for a spec that names none (the weights are checked when loaded)."""
    return LOGIT if is_logit(spec) else kind_of(locate(spec))


def load_readout(spec: str | os.PathLike, model: nn.Module | ModelParts) -> Readout:
    """The readout ``spec`` names, on ``model`` (a Hugging Face model or its
    :class:`~depthlens.model.architecture.ModelParts`): a
    :class:`~depthlens.lenses.logit.LogitLens` for ``"logit"``, else the readout saved at that path
    by its kind's loader.

    Raises :class:`LensFileError` for a spec that names nothing, a damaged lens, a lens made
    for another model, or one whose ``config.json`` records another model shape than its weights
    fit.
    """
    parts = model_parts(model)
    if is_logit(spec):
        return LogitLens(parts)
    path = locate(spec)
    kind = kind_of(path)
    readout = _kind(kind).load(path, parts)
    if not isinstance(readout, Readout):
        raise TypeError(f"the loader of readout kind {kind!r} returned a {type(readout).__name__}, not a Readout")
    _check_recorded_model(path, readout, parts)
    return readout


def _check_recorded_model(path: Path, readout: Readout, parts: ModelParts) -> None:
    """:class:`LensFileError` where the lens folder's ``config.json`` records a model of another
    shape (``"model"``: ``num_layers``, ``d_model``, ``vocab_size``) than the one given, or the
    loaded readout has another number of layers: the weights may fit while the record lies (an
    edited config), and a lens is refused rather than trusted on either."""
    config = _read_config(path / CONFIG_NAME) if path.is_dir() and (path / CONFIG_NAME).is_file() else {}
    recorded = config.get("model")
    recorded = recorded if isinstance(recorded, dict) else {}
    actual = {"num_layers": parts.num_layers, "d_model": parts.d_model, "vocab_size": parts.vocab_size}
    for key, value in actual.items():
        if recorded.get(key, value) != value:
            raise LensFileError(
                f"{path / CONFIG_NAME} says the lens is for a model with {key} = {recorded[key]}, but the model given "
                f"has {value}: the config was edited or belongs to another lens; copy or save the lens again"
            )
    if readout.num_layers != parts.num_layers:
        raise LensFileError(
            f"{path} holds a readout of {readout.num_layers} layers, but the model given has {parts.num_layers}: "
            "load the model the lens was made for"
        )


def _kind(kind: str) -> ReadoutKind:
    """The registered kind ``kind``, importing a built-in one on first use."""
    if kind not in _REGISTERED:
        builtin = next(b for b in BUILTIN_KINDS if b.kind == kind)
        detect = _resolve(builtin.detect) if builtin.detect else None
        _REGISTERED[kind] = ReadoutKind(kind, _resolve(builtin.load), detect, builtin.description)
    return _REGISTERED[kind]


def _import_plugins() -> None:
    """Import each module of the :data:`ENTRY_POINT_GROUP` entry points not imported yet; each
    registers its kinds."""
    for entry in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if entry.value not in _PLUGINS_IMPORTED:
            _PLUGINS_IMPORTED.append(entry.value)
            entry.load()


def _resolve(reference: str) -> Callable:
    """The object a ``"module:attribute.path"`` reference names, importing the module."""
    module, _, attributes = reference.partition(":")
    found: object = importlib.import_module(module)
    for name in attributes.split("."):
        found = getattr(found, name)
    return found  # type: ignore[return-value]


def _read_config(path: Path) -> dict:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise LensFileError(f"{path} cannot be read as JSON ({error}); the lens is damaged, save or copy it again") from None
    return config if isinstance(config, dict) else {}


__all__ = [
    "BUILTIN_KINDS",
    "ENTRY_POINT_GROUP",
    "LOGIT",
    "BuiltinKind",
    "Detector",
    "ReadoutKind",
    "ReadoutLoader",
    "check_spec",
    "is_logit",
    "kind_of",
    "load_readout",
    "locate",
    "register_readout",
    "registered_kinds",
]
