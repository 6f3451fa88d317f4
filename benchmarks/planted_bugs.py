"""Plant one of the bugs the test suite must catch, in memory, for one pytest run.

A pytest plugin: the library files are never edited, the bug is monkeypatched in when pytest
starts. Each planted bug must make at least one test fail::

    PLANT=resume_from_scratch python -m pytest -p planted_bugs tests/test_mutations_training.py -q
    python benchmarks/planted_bugs.py            # every bug against its tests, with a summary

(``benchmarks`` must be on ``PYTHONPATH`` for ``-p planted_bugs``; the script sets it.)
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from planted_dla import DLA_PLANTS
from planted_lenses import LENS_PLANTS
from planted_science import SCIENCE_PLANTS
from planted_training import TRAINING_PLANTS

ROOT = Path(__file__).resolve().parents[1]


def _bootstrap_point() -> None:
    """Intervals are the point estimate ± 1e-3."""
    from depthlens.analysis import evaluate
    from depthlens.stats import bootstrap

    def group_bootstrap(values, weights=None, **_):
        point = float(values.sum() / (weights.sum() if weights is not None else len(values)))
        return point - 1e-3, point + 1e-3

    real = evaluate._estimates

    def estimates(*args, **kwargs):
        return {m: (p, p - 1e-3, p + 1e-3) for m, (p, *_) in real(*args, **kwargs).items()}

    bootstrap.group_bootstrap = group_bootstrap
    evaluate._estimates = estimates


def _bootstrap_min_max() -> None:
    """Intervals are the smallest and largest resample instead of the central 95%."""
    from depthlens.analysis import evaluate
    from depthlens.stats import bootstrap

    def interval(samples, level=0.95):
        return float(samples.min()), float(samples.max())

    bootstrap.interval = interval
    evaluate.interval = interval


def _bootstrap_unweighted() -> None:
    """Resamples average the groups' means, ignoring how many tokens each group has."""
    import torch

    from depthlens.analysis import evaluate
    from depthlens.stats import bootstrap

    real = bootstrap.bootstrap_samples

    def samples(values, weights=None, **kwargs):
        if weights is not None and values.ndim == 1:
            values, weights = values / weights, torch.ones_like(weights)
        return real(values, weights, **kwargs)

    bootstrap.bootstrap_samples = samples
    evaluate.bootstrap_samples = samples


def _fingerprint_without_norm() -> None:
    """The fingerprint hashes the unembedding only."""
    from depthlens.model.architecture import ModelParts

    ModelParts.decoding_tensors = lambda self: [
        (f"1.{name}", tensor) for name, tensor in sorted(self.unembedding.state_dict().items())]


def _fingerprint_without_constants() -> None:
    """The fingerprint leaves out the logit multiplier, divisor and soft-cap."""
    import hashlib

    import torch

    from depthlens.lenses import lens_file, tuned

    def fingerprint(parts):
        digest = hashlib.sha256()
        for name, tensor in parts.decoding_tensors():
            rounded = tensor.detach().to("cpu", torch.bfloat16).contiguous()
            digest.update(f"{name}:{tuple(rounded.shape)};".encode())
            digest.update(rounded.view(torch.int16).numpy().tobytes())
        return digest.hexdigest()

    lens_file.fingerprint = tuned.fingerprint = fingerprint


def _plain_write_bytes() -> None:
    """write_file writes in place with Path.write_bytes."""
    import importlib

    from depthlens import atomic

    def write_file(path, data):
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        return target

    for name in ("depthlens.viz.report", "depthlens.viz.pictures", "depthlens.analysis.trajectory",
                 "depthlens.apps.cli_readouts", "depthlens.apps.cli_applications", "depthlens.apps.cli_causal",
                 "depthlens.model.cache", "depthlens.atomic"):
        module = importlib.import_module(name)
        if getattr(module, "write_file", None) is atomic.write_file:
            module.write_file = write_file
    atomic.write_file = write_file
    import depthlens.atomic
    depthlens.atomic.write_file = write_file


def _family_table_cut() -> None:
    """18 of the 21 entries of FAMILY_RULES are deleted."""
    from depthlens.model.architecture import FAMILY_RULES

    for name in list(FAMILY_RULES)[3:]:
        del FAMILY_RULES[name]


def _no_chunking() -> None:
    """Trajectories decode all positions at once."""
    from depthlens.analysis import cells

    cells.chunk_windows = lambda batch, seq, vocab, chunk_tokens=None: [slice(0, seq)]


def _bigger_store() -> None:
    """Trajectories keep their top-k probabilities and statistics in float64."""
    import torch

    from depthlens.analysis.cells import Cells

    def empty(cls, rows, batch, seq, k):
        shape = (rows, batch, seq)
        return cls(top_ids=torch.empty(*shape, k, dtype=torch.long),
                   top_probs=torch.empty(*shape, k, dtype=torch.float64),
                   **{name: torch.empty(shape, dtype=torch.float64) for name in ("entropy", "kl_to_final", "ce", "max_prob")},
                   final_top1_rank=torch.empty(shape, dtype=torch.long))

    Cells.empty = classmethod(empty)


def _limit_exclusive() -> None:
    """The app refuses a text of exactly max_tokens tokens."""
    from depthlens.apps.web import Explorer
    from depthlens.text.encode import encode

    real = Explorer.trajectories

    def trajectories(self, text, view, k=5):
        if view in self.views and text.strip() and encode(self.tokenizer, text)[0].shape[1] == self.max_tokens:
            raise self._too_long(f"{self.max_tokens} tokens")
        return real(self, text, view, k)

    Explorer.trajectories = trajectories


def _muon_momentum() -> None:
    """Float32Muon's momentum is 0.9 instead of 0.95."""
    from depthlens.training.optim import Float32Muon

    Float32Muon.__init__.__defaults__ = (0.01, 0.9, 5)


def _negative_layers() -> None:
    """The layer check lets negative layers through (they wrap around to the last states)."""
    from depthlens.analysis import cells
    from depthlens.errors import LayerError, TrajectoryError
    from depthlens.lenses import readout

    def check_layer(layer, num_layers):
        if layer > num_layers:
            raise LayerError(f"layer {layer} is out of range: this model has layers 0 … {num_layers}")

    def layer_rows(layers, num_layers):
        chosen = range(num_layers + 1) if layers is None else [int(layer) for layer in layers]
        if any(layer > num_layers for layer in chosen):
            raise TrajectoryError(f"layers are out of range: this model has layers 0 … {num_layers}")
        return tuple(sorted({*chosen, num_layers}))

    readout.check_layer = check_layer
    cells.layer_rows = layer_rows
    from depthlens.analysis import trajectory
    trajectory.layer_rows = layer_rows


def _one_model_named() -> None:
    """The 'trained for another model' error drops the lens's model name."""
    from depthlens.lenses import tuned

    real = tuned._describe
    calls = {"n": 0}

    def describe(info):
        calls["n"] += 1
        if calls["n"] % 2:
            info = {k: v for k, v in info.items() if k != "name_or_path"}
        return real(info)

    tuned._describe = describe


def _evaluation_tab_crashes() -> None:
    """The evaluation chooser accepts any text, and the handler crashes on what it does not know."""
    import gradio as gr

    from depthlens.apps import web

    class Everything(dict):
        def __contains__(self, key):
            return True

    real_read = web.read_evaluations
    web.read_evaluations = lambda *args, **kwargs: Everything(real_read(*args, **kwargs))
    init = gr.Dropdown.__init__

    @functools.wraps(init)
    def dropdown(self, *args, **kwargs):
        if kwargs.get("elem_id") == "evaluation-lens":
            kwargs["allow_custom_value"] = True
        init(self, *args, **kwargs)

    gr.Dropdown.__init__ = dropdown


def _summary_wrong_column() -> None:
    """The summary prints the KL in the entropy column."""
    from depthlens.analysis.trajectory import Trajectory

    real_summary, real_stat = Trajectory.summary, Trajectory.stat

    def summary(self, batch=0):
        Trajectory.stat = lambda s, name: real_stat(s, "kl" if name == "entropy" else name)
        try:
            return real_summary(self, batch)
        finally:
            Trajectory.stat = real_stat

    Trajectory.summary = summary


def _queue_unbounded() -> None:
    """The app's queue has no maximum size."""
    import gradio as gr

    real = gr.Blocks.queue

    def queue(self, *args, **kwargs):
        kwargs.pop("max_size", None)
        return real(self, *args, **kwargs)

    gr.Blocks.queue = queue


def _table_every_ignored() -> None:
    """depthlens table ignores --every and --width."""
    from depthlens.apps import cli

    real = cli._table

    def table(args):
        args.every, args.width = 1, 8
        return real(args)

    cli._table = table


PLANTS: dict[str, tuple[Callable[[], None], list[str]]] = {
    "bootstrap_point_pm_1e-3": (_bootstrap_point, ["tests/test_mutations_bootstrap.py"]),
    "bootstrap_min_max": (_bootstrap_min_max, ["tests/test_mutations_bootstrap.py"]),
    "bootstrap_unweighted": (_bootstrap_unweighted, ["tests/test_mutations_bootstrap.py"]),
    "fingerprint_without_norm": (_fingerprint_without_norm, ["tests/test_mutations_lens.py"]),
    "fingerprint_without_constants": (_fingerprint_without_constants, ["tests/test_mutations_lens.py"]),
    "write_file_is_write_bytes": (_plain_write_bytes, ["tests/test_mutations_atomic.py"]),
    "family_table_cut_to_3": (_family_table_cut, ["tests/test_families.py"]),
    "trajectory_not_chunked": (_no_chunking, ["tests/test_mutations_trajectory.py"]),
    "trajectory_float64_store": (_bigger_store, ["tests/test_mutations_trajectory.py"]),
    "app_refuses_exactly_the_limit": (_limit_exclusive, ["tests/test_mutations_app.py"]),
    "muon_momentum_0.9": (_muon_momentum, ["tests/test_mutations_lens.py"]),
    "negative_layers_wrap": (_negative_layers, ["tests/test_mutations_lens.py"]),
    "error_drops_lens_model_name": (_one_model_named, ["tests/test_mutations_lens.py"]),
    "evaluation_tab_crashes_on_paths": (_evaluation_tab_crashes, ["tests/test_mutations_app.py"]),
    "summary_prints_wrong_numbers": (_summary_wrong_column, ["tests/test_mutations_lens.py"]),
    "app_queue_unbounded": (_queue_unbounded, ["tests/test_mutations_app.py"]),
    "table_ignores_every_and_width": (_table_every_ignored, ["tests/test_mutations_lens.py"]),
}

PLANTS.update(SCIENCE_PLANTS)
PLANTS.update(DLA_PLANTS)
PLANTS.update(LENS_PLANTS)
PLANTS.update(TRAINING_PLANTS)


def pytest_configure(config) -> None:
    name = os.environ.get("PLANT")
    if name:
        PLANTS[name][0]()


def main() -> int:
    """Run every planted bug against its tests; each must fail at least one."""
    names = sys.argv[1:] or list(PLANTS)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT / "benchmarks"), os.environ.get("PYTHONPATH", "")])}
    caught = {}
    for name in names:
        tests = PLANTS[name][1]
        command = [sys.executable, "-m", "pytest", "-p", "planted_bugs", "-p", "no:cacheprovider", "-n", "0", "-q", "-x", *tests]
        began = time.monotonic()
        done = subprocess.run(command, cwd=ROOT, env={**env, "PLANT": name}, capture_output=True, text=True,
                              check=False)
        summary = (done.stdout.strip().splitlines() or ["?"])[-1]
        failed = [line.split(" - ")[0] for line in done.stdout.splitlines() if line.startswith(("FAILED", "ERROR"))]
        caught[name] = done.returncode == 1 and bool(failed)
        print(f"{'CAUGHT' if caught[name] else 'MISSED'} {name}: {', '.join(failed) or summary} "
              f"({time.monotonic() - began:.0f} s)  PLANT={name} python -m pytest -p planted_bugs {' '.join(tests)}",
              flush=True)
    print(f"{sum(caught.values())}/{len(caught)} planted bugs caught")
    return 0 if all(caught.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
