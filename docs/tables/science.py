"""The science page's tables: the lenses' evaluation, drift, causal basis extraction, fidelity and
alignment, and the rows of the claims table they decide."""

from __future__ import annotations

import json
from typing import Any

from depthlens.analysis.causal.fidelity import direction_interval

from .common import ROOT, interval, layers_text, load, outcome, table, verdict

MODELS = {"smollm2-135m": "docs/science", "gemma3-270m": "docs/science/gemma3"}
def eval_summary(result: dict) -> dict[str, Any]:
    """Mean KL over layers 0…L−1 (the last layer is the model's own decoding) of each lens, and how
    many layers the tuned lens is below the logit lens by point and by its paired interval."""
    last = max(row["layer"] for row in result["table"])
    kl = {lens: [row["value"] for row in result["table"] if row["metric"] == "kl" and row["unit"] == "nats"
                 and row["lens"] == lens and row["layer"] < last] for lens in ("logit", "tuned")}
    differences = [row for row in result["differences"] if row["metric"] == "kl" and row["layer"] < last]
    worst = max(differences, key=lambda row: row["ci_high"])
    return {"layers": last, "tuned": sum(kl["tuned"]) / last, "logit": sum(kl["logit"]) / last,
            "below": sum(row["value"] < 0 for row in differences),
            "surely_below": sum(row["ci_high"] < 0 for row in differences), "worst": worst}


def eval_table() -> str:
    rows = []
    for model, folder in (("smollm2-135m", "docs/science/eval_smollm2"), ("gemma3-270m", "docs/science/eval_gemma3")):
        for name, path in (("validation split of `mixed`", "eval.json"), ("dataset descriptions (never trained on)",
                                                                          "ood/eval.json")):
            result = load(f"{folder}/{path}")
            s = eval_summary(result)
            w = s["worst"]
            rows.append([model, name, str(result["tokens"]), f"{s['tuned']:.3f}", f"{s['logit']:.3f}",
                         f"{s['below']} / {s['surely_below']} of {s['layers']}",
                         f"{w['layer']}: {interval(w['value'], w['ci_low'], w['ci_high'])}"])
    return table(["model", "text", "tokens", "tuned lens: mean KL, nats", "logit lens", ("layers below logit: "
                  "point / whole interval"), "least sure layer: tuned − logit KL [95%]"], rows)


def drift_table() -> str:
    rows = []
    for model, path in (("smollm2-135m", "docs/science/drift/results.json"),
                        ("gemma3-270m", "docs/science/gemma3/drift/results.json")):
        r = load(path)
        raw, top2 = r["rho_similarity_vs_ce_penalty_interval"], r["rho_similarity_top2_removed_vs_ce_penalty_interval"]
        rows.append([model, str(r["tokens"]), ", ".join(map(str, r["layers"])),
                     interval(r["rho_similarity_vs_ce_penalty"], *raw),
                     interval(r["rho_similarity_top2_removed_vs_ce_penalty"], *top2)])
    return table(["model", "tokens", "layers", "ρ, raw covariances [95%]", ("ρ, top 2 components removed "
                  "(exploratory) [95%]")], rows)


def _causal(model: str) -> dict:
    return load(f"{MODELS[model]}/causal/results.json")


def energy_table() -> str:
    rows = []
    for model in MODELS:
        r = _causal(model)
        for readout, result in r["readouts"].items():
            for basis in result["bases"]:
                energies = basis["energies_nats"]
                rows.append([model, readout, str(basis["layer"]), ", ".join(f"{e:.1f}" for e in energies[:6]),
                             f"{sum(energies):.1f}", f"{basis['evaluations']:g}"])
    return table(["model", "lens", "layer", "energy of the first 6 directions, nats", "Σ of all k", "evaluations"],
                 rows)


K64 = {"smollm2-135m": "docs/science/causal_k64", "gemma3-270m": "docs/science/gemma3/causal_k64"}
"""Each model's fidelity runs at k = 64 on 2048 tokens: one folder per lens, ``logit`` and ``tuned``."""


def _finished(path: str) -> bool:
    return (ROOT / path).is_file()


def _k64_partial(folder: str) -> dict[str, Any] | None:
    """The layers an unfinished ``causal --resume`` run keeps in ``folder/partial/``, as the fidelity and
    bases rows of a results file; ``None`` before its first layer."""
    records = [(json.loads(path.read_text(encoding="utf-8")),
                json.loads(path.with_name("bases.json").read_text(encoding="utf-8")))
               for path in (ROOT / folder / "partial").glob("*/layer_*/fidelity.json")]
    if not records:
        return None
    settings = records[0][0]["settings"]
    records.sort(key=lambda record: record[0]["fidelity"]["layer"])
    fidelity = [{"layer": f["fidelity"]["layer"], "rho": f["fidelity"]["rho"], "rho_low": f["fidelity"]["low"],
                 "rho_high": f["fidelity"]["high"], **dict(zip(("rho_directions_low", "rho_directions_high"),
                                                               direction_interval(f["fidelity"]["readout_kl"],
                                                                                  f["fidelity"]["model_kl"])))}
                for f, _ in records]
    return {"k": settings["k"], "tokens": settings["tokens"], "layers": [row["layer"] for row in fidelity],
            "partial": True, "readouts": {"run": {"fidelity": fidelity, "bases": [b["bases"][0] for _, b in records]}}}


def _k64(model: str, lens: str, partial: bool) -> dict[str, Any] | None:
    """One lens's k = 64 run of ``model``: its ``results.json``, else (with ``partial``) the layers it has
    finished so far; ``None`` if there is neither."""
    folder = f"{K64[model]}/{lens}"
    if _finished(f"{folder}/results.json"):
        return load(f"{folder}/results.json")
    return _k64_partial(folder) if partial else None


def fidelity_runs(model: str, partial: bool = False) -> list[dict[str, Any]]:
    """Every fidelity run of ``model``, smallest first: ``{"k", "tokens", "layers", "fidelity": {lens: rows},
    "bases": {lens: bases}, "partial"}`` (the k = 12 run of both lenses, then the k = 64 run of each lens that
    has finished it, or with ``partial`` has finished a layer: the union of their layers; ``partial`` is true
    unless both lenses are there and finished)."""
    sources = [{lens: _causal(model) for lens in ("logit", "tuned")}]
    k64 = {lens: _k64(model, lens, partial) for lens in ("logit", "tuned")}
    if any(k64.values()):
        sources.append({lens: source for lens, source in k64.items() if source})
    runs = []
    for source in sources:
        first = next(iter(source.values()))
        readouts = {lens: r["readouts"].get(lens, r["readouts"].get("run")) for lens, r in source.items()}
        layers = sorted({layer for r in source.values() for layer in r["layers"]})
        runs.append({"k": first["k"], "tokens": first["tokens"], "layers": layers,
                     "partial": any(r.get("partial") for r in source.values()) or len(source) < 2,
                     "fidelity": {lens: r["fidelity"] for lens, r in readouts.items()},
                     "bases": {lens: r["bases"] for lens, r in readouts.items()}})
    return runs


def _rho_cell(rows: list[dict[str, Any]], layer: int) -> str:
    row = next((row for row in rows if row["layer"] == layer), None)
    if row is None:
        return "not run yet"
    return (f"{interval(row['rho'], row['rho_low'], row['rho_high'], 2)} "
            f"[{row['rho_directions_low']:.2f}, {row['rho_directions_high']:.2f}]")


def rho_hull(row: dict[str, Any]) -> tuple[float, float]:
    """The smallest interval holding a fidelity row's two 95% intervals of ρ, over positions and over
    directions: a claim holds only where both agree."""
    return min(row["rho_low"], row["rho_directions_low"]), max(row["rho_high"], row["rho_directions_high"])


def fidelity_table() -> str:
    """Every run's ρ per layer and lens, unfinished k = 64 runs included (marked, with "not run yet" cells)."""
    rows = []
    for model in MODELS:
        for run in fidelity_runs(model, partial=True):
            k = f"{run['k']} (unfinished)" if run["partial"] else str(run["k"])
            for layer in run["layers"]:
                cells = [_rho_cell(run["fidelity"].get(lens, []), layer) for lens in ("logit", "tuned")]
                rows.append([model, f"{layer} of {_depth(model)}", k, str(run["tokens"]), *cells])
    return table(["model", "layer", "k", "tokens", "logit lens ρ [95% over positions] [over directions]",
                  "tuned lens ρ [over positions] [over directions]"], rows)


def energy_k64_table() -> str:
    """The k = 64 spectra, finished layers of unfinished runs included: the first directions' energies and the
    share of the 64 directions' total that the first 12 hold."""
    rows = []
    for model in MODELS:
        run = fidelity_runs(model, partial=True)[-1]
        if run["k"] != 64:
            continue
        for lens, bases in run["bases"].items():
            for basis in bases:
                energies = basis["energies_nats"]
                rows.append([model, lens, str(basis["layer"]), ", ".join(f"{e:.1f}" for e in energies[:4]),
                             f"{energies[-1]:.3f}", f"{sum(energies):.1f}", f"{sum(energies[:12]) / sum(energies):.2f}"])
    return table(["model", "lens", "layer", "first 4 directions, nats", "64th, nats", "Σ of 64, nats",
                  "share of Σ in the first 12"], rows)


def causal_basis_table() -> str:
    """The batched search against the authors' sequential reference, from the two benchmark runs (the
    default 30 refinement steps, and 100); the reference is the same in both."""
    runs = {steps: load(f"benchmarks/results/{name}.json")
            for steps, name in ((30, "causal_basis"), (100, "causal_basis_refine100"))}
    columns = [runs[30]["batched"], runs[100]["batched"], runs[30]["sequential"]]
    k = runs[30]["k"]

    def each(cell) -> list[str]:
        return [cell(column) for column in columns]

    def ratios(run: dict) -> str:
        r = run["sequential"]
        return (f"{r['seconds'] / run['batched']['seconds']:.1f}× / {r['cpu_seconds'] / run['batched']['cpu_seconds']:.1f}× / "
                f"{r['evaluations'] / run['batched']['evaluations']:.1f}×")

    reference = columns[2]
    rows = [["wall time (1 thread, shared 2-core CPU)", *each(lambda c: f"{c['seconds']:.1f} s")],
            ["CPU time of the process", *each(lambda c: f"{c['cpu_seconds']:.1f} s")],
            ["cost in full-data energy evaluations", *each(lambda c: f"{c['evaluations']:g}")],
            ["speed-up over the reference in the same run: wall / CPU / evaluations", ratios(runs[30]),
             ratios(runs[100]), "1"],
            [f"energy of the top direction / of all {k} (nats)",
             *each(lambda c: f"{c['captured_nats']['1']:.1f} / {c['captured_nats'][str(k)]:.1f}")],
            ["energy ratio, batched / reference: top direction / total",
             *(f"{c['captured_nats']['1'] / reference['captured_nats']['1']:.2f} / "
               f"{c['captured_nats'][str(k)] / reference['captured_nats'][str(k)]:.2f}" for c in columns[:2]), "1"],
            ["causal fidelity ρ of the basis [95% CI over positions]",
             *each(lambda c: interval(c["fidelity_rho"], *c["fidelity_interval"], 2))]]
    return table(["", "batched, 30 steps (default)", "batched, 100 steps", "authors' sequential reference"], rows)


def causal_kl_table() -> str:
    """The three ways of turning a block of erased logits into KLs, timed in one run on each built-in
    model's vocabulary (``benchmarks/causal_kl.py``), with each one's largest error against float64."""
    result = load("benchmarks/results/causal_kl.json")
    rows = [[model, f"`{name}`", f"{row['seconds']:.3f}", f"{row['speedup_wall']:.2f}×", f"{row['max_error_nats']:.1e}"]
            for model, methods in result["models"].items() for name, row in methods.items()]
    timing = f"seconds per block of {result['rows']} rows (best of {result['repeats']})"
    return table(["model's shape", "method", timing, "speed-up over the first", "largest error against float64 (nats)"],
                 rows)


def _depth(model: str) -> int:
    return {"smollm2-135m": 30, "gemma3-270m": 18}[model]


def alignment_table() -> str:
    runs = [("smollm2-135m", "uniform", "docs/science/causal/results.json"),
            ("smollm2-135m", "model's probabilities", "docs/science/alignment_model_weights/results.json"),
            ("gemma3-270m", "uniform", "docs/science/gemma3/causal/results.json")]
    rows = []
    for model, weights, path in runs:
        a = load(path)["alignment"]
        for i, layer in enumerate(a["layers"]):
            rows.append([model, weights, str(layer), *(interval(a["similarity"][r][i], a["low"][r][i], a["high"][r][i])
                                                       for r in ("logit", "tuned"))])
    return table(["model", "token weights", "layer", "logit lens [95%]", "tuned lens [95%]"], rows)


def claim_lens_rows() -> list[list[str]]:
    """Abstract and §1: the tuned lens decodes closer to the model's output than the logit lens, at
    every layer, on text of the kinds it trained on and on an unseen kind."""
    cells, outcomes = [], {}
    for model, folder in (("smollm2-135m", "docs/science/eval_smollm2"), ("gemma3-270m", "docs/science/eval_gemma3")):
        parts, sure, worse = [], [], False
        for path in ("eval.json", "ood/eval.json"):
            s = eval_summary(load(f"{folder}/{path}"))
            parts.append(f"{s['tuned']:.2f} vs {s['logit']:.2f} nats; below at {s['surely_below']}/{s['layers']} layers")
            sure.append(s["surely_below"] == s["layers"])
            worse |= s["worst"]["ci_low"] > 0
        cells.append("held-out: " + parts[0] + "; unseen kind: " + parts[1])
        outcomes[model] = outcome(all(sure), worse)
    return [["Tuned-lens predictions are closer to the final layer's than the logit lens's (abstract, §1)",
             "\"substantially lower perplexity\" (no number in the excerpt)", *cells, verdict(outcomes)]]


def claim_drift_rows() -> list[list[str]]:
    """§1: representational drift; covariance similarity predicts the transfer penalty (ρ < 0). A
    correlation below 0 but much weaker than the paper's (|ρ| < 0.6) differs."""
    cells, outcomes = [], {}
    for model, path in (("smollm2-135m", "docs/science/drift/results.json"),
                        ("gemma3-270m", "docs/science/gemma3/drift/results.json")):
        r = load(path)
        rho = r["rho_similarity_vs_ce_penalty"]
        low, high = r["rho_similarity_vs_ce_penalty_interval"]
        cells.append(f"ρ = {interval(rho, low, high, 2)}")
        outcomes[model] = outcome(high < 0 and rho <= -0.6, low > 0)
    return [[("Features drift across layers: the more alike two layers' covariances, the cheaper one layer's "
             "translator is on the other's states (drift, §1)"), "ρ = −0.78, Pythia-12B (from memory, unverified)",
             *cells, verdict(outcomes)]]


def _compare_layers(layers: list[int], tuned: list[tuple[float, float]], logit: list[tuple[float, float]]
                    ) -> tuple[list[int], list[int]]:
    """The layers where the tuned lens's interval is wholly above the logit lens's, and below."""
    above = [layer for layer, t, g in zip(layers, tuned, logit) if t[0] > g[1]]
    below = [layer for layer, t, g in zip(layers, tuned, logit) if t[1] < g[0]]
    return above, below


def _below_output(run: dict[str, Any], lens: str, model: str) -> list[dict[str, Any]]:
    """``lens``'s fidelity rows of ``run`` but the last layer's, where ρ = 1 by construction."""
    return [row for row in run["fidelity"][lens] if row["layer"] < _depth(model)]


def claim_causal_rows() -> list[list[str]]:
    """§1 and §4 (Figure 20): causal fidelity, the tuned lens against the logit lens, and alignment. Each
    is judged on the largest run in which the lenses it needs have finished."""
    fidelity_cells, ahead_cells, alignment_cells = [], [], []
    faithful, ahead, aligned = {}, {}, {}
    for model in MODELS:
        runs = fidelity_runs(model)
        run = next(run for run in reversed(runs) if "tuned" in run["fidelity"])
        tuned = _below_output(run, "tuned", model)
        faithful[model] = outcome(all(rho_hull(row)[0] > 0 for row in tuned), any(rho_hull(row)[1] < 0 for row in tuned))
        fidelity_cells.append(f"tuned ρ {min(row['rho'] for row in tuned):.2f}–{max(row['rho'] for row in tuned):.2f} "
                              f"at layers {', '.join(str(row['layer']) for row in tuned)} "
                              f"(k = {run['k']}, {run['tokens']} tokens)")
        run = next(run for run in reversed(runs) if len(run["fidelity"]) == 2)
        tuned = _below_output(run, "tuned", model)
        logit = {row["layer"]: row for row in run["fidelity"]["logit"]}
        layers = [row["layer"] for row in tuned]
        above, below = _compare_layers(layers, [rho_hull(row) for row in tuned],
                                       [rho_hull(logit[layer]) for layer in layers])
        ahead[model] = outcome(len(above) == len(layers), bool(below) and not above)
        ahead_cells.append(f"tuned above the logit lens at {layers_text(above)}, below at {layers_text(below)} "
                           f"of layers {', '.join(map(str, layers))} "
                           f"(k = {run['k']}, {run['tokens']} tokens; both intervals apart)")
        a = _causal(model)["alignment"]
        pairs = {lens: list(zip(a["low"][lens], a["high"][lens])) for lens in ("tuned", "logit")}
        up, down = _compare_layers(a["layers"], pairs["tuned"], pairs["logit"])
        aligned[model] = outcome(len(up) == len(a["layers"]), bool(down) and not up)
        alignment_cells.append(f"tuned above logit at {layers_text(up)}, below at {layers_text(down)} of layers "
                               f"{', '.join(map(str, a['layers']))}")
    return [["The features that move the tuned lens move the model too: causal fidelity (§1, §4, Figure 20)",
             ("Spearman ρ per layer, Pythia-410M (values not in the excerpt; ≈ 0.25 / 0.89 / ≈ 0.98 from memory, "
              "unverified)"), *fidelity_cells, verdict(faithful)],
            ["The tuned lens is more faithful than the logit lens (§1, §4)", "(not quantified in the excerpt)",
             *ahead_cells, verdict(ahead)],
            [("Edits move the tuned lens and the model alike: stimulus–response alignment above the logit lens "
              "(§4; the results are not in the excerpt)"), "tuned above logit at every layer (from memory, unverified)",
             *alignment_cells, verdict(aligned)]]
