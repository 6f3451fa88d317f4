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

from depthlens.apps import cli_applications, cli_cache, cli_causal, cli_eval, cli_generation, cli_hub, cli_readouts
from depthlens.apps.cli_eval import EVAL_CHUNK, check_ood, evaluate_and_report
from depthlens.apps.options import (
    LayerSelection,
    Parser,
    add_data,
    add_dtype,
    add_layers,
    add_lens,
    add_model,
    add_out,
    add_plotlyjs,
    check_at_least,
    parse_layers,
)
from depthlens.errors import DataError, DepthlensError, UsageError
from depthlens.text.samples import SAMPLE_PROMPT


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


def _layers_or_stride(args: argparse.Namespace, stride: str) -> LayerSelection | None:
    """``--layers``, parsed before any model loads, or ``None`` for every ``--every`` /
    ``--layer-stride``-th layer; giving both is refused (one would be ignored)."""
    flag = "--" + stride.replace("_", "-")
    if args.layers is not None and getattr(args, stride) != 1:
        raise UsageError(f"--layers and {flag} both pick layers: give one of them")
    return parse_layers(args.layers)


def _table(args: argparse.Namespace) -> None:
    import torch
    from rich.console import Console
    from rich.table import Table

    from depthlens.lenses.registry import check_spec, load_readout
    from depthlens.model.hidden_states import capture
    from depthlens.model.load import load_model
    from depthlens.text.tokens import token_label

    check_at_least(args, 1, "every", "max_tokens", "width")
    selection = _layers_or_stride(args, "every")
    text = _read_text(args, SAMPLE_PROMPT)
    check_spec(args.lens)
    model, tokenizer = load_model(args.model)
    lens = load_readout(args.lens, model)
    input_ids = tokenizer(text, return_tensors="pt").input_ids[:, : args.max_tokens]
    states = capture(model, input_ids, parts=lens.parts)
    layers = (selection.resolve(lens.num_layers) if selection
              else sorted({*range(0, lens.num_layers + 1, args.every), lens.num_layers}))
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

    _check_train(args, TrainConfig())
    settings = {field.name for field in fields(TrainConfig)}
    options = {name: value for name, value in vars(args).items() if name in settings and value is not None}
    if "tokens" in options:
        options.setdefault("minutes", None)
    result = train(resume=args.resume, **options)
    if not args.no_eval and is_first_process():
        evaluate_and_report(result.model, result.tokenizer, {result.lens.kind: result.lens}, args, args.eval_tokens,
                             runs.eval_dir_of_lens(result.lens_path))
        Console().print(f"lens saved to {result.lens_path}")


def _check_train(args: argparse.Namespace, defaults) -> None:
    """Refuse, naming the flag, ``train`` options that cannot work, before the model loads
    (``defaults``: a :class:`~depthlens.training.train.TrainConfig` with the defaults)."""
    check_at_least(args, 2, "chunk_len")
    check_at_least(args, 1, "tokens", "batch_tokens", "init_tokens")
    check_at_least(args, 0, "shortlist", "negatives", "warmup_steps", "lr", "ridge", "checkpoint_minutes")
    check_at_least(args, EVAL_CHUNK, "eval_tokens")
    for flag, value in (("--minutes", args.minutes), ("--clip", args.clip)):
        if value is not None and not value > 0:
            raise UsageError(f"{flag} must be above 0, got {value}")
    for flag, value in (("--init-share", args.init_share), ("--layer-lr-decay", args.layer_lr_decay)):
        if value is not None and not 0 <= value <= 1:
            raise UsageError(f"{flag} must be between 0 and 1, got {value}")
    batch = args.batch_tokens or defaults.batch_tokens
    if args.tokens is not None and args.tokens < batch:
        raise UsageError(f"--tokens {args.tokens} is less than one batch of --batch-tokens {batch}: "
                         f"use --tokens {batch} or more")
    check_ood(args)


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
    check_at_least(args, 1, "max_tokens", "k", "layer_stride")
    selection = _layers_or_stride(args, "layer_stride")
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
    if selection:
        trajectories = [t.select_layers(selection.resolve(lens.num_layers)) for t in trajectories]
    if args.out:
        options = {"stat": args.stat, "layer_stride": args.layer_stride, "plotlyjs": args.plotlyjs}
        print(f"wrote {save_figure(trajectories, args.out, **options)}")
    else:
        print("\n\n".join(t.strided(args.layer_stride).summary() for t in trajectories))


def _app(args: argparse.Namespace) -> None:
    from depthlens.apps.web import serve

    check_at_least(args, 1, "max_tokens")
    serve(args.model, args.lens, host=args.host, port=args.port, max_tokens=args.max_tokens)


def _add_table(commands: argparse._SubParsersAction) -> None:
    table = commands.add_parser("table", help="print the top-1 prediction of every layer at every position")
    table.add_argument("text", nargs="?", help="text to decode, or - for standard input (default: a line of Hamlet)")
    add_model(table)
    add_lens(table)
    table.add_argument("--every", type=int, default=1, help="show every N-th layer (the output row is always shown)")
    add_layers(table, "default: every --every-th layer")
    table.add_argument("--max-tokens", type=int, default=24, help="decode at most this many tokens")
    table.add_argument("--width", type=int, default=8, help="characters per token label")
    table.set_defaults(run=_table)


def _add_train(commands: argparse._SubParsersAction) -> None:
    training = commands.add_parser("train", help="train a tuned lens (defaults: smollm2-135m on the mixed corpus, a 6.5-minute budget; under 10 minutes in all "
                                                     "with the two evaluations on a 2-core Xeon with AMX, in bfloat16)")
    add_model(training)
    add_data(training, "mixed", "trained on its train split, evaluated on its validation split", columns=True)
    add_out(training, "run directory (default: runs/<model>); the lens goes to <out>/lens")
    add_dtype(training)
    budget = training.add_mutually_exclusive_group()
    budget.add_argument("--minutes", type=float, help="wall-clock budget for training, both phases (default: 6.5)")
    budget.add_argument("--tokens", type=int, help="token budget for the KL steps")
    training.add_argument("--optimizer", choices=["adam", "muon", "sgd"], help="adam (default), muon, or the paper's SGD recipe")
    training.add_argument("--init", choices=["least_squares", "identity"], help="closed-form start (default) or identity")
    training.add_argument("--objective", choices=["kl", "ce"], help="distillation KL (default) or next-token cross-entropy")
    training.add_argument("--site", choices=["block", "mid"],
                          help="where translators read: block outputs (default), or mid, after each block's attention and "
                               "before its MLP (a lens inside the blocks; default run folder runs/<model>/mid)")
    training.add_argument("--init-tokens", type=int, help="tokens for the closed-form start (default: 16384)")
    training.add_argument("--init-share", type=float,
                          help="with --minutes, the closed-form start stops after this share of the budget (default: 0.5)")
    training.add_argument("--ridge", type=float,
                          help="ridge penalty of the closed-form start, times the mean diagonal of XᵀX (default: 1e-4)")
    training.add_argument("--repeat-data", action="store_true",
                          help="let --tokens read the training split more than once, reshuffled each pass "
                               "(default: a budget larger than the split is refused)")
    training.add_argument("--chunk-len", type=int, help="tokens per chunk (default: 256)")
    training.add_argument("--batch-tokens", type=int, help="tokens per step and process (default: 256)")
    training.add_argument("--shortlist", type=int, metavar="K",
                          help="estimate the KL on each position's K likeliest final tokens plus sampled ones "
                               "(default: 8); 0 for the exact KL over the whole vocabulary")
    training.add_argument("--negatives", type=int, help="tokens sampled uniformly into each batch's shortlist (default: 512)")
    training.add_argument("--lr", type=float, help="peak learning rate (default: 0.01 for adam and muon, 1.0 for sgd)")
    training.add_argument("--clip", type=float, help="gradient-norm clipping (default: 1.0)")
    training.add_argument("--warmup-steps", type=int, help="steps of linear learning-rate warmup (default: 10)")
    training.add_argument("--layer-lr-decay", type=float, help="layer l's learning rate is lr·(1 − this·l/L) (default: 0.99)")
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
    add_layers(show, "rows to show, a half-layer row with the layer below; default: every --layer-stride-th")
    show.add_argument("--max-tokens", type=int, default=64, help="decode at most this many tokens")
    add_out(show, "write a .html, .png, .pdf or .svg picture or a .csv table (default: print a summary)")
    add_dtype(show)
    add_plotlyjs(show)
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
    parser = Parser(prog="depthlens", description="See what a language model predicts at every layer.")
    commands = parser.add_subparsers(dest="command", required=True)
    for add in (_add_table, _add_train, cli_eval.add_parsers, _add_show, _add_app, cli_cache.add_parsers,
                cli_causal.add_parsers, cli_applications.add_parsers, cli_readouts.add_parsers,
                cli_generation.add_parsers, cli_hub.add_parsers):
        add(commands)
    for name in set(commands.choices) - {"cache", "tasks", "push"}:
        commands.choices[name].add_argument("--no-cache", action="store_true",
                                            help="load the model without the model cache (see depthlens cache)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``depthlens`` console script; returns the exit status."""
    from depthlens.apps.terminal import one_line_warnings

    args = build_parser().parse_args(argv)
    try:
        with one_line_warnings():
            _run(args)
    except DepthlensError as error:
        print(f"depthlens: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
