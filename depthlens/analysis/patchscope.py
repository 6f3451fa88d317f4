"""Patchscopes (Ghandeharioun et al. 2024): decode a hidden state by patching it into another prompt.

The residual state ``h`` of a source prompt at ``(layer l, position i)`` is mapped by ``f`` and
written into a target prompt at ``(layer l*, position i*)`` (state numbering as in
:mod:`depthlens.model.hidden_states`: writing state ``l*`` changes what block ``l*`` reads). The
patched target run is then read like any other: its residual states at every layer give a
trajectory under any readout (so a picture), or it generates with the patch applied once in the
prefill and read by later tokens through the key–value cache.

``f`` is the identity, a tuned lens's translator at layer ``l`` (:func:`tuned_map`), or an affine
map fitted by least squares (:func:`fit_affine_map`), which may map between two models of
different widths. Built-in target prompts: :data:`TARGET_PROMPTS`.

The token-identity curve (:func:`token_identity_curve`) carries a 95% percentile-bootstrap interval
per layer that resamples whole source texts, not positions (:func:`text_intervals`): the positions
of one text share its context, so they are not independent draws.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from depthlens.analysis.generate import Generation, generate_from_layer
from depthlens.analysis.trajectory import Trajectory
from depthlens.errors import PatchscopeError
from depthlens.lenses.logit import LogitLens
from depthlens.lenses.readout import Readout, check_layer
from depthlens.lenses.tuned import TunedLens
from depthlens.model.architecture import ModelParts, find_parts
from depthlens.model.hidden_states import HiddenStates, capture
from depthlens.model.hooks import hooked, replace
from depthlens.model.unwrap import unwrap_model
from depthlens.stats.bootstrap import bootstrap_samples, intervals, weighted_means

IDENTITY_PROMPT = "cat -> cat\n1135 -> 1135\nhello -> hello\n?"
"""Token identity: the model continues ``x ->`` with ``x``, so a state patched over ``?`` is read back."""
DESCRIPTION_PROMPT = (
    "Syria: Country in the Middle East\n"
    "Leonardo DiCaprio: American actor\n"
    "Samsung: South Korean multinational major appliance and consumer electronics corporation\n"
    "x"
)
"""Entity description: a few ``name: description`` pairs, then the placeholder ``x`` to patch over."""
TARGET_PROMPTS = {"identity": IDENTITY_PROMPT, "description": DESCRIPTION_PROMPT}

RESAMPLES = 1000
"""Bootstrap resamples of the source texts behind the identity curve's intervals."""
LEVEL = 0.95
"""The identity curve's confidence level."""
MIN_TEXTS = 2
"""The fewest source texts (with a scored position) that give an interval: resampling one text
always draws that text, a zero-width interval that would claim certainty."""

Mapping = Callable[[torch.Tensor], torch.Tensor]
"""Maps source states ``[..., d_source]`` to target states ``[..., d_target]``."""


class AffineMap(nn.Module):
    """``f(h) = h W^T + b`` with ``weight [d_target, d_source]`` and ``bias [d_target]`` (float32)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("weight", weight.detach().float())
        self.register_buffer("bias", bias.detach().float())

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h.to(self.weight.device, torch.float32) @ self.weight.T + self.bias


def fit_affine_map(source: torch.Tensor, target: torch.Tensor, *, ridge: float = 1e-3) -> AffineMap:
    """The affine map minimising ``‖f(source) − target‖² + ridge·‖W‖²`` over paired states
    ``source [n, d_s]`` and ``target [n, d_t]`` (the same tokens through two layers or models)."""
    if source.dim() != 2 or target.dim() != 2 or source.shape[0] != target.shape[0]:
        raise PatchscopeError(
            f"fit the map on paired states [n, d_source] and [n, d_target], got "
            f"{tuple(source.shape)} and {tuple(target.shape)}"
        )
    x, y = source.double(), target.double()
    mx, my = x.mean(0), y.mean(0)
    xc, yc = x - mx, y - my
    gram = xc.T @ xc + ridge * len(x) * torch.eye(x.shape[1], dtype=torch.float64)
    weight = torch.linalg.solve(gram, xc.T @ yc).T
    return AffineMap(weight, my - weight @ mx)


def tuned_map(lens: TunedLens, layer: int) -> Mapping:
    """A tuned lens's translator at ``layer``: maps state ``layer`` to the final state's space."""
    check_layer(layer, lens.num_layers)
    return lambda h: lens.transform(h, layer)


def paired_states(
    source_model: nn.Module, target_model: nn.Module, input_ids: torch.Tensor, source_layer: int, target_layer: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """States ``[n, d_s]`` and ``[n, d_t]`` of the same tokens ``input_ids [batch, seq]`` (both models
    must share the tokenizer) at the two layers, to fit a map with :func:`fit_affine_map`."""
    source = capture(source_model, input_ids, layers=[source_layer])[source_layer]
    target = capture(target_model, input_ids, layers=[target_layer])[target_layer]
    return source.reshape(-1, source.shape[-1]).float().cpu(), target.reshape(-1, target.shape[-1]).float().cpu()


def _position(position: int, seq: int, what: str) -> int:
    if not -seq <= position < seq:
        raise PatchscopeError(
            f"the {what} position {position} is outside its prompt of {seq} tokens: "
            f"pick one between {-seq} and {seq - 1}"
        )
    return position % seq


@dataclass
class Patch:
    """Where a state comes from and where it goes."""

    source_layer: int
    source_position: int = -1
    target_layer: int | None = None
    """Default: the source layer."""
    target_position: int = -1


def source_state(model: nn.Module, input_ids: torch.Tensor, layer: int, position: int) -> torch.Tensor:
    """The residual state ``[batch, d]`` of ``input_ids [batch, seq]`` at ``(layer, position)``."""
    parts = find_parts(model)
    check_layer(layer, parts.num_layers)
    p = _position(position, input_ids.shape[1], "source")
    return capture(model, input_ids, parts=parts, layers=[layer])[layer][:, p]


def mapped(state: torch.Tensor, mapping: Mapping | None, target: ModelParts) -> torch.Tensor:
    """``mapping(state)``; :class:`PatchscopeError` unless it has the target's width."""
    out = state if mapping is None else mapping(state)
    if out.shape[-1] != target.d_model:
        fix = "pass a map between the widths (fit_affine_map)" if mapping is None else "the map gives the wrong width"
        raise PatchscopeError(
            f"the source state has width {out.shape[-1]} but the target model's is {target.d_model}: {fix}"
        )
    return out


@dataclass
class PatchscopeResult:
    """The patched target run: ``states`` (every layer of the target prompt) and the patch."""

    states: HiddenStates
    patch: Patch
    parts: ModelParts

    def trajectory(
        self,
        readout: Readout | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
        k: int = 5,
        name: str | None = None,
    ) -> Trajectory:
        """What ``readout`` (default: the logit lens) predicts at every layer of the patched run."""
        readout = readout or LogitLens(self.parts)
        return Trajectory.from_states(
            readout, self.states, tokenizer=tokenizer, k=k, lens_name=name or f"patchscope · {readout.kind}"
        )

    def top(self, k: int = 5, position: int = -1) -> tuple[list[int], list[float]]:
        """The model's ``k`` likeliest next tokens at ``position`` of the patched target, and their probabilities."""
        probs = self.states.logits[0, position].float().softmax(-1).topk(k)
        return probs.indices.tolist(), probs.values.tolist()


@torch.no_grad()
def patchscope(
    source_model: nn.Module,
    source_ids: torch.Tensor,
    target_ids: torch.Tensor,
    patch: Patch,
    *,
    target_model: nn.Module | None = None,
    mapping: Mapping | None = None,
) -> PatchscopeResult:
    """Run the target prompt ``target_ids [1, seq]`` with the mapped source state written at
    ``(patch.target_layer, patch.target_position)``; ``source_ids [1, seq_s]`` is the source prompt."""
    target_model = unwrap_model(target_model or source_model)
    target = find_parts(target_model)
    target_layer = patch.source_layer if patch.target_layer is None else patch.target_layer
    check_layer(target_layer, target.num_layers)
    p = _position(patch.target_position, target_ids.shape[1], "target")
    state = mapped(source_state(source_model, source_ids, patch.source_layer, patch.source_position), mapping, target)
    edit = replace(f"resid.{target_layer}", state[:, None, :], positions=[p])
    names = [f"resid.{layer}" for layer in range(target.num_layers + 1)]
    device = target.embedding.weight.device
    with hooked(target, read=names, edits=[edit]) as values:
        logits = target_model(input_ids=target_ids.to(device), use_cache=False).logits
    states = HiddenStates(tuple(values[n] for n in names), logits, target_ids)
    return PatchscopeResult(states, Patch(patch.source_layer, patch.source_position, target_layer, p), target)


def patchscope_generate(
    source_model: nn.Module,
    source_ids: torch.Tensor,
    target_ids: torch.Tensor,
    patch: Patch,
    *,
    target_model: nn.Module | None = None,
    mapping: Mapping | None = None,
    max_new_tokens: int = 20,
    **sampling: object,
) -> Generation:
    """Generate after the target prompt with the patch applied once, in the prefill pass; later
    tokens see it only through the key–value cache."""
    target_model = target_model or source_model
    target = find_parts(target_model)
    target_layer = patch.source_layer if patch.target_layer is None else patch.target_layer
    check_layer(target_layer, target.num_layers)
    p = _position(patch.target_position, target_ids.shape[1], "target")
    state = mapped(source_state(source_model, source_ids, patch.source_layer, patch.source_position), mapping, target)
    edit = replace(f"resid.{target_layer}", state[:, None, :], positions=[p], once=True)
    return generate_from_layer(
        target_model,
        LogitLens(target),
        target_ids,
        layer=target.num_layers,
        max_new_tokens=max_new_tokens,
        edits=[edit],
        **sampling,
    )


@dataclass
class IdentityCurve:
    """Precision@1 per source layer of the token-identity Patchscope: how often the patched
    target's top-1 next token is the source token itself (``identity``) or the model's own next-token
    prediction at the source position (``next_token``, as in the Patchscopes paper); fractions of
    the ``positions`` scored in ``texts`` source texts, ``[layers]`` each.

    ``identity_interval`` and ``next_token_interval`` are ``(low [layers], high [layers])``, the
    :data:`LEVEL` bootstrap intervals over texts (:func:`text_intervals`), or ``None`` with fewer
    than :data:`MIN_TEXTS` texts."""

    layers: list[int]
    identity: list[float]
    next_token: list[float]
    positions: int
    texts: int
    identity_interval: tuple[list[float], list[float]] | None
    next_token_interval: tuple[list[float], list[float]] | None

    def to_rows(self) -> list[dict[str, object]]:
        """One row per source layer: both precisions, their interval bounds (``None`` without an
        interval), the position and text counts and the interval's level and bootstrap unit."""
        none = [None] * len(self.layers)
        identity_low, identity_high = self.identity_interval or (none, none)
        next_low, next_high = self.next_token_interval or (none, none)
        columns = zip(self.layers, self.identity, identity_low, identity_high, self.next_token, next_low, next_high,
                      strict=True)
        return [
            {
                "source_layer": layer,
                "precision_at_1_identity": a,
                "precision_at_1_identity_low": a_low,
                "precision_at_1_identity_high": a_high,
                "precision_at_1_next_token": b,
                "precision_at_1_next_token_low": b_low,
                "precision_at_1_next_token_high": b_high,
                "positions": self.positions,
                "texts": self.texts,
                "interval_level": LEVEL,
                "bootstrap_unit": "text",
            }
            for layer, a, a_low, a_high, b, b_low, b_high in columns
        ]


def text_intervals(
    hits: torch.Tensor, lengths: Sequence[int], *, resamples: int = RESAMPLES, seed: int = 0, level: float = LEVEL
) -> tuple[list[float], list[float]] | None:
    """The ``level`` percentile-bootstrap interval ``(low [layers], high [layers])`` of the hit rate
    per layer, resampling whole texts. ``hits [layers, positions]`` (0/1) hold the positions of text
    0, then of text 1, …, ``lengths [texts]`` of them per text; a resample's rate is its drawn
    texts' hits over their positions. Texts without positions are left out; ``None`` if fewer than
    :data:`MIN_TEXTS` remain."""
    lengths = torch.as_tensor(lengths, dtype=torch.long)
    owner = torch.repeat_interleave(torch.arange(len(lengths)), lengths)  # [positions]
    sums = torch.zeros(len(lengths), hits.shape[0], dtype=torch.float64).index_add_(0, owner, hits.T.double())
    kept = lengths > 0
    if int(kept.sum()) < MIN_TEXTS:
        return None
    samples = bootstrap_samples(sums[kept], lengths[kept].double(), resamples=resamples, seed=seed,
                                statistic=weighted_means)  # [resamples, layers]
    low, high = intervals(samples, level)
    return low.tolist(), high.tolist()


def _identity_target(tokenizer: PreTrainedTokenizerBase, prompt: str, continuation: str) -> tuple[torch.Tensor, int]:
    """Tokens of ``prompt + continuation`` ``[1, seq]`` and the index of the prompt's last token
    (the placeholder); :class:`PatchscopeError` if the continuation changes the prompt's tokens."""
    base = tokenizer(prompt, return_tensors="pt").input_ids
    full = tokenizer(prompt + continuation, return_tensors="pt").input_ids
    if (continuation and full.shape[1] <= base.shape[1]) or not torch.equal(full[:, : base.shape[1]], base):
        raise PatchscopeError(
            f"the continuation {continuation!r} merges with the target prompt's last token: pick another"
        )
    return full, base.shape[1] - 1


@torch.no_grad()
def token_identity_curve(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    *,
    layers: Sequence[int] | None = None,
    target_prompt: str = IDENTITY_PROMPT,
    continuation: str = " ->",
    skip_first: int = 1,
    progress: Callable[[int, int], None] | None = None,
) -> IdentityCurve:
    """Patch every position (after the first ``skip_first``) of each source text at layer ``l`` over
    the placeholder (the last token) of ``target_prompt`` at the same layer, for each ``l`` in
    ``layers`` (default all). ``next_token`` scores the model's top-1 at the placeholder against the
    source's own next-token prediction; ``identity`` scores the top-1 after ``continuation`` (the
    prompt's `` ->``) against the source token itself. Both come with bootstrap intervals over the
    texts (:func:`text_intervals`)."""
    model = unwrap_model(model)
    parts = find_parts(model)
    layers = list(range(parts.num_layers + 1)) if layers is None else list(layers)
    for layer in layers:
        check_layer(layer, parts.num_layers)
    sources, tokens, predictions = [], [], []
    for text in texts:
        ids = tokenizer(text, return_tensors="pt").input_ids
        states = capture(model, ids, parts=parts, layers=layers)
        sources.append({layer: states[layer][0, skip_first:] for layer in layers})
        tokens.append(ids[0, skip_first:])
        predictions.append(states.logits[0, skip_first:].argmax(-1).cpu())
    lengths = [len(t) for t in tokens]
    tokens, predictions = torch.cat(tokens), torch.cat(predictions)
    target, slot = _identity_target(tokenizer, target_prompt, continuation)
    target = target.to(parts.embedding.weight.device)
    identity, next_token = [], []  # hits per layer, [positions] each
    for done, layer in enumerate(layers):
        state = torch.cat([s[layer] for s in sources])[:, None, :]
        with hooked(parts, edits=[replace(f"resid.{layer}", state, positions=[slot])]):
            logits = model(input_ids=target.expand(len(state), -1), use_cache=False).logits
        identity.append(logits[:, -1].argmax(-1).cpu() == tokens)
        next_token.append(logits[:, slot].argmax(-1).cpu() == predictions)
        if progress is not None:
            progress(done + 1, len(layers))
    identity, next_token = torch.stack(identity).double(), torch.stack(next_token).double()  # [layers, positions]
    return IdentityCurve(layers, identity.mean(1).tolist(), next_token.mean(1).tolist(), len(tokens),
                         sum(length > 0 for length in lengths), text_intervals(identity, lengths),
                         text_intervals(next_token, lengths))


__all__ = [
    "DESCRIPTION_PROMPT",
    "IDENTITY_PROMPT",
    "LEVEL",
    "MIN_TEXTS",
    "RESAMPLES",
    "TARGET_PROMPTS",
    "AffineMap",
    "IdentityCurve",
    "Mapping",
    "Patch",
    "PatchscopeResult",
    "fit_affine_map",
    "mapped",
    "paired_states",
    "patchscope",
    "patchscope_generate",
    "source_state",
    "text_intervals",
    "token_identity_curve",
    "tuned_map",
]
