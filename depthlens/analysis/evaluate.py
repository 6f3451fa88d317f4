"""Per-layer evaluation of readouts on held-out text, with bootstrap confidence intervals.

For every readout (any :class:`~depthlens.lenses.readout.Readout`, e.g. a lens) and layer ``l``
(0 … L) and every position that has a next token (a lens inside the blocks,
:class:`~depthlens.lenses.mid.MidTunedLens`, reads the mid states of the same forward pass and its
rows sit at half-layers: ``"layer"`` is ``l + 0.5`` for ``l < L``, see
:func:`~depthlens.model.hidden_states.depth`):

- ``kl``: KL(p_L ‖ q_l), the distillation loss, in nats;
- ``ce``: cross-entropy of q_l to the actual next token;
- ``entropy``: entropy of q_l;
- ``top1``: whether q_l's top-1 is the model's top-1 (a fraction, not nats); where ``m`` tokens tie
  at q_l's largest logit, as bfloat16 logits often do, and the model's top-1 is one of them, it
  counts ``1 / m`` (:attr:`~depthlens.stats.logit_statistics.Scores.top1_share`);
- ``bias``: KL between the *marginal* (token-averaged) final distribution and the marginal lens
  distribution, as in the paper (its interval's spread is resampled over the
  :data:`BIAS_HEAD_TOKENS` likeliest tokens and one bucket for the rest).

The divergences are those of :mod:`depthlens.stats.divergences`. Nats are also reported as bits
per byte of the predicted text (``nats / ln 2 / bytes``). Intervals come from a bootstrap over
groups of chunks, centred on the point estimate (:mod:`depthlens.stats.bootstrap`; chunks are assigned round-robin to
``min(groups, chunks)`` groups, so no group is ever empty and tokens of one chunk are resampled
together). With fewer than :data:`MIN_GROUPS` chunks there is no interval: a warning says so, the
rows hold ``ci_low = ci_high = None`` and ``meta["interval"]`` is ``None`` with the reason in
``meta["interval_note"]``. An interval is never NaN.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from depthlens.analysis.cells import chunk_windows
from depthlens.errors import EvaluationError
from depthlens.lenses.mid import site_of
from depthlens.lenses.readout import Readout
from depthlens.model.architecture import ModelParts, find_parts
from depthlens.model.hidden_states import capture_sites, depth
from depthlens.model.precision import DtypeName, computing_in, float32_logits, resolve_dtype
from depthlens.model.unwrap import unwrap_model
from depthlens.stats.bootstrap import bootstrap_samples, centred_interval
from depthlens.stats.fused import fused_wanted
from depthlens.stats.logit_statistics import LogitStatistics
from depthlens.text.data import Split, TextSource, load_chunks

SUMMED_METRICS = ("kl", "ce", "entropy", "top1")
MIN_GROUPS = 8
"""Fewest groups of chunks a bootstrap interval is computed from; with fewer chunks there is none."""
LEVEL = 0.95
"""Coverage of the bootstrap intervals."""
NATS_METRICS = ("kl", "ce", "entropy", "bias")
BIAS_HEAD_TOKENS = 4096
"""The bias's bootstrap resamples the marginals of this many tokens (those with the most
probability) and one bucket for the rest of the vocabulary: the point estimate is exact, and the
interval's spread comes from the coarsened distributions, 12–64× cheaper on 49k–262k tokens."""
DEFAULT_EVAL_TOKENS = 4096
"""Held-out tokens of the default evaluation: 16 chunks of 256, 16 bootstrap groups."""


@dataclass
class _Sums:
    """Per group and layer sums for one lens: ``values [metric, groups, layers]`` (float64) and
    the summed lens probabilities ``marginals [layers, groups, vocab]`` (float32)."""

    values: torch.Tensor
    marginals: torch.Tensor


@dataclass
class _Totals:
    """Everything :func:`evaluate` accumulates: per-lens sums, the summed final probabilities
    ``final_marginal [groups, vocab]`` and the tokens per group ``token_counts [groups]``."""

    sums: dict[str, _Sums]
    final_marginal: torch.Tensor
    token_counts: torch.Tensor
    bytes: int = 0

    @classmethod
    def zeros(cls, names: Iterable[str], groups: int, num_layers: int, vocab: int, device: torch.device) -> _Totals:
        sums = {
            name: _Sums(torch.zeros(len(SUMMED_METRICS), groups, num_layers, dtype=torch.float64, device=device),
                        torch.zeros(num_layers, groups, vocab, device=device))
            for name in names
        }
        return cls(sums, torch.zeros(groups, vocab, device=device), torch.zeros(groups, dtype=torch.float64, device=device))

    def cpu(self) -> _Totals:
        """The same totals on the CPU, where the bootstrap runs."""
        sums = {name: _Sums(s.values.cpu(), s.marginals.cpu()) for name, s in self.sums.items()}
        return _Totals(sums, self.final_marginal.cpu(), self.token_counts.cpu(), self.bytes)


@dataclass
class EvalReport:
    """Per-layer metrics of several lenses; ``table`` rows are plain dicts (JSON/CSV ready)."""

    table: list[dict[str, Any]]
    tokens: int
    bytes: int
    meta: dict[str, Any] = field(default_factory=dict)
    differences: list[dict[str, Any]] = field(default_factory=list)
    """Paired differences from the first lens (the baseline), from :func:`evaluate`: one row per
    other lens, layer and metric (``kl``, ``ce``; nats), with ``"baseline"`` naming the first lens
    and ``value = lens − baseline`` (negative: the lens is closer to the model)."""

    def mean(self, lens: str, metric: str, unit: str = "nats") -> list[float]:
        """The per-layer means of ``metric`` for ``lens``, in layer order."""
        rows = [r for r in self.table if r["lens"] == lens and r["metric"] == metric and r["unit"] == unit]
        return [r["value"] for r in sorted(rows, key=lambda r: r["layer"])]

    def to_json(self) -> dict[str, Any]:
        """Everything as one JSON-serialisable dict."""
        return {"tokens": self.tokens, "bytes": self.bytes, "meta": self.meta, "table": self.table,
                "differences": self.differences}

    def beats_baseline(self, lens: str, metric: str = "kl") -> tuple[int, int, int]:
        """``(better, surely_better, layers)``: at how many of the layers ``0 … L−1`` the paired
        difference of ``metric`` from the baseline is below 0, and its interval entirely below 0."""
        rows = sorted((r for r in self.differences if r["lens"] == lens and r["metric"] == metric),
                      key=lambda r: r["layer"])[:-1]
        return (sum(r["value"] < 0 for r in rows), sum(r["ci_high"] is not None and r["ci_high"] < 0 for r in rows),
                len(rows))

    @property
    def has_intervals(self) -> bool:
        """Whether the rows carry bootstrap intervals (``ci_low``/``ci_high`` not ``None``)."""
        return any(row.get("ci_low") is not None for row in self.table)

    def interval_label(self) -> str:
        """How the report's intervals were made, or why there are none, for titles and tables."""
        interval = self.meta.get("interval")
        if self.has_intervals and isinstance(interval, dict):
            return (f"{round(100 * interval.get('level', LEVEL))}% bootstrap intervals over "
                    f"{interval.get('groups')} groups of chunks")
        if self.has_intervals:
            return "bootstrap intervals"
        return "no intervals: " + str(self.meta.get("interval_note") or "too little data")


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    lenses: Mapping[str, Readout],
    chunks: Iterable[torch.Tensor],
    byte_counts: Iterable[int],
    *,
    batch_size: int = 4,
    groups: int = 20,
    resamples: int = 500,
    seed: int = 0,
    progress: bool = True,
    dtype: DtypeName | torch.dtype = "float32",
) -> EvalReport:
    """Evaluate ``lenses`` (name → readout of ``model``) on token ``chunks`` (each ``[chunk_len]``).

    ``byte_counts`` gives, per chunk, the UTF-8 bytes of its predicted tokens (all but the
    first), which converts nats to bits per byte. Chunks go round-robin to ``min(groups, chunks)``
    bootstrap groups; with fewer than :data:`MIN_GROUPS` chunks the report has no intervals (and
    a warning says so). ``dtype`` (``"auto"``, ``"float32"``, ``"bfloat16"``, see
    :func:`~depthlens.model.precision.resolve_dtype`) sets the precision of the matrix products
    of the forward pass and the decoding; statistics are float32 either way, and
    ``meta["dtype"]`` records the one used. Raises :class:`EvaluationError` if a readout decodes
    with another model object than ``model``, or for no chunks at all.
    """
    model = unwrap_model(model)
    parts = find_parts(model)
    chunk_list, bytes_list = list(chunks), list(byte_counts)
    _check_inputs(parts, lenses, chunk_list, groups)
    groups = min(groups, len(chunk_list))
    device = next(model.parameters()).device
    products = resolve_dtype(dtype, device)
    totals = _Totals.zeros(lenses, groups, parts.num_layers + 1, parts.vocab_size, device)
    logits = sum(chunk.numel() - 1 for chunk in chunk_list) * (parts.num_layers + 1) * len(lenses) * parts.vocab_size
    kernel = fused_wanted(logits, device)
    bar = tqdm(total=len(chunk_list) * (chunk_list[0].numel() - 1) if chunk_list else 0,
               desc="evaluating", unit="tok", disable=not progress)
    for start in range(0, len(chunk_list), batch_size):
        batch = torch.stack(chunk_list[start : start + batch_size])
        _add_batch(totals, model, parts, lenses, batch, start, products, kernel)
        totals.bytes += sum(bytes_list[start : start + batch_size])
        bar.update(batch[:, :-1].numel())
    bar.close()
    tokens = int(totals.token_counts.sum())
    with_intervals = groups >= MIN_GROUPS
    meta: dict[str, Any] = {"interval": {"level": LEVEL, "groups": groups, "resamples": resamples, "seed": seed}}
    if not with_intervals:
        note = (f"only {len(chunk_list)} chunks ({tokens} tokens), and an interval needs at least {MIN_GROUPS}; "
                f"evaluate on more text")
        warnings.warn(f"no bootstrap intervals: {note}", stacklevel=2)
        meta = {"interval": None, "interval_note": note}
    depths = {name: [depth(layer, site_of(lens), parts.num_layers) for layer in range(parts.num_layers + 1)]
              for name, lens in lenses.items()}
    totals = totals.cpu()
    table = _table(totals, depths, tokens, resamples if with_intervals else 0, seed)
    if with_intervals and not all(row["ci_low"] is not None for row in table):
        meta["interval_note"] = "some rows have no interval: their resamples were not finite"
    meta["dtype"] = str(products).removeprefix("torch.")
    return EvalReport(table=table, tokens=tokens, bytes=totals.bytes, meta=meta,
                      differences=_differences(totals, depths, tokens, resamples if with_intervals else 0, seed))


def _check_inputs(parts: ModelParts, lenses: Mapping[str, Readout], chunks: list[torch.Tensor], groups: int) -> None:
    """Raise :class:`EvaluationError` for a readout bound to another model, no chunks, or ``groups < 1``."""
    for name, lens in lenses.items():
        if lens.parts.unembedding is not parts.unembedding:
            raise EvaluationError(f"lens {name!r} is bound to another model object; build or load it onto this model")
    if not chunks:
        raise EvaluationError("there are no chunks to evaluate on; pass some text")
    if groups < 1:
        raise EvaluationError(f"groups must be at least 1, got {groups}")


def _add_batch(
    totals: _Totals, model: torch.nn.Module, parts: ModelParts, lenses: Mapping[str, Readout],
    batch: torch.Tensor, first: int, products: torch.dtype, kernel: bool,
) -> None:
    """Add the statistics of the chunks ``batch [chunks, chunk_len]`` (chunk ``first`` onwards).

    Positions are scored in windows of :func:`~depthlens.analysis.cells.chunk_windows`, one layer
    at a time, by :class:`~depthlens.stats.logit_statistics.LogitStatistics` (its compiled kernel if
    ``kernel``), and summed per group. The
    decoding runs with products in ``products`` (:func:`~depthlens.model.precision.computing_in`), and
    so does the forward pass unless the family keeps it in float32
    (:meth:`~depthlens.model.architecture.ModelParts.forward_dtype`); the statistics are float32. Each readout
    decodes the states of its site (:func:`~depthlens.lenses.mid.site_of`), all read in one
    forward pass."""
    device = totals.token_counts.device
    with computing_in(parts.forward_dtype(products), device):
        sites = capture_sites(model, batch, parts=parts, sites=["block", *(site_of(lens) for lens in lenses.values())])
    states = sites["block"]
    groups, per_chunk = totals.token_counts.numel(), batch.shape[1] - 1
    row_groups = (first + torch.arange(batch.shape[0], device=totals.token_counts.device)).remainder(groups)
    row_groups = row_groups.repeat_interleave(per_chunk)
    flat = {site: each.map_states(lambda state: state[:, :-1].reshape(1, -1, state.shape[-1]))
            for site, each in sites.items()}
    final = states.logits[:, :-1].reshape(len(row_groups), -1)
    next_ids = batch[:, 1:].reshape(-1)
    totals.token_counts.index_add_(0, row_groups, row_groups.new_ones(len(row_groups), dtype=torch.float64))
    for window in chunk_windows(1, len(row_groups), parts.vocab_size):
        scorer = LogitStatistics(final[window], next_ids[window], fused=kernel)
        window_groups = row_groups[window]
        totals.final_marginal.index_add_(0, window_groups, scorer.probs)
        for name, lens in lenses.items():
            sums = totals.sums[name]
            decoded = lens.iter_logits(flat[site_of(lens)].map_states(lambda state, window=window: state[:, window]))
            for layer, logits in float32_logits(decoded, products, device, copy=not kernel):
                scores = scorer(logits, into=(window_groups, sums.marginals[layer]), ranks=False)
                per_token = torch.stack([scores.kl, scores.ce, scores.entropy, scores.top1_share])
                sums.values[:, :, layer].index_add_(1, window_groups, per_token.double())


def _table(totals: _Totals, depths: Mapping[str, list[float]], tokens: int, resamples: int, seed: int) -> list[dict[str, Any]]:
    """One row per lens, layer, metric and unit, with point value and 95% bootstrap interval
    (``None`` bounds for ``resamples=0``, or where the resamples are not finite); the row's
    ``"layer"`` is the depth of the lens's layer, ``depths[lens][layer]``."""
    nats_per_byte = tokens / (totals.bytes * math.log(2)) if totals.bytes else float("nan")
    table = []
    for name, s in totals.sums.items():
        for layer in range(s.values.shape[-1]):
            for metric, (point, low, high) in _estimates(totals, s, layer, tokens, resamples, seed).items():
                units = [("nats", 1.0)] + ([("bits_per_byte", nats_per_byte)] if metric in NATS_METRICS else [])
                if metric == "top1":
                    units = [("fraction", 1.0)]
                for unit, factor in units:
                    table.append({"lens": name, "layer": depths[name][layer], "metric": metric, "unit": unit,
                                  "value": point * factor,
                                  "ci_low": _scaled(low, factor), "ci_high": _scaled(high, factor)})
    return table


def _differences(totals: _Totals, depths: Mapping[str, list[float]], tokens: int, resamples: int,
                 seed: int) -> list[dict[str, Any]]:
    """Each lens's KL and cross-entropy minus the first lens's, at every layer (lenses at other
    depths, e.g. inside the blocks, are skipped). Paired bootstrap: the two lenses' group sums are
    differenced first and resampled from the same groups as every interval, so the variation of
    the text, common to both, cancels."""
    names = list(totals.sums)
    rows = []
    for name in names[1:]:
        if depths[name] != depths[names[0]]:
            continue
        for metric in ("kl", "ce"):
            index = SUMMED_METRICS.index(metric)
            for layer, at in enumerate(depths[name]):
                values = totals.sums[name].values[index, :, layer] - totals.sums[names[0]].values[index, :, layer]
                point = (values.sum() / tokens).item()
                samples = bootstrap_samples(values, totals.token_counts, resamples=resamples, seed=seed) if resamples else None
                low, high = _interval(samples, point)
                rows.append({"lens": name, "baseline": names[0], "layer": at, "metric": metric, "unit": "nats",
                             "value": point, "ci_low": low, "ci_high": high})
    return rows


def _scaled(bound: float | None, factor: float) -> float | None:
    value = None if bound is None else bound * factor
    return value if value is not None and math.isfinite(value) else None


def _interval(samples: torch.Tensor | None, point: float) -> tuple[float | None, float | None]:
    """The :data:`LEVEL` bootstrap interval around ``point``
    (:func:`~depthlens.stats.bootstrap.centred_interval`), or ``(None, None)`` when there are no
    samples or any is not finite."""
    if samples is None or not bool(torch.isfinite(samples).all()) or not math.isfinite(point):
        return None, None
    return centred_interval(samples, point, LEVEL)


def _estimates(
    totals: _Totals, s: _Sums, layer: int, tokens: int, resamples: int, seed: int
) -> dict[str, tuple[float, float, float]]:
    """``metric → (point, ci_low, ci_high)`` for one lens and layer; every metric's interval comes
    from the same resampled groups (no interval, ``None`` bounds, for ``resamples=0``)."""
    estimates: dict[str, tuple[float, float | None, float | None]] = {}
    for index, metric in enumerate(SUMMED_METRICS):
        values = s.values[index, :, layer]
        samples = bootstrap_samples(values, totals.token_counts, resamples=resamples, seed=seed) if resamples else None
        point = (values.sum() / tokens).item()
        estimates[metric] = (point, *_interval(samples, point))
    samples = None
    if resamples:
        marginals = _head_and_rest(torch.stack([totals.final_marginal, s.marginals[layer]], 1))
        samples = bootstrap_samples(marginals, resamples=resamples, seed=seed,
                                    statistic=lambda sums, _: _marginal_kl(sums[:, 0], sums[:, 1]))
    point = _marginal_kl(totals.final_marginal.sum(0), s.marginals[layer].sum(0)).item()
    estimates["bias"] = (point, *_interval(samples, point))
    return estimates


def _head_and_rest(sums: torch.Tensor) -> torch.Tensor:
    """``sums [groups, 2, vocab]`` coarsened to ``[groups, 2, BIAS_HEAD_TOKENS + 1]``: the
    :data:`BIAS_HEAD_TOKENS` tokens with the most summed probability, and one bucket for the rest
    (unchanged if the vocabulary is no larger). The rest is summed from its own entries, not taken
    as the total minus the head: a near one-hot readout's tail holds less than the float32 rounding
    of its total (gemma3-270m's logit lens at the embeddings), and the difference was that rounding."""
    if sums.shape[-1] <= BIAS_HEAD_TOKENS + 1:
        return sums
    head = sums.sum((0, 1)).topk(BIAS_HEAD_TOKENS).indices
    rest = sums.index_fill(-1, head, 0.0).sum(-1)
    return torch.cat([sums[..., head], rest[..., None]], -1)


def _marginal_kl(p_sum: torch.Tensor, q_sum: torch.Tensor) -> torch.Tensor:
    """KL (nats) between the normalised sums ``p_sum, q_sum [..., vocab]`` → ``[...]``.

    With totals ``P = Σ p_sum`` and ``Q = Σ q_sum``, ``KL = Σ p_sum · log(p_sum / q_sum) / P +
    log(Q / P)``, in a few in-place passes over the vocabulary. ``q_sum`` and the ratio are
    floored at ``1e-30``, so a token that no position gives any probability leaves it finite, and
    ``p_sum = 0`` terms count 0."""
    p_total, q_total = p_sum.sum(-1), q_sum.sum(-1)
    log_ratio = torch.div(p_sum, q_sum.clamp_min(1e-30)).clamp_min_(1e-30).log_()
    return log_ratio.mul_(p_sum).sum(-1) / p_total + torch.log(q_total / p_total)


def evaluate_held_out(
    model: torch.nn.Module,
    tokenizer: Any,
    lenses: Mapping[str, Readout],
    source: TextSource | str | None = None,
    *,
    tokens: int = DEFAULT_EVAL_TOKENS,
    chunk_len: int = 256,
    split: Split = "validation",
    shuffle_seed: int | None = 0,
    **options: Any,
) -> EvalReport:
    """Evaluate ``lenses`` on ``tokens`` tokens of the ``split`` of ``source`` (default: the
    validation split, 8 whole plays, of the built-in Shakespeare), in chunks of ``chunk_len``.

    The documents come in the seeded order of ``shuffle_seed`` (``None``: source order), so the
    tokens spread over many plays or documents instead of the first few. ``split="all"`` reads the
    whole source, for out-of-domain text the lens never trained on. ``options`` go to
    :func:`evaluate`.
    """
    chunks = load_chunks(source, tokenizer, chunk_len, max(1, tokens // chunk_len), split=split,
                         shuffle_seed=shuffle_seed)
    byte_counts = [len(tokenizer.decode(chunk[1:].tolist()).encode("utf-8")) for chunk in chunks]
    report = evaluate(model, lenses, list(chunks), byte_counts, **options)
    report.meta.update({"source": str(source or "shakespeare"), "split": split, "chunk_len": chunk_len})
    return report
