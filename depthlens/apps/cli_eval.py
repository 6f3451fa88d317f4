"""``depthlens eval``: readouts against the logit lens on held-out text, per layer with
intervals, and the evaluation that ``depthlens train`` runs after training (same tables and files)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from depthlens.apps.options import add_data, add_dtype, add_lens, add_model, add_out
from depthlens.errors import UsageError

EVAL_CHUNK = 256
"""Tokens per chunk of ``eval`` and of the evaluation after ``train`` (fewer are refused)."""


def _check_sources(args: argparse.Namespace) -> None:
    """Open ``--data`` (its validation split) and ``--ood`` and read their first document, so a
    missing, unreadable or non-UTF-8 source is refused before the model loads."""
    from depthlens.text.data import TextSource

    next(iter(TextSource(args.data, column=args.column or "text", group_column=args.group_column).documents("validation")), None)
    if args.ood not in (None, "none"):
        next(iter(TextSource(args.ood).documents("all")), None)


def check_ood(args: argparse.Namespace) -> None:
    """Refuse an out-of-domain source that is the training/held-out source itself."""
    if args.ood not in (None, "none") and args.ood == args.data:
        raise UsageError(f"--ood {args.ood} is the --data source itself: name another text, or --ood none")


def _eval(args: argparse.Namespace) -> None:
    from depthlens.atomic import check_output
    from depthlens.lenses.registry import is_logit, load_readout
    from depthlens.lenses.spec import readout_names
    from depthlens.model.load import load_model
    from depthlens.training import runs

    if args.tokens < EVAL_CHUNK:
        raise UsageError(f"--tokens {args.tokens} is less than one chunk of {EVAL_CHUNK} tokens, the unit of the "
                         f"evaluation: use --tokens {EVAL_CHUNK} or more")
    check_ood(args)
    specs = [spec for spec in args.lens or [runs.require_trained_lens(args.model)] if not is_logit(spec)]
    if not specs:
        raise UsageError("depthlens eval compares readouts with the logit lens: pass --lens with a lens folder, not logit")
    names = readout_names(specs)
    out = check_output(args.out or runs.eval_dir_of_lens(specs[0]), "folder")
    _check_sources(args)
    model, tokenizer = load_model(args.model)
    evaluate_and_report(model, tokenizer, {name: load_readout(path, model) for name, path in names.items()},
                         args, args.tokens, out)


def evaluate_and_report(model, tokenizer, readouts: dict, args: argparse.Namespace, tokens: int, out: str | Path) -> None:
    """Evaluate on the held-out split of ``--data`` into ``out`` and, unless ``--ood none``, on the
    whole ``--ood`` source into ``out/ood``; print both tables and a one-line summary of each.

    ``readouts`` (name → any readout; block and mid lenses side by side as half-layers) are
    compared with the logit lens."""
    from rich.console import Console

    from depthlens.analysis.evaluate import evaluate_held_out
    from depthlens.lenses.logit import LogitLens
    from depthlens.text.data import TextSource
    from depthlens.training.runs import ood_eval_dir
    from depthlens.viz.report import comparison_table, write_report

    lenses = {"logit": LogitLens(model), **readouts}
    held_out = TextSource(args.data, column=args.column or "text", group_column=args.group_column)
    runs_ = [("held-out", held_out, "validation", Path(out))]
    if args.ood not in (None, "none"):
        runs_.append(("out-of-domain", TextSource(args.ood), "all", ood_eval_dir(out)))
    console = Console(width=max(Console().width, 100))
    summaries = []
    for name, source, split, folder in runs_:
        report = evaluate_held_out(model, tokenizer, lenses, source, tokens=tokens, split=split, dtype=args.dtype)
        files = write_report(report, folder)
        console.print(comparison_table(report))
        console.print(f"{name} evaluation written to " + ", ".join(str(path) for path in files.values()), soft_wrap=True)
        means = {lens_name: sum(report.mean(lens_name, "kl")[:-1]) / max(1, len(report.mean(lens_name, "kl")) - 1)
                 for lens_name in lenses}
        summaries.append(f"{name} ({source}, {split} split, {report.tokens} tokens): mean KL over layers 0…L−1 "
                         + ", ".join(f"{lens_name} {mean:.3f}" for lens_name, mean in means.items()) + " nats"
                         + "".join(_beats(report, lens_name) for lens_name in readouts))
    for line in summaries:
        console.print(line, soft_wrap=True)



def _beats(report: Any, lens: str) -> str:
    """``"; tuned below logit at 17 of 18 layers (paired 95% interval below 0 at 16)"``, or nothing
    for a lens at other depths than the logit lens."""
    better, surely, layers = report.beats_baseline(lens)
    if not layers:
        return ""
    surely_text = f" (paired 95% interval below 0 at {surely})" if report.has_intervals else ""
    return f"; {lens} KL below logit at {better} of {layers} layers{surely_text}"


def add_parsers(commands: argparse._SubParsersAction) -> None:
    """Add the ``eval`` command to ``commands``."""
    evaluation = commands.add_parser("eval", help="per-layer evaluation of a readout against the logit lens")
    add_model(evaluation)
    add_lens(evaluation, None, repeatable=True,
             note="readouts to evaluate side by side, e.g. a lens and a --site mid lens; default: runs/<model>/lens")
    add_data(evaluation, "mixed", "the held-out text is its validation split", columns=True)
    evaluation.add_argument("--ood", default="none",
                            help="also evaluate on the whole of this out-of-domain source, e.g. python-docs (default: none)")
    evaluation.add_argument("--tokens", type=int, default=4096,
                            help=f"held-out tokens to evaluate on, in whole chunks of {EVAL_CHUNK} (default: 4096)")
    add_out(evaluation, "output directory (default: next to the lens, eval/)")
    add_dtype(evaluation)
    evaluation.set_defaults(run=_eval)
