"""``depthlens push``: a lens folder and its model card (``README.md``) uploaded to the Hugging Face Hub.

:func:`push_lens` checks everything first (the lens is readable by its registered kind and, for a
depthlens folder, its weights match their checksum; the evaluation, if any, is a report), then
stages a copy of the lens with the card in a temporary folder and uploads it with
:func:`depthlens.lenses.hub.upload`.

:func:`model_card` writes Markdown with YAML front matter from what the lens folder records and
its evaluation: the model (name, architecture, shapes, fingerprint), the training data and recipe
(the ``"training"`` entry of a depthlens lens's ``config.json``: the :class:`TrainConfig` fields,
steps, tokens, seconds, the shares of each text source) and the per-layer evaluation table (KL to
the model and cross-entropy to the next token in nats, top-1 agreement as a fraction) from the
``eval.json`` that ``depthlens train``/``eval`` wrote into ``runs/<model>/eval``. Anything not
recorded is said to be not recorded, never guessed.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from depthlens.analysis.evaluate import EvalReport
from depthlens.errors import LensFileError
from depthlens.lenses import hub, registry
from depthlens.lenses.lens_file import FORMAT, read_lens_dir
from depthlens.training.runs import eval_dir_of_lens
from depthlens.viz.report import REPORT_FILES, read_report

CARD_NAME = "README.md"
"""The file name of the model card in the upload."""
CARD_METRICS = (("kl", "nats"), ("ce", "nats"), ("top1", "fraction"))
"""The evaluation columns of the card: metric and unit."""
_MODEL_FIELDS = (("name_or_path", "model"), ("model_type", "architecture"), ("num_layers", "layers"),
                 ("d_model", "d_model"), ("vocab_size", "vocabulary"), ("fingerprint", "fingerprint"))


def read_lens_config(path: Path) -> dict[str, Any]:
    """The ``config.json`` of the lens folder ``path`` as a dict (empty for a lens file or a folder
    without one: the card then says what is not recorded)."""
    config_path = path / "config.json"
    if not config_path.is_file():
        return {}
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise LensFileError(f"{config_path} cannot be read as JSON ({error}); the lens is damaged") from None
    return config if isinstance(config, dict) else {}


def prepare_card(lens: Path, target: hub.HubSpec, evaluation: Path | None = None) -> str:
    """Check the lens at ``lens`` and return its card for ``target``; the evaluation is read from
    ``evaluation`` (default: the run's ``eval/`` beside the lens, skipped if it has no
    ``eval.json``).

    Raises :class:`LensFileError` for a lens no registered kind reads or whose weights are damaged,
    and :class:`~depthlens.errors.ReportError` for a damaged ``eval.json``.
    """
    if not lens.exists():
        raise LensFileError(f"there is no lens at {lens}: pass the folder depthlens train wrote (runs/<model>/lens)")
    kind = registry.kind_of(lens)
    config = read_lens_config(lens) if lens.is_dir() else {}
    if config.get("format") == FORMAT:
        read_lens_dir(lens)
    folder = evaluation if evaluation is not None else eval_dir_of_lens(lens)
    explicit = evaluation is not None
    report = read_report(folder) if explicit or (folder / REPORT_FILES["json"]).is_file() else None
    return model_card(kind, config, report, str(target))


def push_lens(lens: Path, target: hub.HubSpec, *, evaluation: Path | None = None, private: bool = False,
              message: str | None = None) -> str:
    """Upload the lens folder (or file) ``lens`` with its model card (:func:`prepare_card`) to
    ``target``; returns the URL of the commit. Raises :class:`LensFileError` before uploading
    anything for a lens or evaluation that cannot be read, or offline."""
    card = prepare_card(lens, target, evaluation)
    with tempfile.TemporaryDirectory(prefix="depthlens-push-") as staging:
        stage = Path(staging)
        if lens.is_dir():
            shutil.copytree(lens, stage, dirs_exist_ok=True)
        else:
            shutil.copy2(lens, stage / lens.name)
        (stage / CARD_NAME).write_text(card, encoding="utf-8")
        return hub.upload(stage, target, private=private, message=message)


def model_card(kind: str, config: dict[str, Any], report: EvalReport | None, spec: str) -> str:
    """The Markdown card of a lens of readout ``kind`` whose ``config.json`` is ``config``,
    evaluated in ``report`` (``None`` if it has no evaluation), to be read back as ``--lens spec``."""
    model = config.get("model") if isinstance(config.get("model"), dict) else {}
    name = model.get("name_or_path") or config.get("base_model_name_or_path") or "an unrecorded model"
    tag = kind if kind.endswith("lens") else f"{kind}-lens"
    sections = [
        f"---\nlibrary_name: depthlens\ntags:\n- depthlens\n- interpretability\n- {tag}\n---\n",
        f"# A {kind} lens for {name}\n",
        ("Made with [depthlens](https://pypi.org/project/depthlens/). Read it with\n\n"
         f"```\ndepthlens show \"Your text\" --model {name} --lens {spec}\n```\n"),
        _model_section(model, config),
        _training_section(config.get("training")),
        _evaluation_section(report),
    ]
    return "\n".join(sections)


def _cell(value: Any) -> str:
    """A value as one Markdown table cell (``|`` escaped)."""
    text = json.dumps(value, ensure_ascii=False) if isinstance(value, (dict, list)) else str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def _model_section(model: dict[str, Any], config: dict[str, Any]) -> str:
    rows = [(label, model[key]) for key, label in _MODEL_FIELDS if model.get(key) is not None]
    if not model and config.get("base_model_name_or_path"):
        rows = [("model", config["base_model_name_or_path"]),
                ("unembedding hash", config.get("unembed_hash", config.get("unemebd_hash", "not recorded")))]
    if not rows:
        return "## Model\n\nThe lens does not record its model.\n"
    table = "\n".join(f"| {label} | `{_cell(value)}` |" for label, value in rows)
    note = ("\nThe fingerprint is a SHA-256 of the model's final norm and unembedding; depthlens refuses to "
            "load the lens onto a model with another one.\n" if model.get("fingerprint") else "")
    return f"## Model\n\n| | |\n|---|---|\n{table}\n{note}"


def _training_section(training: Any) -> str:
    if not isinstance(training, dict) or not training:
        return "## Training\n\nNot recorded (this lens was not trained by depthlens train).\n"
    recipe = training.get("config") if isinstance(training.get("config"), dict) else {}
    data = [("text", recipe.get("data", "not recorded"))]
    sources = training.get("sources")
    if isinstance(sources, dict) and sources:
        data.append(("sources (share of tokens)", ", ".join(f"{k}: {_cell(v)}" for k, v in sources.items())))
    data += [(key, training[key]) for key in ("tokens", "steps", "seconds", "processes", "products") if key in training]
    skip = {"model", "data", "out"}
    lines = ["## Training\n", "### Data\n", "| | |", "|---|---|", *(f"| {k} | {_cell(v)} |" for k, v in data),
             "", "### Recipe\n", "| setting | value |", "|---|---|",
             *(f"| {k} | {_cell(v)} |" for k, v in recipe.items() if k not in skip)]
    return "\n".join(lines) + "\n"


def _evaluation_section(report: EvalReport | None) -> str:
    if report is None:
        return "## Evaluation\n\nNo evaluation was found beside the lens (run depthlens eval to make one).\n"
    values: dict[tuple[str, str, float], float] = {}
    for row in report.table:
        if (row["metric"], row["unit"]) in CARD_METRICS:
            values[(row["lens"], row["metric"], float(row["layer"]))] = float(row["value"])
    lenses = list(dict.fromkeys(lens for lens, _, _ in values))
    columns = [(lens, metric) for metric, _ in CARD_METRICS for lens in lenses
               if any(key[:2] == (lens, metric) for key in values)]
    layers = sorted({layer for _, _, layer in values})
    header = "| layer | " + " | ".join(f"{metric} · {lens}" for lens, metric in columns) + " |"
    lines = [header, "|" + "---|" * (len(columns) + 1)]
    for layer in layers:
        cells = [f"{values[(lens, metric, layer)]:.3f}" if (lens, metric, layer) in values else ""
                 for lens, metric in columns]
        lines.append(f"| {layer:g} | " + " | ".join(cells) + " |")
    return (f"## Evaluation\n\nPer layer on {report.tokens} held-out tokens ({report.interval_label()}): KL(model ‖ "
            "lens) and cross-entropy to the next token in nats, top-1 agreement with the model as a fraction.\n\n"
            + "\n".join(lines) + "\n")


__all__ = ["CARD_METRICS", "CARD_NAME", "model_card", "prepare_card", "push_lens", "read_lens_config"]
