"""Per-layer answer-choice log-likelihoods: the trajectory features of multiple-choice examples.

For each example, each readout and each layer ``l`` (``0 … L``), the log-likelihood of every
answer choice, summed over its tokens, when every prediction is read from layer ``l``:

    ``loglik[e, l, c] = Σ_t log p_l(choice_c[t] | prompt_e, choice_c[:t])``   (nats, ≤ 0)

where ``p_l`` decodes residual state ``l`` with the readout (the first choice token is predicted
at the prompt's last position, the *answer position*). At ``l = L`` this is the model's own
log-likelihood for every readout. The detector features (:meth:`ChoiceScores.features`) are
these, except for two choices, where each layer gives one number, the log-odds
``loglik[e, l, 1] − loglik[e, l, 0]`` (nats).

Cost: one forward pass per prompt (left-padded batches, explicit position ids) keeps the
key–value cache; it is repeated once per choice and all choices of the batch run through the
model together from there, so a prompt is never recomputed. Then each readout decodes each
layer's states at the choice positions, one layer at a time.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from depthlens.analysis.applications.tasks import Example
from depthlens.errors import TaskError
from depthlens.lenses.readout import Readout
from depthlens.model.hooks import hooked
from depthlens.model.kv_cache import output_cache, with_cache
from depthlens.model.unwrap import unwrap_model


@dataclass
class ChoiceScores:
    """Per-layer choice log-likelihoods of a list of examples under several readouts."""

    loglik: dict[str, np.ndarray]
    """By readout name: ``[examples, L + 1, choices]`` float64, nats (summed over choice tokens)."""
    gold: np.ndarray
    """The gold choice of each example ``[examples]``, int64."""
    hidden: np.ndarray
    """The residual states at the answer position ``[examples, L + 1, d]`` float32 (for the
    hidden-state baselines)."""
    ids: list[str]
    """The examples' ids."""
    prompt_mean: np.ndarray | None = None
    """Each layer's residual states averaged over the prompt's tokens (padding excluded; a
    ``<bos>`` the tokenizer adds counts) ``[examples, L + 1, d]`` float32; ``None``: not recorded."""

    @property
    def num_layers(self) -> int:
        """The model's number of blocks ``L``."""
        return self.hidden.shape[1] - 1

    def accuracy(self, readout: str | None = None, layer: int = -1) -> float:
        """Fraction of examples whose gold choice has the highest log-likelihood at ``layer``
        (default: the model's output)."""
        loglik = self.loglik[readout or next(iter(self.loglik))]
        return float((loglik[:, layer].argmax(-1) == self.gold).mean())

    @property
    def feature_kind(self) -> str:
        """What :meth:`features` returns: ``"log-odds"`` for two choices, else
        ``"choice log-likelihoods"``."""
        return "log-odds" if next(iter(self.loglik.values())).shape[-1] == 2 else "choice log-likelihoods"

    def features(self, readout: str) -> np.ndarray:
        """The trajectory features of one readout. Two choices: the log-odds
        ``log p_l(choice 1) − log p_l(choice 0)`` of every layer ``l``, ``[examples, L + 1]``
        (nats); more: the layers' choice log-likelihoods flattened layer by layer,
        ``[examples, (L + 1) · choices]`` (nats)."""
        loglik = self.loglik[readout]
        if loglik.shape[-1] == 2:
            return loglik[..., 1] - loglik[..., 0]
        return loglik.reshape(loglik.shape[0], -1)


def encode_pair(tokenizer: PreTrainedTokenizerBase, prompt: str, choice: str) -> tuple[list[int], list[int]]:
    """Token ids of ``prompt`` and of ``choice`` as its continuation (tokenized together, as
    lm-evaluation-harness does, so the split follows the tokenizer's merges)."""
    if prompt.endswith(" "):
        stripped = prompt.rstrip(" ")
        prompt, choice = stripped, prompt[len(stripped):] + choice
    context = tokenizer(prompt).input_ids
    whole = tokenizer(prompt + choice).input_ids
    if whole[: len(context)] == context and len(whole) > len(context):
        return context, whole[len(context):]
    return context, tokenizer(choice, add_special_tokens=False).input_ids


def _pad(rows: Sequence[Sequence[int]], pad: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``rows`` as ``ids [n, width]`` (long) and ``mask [n, width]`` (long), padded on one side."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        where = slice(width - len(row), width) if left else slice(0, len(row))
        ids[i, where] = torch.tensor(row, dtype=torch.long)
        mask[i, where] = 1
    return ids, mask


@torch.no_grad()
def _batch_scores(
    model: nn.Module, readouts: Mapping[str, Readout], contexts: list[list[int]], continuations: list[list[list[int]]], pad: int
) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """Log-likelihoods ``{name: [batch, L + 1, choices]}``, answer-position states
    ``[batch, L + 1, d]`` and prompt-mean states ``[batch, L + 1, d]`` of one batch of examples."""
    parts = next(iter(readouts.values())).parts
    device = parts.embedding.weight.device
    points = [f"resid.{layer}" for layer in range(parts.num_layers + 1)]
    ctx_ids, ctx_mask = _pad(contexts, pad, left=True)
    with hooked(parts, read=points) as values:
        out = model(input_ids=ctx_ids.to(device), attention_mask=ctx_mask.to(device),
                    position_ids=(ctx_mask.cumsum(-1) - 1).clamp_min(0).to(device), use_cache=True)
    answer_states = torch.stack([values[p][:, -1] for p in points], 1)  # [batch, L+1, d]
    weights = (ctx_mask.float() / ctx_mask.sum(-1, keepdim=True)).to(device)  # padding weighs 0: [batch, seq]
    prompt_mean = torch.stack([torch.einsum("bs,bsd->bd", weights, values[p].float()) for p in points], 1)
    n = len(continuations[0])
    cache = output_cache(out)
    cache.batch_repeat_interleave(n)
    flat = [choice for choices in continuations for choice in choices]
    cont_ids, cont_mask = _pad(flat, pad, left=False)
    start = ctx_mask.sum(-1).repeat_interleave(n)[:, None]
    mask = torch.cat([ctx_mask.repeat_interleave(n, 0), cont_mask], 1)
    with hooked(parts, read=points) as values:
        model(input_ids=cont_ids.to(device), attention_mask=mask.to(device), **with_cache(model, cache),
              position_ids=(start + torch.arange(cont_ids.shape[1])).to(device), use_cache=True)
    keep = cont_mask.to(device).bool()  # only real choice tokens are decoded: [1, tokens, d] per layer
    states = [torch.cat([answer_states[:, l].repeat_interleave(n, 0)[:, None], values[p][:, :-1]], 1)[keep][None]
              for l, p in enumerate(points)]
    targets = cont_ids.to(device)[keep]  # [tokens]
    owner = torch.arange(keep.shape[0], device=device)[:, None].expand_as(keep)[keep]  # row of each token
    scores = {}
    for name, readout in readouts.items():
        per_layer = []
        for _, logits in readout.iter_logits(states):
            picked = logits[0].float().log_softmax(-1).gather(-1, targets[:, None])[:, 0]
            summed = torch.zeros(keep.shape[0], device=device).index_add_(0, owner, picked)
            per_layer.append(summed.view(-1, n))
        scores[name] = torch.stack(per_layer, 1).double().cpu()
    return scores, answer_states.float().cpu(), prompt_mean.cpu()


def score_choices(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    readouts: Mapping[str, Readout],
    examples: Sequence[Example],
    *,
    batch_size: int = 8,
    progress: bool = True,
    description: str = "scoring choices",
) -> ChoiceScores:
    """Per-layer choice log-likelihoods of ``examples`` under every readout (see the module
    docstring), with the residual states at the answer position and averaged over each prompt;
    all readouts must decode ``model``. ``batch_size`` prompts run at a time."""
    if not examples:
        raise TaskError("no examples to score: give a task with at least one example")
    if not readouts:
        raise TaskError("no readouts given: pass at least one lens (e.g. {'logit': LogitLens(model)})")
    model = unwrap_model(model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    limit = getattr(model.config, "max_position_embeddings", None)
    pairs = [[encode_pair(tokenizer, e.prompt, c) for c in e.choices] for e in examples]
    for index, (example, example_pairs) in enumerate(zip(examples, pairs)):
        longest = len(example_pairs[0][0]) + max(len(c) for _, c in example_pairs)
        if isinstance(limit, int) and longest > limit:
            raise TaskError(f"example {example.id or index}: prompt and choice take {longest} tokens but the model "
                            f"reads at most {limit}; use shorter prompts or fewer demonstrations")
    order = sorted(range(len(examples)), key=lambda i: len(pairs[i][0][0]))  # similar lengths pad less
    loglik: dict[str, list[torch.Tensor]] = {name: [] for name in readouts}
    hidden, means = [], []
    bar = tqdm(total=len(examples), desc=description, unit="ex", disable=not progress)
    for begin in range(0, len(examples), batch_size):
        batch = [pairs[i] for i in order[begin: begin + batch_size]]
        contexts = [p[0][0] for p in batch]
        continuations = [[c for _, c in p] for p in batch]
        scores, states, mean = _batch_scores(model, readouts, contexts, continuations, pad)
        for name in readouts:
            loglik[name].append(scores[name])
        hidden.append(states)
        means.append(mean)
        bar.update(len(batch))
    bar.close()
    restore = torch.argsort(torch.tensor(order))
    return ChoiceScores(
        loglik={name: torch.cat(parts)[restore].numpy() for name, parts in loglik.items()},
        gold=np.array([e.gold for e in examples], dtype=np.int64),
        hidden=torch.cat(hidden)[restore].numpy(),
        ids=[e.id or str(i) for i, e in enumerate(examples)],
        prompt_mean=torch.cat(means)[restore].numpy(),
    )


__all__ = ["ChoiceScores", "encode_pair", "score_choices"]
