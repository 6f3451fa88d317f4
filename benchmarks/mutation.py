"""Mutation check: how many deliberate small bugs (mutants) the tests kill, per module.

Uses mutmut 3 (``pip install mutmut``). Each module group is mutated in its own copy of the
repository under ``--workdir`` (default ``depthlens-mutation`` in the system's temporary folder), so the working tree is never
touched and nothing else has to stop; only the group's own test files run against its mutants
(mutmut then runs, for each mutant, just the tests that reach the mutated function). Groups run
one after another, niced.

    python benchmarks/mutation.py                    # every group (about an hour on 2 busy cores)
    python benchmarks/mutation.py divergences hooks  # some groups
    python benchmarks/mutation.py --list
    python benchmarks/mutation.py train --sample 160 --seed 0  # a seeded sample of the group's mutants
    python benchmarks/mutation.py drift --rerun      # only an earlier run's survivors, against today's tests
    python benchmarks/mutation.py web_readouts --rerun --sample 200  # finish a stopped run on a seeded sample

For each mutated file it prints killed/total and the survivors (``mutmut show NAME`` in that
group's folder shows a survivor's diff), and writes ``results.json`` in the work folder. Survivors
that are equivalent mutants (no test can tell them apart from the original) are listed with their
reason in ``mutation_equivalent.py`` and do not count against the score. Not run in CI.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mutation_equivalent import EQUIVALENT  # beside this script

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
        ["tests/test_mutations_training.py", "tests/test_train.py", "tests/test_mutants_train.py", "-k",
         "not torchrun and not sigkill"],
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
    "causal": (
        [f"depthlens/analysis/causal/{name}.py" for name in ("alignment", "basis", "erasure", "fidelity", "search")],
        ["tests/test_causal.py", "tests/test_causal_reference.py", "tests/test_oracle_causal.py", "tests/test_mutants_causal.py"],
    ),
    "drift": (
        ["depthlens/analysis/drift/covariance.py", "depthlens/analysis/drift/transfer.py"],
        ["tests/test_drift.py", "tests/test_oracle_drift.py"],
    ),
    "applications": (
        [f"depthlens/analysis/applications/{name}.py"
         for name in ("anomaly", "builtin", "depth", "features", "injection", "load", "overthinking", "tasks")],
        ["tests/test_applications.py", "tests/test_applications_models.py", "tests/test_oracle_applications.py", "tests/test_mutants_applications.py"],
    ),
    "dla": (
        ["depthlens/analysis/dla.py", "depthlens/analysis/dla_model.py"],
        ["tests/test_dla.py", "tests/test_dla_oracle.py", "tests/test_mutants_dla.py"],
    ),
    "patchscope": (
        ["depthlens/analysis/patchscope.py"],
        ["tests/test_patchscope.py", "tests/test_mutants_patchscope.py"],
    ),
    "generate": (
        ["depthlens/analysis/generate.py"],
        ["tests/test_generate.py", "tests/test_oracle_generate.py", "tests/test_mutants_generate.py"],
    ),
    "attribute": (
        ["depthlens/lenses/attribute.py"],
        ["tests/test_attribute.py", "tests/test_oracle_attribute.py", "tests/test_mutants_attribute.py"],
    ),
    "web_readouts": (
        ["depthlens/apps/web_readouts.py"],
        ["tests/test_app.py", "tests/test_mutations_app.py", "tests/test_oracle_attribute.py", "tests/test_mutants_web.py"],
    ),
}
"""Group name → (files to mutate, pytest arguments that select the group's tests)."""


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
        "pytest_add_cli_args": ["-p", "no:cacheprovider", "-n", "0", "-q", "-x", "-W", "ignore"],
        "pytest_add_cli_args_test_selection": selection,
        "use_git_change_detection": False,
        "timeout_multiplier": 5.0,
        "timeout_constant": 30.0,
        "process_isolation": "forkserver",  # torch is not fork-safe once the tests ran: forked workers hung
    }
    lines = ["", "[tool.mutmut]"] + [f"{key} = {json.dumps(value)}" for key, value in settings.items()]
    with (folder / "pyproject.toml").open("a") as handle:
        handle.write("\n".join(lines) + "\n")


def _scores(folder: Path, files: list[str], only: set[str] | None = None) -> dict[str, dict]:
    """Per mutated file: killed, survived (names), equivalent, total, score; over the ``only`` mutants
    when given (a sample)."""
    scores = {}
    for file in files:
        meta = json.loads((folder / "mutants" / f"{file}.meta").read_text())
        statuses = {name: STATUS.get(code, "suspicious") for name, code in meta["exit_code_by_key"].items()
                    if only is None or name in only}
        survived = sorted(name for name, status in statuses.items() if status != "killed" and name not in EQUIVALENT)
        equivalent = sorted(name for name in statuses if name in EQUIVALENT)
        killed = sum(status == "killed" for status in statuses.values())
        counted = len(statuses) - len(equivalent)
        scores[file] = {"killed": killed, "total": len(statuses), "equivalent": equivalent, "survived": survived,
                        "score": killed / counted if counted else 1.0}
    return scores


def _mutmut(name: str, folder: Path, files: list[str], mutants: list[str], *, check: bool = True) -> None:
    """``mutmut run`` in ``folder`` on the named mutants (all when empty), niced, on one thread; with
    ``check=False`` only the mutants' files must exist afterwards (a filter that matches nothing)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    mutmut = [sys.executable, "-c", "import sys; from mutmut.__main__ import cli; sys.exit(cli())"]
    done = subprocess.run(["nice", "-n", "10", *mutmut, "run", "--max-children", "1", *mutants], check=False, cwd=folder,
                          env=env, capture_output=True, text=True)
    if (check and done.returncode != 0) or not all((folder / "mutants" / f"{f}.meta").is_file() for f in files):
        tail = (done.stdout + done.stderr)[-3000:]
        raise SystemExit(f"mutmut failed for {name} (status {done.returncode}):\n{tail}")


def _sampled(folder: Path, files: list[str], sample: int, seed: int) -> list[str]:
    """Generate the group's mutants without running any, then draw ``sample`` of them (seeded)."""
    _mutmut("sampling", folder, files, ["no-such-mutant"], check=False)
    names = sorted(name for f in files
                   for name in json.loads((folder / "mutants" / f"{f}.meta").read_text())["exit_code_by_key"])
    return sorted(random.Random(seed).sample(names, min(sample, len(names))))


def run_group(name: str, workdir: Path, sample: int = 0, seed: int = 0) -> dict[str, dict]:
    """Mutate group ``name`` in its own copy under ``workdir``; every mutant, or ``sample`` of them drawn with
    ``seed``. Prints and returns each file's score."""
    files, selection = GROUPS[name]
    folder = workdir / name
    _copy_repository(folder)
    _configure(folder, files, selection)
    began = time.monotonic()
    chosen = _sampled(folder, files, sample, seed) if sample else []
    (folder / "sample.json").write_text(json.dumps(chosen))
    _mutmut(name, folder, files, chosen)
    return _report(name, _scores(folder, files, set(chosen) or None), began)


def rerun_survivors(name: str, workdir: Path, sample: int = 0, seed: int = 0) -> dict[str, dict]:
    """Run group ``name``'s survivors of an earlier run again against the working tree's current tests
    (after tests were added), without regenerating the mutants; and the mutants that run never reached
    (it was stopped). Scores the earlier run's sample if it drew one; else, with ``sample``, a sample
    drawn now with ``seed`` from all the group's mutants (those already run keep their results), kept
    for later reruns. Prints and returns each file's score."""
    files = GROUPS[name][0]
    folder = workdir / name
    sampled = folder / "sample.json"
    if sample and not (sampled.is_file() and json.loads(sampled.read_text())):
        names = sorted(key for file in files
                       for key in json.loads((folder / "mutants" / f"{file}.meta").read_text())["exit_code_by_key"])
        sampled.write_text(json.dumps(sorted(random.Random(seed).sample(names, min(sample, len(names))))))
    only = set(json.loads(sampled.read_text())) if sampled.is_file() else set()
    only = only or None
    survivors = [m for score in _scores(folder, files, only).values() for m in score["survived"]]
    for target in (folder / "tests", folder / "mutants" / "tests"):
        shutil.rmtree(target)
        shutil.copytree(ROOT / "tests", target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    shutil.copy2(ROOT / "pyproject.toml", folder / "pyproject.toml")
    _configure(folder, files, GROUPS[name][1])  # the group's test selection as it is now
    (folder / "mutmut-stats.json").unlink(missing_ok=True)  # so that the new tests are mapped to functions
    began = time.monotonic()
    before = {file: json.loads((folder / "mutants" / f"{file}.meta").read_text())["exit_code_by_key"] for file in files}
    if survivors:
        _mutmut(name, folder, files, survivors)
    for file in files:  # the new test selection makes mutmut forget every result; the sources did not change
        path = folder / "mutants" / f"{file}.meta"
        meta = json.loads(path.read_text())
        meta["exit_code_by_key"] = {key: before[file].get(key) if code is None and key not in survivors else code
                                    for key, code in meta["exit_code_by_key"].items()}
        path.write_text(json.dumps(meta))
    return _report(name, _scores(folder, files, only), began)


def _report(name: str, scores: dict[str, dict], began: float) -> dict[str, dict]:
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
    parser.add_argument("--sample", type=int, default=0, help="score a random sample of this many mutants per group "
                        "(default: every mutant)")
    parser.add_argument("--seed", type=int, default=0, help="seed of --sample's draw")
    parser.add_argument("--rerun", action="store_true", help="run only the survivors of an earlier full run of "
                        "each group again, against the current tests")
    args = parser.parse_args()
    if args.list:
        for name, (files, selection) in GROUPS.items():
            print(f"{name}: {' '.join(files)}  <-  {' '.join(selection)}")
        return 0
    results_path = args.workdir / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    for name in args.groups or list(GROUPS):
        if args.rerun:
            scores = rerun_survivors(name, args.workdir, args.sample, args.seed)
        else:
            scores = run_group(name, args.workdir, args.sample, args.seed)
        # read again: another run may have written other groups' scores meanwhile
        results = json.loads(results_path.read_text()) if results_path.is_file() else {}
        results[name] = scores
        results_path.write_text(json.dumps(results, indent=1))
    low = [f"{group}:{file}" for group, files in results.items() for file, s in files.items() if s["score"] < args.target]
    print("below target: " + (", ".join(low) if low else "none"))
    return 1 if low else 0


if __name__ == "__main__":
    sys.exit(main())
