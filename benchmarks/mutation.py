"""Mutation check: how many deliberate small bugs (mutants) the tests kill, per module.

Uses mutmut 3 (``pip install mutmut``). Each module group is mutated in its own copy of the
repository under ``--workdir`` (default ``depthlens-mutation`` in the system's temporary folder), so the working tree is never
touched and nothing else has to stop; only the group's own test files run against its mutants
(mutmut then runs, for each mutant, just the tests that reach the mutated function). Groups run
one after another, niced.

    python benchmarks/mutation.py                    # every group (about an hour on 2 busy cores)
    python benchmarks/mutation.py divergences hooks  # some groups
    python benchmarks/mutation.py --list

For each mutated file it prints killed/total and the survivors (``mutmut show NAME`` in that
group's folder shows a survivor's diff), and writes ``results.json`` in the work folder. Survivors
that are equivalent mutants (no test can tell them apart from the original) are listed with their
reason in :data:`EQUIVALENT` and do not count against the score. Not run in CI.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

GROUPS: dict[str, tuple[list[str], list[str]]] = {
    "lens_files": (
        ["depthlens/lenses/lens_file.py", "depthlens/lenses/tuned.py", "depthlens/lenses/readout.py"],
        ["tests/test_lens_file.py", "tests/test_lens.py", "tests/test_readout.py", "tests/test_mutations_lens.py"],
    ),
    "evaluation": (
        ["depthlens/analysis/evaluate.py", "depthlens/stats/bootstrap.py"],
        ["tests/test_evaluate.py", "tests/test_mutations_bootstrap.py"],
    ),
    "checkpoint": (
        ["depthlens/training/checkpoint.py"],
        ["tests/test_checkpoint_mutants.py", "tests/test_mutations_training.py", "tests/test_train.py", "-k",
         "not torchrun and not sigkill"],
    ),
    "train": (
        ["depthlens/training/train.py"],
        ["tests/test_mutations_training.py", "tests/test_train.py", "-k", "not torchrun and not sigkill"],
    ),
    "objective": (
        ["depthlens/training/objective.py"],
        ["tests/test_objective.py", "tests/test_objective_mutants.py", "tests/test_mutations_training.py"],
    ),
    "hooks": (
        ["depthlens/model/hooks.py", "depthlens/model/edits.py"],
        ["tests/test_hooks.py", "tests/test_hooks_edges.py"],
    ),
    "divergences": (
        ["depthlens/stats/divergences.py"],
        ["tests/test_divergences.py"],
    ),
}
"""Group name → (files to mutate, pytest arguments that select the group's tests)."""

_CPU = "moves to the CPU or the unembedding's device; on a CPU-only machine everything is already there"
_2D = "on the documented 2-D [tokens, vocab] tensor"
EQUIVALENT: dict[str, str] = {
    "depthlens.lenses.lens_file.x_fingerprint__mutmut_3": _CPU,
    "depthlens.lenses.lens_file.x_fingerprint__mutmut_5": _CPU,
    "depthlens.lenses.lens_file.x_write_lens_dir__mutmut_3": _CPU,
    "depthlens.lenses.tuned.xǁTunedLensǁ__init____mutmut_3": _CPU,
    "depthlens.lenses.tuned.xǁTunedLensǁ__init____mutmut_8": _CPU,
    "depthlens.lenses.tuned.xǁTunedLensǁ__init____mutmut_11": _CPU,
    "depthlens.lenses.tuned.xǁTunedLensǁtransform__mutmut_4": _CPU,
    "depthlens.lenses.tuned.xǁTunedLensǁtransform__mutmut_6": _CPU + " (the dtype is still converted)",
    "depthlens.lenses.lens_file.x_read_lens_dir__mutmut_24":
        "format_version defaults to 1 instead of 0: any default ≤ FORMAT_VERSION (1) is accepted alike",
    "depthlens.lenses.readout.xǁLensǁtop_k__mutmut_11": "topk(k) without dim=-1: -1 is topk's default",
    "depthlens.training.objective.xǁShortlistǁsample__mutmut_2": "shape[+1] is shape[-1] " + _2D,
    "depthlens.training.objective.xǁShortlistǁsample__mutmut_8": "topk(k) without dim=-1: -1 is topk's default",
    "depthlens.training.objective.xǁShortlistǁsample__mutmut_13": "topk over dim +1 is dim -1 " + _2D,
    "depthlens.training.objective.xǁShortlistǁsample__mutmut_17":
        "float ones instead of bool: others[top] = False sets 0.0 and nonzero() finds the same ids",
    "depthlens.training.objective.xǁShortlistǁsample__mutmut_18": _CPU,
    "depthlens.training.objective.xǁShortlistǁsample__mutmut_20":
        "float ones instead of bool: others[top] = False sets 0.0 and nonzero() finds the same ids",
    "depthlens.training.objective.xǁShortlistǁsample__mutmut_21": _CPU,
    "depthlens.training.objective.xǁShortlistǁsample__mutmut_35": _CPU,
    "depthlens.training.objective.xǁShortlistǁsample__mutmut_51": _CPU,
    "depthlens.training.objective.xǁShortlistTargetǁkl__mutmut_10":
        "logsumexp over dim +1 is dim -1 on the 2-D [tokens, k] shortlist logits",
    "depthlens.training.objective.x_layer_loss__mutmut_19": _CPU,
    "depthlens.training.objective.x_accumulate_gradients__mutmut_51":
        "log_softmax over dim +1 is dim -1 on the 2-D [tokens, vocab] lens logits",
    "depthlens.training.checkpoint.x_save_checkpoint__mutmut_36": "state.json indentation: any layout parses the same",
    "depthlens.training.checkpoint.x_save_checkpoint__mutmut_38": "state.json indentation: any layout parses the same",
    "depthlens.training.checkpoint.x_save_checkpoint__mutmut_39": "state.json indentation: any layout parses the same",
    "depthlens.training.checkpoint.x_load_checkpoint__mutmut_17":
        "a finished checkpoint also sets optimizers = [], so _restore's zip is empty whatever the document holds",
    "depthlens.training.checkpoint.x_load_checkpoint__mutmut_18":
        "a finished checkpoint also sets optimizers = [], so _restore's zip is empty whatever the document holds",
    "depthlens.model.edits.x_erase__mutmut_8": _CPU,
    "depthlens.model.edits.x_erase__mutmut_10": _CPU + " (the dtype is still converted)",
    "depthlens.model.edits.x_erase__mutmut_29": _CPU,
    "depthlens.model.edits.x_erase__mutmut_31": _CPU + " (the dtype is still converted)",
    "depthlens.model.edits.x_erase__mutmut_39": _CPU,
    "depthlens.model.edits.x_check_basis__mutmut_11": "shape[+1] is shape[-1] once the basis is checked to be 2-D",
    "depthlens.model.hooks.x__apply__mutmut_27": _CPU,
    "depthlens.model.hooks.x_add__mutmut_12": _CPU,
    "depthlens.model.hooks.x_add__mutmut_14": _CPU + " (the dtype is still converted)",
    "depthlens.model.hooks.x_replace__mutmut_12": _CPU,
    "depthlens.model.hooks.x_replace__mutmut_14": _CPU + " (the dtype is still converted)",
    "depthlens.model.hooks.x_run_with_hooks__mutmut_4": _CPU,
    "depthlens.model.hooks.x_run_with_hooks__mutmut_19": _CPU,
    "depthlens.model.hooks.x_run_with_hooks__mutmut_23": _CPU,
    "depthlens.model.hooks.x__apply__mutmut_13": "positions given as Python ints become int64 with or without dtype=torch.long",
    "depthlens.model.hooks.x__apply__mutmut_15": "positions given as Python ints become int64 with or without dtype=torch.long",
    "depthlens.model.hooks.x__parse__mutmut_3": "rpartition differs only for names with two dots, which both forms refuse",
    "depthlens.stats.divergences.x_top_k__mutmut_10": "dim +1 / shape[+1] is -1 " + _2D,
    "depthlens.stats.divergences.x_top_k__mutmut_11": "dim +1 / shape[+1] is -1 " + _2D,
    "depthlens.stats.divergences.x_top_k__mutmut_19": "dim +1 / shape[+1] is -1 " + _2D,
    "depthlens.stats.divergences.x_top_k__mutmut_28": "dim +1 / shape[+1] is -1 " + _2D,
    "depthlens.stats.divergences.x_top_k__mutmut_29": "dim +1 / shape[+1] is -1 " + _2D,
    "depthlens.stats.divergences.x_top_k__mutmut_62": "dim +1 / shape[+1] is -1 " + _2D,
    "depthlens.stats.divergences.x_top_k__mutmut_67": "dim +1 / shape[+1] is -1 " + _2D,
    "depthlens.stats.divergences.x_top_k__mutmut_69": "dim +1 / shape[+1] is -1 " + _2D,
    "depthlens.stats.divergences.x_top_k__mutmut_75": "dim +1 / shape[+1] is -1 " + _2D,
    "depthlens.stats.divergences.xǁLogitStatisticsǁ__init____mutmut_13": "dim +1 / shape[+1] is -1 " + _2D,
    "depthlens.stats.divergences.xǁLogitStatisticsǁ__init____mutmut_18": "dim +1 / shape[+1] is -1 " + _2D,
    "depthlens.stats.divergences.xǁLogitStatisticsǁ__init____mutmut_28": "dim +1 / shape[+1] is -1 " + _2D,
    "depthlens.stats.divergences.xǁLogitStatisticsǁ__init____mutmut_50": "dim +1 / shape[+1] is -1 " + _2D,
    "depthlens.stats.divergences.xǁLogitStatisticsǁ_block__mutmut_14": "dim +1 / shape[+1] is -1 " + _2D,
    "depthlens.stats.divergences.xǁLogitStatisticsǁ_block__mutmut_25": "dim +1 / shape[+1] is -1 " + _2D,
    "depthlens.stats.divergences.xǁLogitStatisticsǁ_block__mutmut_32": "dim +1 / shape[+1] is -1 " + _2D,
    "depthlens.stats.divergences.xǁLogitStatisticsǁ_block__mutmut_51": "dim +1 / shape[+1] is -1 " + _2D,
    "depthlens.stats.divergences.xǁLogitStatisticsǁ_block__mutmut_61": "dim +1 / shape[+1] is -1 " + _2D,
    "depthlens.stats.divergences.xǁLogitStatisticsǁ_block__mutmut_70": "dim +1 / shape[+1] is -1 " + _2D,
    "depthlens.stats.divergences.xǁLogitStatisticsǁ_block__mutmut_74": "dim +1 / shape[+1] is -1 " + _2D,
    "depthlens.stats.divergences.xǁLogitStatisticsǁ_block__mutmut_88": "dim +1 / shape[+1] is -1 " + _2D,
    "depthlens.stats.divergences.xǁLogitStatisticsǁ_block__mutmut_90": "dim +1 / shape[+1] is -1 " + _2D,
    "depthlens.stats.divergences.xǁLogitStatisticsǁ_block__mutmut_98": "dim +1 / shape[+1] is -1 " + _2D,
    "depthlens.stats.divergences.xǁLogitStatisticsǁ_block__mutmut_100": "dim +1 / shape[+1] is -1 " + _2D,
    "depthlens.stats.divergences.xǁLogitStatisticsǁ_block__mutmut_128": "dim +1 / shape[+1] is -1 " + _2D,
    "depthlens.stats.divergences.xǁLogitStatisticsǁ_exact__mutmut_3": "dim +1 / shape[+1] is -1 " + _2D,
    "depthlens.stats.divergences.xǁLogitStatisticsǁ_exact__mutmut_14": "dim +1 / shape[+1] is -1 " + _2D,
    "depthlens.stats.divergences.xǁLogitStatisticsǁ_exact__mutmut_23": "dim +1 / shape[+1] is -1 " + _2D,
    "depthlens.stats.divergences.xǁLogitStatisticsǁ_exact__mutmut_30": "dim +1 / shape[+1] is -1 " + _2D,
    "depthlens.stats.divergences.x_top_k__mutmut_36": _CPU,
    "depthlens.stats.divergences.x_top_k__mutmut_38": _CPU,
    "depthlens.stats.divergences.x_top_k__mutmut_51": _CPU,
    "depthlens.stats.divergences.x_top_k__mutmut_54": _CPU,
    "depthlens.stats.divergences.x_cross_entropy__mutmut_2": _CPU,
    "depthlens.stats.divergences.xǁLogitStatisticsǁ__init____mutmut_32": _CPU,
    "depthlens.stats.divergences.x_top_k__mutmut_3": "a float `whole` makes `whole // TOP_K_WIDTH` 0, so every row takes the exact torch.topk fallback",
    "depthlens.stats.divergences.x_top_k__mutmut_5": "`whole` is a multiple of TOP_K_WIDTH, so / and // give the same number of runs",
    "depthlens.stats.divergences.x_top_k__mutmut_6": "with exactly k runs the fast path keeps every run, so both branches return torch.topk's answer",
    "depthlens.stats.divergences.x_entropy__mutmut_20": "the filler is multiplied by p = 0 either way",
    "depthlens.stats.divergences.x_kl__mutmut_20": "the filler is multiplied by p = 0 either way",
    "depthlens.stats.divergences.xǁLogitStatisticsǁ__call____mutmut_14": "top_k(z, 0) is the same empty [n, 0] pair",
    "depthlens.stats.divergences.xǁLogitStatisticsǁ_block__mutmut_57": "a new tensor instead of the reused scratch buffer: the same values",
    "depthlens.stats.divergences.xǁLogitStatisticsǁ_block__mutmut_60": "a new tensor instead of the reused scratch buffer: the same values",
    "depthlens.stats.divergences.xǁLogitStatisticsǁ_block__mutmut_80": "a new tensor instead of the reused scratch buffer: the same values",
    "depthlens.stats.divergences.xǁLogitStatisticsǁ_block__mutmut_83": "a new tensor instead of the reused scratch buffer: the same values",
    "depthlens.stats.divergences.xǁLogitStatisticsǁ_block__mutmut_8": "the known shift is the top-1 logit, which is exactly the row maximum amax recomputes",
}
"""Surviving mutants that behave exactly like the original, with the reason; they are left out
of the score."""

STATUS = {1: "killed", 3: "killed", 0: "survived", 5: "no tests", 33: "no tests", 34: "skipped", 36: "timeout",
          -24: "timeout", 24: "timeout", 152: "timeout", 255: "timeout"}


def _copy_repository(target: Path) -> None:
    """The package, tests and docs (the survey test reads docs/families.md) into ``target``."""
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "runs", "mutants")
    for name in ("depthlens", "tests", "docs"):
        shutil.copytree(ROOT / name, target / name, ignore=ignore)
    shutil.copy2(ROOT / "pyproject.toml", target / "pyproject.toml")


def _configure(folder: Path, files: list[str], selection: list[str]) -> None:
    """Append mutmut's settings to the copy's pyproject.toml (the working tree's is untouched)."""
    settings = {
        "source_paths": files,
        "also_copy": ["depthlens", "tests", "docs"],
        "pytest_add_cli_args": ["-p", "no:cacheprovider", "-q", "-x", "-W", "ignore"],
        "pytest_add_cli_args_test_selection": selection,
        "use_git_change_detection": False,
        "timeout_multiplier": 5.0,
        "timeout_constant": 30.0,
    }
    lines = ["", "[tool.mutmut]"] + [f"{key} = {json.dumps(value)}" for key, value in settings.items()]
    with (folder / "pyproject.toml").open("a") as handle:
        handle.write("\n".join(lines) + "\n")


def _scores(folder: Path, files: list[str]) -> dict[str, dict]:
    """Per mutated file: killed, survived (names), equivalent, total, score."""
    scores = {}
    for file in files:
        meta = json.loads((folder / "mutants" / f"{file}.meta").read_text())
        statuses = {name: STATUS.get(code, "suspicious") for name, code in meta["exit_code_by_key"].items()}
        survived = sorted(name for name, status in statuses.items() if status != "killed" and name not in EQUIVALENT)
        equivalent = sorted(name for name in statuses if name in EQUIVALENT)
        killed = sum(status == "killed" for status in statuses.values())
        counted = len(statuses) - len(equivalent)
        scores[file] = {"killed": killed, "total": len(statuses), "equivalent": equivalent, "survived": survived,
                        "score": killed / counted if counted else 1.0}
    return scores


def run_group(name: str, workdir: Path) -> dict[str, dict]:
    files, selection = GROUPS[name]
    folder = workdir / name
    _copy_repository(folder)
    _configure(folder, files, selection)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    began = time.monotonic()
    mutmut = [sys.executable, "-c", "import sys; from mutmut.__main__ import cli; sys.exit(cli())"]
    done = subprocess.run(["nice", "-n", "10", *mutmut, "run", "--max-children", "1"], cwd=folder, env=env,
                          capture_output=True, text=True)
    if done.returncode != 0 or not all((folder / "mutants" / f"{f}.meta").is_file() for f in files):
        tail = (done.stdout + done.stderr)[-3000:]
        raise SystemExit(f"mutmut failed for {name} (status {done.returncode}):\n{tail}")
    scores = _scores(folder, files)
    for file, score in scores.items():
        print(f"{name}: {file}: {score['killed']}/{score['total'] - len(score['equivalent'])} killed "
              f"({100 * score['score']:.1f}%), {len(score['equivalent'])} equivalent, "
              f"{time.monotonic() - began:.0f} s", flush=True)
        for survivor in score["survived"]:
            print(f"    survived: {survivor}")
    return scores


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("groups", nargs="*", help=f"groups to run (default: all of {', '.join(GROUPS)})")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "depthlens-mutation")
    parser.add_argument("--list", action="store_true", help="list the groups and exit")
    parser.add_argument("--target", type=float, default=0.85, help="lowest acceptable share killed per file")
    args = parser.parse_args()
    if args.list:
        for name, (files, selection) in GROUPS.items():
            print(f"{name}: {' '.join(files)}  <-  {' '.join(selection)}")
        return 0
    results_path = args.workdir / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    for name in args.groups or list(GROUPS):
        scores = run_group(name, args.workdir)
        # read again: another run may have written other groups' scores meanwhile
        results = json.loads(results_path.read_text()) if results_path.is_file() else {}
        results[name] = scores
        results_path.write_text(json.dumps(results, indent=1))
    low = [f"{group}:{file}" for group, files in results.items() for file, s in files.items() if s["score"] < args.target]
    print("below target: " + (", ".join(low) if low else "none"))
    return 1 if low else 0


if __name__ == "__main__":
    sys.exit(main())
