"""Generation from a layer: sample each next token from a readout's distribution at layer ``l``.

The prompt is run once (the prefill) into the model's own key–value cache; after that only the
newly sampled token is fed, with the attention mask grown by one and explicit position ids
(``cumsum(mask) − 1``), so left-padded batches generate exactly as each text would alone. At
every step the residual state ``l`` of the last position is decoded by the readout (the logit
lens, a tuned lens, an attribute lens…) and the next token is drawn greedily or by temperature,
top-k and top-p sampling. ``use_cache=False`` reruns the whole sequence at every step instead (the
slow reference the tests compare with).

Edits of the forward pass (:mod:`depthlens.model.hooks`) can be given; one made with
``once=True`` applies in the prefill only, and later tokens read it through the cache (a
Patchscope's patch).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from depthlens.errors import GenerationError
from depthlens.lenses.readout import Readout, check_layer
from depthlens.model.hooks import Edit, hooked
from depthlens.model.kv_cache import output_cache, with_cache
from depthlens.model.unwrap import unwrap_model

Progress = Callable[[int, int], None]


@dataclass
class Generation:
    """Tokens generated from one layer: ``tokens [batch, new]`` and their log-probabilities under
    the readout ``log_probs [batch, new]`` (nats)."""

    tokens: torch.Tensor
    log_probs: torch.Tensor
    layer: int
    readout: str

    def texts(self, tokenizer: object) -> list[str]:
        """The generated continuations as text."""
        return [tokenizer.decode(row.tolist()) for row in self.tokens]


def left_pad(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, mask)`` ``[batch, seq]`` with each row's padding moved to the left (generation
    appends at the right); a ``None`` mask means no padding."""
    if attention_mask is None:
        return input_ids, torch.ones_like(input_ids, dtype=torch.long)
    mask = attention_mask.long()
    if input_ids.shape != mask.shape:
        raise GenerationError(
            f"the attention mask {tuple(mask.shape)} does not match the tokens {tuple(input_ids.shape)}"
        )
    if bool((mask.sum(1) == 0).any()):
        raise GenerationError(
            "a prompt of the batch is empty (its mask is all 0): give every prompt at least one token"
        )
    order = torch.argsort(mask, dim=1, stable=True)
    return input_ids.gather(1, order), mask.gather(1, order)


def sample(
    logits: torch.Tensor,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One token per row of ``logits [batch, vocab]``: the argmax for ``temperature == 0``, else a
    draw from ``softmax(logits / temperature)`` kept to the ``top_k`` likeliest tokens and to the
    smallest set whose probability reaches ``top_p``."""
    if temperature == 0:
        return logits.argmax(-1)
    scores = logits.float() / temperature
    if top_k is not None:
        kth = scores.topk(min(top_k, scores.shape[-1]), dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p is not None:
        ordered, index = scores.sort(-1, descending=True)
        before = ordered.softmax(-1).cumsum(-1) - ordered.softmax(-1)
        ordered = ordered.masked_fill(before >= top_p, float("-inf"))
        scores = torch.full_like(scores, float("-inf")).scatter(-1, index, ordered)
    return torch.multinomial(scores.softmax(-1), 1, generator=generator)[:, 0]


def _check(temperature: float, top_k: int | None, top_p: float | None, max_new_tokens: int) -> None:
    if max_new_tokens < 1:
        raise GenerationError(f"generate at least 1 token, not {max_new_tokens}")
    if temperature < 0:
        raise GenerationError(f"the temperature must be 0 (greedy) or more, got {temperature}")
    if top_k is not None and top_k < 1:
        raise GenerationError(f"top-k must be at least 1, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise GenerationError(f"top-p must be in (0, 1], got {top_p}")


def context_length(model: nn.Module) -> int | None:
    """The most tokens ``model`` reads in one sequence (its config's ``max_position_embeddings``,
    which every family's config maps its own name onto: GPT-2's ``n_positions``…), or ``None``
    where the config states no limit (recurrent families)."""
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return limit if isinstance(limit, int) and limit > 0 else None


def check_length(model: nn.Module, prompt_tokens: int, max_new_tokens: int) -> None:
    """Raise :class:`GenerationError` if ``prompt_tokens`` plus ``max_new_tokens`` exceed the
    model's :func:`context_length`; the message gives the most new tokens that fit."""
    limit = context_length(model)
    if limit is not None and prompt_tokens + max_new_tokens > limit:
        room = limit - prompt_tokens
        fix = f"generate at most {room} new tokens" if room > 0 else "shorten the prompt"
        raise GenerationError(f"the prompt has {prompt_tokens} tokens and {max_new_tokens} new ones are asked for, "
                              f"but the model reads at most {limit} tokens: {fix}")


def _decode_last(readout: Readout, state: torch.Tensor, layer: int) -> torch.Tensor:
    """The readout's logits ``[batch, vocab]`` for the last position of ``state [batch, seq, d]``."""
    states: list[torch.Tensor | None] = [None] * (readout.num_layers + 1)
    states[layer] = state[:, -1:]
    _, logits = next(iter(readout.iter_logits(states, [layer])))
    return logits[:, -1].float()


class _Stepper:
    """Runs the model one step at a time and reads residual state ``layer``."""

    def __init__(self, model: nn.Module, readout: Readout, layer: int, edits: Sequence[Edit]) -> None:
        self.model, self.readout, self.layer, self.edits = model, readout, layer, list(edits)
        self.device = readout.parts.embedding.weight.device
        self.positions = "position_ids" in inspect.signature(model.forward).parameters

    def logits(
        self, ids: torch.Tensor, mask: torch.Tensor, cache: object, values: dict | None
    ) -> tuple[torch.Tensor, object]:
        kwargs = (
            {"position_ids": (mask.cumsum(1) - 1).clamp_min(0)[:, -ids.shape[1] :].to(self.device)}
            if self.positions
            else {}
        )
        point = f"resid.{self.layer}"
        if values is None:
            with hooked(self.readout.parts, read=[point], edits=self.edits) as read:
                self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device), use_cache=False, **kwargs)
            return _decode_last(self.readout, read[point], self.layer), None
        output = self.model(
            input_ids=ids.to(self.device),
            attention_mask=mask.to(self.device),
            **with_cache(self.model, cache),
            use_cache=True,
            **kwargs,
        )
        return _decode_last(self.readout, values[point], self.layer), output_cache(output)


@torch.no_grad()
def generate_from_layer(
    model: nn.Module,
    readout: Readout,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    layer: int,
    max_new_tokens: int = 20,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    edits: Sequence[Edit] = (),
    progress: Progress | None = None,
) -> Generation:
    """Generate ``max_new_tokens`` tokens after each prompt of ``input_ids [batch, seq]`` (padding
    marked ``0`` in ``attention_mask``, on either side), each drawn from ``readout`` at ``layer``.

    Raises :class:`~depthlens.errors.LayerError` for a layer outside ``0 … L`` and
    :class:`GenerationError` for bad sampling settings or more tokens than the model's context
    length (:func:`check_length`)."""
    check_layer(layer, readout.num_layers)
    _check(temperature, top_k, top_p, max_new_tokens)
    ids, mask = left_pad(input_ids, attention_mask)
    check_length(model, ids.shape[1], max_new_tokens)
    stepper = _Stepper(unwrap_model(model), readout, layer, edits)
    tokens, log_probs = [], []
    with hooked(readout.parts, read=[f"resid.{layer}"], edits=edits if use_cache else ()) as values:
        logits, cache = stepper.logits(ids, mask, None, values if use_cache else None)
        for step in range(max_new_tokens):
            token = sample(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator).cpu()
            tokens.append(token)
            log_probs.append(logits.log_softmax(-1).cpu().gather(1, token[:, None])[:, 0])
            if progress is not None:
                progress(step + 1, max_new_tokens)
            if step + 1 == max_new_tokens:
                break
            ids = torch.cat([ids, token[:, None]], 1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
            logits, cache = stepper.logits(
                ids[:, -1:] if use_cache else ids, mask, cache, values if use_cache else None
            )
    return Generation(torch.stack(tokens, 1), torch.stack(log_probs, 1), layer, readout.kind)


__all__ = ["Generation", "check_length", "context_length", "generate_from_layer", "left_pad", "sample"]
