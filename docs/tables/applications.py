"""The applications page's tables: prompt injection, SRM, overthinking and prediction depth, and
the rows of the claims table they decide."""

from __future__ import annotations

from .common import ROOT, interval, layers_text, load, outcome, table, verdict

INJECTION = {"smollm2-135m": "docs/applications", "gemma3-270m": "docs/applications/gemma3"}
TASKS = ("sst2", "rte", "mrpc", "boolq", "arc_easy", "sciq", "piqa")


def injection_results() -> list[dict]:
    """Every injection result of the authors' setup (few-shot prompts, recorded features), smollm2
    first, in :data:`TASKS` order."""
    results = []
    for folder in INJECTION.values():
        for task in TASKS:
            path = ROOT / folder / f"inject_{task}" / "injection.json"
            if path.is_file():
                result = load(str(path.relative_to(ROOT)))
                if "features" in result and "shots" in result:
                    results.append(result)
    return results


def _auroc(triple: list[float] | tuple[float, float, float]) -> str:
    return interval(*triple)


def injection_table() -> str:
    rows = []
    for r in injection_results():
        accuracy = f"{r['accuracy_clean']:.2f} / {r['accuracy_injected']:.2f} / {r['accuracy_benign']:.2f}"
        for i, m in enumerate(r["methods"]):
            head = [r["model"], r["task"], f"{r['n_clean']}, {r['shots']}-shot, {r['features']}", accuracy] if i == 0 \
                else ["", "", "", ""]
            rows.append([*head, m["method"], _auroc((m["auroc"], m["low"], m["high"])), _auroc(m["benign"])])
    return table(["model", "task", "examples, prompts, features", "accuracy clean / attack / benign", "method",
                  "AUROC attack vs clean [95%]", "AUROC benign vs clean [95%]"], rows)


def srm_table() -> str:
    rows = []
    for r in injection_results():
        for m in r["methods"]:
            if m["srm"]:
                d, mean = m["srm"], m["srm"]["mean"]
                rows.append([r["model"], r["task"], m["method"], (f"{d['variance_share_top1']:.2f} / "
                             f"{d['variance_share_top10']:.2f}"), f"{d['lambda_over_median_variance']:.3g}",
                             " / ".join(f"{mean[g]['score']:.3g}" for g in ("clean", "injected", "benign")),
                             f"{m['auroc']:.2f}"])
    return table(["model", "task", "SRM", "variance share of the top 1 / top 10 coordinates", ("ridge / median "
                  "variance"), "mean score: clean / attack / benign", "AUROC attack"], rows)


def overthinking_table() -> str:
    rows = []
    for model, folder in INJECTION.items():
        for task in ("sst2", "rte"):
            path = ROOT / folder / f"overthink_{task}" / "overthinking.json"
            if not path.is_file():
                continue
            r = load(str(path.relative_to(ROOT)))
            if "intervals" not in r:
                continue
            for lens, c in r["curves"].items():
                last = len(c["gap"]) - 1
                big = max(range(last + 1), key=lambda layer: c["gap"][layer])
                sure = [layer for layer in range(last + 1) if c["gap_low"][layer] > 0]
                rows.append([model, f"{task}, {r['shots']}-shot, {r['examples']} examples", lens,
                             f"{r['accuracy_correct']:.2f} / {r['accuracy_permuted']:.2f}",
                             interval(c["correct"][last], c["correct_low"][last], c["correct_high"][last], 2) + " / "
                             + interval(c["permuted"][last], c["permuted_low"][last], c["permuted_high"][last], 2),
                             f"{interval(c['gap'][big], c['gap_low'][big], c['gap_high'][big], 2)} at layer {big}",
                             layers_text(sure)])
    return table(["model", "task", "lens", "model accuracy, correct / permuted demos", ("calibrated accuracy at the "
                  "output, correct / permuted [95%]"), "largest gap [95%]", "layers whose gap interval is above 0"],
                 rows)


def claim_injection_rows() -> list[list[str]]:
    """§1 and §5.2: trajectories detect prompt injections, often near-perfectly. Held to detecting the
    attack: on a task, the better tuned-lens detector must separate attacked from clean prompts
    (AUROC interval above 0.9) and score attacks above benign insertions with disjoint intervals.
    Reproduced where that holds on every task; refuted where no task gets above 0.9 at all; else
    differs. The verdict notes the tasks near 1 whose benign insertions score as high, and those
    whose attacks are told apart from benign insertions without reaching 0.9."""
    cells, outcomes, alike, apart = [], {}, [], []
    for model in INJECTION:
        parts, attack_only, near_one = [], [], []
        for r in (r for r in injection_results() if r["model"] == model):
            tuned = [m for m in r["methods"] if m["readout"] not in ("logit", "hidden", "hidden (prompt mean)")]
            best = max(tuned, key=lambda m: m["auroc"])
            above_benign = best["low"] > best["benign"][2]
            near_one.append(best["low"] > 0.9)
            attack_only.append(near_one[-1] and above_benign)
            if near_one[-1] and not above_benign:
                alike.append(r["task"])
            elif above_benign and not near_one[-1]:
                apart.append(f"{r['task']} on {model}")
            parts.append(f"{r['task']} {best['auroc']:.2f} (benign {best['benign'][0]:.2f})")
        cells.append("; ".join(parts) or "not run")
        if parts:
            outcomes[model] = outcome(all(attack_only), not any(near_one))
    notes = [f"near 1 on {', '.join(dict.fromkeys(alike))}, where benign insertions score as high"] if alike else []
    notes += [f"attacks told apart from benign insertions, below 0.9, on {', '.join(apart)}"] if apart else []
    return [["Prediction trajectories detect prompt injections, often near-perfectly (§1, §5.2)",
             "\"often with near-perfect accuracy\" (§1; per-task results are not in the excerpt)", *cells,
             verdict(outcomes) + (f" ({'; '.join(notes)})" if notes else "")]]


def claim_overthinking_rows() -> list[list[str]]:
    """§5.1 (extending Halawi et al.): mislabelled demonstrations open a gap in accuracy in late layers.
    Reproduced where the gap's interval is above 0 at the output on every task; refuted where it is
    below 0 there; else differs (no gap outside the noise)."""
    cells, outcomes = [], {}
    for model, folder in INJECTION.items():
        parts, opened, closed = [], [], []
        for task in ("sst2", "rte"):
            path = ROOT / folder / f"overthink_{task}" / "overthinking.json"
            r = load(str(path.relative_to(ROOT))) if path.is_file() else {}
            if "intervals" not in r:
                continue
            c = r["curves"]["tuned"] if "tuned" in r["curves"] else r["curves"]["logit"]
            sure = [layer for layer, low in enumerate(c["gap_low"]) if low > 0]
            opened.append(c["gap_low"][-1] > 0)
            closed.append(c["gap_high"][-1] < 0)
            parts.append(f"{task}: output gap {interval(c['gap'][-1], c['gap_low'][-1], c['gap_high'][-1], 2)}, "
                         f"above 0 at layers {layers_text(sure)}")
        cells.append("; ".join(parts) or "not run")
        if parts:
            outcomes[model] = outcome(all(opened), all(closed))
    return [["Mislabelled demonstrations open an accuracy gap from a critical layer on (overthinking, §5.1)",
             "(extends Halawi et al.; no figure in the excerpt)", *cells, verdict(outcomes)]]


DEPTH = "benchmarks/results/prediction_depth.json"


def depth_table() -> str:
    """Prediction depth against iteration learned, per seed, with intervals over examples."""
    r = load(DEPTH)
    seeds, o = r["budgets"]["seeds"], r["over_seeds"]
    rows = [[str(seed)] + [interval(o["rho_per_seed"][lens][i], *o["interval_per_seed"][lens][i])
                           for lens in ("logit", "tuned")] for i, seed in enumerate(seeds)]
    rows.append(["mean", f"{o['rho_mean']['logit']:.3f}", f"{o['rho_mean']['tuned']:.3f}"])
    rows.append(["mean prediction depth (of the model's layers)", f"{o['mean_depth']['logit']:.2f}",
                 f"{o['mean_depth']['tuned']:.2f}"])
    rows.append(["mean KL to the model on held-out text, nats", f"{o['mean_kl_nats']['logit']:.3f}",
                 f"{o['mean_kl_nats']['tuned']:.3f}"])
    return table(["seed", "logit lens ρ [95%]", "tuned lens ρ [95%]"], rows) + (
        f"\n{r['task']['examples']} examples, {r['task']['choices']} choices (chance {r['task']['chance']:.2f}); "
        f"the model's accuracy {o['accuracy']:.3f}; {r['budgets']['model_steps']} training steps, "
        f"{len(r['budgets']['checkpoint_steps'])} checkpoints, a tuned lens of {r['budgets']['lens_kl_tokens']} "
        f"KL tokens per seed.\n")


def claim_depth_rows() -> list[list[str]]:
    """§1, §5.3 and Table 2: examples learned late in training are decided late in the network."""
    r = load(DEPTH)
    here, o = r["comparison"]["here"], r["over_seeds"]
    cell = (f"small GPT-2 trained here, {here['seeds']} seeds: tuned ρ {min(o['rho_per_seed']['tuned']):.2f}–"
            f"{max(o['rho_per_seed']['tuned']):.2f} (interval above 0 in {here['tuned_interval_above_0']}), logit "
            f"{min(o['rho_per_seed']['logit']):.2f}–{max(o['rho_per_seed']['logit']):.2f}; tuned above logit in "
            f"{here['tuned_above_logit']} of {here['seeds']}")
    positive = outcome(here["tuned_interval_above_0"] == here["seeds"], here["tuned_positive"] == 0)
    ahead = here["tuned_above_logit"]
    return [[("Examples learned late in training are decided late in the network: ρ(prediction depth, iteration "
              "learned) > 0 (§1, §5.3, Table 2)"), "tuned ρ 0.156–0.660, > 0 on 11 of 11 tasks (Table 2)",
             cell, "no checkpoint series", f"{positive} (on the small model)"],
            ["The tuned lens's prediction depth correlates better than the logit lens's (Table 2)",
             "tuned above logit on 8 of 11 tasks (Table 2)", f"{ahead} of {here['seeds']} seeds, by point estimates",
             "no checkpoint series", "differs (on the small model: the seeds' intervals overlap)"]]


def token_depth_table() -> str:
    """Mean prediction depth of each lens over the tokens of the `depthlens depth` example."""
    r = load("docs/applications/depth_smollm2/depth.json")
    return table(["lens", "mean prediction depth over the text's tokens (of 30 layers)"],
                 [[lens, f"{r[lens]['mean_depth']:.1f} ({len(r[lens]['depths'])} tokens)"] for lens in ("logit", "tuned")])
