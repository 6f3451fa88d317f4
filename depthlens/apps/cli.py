"""The ``depthlens`` command: a thin layer over the library API.

Argument parsing and printing live here; lens specs are read by :mod:`depthlens.lenses.spec`,
run folders named by :mod:`depthlens.training.runs`, reports written and read by
:mod:`depthlens.viz.report`. Errors caused by the user's input
(:class:`~depthlens.errors.DepthlensError`) are printed as one line and exit with status 2;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from depthlens.apps import cli_applications, cli_causal, cli_hub, cli_readouts
from depthlens.apps.options import add_dtype, add_lens, add_model, add_out
from depthlens.errors import DataError, DepthlensError, UsageError
from depthlens.text.samples import SAMPLE_PROMPT


def _at_least_1(args: argparse.Namespace, *names: str) -> None:
    """Refuse counts below 1 among the options ``names``."""
    for name in names:
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {value}")


def _read_text(args: argparse.Namespace, default: str) -> str:
    """The text to decode: the ``text`` argument itself, standard input for ``-``, the UTF-8
    ``--file`` (where the command has one), or ``default`` when neither is given; an empty or
    blank text is refused."""
    text, file = args.text, getattr(args, "file", None)
    if file and text is not None:
        raise UsageError("give the text or --file, not both")
    if file:
        try:
            text = Path(file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise DataError(f"cannot read {file}: {getattr(error, 'strerror', None) or error}") from None
    elif text == "-":
        text = sys.stdin.read()
    elif text is None:
        text = default
    if not text.strip():
        other = ", or --file PATH" if hasattr(args, "file") else ""
        raise DataError(f"the text is empty: pass some text, - to read standard input{other}")
    return text


def _table(args: argparse.Namespace) -> None:
    import torch
    from rich.console import Console
    from rich.table import Table

    from depthlens.lenses.registry import check_spec, load_readout
    from depthlens.model.hidden_states import capture
    from depthlens.model.load import load_model
    from depthlens.text.tokens import token_label

    _at_least_1(args, "every", "max_tokens", "width")
    text = _read_text(args, SAMPLE_PROMPT)
    check_spec(args.lens)
    model, tokenizer = load_model(args.model)
    lens = load_readout(args.lens, model)
    input_ids = tokenizer(text, return_tensors="pt").input_ids[:, : args.max_tokens]
    states = capture(model, input_ids, parts=lens.parts)
    layers = sorted({*range(0, lens.num_layers + 1, args.every), lens.num_layers})
    with torch.no_grad():
        top1 = {layer: logits[0].argmax(-1).tolist() for layer, logits in lens.iter_logits(states, layers)}

    table = Table(title=f"{lens.kind} lens on {args.model}: top-1 next token per layer (rows) and input token (columns)")
    table.add_column("layer", justify="right")
    for token_id in input_ids[0].tolist():
        table.add_column(token_label(tokenizer, token_id, args.width), no_wrap=True)
    for layer, row in top1.items():
        name = "output" if layer == lens.num_layers else str(layer)
        table.add_row(name, *(token_label(tokenizer, t, args.width) for t in row))
    Console(width=max(120, 12 + (args.width + 3) * input_ids.shape[1])).print(table)


def _train(args: argparse.Namespace) -> None:
    from dataclasses import fields

    from rich.console import Console

    from depthlens.training import runs
    from depthlens.training.train import TrainConfig, is_first_process, train

    _at_least_1(args, "eval_tokens")
    _check_ood(args)
    settings = {field.name for field in fields(TrainConfig)}
    options = {name: value for name, value in vars(args).items() if name in settings and value is not None}
    if "tokens" in options:
        options.setdefault("minutes", None)
    result = train(resume=args.resume, **options)
    if not args.no_eval and is_first_process():
        _evaluate_and_report(result.model, result.tokenizer, result.lens, args, args.eval_tokens,
                             runs.eval_dir_of_lens(result.lens_path))
        Console().print(f"lens saved to {result.lens_path}")


def _check_ood(args: argparse.Namespace) -> None:
    """Refuse an out-of-domain source that is the training/held-out source itself."""
    if args.ood not in (None, "none") and args.ood == args.data:
        raise UsageError(f"--ood {args.ood} is the --data source itself: name another text, or --ood none")


def _eval(args: argparse.Namespace) -> None:
    from depthlens.atomic import check_output
    from depthlens.lenses.registry import check_spec, is_logit, load_readout
    from depthlens.model.load import load_model
    from depthlens.training import runs

    _at_least_1(args, "tokens")
    _check_ood(args)
    if args.lens is not None and is_logit(args.lens):
        raise UsageError("depthlens eval compares a readout with the logit lens: pass --lens with a lens folder, not logit")
    lens_dir = args.lens or runs.require_trained_lens(args.model)
    check_spec(lens_dir)
    out = check_output(args.out or runs.eval_dir_of_lens(lens_dir), "folder")
    model, tokenizer = load_model(args.model)
    lens = load_readout(lens_dir, model)
    _evaluate_and_report(model, tokenizer, lens, args, args.tokens, out)


def _evaluate_and_report(model, tokenizer, lens, args: argparse.Namespace, tokens: int, out: str | Path) -> None:
    """Evaluate on the held-out split of ``--data`` into ``out`` and, unless ``--ood none``, on the
    whole ``--ood`` source into ``out/ood``; print both tables and a one-line summary of each.

    ``lens`` is any readout; it is compared with the logit lens under the name of its kind."""
    from rich.console import Console

    from depthlens.analysis.evaluate import evaluate_held_out
    from depthlens.lenses.logit import LogitLens
    from depthlens.text.data import TextSource
    from depthlens.training.runs import ood_eval_dir
    from depthlens.viz.report import comparison_table, write_report

    lenses = {"logit": LogitLens(model), lens.kind: lens}
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
                         f"logit {means['logit']:.3f}, {lens.kind} {means[lens.kind]:.3f} nats")
    for line in summaries:
        console.print(line, soft_wrap=True)


def _show_lens_spec(args: argparse.Namespace) -> str:
    """``--lens``, else the trained lens of the default run, else the logit lens; ``--compare``
    needs another readout to compare with the logit lens."""
    from depthlens.lenses.registry import LOGIT, is_logit
    from depthlens.training import runs

    trained = runs.trained_lens(args.model)
    lens_spec = args.lens or (str(trained) if trained else LOGIT)
    if args.compare and is_logit(lens_spec):
        missing = "" if trained else f" (there is none at {runs.default_lens(args.model)})"
        raise UsageError(f"--compare needs a lens other than logit: pass --lens with a lens folder{missing}")
    return lens_spec


def _show(args: argparse.Namespace) -> None:
    from depthlens.analysis.trajectory import Trajectory, statistic
    from depthlens.atomic import check_output
    from depthlens.lenses.logit import LogitLens
    from depthlens.lenses.registry import check_spec, load_readout
    from depthlens.model.load import load_model
    from depthlens.text.encode import encode
    from depthlens.viz.pictures import output_kind, save_figure

    statistic(args.stat)
    if args.out:
        output_kind(args.out)
    _at_least_1(args, "max_tokens", "k", "layer_stride")
    text = _read_text(args, SAMPLE_PROMPT)
    lens_spec = _show_lens_spec(args)
    check_spec(lens_spec)
    if args.out:
        check_output(args.out)

    model, tokenizer = load_model(args.model)
    lens = load_readout(lens_spec, model)
    input_ids, _ = encode(tokenizer, text)
    if input_ids.shape[1] > args.max_tokens:
        print(f"depthlens: showing the first {args.max_tokens} of {input_ids.shape[1]} tokens (--max-tokens)", file=sys.stderr)
    lenses = [LogitLens(lens.parts), lens] if args.compare else [lens]
    trajectories = [
        Trajectory.from_ids(model, each, input_ids[:, : args.max_tokens], tokenizer=tokenizer, k=args.k,
                            dtype=args.dtype)
        for each in lenses
    ]
    if args.out:
        options = {"stat": args.stat, "layer_stride": args.layer_stride, "plotlyjs": args.plotlyjs}
        print(f"wrote {save_figure(trajectories, args.out, **options)}")
    else:
        print("\n\n".join(t.strided(args.layer_stride).summary() for t in trajectories))


def _app(args: argparse.Namespace) -> None:
    from depthlens.apps.web import serve

    _at_least_1(args, "max_tokens")
    serve(args.model, args.lens, host=args.host, port=args.port, max_tokens=args.max_tokens)


def _add_table(commands: argparse._SubParsersAction) -> None:
    table = commands.add_parser("table", help="print the top-1 prediction of every layer at every position")
    table.add_argument("text", nargs="?", help="text to decode, or - for standard input (default: a line of Hamlet)")
    add_model(table)
    add_lens(table)
    table.add_argument("--every", type=int, default=1, help="show every N-th layer (the output row is always shown)")
    table.add_argument("--max-tokens", type=int, default=24, help="decode at most this many tokens")
    table.add_argument("--width", type=int, default=8, help="characters per token label")
    table.set_defaults(run=_table)


def _add_train(commands: argparse._SubParsersAction) -> None:
    training = commands.add_parser("train", help="train a tuned lens (defaults: smollm2-135m on the mixed corpus, a 6.5-minute budget; under 10 minutes in all "
                                                     "with the two evaluations on a 2-core Xeon with AMX, in bfloat16)")
    add_model(training)
    training.add_argument("--data", default="mixed", help="mixed (the built-in corpus of many kinds of text), shakespeare, "
                                                          "a .txt/.jsonl/.parquet file, folder or glob, or a datasets name")
    training.add_argument("--column", help="text column of .jsonl/.parquet/datasets sources (default: text)")
    training.add_argument("--group-column", help="column whose value keeps documents together in the train/validation "
                                                 "split, e.g. a book id (default: split by document; shakespeare by play)")
    add_out(training, "run directory (default: runs/<model>); the lens goes to <out>/lens")
    add_dtype(training)
    budget = training.add_mutually_exclusive_group()
    budget.add_argument("--minutes", type=float, help="wall-clock budget for training, both phases (default: 6.5)")
    budget.add_argument("--tokens", type=int, help="token budget for the KL steps")
    training.add_argument("--optimizer", choices=["adam", "muon", "sgd"], help="adam (default), muon, or the paper's SGD recipe")
    training.add_argument("--init", choices=["least_squares", "identity"], help="closed-form start (default) or identity")
    training.add_argument("--objective", choices=["kl", "ce"], help="distillation KL (default) or next-token cross-entropy")
    training.add_argument("--init-tokens", type=int, help="tokens for the closed-form start (default: 16384)")
    training.add_argument("--init-share", type=float,
                          help="with --minutes, the closed-form start stops after this share of the budget (default: 0.5)")
    training.add_argument("--ridge", type=float,
                          help="ridge penalty of the closed-form start, times the mean diagonal of XᵀX (default: 1e-4)")
    training.add_argument("--chunk-len", type=int, help="tokens per chunk (default: 256)")
    training.add_argument("--batch-tokens", type=int, help="tokens per step and process (default: 256)")
    training.add_argument("--shortlist", type=int, metavar="K",
                          help="estimate the KL on each position's K likeliest final tokens plus sampled ones "
                               "(default: 8); 0 for the exact KL over the whole vocabulary")
    training.add_argument("--negatives", type=int, help="tokens sampled uniformly into each batch's shortlist (default: 512)")
    training.add_argument("--lr", type=float, help="peak learning rate (default: 0.01 for adam and muon, 1.0 for sgd)")
    training.add_argument("--clip", type=float, help="gradient-norm clipping (default: 1.0)")
    training.add_argument("--warmup-steps", type=int, help="steps of linear learning-rate warmup (default: 10)")
    training.add_argument("--layer-lr-decay", type=float, help="layer l's learning rate is lr·(1 − this·l/L) (default: 0.95)")
    training.add_argument("--checkpoint-minutes", type=float,
                          help="minutes of training between checkpoints, 0 for every step (default: 2; always at the end)")
    training.add_argument("--seed", type=int)
    training.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint")
    training.add_argument("--eval-tokens", type=int, default=4096,
                          help="tokens for each final evaluation, held-out and out-of-domain (default: 4096)")
    training.add_argument("--ood", default="mixed:dataset-descriptions",
                          help="out-of-domain text for a second evaluation (default: mixed:dataset-descriptions, a kind "
                               "the mixed corpus never trains on); none to skip")
    training.add_argument("--no-eval", action="store_true", help="skip the evaluation after training")
    training.set_defaults(run=_train)


def _add_eval(commands: argparse._SubParsersAction) -> None:
    evaluation = commands.add_parser("eval", help="per-layer evaluation of a readout against the logit lens")
    add_model(evaluation)
    add_lens(evaluation, None, note="the readout to evaluate; default: runs/<model>/lens")
    evaluation.add_argument("--data", default="shakespeare", help="held-out text: the validation split of this source")
    evaluation.add_argument("--column", help="text column of .jsonl/.parquet/datasets sources (default: text)")
    evaluation.add_argument("--group-column", help="the grouping column the lens was trained with, if any")
    evaluation.add_argument("--ood", default="none",
                            help="also evaluate on the whole of this out-of-domain source, e.g. python-docs (default: none)")
    evaluation.add_argument("--tokens", type=int, default=4096, help="held-out tokens to evaluate on")
    add_out(evaluation, "output directory (default: next to the lens, eval/)")
    add_dtype(evaluation)
    evaluation.set_defaults(run=_eval)


def _add_show(commands: argparse._SubParsersAction) -> None:
    show = commands.add_parser("show", help="picture (HTML, PNG, PDF, SVG) or table (CSV) of every layer's predictions")
    show.add_argument("text", nargs="?", help="text to decode, or - for standard input (default: a line of Hamlet)")
    show.add_argument("--file", help="read the text from this UTF-8 file")
    add_model(show)
    add_lens(show, None, note="default: runs/<model>/lens if trained, else logit")
    show.add_argument("--compare", action="store_true", help="the logit lens and --lens side by side, and their difference")
    show.add_argument("--stat", default="entropy", help="colour by entropy, kl, ce (nats), rank (log scale) or prob")
    show.add_argument("--k", type=int, default=5, help="top tokens kept per cell (shown on hover)")
    show.add_argument("--layer-stride", type=int, default=1, help="show every N-th layer (the output row is always shown)")
    show.add_argument("--max-tokens", type=int, default=64, help="decode at most this many tokens")
    add_out(show, "write a .html, .png, .pdf or .svg picture or a .csv table (default: print a summary)")
    add_dtype(show)
    show.add_argument("--plotlyjs", choices=["inline", "cdn"], default="inline",
                      help="HTML only: embed plotly.js (~5 MB, opens offline) or load it from the web")
    show.set_defaults(run=_show)


def _add_app(commands: argparse._SubParsersAction) -> None:
    browser = commands.add_parser("app", help="explore every layer's predictions in the browser (a local web app)")
    add_model(browser)
    add_lens(browser, repeatable=True,
             note="each one offered; default: runs/<model>/lens if trained; the logit lens is always offered")
    browser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    browser.add_argument("--port", type=int, default=7860)
    browser.add_argument("--max-tokens", type=int, default=64, help="longest text the app decodes, in tokens")
    browser.set_defaults(run=_app)


def _cache(args: argparse.Namespace) -> None:
    from depthlens.model import cache
    from depthlens.model.load import clear_cache

    root = cache.cache_root()
    if args.action == "list":
        entries = cache.list_entries()
        for entry in entries:
            stale = "" if entry.current else "  (other library versions: clear it)"
            print(f"{entry.size / 2**20:8.0f} MiB  {entry.dtype:<8}  {entry.spec}  from {entry.source}{stale}")
        print(f"{len(entries)} cached model(s), {sum(e.size for e in entries) / 2**20:.0f} MiB, in {root}")
        return
    if args.all == (args.spec is not None):
        raise UsageError("give the model spec whose cache entries to remove, or --all")
    removed = clear_cache(None if args.all else args.spec)
    what = "every entry" if args.all else f"the entries of {args.spec}"
    print(f"removed {len(removed)} cached model(s), {sum(e.size for e in removed) / 2**20:.0f} MiB ({what}) from {root}")


def _add_cache(commands: argparse._SubParsersAction) -> None:
    cached = commands.add_parser("cache", help="list or clear the model cache (GGUF models dequantized once, kept as safetensors)")
    actions = cached.add_subparsers(dest="action", required=True)
    actions.add_parser("list", help="show every cached model with its size and source")
    clear = actions.add_parser("clear", help="remove the cached copies of one model, or all of them")
    clear.add_argument("spec", nargs="?", help="built-in name or .gguf file whose cached copies to remove")
    clear.add_argument("--all", action="store_true", help="remove every cached model")
    cached.set_defaults(run=_cache)


def _run(args: argparse.Namespace) -> None:
    """Run the command; with ``--no-cache``, DEPTHLENS_NO_CACHE=1 holds while it runs (and in the
    processes it starts), so every model load bypasses the model cache."""
    import os

    from depthlens.model.cache import NO_CACHE_ENV

    if not getattr(args, "no_cache", False):
        return args.run(args)
    previous = os.environ.get(NO_CACHE_ENV)
    os.environ[NO_CACHE_ENV] = "1"
    try:
        args.run(args)
    finally:
        if previous is None:
            os.environ.pop(NO_CACHE_ENV, None)
        else:
            os.environ[NO_CACHE_ENV] = previous


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``depthlens`` command."""
    parser = argparse.ArgumentParser(prog="depthlens", description="See what a language model predicts at every layer.")
    commands = parser.add_subparsers(dest="command", required=True)
    for add in (_add_table, _add_train, _add_eval, _add_show, _add_app, _add_cache,
                cli_causal.add_parsers, cli_applications.add_parsers, cli_readouts.add_parsers, cli_hub.add_parsers):
        add(commands)
    for name in set(commands.choices) - {"cache", "tasks", "push"}:
        commands.choices[name].add_argument("--no-cache", action="store_true",
                                            help="load the model without the model cache (see depthlens cache)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``depthlens`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        _run(args)
    except DepthlensError as error:
        print(f"depthlens: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
