"""Command-line commands that run the model on a patched or growing input; :func:`add_parsers`
adds them to ``depthlens``:

- ``depthlens patchscope`` — patch a state into a target prompt and read every layer (picture,
  JSON) or generate; ``--identity-curve`` scores token identity per source layer;
- ``depthlens generate`` — generate from a readout at chosen layers (JSON), with a progress bar
  per layer and the length checked against the model's context.

Every option, input file and ``--out`` is checked before the model loads; what needs the model
(a layer beyond its last, more tokens than its context) right after, before any work.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from depthlens.apps.cli_readouts import progress_bar
from depthlens.apps.options import (
    add_layers,
    add_lens,
    add_model,
    add_out,
    check_at_least,
    check_out,
    parse_layers,
    read_lines,
    warn,
    write_csv,
    write_json,
)
from depthlens.errors import UsageError

FEW_POSITIONS = 20
"""Below this many source positions an identity curve (a precision@1) moves in steps over 5%: warned."""


def _identity_options(args: argparse.Namespace) -> list[str]:
    """The source texts of ``--identity-curve`` (TEXT and the lines of ``--texts``), its options checked."""
    single = [flag for flag, value in (("--source-layer", args.source_layer), ("--target-layer", args.target_layer),
                                       ("--source-position", args.source_position),
                                       ("--target-position", args.target_position)) if value is not None]
    if single or args.generate or args.map != "identity":
        flag = single[0] if single else "--generate" if args.generate else "--map"
        raise UsageError(f"{flag} applies to one patch, not to --identity-curve (which patches every source "
                         "position into the same layer, for each layer of --layers): drop it")
    if args.text is not None and not args.text.strip():
        raise UsageError("the source text is empty: give some text, or --texts FILE")
    texts = ([args.text] if args.text else []) + (read_lines(args.texts, "--texts") if args.texts else [])
    if not texts:
        raise UsageError("--identity-curve needs source texts: give TEXT or --texts FILE (one text per line)")
    return texts


def _check_patchscope(args: argparse.Namespace) -> list[str]:
    """Every option of ``patchscope`` checked before the model loads; the source texts."""
    from depthlens.lenses.registry import check_spec

    kind = check_spec(args.lens)
    check_at_least(args, 0, "generate", "source_layer", "target_layer")
    parse_layers(args.layers)
    if args.out:
        check_out(args.out)
    if args.identity_curve:
        return _identity_options(args)
    for flag, value in (("--texts", args.texts), ("--layers", args.layers)):
        if value is not None:
            raise UsageError(f"{flag} applies to --identity-curve only: add --identity-curve, or drop {flag}")
    if args.text is None or not args.text.strip():
        raise UsageError("give the source prompt TEXT (or --identity-curve with --texts FILE)")
    if args.source_layer is None:
        raise UsageError("give --source-layer, the layer whose state is patched (or --identity-curve)")
    if args.map == "tuned" and kind != "tuned":
        raise UsageError(f"--map tuned needs a tuned lens: pass --lens with a tuned-lens folder, not a {kind} readout")
    return [args.text]


def _patchscope(args: argparse.Namespace) -> None:
    from depthlens.analysis.patchscope import TARGET_PROMPTS, Patch, patchscope, patchscope_generate, tuned_map
    from depthlens.lenses.readout import check_layer
    from depthlens.lenses.registry import load_readout
    from depthlens.model.load import load_model

    texts = _check_patchscope(args)
    model, tokenizer = load_model(args.model)
    if args.identity_curve:
        return _identity_curve(args, model, tokenizer, texts)
    readout = load_readout(args.lens, model)
    for layer in (args.source_layer, args.target_layer):
        if layer is not None:
            check_layer(layer, readout.num_layers)
    source_ids = tokenizer(args.text, return_tensors="pt").input_ids
    target_ids = tokenizer(TARGET_PROMPTS.get(args.target, args.target), return_tensors="pt").input_ids
    mapping = tuned_map(readout, args.source_layer) if args.map == "tuned" else None
    patch = Patch(args.source_layer, _position(args.source_position), args.target_layer,
                  _position(args.target_position))
    result = patchscope(model, source_ids, target_ids, patch, mapping=mapping)
    ids, probs = result.top(5)
    print(f"source {tokenizer.decode([int(source_ids[0, patch.source_position])])!r} (layer {args.source_layer}) → "
          f"target layer {result.patch.target_layer}: the patched run's next token (probability) "
          + ", ".join(f"{tokenizer.decode([i])!r} {p:.2f}" for i, p in zip(ids, probs)))
    document: dict[str, Any] = {"patch": vars(result.patch), "top": [[tokenizer.decode([i]), p] for i, p in zip(ids, probs)]}
    if args.generate:
        generation = patchscope_generate(model, source_ids, target_ids, patch, mapping=mapping,
                                         max_new_tokens=args.generate)
        document["generation"] = generation.texts(tokenizer)[0]
        print(f"generated: {document['generation']!r}")
    if args.out:
        from depthlens.viz.pictures import save_figure

        out = Path(args.out)
        trajectory = result.trajectory(readout, tokenizer)
        written = [write_json(out / "patchscope.json", document), trajectory.to_csv(out / "patchscope-trajectory.csv")]
        written += [save_figure(trajectory, out / f"patchscope.{s}", stat="prob") for s in ("png", "html")]
        print("wrote " + ", ".join(str(p) for p in written))


def _position(value: int | None) -> int:
    """A position option: the last token (-1) when not given."""
    return -1 if value is None else value


def _identity_curve(args: argparse.Namespace, model: Any, tokenizer: Any, texts: list[str]) -> None:
    from depthlens.analysis.patchscope import TARGET_PROMPTS, token_identity_curve
    from depthlens.model.architecture import find_parts

    selection = parse_layers(args.layers)
    num_layers = find_parts(model).num_layers
    layers = selection.resolve(num_layers) if selection else list(range(num_layers + 1))
    with progress_bar(len(layers), "source layers") as progress:
        curve = token_identity_curve(model, tokenizer, texts, layers=layers,
                                     target_prompt=TARGET_PROMPTS.get(args.target, args.target), progress=progress)
    if curve.positions < FEW_POSITIONS:
        warn(f"precision@1 from {curve.positions} source positions moves in steps of {1 / curve.positions:.0%}; "
             f"give {FEW_POSITIONS} or more (more or longer --texts) for a steadier curve")
    print(f"token-identity Patchscope over {curve.positions} source positions; precision@1: the share of positions "
          "where the patched run's top-1 token is the source token (identity) or the source run's own next-token "
          "prediction (next token)")
    print(f"{'layer':>5}  {'identity':>8}  {'next token':>10}")
    for row in curve.to_rows():
        print(f"{row['source_layer']:>5}  {row['precision_at_1_identity']:>8.2f}  {row['precision_at_1_next_token']:>10.2f}")
    if args.out:
        _write_curve(Path(args.out), curve)


def _write_curve(out: Path, curve: Any) -> None:
    from depthlens.viz.pictures import save_figure
    from depthlens.viz.readout_charts import curves

    series = {"source token (identity)": (curve.identity, curve.identity_interval),
              "model's next-token prediction": (curve.next_token, curve.next_token_interval)}
    figure = curves(
        curve.layers,
        {name: values for name, (values, _) in series.items()},
        title=f"token-identity Patchscope, {curve.positions} source positions in {curve.texts} texts"
              + (" (bands: 95% bootstrap intervals over texts)" if curve.identity_interval else ""),
        xlabel="source layer (= target layer)",
        ylabel="precision@1",
        backend="matplotlib",
        bands={name: interval for name, (_, interval) in series.items() if interval is not None},
    )
    written = [save_figure(figure, out / "identity-curve.png"), write_csv(out / "identity-curve.csv", curve.to_rows()),
               write_json(out / "identity-curve.json", curve.to_rows())]
    print("wrote " + ", ".join(str(p) for p in written))


def _check_generate(args: argparse.Namespace) -> Any:
    """Every option of ``generate`` checked before the model loads; the parsed ``--layers``."""
    from depthlens.lenses.registry import check_spec

    if any(not text.strip() for text in args.text):
        raise UsageError("a prompt is empty: give every prompt some text")
    check_at_least(args, 1, "max_new_tokens", "top_k")
    if args.temperature < 0:
        raise UsageError(f"--temperature must be 0 (greedy) or more, got {args.temperature}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise UsageError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.temperature == 0 and (args.top_k is not None or args.top_p is not None):
        flag = "--top-k" if args.top_k is not None else "--top-p"
        raise UsageError(f"{flag} limits sampling, but --temperature 0 picks the top-1 token: add --temperature "
                         f"above 0, or drop {flag}")
    check_spec(args.lens)
    selection = parse_layers(args.layers)
    if args.out:
        check_out(args.out)
    return selection


def _generate(args: argparse.Namespace) -> None:
    import torch

    from depthlens.analysis.generate import context_length, generate_from_layer
    from depthlens.lenses.registry import load_readout
    from depthlens.model.load import load_model
    from depthlens.text.encode import encode

    selection = _check_generate(args)
    model, tokenizer = load_model(args.model)
    readout = load_readout(args.lens, model)
    layers = selection.resolve(readout.num_layers) if selection else [readout.num_layers]
    ids, mask = encode(tokenizer, args.text)
    limit = context_length(model)
    if limit is not None and ids.shape[1] + args.max_new_tokens > limit:
        raise UsageError(f"--max-new-tokens {args.max_new_tokens} after a prompt of {ids.shape[1]} tokens is more than "
                         f"the model's context of {limit} tokens: use --max-new-tokens {max(1, limit - ids.shape[1])} "
                         "or less")
    generator = torch.Generator().manual_seed(args.seed)
    how = "greedy" if args.temperature == 0 else f"temperature {args.temperature:g}"
    print(f"{args.max_new_tokens} new tokens from the {readout.kind} readout ({how}); mean log-prob: the readout's "
          "mean log-probability of the tokens it chose, in nats (0 = certain)")
    print(f"{'layer':>5}  {'prompt':>6}  {'mean log-prob':>13}  continuation")
    results = []
    for layer in layers:
        with progress_bar(args.max_new_tokens, f"layer {layer}: tokens") as progress:
            generation = generate_from_layer(model, readout, ids, mask, layer=layer, max_new_tokens=args.max_new_tokens,
                                             temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                             generator=generator, progress=progress)
        texts, means = generation.texts(tokenizer), generation.log_probs.mean(1).tolist()
        results.append({"layer": layer, "readout": readout.kind, "prompts": args.text, "continuations": texts,
                        "mean_log_prob": float(generation.log_probs.mean()), "mean_log_probs": means})
        for index, (text, mean) in enumerate(zip(texts, means, strict=True)):
            print(f"{layer:>5}  {index + 1:>6}  {mean:>13.3f}  {text!r}", flush=True)
    if args.out:
        print(f"wrote {write_json(Path(args.out) / 'generations.json', results)}")


def add_parsers(commands: argparse._SubParsersAction) -> None:
    """Add ``patchscope`` and ``generate`` to the ``depthlens`` subcommands."""
    patch = commands.add_parser("patchscope", help="patch a hidden state into a target prompt; read every layer or "
                                "generate; --identity-curve scores token identity per source layer")
    patch.add_argument("text", nargs="?", help="source prompt (with --identity-curve: one more source text)")
    patch.add_argument("--source-layer", type=int, help="layer 0 … L whose state is patched (required without "
                       "--identity-curve)")
    patch.add_argument("--source-position", type=int,
                       help="source token position, from the end if negative (default: -1, the last)")
    patch.add_argument("--target", default="identity",
                       help="identity (the default), description, or a target prompt of your own")
    patch.add_argument("--target-layer", type=int, help="layer the state is written into (default: the source layer)")
    patch.add_argument("--target-position", type=int,
                       help="target token position, from the end if negative (default: -1, the placeholder)")
    add_lens(patch, note="reads the patched run's layers; default: logit")
    patch.add_argument("--map", choices=["identity", "tuned"], default="identity",
                       help="identity (the default), or map the state through --lens's translator (a tuned lens)")
    patch.add_argument("--generate", type=int, default=0, help="also generate this many tokens (default: 0)")
    patch.add_argument("--identity-curve", action="store_true",
                       help="precision@1 of token identity per source layer, over every position of the source texts")
    patch.add_argument("--texts", help="UTF-8 file of source texts, one per line (with --identity-curve)")
    add_layers(patch, "source layers of --identity-curve; default: all")

    generate = commands.add_parser("generate", help="generate from a readout at chosen layers (a progress bar per "
                                   "layer; the length is checked against the model's context)")
    generate.add_argument("text", nargs="+", help="prompt(s); several make a padded batch")
    add_lens(generate, note="the readout generated from; default: logit")
    add_layers(generate, "layers to generate from; default: the last")
    generate.add_argument("--max-new-tokens", type=int, default=20,
                          help="tokens to generate after each prompt (default: 20; prompt and new tokens must fit the "
                               "model's context)")
    generate.add_argument("--temperature", type=float, default=0.0,
                          help="0 (the default) picks the top-1 token; above 0 samples from softmax(logits / T)")
    generate.add_argument("--top-k", type=int, help="sample among the K likeliest tokens only (needs --temperature > 0)")
    generate.add_argument("--top-p", type=float,
                          help="sample among the likeliest tokens whose probabilities reach P (needs --temperature > 0)")
    generate.add_argument("--seed", type=int, default=0, help="seed of the sampling (default: 0)")
    for parser, run in ((patch, _patchscope), (generate, _generate)):
        add_model(parser)
        add_out(parser, "write JSON, CSV and pictures into this folder (default: print a summary only)")
        parser.set_defaults(run=run)


__all__ = ["add_parsers"]
