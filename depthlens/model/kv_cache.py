"""The key–value cache of a forward pass, passed and read under the name the model's transformers
version uses.

transformers 5 renamed the forward argument and output field ``past_key_values`` to ``cache``; the
old name still works but prints a ``FutureWarning`` (and a log line) on every command that reuses a
cache (generation, task scoring, the attribute and Jacobian lenses). Asking the model's own
``forward`` signature which name it takes keeps older transformers releases, and model classes
that still take ``past_key_values``, working without the warning.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from depthlens.errors import UnsupportedModelError


def cache_argument(model: torch.nn.Module) -> str:
    """``"cache"`` where ``model.forward`` takes that argument, else ``"past_key_values"``."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def with_cache(model: torch.nn.Module, cache: object) -> dict[str, Any]:
    """The keyword arguments that hand ``cache`` (a transformers ``Cache``, or ``None`` for none)
    to ``model``'s forward pass: ``{"cache": cache}`` or ``{"past_key_values": cache}``."""
    return {cache_argument(model): cache}


def output_cache(output: Any) -> Any:
    """The key–value cache a forward pass run with ``use_cache=True`` returned, read from the
    ``cache`` field of newer transformers outputs or ``past_key_values`` of older ones.

    Raises :class:`~depthlens.errors.UnsupportedModelError` where there is none (a recurrent model
    such as RWKV returns its state under another name, and a cached step without it would see only
    its new token), and for a cache that stayed empty through the forward pass: the model's
    attention did not fill it (a transformer-lens bridge's attention reads the cache under
    transformers 4's names, so under transformers 5 every cached step would attend to its own token
    alone). Decoding on from either would be silently wrong."""
    for name in ("cache", "past_key_values"):
        if name in output.keys():  # noqa: SIM118 (``in output`` maps the old name to the new one, and warns)
            cache = output[name]
            length = getattr(cache, "get_seq_length", None)
            if length is not None and length() == 0:
                raise UnsupportedModelError(
                    "this model's attention left its key-value cache empty (a transformer-lens TransformerBridge "
                    "does so under transformers 5), so cached decoding would be wrong: pass a Hugging Face model "
                    "that no bridge has wrapped (booting a bridge rewrites the model it wraps; load a fresh copy), "
                    "or turn the cache off where the function offers it (use_cache=False)")
            return cache
    raise UnsupportedModelError(
        "this model returned no key-value cache (a recurrent state, such as RWKV's, is not one), so cached "
        "decoding is not available for it: turn the cache off where the function offers it (use_cache=False)")


__all__ = ["cache_argument", "output_cache", "with_cache"]
