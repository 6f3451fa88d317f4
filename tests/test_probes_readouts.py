"""Bad input to the readout and causal commands (``generate``, ``patchscope``, ``dla``,
``attribute``, ``causal``, ``drift``) and to ``eval``, ``show``, ``table``, ``train``, ``app``,
``push`` and ``cache``: each gives one line and exit 2 and leaves no file behind, or runs with a
stated warning where the result still means something (tests/probes.py).

Probes that must be refused before any model loads name a model that does not exist
(:data:`UNLOADED`): a check that came after the load would fail there with "no such file" instead.
The probes that need the model (a layer past its last, more tokens than its context) load the tiny
one with transformers' own weight-loading bar switched off, so that only depthlens's line remains.
"""

import json

import pytest
import torch
from probes import Probe, run_probe
from tiny_models import tiny_model

from depthlens import TunedLens
from depthlens.lenses.attribute import AttributeLens
from depthlens.lenses.lens_file import read_lens_dir, write_lens_dir

PAIRS = [["quick", "brown"], ["lazy", "dog"], ["fair", "foul"], ["thunder", "rain"], ["question", "be"],
         ["fog", "air"], ["rain", "thunder"], ["foul", "fair"]]


@pytest.fixture(scope="module")
def place(tmp_path_factory, tiny_model_dir):
    """Input files and lens folders of every kind; the probes write under ``place / "out"``."""
    root = tmp_path_factory.mktemp("probes")
    model = tiny_model("llama")
    model.config._name_or_path = str(tiny_model_dir)
    TunedLens(model).save_pretrained(root / "tuned")
    TunedLens(model).save_pretrained(root / "liar")
    config = json.loads((root / "liar" / "config.json").read_text())
    config["model"]["num_layers"] = 24
    (root / "liar" / "config.json").write_text(json.dumps(config))
    width = model.config.hidden_size
    AttributeLens(model, torch.zeros(4, width, width), torch.zeros(4, width)).save_pretrained(root / "attr")
    config, _ = read_lens_dir(root / "attr")
    write_lens_dir(root / "short-attr", config, {"weight": torch.zeros(3, width, width), "bias": torch.zeros(3, width)})
    (root / "fox.json").write_text(json.dumps({"name": "fox", "templates": ["The fox of {} is"], "pairs": PAIRS}))
    (root / "texts.txt").write_text("Fair is foul, and foul is fair\nTo be, or not to be\n")
    (root / "empty.txt").write_text("\n  \n")
    (root / "latin1.txt").write_bytes("café au lait, très bien\n".encode("latin-1"))
    (root / "blocker").write_text("a file where a folder should be")
    (root / "out").mkdir()
    return root


UNLOADED = ["--model", "/not/loaded/model"]
"""A model that does not exist: probes with it must be refused before any model loads."""


OUT, BLOCKED = ["--out", "{p}/out/x"], ["--out", "{p}/blocker/x"]
"""An output folder to be left empty, and one behind a file where a folder should be."""

BEFORE_LOAD = [
    # generate
    Probe(["generate", "Fair", *UNLOADED, "--layers", "5:2"], "selects no layer"),
    Probe(["generate", "Fair", *UNLOADED, "--layers", "-1"], "not a layer number"),
    Probe(["generate", "Fair", *UNLOADED, "--layers", "0:3:0"], "step"),
    Probe(["generate", "Fair", *UNLOADED, "--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
    Probe(["generate", "Fair", *UNLOADED, "--temperature", "-1"], "--temperature"),
    Probe(["generate", "Fair", *UNLOADED, "--temperature", "1", "--top-k", "0"], "--top-k must be at least 1"),
    Probe(["generate", "Fair", *UNLOADED, "--temperature", "1", "--top-p", "1.5"], "--top-p"),
    Probe(["generate", "Fair", *UNLOADED, "--top-k", "5"], "--temperature 0"),
    Probe(["generate", "Fair", *UNLOADED, "--top-p", "0.9"], "--top-p limits sampling"),
    Probe(["generate", "  ", *UNLOADED], "prompt is empty"),
    Probe(["generate", "Fair", *UNLOADED, "--lens", "{p}/nowhere"], "neither 'logit' nor"),
    Probe(["generate", "Fair", *UNLOADED, *BLOCKED], "is a file, not a folder"),
    Probe(["generate", "Fair", *UNLOADED, "--out", "{p}/texts.txt"], "a file of that name exists"),
    Probe(["generate", "Fair", *UNLOADED, "--max-new-tokens", "many"], "invalid int value"),
    # patchscope
    Probe(["patchscope", "--identity-curve", *UNLOADED, "--texts", "{p}/latin1.txt"], "not UTF-8"),
    Probe(["patchscope", "--identity-curve", *UNLOADED, "--texts", "{p}/missing.txt"], "cannot read it"),
    Probe(["patchscope", "--identity-curve", *UNLOADED, "--texts", "{p}/empty.txt"], "holds no text"),
    Probe(["patchscope", "--identity-curve", *UNLOADED, "--texts", "{p}/texts.txt", "--layers", "5:2", *OUT],
          "selects no layer"),
    Probe(["patchscope", "--identity-curve", *UNLOADED], "needs source texts"),
    Probe(["patchscope", "--identity-curve", "Fair", *UNLOADED, "--source-layer", "1"], "--source-layer applies"),
    Probe(["patchscope", "--identity-curve", "Fair", *UNLOADED, "--generate", "3"], "--generate applies"),
    Probe(["patchscope", "Fair", *UNLOADED], "give --source-layer"),
    Probe(["patchscope", *UNLOADED, "--source-layer", "1"], "source prompt"),
    Probe(["patchscope", "Fair", *UNLOADED, "--source-layer", "-2"], "--source-layer must be at least 0"),
    Probe(["patchscope", "Fair", *UNLOADED, "--source-layer", "1", "--generate", "-1"], "--generate must be"),
    Probe(["patchscope", "Fair", *UNLOADED, "--source-layer", "1", "--texts", "{p}/texts.txt"],
          "--texts applies to --identity-curve"),
    Probe(["patchscope", "Fair", *UNLOADED, "--source-layer", "1", "--layers", "0,1"],
          "--layers applies to --identity-curve"),
    Probe(["patchscope", "Fair", *UNLOADED, "--source-layer", "1", "--map", "tuned"], "--map tuned needs"),
    Probe(["patchscope", "Fair", *UNLOADED, "--source-layer", "1", *BLOCKED], "is a file, not a folder"),
    # dla
    Probe(["dla", "Fair", *UNLOADED, "--target", " is", "--contrast", " is"], "--target itself"),
    Probe(["dla", "Fair", *UNLOADED, "--show", "-1"], "--show must be at least 0"),
    Probe(["dla", "Fair", *UNLOADED, "--top-neurons", "5"], "add --neurons"),
    Probe(["dla", "Fair", *UNLOADED, "--neurons", "1", "--top-neurons", "0"], "--top-neurons must be at least 1"),
    Probe(["dla", "Fair", *UNLOADED, "--neurons", "2:1"], "--neurons '2:1'"),
    Probe(["dla", " ", *UNLOADED], "the text is empty"),
    Probe(["dla", "Fair", *UNLOADED, *BLOCKED], "is a file, not a folder"),
    Probe(["dla", "Fair", *UNLOADED, "--position", "last"], "invalid int value"),
    # attribute
    Probe(["attribute", *UNLOADED, "--relation", "{p}/fox.json", "--held-out", "0"], "--held-out must be"),
    Probe(["attribute", *UNLOADED, "--relation", "{p}/fox.json", "--rank", "0"], "--rank must be at least 1"),
    Probe(["attribute", *UNLOADED, "--relation", "{p}/fox.json", "--train", "0"], "--train must be at least 1"),
    Probe(["attribute", *UNLOADED, "--relation", "{p}/fox.json", "--context", "-1"], "--context must be"),
    Probe(["attribute", *UNLOADED, "--relation", "{p}/fox.json", "--train", "3", "--context", "3"],
          "--context at most 2"),
    Probe(["attribute", *UNLOADED, "--relation", "{p}/fox.json", "--train", "8"], "are needed"),
    Probe(["attribute", *UNLOADED, "--relation", "{p}/nothing.json"], "neither a built-in"),
    Probe(["attribute", *UNLOADED, "--relation", "{p}/latin1.txt"], "cannot read relation file"),
    Probe(["attribute", *UNLOADED, "--relation", "{p}/fox.json", "--save-lens"], "add --out"),
    Probe(["attribute", *UNLOADED, "--relation", "{p}/fox.json", "--text", "Fair"], "add --out"),
    Probe(["attribute", *UNLOADED, "--relation", "{p}/fox.json", "--text", " ", *OUT], "--text is empty"),
    Probe(["attribute", *UNLOADED, "--relation", "{p}/fox.json", *BLOCKED], "is a file, not a folder"),
    Probe(["attribute", *UNLOADED], "--relation"),
    # causal and drift
    Probe(["causal", *UNLOADED, *OUT, "--layer-stride", "0"], "--layer-stride must be at least 1"),
    Probe(["causal", *UNLOADED, *OUT, "--chunk-len", "1"], "--chunk-len must be at least 2"),
    Probe(["causal", *UNLOADED, *OUT, "--tokens", "64"], "--tokens 64 is less than one chunk"),
    Probe(["causal", *UNLOADED, *OUT, "--layers", "0,2", "--layer-stride", "2"], "drop one of them"),
    Probe(["causal", *UNLOADED, *OUT, "--layers", "3:1"], "selects no layer"),
    Probe(["causal", *UNLOADED, *OUT, "--k", "0"], "--k must be at least 1"),
    Probe(["causal", *UNLOADED, *OUT, "--k", "2"], "k ≥ 3"),
    Probe(["causal", *UNLOADED, *OUT, "--tokens", "64", "--chunk-len", "32"], "bootstrap needs at least"),
    Probe(["causal", *UNLOADED, *OUT, "--group-tokens", "0"], "--group-tokens must be at least 1"),
    Probe(["causal", *UNLOADED, *OUT, "--alignment-only", "--bases", "{p}/tuned"], "drop one of them"),
    Probe(["causal", *UNLOADED, *OUT, "--directions", "0", "--alignment"], "--directions must be at least 1"),
    Probe(["causal", *UNLOADED, *OUT, "--lens", "{p}/blocker"], "no registered readout kind"),
    Probe(["causal", *UNLOADED, "--out", "{p}/texts.txt"], "a file of that name exists"),
    Probe(["causal", *UNLOADED], "--out"),
    Probe(["drift", *UNLOADED, *OUT, "--lens", "logit"], "omit --lens"),
    Probe(["drift", *UNLOADED, *OUT, "--lens", "{p}/attr"], "attribute readout"),
    Probe(["drift", *UNLOADED, *BLOCKED], "is a file, not a folder"),
    Probe(["drift", *UNLOADED, *OUT, "--tokens", "0"], "--tokens 0 is less than one chunk"),
    # eval, show, table, train, app, push, cache
    Probe(["eval", *UNLOADED, "--lens", "{p}/tuned", "--tokens", "3"], "less than one chunk of 256"),
    Probe(["eval", *UNLOADED, "--lens", "logit"], "not logit"),
    Probe(["eval", *UNLOADED, "--lens", "{p}/tuned", *BLOCKED], "is a file, not a folder"),
    Probe(["eval", *UNLOADED, "--lens", "{p}/tuned", "--ood", "{p}/latin1.txt", *OUT], "UTF-8"),
    Probe(["eval", *UNLOADED, "--lens", "{p}/tuned", "--data", "{p}/missing.txt", *OUT], "no such file"),
    Probe(["eval", *UNLOADED, "--lens", "{p}/tuned", "--ood", "mixed"], "is the --data source itself"),
    Probe(["show", "Fair", *UNLOADED, "--stat", "colour"], "unknown statistic"),
    Probe(["show", "Fair", *UNLOADED, "--k", "0"], "--k must be at least 1"),
    Probe(["show", *UNLOADED, "--file", "{p}/latin1.txt"], "cannot read"),
    Probe(["show", "Fair", *UNLOADED, "--file", "{p}/texts.txt"], "not both"),
    Probe(["table", "", *UNLOADED], "the text is empty"),
    Probe(["table", "Fair", *UNLOADED, "--every", "0"], "--every must be at least 1"),
    Probe(["train", *UNLOADED, "--chunk-len", "1", *OUT], "--chunk-len must be at least 2"),
    Probe(["train", *UNLOADED, "--tokens", "100", *OUT], "--tokens 100 is less than one batch"),
    Probe(["train", *UNLOADED, "--minutes", "0", *OUT], "--minutes must be above 0"),
    Probe(["train", *UNLOADED, "--eval-tokens", "10", *OUT], "--eval-tokens must be at least 256"),
    Probe(["train", *UNLOADED, "--init-share", "2", *OUT], "--init-share must be between 0 and 1"),
    Probe(["train", *UNLOADED, "--lr", "-1", *OUT], "--lr must be at least 0"),
    Probe(["train", *UNLOADED, "--minutes", "1", "--tokens", "512", *OUT], "not allowed with"),
    Probe(["app", *UNLOADED, "--max-tokens", "0"], "--max-tokens must be at least 1"),
    Probe(["app", *UNLOADED, "--port", "99999"], "port"),
    Probe(["push", "{p}/nowhere", "me/lens"], "does not exist"),
    Probe(["push", "{p}/tuned", "not a repo"], "REPO"),
    Probe(["push", "{p}/tuned", "me/lens", "--eval", "{p}/out"], "eval.json"),
    Probe(["cache", "clear"], "or --all"),
    Probe(["cache", "clear", "smollm2-135m", "--all"], "not both"),
]
"""Probes refused before the model loads; ``{p}`` stands for the folder of inputs."""


def _at(probe, place, model=""):
    """``probe`` with ``{p}`` and ``{m}`` in its arguments made the folder of inputs and the model."""
    argv = [arg.replace("{p}", str(place)).replace("{m}", str(model)) for arg in probe.argv]
    return Probe(argv, probe.says, probe.expect, label=" ".join(probe.argv))


@pytest.mark.parametrize("probe", BEFORE_LOAD, ids=str)
def test_refused_before_loading(probe, place, capsys):
    run_probe(_at(probe, place), capsys, watch=place / "out")


MODEL = ["--model", "{m}"]
AFTER_LOAD = [
    Probe(["generate", "Fair", *MODEL, "--max-new-tokens", "100000", *OUT], "context of 128 tokens"),
    Probe(["generate", "Fair", *MODEL, "--layers", "9", *OUT], "names layer 9"),
    Probe(["patchscope", "Fair", *MODEL, "--source-layer", "9", *OUT], "layer 9 is out of range"),
    Probe(["patchscope", "Fair", *MODEL, "--source-layer", "1", "--source-position", "99", *OUT], "position"),
    Probe(["patchscope", "--identity-curve", "Fair", *MODEL, "--layers", "0:9", *OUT], "names layer 9"),
    Probe(["dla", "Fair", *MODEL, "--position", "99", *OUT], "position 99 is outside"),
    Probe(["dla", "Fair", *MODEL, "--neurons", "3", *OUT], "names layer 3"),
    Probe(["dla", "Fair", *MODEL, "--target", "#1", "--contrast", "#1", *OUT], "--target itself"),
    Probe(["dla", "Fair", *MODEL, "--target", "thunderous lightning", *OUT], "not one"),
    Probe(["attribute", *MODEL, "--relation", "{p}/fox.json", "--train", "2", "--context", "1", "--rank", "33", *OUT],
          "more than the model's width 32"),
    Probe(["drift", *MODEL, "--lens", "{p}/liar", "--tokens", "128", "--chunk-len", "64", *OUT],
          "num_layers = 24"),
    Probe(["generate", "Fair", *MODEL, "--lens", "{p}/short-attr", *OUT], "needs weight"),
    Probe(["causal", *MODEL, "--layers", "7", *OUT], "names layer 7"),
]
"""Probes that need the tiny model (``{m}``): refused once it is loaded, before any work or file."""


@pytest.mark.parametrize("probe", AFTER_LOAD, ids=str)
def test_refused_once_the_model_is_known(probe, place, tiny_model_dir, capsys):
    run_probe(_at(probe, place, tiny_model_dir), capsys, watch=place / "out")


def test_meaningful_but_thin_results_come_with_a_warning(place, tiny_model_dir, capsys):
    for probe in (
        Probe(["attribute", *MODEL, "--relation", "{p}/fox.json", "--train", "2", "--context", "1"], "6 held-out",
              expect="warning"),
        Probe(["patchscope", "--identity-curve", "Fair is", *MODEL, "--layers", "0,3"], "source positions",
              expect="warning"),
        Probe(["drift", *MODEL, "--lens", "{p}/tuned", "--tokens", "128", "--chunk-len", "64", "--out",
               "{p}/drift"], "ρ is undefined", expect="warning"),
    ):
        run_probe(_at(probe, place, tiny_model_dir), capsys)
