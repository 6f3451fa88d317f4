"""The attribute lens (Hernandez et al. 2023): a linear relational embedding (LRE) used as a readout.

For a relation (country → capital) and each of a handful of training subjects ``s``, a prompt of
in-context examples ends with the subject (``"…\\nThe capital of France is"``). Let ``h_l [d]`` be
the residual state ``l`` at the subject's last token and ``z [d]`` the last state ``L`` at the
final position. The LRE of layer ``l`` is

    W_l = mean_s ∂z/∂h_l          [d, d]   (the Jacobian, averaged over subjects)
    b_l = mean_s (z − ∂z/∂h_l · h_l)   [d]
    LRE_l(h) = β · W_l h + b_l

(β scales ``W h`` always, with or without a bias; ``rank`` keeps the top singular directions of
``W_l``). :class:`AttributeLens` applies ``LRE_l`` to the state at layer ``l`` and any position,
then decodes with the model's own final norm and unembedding, so it is a
:class:`~depthlens.lenses.readout.Readout` like the logit and tuned lenses.

The Jacobians of all layers come from one backward pass per block of ``d`` output coordinates:
the prompt before the subject is run once into the key–value cache, the rest (from the subject's
last token on, a few tokens) is repeated once per output coordinate in a batch, and the gradient
of each copy's own coordinate is read at every layer's subject state.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from depthlens._version import __version__
from depthlens.errors import LensFileError, RelationError
from depthlens.lenses.lens_file import fingerprint, read_lens_dir, write_lens_dir
from depthlens.lenses.readout import Lens, check_layer, model_parts
from depthlens.model.architecture import ModelParts
from depthlens.model.hooks import Edit, hooked
from depthlens.model.kv_cache import output_cache, with_cache
from depthlens.model.unwrap import unwrap_model
from depthlens.text.encode import encode
from depthlens.text.relations import Relation, check_examples, object_token, subject_position

Progress = Callable[[int, int], None]
"""Called as ``progress(done, total)`` after each subject."""


class AttributeLens(Lens):
    """Decode the state at layer ``l`` through the relation's LRE: ``β W_l h + b_l``, then the
    model's final norm and unembedding. ``weight [L+1, d, d]`` and ``bias [L+1, d]`` are float32."""

    kind = "attribute"

    def __init__(
        self,
        model: nn.Module | ModelParts,
        weight: torch.Tensor,
        bias: torch.Tensor,
        *,
        beta: float = 1.0,
        relation: str = "",
        info: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(model)
        shape = (self.num_layers + 1, self.parts.d_model)
        if tuple(weight.shape) != (*shape, shape[1]) or tuple(bias.shape) != shape:
            raise LensFileError(
                f"an attribute lens for this model needs weight {(*shape, shape[1])} and bias {shape}, "
                f"got {tuple(weight.shape)} and {tuple(bias.shape)}"
            )
        self.register_buffer("weight", weight.detach().float().clone())
        self.register_buffer("bias", bias.detach().float().clone())
        self.beta = float(beta)
        self.relation = relation
        self.info: dict[str, Any] = dict(info or {})

    def transform(self, hidden: torch.Tensor, layer: int) -> torch.Tensor:
        """``β W_l h + b_l`` for ``h [..., d]`` (float32 out)."""
        check_layer(layer, self.num_layers)
        hidden = hidden.to(self.weight.device, torch.float32)
        return self.beta * hidden @ self.weight[layer].T + self.bias[layer]

    def with_beta(self, beta: float) -> AttributeLens:
        """The same LRE with another scale β."""
        return AttributeLens(self.parts, self.weight, self.bias, beta=beta, relation=self.relation, info=self.info)

    def low_rank(self, rank: int) -> AttributeLens:
        """The same LRE with each ``W_l`` cut to its top ``rank`` singular directions."""
        if not 1 <= rank <= self.parts.d_model:
            raise RelationError(f"the rank must be between 1 and {self.parts.d_model}, got {rank}")
        u, s, vh = torch.linalg.svd(self.weight)
        weight = (u[..., :rank] * s[..., None, :rank]) @ vh[..., :rank, :]
        return AttributeLens(
            self.parts, weight, self.bias, beta=self.beta, relation=self.relation, info={**self.info, "rank": rank}
        )

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write ``config.json`` (with ``"kind": "attribute"``, which the readout registry reads) +
        ``model.safetensors`` atomically into ``directory``; ``--lens DIR`` loads it."""
        config = {
            "kind": self.kind,
            "lens_type": self.kind,
            "library_version": __version__,
            "beta": self.beta,
            "relation": self.relation,
            "info": self.info,
            "model": {"name_or_path": self.parts.model_name, "fingerprint": fingerprint(self.parts)},
        }
        return write_lens_dir(directory, config, {"weight": self.weight, "bias": self.bias})

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, model: nn.Module | ModelParts) -> AttributeLens:
        """Load a lens saved by :meth:`save_pretrained`; :class:`LensFileError` if it was made for another model."""
        config, tensors = read_lens_dir(directory)
        parts = model_parts(model)
        if {config.get("kind"), config.get("lens_type")} - {None} != {cls.kind} or "weight" not in tensors or "bias" not in tensors:
            raise LensFileError(f"{directory} does not hold an attribute lens")
        if config.get("model", {}).get("fingerprint") != fingerprint(parts):
            raise LensFileError(
                f"the attribute lens in {directory} was made for {config.get('model', {}).get('name_or_path')!r}, "
                "not this model; estimate it again with depthlens attribute"
            )
        return cls(
            parts,
            tensors["weight"],
            tensors["bias"],
            beta=config.get("beta", 1.0),
            relation=config.get("relation", ""),
            info=config.get("info"),
        )


@dataclass
class SubjectJacobians:
    """What one training prompt contributes: ``jacobian [L+1, d, d]`` (∂z/∂h_l), ``states
    [L+1, d]`` (``h_l`` at the subject's last token) and ``z [d]`` (state ``L`` at the last position)."""

    jacobian: torch.Tensor
    states: torch.Tensor
    z: torch.Tensor


def _device(parts: ModelParts) -> torch.device:
    return parts.embedding.weight.device


def _leaf(h: torch.Tensor) -> torch.Tensor:
    return h.detach().requires_grad_(True)


def subject_jacobians(
    model: nn.Module,
    input_ids: torch.Tensor,
    subject: int,
    *,
    parts: ModelParts | None = None,
    rows_per_pass: int = 256,
) -> SubjectJacobians:
    """∂z/∂h_l for every layer ``l`` of one prompt ``input_ids [1, seq]`` whose subject ends at
    position ``subject`` (see the module docstring for the method); float32 results on the CPU."""
    model = unwrap_model(model)
    parts = parts or model_parts(model)
    n_layers, d, seq = parts.num_layers, parts.d_model, input_ids.shape[1]
    if not 0 <= subject < seq:
        raise RelationError(f"the subject position {subject} is outside the prompt of {seq} tokens")
    ids = input_ids.to(_device(parts))
    cache = None
    if subject > 0:
        with torch.no_grad():
            cache = output_cache(model(input_ids=ids[:, :subject], use_cache=True))
    suffix = ids[:, subject:]
    points = [f"resid.{layer}" for layer in range(n_layers + 1)]
    jacobian = torch.zeros(n_layers + 1, d, d)
    states = z = None
    for start in range(0, d, rows_per_pass):
        rows = torch.arange(start, min(d, start + rows_per_pass))
        batch_cache = None
        if cache is not None:
            batch_cache = copy.deepcopy(cache)
            batch_cache.batch_repeat_interleave(len(rows))
        with torch.enable_grad(), hooked(parts, read=points, edits=[Edit("resid.0", _leaf)]) as values:
            model(input_ids=suffix.expand(len(rows), -1), **with_cache(model, batch_cache), use_cache=cache is not None)
            last = values[f"resid.{n_layers}"][:, -1].float()
            picked = last[torch.arange(len(rows)), rows.to(last.device)].sum()
            grads = torch.autograd.grad(picked, [values[p] for p in points], allow_unused=True)
        for layer, grad in enumerate(grads):
            if grad is not None:
                jacobian[layer, rows] = grad[:, 0].float().cpu()
        states = torch.stack([values[p][0, 0].detach().float().cpu() for p in points])
        z = last[0].detach().cpu()
    return SubjectJacobians(jacobian=jacobian, states=states, z=z)


def fit_attribute_lens(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    relation: Relation,
    train: Sequence[tuple[str, str]],
    *,
    n_context: int = 3,
    beta: float = 1.0,
    rank: int | None = None,
    progress: Progress | None = None,
) -> AttributeLens:
    """Estimate the relation's LRE at every layer from the subjects of ``train`` (each prompt has
    ``n_context`` other training pairs as in-context examples) and return the attribute lens."""
    check_examples(relation, 2, "one to estimate with and one in context")
    if len(train) < 1:
        raise RelationError(f"relation {relation.name!r}: give at least one training pair to estimate the LRE from")
    parts = model_parts(model)
    weight = torch.zeros(parts.num_layers + 1, parts.d_model, parts.d_model)
    bias = torch.zeros(parts.num_layers + 1, parts.d_model)
    for index, (subject, _) in enumerate(train):
        context = [pair for pair in train if pair[0] != subject][:n_context]
        text = relation.prompt(subject, context)
        input_ids = tokenizer(text, return_tensors="pt").input_ids
        found = subject_jacobians(model, input_ids, subject_position(tokenizer, text, subject), parts=parts)
        weight += found.jacobian / len(train)
        bias += (found.z - torch.einsum("lij,lj->li", found.jacobian, found.states)) / len(train)
        if progress is not None:
            progress(index + 1, len(train))
    lens = AttributeLens(
        parts,
        weight,
        bias,
        beta=beta,
        relation=relation.name,
        info={"train": [list(p) for p in train], "n_context": n_context},
    )
    return lens.low_rank(rank) if rank is not None else lens


@dataclass
class Faithfulness:
    """How often the attribute lens at each layer predicts the model's own answer.

    ``agreement[l]`` is the fraction of held-out subjects where the top-1 token of
    ``decode(LRE_l(h_l))`` equals the model's top-1 next token; ``model_correct`` the fraction where
    the model's top-1 is the object's first token; ``lens_correct[l]`` that of the lens."""

    relation: str
    layers: list[int]
    agreement: list[float]
    lens_correct: list[float]
    model_correct: float
    subjects: list[str]

    def to_rows(self) -> list[dict[str, object]]:
        """One row per layer, for CSV/JSON tables."""
        return [
            {
                "relation": self.relation,
                "layer": layer,
                "faithfulness": a,
                "lens_correct": c,
                "model_correct": self.model_correct,
                "subjects": len(self.subjects),
            }
            for layer, a, c in zip(self.layers, self.agreement, self.lens_correct, strict=True)
        ]


@torch.no_grad()
def faithfulness(
    lens: AttributeLens,
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    relation: Relation,
    held_out: Sequence[tuple[str, str]],
    *,
    context: Sequence[tuple[str, str]] = (),
    batch_size: int = 16,
) -> Faithfulness:
    """Top-1 agreement of the attribute lens with the model on ``held_out`` subjects, per layer.

    Each prompt has the ``context`` pairs as in-context examples (default: those the lens was
    estimated from, up to its ``n_context``)."""
    model = unwrap_model(model)
    if not held_out:
        raise RelationError(f"relation {relation.name!r}: give at least one held-out pair to score the lens on")
    if not context:
        context = [tuple(p) for p in lens.info.get("train", [])][: lens.info.get("n_context", 3)]
    layers = list(range(lens.num_layers + 1))
    agree, right = torch.zeros(len(layers)), torch.zeros(len(layers))
    model_right = 0
    for start in range(0, len(held_out), batch_size):
        chunk = held_out[start : start + batch_size]
        texts = [relation.prompt(s, [p for p in context if p[0] != s]) for s, _ in chunk]
        ids, mask = encode(tokenizer, texts)
        where = torch.tensor([subject_position(tokenizer, t, s) for t, (s, _) in zip(texts, chunk, strict=True)])
        last = mask.sum(1) - 1
        answers = torch.tensor([object_token(tokenizer, o) for _, o in chunk])
        with hooked(lens.parts, read=[f"resid.{layer}" for layer in layers]) as values:
            logits = model(input_ids=ids.to(_device(lens.parts)), attention_mask=mask.to(_device(lens.parts))).logits
        rows = torch.arange(len(chunk))
        own = logits[rows, last.to(logits.device)].argmax(-1).cpu()
        model_right += int((own == answers).sum())
        for layer in layers:
            h = values[f"resid.{layer}"][rows, where.to(logits.device)]
            top = lens(h, layer).argmax(-1).cpu()
            agree[layer] += float((top == own).sum())
            right[layer] += float((top == answers).sum())
    n = len(held_out)
    return Faithfulness(
        relation.name, layers, (agree / n).tolist(), (right / n).tolist(), model_right / n, [s for s, _ in held_out]
    )


__all__ = [
    "AttributeLens",
    "Faithfulness",
    "SubjectJacobians",
    "faithfulness",
    "fit_attribute_lens",
    "subject_jacobians",
]
