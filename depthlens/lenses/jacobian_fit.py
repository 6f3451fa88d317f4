"""Fit a Jacobian lens (:mod:`depthlens.lenses.jacobian`): exact Jacobians, a few backward passes
per batch of prompts.

For one prompt of ``T`` tokens the source and target positions are ``V = [s, T − 1)`` (``s`` =
``skip_first``, as in the reference estimator: the first positions are attention sinks, the last
has no next token). Row ``i`` of ``J_l`` is ``1/|V| · Σ_{t ∈ V} ∂(Σ_{t' ∈ V} h_L[t', i]) / ∂h_l[t]``:
one vector–Jacobian product with cotangent ``e_i`` at every target position gives row ``i`` of every
layer at once. Three things make it cheap and keep it exact:

- **All rows of a batch in one backward pass.** The cotangents ``e_i`` for a block of ``i`` go through
  one vmapped backward (``autograd.grad(..., is_grads_batched=True)``) over one forward pass, so a
  batch costs ``⌈d / dims⌉`` backward calls, not ``d``, and the forward is never replicated.
- **The source sum inside autograd.** A zero vector ``z_l [prompts, 1, d]`` is added to state ``l`` at
  every position in ``V`` through the hook layer (:func:`depthlens.model.hooks.add`); the gradient
  with respect to ``z_l`` is the sum over source positions, so no ``[dims, tokens, d]`` gradient is
  kept for any layer.
- **No backward through the skipped prefix.** Positions before ``s`` are run once without gradients
  and passed on as the key–value cache; only ``V`` is run with gradients. A gradient at a position
  before ``s`` could only reach other positions before ``s``, which are never sources, so nothing is
  lost; the last position is not run at all (causal attention: no earlier position sees it).

Model weights are frozen during the fit and restored after; the attention runs as ``"eager"``
(vmapped backward has no batching rule for PyTorch's fused CPU attention and loops over the
cotangents one by one) and is restored after.
Gradients are in the model's dtype, sums in float32, as in the reference.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from depthlens.errors import TrainingError
from depthlens.lenses.jacobian import JacobianLens
from depthlens.model.architecture import ModelParts, find_parts
from depthlens.model.hooks import add, hooked
from depthlens.model.kv_cache import output_cache, with_cache
from depthlens.model.unwrap import unwrap_model

DEFAULT_SKIP_FIRST = 16
"""Leading positions excluded from sources and targets, as in the reference estimator."""
DEFAULT_MAX_SEQ_LEN = 128
"""Prompts are cut to this many tokens, as in the reference estimator."""
ROW_BUDGET = 1024
"""Cotangent rows (dims × prompts × positions) per backward call when ``dims`` is not given: the
backward's largest temporaries are ``ROW_BUDGET × d_ff`` values. On one CPU thread the size hardly
matters: on smollm2-135m (a 23-position prompt) the CPU time per cotangent was the same within 10 %
from 8 to 176 dims per call (184 to 4048 rows), and 15 % higher at 4 dims. On a GPU pass
``dims=d``: one call per batch.

On one CPU thread 60–70 % of a fit is the float32 matrix products no exact reverse-mode fit can
skip (``d`` cotangents through every linear layer above the first source state, at every fitted
position; ``benchmarks/jacobian_lens.py`` measures this floor), the rest autograd's elementwise
work (norm, activation, rotary and softmax backward, gradient sums). Legacy batched gradients and
``torch.func.vmap`` over ``torch.func.vjp`` cost the same."""


def fit_jacobian_lens(
    model: nn.Module,
    sequences: Iterable[Sequence[int] | torch.Tensor],
    *,
    states: Iterable[int] | None = None,
    skip_first: int = DEFAULT_SKIP_FIRST,
    max_seq_len: int = DEFAULT_MAX_SEQ_LEN,
    prompt_batch: int = 1,
    dims: int | None = None,
) -> JacobianLens:
    """Fit ``J_l`` for each of ``states`` (default ``0 … L − 1``, where state 0, the embedding output,
    goes beyond the reference's block outputs ``1 … L − 1``; state ``L`` is the identity) on
    ``sequences`` (token ids ``[T]`` each, cut to ``max_seq_len``) of an eval-mode ``model``.

    Sequences of ``T ≤ skip_first + 1`` tokens have no position to fit and are skipped (counted in
    ``fit_info["skipped"]``). ``prompt_batch`` prompts share a forward pass (right-padded; causal
    attention keeps padding out of every real position); ``dims`` cotangents share a backward pass
    (default: as many as :data:`ROW_BUDGET` allows). Raises :class:`TrainingError` if the model is
    in training mode, a state is out of range, or no sequence is long enough.
    """
    model = unwrap_model(model)
    parts = find_parts(model)
    states = sorted(set(range(parts.num_layers) if states is None else states))
    _check_fit(model, parts, states, skip_first, max_seq_len)
    sums = {state: torch.zeros(parts.d_model, parts.d_model) for state in states}
    fitted, skipped, tokens, started = 0, 0, 0, time.perf_counter()
    with _frozen(model), _eager_attention(model):
        for batch in _batches(sequences, max_seq_len, skip_first, prompt_batch):
            if isinstance(batch, int):
                skipped += batch
                continue
            rows = _batch_rows(model, parts, batch, states, skip_first, dims)
            for state in states:
                sums[state] += rows[state]
            fitted += len(batch)
            tokens += sum(len(ids) - 1 - skip_first for ids in batch)
    if fitted == 0:
        raise TrainingError(
            f"no prompt was long enough to fit a J-lens: each needs more than {skip_first + 1} tokens "
            "(pass longer prompts or a smaller skip_first)"
        )
    info = {"source": "depthlens fit", "skip_first": skip_first, "max_seq_len": max_seq_len,
            "skipped": skipped, "positions": tokens, "seconds": round(time.perf_counter() - started, 3),
            "dims": dims}
    return JacobianLens(parts, {state: sums[state] / fitted for state in states}, n_prompts=fitted, fit_info=info)


def _check_fit(model: nn.Module, parts: ModelParts, states: list[int], skip_first: int, max_seq_len: int) -> None:
    if model.training:
        raise TrainingError("fitting a J-lens needs the model in eval mode (dropout off): call model.eval() first")
    bad = [state for state in states if not 0 <= state < parts.num_layers]
    if bad or not states:
        raise TrainingError(
            f"J-lens states {bad or states} are out of range: this model's are 0 … {parts.num_layers - 1} "
            f"(state {parts.num_layers} is the identity)"
        )
    if skip_first < 0 or max_seq_len < skip_first + 2:
        raise TrainingError(
            f"skip_first={skip_first} and max_seq_len={max_seq_len} leave no position to fit: "
            "use skip_first ≥ 0 and max_seq_len ≥ skip_first + 2"
        )


def _batches(
    sequences: Iterable[Sequence[int] | torch.Tensor], max_seq_len: int, skip_first: int, size: int
) -> Iterator[list[torch.Tensor] | int]:
    """Groups of up to ``size`` usable sequences (``[T]`` each, cut to ``max_seq_len``), and, as a
    bare ``int``, the count of each run of skipped short ones."""
    batch: list[torch.Tensor] = []
    for sequence in sequences:
        ids = torch.as_tensor(sequence, dtype=torch.long).reshape(-1)[:max_seq_len]
        if len(ids) <= skip_first + 1:
            yield 1
            continue
        batch.append(ids)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _batch_rows(
    model: nn.Module, parts: ModelParts, batch: list[torch.Tensor], states: list[int], skip: int, dims: int | None
) -> dict[int, torch.Tensor]:
    """``Σ_prompts J_l`` over one batch: ``{state: [d, d]}`` float32 on the CPU."""
    device = parts.embedding.weight.device
    dtype = next(model.parameters()).dtype
    lengths = torch.tensor([len(ids) - 1 - skip for ids in batch])
    suffix = torch.zeros(len(batch), int(lengths.max()), dtype=torch.long)
    for row, ids in enumerate(batch):
        suffix[row, : lengths[row]] = ids[skip:-1]
    cached: dict[str, object] = {"use_cache": False}
    if skip > 0:
        with torch.no_grad():
            prefix = torch.stack([ids[:skip] for ids in batch]).to(device)
            cached = {**with_cache(model, output_cache(model(input_ids=prefix, use_cache=True))), "use_cache": True}
    probes = {state: torch.zeros(len(batch), 1, parts.d_model, device=device, dtype=dtype, requires_grad=True)
              for state in states}
    target_point = f"resid.{parts.num_layers}"
    edits = [add(f"resid.{state}", probe) for state, probe in probes.items()]
    with torch.enable_grad(), hooked(parts, read=[target_point], edits=edits) as values:
        model(input_ids=suffix.to(device), **cached)
    target = values[target_point]
    real = (torch.arange(suffix.shape[1])[None, :] < lengths[:, None]).to(device, dtype)
    return _vjp_rows(target, probes, real, lengths.to(torch.float32), dims)


def _vjp_rows(
    target: torch.Tensor, probes: dict[int, torch.Tensor], real: torch.Tensor, lengths: torch.Tensor, dims: int | None
) -> dict[int, torch.Tensor]:
    """Rows of ``Σ_prompts J_l``: ``target [P, n, d]`` is the last state, ``probes[l] [P, 1, d]`` the
    zero vectors added at state ``l``, ``real [P, n]`` marks real positions, ``lengths [P]`` counts them."""
    prompts, positions, d = target.shape
    step = dims or max(1, min(d, ROW_BUDGET // (prompts * positions)))
    rows = {state: torch.zeros(d, d) for state in probes}
    inputs = list(probes.values())
    for start in range(0, d, step):
        count = min(step, d - start)
        index = torch.arange(count, device=target.device)
        cotangent = target.new_zeros(count, prompts, positions, d)
        cotangent[index, :, :, start + index] = real.expand(count, -1, -1)
        grads = torch.autograd.grad(target, inputs, cotangent, retain_graph=start + count < d, is_grads_batched=True)
        for state, grad in zip(probes, grads):
            per_prompt = grad[:, :, 0, :].float().cpu() / lengths[None, :, None]
            rows[state][start : start + count] = per_prompt.sum(1)
    return rows


@contextmanager
def _frozen(model: nn.Module) -> Iterator[None]:
    """Weights need no gradient during the fit; their flags are restored after."""
    flags = [(parameter, parameter.requires_grad) for parameter in model.parameters()]
    try:
        for parameter, _ in flags:
            parameter.requires_grad_(False)
        yield
    finally:
        for parameter, flag in flags:
            parameter.requires_grad_(flag)


@contextmanager
def _eager_attention(model: nn.Module) -> Iterator[None]:
    """Run attention as ``"eager"`` (plain matmuls, which vmapped backward batches) and restore the
    model's own implementation after; a model that cannot switch keeps its own."""
    config = getattr(model, "config", None)
    before = getattr(config, "_attn_implementation", None)
    switch = before not in (None, "eager") and hasattr(model, "set_attn_implementation")
    if switch:
        try:
            model.set_attn_implementation("eager")
        except (ValueError, ImportError, NotImplementedError):
            switch = False
    try:
        yield
    finally:
        if switch:
            model.set_attn_implementation(before)


__all__ = ["DEFAULT_MAX_SEQ_LEN", "DEFAULT_SKIP_FIRST", "ROW_BUDGET", "fit_jacobian_lens"]
