"""Command-line commands of the trajectory applications (Belrose et al. 2023, §5).

:func:`add_parsers` adds them to the ``depthlens`` command's subparsers:

- ``depthlens tasks list|show|fetch`` — the built-in offline tasks and their files
  (:mod:`depthlens.apps.cli_tasks`);
- ``depthlens inject`` — prompt-injection detection AUROCs (JSON, CSV, ROC picture);
- ``depthlens anomaly`` — anomaly scores of texts against a reference corpus, with their
  percentile among the reference texts (JSON, CSV);
- ``depthlens depth`` — per-token prediction depth of a text (picture, CSV), per-example depth of
  a task, or its Spearman ρ with iteration learned over checkpoints (:mod:`depthlens.apps.cli_depth`);
- ``depthlens overthink`` — calibrated accuracy per layer with correct / permuted demonstrations.

Every command that runs a model takes ``--model`` and ``--lens`` (repeatable; the logit lens is
always included). ``--out`` is a folder the command writes its files into, except ``depth TEXT
--out NAME.png`` (``.svg``, ``.pdf``, ``.html``), which writes only the picture; a folder name with
a file suffix is refused. Options and output paths are checked before the model loads
(:mod:`depthlens.apps.app_options`); a mistake is one line
(:class:`~depthlens.errors.DepthlensError`), a legal but weak run gets a warning.
"""

from __future__ import annotations

import argparse
from typing import Any

from depthlens.apps import cli_depth, cli_tasks
from depthlens.apps.app_options import (
    TASK_HELP,
    add_common,
    check_lenses,
    load_readouts,
    load_task_of,
    out_folder,
    warn,
    warn_short,
)
from depthlens.apps.options import check_at_least, write_csv, write_json
from depthlens.errors import DataError, UsageError

DEMO_POOL = 40
"""Examples set aside for demonstrations unless ``--demo-pool`` says otherwise."""


def _task_with_pool(args: argparse.Namespace, pool: int, minimum: int, purpose: str) -> tuple[Any, int]:
    """The task of ``--task`` with ``pool`` examples after the evaluated ones set aside for
    demonstrations, and how many are evaluated; refuses more ``--shots`` than ``pool`` and fewer
    than ``minimum`` evaluated examples (``purpose`` needs them)."""
    if args.shots > pool:
        raise UsageError(f"--shots {args.shots} demonstrations are drawn from --demo-pool {pool} examples: "
                         "raise --demo-pool or lower --shots")
    task = load_task_of(args, extra=pool)
    evaluated = len(task.examples) - pool
    if pool and evaluated < minimum:
        raise UsageError(f"task {task.name} has {len(task.examples)} examples; after the --demo-pool of "
                         f"{pool} only {max(evaluated, 0)} are left to evaluate, and {purpose} "
                         f"needs at least {minimum}: lower --demo-pool or use a larger task")
    return task, evaluated


def _warn_limit(args: argparse.Namespace, task: Any, pool: int, evaluated: int) -> None:
    """Warn when fewer examples than ``--limit`` are left to evaluate besides ``pool`` demonstrations."""
    if not pool:
        warn_short(args, task)
    elif args.limit is not None and evaluated < args.limit:
        warn(f"--limit {args.limit}: task {task.name} has {len(task.examples)} examples, {pool} of them "
             f"for demonstrations; evaluating {evaluated}")


def _inject(args: argparse.Namespace) -> None:
    from depthlens.analysis.applications import injection

    check_at_least(args, 1, "seeds", "batch_size", "limit", "demo_pool")
    check_at_least(args, 0, "shots")
    if not args.shots and args.demo_pool is not None:
        raise UsageError(f"--demo-pool {args.demo_pool} does nothing with --shots 0 (no demonstrations): drop it, "
                         "or use --shots 1 or more")
    pool = (DEMO_POOL if args.demo_pool is None else args.demo_pool) if args.shots else 0
    out = out_folder(args, "injection.json, injection.csv, roc.png")
    check_lenses(args)
    if args.limit is not None:
        injection.check_injection_setup(args.limit, args.seeds)
    task, evaluated = _task_with_pool(args, pool, injection.MIN_EXAMPLES, "an AUROC")
    seed = 0 if args.seed is None else args.seed
    injection.prompt_sets(task, shots=args.shots, limit=evaluated, seed=seed)  # every prompt must hold the cue
    injection.check_injection_setup(evaluated, args.seeds)
    _warn_limit(args, task, pool, evaluated)
    if evaluated < injection.FEW_EXAMPLES:
        warn(f"{evaluated} clean examples: the AUROCs and their 95% intervals are rough; use --limit "
             f"{injection.FEW_EXAMPLES} or more for a usable estimate")
    model, tokenizer, lenses = load_readouts(args)
    result, _, _ = injection.detect_injections(model, tokenizer, lenses, task, shots=args.shots, limit=evaluated,
                                               seed=seed, seeds=args.seeds, batch_size=args.batch_size)
    from depthlens.viz.applications import roc_figure
    from depthlens.viz.pictures import save_figure

    write_json(out / "injection.json", {"model": args.model, **result.to_dict()})
    write_csv(out / "injection.csv", result.rows())
    save_figure(roc_figure(result), out / "roc.png")
    _print_injection(result, args.seeds)
    print(f"wrote {out}/injection.json, injection.csv, roc.png")


def _print_injection(result: Any, seeds: int) -> None:
    """The command's summary of an :class:`~depthlens.analysis.applications.injection.InjectionResult`."""
    print(f"{result.task}: {result.n_clean} clean, {result.n_injected} injected and as many benign-control prompts, "
          f"{result.shots}-shot; model accuracy {result.accuracy_clean:.3f} clean, {result.accuracy_injected:.3f} "
          f"injected, {result.accuracy_benign:.3f} benign; lens features: per-layer {result.features}")
    print(f"{'method':50s} {'attack AUROC':>12s}  95% interval     {'benign AUROC':>12s}  95% interval")
    for method in result.methods:
        benign_auroc, benign_low, benign_high = method.benign
        print(f"{method.method:50s} {method.auroc:12.3f}  [{method.low:.3f}, {method.high:.3f}]   "
              f"{benign_auroc:12.3f}  [{benign_low:.3f}, {benign_high:.3f}]")
    print(f"AUROC: chance an injected (benign: a neutral insertion in the same frame) prompt scores as more "
          f"anomalous than a held-out clean one (0.5 = chance, 1 = perfect), mean of {seeds} splits; a detector "
          "whose benign AUROC is as high as its attack AUROC flags any insertion, not the attack")
    for method in result.methods:
        if method.srm:
            srm, mean = method.srm, method.srm["mean"]
            print(f"{method.method}: top 1 / top 10 coordinates hold {srm['variance_share_top1']:.0%} / "
                  f"{srm['variance_share_top10']:.0%} of the variance, ridge = {srm['lambda_over_median_variance']:.3g} × "
                  f"the median variance; mean score clean {mean['clean']['score']:.4g}, injected "
                  f"{mean['injected']['score']:.4g}")


def _anomaly(args: argparse.Namespace) -> None:
    from depthlens.analysis.applications.anomaly import FEW_REFERENCE, MIN_REFERENCE, rank_texts, read_texts

    check_at_least(args, 1, "max_tokens", "batch_size")
    out = out_folder(args, "anomaly.json, anomaly.csv")
    check_lenses(args)
    reference, texts = read_texts(args.reference, "--reference"), read_texts(args.texts, "--texts")
    if len(reference) < MIN_REFERENCE:
        raise DataError(f"--reference {args.reference} holds {len(reference)} texts: give at least {MIN_REFERENCE} "
                        "normal texts (dozens are better) to put the scores on a scale")
    if len(reference) < FEW_REFERENCE:
        warn(f"{len(reference)} reference texts: percentiles move in steps of {100 / len(reference):.0f}; "
              f"give {FEW_REFERENCE} or more for a finer scale")
    model, tokenizer, lenses = load_readouts(args)
    rows = []
    for name, readout in lenses.items():
        ranked = rank_texts(model, tokenizer, readout, reference, texts, detector=args.detector,
                            max_tokens=args.max_tokens, batch_size=args.batch_size)
        rows.extend({"readout": name, "index": i, "percentile": float(p), "score": float(s), "text": t[:200]}
                    for i, (p, s, t) in enumerate(zip(ranked.percentiles, ranked.scores, texts)))
    write_json(out / "anomaly.json", {"model": args.model, "detector": args.detector, "reference": len(reference),
                                      "scores": rows})
    write_csv(out / "anomaly.csv", rows)
    print(f"{'readout':10s} {'line':>5s} {'percentile':>10s} {'score':>9s}  text")
    for row in sorted(rows, key=lambda r: (-r["percentile"], -r["score"]))[:10]:
        print(f"{row['readout'][:10]:10s} {row['index'] + 1:5d} {row['percentile']:10.1f} {row['score']:9.3f}  "
              f"{row['text'][:60]!r}")
    print(f"percentile: share of the {len(reference)} reference texts whose held-out score is lower (100 = more "
          f"anomalous than all of them); score: the {args.detector} detector's own anomaly score, higher = more "
          "anomalous, no fixed unit")
    print(f"wrote {out}/anomaly.json, anomaly.csv ({len(rows)} rows; the 10 most anomalous shown)")


def _overthink(args: argparse.Namespace) -> None:
    from depthlens.analysis.applications.overthinking import FEW_EVALUATED, MIN_EVALUATED, check_contrast, overthinking

    check_at_least(args, 1, "limit", "batch_size", "demo_pool")
    out = out_folder(args, "overthinking.json, overthinking.csv, overthinking.png")
    check_lenses(args)
    task, evaluated = _task_with_pool(args, args.demo_pool, MIN_EVALUATED, "calibrated accuracy")
    check_contrast(task, args.shots, args.shift)
    _warn_limit(args, task, args.demo_pool, evaluated)
    if evaluated < FEW_EVALUATED:
        warn(f"{evaluated} evaluated examples: calibrated accuracy moves in steps of {1 / evaluated:.2f}; use "
              f"--limit {FEW_EVALUATED} or more for a usable curve")
    model, tokenizer, lenses = load_readouts(args)
    result, _, _ = overthinking(model, tokenizer, lenses, task, shots=args.shots, shift=args.shift, limit=evaluated,
                                seed=0 if args.seed is None else args.seed, batch_size=args.batch_size)
    from depthlens.viz.applications import overthinking_figure
    from depthlens.viz.pictures import save_figure

    write_json(out / "overthinking.json", {"model": args.model, **result.to_dict()})
    write_csv(out / "overthinking.csv", result.rows())
    save_figure(overthinking_figure(result), out / "overthinking.png")
    print(f"{task.name}: {result.examples} examples, {args.shots}-shot; model accuracy {result.accuracy_correct:.3f} "
          f"with correct demonstrations, {result.accuracy_permuted:.3f} with permuted ones")
    print(f"{'readout':16s} {'correct':>8s} {'permuted':>8s} {'gap':>7s}  critical layer   (calibrated accuracy at layer L)")
    for name, curves in result.curves.items():
        critical = "none (gap ≤ 0 at L)" if curves.critical_layer is None else str(curves.critical_layer)
        print(f"{name[:16]:16s} {curves.correct[-1]:8.3f} {curves.permuted[-1]:8.3f} {curves.gap[-1]:7.3f}  {critical}")
    print(f"calibrated accuracy: accuracy when each label is predicted for the 1/{result.num_choices} of inputs where "
          f"it is likeliest (chance {1 / result.num_choices:.2f}); critical layer: first layer where the gap "
          "correct − permuted reaches half its value at layer L")
    print(f"wrote {out}/overthinking.json, overthinking.csv, overthinking.png")


def add_parsers(commands: argparse._SubParsersAction) -> None:
    """Add ``tasks``, ``inject``, ``anomaly``, ``depth`` and ``overthink`` to ``commands``."""
    cli_tasks.add_parser(commands)

    inject = commands.add_parser(
        "inject", help="prompt-injection detection from prediction trajectories (AUROC)",
        description="Fit anomaly detectors (isolation forest, LOF) on per-layer trajectory features of 75% of the "
                    "clean prompts (the log-odds of choice 1 over choice 0 for a two-choice task, else every choice's "
                    "log-likelihood), score the rest and the same prompts with an injected instruction; AUROC: the "
                    "chance an injected prompt scores above a clean one (0.5 chance, 1 perfect), mean over --seeds "
                    "splits with a pooled bootstrap 95% interval. Prompts are few-shot by default (--shots). SRM "
                    "baselines on raw hidden states: ours (answer position, last layer, ridge 1% of the mean "
                    "variance) and the authors' setup as reported to us (prompt mean, middle layer, ridge 1e-3).")
    inject.add_argument("--task", required=True, help=TASK_HELP)
    inject.add_argument("--seeds", type=int, default=5, help="train/test splits (and detector seeds) (default %(default)s)")
    inject.add_argument("--shots", type=int, default=2,
                        help="demonstrations before each prompt, drawn from --demo-pool examples that are never "
                             "evaluated; few-shot is the default, as in the authors' setup (as reported to us, unverified); 0: "
                             "zero-shot prompts "
                             "(default %(default)s)")
    inject.add_argument("--demo-pool", type=int,
                        help=f"examples set aside to draw demonstrations from (default {DEMO_POOL}; only with --shots "
                             "1 or more); --limit counts the evaluated examples besides these")
    add_common(inject, "output folder: injection.json, injection.csv, roc.png")
    inject.set_defaults(run=_inject)

    anomaly = commands.add_parser(
        "anomaly", help="anomaly scores of texts against a reference corpus",
        description="Score each text's trajectory features (per layer: entropy, KL to the output, rank of the output's "
                    "top token) with a detector fit on the reference texts. Percentile: the share of reference texts "
                    "whose held-out score (5-fold) is lower; score: the detector's own, higher = more anomalous.")
    anomaly.add_argument("--reference", required=True, help="normal texts: .txt (one per line), .jsonl, .parquet")
    anomaly.add_argument("--texts", required=True, help="texts to score, same formats")
    anomaly.add_argument("--detector", choices=["lof", "isolation-forest", "srm"], default="lof",
                         help="local outlier factor, isolation forest, or simplified relative Mahalanobis distance "
                              "(default %(default)s)")
    anomaly.add_argument("--max-tokens", type=int, default=128, help="tokens read per text (default %(default)s)")
    add_common(anomaly, "output folder: anomaly.json, anomaly.csv", task=False)
    anomaly.set_defaults(run=_anomaly)

    cli_depth.add_parser(commands)

    overthink = commands.add_parser(
        "overthink", help="calibrated accuracy per layer, correct vs permuted demonstrations",
        description="Few-shot prompts with correct and with permuted demonstration labels, read at every layer. "
                    "Calibrated accuracy: each label is predicted for the 1/n of inputs where it is likeliest (chance "
                    "1/n; inputs tied at layer 0 share the places, so it starts near chance). Critical layer: the first "
                    "where the gap correct − permuted reaches half its final value.")
    overthink.add_argument("--task", required=True, help=TASK_HELP)
    overthink.add_argument("--shots", type=int, default=4, help="demonstrations per prompt, at least 1 (default %(default)s)")
    overthink.add_argument("--shift", type=int, default=1,
                           help="permuted label = gold + shift mod the number of choices; not a multiple of it "
                                "(default %(default)s)")
    overthink.add_argument("--demo-pool", type=int, default=DEMO_POOL,
                           help="examples set aside to draw demonstrations from (default %(default)s); --limit counts "
                                "the evaluated examples besides these")
    add_common(overthink, "output folder: overthinking.json, overthinking.csv, overthinking.png", batch=4)
    overthink.set_defaults(run=_overthink)
