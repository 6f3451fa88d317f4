"""``depthlens causal`` and ``depthlens drift``: the causal checks and representational drift of
Belrose et al. (2023, §4; drift is introduced in §1) on the command line. Register with :func:`add_parsers`.

Both write into ``--out``: ``results.json`` (every number), ``results.csv`` (one row per layer),
and pictures as HTML + PNG through the grid layer (:mod:`depthlens.viz.pictures`). ``causal``
also saves the bases (``bases/``: safetensors + JSON with the model fingerprint), and keeps each
finished layer in ``partial/`` until the run ends, so that ``--resume`` continues an interrupted run.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from depthlens.apps.options import (
    add_data,
    add_layers,
    add_lens,
    add_model,
    add_out,
    add_plotlyjs,
    check_at_least,
    check_out,
    file_stem,
    parse_layers,
    warn,
    write_csv,
    write_json,
)
from depthlens.errors import UsageError
from depthlens.model import DEFAULT_MODEL


def _layers(text: str | None, num_layers: int, stride: int) -> list[int]:
    """The layers ``--layers`` selects (:func:`~depthlens.apps.options.parse_layers`); by default
    every ``stride``-th layer and the last."""
    selection = parse_layers(text)
    if selection is None:
        return sorted({*range(0, num_layers + 1, stride), num_layers})
    return selection.resolve(num_layers)


def _check(args: argparse.Namespace) -> None:
    """Refuse option values that cannot work, before the model is loaded."""
    global PLOTLYJS
    PLOTLYJS = args.plotlyjs
    check_at_least(args, 2, "chunk_len")
    check_at_least(args, 1, "layer_stride", "k", "group_tokens", "alignment_tokens", "directions")
    if args.tokens < args.chunk_len:
        raise UsageError(f"--tokens {args.tokens} is less than one chunk of --chunk-len {args.chunk_len}: "
                         f"use --tokens {args.chunk_len} or more, or a shorter --chunk-len")
    if parse_layers(args.layers) is not None and args.layer_stride is not None:
        raise UsageError("--layer-stride picks layers only when --layers is not given: drop one of them")
    check_out(args.out)


def _tokens(args: argparse.Namespace, tokenizer):
    from depthlens.text.data import load_chunks

    return load_chunks(args.data, tokenizer, args.chunk_len, max(1, args.tokens // args.chunk_len), split="validation")


PARTIAL = "partial"
"""The folder in ``--out`` that keeps each finished layer until the run ends (``--resume`` reuses it)."""


def _settings(args: argparse.Namespace) -> dict:
    """Everything besides the readout that a finished layer's numbers depend on, JSON-ready."""
    from depthlens import __version__

    return {"version": __version__, "model": str(args.model), "data": str(args.data), "tokens": args.tokens,
            "chunk_len": args.chunk_len, "k": args.k, "mode": args.mode, "method": args.method, "seed": args.seed,
            "group_tokens": args.group_tokens, "bases": args.bases and str(args.bases)}


PLOTLYJS = "directory"
"""Where HTML pictures get plotly.js (set by ``--plotlyjs``; :func:`depthlens.viz.plotly_draw.write_html`)."""


def _pictures(out: Path, name: str, grid) -> list[Path]:
    from depthlens.viz.pictures import save_figure

    return [save_figure(grid, out / f"{name}.{suffix}", plotlyjs=PLOTLYJS) for suffix in ("html", "png")]


def _causal(args: argparse.Namespace) -> None:
    from depthlens.analysis.causal import (
        check_directions,
        check_statistics,
        load_bases,
        stimulus_response,
    )
    from depthlens.errors import CausalError
    from depthlens.lenses.spec import load_readouts, readout_names
    from depthlens.model.hidden_states import capture
    from depthlens.model.load import load_model

    _check(args)
    if args.bases and args.alignment_only:
        raise UsageError("--bases gives bases to measure the fidelity of, and --alignment-only measures no fidelity: "
                         "drop one of them")
    if not args.alignment_only:
        check_statistics(args.tokens // args.chunk_len * args.chunk_len, args.group_tokens, args.k)
    names = readout_names(args.lens)
    if len({file_stem(name) for name in names}) < len(names):
        raise UsageError(f"the --lens folders {', '.join(map(str, filter(None, names.values())))} give two readouts "
                         "the same file names in --out: copy one to a folder of another name")
    model, tokenizer = load_model(args.model)
    readouts = load_readouts(model, args.lens)
    first = next(iter(readouts.values()))
    layers = _layers(args.layers, first.num_layers, args.layer_stride or args.default_stride)
    check_directions(args.k, first.parts.d_model)
    given = load_bases(args.bases, model) if args.bases else None
    if given is not None and (len(readouts) != 1 or not set(layers) <= set(given)):
        raise CausalError(f"--bases {args.bases} holds layers {sorted(given)} of one readout: pass one --lens "
                          "and --layers among those")
    ids = _tokens(args, tokenizer)
    if not args.alignment_only:
        check_statistics(ids.numel(), args.group_tokens, args.k)
    out = Path(args.out)
    states = capture(model, ids, layers=layers)
    results: dict = {"model": args.model, "tokens": ids.numel(), "k": args.k, "mode": args.mode,
                     "method": args.method, "layers": layers, "readouts": {}}
    rows = []
    for name, readout in ({} if args.alignment_only else readouts).items():
        results["readouts"][name] = _one_readout(args, model, name, readout, ids, states, layers, given, rows)
    if args.alignment or args.alignment_only:
        alignment = stimulus_response(model, readouts, ids[: max(1, args.alignment_tokens // ids.shape[1])], layers,
                                      directions=args.directions, weights=args.weights, seed=args.seed, progress=True)
        results["alignment"] = alignment.summary()
        _pictures(out, "alignment", _alignment_grid(alignment, args.model))
    write_json(out / "results.json", results)
    if rows:
        write_csv(out / "results.csv", rows)
    shutil.rmtree(out / PARTIAL, ignore_errors=True)
    extra = "" if args.alignment_only else ", results.csv, the energy and fidelity pictures and bases/"
    print(f"wrote {out}/results.json{extra}" + (" and the alignment picture" if "alignment" in results else ""))


def _one_readout(args: argparse.Namespace, model, name: str, readout, ids, states, layers: list[int],
                 given: dict | None, rows: list[dict]) -> dict:
    """Extract (or take) the basis of ``readout`` at each layer, measure its fidelity, save the
    bases (``bases/<name>``) and pictures (``energy_<name>``, ``fidelity_<name>``, with ``name``
    made safe for a file name by :func:`~depthlens.apps.options.file_stem`), append the CSV rows;
    returns the readout's part of results.json."""
    from depthlens.analysis.causal import causal_fidelity, extract_basis, prepare, save_bases
    from depthlens.analysis.causal.layer_file import load_layer, readout_digest, save_layer

    out = Path(args.out)
    settings = {**_settings(args), "readout": readout_digest(readout)}
    bases, fidelities = [], []
    for layer in layers:
        partial = out / PARTIAL / file_stem(name) / f"layer_{layer}"
        done = load_layer(partial, model, settings) if args.resume else None
        if done is not None:
            basis, fidelity = done
            print(f"{name} layer {layer}: kept from {partial}", flush=True)
        else:
            data = prepare(readout, states[layer], layer, args.mode, group_tokens=args.group_tokens, seed=args.seed)
            basis = given[layer] if given else extract_basis(readout, data, layer, args.k, method=args.method,
                                                             seed=args.seed, progress=True)
            fidelity = causal_fidelity(model, readout, ids, data, basis, progress=True)
            save_layer(partial, basis, fidelity, settings)
        bases.append(basis)
        fidelities.append(fidelity)
        rows.append({"readout": name, "layer": layer, "rho": fidelity.rho, "rho_low": fidelity.low,
                     "rho_high": fidelity.high, "rho_directions_low": fidelity.directions[0],
                     "rho_directions_high": fidelity.directions[1], "energy_top1_nats": basis.captured(1),
                     "energy_total_nats": basis.captured(args.k), "seconds": basis.seconds})
        print(f"{name} layer {layer}: energy {basis.captured(args.k):.3f} nats, fidelity ρ = {fidelity.rho:.3f} "
              f"[{fidelity.low:.3f}, {fidelity.high:.3f}] over positions, [{fidelity.directions[0]:.3f}, "
              f"{fidelity.directions[1]:.3f}] over directions", flush=True)
    save_bases(out / "bases" / file_stem(name), bases)
    _pictures(out, f"energy_{file_stem(name)}", _energy_grid(bases, name, args.model))
    _fidelity_figures(out, name, fidelities)
    return {"bases": [b.summary() for b in bases], "fidelity": [f.summary() for f in fidelities]}


def _energy_grid(bases, name: str, model: str):
    import numpy as np

    from depthlens.stats.grid import Grid

    values = np.array([[float(e) for e in basis.energies] for basis in bases])
    return Grid(values, [str(b.layer) for b in bases], [str(i + 1) for i in range(values.shape[1])],
                title=f"causal basis energy spectrum · {name} lens · {model}", name=name, source=model,
                quantity="energy", unit="nats", scale="log", row_title="layer", col_title="direction", value_format=".3g")


def _alignment_grid(alignment, model: str):
    import numpy as np

    from depthlens.stats.grid import Grid

    names = list(alignment.similarity)
    values = np.array([alignment.similarity[n] for n in names]).T
    text = [[f"{v:.2f}" for v in row] for row in values]
    return Grid(values, [str(layer) for layer in alignment.layers], names, cell_text=text,
                title=f"alignment vs {alignment.target}", source=model,
                quantity="Aitchison similarity", scale="diverging", value_range=(-1, 1), row_title="layer",
                col_title="readout")


def _fidelity_figures(out: Path, name: str, fidelities) -> None:
    """Scatter of readout against model influence per layer (log axes), ρ in each title."""
    from depthlens.viz.causal_charts import fidelity_scatter
    from depthlens.viz.pictures import save_figure

    stem, title = f"fidelity_{file_stem(name)}", f"causal fidelity · {name} lens"
    save_figure(fidelity_scatter(fidelities, title), out / f"{stem}.html", plotlyjs=PLOTLYJS)
    save_figure(fidelity_scatter(fidelities, title, "matplotlib"), out / f"{stem}.png")


def _drift(args: argparse.Namespace) -> None:
    from depthlens.analysis.drift import (
        drift_correlation,
        similarity_matrix,
        stream_covariances,
        tokens_per_byte,
        transfer_matrix,
    )
    from depthlens.analysis.drift.interval import MIN_GROUPS
    from depthlens.lenses.registry import check_spec, load_readout
    from depthlens.model.architecture import find_parts
    from depthlens.model.load import load_model

    _check(args)
    kind = check_spec(args.lens) if args.lens else None
    if kind not in (None, *TRANSFER_KINDS):
        raise UsageError(f"drift's transfer matrix swaps the translators of a tuned lens, and --lens {args.lens} is a "
                         f"{kind} readout: pass a tuned-lens folder, or omit --lens for the covariances alone")
    model, tokenizer = load_model(args.model)
    lens = load_readout(args.lens, model) if args.lens else None
    num_layers = find_parts(model).num_layers
    layers = _layers(args.layers, num_layers, args.layer_stride or args.default_stride)
    ids = _tokens(args, tokenizer)
    out = Path(args.out)
    groups = min(DRIFT_GROUPS, len(ids)) if lens is not None and len(ids) >= MIN_GROUPS else 0
    covariances = stream_covariances(model, ids, layers, groups=groups, progress=True)
    similarity = {top: similarity_matrix(covariances.covariance, top) for top in (0, 2)}
    results: dict = {"model": args.model, "tokens": ids.numel(), "layers": covariances.layers,
                     "covariance_similarity": similarity[0].tolist(), "covariance_similarity_top2_removed": similarity[2].tolist()}
    for top, matrix in similarity.items():
        _pictures(out, f"covariance_similarity{'_top2_removed' if top else ''}", _square(
            matrix, covariances.layers, f"covariance similarity{' (top 2 PCs removed)' if top else ''}", "", args.model))
    if lens is not None:
        transfer = transfer_matrix(model, lens, ids, covariances.layers, tokens_per_byte=tokens_per_byte(tokenizer, ids),
                                   groups=groups, progress=True)
        results.update({"transfer_ce_penalty_nats": transfer.ce_penalty.tolist(),
                        "transfer_kl_penalty_nats": transfer.kl_penalty.tolist(),
                        "transfer_ce_penalty_bits_per_byte": transfer.bits_per_byte(transfer.ce_penalty).tolist(),
                        "ce_nats": transfer.ce.tolist(), "tokens_per_byte": transfer.tokens_per_byte,
                        "rho_similarity_vs_ce_penalty": drift_correlation(similarity[0], transfer.ce_penalty),
                        "rho_similarity_top2_removed_vs_ce_penalty": drift_correlation(similarity[2], transfer.ce_penalty)})
        _pictures(out, "transfer_penalty", _square(transfer.ce_penalty, covariances.layers,
                                                   "transfer penalty (translator row on state column)", "nats", args.model))
        _print_rho(results["rho_similarity_vs_ce_penalty"], len(covariances.layers))
        results.update(_rho_intervals(covariances, transfer, len(ids)))
    write_json(out / "results.json", results)
    write_csv(out / "results.csv", [{"row_layer": i, "col_layer": j, "covariance_similarity": float(similarity[0][a, b])}
                                       for a, i in enumerate(covariances.layers) for b, j in enumerate(covariances.layers)])
    print(f"wrote {out}/results.json, results.csv and pictures")


DRIFT_GROUPS = 16
"""Groups of sequences for the bootstrap interval of ρ (fewer when there are fewer sequences)."""
TRANSFER_KINDS = ("tuned", "tuned-lens")
"""Readout kinds whose translators the transfer matrix swaps."""


def _rho_intervals(covariances, transfer, sequences: int) -> dict:
    """The 95% bootstrap intervals of ρ over groups of sequences, printed; with too few sequences,
    a warning and a note instead. The top-2 removal is marked exploratory: 2 was chosen after
    looking at the data."""
    from depthlens.analysis.drift import rho_interval
    from depthlens.analysis.drift.interval import MIN_GROUPS

    if covariances.group_counts is None:
        note = f"{sequences} sequences, and the interval needs {MIN_GROUPS}: pass more --tokens or a smaller --chunk-len"
        warn(f"no interval for ρ: {note}")
        return {"rho_interval_note": note}
    groups = len(covariances.group_counts)
    raw, removed = (rho_interval(covariances, transfer, top) for top in (0, 2))
    print(f"95% bootstrap interval over {groups} groups of sequences: ρ in [{raw[0]:.3f}, {raw[1]:.3f}]; "
          f"with the top 2 principal components removed (exploratory) [{removed[0]:.3f}, {removed[1]:.3f}]")
    return {"rho_similarity_vs_ce_penalty_interval": list(raw),
            "rho_similarity_top2_removed_vs_ce_penalty_interval": list(removed),
            "interval": {"level": 0.95, "groups": groups, "resamples": 200, "seed": 0},
            "top2_removed": "exploratory: the 2 components were chosen after looking at the data"}


def _print_rho(rho: float, layers: int) -> None:
    """Spearman ρ between covariance similarity and transfer penalty, explained; a warning where
    it is undefined or rests on too few pairs of layers."""
    import math

    pairs = layers * (layers - 1)
    print(f"ρ(covariance similarity, transfer penalty) = {rho:.3f}: Spearman rank correlation over the {pairs} pairs "
          "of distinct layers; negative means layers with similar states share translators at little cost")
    if math.isnan(rho):
        warn("ρ is undefined: the transfer penalties (or similarities) are all equal, as for an untrained lens")
    elif layers < 4:
        warn(f"ρ rests on {layers} layers only: pass 4 or more (--layers or a smaller --layer-stride)")


def _square(matrix, layers: list[int], title: str, unit: str, model: str):
    """An L×L grid: covariance similarity (unitless, 0…1) or transfer penalty (nats, log colours:
    one bad translator can cost 100 nats and would wash out the rest)."""
    from depthlens.stats.grid import Grid

    values = matrix.double().numpy()
    labels = [str(layer) for layer in layers]
    penalty = bool(unit)
    return Grid(values, labels, labels, cell_text=[[f"{v:.2g}" for v in row] for row in values],
                title=f"{title} · {model}", source=model, quantity=title.split(" (")[0], unit=unit,
                row_title="translator of layer" if penalty else "layer", col_title="state of layer" if penalty else "layer",
                scale="log" if penalty else "sequential", value_range=None if penalty else (0.0, 1.0), value_format=".3g")


def rerender_drift(out: str | Path, model: str = DEFAULT_MODEL) -> None:
    """Draw the drift pictures again from ``out/results.json`` (no model needed)."""
    import json

    import torch

    out = Path(out)
    results = json.loads((out / "results.json").read_text())
    layers = results["layers"]
    for key, name, title in (("covariance_similarity", "covariance_similarity", "covariance similarity"),
                             ("covariance_similarity_top2_removed", "covariance_similarity_top2_removed",
                              "covariance similarity (top 2 PCs removed)")):
        _pictures(out, name, _square(torch.tensor(results[key]), layers, title, "", model))
    if "transfer_ce_penalty_nats" in results:
        _pictures(out, "transfer_penalty", _square(torch.tensor(results["transfer_ce_penalty_nats"]), layers,
                                                   "transfer penalty (translator row on state column)", "nats", model))


def _common(parser: argparse.ArgumentParser, stride: int) -> None:
    add_model(parser)
    add_data(parser, "shakespeare", "its validation split is used")
    parser.add_argument("--tokens", type=int, default=512, help="tokens of text (default: 512)")
    parser.add_argument("--chunk-len", type=int, default=128, help="tokens per sequence (default: 128)")
    add_layers(parser, "default: every --layer-stride-th and the last")
    parser.add_argument("--layer-stride", type=int,
                        help=f"without --layers, every N-th layer and the last (default: {stride})")
    parser.set_defaults(default_stride=stride)
    add_out(parser, "output folder: results.json, results.csv and the pictures", required=True)
    add_plotlyjs(parser)


def add_parsers(commands: argparse._SubParsersAction) -> None:
    """Register ``causal`` and ``drift`` on the ``depthlens`` command's subparsers."""
    causal = commands.add_parser(
        "causal", help="causal basis extraction, causal fidelity and alignment of a readout; per layer it prints the "
        "energy (nats: the mean KL of the readout when the basis is erased) and the fidelity ρ (Spearman correlation "
        "of the readout's and the model's KL when each direction is erased, with a 95%% bootstrap interval)")
    _common(causal, 6)
    add_lens(causal, repeatable=True, note="default: logit; each result is named by the readout's kind, and by "
             "kind and folder where two share a kind")
    causal.add_argument("--k", type=int, default=16, help="directions per layer (default: 16; at least 3 for ρ)")
    causal.add_argument("--mode", choices=["mean", "zero", "resample"], default="mean",
                        help="how a direction is erased: mean (the default), zero or resample ablation")
    causal.add_argument("--method", choices=["batched", "sequential"], default="batched",
                        help="basis search: batched (the default, faster) or sequential (the paper's)")
    causal.add_argument("--group-tokens", type=int, default=32,
                        help="positions per bootstrap group (default: 32; --tokens must make enough groups)")
    causal.add_argument("--alignment", action="store_true", help="also stimulus–response alignment (resampling)")
    causal.add_argument("--alignment-only", action="store_true", help="only the alignment (no extraction or fidelity)")
    causal.add_argument("--alignment-tokens", type=int, default=256, help="tokens of the alignment (default: 256)")
    causal.add_argument("--directions", type=int, default=8,
                        help="random directions per layer for alignment (default: 8)")
    causal.add_argument("--weights", choices=["uniform", "model"], default="uniform",
                        help="token weights of the Aitchison product: uniform (the default) or the model's")
    causal.add_argument("--bases", help="a bases folder saved by an earlier run (bases/<name>): measure fidelity of "
                        "those instead of extracting; refused if made for another model")
    causal.add_argument("--seed", type=int, default=0, help="seed of the searches and resampling (default: 0)")
    causal.add_argument("--resume", action="store_true", help=f"keep the layers an interrupted run with the same "
                        f"settings and readouts finished (kept in <out>/{PARTIAL} until a run ends)")
    causal.set_defaults(run=lambda args: _causal(_with_lens(args)))
    drift = commands.add_parser(
        "drift", help="covariance similarity (0 … 1) of the residual states of every pair of layers and, with a tuned "
        "lens, the transfer penalty (nats of cross-entropy added by decoding layer j's state with layer i's translator)")
    _common(drift, 2)
    add_lens(drift, None, note="a tuned lens gives the transfer matrix; omit it for covariances only")
    drift.set_defaults(run=_drift)


def _with_lens(args: argparse.Namespace) -> argparse.Namespace:
    args.lens = args.lens or ["logit"]
    return args


__all__ = ["add_parsers"]
