"""``depthlens depth``: prediction depth (Baldock et al. 2021, read with a lens as in Belrose et
al. 2023, §5.3) of every token of a text (a picture, a CSV, JSON), of every example of a task, or
its Spearman ρ with the iteration learned over training checkpoints
(:mod:`depthlens.analysis.applications.depth`). ``--out NAME.png`` (``.svg``, ``.pdf``, ``.html``)
is the picture of one readout, or of two side by side with their difference; any other ``--out``
is a folder. A text and ``--task`` exclude each other, and options the chosen mode would ignore
are refused."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from depthlens.apps.app_options import (
    FILE_SUFFIXES,
    PICTURE_SUFFIXES,
    TASK_HELP,
    add_common,
    check_lenses,
    load_readouts,
    load_task_of,
    out_folder,
    out_suffix,
    readout_count,
    warn_short,
)
from depthlens.apps.options import check_at_least, check_out, file_stem, write_csv, write_json
from depthlens.errors import DataError, UsageError


def _depth(args: argparse.Namespace) -> None:
    check_at_least(args, 1, "max_tokens", "width", "batch_size", "limit")
    if args.task:
        _check_task_depth(args)
        out = out_folder(args, "depth.json, depth.csv")
        check_lenses(args)
        task = load_task_of(args)
        warn_short(args, task)
        _task_depth(args, task, out, *load_readouts(args))
        return
    ignored = [flag for flag, value in (("--limit", args.limit), ("--seed", args.seed), ("--cue", args.cue),
                                         ("--data-dir", args.data_dir)) if value is not None]
    if ignored:
        raise UsageError(f"{ignored[0]} only applies with --task; drop it, or add --task")
    text = _depth_text(args)
    for spec in args.checkpoints or []:
        local = spec.startswith((".", "/", "~")) or spec.endswith(".gguf")
        if local and not Path(spec).expanduser().exists():
            raise UsageError(f"--checkpoints {spec}: no such file or folder; give the earlier checkpoints' "
                             "folders (or hub names) in training order")
    suffix = out_suffix(args)
    if suffix in FILE_SUFFIXES and suffix not in PICTURE_SUFFIXES:
        raise UsageError(f"--out {args.out}: give a picture file ({', '.join(PICTURE_SUFFIXES)}) or a folder "
                         "(depth.json, depth_<readout>.csv and .png)")
    if suffix in PICTURE_SUFFIXES and readout_count(args) > 2:
        raise UsageError(f"--out {args.out}: a picture file shows one or two readouts, and {readout_count(args)} "
                         "are given (the logit lens and each --lens); give a folder instead")
    out = check_out(args.out, "file" if suffix in PICTURE_SUFFIXES else "folder")
    model, tokenizer, lenses = load_readouts(args)
    _text_depth(args, text, out, model, tokenizer, lenses)


def _depth_text(args: argparse.Namespace) -> str:
    """The text of ``depth``: the argument, or the UTF-8 ``--file``; refused if empty or both."""
    if args.file and args.text is not None:
        raise UsageError("give the text or --file, not both")
    text = args.text or ""
    if args.file:
        try:
            text = Path(args.file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise DataError(f"--file {args.file}: cannot read it ({getattr(error, 'strerror', None) or error}); "
                            "give a UTF-8 text file") from None
    if not text.strip():
        raise DataError(f"{'--file ' + args.file if args.file else 'the text'} is empty: give a text to read "
                        "(depthlens depth 'some text'), --file, or --task")
    return text


def _check_task_depth(args: argparse.Namespace) -> None:
    if args.text is not None or args.file:
        raise UsageError("give a text (or --file) or --task, not both: --task measures each example's depth and "
                         "would ignore the text")
    for flag, value in (("--checkpoints", args.checkpoints), ("--width", args.width),
                        ("--max-tokens", args.max_tokens)):
        if value is not None:
            raise UsageError(f"{flag} applies to a text, not to --task; drop it")


def _text_depth(args: argparse.Namespace, text: str, out: Path, model: Any, tokenizer: Any, lenses: dict) -> None:
    from depthlens.analysis.applications.depth import depth_grid, token_depths
    from depthlens.analysis.trajectory import Trajectory
    from depthlens.viz.pictures import save_figure

    summary: dict[str, Any] = {"model": args.model, "text": text}
    grids = {}
    print(f"{'readout':16s} {'tokens':>6s} {'mean depth':>10s} {'median':>6s} {'at depth 0':>10s}  (layers 0 … L)")
    for name, readout in lenses.items():
        traj = Trajectory.from_text(model, tokenizer, readout, text, k=1, max_tokens=args.max_tokens or 256,
                                    lens_name=f"{name} lens")
        depth = token_depths(traj)[0]
        depth = depth[depth >= 0].float()
        summary[name] = {"mean_depth": float(depth.mean()), "depths": depth.long().tolist()}
        print(f"{name[:16]:16s} {len(depth):6d} {float(depth.mean()):10.2f} {float(depth.median()):6.0f} "
              f"{float((depth == 0).float().mean()):10.0%}  (L = {traj.num_layers})")
        grids[file_stem(name)] = depth_grid(traj, width=args.width or 16)
    print("prediction depth of a token: the first layer from which the lens's top-1 token stays what it is at the "
          "last layer L (0 = settled from the embeddings on, L = only at the output)")
    if args.checkpoints:
        summary["training"] = _checkpoint_rho(args, model, tokenizer, lenses, text)
    if out.suffix.lower() in PICTURE_SUFFIXES:  # one readout, or two side by side with their difference
        written = [save_figure(list(grids.values()), out)]
    else:
        written = [save_figure(grid, out / f"depth_{stem}{suffix}") for stem, grid in grids.items()
                   for suffix in (".png", ".csv")]
        written.append(write_json(out / "depth.json", summary))
    print(f"wrote {', '.join(str(path) for path in written)}")


def _checkpoint_rho(args: argparse.Namespace, model: Any, tokenizer: Any, lenses: dict, text: str) -> dict:
    from depthlens.analysis.applications.depth import depth_vs_training
    from depthlens.text.encode import encode

    ids, mask = encode(tokenizer, text, args.max_tokens or 256)
    found = depth_vs_training([*args.checkpoints, model], model, lenses, ids, mask)
    print(f"{found.tokens} tokens, {found.checkpoints} checkpoints; mean iteration learned {found.mean_iteration:.2f}")
    for name, rho in found.rho.items():
        print(f"{name[:16]:16s} Spearman ρ(prediction depth, iteration learned) = {rho:.3f}")
    return found.to_dict()


def _task_depth(args: argparse.Namespace, task: Any, out: Path, model: Any, tokenizer: Any, lenses: dict) -> None:
    import numpy as np

    from depthlens.analysis.applications.depth import example_depths
    from depthlens.analysis.applications.features import score_choices

    scores = score_choices(model, tokenizer, lenses, task.examples, batch_size=args.batch_size)
    rows = []
    print(f"{'readout':16s} {'examples':>8s} {'mean depth':>10s} {'median':>6s} {'accuracy':>8s}")
    for name in lenses:
        depths = example_depths(scores.loglik[name])
        rows.extend({"readout": name, "example": i, "depth": int(d), "correct": bool(c)}
                    for i, (d, c) in enumerate(zip(depths, scores.loglik[name][:, -1].argmax(-1) == scores.gold)))
        print(f"{name[:16]:16s} {len(depths):8d} {depths.mean():10.2f} {np.median(depths):6.0f} "
              f"{scores.accuracy(name):8.3f}")
    print(f"prediction depth of an example: the first layer from which the lens's likeliest choice stays what it is "
          f"at the last layer L = {scores.num_layers}; accuracy: the model's, at layer L")
    write_json(out / "depth.json", {"model": args.model, "task": task.name, "accuracy": scores.accuracy(), "rows": rows})
    write_csv(out / "depth.csv", rows)
    print(f"wrote {out}/depth.json, depth.csv")


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Add ``depth`` to ``commands``."""
    depth = commands.add_parser(
        "depth", help="prediction depth per token (picture) or per task example",
        description="Prediction depth: the first layer from which a lens's top-1 prediction stays what it is at the "
                    "last layer L (0 = settled from the embeddings, L = only at the output).")
    depth.add_argument("text", nargs="?", help="text whose tokens to read")
    depth.add_argument("--file", help="read the text from this UTF-8 file")
    depth.add_argument("--task", help=f"per-example depth on a task instead of a text: {TASK_HELP}")
    depth.add_argument("--checkpoints", nargs="+", metavar="SPEC",
                       help="earlier checkpoints of --model in training order: report ρ(depth, iteration learned)")
    depth.add_argument("--max-tokens", type=int, help="tokens of the text to read (default 256)")
    depth.add_argument("--width", type=int, help="tokens per line of the picture (default 16)")
    add_common(depth, "a picture file (.png, .svg, .pdf, .html; with one --lens, that lens beside the logit lens and "
                   "their difference) or a folder: depth.json, depth_<readout>.png and .csv (with --task: depth.json, "
                   "depth.csv)")
    depth.set_defaults(run=_depth)


__all__ = ["add_parser"]
