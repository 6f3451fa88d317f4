"""Evaluation reports with and without intervals: JSON, CSV, pictures and titles say which."""

import csv
import json
import math

import pytest
from plotly.offline import get_plotlyjs

from depthlens.analysis.evaluate import EvalReport
from depthlens.viz.report import NO_INTERVAL, curves_title, read_report, write_report


def _report(with_intervals: bool) -> EvalReport:
    table = []
    for lens in ("logit", "tuned"):
        for layer in range(3):
            for metric, unit in (("kl", "nats"), ("ce", "nats"), ("entropy", "nats"), ("bias", "nats"),
                                 ("top1", "fraction")):
                value = 1.0 + layer
                low, high = (value - 0.1, value + 0.1) if with_intervals else (None, None)
                table.append({"lens": lens, "layer": layer, "metric": metric, "unit": unit, "value": value,
                              "ci_low": low, "ci_high": high})
    meta = ({"interval": {"level": 0.95, "groups": 16, "resamples": 500, "seed": 0}} if with_intervals
            else {"interval": None, "interval_note": "only 4 chunks (1020 tokens), and an interval needs at least 8"})
    return EvalReport(table=table, tokens=4080 if with_intervals else 1020, bytes=9000, meta=meta)


def test_a_report_without_intervals_says_so_in_every_file(tmp_path):
    report = _report(False)
    files = write_report(report, tmp_path)
    document = json.loads(files["json"].read_text())
    assert document["intervals"].startswith("no intervals: only 4 chunks")
    assert all(row["ci_low"] is None and row["ci_high"] is None for row in document["table"])
    assert "NaN" not in files["json"].read_text()
    with files["csv"].open() as handle:
        rows = list(csv.DictReader(handle))
    assert all(row["ci_low"] == NO_INTERVAL == row["ci_high"] for row in rows)
    html = files["html"].read_text().replace(get_plotlyjs(), "")  # the figure, without the embedded plotly.js
    assert "no intervals: only 4 chunks" in html and "toself" not in html and "bootstrap intervals" not in html
    assert curves_title(report) == ("per-layer evaluation on 1020 tokens (no intervals: only 4 chunks (1020 tokens), "
                                    "and an interval needs at least 8)")
    assert files["png"].read_bytes()[:4] == b"\x89PNG"
    again = read_report(tmp_path)
    assert not again.has_intervals and again.interval_label() == report.interval_label()


def test_a_report_with_intervals_draws_them_and_names_them(tmp_path):
    report = _report(True)
    files = write_report(report, tmp_path)
    document = json.loads(files["json"].read_text())
    assert document["intervals"] == "95% bootstrap intervals over 16 groups of chunks"
    html = files["html"].read_text().replace(get_plotlyjs(), "")
    assert "toself" in html and "95% bootstrap intervals over 16 groups of chunks" in html
    with files["csv"].open() as handle:
        rows = list(csv.DictReader(handle))
    assert all(math.isfinite(float(row["ci_low"])) for row in rows)


def test_a_non_finite_value_is_refused_rather_than_written_as_nan(tmp_path):
    report = _report(True)
    report.table[0]["ci_low"] = float("nan")
    with pytest.raises(ValueError):
        write_report(report, tmp_path)
