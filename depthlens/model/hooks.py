"""The one place where depthlens hooks a model's forward pass, to read activations or write them.

Hook points are named strings, in the style of TransformerLens:

- ``"resid.{l}"`` for ``0 ≤ l ≤ L``: residual state ``l`` (numbered as in
  :mod:`depthlens.model.hidden_states`). Writing at ``resid.0`` changes the input of block 0,
  at ``resid.{l}`` (``l ≥ 1``) the output of block ``l − 1``, so every later block and the
  model's own output see the edit.
- ``"attn.{i}"`` and ``"mlp.{i}"`` for ``0 ≤ i < L``: what block ``i``'s attention and MLP
  branches add to the residual stream (after a sandwich norm where the family has one; where the
  family's modules add the residual themselves, as BLOOM's do, it is subtracted). Where a family
  exposes no such module (see ``FamilyRule.attention`` / ``FamilyRule.mlp``) the point does not
  exist.
- ``"heads.{i}"`` and ``"neurons.{i}"`` for ``0 ≤ i < L``: the inputs of block ``i``'s attention
  output projection (the heads' outputs side by side, ``[batch, seq, heads · d_head]``) and of
  its MLP's last projection (the neurons' activations, ``[batch, seq, d_mlp]``), where the family
  has them (``FamilyRule.heads`` / ``FamilyRule.neurons``).

One idiom reads and writes (like nnsight's)::

    with hooked(model, read=["resid.3", "attn.2"], edits=[ablate("resid.5", basis, mean=mu)]) as values:
        model(input_ids)
    values["resid.3"]            # [batch, seq, d], as the forward pass saw it (after any edit)

Every hook is removed when the block exits, also when the forward pass raises. Values are read
*after* the edits at the same point; the forward pass goes on with a copy, so a family that later
updates a tensor in place (Falcon adds attention into its MLP output) does not change what was
read, and gradients with respect to a read value flow through the rest of the pass. :func:`run_with_hooks` wraps the common case.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from depthlens.errors import EditError
from depthlens.model.architecture import ModelParts, find_parts
from depthlens.model.edits import Erasure, check_erasure, derangement, erase
from depthlens.model.unwrap import unwrap_model

Positions = Sequence[int] | torch.Tensor | None


@dataclass(frozen=True)
class Edit:
    """A change to one hook point: ``fn`` maps the selected slice ``[batch, n, d]`` (``n`` the
    chosen ``positions``, default all) to a tensor of the same shape.

    With ``once=True`` it applies to the first forward call only (a generation's prefill; later
    tokens see it through the key–value cache)."""

    point: str
    fn: Callable[[torch.Tensor], torch.Tensor]
    positions: Positions = None
    once: bool = False


def replace(point: str, value: torch.Tensor, positions: Positions = None, *, once: bool = False) -> Edit:
    """Set the state at ``point`` (and ``positions``) to ``value``, broadcastable to ``[batch, n, d]``."""
    return Edit(point, lambda h: value.to(h.device, h.dtype).expand_as(h).clone(), positions, once)


def add(point: str, delta: torch.Tensor, positions: Positions = None, *, once: bool = False) -> Edit:
    """Add ``delta`` (broadcastable to ``[batch, n, d]``) to the state at ``point``."""
    return Edit(point, lambda h: h + delta.to(h.device, h.dtype), positions, once)


def ablate(
    point: str,
    basis: torch.Tensor,
    mode: Erasure = "mean",
    *,
    mean: torch.Tensor | None = None,
    positions: Positions = None,
    generator: torch.Generator | None = None,
) -> Edit:
    """Erase the span of ``basis [k, d]`` (orthonormal rows) at ``point`` with
    :func:`~depthlens.model.edits.erase`. ``resample`` draws each position's component from
    another selected position of the same forward pass (batch and positions flattened)."""

    def fn(h: torch.Tensor) -> torch.Tensor:
        flat = h.reshape(1, -1, h.shape[-1])
        permutation = derangement(flat.shape[1], generator) if mode == "resample" else None
        return erase(flat, basis, mode, mean=mean, permutation=permutation).reshape(h.shape)

    check_erasure(mode, mean)
    return Edit(point, fn, positions)


@dataclass
class HookRun:
    """What :func:`run_with_hooks` returns: the values read and the model's logits."""

    values: dict[str, torch.Tensor]
    """``{point: [batch, seq, d]}`` for every point read."""
    logits: torch.Tensor
    """The model's output logits ``[batch, seq, vocab]`` (after the edits)."""


_BLOCK_KINDS = ("heads", "attn", "neurons", "mlp")
"""The hook points inside each block, in forward order."""
_INPUT_KINDS = ("heads", "neurons")
"""The points read at a module's input rather than its output."""


def points(parts: ModelParts) -> list[str]:
    """Every hook point this model exposes, in forward order."""
    names = ["resid.0"]
    for index in range(parts.num_layers):
        names += [f"{kind}.{index}" for kind in _BLOCK_KINDS if parts.branch(kind, index) is not None]
        names.append(f"resid.{index + 1}")
    return names


def _parse(point: str, parts: ModelParts) -> tuple[str, int]:
    kind, _, number = point.partition(".")
    limit = parts.num_layers if kind == "resid" else parts.num_layers - 1
    if kind not in ("resid", *_BLOCK_KINDS) or not number.lstrip("-").isdigit():
        raise EditError(
            f"unknown hook point {point!r}: use resid.<layer>, or attn, mlp, heads or neurons.<block>"
        )
    index = int(number)
    if not 0 <= index <= limit:
        raise EditError(f"hook point {point!r} is out of range: this model has {kind}.0 … {kind}.{limit}")
    if kind != "resid" and parts.branch(kind, index) is None:
        raise EditError(
            f"hook point {point!r} does not exist: the {parts.model_type} family exposes no {kind} module "
            "(record its path in FamilyRule.attention / .mlp / .heads / .neurons)"
        )
    return kind, index


def _first_tensor(value: object) -> torch.Tensor:
    """The hidden-state tensor in a module's input or output (a tensor, or the first of a tuple)."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    for field in ("hidden_states", "last_hidden_state"):
        hidden = getattr(value, field, None)
        if isinstance(hidden, torch.Tensor):
            return hidden
    raise EditError(f"a hooked module returned {type(value).__name__}, which holds no hidden-state tensor")


def _with_first(value: object, tensor: torch.Tensor) -> object:
    """``value`` with its hidden-state tensor swapped for ``tensor``, keeping its structure."""
    if isinstance(value, torch.Tensor):
        return tensor
    if isinstance(value, tuple):
        return (tensor, *value[1:])
    if isinstance(value, list):
        return [tensor, *value[1:]]
    if isinstance(getattr(value, "hidden_states", None), torch.Tensor):
        value.hidden_states = tensor
    else:
        value.last_hidden_state = tensor
    return value


def _apply(h: torch.Tensor, edit: Edit) -> torch.Tensor:
    """``h [batch, seq, d]`` with ``edit`` applied at its positions."""
    if edit.positions is None:
        new = edit.fn(h)
        _check_shape(new, h, edit)
        return new
    index = torch.as_tensor(edit.positions, dtype=torch.long).reshape(-1)
    seq = h.shape[1]
    if bool(((index < -seq) | (index >= seq)).any()):
        raise EditError(f"positions {index.tolist()} of {edit.point} are out of range for a sequence of {seq} tokens")
    index = (index % seq).to(h.device)
    new_slice = edit.fn(h[:, index])
    _check_shape(new_slice, h[:, index], edit)
    out = h.clone()
    out[:, index] = new_slice
    return out


def _check_shape(new: torch.Tensor, old: torch.Tensor, edit: Edit) -> None:
    if new.shape != old.shape:
        raise EditError(f"the edit at {edit.point} returned shape {tuple(new.shape)}, expected {tuple(old.shape)}")


class _Point:
    """The read and the edits at one hook point, and the hook that applies them."""

    def __init__(self, name: str, values: dict[str, torch.Tensor], read: bool, adds_residual: bool) -> None:
        self.name, self.values, self.read, self.adds_residual = name, values, read, adds_residual
        self.edits: list[Edit] = []
        self.calls = 0

    def transform(self, h: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """Apply the edits to ``h``, record it if read, and return the tensor to pass on."""
        branch = h - residual if residual is not None else h
        self.calls += 1
        for edit in self.edits:
            if not edit.once or self.calls == 1:
                branch = _apply(branch, edit)
        if residual is not None:
            return self._keep(branch) + residual
        return self._keep(branch).clone() if self.read else branch

    def _keep(self, branch: torch.Tensor) -> torch.Tensor:
        """Record ``branch`` if this point is read. The model gets a copy, so a family that later
        updates its tensor in place cannot change the record, and gradients still reach it."""
        if self.read:
            self.values[self.name] = branch
        return branch

    def output_hook(self, _module: nn.Module, args: tuple, kwargs: dict, output: object) -> object:
        residual = None
        if self.adds_residual:
            residual = args[1] if len(args) > 1 else kwargs.get("residual")
        new = self.transform(_first_tensor(output), residual)
        return _with_first(output, new)

    def input_hook(self, _module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if args:
            return (self.transform(_first_tensor(args[0])), *args[1:]), kwargs
        kwargs = dict(kwargs, hidden_states=self.transform(kwargs["hidden_states"]))
        return args, kwargs


@contextmanager
def hooked(
    model: nn.Module | ModelParts, *, read: Iterable[str] = (), edits: Iterable[Edit] = ()
) -> Iterator[dict[str, torch.Tensor]]:
    """Install hooks that read the points in ``read`` and apply ``edits`` during every forward
    pass inside the block; yields the dict ``{point: tensor [batch, seq, d]}`` they fill.

    Unknown or out-of-range points raise :class:`~depthlens.errors.EditError` before any hook is
    installed. All hooks are removed on exit, whatever happens inside the block."""
    parts = model if isinstance(model, ModelParts) else find_parts(model)
    values: dict[str, torch.Tensor] = {}
    table: dict[str, _Point] = {}
    read, edits = list(read), list(edits)
    for name in [*read, *(edit.point for edit in edits)]:
        _parse(name, parts)
        if name not in table:
            table[name] = _Point(name, values, name in read, name.partition(".")[0] in parts.branches_add_residual)
    for edit in edits:
        table[edit.point].edits.append(edit)
    handles = []
    try:
        for name, point in table.items():
            handles.append(_register(parts, name, point))
        yield values
    finally:
        for handle in handles:
            handle.remove()


def _register(parts: ModelParts, name: str, point: _Point) -> torch.utils.hooks.RemovableHandle:
    kind, index = _parse(name, parts)
    if kind == "resid" and index == 0:
        return parts.blocks[0].register_forward_pre_hook(point.input_hook, with_kwargs=True)
    if kind in _INPUT_KINDS:
        return parts.branch(kind, index).register_forward_pre_hook(point.input_hook, with_kwargs=True)
    module = parts.blocks[index - 1] if kind == "resid" else parts.branch(kind, index)
    return module.register_forward_hook(point.output_hook, with_kwargs=True)


def run_with_hooks(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    parts: ModelParts | None = None,
    read: Iterable[str] = (),
    edits: Iterable[Edit] = (),
    **forward_kwargs: object,
) -> HookRun:
    """Run ``model`` once on ``input_ids [batch, seq]`` (no key–value cache) with the given reads
    and edits; returns the values read and the logits ``[batch, seq, vocab]``."""
    model = unwrap_model(model)
    parts = parts or find_parts(model)
    device = parts.embedding.weight.device
    with hooked(parts, read=read, edits=edits) as values:
        output = model(
            input_ids=input_ids.to(device),
            attention_mask=None if attention_mask is None else attention_mask.to(device),
            use_cache=False,
            **forward_kwargs,
        )
    return HookRun(values=values, logits=output.logits)


__all__ = ["Edit", "HookRun", "ablate", "add", "hooked", "points", "replace", "run_with_hooks"]
