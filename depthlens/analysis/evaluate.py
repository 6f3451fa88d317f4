"""Per-layer evaluation of lenses on held-out text, with bootstrap confidence intervals.

For every lens and layer ``l`` (0 … L) and every position that has a next token:

- ``kl``: KL(p_L ‖ q_l), the distillation loss, in nats;
- ``ce``: cross-entropy of q_l to the actual next token;
- ``entropy``: entropy of q_l;
- ``top1``: whether q_l's top-1 token equals the model's top-1 (a fraction, not nats);
- ``bias``: KL between the *marginal* (token-averaged) final distribution and the marginal lens
  distribution, as in the paper.

Nats are also reported as bits per byte of the predicted text (``nats / ln 2 / bytes``). Intervals
come from a bootstrap over groups of chunks (chunks are assigned round-robin to ``groups``), so
tokens of one document are resampled together.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from depthlens.model.architecture import find_parts
from depthlens.text.data import TextSource, load_chunks
from depthlens.model.hidden_states import capture
from depthlens.lenses.lens import Lens

SUMMED_METRICS = ("kl", "ce", "entropy", "top1")
NATS_METRICS = ("kl", "ce", "entropy", "bias")


@dataclass
class _Sums:
    """Per group and layer sums for one lens: ``values [metric, groups, layers]`` (float64) and
    the summed lens probabilities ``marginals [groups, layers, vocab]`` (float32)."""

    values: torch.Tensor
    marginals: torch.Tensor


@dataclass
class EvalReport:
    """Per-layer metrics of several lenses; ``table`` rows are plain dicts (JSON/CSV ready)."""

    table: list[dict[str, Any]]
    tokens: int
    bytes: int
    meta: dict[str, Any] = field(default_factory=dict)

    def mean(self, lens: str, metric: str, unit: str = "nats") -> list[float]:
        """The per-layer means of ``metric`` for ``lens``, in layer order."""
        rows = [r for r in self.table if r["lens"] == lens and r["metric"] == metric and r["unit"] == unit]
        return [r["value"] for r in sorted(rows, key=lambda r: r["layer"])]

    def to_json(self) -> dict[str, Any]:
        """Everything as one JSON-serialisable dict."""
        return {"tokens": self.tokens, "bytes": self.bytes, "meta": self.meta, "table": self.table}


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    lenses: Mapping[str, Lens],
    chunks: Iterable[torch.Tensor],
    byte_counts: Iterable[int],
    *,
    batch_size: int = 4,
    groups: int = 20,
    resamples: int = 500,
    seed: int = 0,
    progress: bool = True,
) -> EvalReport:
    """Evaluate ``lenses`` (name → lens) on token ``chunks`` (each ``[chunk_len]``).

    ``byte_counts`` gives, per chunk, the UTF-8 bytes of its predicted tokens (all but the
    first), which converts nats to bits per byte.
    """
    parts = find_parts(model)
    for name, lens in lenses.items():
        if lens.parts.unembedding is not parts.unembedding:
            raise ValueError(f"lens {name!r} is bound to another model object; build or load it onto this model")
    num_layers, vocab = parts.num_layers + 1, parts.vocab_size
    sums = {
        name: _Sums(torch.zeros(len(SUMMED_METRICS), groups, num_layers, dtype=torch.float64),
                    torch.zeros(groups, num_layers, vocab))
        for name in lenses
    }
    final_marginal = torch.zeros(groups, vocab)
    token_counts = torch.zeros(groups, dtype=torch.float64)
    total_bytes = 0
    chunk_list, bytes_list = list(chunks), list(byte_counts)
    bar = tqdm(total=len(chunk_list) * (chunk_list[0].numel() - 1) if chunk_list else 0,
               desc="evaluating", unit="tok", disable=not progress)
    for start in range(0, len(chunk_list), batch_size):
        batch = torch.stack(chunk_list[start : start + batch_size])
        states = capture(model, batch, parts=parts)
        positions = batch[:, :-1].numel()
        final = states.logits[:, :-1].reshape(positions, -1).float().log_softmax(-1)
        next_ids = batch[:, 1:].reshape(-1).to(final.device)
        final_top1 = final.argmax(-1)
        for offset in range(batch.shape[0]):
            group = (start + offset) % groups
            rows = slice(offset * (batch.shape[1] - 1), (offset + 1) * (batch.shape[1] - 1))
            token_counts[group] += batch.shape[1] - 1
            final_marginal[group] += final[rows].exp().sum(0).cpu()
        for name, lens in lenses.items():
            for layer, logits in lens.iter_logits(states.states):
                log_q = logits[:, :-1].reshape(positions, -1).float().log_softmax(-1)
                q = log_q.exp()
                per_token = torch.stack([
                    (final.exp() * (final - log_q)).sum(-1),
                    -log_q.gather(-1, next_ids[:, None])[:, 0],
                    -(q * log_q).sum(-1),
                    (log_q.argmax(-1) == final_top1).double(),
                ]).double().cpu()
                for offset in range(batch.shape[0]):
                    group = (start + offset) % groups
                    rows = slice(offset * (batch.shape[1] - 1), (offset + 1) * (batch.shape[1] - 1))
                    sums[name].values[:, group, layer] += per_token[:, rows].sum(-1)
                    sums[name].marginals[group, layer] += q[rows].sum(0).cpu()
        total_bytes += sum(bytes_list[start : start + batch_size])
        bar.update(positions)
    bar.close()
    tokens = int(token_counts.sum())
    table = _table(sums, final_marginal, token_counts, tokens, total_bytes, resamples, seed)
    return EvalReport(table=table, tokens=tokens, bytes=total_bytes)


def _table(
    sums: dict[str, _Sums],
    final_marginal: torch.Tensor,
    token_counts: torch.Tensor,
    tokens: int,
    total_bytes: int,
    resamples: int,
    seed: int,
) -> list[dict[str, Any]]:
    generator = torch.Generator().manual_seed(seed)
    groups = token_counts.numel()
    weights = torch.multinomial(torch.ones(groups), groups * resamples, replacement=True, generator=generator)
    weights = torch.nn.functional.one_hot(weights.view(resamples, groups), groups).sum(1).double()
    nats_per_byte = tokens / (total_bytes * math.log(2)) if total_bytes else float("nan")
    table = []
    for name, s in sums.items():
        num_layers = s.values.shape[-1]
        for layer in range(num_layers):
            estimates = {}
            for index, metric in enumerate(SUMMED_METRICS):
                point = s.values[index, :, layer].sum() / tokens
                boot = (weights @ s.values[index, :, layer]) / (weights @ token_counts)
                estimates[metric] = (point.item(), boot)
            estimates["bias"] = (
                _marginal_kl(final_marginal.sum(0), s.marginals[:, layer].sum(0)).item(),
                _marginal_kl(weights.float() @ final_marginal, weights.float() @ s.marginals[:, layer]).double(),
            )
            for metric, (point, boot) in estimates.items():
                low, high = torch.quantile(boot, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
                units = [("nats", 1.0)] + ([("bits_per_byte", nats_per_byte)] if metric in NATS_METRICS else [])
                if metric == "top1":
                    units = [("fraction", 1.0)]
                for unit, factor in units:
                    table.append({"lens": name, "layer": layer, "metric": metric, "unit": unit,
                                  "value": point * factor, "ci_low": low * factor, "ci_high": high * factor})
    return table


def _marginal_kl(p_sum: torch.Tensor, q_sum: torch.Tensor) -> torch.Tensor:
    """KL between the normalised sums ``[..., vocab]`` (nats)."""
    p = p_sum / p_sum.sum(-1, keepdim=True)
    q = q_sum / q_sum.sum(-1, keepdim=True)
    return (p * (p.clamp_min(1e-30).log() - q.clamp_min(1e-30).log())).sum(-1)


def evaluate_held_out(
    model: torch.nn.Module,
    tokenizer: Any,
    lenses: Mapping[str, Lens],
    source: TextSource | str | None = None,
    *,
    tokens: int = 4096,
    chunk_len: int = 256,
    **options: Any,
) -> EvalReport:
    """Evaluate ``lenses`` on ``tokens`` tokens of the validation split of ``source`` (default:
    the built-in Shakespeare), in chunks of ``chunk_len``; ``options`` go to :func:`evaluate`."""
    chunks = load_chunks(source, tokenizer, chunk_len, max(1, tokens // chunk_len), split="validation")
    byte_counts = [len(tokenizer.decode(chunk[1:].tolist()).encode("utf-8")) for chunk in chunks]
    report = evaluate(model, lenses, list(chunks), byte_counts, **options)
    report.meta.update({"source": str(source or "shakespeare"), "split": "validation", "chunk_len": chunk_len})
    return report
