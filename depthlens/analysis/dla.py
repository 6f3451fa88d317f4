"""Direct logit attribution: split one logit into what every part of the model writes directly.

At position ``p`` the last residual state is a sum, ``x = resid.0 + Σ_i (attn.i + mlp.i)``
(:mod:`depthlens.model.hooks` reads each branch exactly). With the scale of the final norm frozen
at its value on this clean run (``1/rms`` for RMSNorm, ``1/std`` after mean-centering for
LayerNorm) the decoding is affine in ``x``, so the pre-soft-cap logit of a target token ``t`` (or
the difference ``t − t'``) is ``u · x + c``: each part's share is ``u · part``, and the constants
``c`` (the final norm's bias, a bias of a projection after it, the unembedding's bias) are terms of
their own. The terms therefore add up to the model's logit, to rounding.

Attention is split per head at the input of its output projection (the hook point
``heads.{i}``; where that projection is, ``o_proj``, GPT-2's ``c_proj``, NeoX's ``dense``, …, is
the family table's business): head ``h`` writes ``W_O[:, h] z_h``, the projection's bias is a
term of its own. Where a sandwich norm follows the branch (Gemma 2/3, OLMo 2) its scale is
frozen too, so heads still split linearly. MLPs are one term each (mixtures of experts
included); with ``neurons`` the chosen MLPs are split, at the input of their last projection
(``neurons.{i}``), into their ``top`` neurons and the rest. Every value is read through
:mod:`depthlens.model.hooks`. Families with logit soft-capping are attributed before the cap,
and :attr:`LogitAttribution.softcap` says so.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from depthlens.analysis.dla_model import LinearNorm, freeze_norm, projection
from depthlens.errors import AttributionError
from depthlens.model.architecture import ModelParts, find_parts
from depthlens.model.hooks import hooked
from depthlens.model.unwrap import unwrap_model
from depthlens.stats.grid import Grid


@dataclass(frozen=True)
class Term:
    """One part's direct contribution ``value`` to the logit (in logits, pre-soft-cap: a logit is not
    in nats; only a difference of two logits, a log-odds, is)."""

    name: str
    """``"embeddings"``, ``"L3.H2"``, ``"L3.attn bias"``, ``"L3.attn"``, ``"L3.mlp"``, ``"L3.N17"``,
    ``"L3.mlp rest"``, ``"final norm bias"``, ``"unembedding bias"``…"""
    kind: str
    """``embed``, ``head``, ``attn`` (a whole branch), ``attn_bias``, ``mlp``, ``neuron``, ``mlp_rest``, ``bias``."""
    layer: int | None
    index: int | None
    value: float


@dataclass
class LogitAttribution:
    """The terms of one logit (or logit difference) and the logit they add up to."""

    terms: list[Term]
    logit: float
    """The model's own pre-soft-cap logit (difference) at the position, from its forward pass."""
    target: str
    position: int
    num_layers: int
    num_heads: int
    softcap: float | None = None
    """The family's soft cap ``c`` (``c·tanh(logit/c)`` is what the model outputs), or ``None``."""
    capped_logit: float | None = None
    model_name: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> float:
        """The sum of all terms: equals :attr:`logit` up to rounding."""
        return float(sum(np.float64(t.value) for t in self.terms))

    def layer_totals(self) -> dict[str, list[float]]:
        """Per layer ``0 … L−1``: ``attn`` (heads and bias) and ``mlp`` (neurons and rest), plus
        ``embeddings`` and ``other`` (the bias terms) as one-element lists."""
        attn, mlp = [0.0] * self.num_layers, [0.0] * self.num_layers
        embeddings = other = 0.0
        for term in self.terms:
            if term.kind in ("head", "attn", "attn_bias"):
                attn[term.layer] += term.value
            elif term.kind in ("mlp", "neuron", "mlp_rest"):
                mlp[term.layer] += term.value
            elif term.kind == "embed":
                embeddings += term.value
            else:
                other += term.value
        return {"attn": attn, "mlp": mlp, "embeddings": [embeddings], "other": [other]}

    def grid(self) -> Grid:
        """Layers × (heads, attention bias, MLP) on a diverging scale, in logits."""
        heads = max(self.num_heads, 1)
        values = np.full((self.num_layers, heads + 2), np.nan)
        for term in self.terms:
            column = {"head": term.index, "attn": 0, "attn_bias": heads}.get(term.kind)
            if term.kind in ("mlp", "neuron", "mlp_rest"):
                column = heads + 1
            if column is not None:
                row = values[term.layer]
                row[column] = (0.0 if np.isnan(row[column]) else row[column]) + term.value
        cols = [f"H{h}" for h in range(heads)] + ["bias", "MLP"]
        return Grid(
            values,
            [str(i) for i in range(self.num_layers)],
            cols,
            scale="diverging",
            title=f"direct logit attribution of {self.target} at position {self.position}",
            name="DLA",
            source=self.model_name,
            quantity="direct effect on the logit",
            unit="logit",
            row_title="layer",
            col_title="head",
            value_format=".3f",
        )

    def to_rows(self) -> list[dict[str, object]]:
        """One row per term (name, kind, layer, index, value), for CSV and JSON."""
        return [
            {"name": t.name, "kind": t.kind, "layer": t.layer, "index": t.index, "value": t.value} for t in self.terms
        ]

    def summary(self) -> dict[str, object]:
        """Target, position, logit, sum of terms and notes, for JSON."""
        return {
            "target": self.target,
            "position": self.position,
            "logit": self.logit,
            "sum_of_terms": self.total,
            "pre_softcap": self.softcap is not None,
            "softcap": self.softcap,
            "capped_logit": self.capped_logit,
            "model": self.model_name,
            "notes": self.notes,
        }


def resolve_token(tokenizer: PreTrainedTokenizerBase | None, token: str | int, vocab_size: int) -> int:
    """The id of ``token``: an id, ``"#123"``, or a text that must encode to exactly one token."""
    if isinstance(token, str) and token.startswith("#") and token[1:].isdigit():
        token = int(token[1:])
    if isinstance(token, int):
        if not 0 <= token < vocab_size:
            raise AttributionError(f"token id {token} is outside the vocabulary 0 … {vocab_size - 1}")
        return token
    if tokenizer is None:
        raise AttributionError(f"cannot look up the token {token!r} without a tokenizer: pass its id")
    ids = tokenizer(token, add_special_tokens=False).input_ids
    if len(ids) != 1:
        pieces = [tokenizer.decode([i]) for i in ids]
        raise AttributionError(
            f"the target {token!r} is {len(ids)} tokens {pieces}, not one: pick a single token "
            "(often with its leading space, e.g. ' Paris') or pass its id as #ID"
        )
    return int(ids[0])


@dataclass
class _Run:
    values: dict[str, torch.Tensor]
    logits: torch.Tensor

    def at(self, point: str, p: int) -> torch.Tensor:
        """The value read at ``point`` for position ``p`` of the one text, float64 ``[d]``."""
        value = self.values[point]
        return value.reshape(-1, value.shape[-1])[p].double().cpu()


def _run(model: nn.Module, parts: ModelParts, ids: torch.Tensor, neurons: Sequence[int]) -> _Run:
    """One clean forward pass reading every residual state and branch, every attention output
    projection's input, and the MLP last projection's input in the layers of ``neurons``."""
    names = [f"resid.{i}" for i in range(parts.num_layers + 1)]
    for i in range(parts.num_layers):
        wanted = ("attn", "mlp", "heads", *(("neurons",) if i in neurons else ()))
        names += [f"{kind}.{i}" for kind in wanted if parts.branch(kind, i) is not None]
    device = parts.embedding.weight.device
    with torch.no_grad(), hooked(parts, read=names) as values:
        logits = model(input_ids=ids.to(device), use_cache=False).logits
    return _Run(values, logits)


def _decoder_covector(parts: ModelParts, x: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, list[Term]]:
    """``u [d]`` and the constant terms such that the pre-cap logit combination ``weights · logits``
    equals ``u · x + Σ constants`` with every final norm frozen at ``x [d]``."""
    stages, h = [], x
    for module in parts.final_norm:
        if isinstance(module, nn.Linear):
            stages.append((module, None))
        else:
            stages.append((module, freeze_norm(module, h)))
        weight = getattr(module, "weight", None)  # None for a norm without a gain (elementwise_affine=False)
        with torch.no_grad():
            h = module(h.to(weight.device if isinstance(weight, torch.Tensor) else h.device)[None])[0]
    multiplier = (parts.logit_multiplier or 1.0) / (parts.logit_divisor or 1.0)
    unembedding = parts.unembedding
    u = multiplier * (weights @ unembedding.weight.detach().double().cpu()[: weights.shape[0]])
    constants = []
    if getattr(unembedding, "bias", None) is not None:
        bias = unembedding.bias.detach().double().cpu()[: weights.shape[0]]
        constants.append(Term("unembedding bias", "bias", None, None, float(multiplier * (weights @ bias))))
    for position, (module, norm) in reversed(list(enumerate(stages))):
        if norm is None:
            if module.bias is not None:
                constants.append(
                    Term(f"final bias {position}", "bias", None, None, float(u @ module.bias.detach().double().cpu()))
                )
            u = u @ module.weight.detach().double().cpu()
        else:
            constants.append(Term("final norm bias", "bias", None, None, float(u @ norm.beta)))
            u = norm.adjoint(u)
    return u, constants


def _split(
    pieces: torch.Tensor, bias: torch.Tensor, post: nn.Module | None, whole: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Pieces ``[n, d]`` and bias ``[d]`` of a projection's output, through the sandwich norm
    ``post`` frozen at their sum; ``None`` unless they add up to the branch value ``whole [d]``."""
    if post is not None:
        try:
            norm = freeze_norm(post, pieces.sum(0) + bias)
        except AttributionError:
            return None
        pieces, bias = norm.linear(pieces), norm.linear(bias) + norm.beta
    if (pieces.sum(0) + bias - whole).abs().max() > 1e-4 * (1 + whole.abs().max()):
        return None
    return pieces, bias


def _attention_terms(
    parts: ModelParts, run: _Run, i: int, p: int, u: torch.Tensor, notes: list[str]
) -> list[Term]:
    whole, heads = run.at(f"attn.{i}", p), parts.num_heads
    out = projection(parts, "heads", i)
    if out is not None and heads and f"heads.{i}" in run.values and out.weight.shape[1] % heads == 0:
        z = run.at(f"heads.{i}", p).reshape(heads, -1)
        pieces = torch.einsum("dhk,hk->hd", out.weight.reshape(out.weight.shape[0], heads, -1), z)
        split = _split(pieces, out.bias, parts.branch("attn_norm", i), whole)
        if split is not None:
            terms = [Term(f"L{i}.H{h}", "head", i, h, float(u @ piece)) for h, piece in enumerate(split[0])]
            return terms + [Term(f"L{i}.attn bias", "attn_bias", i, None, float(u @ split[1]))]
    notes.append(f"layer {i}: attention attributed as a whole (its heads could not be split)")
    return [Term(f"L{i}.attn", "attn", i, None, float(u @ whole))]


def _mlp_terms(parts: ModelParts, run: _Run, i: int, p: int, u: torch.Tensor, top: int, notes: list[str]) -> list[Term]:
    """Block ``i``'s MLP as one term, or (``top > 0``) as its ``top`` neurons and the rest."""
    whole = run.at(f"resid.{i + 1}", p) - run.at(f"resid.{i}", p) - run.at(f"attn.{i}", p)
    total = float(u @ whole)
    if not top:
        return [Term(f"L{i}.mlp", "mlp", i, None, total)]
    down = projection(parts, "neurons", i)
    a = run.at(f"neurons.{i}", p) if f"neurons.{i}" in run.values else None
    post = parts.branch("mlp_norm", i)
    if down is None or a is None or _split((down.weight @ a)[None], down.bias, post, whole) is None:
        notes.append(f"layer {i}: the MLP could not be split into neurons (a mixture of experts?)")
        return [Term(f"L{i}.mlp", "mlp", i, None, total)]
    covector = u if post is None else freeze_norm(post, down.weight @ a + down.bias).adjoint(u)
    scores = (down.weight.T @ covector) * a
    chosen = scores.abs().topk(min(top, scores.numel())).indices.tolist()
    terms = [Term(f"L{i}.N{n}", "neuron", i, n, float(scores[n])) for n in chosen]
    return terms + [Term(f"L{i}.mlp rest", "mlp_rest", i, None, total - sum(t.value for t in terms))]


def _label(tokenizer: PreTrainedTokenizerBase | None, token: int) -> str:
    return repr(tokenizer.decode([token])) if tokenizer is not None else f"#{token}"


@torch.no_grad()
def _logit_weights(
    logits: torch.Tensor,
    tokenizer: PreTrainedTokenizerBase | None,
    target: str | int | None,
    contrast: str | int | None,
    vocab_size: int,
) -> tuple[torch.Tensor, str]:
    """The float64 vector ``[vocab]`` that picks the attributed quantity out of the logits
    (+1 at the target, −1 at the contrast) and its label; the target defaults to the top-1."""
    chosen = int(logits.argmax()) if target is None else resolve_token(tokenizer, target, vocab_size)
    weights = torch.zeros(vocab_size, dtype=torch.float64)
    weights[chosen] += 1
    label = _label(tokenizer, chosen)
    if contrast is not None:
        other = resolve_token(tokenizer, contrast, vocab_size)
        if other == chosen:
            raise AttributionError(
                f"the contrast {_label(tokenizer, other)} is the target itself: target − contrast is 0 and every term "
                "would be 0; pick another contrast token, or none"
            )
        weights[other] -= 1
        label = f"{label} − {_label(tokenizer, other)}"
    return weights, label


def logit_attribution(
    model: nn.Module,
    input_ids: torch.Tensor,
    *,
    tokenizer: PreTrainedTokenizerBase | None = None,
    position: int = -1,
    target: str | int | None = None,
    contrast: str | int | None = None,
    neurons: Sequence[int] = (),
    top_neurons: int = 10,
) -> LogitAttribution:
    """Split the pre-soft-cap logit of ``target`` (default: the model's top-1 token) at
    ``position`` of ``input_ids [1, seq]`` into direct contributions (in logits), or the difference
    ``target − contrast`` of two logits (a log-odds, in nats). MLPs of the layers in ``neurons`` are split into their
    ``top_neurons`` largest neurons and the rest.

    Raises :class:`AttributionError` for a position outside the text, a target that is not one
    token, a contrast that is the target itself, and a layer in ``neurons`` outside ``0 … L−1``."""
    model = unwrap_model(model)
    parts = find_parts(model)
    ids = input_ids if input_ids.dim() == 2 else input_ids[None]
    seq = ids.shape[1]
    if ids.shape[0] != 1 or not -seq <= position < seq:
        raise AttributionError(
            f"position {position} is outside the text of {seq} tokens (batch {ids.shape[0]}): "
            f"pick a position between {-seq} and {seq - 1} of a single text"
        )
    bad = [n for n in neurons if not 0 <= n < parts.num_layers]
    if bad:
        raise AttributionError(f"MLP layers {bad} do not exist: this model has MLPs 0 … {parts.num_layers - 1}")
    p = position % seq
    run = _run(model, parts, ids, neurons)
    x = run.values[f"resid.{parts.num_layers}"][0, p]
    weights, label = _logit_weights(run.logits[0, p], tokenizer, target, contrast, parts.vocab_size)
    u, constants = _decoder_covector(parts, x, weights)
    notes: list[str] = []
    terms = [Term("embeddings", "embed", None, None, float(u @ run.at("resid.0", p)))]
    for i in range(parts.num_layers):
        terms += _attention_terms(parts, run, i, p, u, notes)
        terms += _mlp_terms(parts, run, i, p, u, top_neurons if i in neurons else 0, notes)
    with torch.no_grad():
        uncapped = replace(parts, logit_softcap=None).decode(x).double().cpu() @ weights.to(torch.float64)
    capped = float(run.logits[0, p].double().cpu()[: parts.vocab_size] @ weights)
    if parts.logit_softcap is not None:
        notes.append(
            f"this family soft-caps its logits (c·tanh(logit/c), c = {parts.logit_softcap:g}): "
            f"the terms add up to the logit before the cap; the model outputs {capped:.4f}"
        )
    return LogitAttribution(
        terms + constants,
        float(uncapped),
        label,
        p,
        parts.num_layers,
        parts.num_heads,
        softcap=parts.logit_softcap,
        capped_logit=capped,
        model_name=parts.model_name,
        notes=notes,
    )


__all__ = [
    "LinearNorm",
    "LogitAttribution",
    "Term",
    "freeze_norm",
    "logit_attribution",
    "resolve_token",
]
