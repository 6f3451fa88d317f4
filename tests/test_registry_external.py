"""A readout written here, outside the package, registers itself and then works in every command
(``table``, ``show``, ``eval``, ``generate``, ``causal``) and in the web app, unchanged.

:class:`ShiftedReadout` implements only the readout protocol (``kind``, ``parts``,
``num_layers``, ``iter_logits``; it is no :class:`~depthlens.lenses.readout.Lens`): it decodes a
layer like the logit lens, then moves each logit ``shift`` token ids up, so its top-1 token is the
logit lens's plus ``shift`` (modulo the vocabulary). Each test checks a command's output against
that rule or against the model itself, not against the command's own code path.
"""

from __future__ import annotations

import html
import json
import random

import pandas as pd
import pytest
import torch
from test_app import call, free_port, heatmap_labels
from tiny_models import VOCAB, tiny_model

from depthlens import LogitLens, TunedLens, capture
from depthlens.analysis.trajectory import LABEL_CHARS, Trajectory
from depthlens.apps.cli import main
from depthlens.apps.web import build_app, load_lenses, start
from depthlens.lenses.readout import check_layer
from depthlens.lenses.registry import register_readout
from depthlens.text.tokens import token_label

TEXT = "Fair is foul, and foul is fair"
SHIFT = 1


class ShiftedReadout:
    """The logit lens's logits ``[batch, seq, vocab]`` rolled by ``shift`` along the vocabulary."""

    kind = "shifted"

    def __init__(self, parts, shift: int) -> None:
        self.parts = parts
        self.shift = shift

    @property
    def num_layers(self) -> int:
        return self.parts.num_layers

    def iter_logits(self, states, layers=None):
        for layer in range(self.num_layers + 1) if layers is None else layers:
            check_layer(layer, self.num_layers)
            yield layer, self.parts.decode(states[layer]).roll(self.shift, dims=-1)


def load_shifted(path, parts) -> ShiftedReadout:
    return ShiftedReadout(parts, int(json.loads((path / "config.json").read_text())["shift"]))


register_readout("shifted", load_shifted, description="the logit lens with every logit moved up by a few token ids")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("shifted") / "lens"
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"kind": "shifted", "shift": SHIFT}))
    return path


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


def _logit_top1(model, tokenizer, text: str) -> torch.Tensor:
    """The logit lens's top-1 token ids ``[layers, seq]`` on ``text``, from the library's lens."""
    ids = tokenizer(text, return_tensors="pt").input_ids
    _, top1 = LogitLens(model).top_k(capture(model, ids), k=1)
    return top1[:, 0, :, 0]


def _shifted_rows(top1: torch.Tensor) -> torch.Tensor:
    """What a trajectory of the shifted readout shows, from the logit lens's top-1 ids
    ``[layers, ...]``: every layer's shifted, but the last row, which trajectories always read from
    the model's own output."""
    return torch.cat([(top1[:-1] + SHIFT) % VOCAB, top1[-1:]])


def test_table_shows_the_registered_readout(tiny_model_dir, tiny_tokenizer, folder, model, capsys):
    assert main(["table", TEXT, "--model", str(tiny_model_dir), "--lens", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "shifted lens on" in out
    expected = (_logit_top1(model, tiny_tokenizer, TEXT) + SHIFT) % VOCAB
    rows = [line for line in out.splitlines() if line.startswith("│")]
    assert len(rows) == expected.shape[0]
    for line, row in zip(rows, expected.tolist()):
        assert [cell.strip() for cell in line.split("│")[2:-1]] == [token_label(tiny_tokenizer, t, 8) for t in row]


def test_show_writes_the_registered_readouts_predictions(tiny_model_dir, tiny_tokenizer, folder, model, tmp_path):
    out = tmp_path / "table.csv"
    assert main(["show", TEXT, "--model", str(tiny_model_dir), "--lens", str(folder), "--out", str(out)]) == 0
    table = pd.read_csv(out, keep_default_na=False, na_values=[""])
    expected = _shifted_rows(_logit_top1(model, tiny_tokenizer, TEXT))
    rows = table[table.statistic == "entropy"]
    assert rows.lens.unique().tolist() == ["shifted lens"]
    assert rows.prediction.tolist() == [token_label(tiny_tokenizer, t, LABEL_CHARS) for t in expected.flatten().tolist()]


def test_eval_compares_the_registered_readout_with_the_logit_lens(tiny_model_dir, folder, tmp_path, capsys):
    rng = random.Random(0)
    words = ["fair", "foul", "hover", "through", "the", "fog", "and", "filthy", "air", "when", "shall", "we"]
    text = tmp_path / "verse.jsonl"
    text.write_text("".join(json.dumps({"text": " ".join(rng.choice(words) for _ in range(60))}) + "\n"
                            for _ in range(200)))
    out = tmp_path / "eval"
    assert main(["eval", "--model", str(tiny_model_dir), "--lens", str(folder), "--data", str(text),
                 "--tokens", "256", "--out", str(out)]) == 0
    assert "shifted" in capsys.readouterr().out
    rows = json.loads((out / "eval.json").read_text())["table"]
    kl = {(r["lens"], r["layer"]): r["value"] for r in rows if r["metric"] == "kl"}
    last = max(layer for _, layer in kl)
    assert {lens for lens, _ in kl} == {"logit", "shifted"}
    # At the last layer the logit lens is the model itself: its KL is float32 rounding, about
    # 1e-7 × the logits' size (< 1); the shifted readout's is that of a permuted distribution.
    assert kl[("logit", last)] < 1e-5
    assert kl[("shifted", last)] > 1e-3


def test_generate_greedily_follows_the_registered_readout(tiny_model_dir, tiny_tokenizer, folder, model, tmp_path):
    assert main(["generate", "Fair is", "--model", str(tiny_model_dir), "--lens", str(folder),
                 "--max-new-tokens", "4", "--out", str(tmp_path)]) == 0
    [generation] = json.loads((tmp_path / "generations.json").read_text())
    assert generation["readout"] == "shifted" and generation["layer"] == model.config.num_hidden_layers
    ids = tiny_tokenizer("Fair is", return_tensors="pt").input_ids
    new = []
    with torch.no_grad():
        for _ in range(4):
            token = (int(model(ids).logits[0, -1].argmax()) + SHIFT) % VOCAB
            new.append(token)
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    assert generation["continuations"] == [tiny_tokenizer.decode(new)]


def test_causal_names_each_readout_and_keeps_every_result(tiny_model_dir, folder, model, tmp_path):
    lenses = []
    for seed in (1, 2):
        lens = TunedLens(model)
        with torch.no_grad():
            generator = torch.Generator().manual_seed(seed)
            for translator in lens.translators:
                translator.weight.normal_(0, 1.0, generator=generator)
        lenses.append(lens.save_pretrained(tmp_path / f"lens{seed}"))
    common = ["causal", "--model", str(tiny_model_dir), "--tokens", "128", "--chunk-len", "64", "--layers", "2",
              "--k", "3", "--group-tokens", "16"]
    assert main([*common, "--lens", str(folder), "--lens", "logit", "--out", str(tmp_path / "a")]) == 0
    results = json.loads((tmp_path / "a" / "results.json").read_text())
    assert list(results["readouts"]) == ["shifted", "logit"]
    assert {"energy_shifted.png", "fidelity_shifted.html", "energy_logit.png"} <= {p.name for p in (tmp_path / "a").iterdir()}

    assert main([*common, "--lens", str(lenses[0]), "--lens", str(lenses[1]), "--out", str(tmp_path / "b")]) == 0
    results = json.loads((tmp_path / "b" / "results.json").read_text())
    names = [f"tuned ({lenses[0]})", f"tuned ({lenses[1]})"]
    assert list(results["readouts"]) == names
    energies = [results["readouts"][name]["bases"][0]["energies_nats"] for name in names]
    assert energies[0] != energies[1]
    bases = sorted(p.name for p in (tmp_path / "b" / "bases").iterdir())
    assert len(bases) == 2 and all(b.startswith("tuned_") for b in bases)


def test_the_app_offers_and_draws_the_registered_readout(folder, model, tiny_tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path))
    lenses, _ = load_lenses(model, [folder])
    assert list(lenses) == ["logit", "shifted"]
    demo = build_app(model, tiny_tokenizer, lenses, max_tokens=16)
    url = start(demo, "127.0.0.1", free_port(), quiet=True)
    try:
        event, data = call(url, "show", [TEXT, "shifted", "entropy", 3])
    finally:
        demo.close()
    assert event == "complete"
    shifted = Trajectory.from_text(model, tiny_tokenizer, lenses["shifted"], TEXT)
    logit = Trajectory.from_text(model, tiny_tokenizer, LogitLens(model), TEXT)
    assert torch.equal(shifted.top_ids[..., 0], _shifted_rows(logit.top_ids[..., 0]))
    assert heatmap_labels(data[1]) == [[[html.escape(label, quote=False) for label in row]
                                        for row in shifted.top1_labels(max_chars=8)]]
