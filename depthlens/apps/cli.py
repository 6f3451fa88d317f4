"""The ``depthlens`` command: a thin layer over the library API.

Errors caused by the user's input (:class:`~depthlens.errors.DepthlensError`) are printed as one
line and exit with status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from depthlens.errors import DepthlensError

SAMPLE_PROMPT = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer"


def _table(args: argparse.Namespace) -> None:
    import torch
    from rich.console import Console
    from rich.table import Table

    from depthlens.model.hidden_states import capture
    from depthlens.lenses.lens import LogitLens, TunedLens
    from depthlens.model.load import load_model
    from depthlens.text.tokens import token_label

    text = sys.stdin.read() if args.text == "-" else args.text
    if not text.strip():
        raise DepthlensError("the text is empty: pass some text, or - to read it from standard input")
    model, tokenizer = load_model(args.model)
    lens = LogitLens(model) if args.lens == "logit" else TunedLens.from_pretrained(args.lens, model)
    input_ids = tokenizer(text, return_tensors="pt").input_ids[:, : args.max_tokens]
    states = capture(model, input_ids, parts=lens.parts)
    layers = sorted({*range(0, lens.num_layers + 1, args.every), lens.num_layers})
    with torch.no_grad():
        _, top1 = lens.top_k(states, k=1, layers=layers)

    table = Table(title=f"{lens.kind} lens on {args.model}: top-1 next token per layer (rows) and input token (columns)")
    table.add_column("layer", justify="right")
    for token_id in input_ids[0].tolist():
        table.add_column(token_label(tokenizer, token_id, args.width), no_wrap=True)
    for layer, row in zip(layers, top1[:, 0, :, 0].tolist()):
        name = "output" if layer == lens.num_layers else str(layer)
        table.add_row(name, *(token_label(tokenizer, t, args.width) for t in row))
    Console(width=max(120, 12 + (args.width + 3) * input_ids.shape[1])).print(table)


def _train(args: argparse.Namespace) -> None:
    from rich.console import Console

    from depthlens.training.train import train

    options = {name: value for name, value in vars(args).items() if name in _TRAIN_OPTIONS and value is not None}
    if "tokens" in options:
        options.setdefault("minutes", None)
    result = train(resume=args.resume, **options)
    if not args.no_eval and _is_first_process():
        _evaluate_and_report(result.model, result.tokenizer, result.lens, args.data, args.eval_tokens,
                             result.lens_path.parent / "eval")
        Console().print(f"lens saved to {result.lens_path}")


def _eval(args: argparse.Namespace) -> None:
    from depthlens.lenses.lens import TunedLens
    from depthlens.model.load import load_model

    lens_dir = args.lens or str(_default_run(args.model) / "lens")
    model, tokenizer = load_model(args.model)
    lens = TunedLens.from_pretrained(lens_dir, model)
    _evaluate_and_report(model, tokenizer, lens, args.data, args.tokens, args.out or str(Path(lens_dir).parent / "eval"))


def _evaluate_and_report(model, tokenizer, lens, data: str, tokens: int, out: str | Path) -> None:
    from rich.console import Console

    from depthlens.analysis.evaluate import evaluate_held_out
    from depthlens.lenses.lens import LogitLens
    from depthlens.viz.report import comparison_table, write_report

    report = evaluate_held_out(model, tokenizer, {"logit": LogitLens(model), "tuned": lens}, data, tokens=tokens)
    files = write_report(report, out)
    console = Console(width=max(Console().width, 100))
    console.print(comparison_table(report))
    console.print("evaluation written to " + ", ".join(str(path) for path in files.values()))


def _show(args: argparse.Namespace) -> None:
    from depthlens.errors import DataError
    from depthlens.lenses.lens import LogitLens, TunedLens
    from depthlens.model.load import load_model
    from depthlens.viz.pictures import output_kind, save_figure
    from depthlens.analysis.trajectory import Trajectory, encode, statistic

    statistic(args.stat)
    if args.out:
        output_kind(args.out)
    if args.max_tokens < 1:
        raise DepthlensError(f"--max-tokens must be at least 1, got {args.max_tokens}")
    if args.file and args.text is not None:
        raise DepthlensError("give the text or --file, not both")
    if args.file:
        try:
            text = Path(args.file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise DataError(f"cannot read {args.file}: {getattr(error, 'strerror', None) or error}") from None
    else:
        text = sys.stdin.read() if args.text == "-" else args.text or SAMPLE_PROMPT
    if not text.strip():
        raise DataError("the text is empty: pass some text, - to read standard input, or --file PATH")
    trained = _default_run(args.model) / "lens"
    lens_spec = args.lens or (str(trained) if trained.is_dir() else "logit")
    if args.compare and lens_spec == "logit":
        missing = "" if trained.is_dir() else f" (there is none at {trained})"
        raise DepthlensError(f"--compare needs a tuned lens: pass --lens DIR{missing}")

    model, tokenizer = load_model(args.model)
    lens = LogitLens(model) if lens_spec == "logit" else TunedLens.from_pretrained(lens_spec, model)
    input_ids, _ = encode(tokenizer, text)
    if input_ids.shape[1] > args.max_tokens:
        print(f"depthlens: showing the first {args.max_tokens} of {input_ids.shape[1]} tokens (--max-tokens)", file=sys.stderr)
    lenses = [LogitLens(lens.parts), lens] if args.compare else [lens]
    trajectories = [
        Trajectory.from_ids(model, each, input_ids[:, : args.max_tokens], tokenizer=tokenizer, k=args.k)
        for each in lenses
    ]
    if args.out:
        options = {"stat": args.stat, "layer_stride": args.layer_stride, "plotlyjs": args.plotlyjs}
        print(f"wrote {save_figure(trajectories, args.out, **options)}")
    else:
        print("\n\n".join(t.strided(args.layer_stride).summary() for t in trajectories))


def _app(args: argparse.Namespace) -> None:
    from depthlens.apps.web import serve

    serve(args.model, args.lens, host=args.host, port=args.port, max_tokens=args.max_tokens)


def _is_first_process() -> bool:
    import os

    return os.environ.get("RANK", "0") == "0"


def _default_run(model: str) -> Path:
    from depthlens.training.train import run_dir

    return run_dir(model)


_TRAIN_OPTIONS = {"model", "data", "column", "out", "objective", "optimizer", "init", "init_tokens", "ridge",
                  "chunk_len", "batch_tokens", "shortlist", "negatives", "tokens", "minutes", "lr", "clip", "warmup_steps", "layer_lr_decay",
                  "checkpoint_every", "seed"}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``depthlens`` command."""
    parser = argparse.ArgumentParser(prog="depthlens", description="See what a language model predicts at every layer.")
    commands = parser.add_subparsers(dest="command", required=True)

    table = commands.add_parser("table", help="print the top-1 prediction of every layer at every position")
    table.add_argument("text", nargs="?", default=SAMPLE_PROMPT, help="text to decode, or - for standard input")
    table.add_argument("--model", default="smollm2-135m", help="built-in name, .gguf file, model directory or hub name")
    table.add_argument("--lens", default="logit", help="'logit' or a tuned-lens directory")
    table.add_argument("--every", type=int, default=1, help="show every N-th layer (the output row is always shown)")
    table.add_argument("--max-tokens", type=int, default=24, help="decode at most this many tokens")
    table.add_argument("--width", type=int, default=8, help="characters per token label")
    table.set_defaults(run=_table)

    training = commands.add_parser("train", help="train a tuned lens (defaults: smollm2-135m on Shakespeare, ~10 minutes)")
    training.add_argument("--model", default="smollm2-135m", help="built-in name, .gguf file, model directory or hub name")
    training.add_argument("--data", default="shakespeare", help="shakespeare, a .txt/.jsonl/.parquet file, folder or glob, or a datasets name")
    training.add_argument("--column", help="text column of .jsonl/.parquet/datasets sources (default: text)")
    training.add_argument("--out", help="run directory (default: runs/<model>); the lens goes to <out>/lens")
    budget = training.add_mutually_exclusive_group()
    budget.add_argument("--minutes", type=float, help="wall-clock budget for training (default: 8)")
    budget.add_argument("--tokens", type=int, help="token budget for the KL steps")
    training.add_argument("--optimizer", choices=["adam", "muon", "sgd"], help="adam (default), muon, or the paper's SGD recipe")
    training.add_argument("--init", choices=["least_squares", "identity"], help="closed-form start (default) or identity")
    training.add_argument("--objective", choices=["kl", "ce"], help="distillation KL (default) or next-token cross-entropy")
    training.add_argument("--init-tokens", type=int, help="tokens for the closed-form start (default: 8192)")
    training.add_argument("--ridge", type=float, help="ridge penalty of the closed-form start (default: 1e-4)")
    training.add_argument("--chunk-len", type=int, help="tokens per chunk (default: 256)")
    training.add_argument("--batch-tokens", type=int, help="tokens per step and process (default: 256)")
    training.add_argument("--shortlist", type=int, metavar="K",
                          help="estimate the KL on each position's K likeliest final tokens plus sampled ones "
                               "(default: 8); 0 for the exact KL over the whole vocabulary")
    training.add_argument("--negatives", type=int, help="tokens sampled uniformly into each batch's shortlist (default: 512)")
    training.add_argument("--lr", type=float, help="peak learning rate (default: 5e-3 for adam, 0.01 for muon, 1.0 for sgd)")
    training.add_argument("--clip", type=float, help="gradient-norm clipping (default: 1.0)")
    training.add_argument("--warmup-steps", type=int, help="steps of linear learning-rate warmup (default: 20)")
    training.add_argument("--layer-lr-decay", type=float, help="layer l's learning rate is lr·(1 − this·l/L) (default: 0.7)")
    training.add_argument("--checkpoint-every", type=int, help="steps between checkpoints (default: 10)")
    training.add_argument("--seed", type=int)
    training.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint")
    training.add_argument("--eval-tokens", type=int, default=1024, help="held-out tokens for the final evaluation")
    training.add_argument("--no-eval", action="store_true", help="skip the evaluation after training")
    training.set_defaults(run=_train)

    evaluation = commands.add_parser("eval", help="per-layer evaluation of a tuned lens against the logit lens")
    evaluation.add_argument("--model", default="smollm2-135m")
    evaluation.add_argument("--lens", help="lens directory (default: runs/<model>/lens)")
    evaluation.add_argument("--data", default="shakespeare")
    evaluation.add_argument("--tokens", type=int, default=4096, help="held-out tokens to evaluate on")
    evaluation.add_argument("--out", help="output directory (default: next to the lens, eval/)")
    evaluation.set_defaults(run=_eval)

    show = commands.add_parser("show", help="picture (HTML, PNG, PDF, SVG) or table (CSV) of every layer's predictions")
    show.add_argument("text", nargs="?", help="text to decode, or - for standard input (default: a line of Hamlet)")
    show.add_argument("--file", help="read the text from this UTF-8 file")
    show.add_argument("--model", default="smollm2-135m", help="built-in name, .gguf file, model directory or hub name")
    show.add_argument("--lens", help="'logit' or a tuned-lens directory (default: runs/<model>/lens if trained, else logit)")
    show.add_argument("--compare", action="store_true", help="the logit lens and the tuned lens side by side, and their difference")
    show.add_argument("--stat", default="entropy", help="colour by entropy, kl, ce (nats), rank (log scale) or prob")
    show.add_argument("--k", type=int, default=5, help="top tokens kept per cell (shown on hover)")
    show.add_argument("--layer-stride", type=int, default=1, help="show every N-th layer (the output row is always shown)")
    show.add_argument("--max-tokens", type=int, default=64, help="decode at most this many tokens")
    show.add_argument("--out", help="write a .html, .png, .pdf or .svg picture or a .csv table (default: print a summary)")
    show.add_argument("--plotlyjs", choices=["inline", "cdn"], default="inline",
                      help="HTML only: embed plotly.js (~5 MB, opens offline) or load it from the web")
    show.set_defaults(run=_show)

    browser = commands.add_parser("app", help="explore every layer's predictions in the browser (a local web app)")
    browser.add_argument("--model", default="smollm2-135m", help="built-in name, .gguf file, model directory or hub name")
    browser.add_argument("--lens", action="append", metavar="DIR",
                         help="a tuned-lens directory to offer, repeatable (default: runs/<model>/lens if trained); "
                              "the logit lens is always offered")
    browser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    browser.add_argument("--port", type=int, default=7860)
    browser.add_argument("--max-tokens", type=int, default=64, help="longest text the app decodes, in tokens")
    browser.set_defaults(run=_app)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``depthlens`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except DepthlensError as error:
        print(f"depthlens: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
