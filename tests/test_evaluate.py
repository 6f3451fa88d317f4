"""Per-layer evaluation: metrics against direct computation, intervals, units, report files."""

import csv
import json
import math
import warnings

import pytest
import torch
from tiny_models import VOCAB, tiny_model

from depthlens import LogitLens, TunedLens, capture
from depthlens.analysis import cells
from depthlens.analysis import evaluate as evaluation
from depthlens.analysis.evaluate import MIN_GROUPS, evaluate, evaluate_held_out
from depthlens.stats import fused
from depthlens.viz.report import comparison_table, write_report


@pytest.fixture(scope="module")
def setup():
    model = tiny_model("llama", initializer_range=0.3)
    torch.manual_seed(0)
    chunks = [torch.randint(0, VOCAB, (12,)) for _ in range(10)]
    tuned = TunedLens(model)
    with torch.no_grad():
        for p in tuned.parameters():
            p.normal_(0, 0.05)
    lenses = {"logit": LogitLens(model), "tuned": tuned}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = evaluate(model, lenses, chunks, [30] * 10, batch_size=4, groups=20, resamples=200, progress=False)
    return model, chunks, lenses, report


def test_metrics_match_direct_computation(setup):
    model, chunks, lenses, report = setup
    states = capture(model, torch.stack(chunks))
    final = states.logits[:, :-1].log_softmax(-1)
    next_ids = torch.stack(chunks)[:, 1:]
    for name, lens in lenses.items():
        for layer in range(len(states)):
            log_q = lens(states[layer], layer)[:, :-1].log_softmax(-1)
            q = log_q.exp()
            expected = {
                "kl": (final.exp() * (final - log_q)).sum(-1).mean(),
                "ce": -log_q.gather(-1, next_ids[..., None]).mean(),
                "entropy": -(q * log_q).sum(-1).mean(),
                "top1": (log_q.argmax(-1) == final.argmax(-1)).float().mean(),
            }
            p_bar, q_bar = final.exp().mean((0, 1)), q.mean((0, 1))
            expected["bias"] = (p_bar * (p_bar.log() - q_bar.log())).sum()
            for metric, value in expected.items():
                unit = "fraction" if metric == "top1" else "nats"
                (row,) = [r for r in report.table if (r["lens"], r["layer"], r["metric"], r["unit"]) == (name, layer, metric, unit)]
                assert row["value"] == pytest.approx(value.item(), abs=1e-5), (name, layer, metric)
                assert row["ci_low"] - 1e-9 <= row["value"] <= row["ci_high"] + 1e-9


def test_windows_that_cut_across_chunks_change_nothing(setup, monkeypatch):
    """Positions are scored in windows; a window of 5 positions cuts the 11-position chunks (and
    so the bootstrap groups) apart, and every value and interval must stay the same."""
    model, chunks, lenses, report = setup
    monkeypatch.setattr(cells, "CHUNK_ELEMENTS", 5 * VOCAB)
    windowed = evaluate(model, lenses, chunks, [30] * 10, batch_size=4, groups=20, resamples=200, progress=False)
    for row, other in zip(report.table, windowed.table, strict=True):
        assert (row["lens"], row["layer"], row["metric"]) == (other["lens"], other["layer"], other["metric"])
        for key in ("value", "ci_low", "ci_high"):
            assert other[key] == pytest.approx(row[key], abs=1e-5), (row, other)


def test_the_compiled_kernel_gives_the_eager_passes_numbers(setup, monkeypatch):
    """With ``DEPTHLENS_FUSED=1`` every window goes through the compiled kernel, and every value
    and interval equals the eager run's to float32 rounding."""
    model, chunks, lenses, report = setup
    monkeypatch.setenv(fused.FUSED_ENV, "1")
    real, calls = fused.row_sums, []
    monkeypatch.setattr(fused, "row_sums", lambda *args: calls.append(1) or real(*args))
    compiled = evaluate(model, lenses, chunks, [30] * 10, batch_size=4, groups=20, resamples=200, progress=False)
    assert len(calls) == 3 * 2 * (model.config.num_hidden_layers + 1)  # batches × lenses × layers
    for row, other in zip(report.table, compiled.table, strict=True):
        assert (row["lens"], row["layer"], row["metric"]) == (other["lens"], other["layer"], other["metric"])
        for key in ("value", "ci_low", "ci_high"):
            assert other[key] == pytest.approx(row[key], abs=1e-5), (row, other)


def test_last_layer_is_the_model_and_the_tuned_lens_differs(setup):
    _, _, _, report = setup
    assert report.mean("logit", "kl")[-1] == pytest.approx(0.0, abs=1e-6)
    assert report.mean("tuned", "top1", "fraction")[-1] == 1.0
    assert report.mean("tuned", "kl")[0] != pytest.approx(report.mean("logit", "kl")[0])


def test_bits_per_byte_convert_nats_by_tokens_per_byte(setup):
    _, _, _, report = setup
    assert report.tokens == 110 and report.bytes == 300
    nats, bpb = report.mean("logit", "ce"), report.mean("logit", "ce", "bits_per_byte")
    for a, b in zip(nats, bpb):
        assert b == pytest.approx(a * 110 / (300 * math.log(2)))


def test_intervals_have_about_the_normal_width(setup):
    model, chunks, lenses, report = setup
    rows = [r for r in report.table if r["metric"] == "ce" and r["unit"] == "nats"]
    assert all(r["ci_high"] > r["ci_low"] for r in rows)
    # Each of the 10 equal chunks is a group: the interval is about the normal one, mean ± 1.96 SD / √10.
    states, next_ids = capture(model, torch.stack(chunks)), torch.stack(chunks)[:, 1:]
    for row in rows:
        log_q = lenses[row["lens"]](states[row["layer"]], row["layer"])[:, :-1].log_softmax(-1)
        per_chunk = -log_q.gather(-1, next_ids[..., None])[..., 0].mean(1).double()
        normal = 2 * 1.96 * float(per_chunk.std(correction=0)) / math.sqrt(len(chunks))
        assert (row["ci_high"] - row["ci_low"]) / normal == pytest.approx(1.0, abs=0.3), row


def test_bootstrap_groups_never_outnumber_the_chunks(setup):
    _, _, _, report = setup
    assert report.meta["interval"]["groups"] == 10
    assert report.interval_label() == "95% bootstrap intervals over 10 groups of chunks"
    assert all(math.isfinite(r["ci_low"]) and math.isfinite(r["ci_high"]) for r in report.table)


def test_too_few_chunks_give_a_warning_and_no_interval_never_nan(setup):
    model, chunks, lenses, _ = setup
    few = chunks[: MIN_GROUPS - 1]
    with pytest.warns(UserWarning, match=f"no bootstrap intervals: only {MIN_GROUPS - 1} chunks"):
        report = evaluate(model, lenses, few, [30] * len(few), groups=20, progress=False)
    assert all(r["ci_low"] is None and r["ci_high"] is None for r in report.table)
    assert all(math.isfinite(r["value"]) for r in report.table)
    assert report.meta["interval"] is None and not report.has_intervals
    assert report.interval_label().startswith("no intervals: only 7 chunks")


def test_the_default_evaluation_has_finite_intervals_around_the_point(setup, tiny_tokenizer):
    model, _, lenses, _ = setup
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        report = evaluate_held_out(model, tiny_tokenizer, lenses, progress=False)
    assert report.tokens >= 4096 - 16 and report.meta["interval"]["groups"] == 16
    assert report.meta["split"] == "validation" and report.meta["source"] == "shakespeare"
    for row in report.table:
        assert row["ci_low"] is not None and math.isfinite(row["ci_low"]) and math.isfinite(row["ci_high"]), row
        assert row["ci_low"] - 1e-9 <= row["value"] <= row["ci_high"] + 1e-9, row


def test_report_files_and_table(setup, tmp_path):
    _, _, _, report = setup
    files = write_report(report, tmp_path / "eval")
    assert json.loads(files["json"].read_text())["tokens"] == 110
    with files["csv"].open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(report.table) and set(rows[0]) == {"lens", "layer", "metric", "unit", "value", "ci_low", "ci_high"}
    assert files["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    html = files["html"].read_text()
    assert "tuned lens" in html and "KL(final" in html
    table = comparison_table(report)
    assert [c.header for c in table.columns][:3] == ["layer", "logit kl", "tuned kl"]
    assert table.row_count == 5


def test_bias_interval_from_the_head_tokens_is_close_to_the_full_one(setup, monkeypatch):
    """The bias's bootstrap resamples the likeliest tokens and one bucket for the rest: the point
    estimate stays exact, and the interval's width stays close to the one over the whole vocabulary."""
    model, chunks, lenses, report = setup
    monkeypatch.setattr(evaluation, "BIAS_HEAD_TOKENS", VOCAB // 4)
    coarse = evaluate(model, lenses, chunks, [30] * 10, batch_size=4, groups=20, resamples=200, progress=False)
    widths = []
    for row, other in zip(report.table, coarse.table, strict=True):
        if row["metric"] == "bias" and row["unit"] == "nats" and row["layer"] < model.config.num_hidden_layers:
            assert other["value"] == row["value"]
            assert other["ci_low"] <= other["value"] <= other["ci_high"]
            widths.append((other["ci_high"] - other["ci_low"]) / (row["ci_high"] - row["ci_low"]))
    assert widths and all(0.5 < width <= 1.05 for width in widths), widths
    sums = torch.rand(3, 2, VOCAB)
    head_and_rest = evaluation._head_and_rest(sums)
    assert head_and_rest.shape == (3, 2, VOCAB // 4 + 1)
    assert torch.allclose(head_and_rest.sum(-1), sums.sum(-1))


def test_the_bias_rest_bucket_holds_a_near_one_hot_readouts_tail_not_the_rounding_of_its_total(monkeypatch):
    """A readout whose probability sits on a few tokens has a tail far below the float32 rounding of
    its summed total (1e-6 over 8128 tokens, under a total of about 320): the rest bucket is that
    tail, to float32 rounding of its own size. Planted bug: the rest taken as the total minus the
    head (it reads 0, and the bias's resamples then see a probability of 1e-30 there)."""
    monkeypatch.setattr(evaluation, "BIAS_HEAD_TOKENS", 64)
    vocab, tail = 8192, 1e-6
    readout = torch.full((3, vocab), tail / vocab)
    readout[:, :64] = torch.rand(3, 64, generator=torch.Generator().manual_seed(0)) * 8 + 1
    rest = evaluation._head_and_rest(torch.stack([torch.ones(3, vocab), readout], 1))[:, 1, -1]
    expected = tail / vocab * (vocab - 64)
    assert torch.allclose(rest.double(), torch.full((3,), expected, dtype=torch.float64), rtol=1e-4, atol=0)


def test_paired_differences_are_the_differences_of_the_same_resamples(setup):
    """Each lens's difference from the first lens is the difference of their table values, and its
    interval is that of the two lenses' resampled means taken from the same groups (the ratio of
    sums is linear in the sums, so pairing is exact); two copies of one lens differ by exactly 0,
    however wide their own intervals. Planted bugs: the baseline resampled with another seed, or
    the sign turned."""
    model, chunks, lenses, report = setup
    groups = torch.arange(len(chunks)).remainder(min(20, len(chunks)))
    counts = torch.zeros(len(groups.unique()), dtype=torch.float64).index_add_(0, groups, torch.full((10,), 11.0,
                                                                                                     dtype=torch.float64))
    states = capture(model, torch.stack(chunks))
    final = states.logits[:, :-1].log_softmax(-1)
    per_lens = {}
    for name, lens in lenses.items():
        sums = torch.zeros(len(counts), model.config.num_hidden_layers + 1, dtype=torch.float64)
        for layer, logits in lens.iter_logits(states):
            kl = (final.exp() * (final - logits[:, :-1].log_softmax(-1))).sum(-1).sum(-1).double()
            sums[:, layer] = torch.zeros(len(counts), dtype=torch.float64).index_add_(0, groups, kl)
        per_lens[name] = sums
    rows = {(r["lens"], r["metric"], r["layer"]): r for r in report.differences}
    assert {r["baseline"] for r in report.differences} == {"logit"} and {r["lens"] for r in report.differences} == {"tuned"}
    for layer in range(model.config.num_hidden_layers + 1):
        row = rows[("tuned", "kl", layer)]
        assert row["value"] == pytest.approx(report.mean("tuned", "kl")[layer] - report.mean("logit", "kl")[layer], abs=1e-5)
        samples = [evaluation.bootstrap_samples(per_lens[name][:, layer], counts, resamples=200, seed=0)
                   for name in ("tuned", "logit")]
        low, high = evaluation.centred_interval(samples[0] - samples[1], row["value"])
        if layer < model.config.num_hidden_layers:
            assert row["ci_low"] == pytest.approx(low, abs=1e-4) and row["ci_high"] == pytest.approx(high, abs=1e-4)
            assert row["ci_low"] < row["value"] < row["ci_high"]
    worse = [r for r in report.differences if r["metric"] == "kl" and r["layer"] < model.config.num_hidden_layers]
    assert report.beats_baseline("tuned") == (sum(r["value"] < 0 for r in worse), sum(r["ci_high"] < 0 for r in worse),
                                              model.config.num_hidden_layers)
    same = evaluate(model, {"logit": lenses["logit"], "again": LogitLens(model)}, chunks, [30] * 10, groups=20,
                    resamples=200, progress=False)
    assert all(r["value"] == 0 and r["ci_low"] == 0 and r["ci_high"] == 0 for r in same.differences)
    assert any(r["ci_high"] - r["ci_low"] > 0.1 for r in same.table if r["metric"] == "kl")
