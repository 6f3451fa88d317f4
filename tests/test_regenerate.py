"""``docs/regenerate.py``: every page command is one the CLI accepts, lenses come first, finished
steps are skipped while their command is unchanged, and ``--check`` compares numbers within the
stated intervals."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest

from depthlens.apps.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent


def _load_regenerate():
    sys.path.insert(0, str(ROOT / "docs"))
    spec = importlib.util.spec_from_file_location("regenerate", ROOT / "docs" / "regenerate.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["regenerate"] = module
    spec.loader.exec_module(module)
    return module


regenerate = _load_regenerate()
import agreement  # docs/ is on the path now (_load_regenerate)


@pytest.mark.parametrize("step", regenerate.STEPS, ids=lambda step: step.name)
def test_every_step_is_a_command_the_cli_accepts(step):
    """Planted bug: a page command with an option the CLI dropped (``--k`` renamed) fails here."""
    argv = step.argv(ROOT)
    if step.command[0].endswith(".py"):
        assert (ROOT / step.command[0]).is_file() and argv[1] == step.command[0]
        return
    assert argv[:3] == [sys.executable, "-m", "depthlens"]
    args = build_parser().parse_args(argv[3:])
    assert args.command == step.command[0]
    assert Path(regenerate._relative(ROOT / step.out)) == Path(step.out)


def test_no_step_is_budgeted_by_wall_time_and_every_training_run_is_seeded():
    for step in regenerate.STEPS:
        assert "--minutes" not in step.command
        if step.command[0] == "train":
            assert {"--tokens", "--seed", "--dtype"} <= set(step.command)


def test_outputs_are_distinct_and_lenses_come_first():
    outs = [step.out for step in regenerate.STEPS]
    assert len(outs) == len(set(outs))
    steps = regenerate.plan(["readouts"])
    names = [step.name for step in steps]
    assert names[:2] == ["lens-smollm2", "lens-gemma3"]
    assert all(step.page == "readouts" for step in steps[2:])



def test_a_page_gets_only_the_lenses_it_reads(monkeypatch):
    """Planted bug: every lens trained for any page (half an hour of CPU for nothing)."""
    lenses = [step for step in regenerate.STEPS if step.page == "lenses"]
    a = regenerate.Step("a", "science", ("drift", "--lens", "{gemma3}"), "x")
    b = regenerate.Step("b", "readouts", ("dla", "text"), "y")
    monkeypatch.setattr(regenerate, "STEPS", (*lenses, a, b))
    assert [step.name for step in regenerate.plan(["science"])] == ["lens-gemma3", "a"]
    assert [step.name for step in regenerate.plan(["readouts"])] == ["b"]


def test_lens_placeholders_become_the_docs_lens_folders_under_the_prefix(tmp_path):
    step = next(step for step in regenerate.STEPS if step.name == "drift")
    argv = step.argv(tmp_path)
    lens = argv[argv.index("--lens") + 1]
    assert (ROOT / lens).resolve() == (tmp_path / "runs/docs/smollm2-135m/lens").resolve()
    assert (ROOT / argv[argv.index("--out") + 1]).resolve() == (tmp_path / "docs/science/drift").resolve()
    assert step.needs() == ["lens-smollm2"]
    reused = step.argv(tmp_path, ROOT)
    assert reused[reused.index("--lens") + 1] == "runs/docs/smollm2-135m/lens"
    assert (ROOT / reused[reused.index("--out") + 1]).resolve() == (tmp_path / "docs/science/drift").resolve()


def test_a_check_writes_the_prediction_depth_pictures_under_its_folder_not_into_the_pages(tmp_path):
    """Planted bug: the script's default ``--figures`` (docs/applications): a ``--check`` rerun
    overwrote the pages' committed depth pictures."""
    step = next(step for step in regenerate.STEPS if step.name == "prediction-depth")
    argv = step.argv(tmp_path)
    assert (ROOT / argv[argv.index("--figures") + 1]).resolve() == (tmp_path / "docs/applications").resolve()
    at_home = step.argv(ROOT)
    assert (ROOT / at_home[at_home.index("--figures") + 1]).resolve() == (ROOT / "docs/applications").resolve()


def test_compare_passes_float_noise_and_numbers_inside_the_stated_interval():
    committed = {"rho": -0.808, "rho_interval": [-0.816, -0.800], "seconds": 10.0,
                 "rows": [{"value": 0.5, "low": 0.4, "high": 0.6}, {"kl": [1.0, 2.0]}],
                 "table": [{"value": 1.3, "ci_low": 1.2, "ci_high": 1.4}]}
    fresh = {"rho": -0.812, "rho_interval": [-0.8160000001, -0.80], "seconds": 99.0,
             "rows": [{"value": 0.59, "low": 0.4, "high": 0.6}, {"kl": [1.00000001, 2.0]}],
             "table": [{"value": 1.25, "ci_low": 1.2, "ci_high": 1.4}]}
    assert agreement.compare(committed, fresh) == []


def test_compare_reports_numbers_outside_the_interval_and_missing_ones():
    """Planted bugs: ignoring the interval, or comparing only the keys of the fresh result."""
    committed = {"rho": -0.808, "rho_interval": [-0.816, -0.800], "rows": [{"value": 0.5, "low": 0.4, "high": 0.6}],
                 "gone": 3.0, "plain": 1.0}
    fresh = {"rho": -0.79, "rho_interval": [-0.816, -0.800], "rows": [{"value": 0.61, "low": 0.4, "high": 0.6}],
             "plain": 1.01}
    problems = agreement.compare(committed, fresh)
    assert any(line.startswith(".rho: -0.79") and "outside" in line for line in problems)
    assert any(line.startswith(".rows[0].value: 0.61") for line in problems)
    assert any(line.startswith(".plain: 1.01") for line in problems)
    assert ".gone: missing from the new result" in problems
    assert len(problems) == 4


def test_a_rho_moved_by_other_directions_is_judged_by_its_interval_over_directions_too():
    """A causal ρ states an interval over positions and one over directions: a rerun whose basis holds
    other directions (a lens retrained on another CPU) may move ρ and the ends of either interval
    anywhere inside the smallest interval holding both. Planted bugs: the interval over directions
    ignored (the swap counted outside), or lent to a number of the record that states none (``kl``)."""
    committed = {"rho": 0.594, "rho_low": 0.455, "rho_high": 0.706, "rho_directions_low": -0.01,
                 "rho_directions_high": 0.92, "kl": 1.0, "kl_low": 0.9, "kl_high": 1.1}
    fresh = {"rho": 0.441, "rho_low": 0.308, "rho_high": 0.734, "rho_directions_low": -0.2,
             "rho_directions_high": 0.9, "kl": 0.5, "kl_low": 0.45, "kl_high": 1.05}
    verdicts = {line: verdict for verdict, line in agreement.judge(committed, fresh)}
    assert verdicts[".rho"] == verdicts[".rho_low"] == verdicts[".rho_high"] == "interval"
    assert verdicts[".rho_directions_high"] == "interval" and verdicts[".kl_high"] == "interval"
    assert sorted(line.split(":")[0] for line in agreement.compare(committed, fresh)) == [
        ".kl", ".kl_low", ".rho_directions_low"]


def test_alignment_values_are_judged_by_the_low_and_high_dicts_beside_them():
    """Alignment states ``similarity``, ``low`` and ``high`` as ``{lens: [per layer]}``: a value and the
    ends of its interval are judged by the pair at the same lens and layer. Planted bugs: those
    dicts not read (every moved value counted outside), or another layer's pair used."""
    committed = {"alignment": {"layers": [0, 9], "similarity": {"tuned": [0.0092, 0.44]},
                               "low": {"tuned": [0.0056, 0.42]}, "high": {"tuned": [0.0127, 0.46]}}}
    fresh = {"alignment": {"layers": [0, 9], "similarity": {"tuned": [0.0100, 0.43]},
                           "low": {"tuned": [0.0060, 0.41]}, "high": {"tuned": [0.0130, 0.45]}}}
    verdicts = {line: verdict for verdict, line in agreement.judge(committed, fresh)}
    assert verdicts[".alignment.similarity.tuned[0]"] == verdicts[".alignment.similarity.tuned[1]"] == "interval"
    assert verdicts[".alignment.low.tuned[0]"] == verdicts[".alignment.high.tuned[1]"] == "interval"
    assert sorted(line.split(":")[0] for line in agreement.compare(committed, fresh)) == [
        ".alignment.high.tuned[0]", ".alignment.low.tuned[1]"]


def test_a_benign_control_triple_is_judged_by_its_own_interval():
    """An injection method states its benign-control AUROC as ``[auroc, low, high]``: the AUROC and
    either end move inside ``[low, high]``. Planted bugs: the triple not read (every moved value
    counted outside), its first two numbers taken as the interval, or another key's triple read."""
    committed = {"methods": [{"auroc": 0.99, "low": 0.98, "high": 1.0, "benign": [0.60, 0.50, 0.70],
                              "per_seed": [0.60, 0.50, 0.70]}]}
    fresh = {"methods": [{"auroc": 0.99, "low": 0.98, "high": 1.0, "benign": [0.65, 0.52, 0.69],
                          "per_seed": [0.65, 0.50, 0.70]}]}
    verdicts = {line: verdict for verdict, line in agreement.judge(committed, fresh)}
    assert [verdicts[f".methods[0].benign[{i}]"] for i in range(3)] == ["interval"] * 3
    assert agreement.compare(committed, fresh) == [".methods[0].per_seed[0]: 0.65 against 0.6"]
    moved = {"methods": [{"auroc": 0.99, "low": 0.98, "high": 1.0, "benign": [0.71, 0.49, 0.70],
                          "per_seed": [0.60, 0.50, 0.70]}]}
    assert [line.split(":")[0] for line in agreement.compare(committed, moved)] == [
        ".methods[0].benign[0]", ".methods[0].benign[1]"]


def test_list_elements_and_interval_ends_are_judged_by_the_interval_they_belong_to():
    """Per-layer lists (``kl_nats`` beside ``kl_low``/``kl_high``), the ends of intervals and ``[low, high]``
    pairs: inside the committed interval passes, outside is a problem. Planted bugs: element ``i`` judged
    by another element's interval, or an end judged against nothing."""
    committed = {"kl_nats": [0.25, 0.012], "kl_low": [0.23, 0.011], "kl_high": [0.27, 0.014],
                 "rho": 0.44, "rho_low": 0.38, "rho_high": 0.50, "interval_per_seed": {"tuned": [[0.32, 0.45], [0.38, 0.50]]},
                 "rho_interval": [0.38, 0.5]}
    fresh = {"kl_nats": [0.26, 0.0124], "kl_low": [0.231, 0.0112], "kl_high": [0.268, 0.0139],
             "rho": 0.45, "rho_low": 0.385, "rho_high": 0.49, "interval_per_seed": {"tuned": [[0.321, 0.449], [0.38, 0.50]]},
             "rho_interval": [0.381, 0.5]}
    verdicts = {line: verdict for verdict, line in agreement.judge(committed, fresh)}
    assert verdicts[".kl_nats[1]"] == verdicts[".kl_low[0]"] == verdicts[".rho_high"] == "interval"
    assert verdicts[".interval_per_seed.tuned[0][1]"] == verdicts[".rho_interval[0]"] == "interval"
    fresh["kl_nats"][1] = 0.25  # inside element 0's interval, outside its own
    fresh["interval_per_seed"]["tuned"][0][1] = 0.46
    fresh["kl_high"][1] = 0.0105
    assert sorted(agreement.compare(committed, fresh)) == [
        ".interval_per_seed.tuned[0][1]: 0.46 against 0.45, outside [0.32, 0.45]",
        ".kl_high[1]: 0.0105 against 0.014, outside [0.011, 0.014]",
        ".kl_nats[1]: 0.25 against 0.012, outside [0.011, 0.014]"]
    assert agreement.compare({"counts": [3, 4]}, {"counts": [3, 5]}) == [".counts[1]: 5 against 4"]


def test_a_point_estimate_is_judged_by_its_holders_interval_dict():
    """``rho_per_seed.logit[i]`` by ``interval_per_seed.logit[i]`` and ``rho.logit`` by
    ``interval.logit`` (the layout of ``benchmarks/results/prediction_depth.json``); a dict not
    named after a point estimate (``depth_per_seed``) gets no interval. Planted bugs: element ``i``
    judged by another seed's pair, or any sibling ``interval`` dict taken for any value."""
    committed = {"rho_per_seed": {"logit": [0.39, 0.44]}, "interval_per_seed": {"logit": [[0.32, 0.45], [0.38, 0.50]]},
                 "depth_per_seed": {"logit": [1.3, 1.4]},
                 "runs": [{"rho": {"tuned": 0.42}, "interval": {"tuned": [0.36, 0.48]}, "depth": {"tuned": 0.5}}]}
    fresh = {"rho_per_seed": {"logit": [0.40, 0.41]}, "interval_per_seed": {"logit": [[0.32, 0.45], [0.38, 0.50]]},
             "depth_per_seed": {"logit": [1.3, 1.45]},
             "runs": [{"rho": {"tuned": 0.45}, "interval": {"tuned": [0.36, 0.48]}, "depth": {"tuned": 0.55}}]}
    verdicts = {line: verdict for verdict, line in agreement.judge(committed, fresh)}
    assert verdicts[".rho_per_seed.logit[0]"] == verdicts[".rho_per_seed.logit[1]"] == "interval"
    assert verdicts[".runs[0].rho.tuned"] == "interval"
    assert sorted(agreement.compare(committed, fresh)) == [".depth_per_seed.logit[1]: 1.45 against 1.4",
                                                          ".runs[0].depth.tuned: 0.55 against 0.5"]
    fresh["rho_per_seed"]["logit"][1] = 0.455  # inside seed 1's pair, outside seed 0's
    fresh["rho_per_seed"]["logit"][0] = 0.455
    assert ".rho_per_seed.logit[0]: 0.455 against 0.39, outside [0.32, 0.45]" in agreement.compare(committed, fresh)
    assert not any(line.startswith(".rho_per_seed.logit[1]") for line in agreement.compare(committed, fresh))


def test_a_check_counts_equal_and_interval_numbers_and_records_them_beside_earlier_checks(tmp_path, monkeypatch):
    """Planted bugs: a number inside its interval counted as equal, or a new check erasing the record
    of an earlier one (another step's, or the same step's with another thread count or on another CPU)."""
    monkeypatch.setattr(regenerate, "ROOT", tmp_path)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
    step = regenerate.Step("toy", "science", ("toy", "{out}"), "docs/toy")
    for prefix, value in ((tmp_path, 0.5), (tmp_path / "check", 0.55)):
        (prefix / "docs/toy").mkdir(parents=True)
        (prefix / "docs/toy/result.json").write_text(json.dumps(
            {"rho": value, "rho_low": 0.4, "rho_high": 0.6, "n": 7, "far": 1.0 if prefix == tmp_path else 2.0}))
    found = regenerate.check(step, tmp_path / "check")
    assert (found["same"], found["interval"]) == (3, 1)
    assert found["problems"] == ["docs/toy/result.json.far: 2 against 1"]
    assert found["cpu"] == regenerate.cpu_description()
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    assert regenerate.check(step, tmp_path / "check")["cpu"] == f"{regenerate.cpu_description()} with ATEN_CPU_CAPABILITY=avx2"
    earlier = {"earlier": {"threads=1": {"same": 1}},
               "toy": {"threads=2": {"same": 5}, "threads=1": {"same": 6}, "threads=1 · Other CPU": {"same": 7}}}
    (tmp_path / "docs/checks.json").write_text(json.dumps(earlier))
    regenerate.record_checks({"toy": found})
    regenerate.record_checks({"toy": found})  # the same rerun again replaces its own record
    assert json.loads((tmp_path / "docs/checks.json").read_text()) == {
        "earlier": {"threads=1": {"same": 1}}, "toy": {**earlier["toy"], f"threads=1 · {found['cpu']}": found}}


def test_a_retrained_lens_is_compared_tensor_by_tensor_relative_to_each_tensors_scale(tmp_path, monkeypatch):
    """Planted bugs: an absolute tolerance (a tensor of scale 100 moved by 10⁻³ would pass, one of
    scale 10⁻³ moved by 10⁻⁵ would fail), or a fresh clone, which has no lens of its own, failing."""
    import torch
    from safetensors.torch import save_file
    monkeypatch.setattr(regenerate, "ROOT", tmp_path)
    step = regenerate.Step("lens-toy", "lenses", ("train",), "runs/docs/toy")
    committed = {"big": torch.full((3,), 100.0), "wide": torch.linspace(-50, 50, 4), "small": torch.full((2,), 1e-3),
                 "exact": torch.tensor([1.0, -2.0]), "zero": torch.zeros(2)}
    moved = {"big": 1e-3, "wide": 1e-3, "small": 1e-6}
    for prefix, tensors in ((tmp_path, committed),
                            (tmp_path / "check", {name: tensor + moved.get(name, 0.0) for name, tensor in committed.items()})):
        (prefix / step.out / "lens").mkdir(parents=True)
        save_file(tensors, prefix / step.out / "lens" / "model.safetensors")
    found = regenerate.check_lens(step, tmp_path / "check")
    assert (found["same"], found["tensors"], found["problems"]) == (4, 5, [])
    assert found["largest_difference"] == pytest.approx(1e-3, rel=1e-3)
    assert regenerate.check_lens(step, tmp_path / "elsewhere") is None
    (tmp_path / step.out / "lens" / "model.safetensors").unlink()
    assert regenerate.check_lens(step, tmp_path / "check") is None


def _script_step(tmp_path: Path, name: str = "toy") -> object:
    script = tmp_path / "write.py"
    script.write_text("import sys, pathlib\nout = pathlib.Path(sys.argv[1])\nout.mkdir(parents=True, exist_ok=True)\n"
                      "(out / 'runs.txt').open('a').write('x')\n", encoding="utf-8")
    return regenerate.Step(name, "science", (str(script), "{out}"), "docs/toy")


def test_a_finished_step_is_skipped_until_its_command_changes(tmp_path):
    """Planted bugs: never skipping (an interrupted regeneration starts over) or skipping a changed
    command (stale results)."""
    step = _script_step(tmp_path)
    record_path = tmp_path / regenerate.RECORD
    record: dict = {}
    regenerate.run(step, tmp_path, record, record_path, force=False)
    regenerate.run(step, tmp_path, record, record_path, force=False)
    assert (tmp_path / "docs/toy/runs.txt").read_text() == "x"
    saved = json.loads(record_path.read_text())
    assert saved["toy"]["command"] == list(step.command) and saved["toy"]["seconds"] >= 0
    changed = regenerate.Step("toy", "science", (*step.command, "extra"), step.out)
    regenerate.run(changed, tmp_path, record, record_path, force=False)
    assert (tmp_path / "docs/toy/runs.txt").read_text() == "xx"
    regenerate.run(changed, tmp_path, record, record_path, force=True)
    assert (tmp_path / "docs/toy/runs.txt").read_text() == "xxx"


def test_a_step_that_resumed_kept_layers_says_its_time_is_the_last_part_only(tmp_path, monkeypatch):
    """``causal --resume`` across sessions: the recorded wall time covers only the last part, and the
    timings table says so. Planted bug: a resumed run's minutes shown as the whole run's."""
    step = _script_step(tmp_path)
    (tmp_path / step.out / regenerate.PARTIAL).mkdir(parents=True)
    record_path = tmp_path / regenerate.RECORD
    regenerate.run(step, tmp_path, {}, record_path, force=False)
    saved = json.loads(record_path.read_text())
    assert saved["toy"]["resumed"] is True
    from tables import readouts
    monkeypatch.setattr(readouts, "load", lambda path: saved)
    monkeypatch.setattr(regenerate, "plan", lambda pages: [step])
    assert "| toy | 0.0 (the last part: it resumed layers kept from an earlier run) | " in readouts.timings_table("science")
    fresh = tmp_path / "fresh"
    regenerate.run(step, fresh, {}, fresh / regenerate.RECORD, force=False)
    assert "resumed" not in json.loads((fresh / regenerate.RECORD).read_text())["toy"]


def test_pictures_no_page_shows_are_dropped_and_the_rest_kept(tmp_path):
    script = tmp_path / "pictures.py"
    script.write_text("import sys, pathlib\nout = pathlib.Path(sys.argv[1])\nout.mkdir(parents=True)\n"
                      "for name in ('a.png', 'a.html', 'plotly-4.1.1.min.js', 'a.json'):\n"
                      "    (out / name).write_text('x')\n", encoding="utf-8")
    step = regenerate.Step("pictures", "readouts", (str(script), "{out}"), "docs/pictures", regenerate.HTML)
    regenerate.run(step, tmp_path, {}, tmp_path / regenerate.RECORD, force=False)
    assert sorted(p.name for p in (tmp_path / "docs/pictures").iterdir()) == ["a.json", "a.png"]


def test_a_failed_step_stops_with_one_line_and_records_nothing(tmp_path):
    script = tmp_path / "fail.py"
    script.write_text("raise SystemExit(3)\n", encoding="utf-8")
    step = regenerate.Step("bad", "science", (str(script),), "docs/bad")
    record_path = tmp_path / regenerate.RECORD
    with pytest.raises(SystemExit, match="step bad failed"):
        regenerate.run(step, tmp_path, {}, record_path, force=False)
    assert not record_path.exists()


def test_task_files_are_fetched_once_before_the_first_step_that_reads_them(monkeypatch):
    """A fresh cache: the applications steps would each stop at "run `depthlens tasks fetch`". Planted
    bugs: fetching when the files are there, or for pages whose steps read no task."""
    from depthlens.analysis.applications import builtin
    from depthlens.errors import TaskError

    fetched, present = [], []

    def find(data_dir=None):
        if not present:
            raise TaskError("the built-in task files are not installed")
        return present[0]

    monkeypatch.setattr(builtin, "task_data_dir", find)
    monkeypatch.setattr(builtin, "fetch_task_data", lambda: fetched.append(1) or present.append("here"))
    no_task = [step for step in regenerate.STEPS if "--task" not in step.command]
    regenerate.ensure_task_files(no_task)
    assert fetched == []
    regenerate.ensure_task_files(regenerate.plan(["applications"]))
    regenerate.ensure_task_files(regenerate.plan(["applications"]))
    assert fetched == [1]


def test_an_unknown_page_is_one_clear_error(capsys):
    with pytest.raises(SystemExit):
        regenerate.main(["sciense"])
    assert "unknown page sciense; choose from science, applications, readouts" in capsys.readouterr().err


def _load_tables():
    sys.path.insert(0, str(ROOT / "docs"))
    import tables as module
    return module


tables = _load_tables()


def _eval_result(tuned: list[float], logit: list[float], ci: list[tuple[float, float]]) -> dict:
    rows = [{"lens": lens, "layer": layer, "metric": "kl", "unit": unit, "value": value * scale, "ci_low": value - 0.1,
             "ci_high": value + 0.1}
            for lens, values in (("tuned", tuned), ("logit", logit)) for layer, value in enumerate(values)
            for unit, scale in (("nats", 1.0), ("bits_per_byte", 0.47))]
    differences = [{"lens": "tuned", "baseline": "logit", "layer": layer, "metric": "kl", "value": t - g,
                    "ci_low": low, "ci_high": high} for layer, (t, g, (low, high)) in enumerate(zip(tuned, logit, ci))]
    return {"tokens": 512, "table": rows, "differences": differences}


def test_the_eval_summary_leaves_out_the_last_layer_and_counts_sure_layers():
    """Planted bugs: averaging over the last layer too (where both lenses are the model), averaging
    the bits-per-byte rows in with the nats, or counting point estimates as sure."""
    result = _eval_result([1.0, 2.0, 3.0, 0.0], [4.0, 2.5, 9.0, 0.0],
                          [(-3.5, -2.5), (-0.7, 0.1), (-6.5, -5.5), (0.0, 0.0)])
    summary = tables.science.eval_summary(result)
    assert summary["layers"] == 3
    assert summary["tuned"] == pytest.approx(2.0) and summary["logit"] == pytest.approx(15.5 / 3)
    assert (summary["below"], summary["surely_below"]) == (3, 2)
    assert summary["worst"]["layer"] == 1


def test_render_replaces_only_marked_blocks_and_refuses_unknown_names():
    text = "intro 1.0\n<!-- table: toy -->\nold | row\n<!-- /table -->\nafter 2.0\n"
    rendered = tables.render(text, {"toy": lambda: "| a |\n|---|\n| 3.0 |\n"})
    assert rendered == "intro 1.0\n<!-- table: toy -->\n| a |\n|---|\n| 3.0 |\n<!-- /table -->\nafter 2.0\n"
    with pytest.raises(SystemExit, match="no table named 'toy'"):
        tables.render(text, {})


@pytest.mark.parametrize("page", tables.PAGES)
def test_every_table_on_a_page_is_what_its_committed_results_render_to(page):
    """Planted bug: a number edited on a page, or a result file regenerated without its page."""
    text = (ROOT / "docs" / f"{page}.md").read_text(encoding="utf-8")
    assert tables.BLOCK.search(text), f"docs/{page}.md marks no table"
    assert tables.render(text) == text, f"docs/{page}.md: run `python docs/regenerate.py --tables`"


def test_verdicts_follow_the_intervals_and_name_each_model_when_they_disagree():
    """Planted bugs: a claim called reproduced on point estimates, or one model's verdict standing for both."""
    from tables.common import outcome, verdict
    from tables.science import _compare_layers

    above, below = _compare_layers([0, 9, 18], [(0.5, 0.7), (0.3, 0.5), (0.1, 0.2)], [(0.2, 0.4), (0.4, 0.6), (0.3, 0.5)])
    assert (above, below) == ([0], [18])
    assert outcome(True, False) == "reproduced" and outcome(False, True) == "refuted"
    assert outcome(False, False) == "differs"
    assert verdict({"a": "reproduced", "b": "reproduced"}) == "reproduced"
    assert verdict({"a": "reproduced", "b": "differs"}) == "a: reproduced; b: differs"


def _causal_run(k, tokens, rho, low, high, directions=None):
    """A causal results file of both lenses at layers 0 and 9, every ρ the same (its interval over
    directions ``directions``, else the one over positions), and at the last layer of smollm2 (30),
    where ρ = 1 by construction."""
    d_low, d_high = directions or (low, high)
    fidelity = [{"layer": layer, "rho": rho, "rho_low": low, "rho_high": high, "rho_directions_low": d_low,
                 "rho_directions_high": d_high} for layer in (0, 9)]
    fidelity.append({"layer": 30, "rho": 1.0, "rho_low": 1.0, "rho_high": 1.0, "rho_directions_low": 1.0,
                     "rho_directions_high": 1.0})  # the model's own decoding
    readout = {"fidelity": fidelity, "bases": [{"layer": layer, "energies_nats": [2.0, 1.0]} for layer in (0, 9)]}
    return {"k": k, "tokens": tokens, "layers": [0, 9], "readouts": {"logit": readout, "tuned": readout}}


def test_the_fidelity_claim_is_judged_on_each_models_largest_run(monkeypatch):
    """Planted bugs: the claims table judging smollm2 on its k = 12 run when a k = 64 one exists, or
    counting the last layer, where both lenses are the model's decoding."""
    from tables import science

    small, large = _causal_run(12, 384, 0.9, 0.8, 0.95), _causal_run(64, 2048, -0.5, -0.7, -0.2)
    large["alignment"] = small["alignment"] = {"layers": [0], "low": {"logit": [0.1], "tuned": [0.5]},
                                               "high": {"logit": [0.2], "tuned": [0.6]}}
    monkeypatch.setattr(science, "load", lambda path: large if "causal_k64" in path else small)
    monkeypatch.setattr(science, "_finished", lambda path: "gemma3" not in path)
    monkeypatch.setattr(science, "ROOT", Path("/nonexistent"))  # no unfinished run either
    assert [run["k"] for run in science.fidelity_runs("smollm2-135m")] == [12, 64]
    assert [run["k"] for run in science.fidelity_runs("gemma3-270m")] == [12]
    row = science.claim_causal_rows()[0]
    assert row[2] == "tuned ρ -0.50–-0.50 at layers 0, 9 (k = 64, 2048 tokens)"
    assert row[3] == "tuned ρ 0.90–0.90 at layers 0, 9 (k = 12, 384 tokens)"
    assert row[-1] == "smollm2-135m: refuted; gemma3-270m: reproduced"


def test_a_lens_is_ahead_in_fidelity_only_where_its_intervals_over_positions_and_directions_both_clear(monkeypatch):
    """The tuned lens's ρ intervals over positions clear the logit lens's at both layers, but over
    directions only at layer 0. Planted bug: the comparison reading the interval over positions alone
    (it would call the tuned lens ahead at layer 9 too)."""
    from tables import science

    run = _causal_run(64, 2048, 0.9, 0.85, 0.95)
    logit = _causal_run(64, 2048, 0.5, 0.4, 0.6)["readouts"]["logit"]
    run["readouts"]["logit"] = logit
    logit["fidelity"][1].update(rho_directions_low=0.2, rho_directions_high=0.88)
    run["readouts"]["tuned"]["fidelity"][1]["rho_directions_low"] = 0.7
    run["alignment"] = {"layers": [0], "low": {"logit": [0.1], "tuned": [0.5]}, "high": {"logit": [0.2], "tuned": [0.6]}}
    monkeypatch.setattr(science, "load", lambda path: run)
    monkeypatch.setattr(science, "_finished", lambda path: False)
    monkeypatch.setattr(science, "ROOT", Path("/nonexistent"))
    ahead = science.claim_causal_rows()[1]
    assert ahead[2].startswith("tuned above the logit lens at 0, below at none of layers 0, 9")
    assert science.rho_hull(run["readouts"]["tuned"]["fidelity"][1]) == (0.7, 0.95)


def _partial_layer(folder, layer, rho):
    """One layer as ``causal --resume`` keeps it in ``folder/partial/<readout>/layer_<layer>``."""
    where = folder / "partial" / "lens" / f"layer_{layer}"
    where.mkdir(parents=True)
    settings = {"k": 64, "tokens": 2048}
    fidelity = {"layer": layer, "rho": rho, "low": rho - 0.1, "high": rho + 0.05, "readout_kl": [0.5, 0.2, 0.1, 0.3],
                "model_kl": [0.4, 0.3, 0.1, 0.2]}
    (where / "fidelity.json").write_text(json.dumps({"settings": settings, "fidelity": fidelity}))
    (where / "bases.json").write_text(json.dumps({"bases": [{"layer": layer, "energies_nats": [3.0, 1.0]}]}))


def test_an_unfinished_k64_run_shows_its_finished_layers_and_decides_no_claim(monkeypatch, tmp_path):
    """Planted bugs: the layers a resumable run has finished left off the fidelity table, a lens without
    any layer shown as if measured, or the claims table judging gemma3 on an unfinished run."""
    from tables import science

    small = _causal_run(12, 384, 0.9, 0.8, 0.95)
    small["alignment"] = {"layers": [0], "low": {"logit": [0.1], "tuned": [0.5]}, "high": {"logit": [0.2], "tuned": [0.6]}}
    monkeypatch.setattr(science, "load", lambda path: small)
    monkeypatch.setattr(science, "_finished", lambda path: False)
    monkeypatch.setattr(science, "ROOT", tmp_path)
    monkeypatch.setattr(science, "K64", {"smollm2-135m": "none", "gemma3-270m": "gemma3/causal_k64"})
    for layer, rho in ((3, 0.5), (0, 0.25)):
        _partial_layer(tmp_path / "gemma3/causal_k64/logit", layer, rho)
    runs = science.fidelity_runs("gemma3-270m", partial=True)
    assert [(run["k"], run["layers"], run["partial"]) for run in runs] == [(12, [0, 9], False), (64, [0, 3], True)]
    rows = [line for line in science.fidelity_table().splitlines() if "(unfinished)" in line]
    assert rows == ["| gemma3-270m | 0 of 18 | 64 (unfinished) | 2048 | 0.25 [0.15, 0.30] [-1.00, 1.00] | not run yet |",
                    "| gemma3-270m | 3 of 18 | 64 (unfinished) | 2048 | 0.50 [0.40, 0.55] [-1.00, 1.00] | not run yet |"]
    assert "| gemma3-270m | logit | 3 | 3.0, 1.0 | 1.000 | 4.0 | 1.00 |" in science.energy_k64_table()
    assert [run["k"] for run in science.fidelity_runs("gemma3-270m")] == [12]
    assert science.claim_causal_rows()[0][3] == "tuned ρ 0.90–0.90 at layers 0, 9 (k = 12, 384 tokens)"
    finished = {"k": 64, "tokens": 2048, "layers": [0, 9], "readouts": {"tuned": {"fidelity": [
        {"layer": layer, "rho": 0.7, "rho_low": 0.6, "rho_high": 0.8, "rho_directions_low": 0.5,
         "rho_directions_high": 0.9} for layer in (0, 9)], "bases": []}}}
    monkeypatch.setattr(science, "load", lambda path: finished if "causal_k64" in path else small)
    monkeypatch.setattr(science, "_finished", lambda path: path.endswith("gemma3/causal_k64/tuned/results.json"))
    fidelity, ahead = science.claim_causal_rows()[:2]
    assert fidelity[3] == "tuned ρ 0.70–0.70 at layers 0, 9 (k = 64, 2048 tokens)"  # the tuned lens alone decides
    # both lenses needed: the logit lens is unfinished
    assert ahead[3].endswith("of layers 0, 9 (k = 12, 384 tokens; both intervals apart)")


def _injection(model, task, best, benign):
    """An injection result whose one tuned-lens detector scores ``best`` and ``benign`` (AUROC, low, high)."""
    method = {"readout": "tuned", "auroc": best[0], "low": best[1], "high": best[2], "benign": list(benign)}
    return {"model": model, "task": task, "methods": [method]}


def test_injection_verdict_notes_which_tasks_flag_benign_insertions_and_which_tell_attacks_apart(monkeypatch):
    """Planted bugs: a note saying "attacks and benign insertions score alike" whatever the results, or
    a task whose attack AUROC is below 0.9 counted as detected."""
    from tables import applications

    models = list(applications.INJECTION)
    results = [_injection(models[0], "sst2", (1.0, 0.99, 1.0), (1.0, 0.98, 1.0)),
               _injection(models[0], "piqa", (0.81, 0.74, 0.88), (0.48, 0.38, 0.58)),
               _injection(models[1], "sst2", (1.0, 0.99, 1.0), (0.99, 0.97, 1.0))]
    monkeypatch.setattr(applications, "injection_results", lambda: results)
    row = applications.claim_injection_rows()[0]
    assert row[2] == "sst2 1.00 (benign 1.00); piqa 0.81 (benign 0.48)"
    assert row[-1] == ("differs (near 1 on sst2, where benign insertions score as high; attacks told apart from "
                       f"benign insertions, below 0.9, on piqa on {models[0]})")
    results[:] = [_injection(model, "sst2", (0.97, 0.95, 1.0), (0.5, 0.4, 0.6)) for model in models]
    assert applications.claim_injection_rows()[0][-1] == "reproduced"
    results[:] = [_injection(model, "arc_easy", (0.55, 0.45, 0.65), (0.5, 0.4, 0.6)) for model in models]
    assert applications.claim_injection_rows()[0][-1] == "refuted"


LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def _linked_files() -> tuple[set[Path], list[str]]:
    """Every file a relative link of the README or a docs page points to, and the links that point nowhere."""
    linked, broken = set(), []
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]:
        for target in LINK.findall(page.read_text(encoding="utf-8")):
            if re.match(r"[a-z]+:", target):
                continue
            path = (page.parent / target).resolve()
            linked.add(path)
            if not path.exists():
                broken.append(f"{page.relative_to(ROOT)} → {target}")
    return linked, broken


def test_every_link_resolves_and_every_regenerated_picture_is_shown_on_a_page():
    """Planted bugs: a page pointing at a result that was dropped or never run, or a step leaving
    pictures behind that no page shows (issue: keep only pictures a page shows)."""
    linked, broken = _linked_files()
    assert not broken
    pictures = [path for page in regenerate.PAGES for path in (ROOT / "docs" / page).rglob("*")
                if path.suffix in (".png", ".html")]
    assert pictures
    assert [str(path.relative_to(ROOT)) for path in pictures if path.resolve() not in linked] == []
