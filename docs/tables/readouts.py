"""The readouts page's tables (token-identity Patchscopes, generation from a layer), and every
page's wall times."""

from __future__ import annotations

from .common import interval, load, table


def identity_table(path: str) -> str:
    """The token-identity Patchscope per source layer, with intervals over texts."""
    rows = load(path)
    cells = []
    for kind, name in (("identity", "source token"), ("next_token", "next-token prediction")):
        key = f"precision_at_1_{kind}"
        cells.append([f"precision@1, {name} [95%]"] + [interval(r[key], r[f"{key}_low"], r[f"{key}_high"], 2)
                                                       for r in rows])
    header = ["source layer"] + [str(r["source_layer"]) for r in rows]
    return table(header, cells) + f"\n{rows[0]['positions']} source positions in {rows[0]['texts']} texts; " \
        f"intervals resample texts.\n"


def _code(text: str) -> str:
    """``text`` as inline code on one table row."""
    flat = " ".join(text.replace("|", "\\|").replace("`", "'").split())
    return f"`{flat}`" if flat else "(blank)"


def generation_table(logit_path: str, tuned_path: str) -> str:
    """Greedy continuations of each prompt read at each layer, logit against tuned lens: one table
    per prompt."""
    logit, tuned = load(logit_path), load(tuned_path)
    parts = []
    for i, prompt in enumerate(logit[0]["prompts"]):
        rows = [[str(a["layer"]), _code(a["continuations"][i]), _code(b["continuations"][i])]
                for a, b in zip(logit, tuned)]
        parts.append(table(["layer", f"logit lens, \"…{prompt.rsplit('. ', 1)[-1]}\"", "tuned lens, same prompt"],
                           rows))
    return "\n".join(parts)


def timings_table(page: str) -> str:
    """Wall time of each step of ``page`` (and of the lenses it reads) from ``docs/regenerate.json``."""
    from regenerate import RECORD, plan
    record = load(RECORD)
    rows, total = [], 0.0
    for step in plan([page]):
        done = record.get(step.name)
        if done and done["command"] == list(step.command):
            total += done["seconds"]
            minutes = f"{done['seconds'] / 60:.1f}" + (" (the last part: it resumed layers kept from an earlier run)"
                                                       if done.get("resumed") else "")
            rows.append([step.name, minutes, str(done["threads"])])
        else:
            rows.append([step.name, "not run in the last regeneration", ""])
    rows.append(["**all**", f"**{total / 60:.1f}**", ""])
    return table(["step", "minutes", "threads (OMP_NUM_THREADS)"], rows)


def checks_table(page: str) -> str:
    """What ``docs/regenerate.py --check`` found when it reran each step of ``page``
    (``docs/checks.json``), a row per thread count and CPU of the rerun: numbers equal to 1e-4, numbers only
    within their stated 95% interval, and numbers outside both; the lenses the page reads first, by
    their tensors. A step rerun with an older command, or never, says so."""
    from regenerate import CHECKS, plan
    checks = load(CHECKS)
    rows = []
    for step in plan([page]):
        found = [run for _, run in sorted(checks.get(step.name, {}).items()) if run["command"] == list(step.command)]
        rows += [[step.name, *_check_cells(run), str(run["threads"]), run.get("cpu", "not recorded")]
                 for run in found] or [[step.name, "not rerun with --check", "", "", "", ""]]
    return table(["step", "numbers equal to 10⁻⁴", "others inside their stated 95% interval", "outside both",
                  "threads of the rerun", "CPU of the rerun"], rows)


def _check_cells(run: dict) -> list[str]:
    """A check's counts; a retrained lens's in tensors, each equal to 10⁻⁴ of its largest entry or not
    (a lens is judged by the steps that read it)."""
    if "tensors" not in run:
        return [str(run["same"]), str(run["interval"]), str(len(run["problems"]))]
    return [f"{run['same']} of {run['tensors']} tensors", "(weights: no intervals)",
            (f"{run['tensors'] - run['same']} tensors (largest difference {run['largest_difference']:.1e} of the "
             "tensor's largest entry)")]
