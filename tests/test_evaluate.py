"""Per-layer evaluation: metrics against direct computation, intervals, units, report files."""

import csv
import json
import math

import pytest
import torch
from tiny_models import VOCAB, tiny_model

from depthlens import LogitLens, TunedLens, capture
from depthlens.analysis.evaluate import evaluate
from depthlens.viz.report import comparison_table, write_report


@pytest.fixture(scope="module")
def setup():
    model = tiny_model("llama", initializer_range=0.3)
    torch.manual_seed(0)
    chunks = [torch.randint(0, VOCAB, (12,)) for _ in range(6)]
    tuned = TunedLens(model)
    with torch.no_grad():
        for p in tuned.parameters():
            p.normal_(0, 0.05)
    lenses = {"logit": LogitLens(model), "tuned": tuned}
    report = evaluate(model, lenses, chunks, [30] * 6, batch_size=4, groups=3, resamples=200, progress=False)
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


def test_last_layer_is_the_model_and_the_tuned_lens_differs(setup):
    _, _, _, report = setup
    assert report.mean("logit", "kl")[-1] == pytest.approx(0.0, abs=1e-6)
    assert report.mean("tuned", "top1", "fraction")[-1] == 1.0
    assert report.mean("tuned", "kl")[0] != pytest.approx(report.mean("logit", "kl")[0])


def test_bits_per_byte_convert_nats_by_tokens_per_byte(setup):
    _, _, _, report = setup
    assert report.tokens == 66 and report.bytes == 180
    nats, bpb = report.mean("logit", "ce"), report.mean("logit", "ce", "bits_per_byte")
    for a, b in zip(nats, bpb):
        assert b == pytest.approx(a * 66 / (180 * math.log(2)))


def test_intervals_have_width(setup):
    _, _, _, report = setup
    rows = [r for r in report.table if r["metric"] == "ce" and r["unit"] == "nats"]
    assert all(r["ci_high"] > r["ci_low"] for r in rows)


def test_report_files_and_table(setup, tmp_path):
    _, _, _, report = setup
    files = write_report(report, tmp_path / "eval")
    assert json.loads(files["json"].read_text())["tokens"] == 66
    with files["csv"].open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(report.table) and set(rows[0]) == {"lens", "layer", "metric", "unit", "value", "ci_low", "ci_high"}
    assert files["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    html = files["html"].read_text()
    assert "tuned lens" in html and "KL(final" in html
    table = comparison_table(report)
    assert [c.header for c in table.columns][:3] == ["layer", "logit kl", "tuned kl"]
    assert table.row_count == 5
