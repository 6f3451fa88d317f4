"""Command-line commands of the neighbouring readouts; :func:`add_parsers` adds them to ``depthlens``:

- ``depthlens attribute`` — estimate the attribute lens of relations, score its faithfulness per
  layer on held-out subjects (JSON, CSV, picture), optionally save it or draw it on a text;
- ``depthlens dla`` — direct logit attribution of one logit (JSON, CSV of terms, layer × head grid
  and per-layer bar chart);
- ``depthlens patchscope`` — patch a state into a target prompt and read every layer (picture,
  JSON) or generate; ``--identity-curve`` scores token identity per source layer;
- ``depthlens generate`` — generate from a readout at chosen layers (JSON).

Everything is written into ``--out DIR``; without it a summary is printed. ``python -m
depthlens.apps.cli_readouts`` runs these commands alone.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from depthlens.apps.options import add_layers, add_lens, add_model, add_out, parse_layers, write_csv, write_json
from depthlens.errors import UsageError


def _bar(total: int, what: str) -> Any:
    """A tqdm progress bar on standard error and the ``progress(done, total)`` callback that moves it."""
    from tqdm import tqdm

    bar = tqdm(total=total, desc=what, file=sys.stderr, leave=False)
    return bar, lambda done, _total: bar.update(done - bar.n)


def _save_pictures(out: Path, stem: str, grid: Any, extra: dict[str, Any] | None = None) -> list[Path]:
    from depthlens.viz.pictures import save_figure

    written = [save_figure(grid, out / f"{stem}.{suffix}") for suffix in ("png", "html")]
    written.append(save_figure(grid, out / f"{stem}-grid.csv"))
    for name, figure in (extra or {}).items():
        written.append(save_figure(figure, out / name))
    return written


def _attribute(args: argparse.Namespace) -> None:
    from depthlens.lenses.attribute import faithfulness, fit_attribute_lens
    from depthlens.model.load import load_model
    from depthlens.text.relations import load_relation
    from depthlens.viz.pictures import save_figure
    from depthlens.viz.readout_charts import curves, faithfulness_grid

    relations = [load_relation(spec) for spec in args.relation]
    model, tokenizer = load_model(args.model)
    rows, lenses = [], {}
    for relation in relations:
        train, held = relation.split(args.train, args.seed)
        held = held[: args.held_out]
        bar, progress = _bar(len(train), f"{relation.name}: Jacobians")
        lens = fit_attribute_lens(
            model, tokenizer, relation, train, n_context=args.context, beta=args.beta, rank=args.rank, progress=progress
        )
        bar.close()
        for beta in args.score_beta or [args.beta]:
            score = faithfulness(lens.with_beta(beta), model, tokenizer, relation, held)
            rows += [{**row, "beta": beta} for row in score.to_rows()]
        lenses[relation.name] = lens
        best = max((r for r in rows if r["relation"] == relation.name), key=lambda r: r["faithfulness"])
        print(
            f"{relation.name}: model correct on {score.model_correct:.0%} of {len(held)} held-out subjects; "
            f"best faithfulness {best['faithfulness']:.0%} at layer {best['layer']} (β = {best['beta']})"
        )
    if not args.out:
        return
    out = Path(args.out)
    write_json(out / "faithfulness.json", rows)
    write_csv(out / "faithfulness.csv", rows)
    grid = faithfulness_grid(rows)
    keys = sorted({(r["relation"], r["beta"]) for r in rows})
    series = {
        f"{name} β={beta:g}": [r["faithfulness"] for r in rows if (r["relation"], r["beta"]) == (name, beta)]
        for name, beta in keys
    }
    layers = sorted({r["layer"] for r in rows})
    title = "attribute lens: top-1 agreement with the model on held-out subjects"
    picture = curves(layers, series, title=title, ylabel="faithfulness", backend="matplotlib")
    save_figure(picture, out / "faithfulness-curves.png")
    written = _save_pictures(out, "faithfulness", grid)
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


def _dla(args: argparse.Namespace) -> None:
    from depthlens.analysis.dla import logit_attribution
    from depthlens.model.load import load_model
    from depthlens.viz.readout_charts import dla_bars

    neurons = parse_layers(args.neurons, "--neurons")
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
        top_neurons=args.top_neurons,
    )
    top = sorted(attribution.terms, key=lambda t: -abs(t.value))[: args.show]
    print(
        f"{attribution.target} at position {attribution.position}: logit {attribution.logit:.4f} = sum of "
        f"{len(attribution.terms)} terms {attribution.total:.4f} (nats)"
    )
    for note in attribution.notes:
        print(f"  note: {note}")
    for term in top:
        print(f"  {term.name:>18}  {term.value:+.4f}")
    if args.out:
        out = Path(args.out)
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


def _patchscope(args: argparse.Namespace) -> None:
    from depthlens.analysis.patchscope import TARGET_PROMPTS, Patch, patchscope, patchscope_generate, tuned_map
    from depthlens.lenses.registry import check_spec, load_readout
    from depthlens.model.load import load_model

    check_spec(args.lens)
    parse_layers(args.layers)
    model, tokenizer = load_model(args.model)
    if args.identity_curve:
        return _identity_curve(args, model, tokenizer)
    if args.source_layer is None:
        raise UsageError("give --source-layer (or --identity-curve)")
    target = TARGET_PROMPTS.get(args.target, args.target)
    source_ids = tokenizer(args.text, return_tensors="pt").input_ids
    target_ids = tokenizer(target, return_tensors="pt").input_ids
    readout = load_readout(args.lens, model)
    if args.map == "tuned" and readout.kind != "tuned":
        raise UsageError(f"--map tuned needs a tuned lens: pass --lens with a tuned-lens folder, not a {readout.kind} readout")
    mapping = tuned_map(readout, args.source_layer) if args.map == "tuned" else None
    patch = Patch(args.source_layer, args.source_position, args.target_layer, args.target_position)
    result = patchscope(model, source_ids, target_ids, patch, mapping=mapping)
    ids, probs = result.top(5)
    print(
        f"source {tokenizer.decode([int(source_ids[0, args.source_position])])!r} "
        f"(layer {args.source_layer}) → target layer "
        f"{result.patch.target_layer}: next token "
        + ", ".join(f"{tokenizer.decode([i])!r} {p:.2f}" for i, p in zip(ids, probs))
    )
    document: dict[str, Any] = {
        "patch": vars(result.patch),
        "top": [[tokenizer.decode([i]), p] for i, p in zip(ids, probs)],
    }
    if args.generate:
        generation = patchscope_generate(
            model, source_ids, target_ids, patch, mapping=mapping, max_new_tokens=args.generate
        )
        document["generation"] = generation.texts(tokenizer)[0]
        print(f"generated: {document['generation']!r}")
    if args.out:
        out = Path(args.out)
        trajectory = result.trajectory(readout, tokenizer)
        written = [write_json(out / "patchscope.json", document)]
        written += [trajectory.to_csv(out / "patchscope-trajectory.csv")]
        from depthlens.viz.pictures import save_figure

        written += [save_figure(trajectory, out / f"patchscope.{s}", stat="prob") for s in ("png", "html")]
        print("wrote " + ", ".join(str(p) for p in written))


def _identity_curve(args: argparse.Namespace, model: Any, tokenizer: Any) -> None:
    from depthlens.analysis.patchscope import TARGET_PROMPTS, token_identity_curve
    from depthlens.viz.pictures import save_figure
    from depthlens.viz.readout_charts import curves

    texts = [args.text] if args.text else []
    if args.texts:
        texts += [line for line in Path(args.texts).read_text(encoding="utf-8").splitlines() if line.strip()]
    if not texts:
        raise UsageError("--identity-curve needs source texts: give TEXT or --texts FILE")
    selection = parse_layers(args.layers)
    layers = selection.resolve(model.config.num_hidden_layers) if selection else None
    bar, progress = _bar(len(layers) if layers else model.config.num_hidden_layers + 1, "source layers")
    curve = token_identity_curve(
        model,
        tokenizer,
        texts,
        layers=layers,
        target_prompt=TARGET_PROMPTS.get(args.target, args.target),
        progress=progress,
    )
    bar.close()
    for row in curve.to_rows():
        print(
            f"layer {row['source_layer']:>3}: precision@1 identity {row['precision_at_1_identity']:.2f}, "
            f"next token {row['precision_at_1_next_token']:.2f}"
        )
    if args.out:
        out = Path(args.out)
        written = [
            write_json(out / "identity-curve.json", curve.to_rows()),
            write_csv(out / "identity-curve.csv", curve.to_rows()),
        ]
        figure = curves(
            curve.layers,
            {"source token (identity)": curve.identity, "model's next-token prediction": curve.next_token},
            title=f"token-identity Patchscope, {curve.positions} source positions",
            xlabel="source layer (= target layer)",
            ylabel="precision@1",
            backend="matplotlib",
        )
        written.append(save_figure(figure, out / "identity-curve.png"))
        print("wrote " + ", ".join(str(p) for p in written))


def _generate(args: argparse.Namespace) -> None:
    import torch

    from depthlens.analysis.generate import generate_from_layer
    from depthlens.lenses.registry import check_spec, load_readout
    from depthlens.model.load import load_model
    from depthlens.text.encode import encode

    check_spec(args.lens)
    selection = parse_layers(args.layers)
    model, tokenizer = load_model(args.model)
    readout = load_readout(args.lens, model)
    layers = selection.resolve(readout.num_layers) if selection else [readout.num_layers]
    ids, mask = encode(tokenizer, args.text)
    generator = torch.Generator().manual_seed(args.seed)
    results = []
    bar, _ = _bar(len(layers), "layers")
    for layer in layers:
        generation = generate_from_layer(
            model,
            readout,
            ids,
            mask,
            layer=layer,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            generator=generator,
        )
        text = generation.texts(tokenizer)
        results.append(
            {
                "layer": layer,
                "readout": readout.kind,
                "prompts": args.text,
                "continuations": text,
                "mean_log_prob": float(generation.log_probs.mean()),
            }
        )
        print(f"layer {layer:>3} ({readout.kind}): " + " | ".join(repr(t) for t in text))
        bar.update(1)
    bar.close()
    if args.out:
        print(f"wrote {write_json(Path(args.out) / 'generations.json', results)}")


def add_parsers(commands: argparse._SubParsersAction) -> None:
    """Add ``attribute``, ``dla``, ``patchscope`` and ``generate`` to the ``depthlens`` subcommands."""
    attribute = commands.add_parser("attribute", help="attribute lens of relations: faithfulness per layer")
    attribute.add_argument(
        "--relation",
        action="append",
        required=True,
        help="country-capital, country-language, country-currency, country-region, or a JSON file; repeatable",
    )
    attribute.add_argument("--train", type=int, default=8, help="subjects to estimate the LRE from")
    attribute.add_argument("--context", type=int, default=3, help="in-context examples in each prompt")
    attribute.add_argument("--held-out", type=int, default=100, help="held-out subjects to score at most")
    attribute.add_argument("--beta", type=float, default=1.0, help="scale β on W h")
    attribute.add_argument("--score-beta", type=float, action="append", help="score these β instead (repeatable)")
    attribute.add_argument("--rank", type=int, help="keep the top singular directions of W")
    attribute.add_argument("--save-lens", action="store_true", help="save each lens to OUT/lens-<relation>")
    attribute.add_argument("--text", help="also draw the attribute lens's trajectory on this text")

    dla = commands.add_parser("dla", help="direct logit attribution: embeddings, every head, every MLP")
    dla.add_argument("text")
    dla.add_argument("--position", type=int, default=-1)
    dla.add_argument(
        "--target", help="target token (exactly one token, e.g. ' Paris', or #ID); default: the model's top-1"
    )
    dla.add_argument("--contrast", help="attribute target − contrast")
    add_layers(dla, "MLP layers 0 … L−1 to split into neurons, e.g. 20,25; default: none", option="--neurons")
    dla.add_argument("--top-neurons", type=int, default=10)
    dla.add_argument("--show", type=int, default=15, help="print this many largest terms")

    patch = commands.add_parser(
        "patchscope", help="patch a hidden state into a target prompt; read every layer or generate"
    )
    patch.add_argument("text", nargs="?", help="source prompt")
    patch.add_argument("--source-layer", type=int)
    patch.add_argument("--source-position", type=int, default=-1)
    patch.add_argument("--target", default="identity", help="identity, description, or a target prompt")
    patch.add_argument("--target-layer", type=int, help="default: the source layer")
    patch.add_argument("--target-position", type=int, default=-1)
    add_lens(patch, note="reads the patched run's layers; default: logit")
    patch.add_argument(
        "--map", choices=["identity", "tuned"], default="identity", help="map the state through --lens's translator"
    )
    patch.add_argument("--generate", type=int, default=0, help="also generate this many tokens")
    patch.add_argument("--identity-curve", action="store_true", help="precision@1 of token identity per source layer")
    patch.add_argument("--texts", help="source texts, one per line (with --identity-curve)")
    add_layers(patch, "source layers of --identity-curve; default: all")

    generate = commands.add_parser("generate", help="generate from a readout at chosen layers")
    generate.add_argument("text", nargs="+", help="prompt(s); several make a padded batch")
    add_lens(generate, note="the readout generated from; default: logit")
    add_layers(generate, "layers to generate from; default: the last")
    generate.add_argument("--max-new-tokens", type=int, default=20)
    generate.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    generate.add_argument("--top-k", type=int)
    generate.add_argument("--top-p", type=float)
    generate.add_argument("--seed", type=int, default=0)
    for parser, run in ((attribute, _attribute), (dla, _dla), (patch, _patchscope), (generate, _generate)):
        add_model(parser)
        add_out(parser, "write JSON, CSV and pictures into this folder (default: print a summary only)")
        parser.set_defaults(run=run)
    attribute.add_argument("--seed", type=int, default=0, help="seed of the train / held-out split")
