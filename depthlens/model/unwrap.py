"""Accept the model objects of other interpretability toolkits where a Hugging Face model goes.

depthlens reads and hooks a Hugging Face causal LM. Two toolkits wrap one:

- transformer-lens 4.3's ``TransformerBridge`` keeps it as ``.original_model`` (the bridge swaps
  some of its modules for wrappers that call the originals, so the numbers are the model's own);
- nnsight's ``LanguageModel`` (and every ``NNsight`` envoy) keeps it as ``._module``.

:func:`unwrap_model` returns the model inside, found by the attribute names in
:data:`PEER_WRAPPERS`; each public function that takes a model calls it once where the model enters.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from depthlens.errors import UnsupportedModelError


@dataclass(frozen=True)
class PeerWrapper:
    """Another toolkit's model object and the attribute under which it keeps the Hugging Face model."""

    name: str
    attribute: str


PEER_WRAPPERS: tuple[PeerWrapper, ...] = (
    PeerWrapper("a transformer-lens TransformerBridge", "original_model"),
    PeerWrapper("an nnsight LanguageModel", "_module"),
)
"""The wrappers :func:`unwrap_model` opens, tried in order. An attribute counts only where the
object's class or its own ``__dict__`` defines it, so a Hugging Face model with a submodule of that
name, or a wrapper that forwards unknown attributes to the model, is not mistaken for another."""

_MAX_DEPTH = 3
"""How many wrappers deep :func:`unwrap_model` looks (an nnsight envoy around a bridge is two)."""

ACCEPTED = (
    "a Hugging Face causal LM (transformers' PreTrainedModel, e.g. from depthlens.load_model or "
    f"AutoModelForCausalLM.from_pretrained), or {' or '.join(peer.name for peer in PEER_WRAPPERS)} that wraps one"
)
"""What :func:`unwrap_model` accepts, in words, for error messages."""


def unwrap_model(model: object) -> nn.Module:
    """The Hugging Face model inside ``model``: ``model`` itself if it is one, else the model that a
    wrapper of :data:`PEER_WRAPPERS` holds (unwrapped again if that is a wrapper too).

    Raises :class:`UnsupportedModelError`, naming what was passed and what is accepted, for
    anything else (a string, a bare ``nn.Module``, a wrapper without a local PyTorch model)."""
    current = model
    for _ in range(_MAX_DEPTH + 1):
        peer = next((p for p in PEER_WRAPPERS if _defines(current, p.attribute)), None)
        if peer is None:
            if _is_causal_lm(current):
                return current
            break
        try:
            current = getattr(current, peer.attribute)
        except AttributeError as error:
            raise UnsupportedModelError(
                f"{_describe(model)} holds no local PyTorch model to read ({error}); pass {ACCEPTED}"
            ) from None
    hint = f"; to load {model!r} by name, call depthlens.load_model({model!r}) first" if isinstance(model, str) else ""
    raise UnsupportedModelError(f"depthlens cannot read {_describe(model)}: pass {ACCEPTED}{hint}")


def _defines(obj: object, attribute: str) -> bool:
    """Whether ``obj``'s class (or one it inherits from) or its own ``__dict__`` defines ``attribute``."""
    return any(attribute in vars(cls) for cls in type(obj).__mro__) or attribute in getattr(obj, "__dict__", {})


def _is_causal_lm(obj: object) -> bool:
    """Duck-typed: a module with a ``config`` and the embedding accessors of transformers' models."""
    return isinstance(obj, nn.Module) and all(
        _defines(obj, name) for name in ("config", "get_input_embeddings", "get_output_embeddings")
    )


def _describe(obj: object) -> str:
    """``obj``'s class with its module, e.g. ``a torch.nn.modules.linear.Linear``."""
    cls = type(obj)
    return f"a {cls.__module__}.{cls.__qualname__}" if cls.__module__ != "builtins" else f"a {cls.__name__}"


__all__ = ["ACCEPTED", "PEER_WRAPPERS", "PeerWrapper", "unwrap_model"]
