"""``benchmarks/longer_run.py``'s verdict (is the default run within 10% of the longer one?),
on evaluation reports built to have a known answer."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from depthlens.analysis.evaluate import EvalReport

ROOT = Path(__file__).resolve().parent.parent


def _module():
    spec = importlib.util.spec_from_file_location("longer_run", ROOT / "benchmarks" / "longer_run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _report(default: list[float], longer: list[float]) -> EvalReport:
    """Per-layer KLs of both lenses for layers 0…L (then the output layer, 5 and 7 nats, which must be left out), a
    cross-entropy row that must be ignored, and the paired KL differences."""
    table, differences = [], []
    for layer, (a, b) in enumerate(zip([*default, 5.0], [*longer, 7.0])):
        for lens, value in (("default", a), ("longer", b)):
            table.append({"lens": lens, "layer": layer, "metric": "kl", "unit": "nats", "value": value})
            table.append({"lens": lens, "layer": layer, "metric": "ce", "unit": "nats", "value": 100.0})
        differences.append({"lens": "default", "baseline": "longer", "layer": layer, "metric": "kl", "value": a - b,
                            "ci_low": a - b - 0.01, "ci_high": a - b + 0.01})
    return EvalReport(table=table[::-1], tokens=10, bytes=40, differences=differences[::-1])


def test_the_ratio_is_of_the_means_over_the_lens_layers_and_names_the_layers_beyond_ten_percent():
    """Means (1 + 2 + 3) / 3 = 2 against (1 + 1.5 + 3.3) / 3: ratio 6 / 5.8; layer 1 is 2 / 1.5
    > 1.1; layer 2 is below; the output layer and the cross-entropy rows are left out."""
    found = _module().compare(_report([1.0, 2.0, 3.0], [1.0, 1.5, 3.3]), layers=3)
    assert found["mean_kl_default"] == 2.0 and found["mean_kl_longer"] == round(5.8 / 3, 4)
    assert found["ratio"] == round(6.0 / 5.8, 4)
    assert found["within_10_percent"] is True
    assert found["layers_beyond_10_percent"] == [1]
    assert [row["layer"] for row in found["per_layer"]] == [0, 1, 2]
    assert [row["difference"] for row in found["per_layer"]] == [0.0, 0.5, -0.3]
    assert found["per_layer"][1]["default"] == 2.0 and found["per_layer"][1]["longer"] == 1.5


def test_a_default_run_more_than_ten_percent_above_is_not_within():
    """Means 1.2 against 1.0 (ratio 1.2): not within; exactly 1.1 is within."""
    module = _module()
    assert module.compare(_report([1.2, 1.2], [1.0, 1.0]), layers=2)["within_10_percent"] is False
    assert module.compare(_report([1.1, 1.1], [1.0, 1.0]), layers=2)["within_10_percent"] is True
