"""Command-line commands of the neighbouring readouts; :func:`add_parsers` adds them to ``depthlens``:

- ``depthlens attribute`` — estimate the attribute lens of relations, score its faithfulness per
  layer on held-out subjects (JSON, CSV, picture), optionally save it or draw it on a text;
- ``depthlens dla`` — direct logit attribution of one logit (JSON, CSV of terms, layer × head grid
  and per-layer bar chart);

(``patchscope`` and ``generate`` live in :mod:`depthlens.apps.cli_generation`.) Everything is
written into ``--out DIR``, checked before the model loads; without it a summary is printed.
Every option is checked before the model loads too, except what needs the model (a rank above
its width, a position beyond the text).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from depthlens.apps.options import (
    add_layers,
    add_model,
    add_out,
    check_at_least,
    check_out,
    parse_layers,
    warn,
    write_csv,
    write_json,
)
from depthlens.errors import UsageError


@contextmanager
def progress_bar(total: int, what: str) -> Iterator[Callable[[int, int], None]]:
    """A tqdm bar on standard error (with its ETA) for ``total`` items, and the ``progress(done,
    total)`` callback that moves it; the bar is cleared when the block ends, error or not, so a
    message after it starts on a line of its own."""
    from tqdm import tqdm

    with tqdm(total=total, desc=what, file=sys.stderr, leave=False) as bar:
        yield lambda done, _total: bar.update(done - bar.n)


def _save_pictures(out: Path, stem: str, grid: Any, extra: dict[str, Any] | None = None) -> list[Path]:
    from depthlens.viz.pictures import save_figure

    written = [save_figure(grid, out / f"{stem}.{suffix}") for suffix in ("png", "html")]
    written.append(save_figure(grid, out / f"{stem}-grid.csv"))
    for name, figure in (extra or {}).items():
        written.append(save_figure(figure, out / name))
    return written


FEW_SUBJECTS = 20
"""Below this many held-out subjects a faithfulness (a fraction) moves in steps over 5%: warned."""


def _check_attribute(args: argparse.Namespace) -> list:
    """Every option of ``attribute`` checked before the model loads; the relations, each with
    its ``(train, held_out)`` split."""
    from depthlens.text.relations import load_relation

    check_at_least(args, 1, "train", "held_out", "rank")
    check_at_least(args, 0, "context")
    if args.context >= args.train:
        raise UsageError(f"--context {args.context} in-context examples are drawn from the other --train subjects, "
                         f"of which there are {args.train - 1}: use --context at most {args.train - 1} or a larger --train")
    if args.out is None and (args.save_lens or args.text is not None):
        raise UsageError(f"{'--save-lens' if args.save_lens else '--text'} writes into --out: add --out DIR")
    if args.text is not None and not args.text.strip():
        raise UsageError("--text is empty: give the text whose attribute-lens trajectory to draw")
    if args.out:
        check_out(args.out)
    splits = []
    for spec in args.relation:
        relation = load_relation(spec)
        train, held = relation.split(args.train, args.seed)
        splits.append((relation, train, held[: args.held_out]))
    return splits


def _attribute(args: argparse.Namespace) -> None:
    from depthlens.errors import RelationError
    from depthlens.lenses.attribute import faithfulness, fit_attribute_lens
    from depthlens.model.architecture import find_parts
    from depthlens.model.load import load_model

    splits = _check_attribute(args)
    model, tokenizer = load_model(args.model)
    width = find_parts(model).d_model
    if args.rank is not None and args.rank > width:
        raise RelationError(f"--rank {args.rank} is more than the model's width {width}: use --rank 1 … {width}")
    rows, lenses = [], {}
    for relation, _, held in splits:
        if len(held) < FEW_SUBJECTS:
            warn(f"{relation.name}: faithfulness from {len(held)} held-out subjects moves in steps of "
                 f"{1 / len(held):.0%}; {FEW_SUBJECTS} or more give a steadier score")
    for relation, train, held in splits:
        with progress_bar(len(train), f"{relation.name}: Jacobians") as progress:
            lens = fit_attribute_lens(model, tokenizer, relation, train, n_context=args.context, beta=args.beta,
                                      rank=args.rank, progress=progress)
        for beta in args.score_beta or [args.beta]:
            score = faithfulness(lens.with_beta(beta), model, tokenizer, relation, held)
            rows += [{**row, "beta": beta} for row in score.to_rows()]
        lenses[relation.name] = lens
        best = max((r for r in rows if r["relation"] == relation.name), key=lambda r: r["faithfulness"])
        print(f"{relation.name}: model correct on {score.model_correct:.0%} of {len(held)} held-out subjects; "
              f"best faithfulness {best['faithfulness']:.0%} at layer {best['layer']} (β = {best['beta']})")
    print("faithfulness: the share of held-out subjects where the lens's top-1 token at a layer is the model's own "
          "top-1; model correct: the share where the model's top-1 is the object's first token")
    if args.out:
        _write_attribute(args, Path(args.out), rows, lenses, model, tokenizer)


def _write_attribute(args: argparse.Namespace, out: Path, rows: list[dict], lenses: dict, model: Any,
                     tokenizer: Any) -> None:
    from depthlens.viz.pictures import save_figure
    from depthlens.viz.readout_charts import curves, faithfulness_grid

    written = [write_json(out / "faithfulness.json", rows), write_csv(out / "faithfulness.csv", rows)]
    keys = sorted({(r["relation"], r["beta"]) for r in rows})
    series = {
        f"{name} β={beta:g}": [r["faithfulness"] for r in rows if (r["relation"], r["beta"]) == (name, beta)]
        for name, beta in keys
    }
    layers = sorted({r["layer"] for r in rows})
    title = "attribute lens: top-1 agreement with the model on held-out subjects"
    picture = curves(layers, series, title=title, ylabel="faithfulness", backend="matplotlib")
    written.append(save_figure(picture, out / "faithfulness-curves.png"))
    written += _save_pictures(out, "faithfulness", faithfulness_grid(rows))
    for name, lens in lenses.items():
        if args.save_lens:
            written.append(lens.save_pretrained(out / f"lens-{name}"))
        if args.text:
            written += _trajectory_picture(model, tokenizer, lens, args.text, out / f"trajectory-{name}.html")
    print("wrote " + ", ".join(str(p) for p in written))


def _trajectory_picture(model: Any, tokenizer: Any, readout: Any, text: str, path: Path) -> list[Path]:
    from depthlens.analysis.trajectory import Trajectory
    from depthlens.viz.pictures import save_figure

    trajectory = Trajectory.from_text(model, tokenizer, readout, text)
    return [save_figure(trajectory, path, stat="prob"), save_figure(trajectory, path.with_suffix(".png"), stat="prob")]


def _check_dla(args: argparse.Namespace) -> Any:
    """Every option of ``dla`` checked before the model loads; the parsed ``--neurons``."""
    if not args.text.strip():
        raise UsageError("the text is empty: give the text whose next-token logit to attribute")
    check_at_least(args, 0, "show")
    check_at_least(args, 1, "top_neurons")
    neurons = parse_layers(args.neurons, "--neurons")
    if args.top_neurons is not None and neurons is None:
        raise UsageError("--top-neurons applies to the MLPs split by --neurons: add --neurons LAYERS, or drop it")
    if args.contrast is not None and args.contrast == args.target:
        raise UsageError(f"--contrast {args.contrast!r} is --target itself: target − contrast is 0 and every term "
                         "would be 0; pick another contrast token, or drop --contrast")
    if args.out:
        check_out(args.out)
    return neurons


def _dla(args: argparse.Namespace) -> None:
    from depthlens.analysis.dla import logit_attribution
    from depthlens.model.load import load_model

    neurons = _check_dla(args)
    model, tokenizer = load_model(args.model)
    ids = tokenizer(args.text, return_tensors="pt").input_ids
    attribution = logit_attribution(
        model,
        ids,
        tokenizer=tokenizer,
        position=args.position,
        target=args.target,
        contrast=args.contrast,
        neurons=neurons.resolve(model.config.num_hidden_layers - 1) if neurons else (),
        top_neurons=args.top_neurons or TOP_NEURONS,
    )
    _print_terms(attribution, args.show)
    if args.out:
        _write_dla(Path(args.out), attribution)


def _print_terms(attribution: Any, show: int) -> None:
    """The logit, its sum of terms and the ``show`` largest terms as a table."""
    print(f"{attribution.target} at position {attribution.position}: logit {attribution.logit:.4f} = sum of "
          f"{len(attribution.terms)} terms {attribution.total:.4f} (logits, before the softmax): what the embeddings, "
          "each head (L<layer>.H<head>), attention output bias, MLP (L<layer>.mlp; neurons L<layer>.N<index>) and the "
          "final norm's bias add to it directly")
    for note in attribution.notes:
        print(f"  note: {note}")
    top = sorted(attribution.terms, key=lambda t: -abs(t.value))[:show]
    if top:
        print(f"  {'term':>18}  {'direct effect':>13}")
    for term in top:
        print(f"  {term.name:>18}  {term.value:+13.4f}")


def _write_dla(out: Path, attribution: Any) -> None:
    from depthlens.viz.readout_charts import dla_bars

    written = [
        write_json(out / "dla.json", {**attribution.summary(), "terms": attribution.to_rows()}),
        write_csv(out / "dla-terms.csv", attribution.to_rows()),
    ]
    written += _save_pictures(
        out,
        "dla-heads",
        attribution.grid(),
        {"dla-layers.png": dla_bars(attribution, "matplotlib"), "dla-layers.html": dla_bars(attribution)},
    )
    print("wrote " + ", ".join(str(p) for p in written))


TOP_NEURONS = 10
"""Neurons kept per MLP split by ``--neurons`` when ``--top-neurons`` is not given."""


def add_parsers(commands: argparse._SubParsersAction) -> None:
    """Add ``attribute`` and ``dla`` to the ``depthlens`` subcommands."""
    attribute = commands.add_parser(
        "attribute", help="attribute lens of relations: faithfulness per layer (the share of held-out subjects where "
        "the lens's top-1 token is the model's own)")
    attribute.add_argument(
        "--relation",
        action="append",
        required=True,
        help="country-capital, country-language, country-currency, country-region, or a JSON file; repeatable",
    )
    attribute.add_argument("--train", type=int, default=8,
                           help="subjects to estimate the LRE from, one Jacobian each (default: 8; about 76 s each "
                                "on smollm2-135m on 2 CPU cores)")
    attribute.add_argument("--context", type=int, default=3,
                           help="in-context examples in each prompt, drawn from the other --train subjects (default: 3)")
    attribute.add_argument("--held-out", type=int, default=100,
                           help=f"held-out subjects to score at most (default: 100; below {FEW_SUBJECTS} a warning)")
    attribute.add_argument("--beta", type=float, default=1.0, help="scale β on W h (default: 1.0)")
    attribute.add_argument("--score-beta", type=float, action="append",
                           help="score these β instead of --beta (repeatable)")
    attribute.add_argument("--rank", type=int, help="keep the top singular directions of W (default: all)")
    attribute.add_argument("--save-lens", action="store_true", help="save each lens to OUT/lens-<relation>")
    attribute.add_argument("--text", help="also draw the attribute lens's trajectory on this text (needs --out)")
    attribute.add_argument("--seed", type=int, default=0, help="seed of the train / held-out split (default: 0)")

    dla = commands.add_parser("dla", help="direct logit attribution: the logit as a sum of what the embeddings, "
                              "every head and every MLP write directly")
    dla.add_argument("text", help="the text whose next-token logit is attributed")
    dla.add_argument("--position", type=int, default=-1,
                     help="token position to attribute, counted from 0, or from the end if negative "
                          "(default: -1, the last token)")
    dla.add_argument(
        "--target", help="target token (exactly one token, e.g. ' Paris', or #ID); default: the model's top-1"
    )
    dla.add_argument("--contrast", help="attribute the logit difference target − contrast (another single token)")
    add_layers(dla, "MLP layers 0 … L−1 to split into neurons, e.g. 20,25; default: none", option="--neurons")
    dla.add_argument("--top-neurons", type=int,
                     help=f"neurons kept per MLP of --neurons, the rest summed (default: {TOP_NEURONS})")
    dla.add_argument("--show", type=int, default=15, help="print this many largest terms (default: 15; 0 for none)")
    for parser, run in ((attribute, _attribute), (dla, _dla)):
        add_model(parser)
        add_out(parser, "write JSON, CSV and pictures into this folder (default: print a summary only)")
        parser.set_defaults(run=run)
