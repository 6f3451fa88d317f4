"""The web app's readout tabs (:mod:`depthlens.apps.web_readouts`) checked directly, without serving
the app: the page each tab lays out (labels, defaults, ranges and the ``elem_id``s that the browser
tests and the HTTP API rely on), how each button is wired, the one-line messages, and what each
handler computes on a tiny model against the library called separately or against stubs with known
answers."""

from __future__ import annotations

import gradio as gr
import pandas as pd
import pytest
import torch
from tiny_models import random_tuned_lens, tiny_model

from depthlens import LogitLens
from depthlens.analysis.dla import LogitAttribution, Term
from depthlens.analysis.patchscope import TARGET_PROMPTS, Patch, patchscope, patchscope_generate
from depthlens.analysis.trajectory import Trajectory
from depthlens.apps import web_readouts
from depthlens.apps.web_readouts import MAX_TRAIN, Readouts, readout_tabs
from depthlens.errors import AppError
from depthlens.lenses.attribute import Faithfulness, faithfulness, fit_attribute_lens
from depthlens.text.relations import BUILTIN_RELATIONS, Relation
from depthlens.viz.pictures import heatmap_figure

TEXT = "Fair is foul, and foul is fair"
"""Tokens: 'Fair', ' is', ' foul', ',', ' and', ' foul', ' is', ' f', 'air' (position 2 is ' foul')."""

FOX = Relation(
    "fox",
    ("The fox of {} is",),
    (("quick", "brown"), ("lazy", "dog"), ("fair", "foul"), ("thunder", "rain"), ("question", "be"), ("fog", "air")),
)
OWL = Relation(
    "owl",
    ("An owl sees {} and",),
    (("night", "day"), ("moon", "sun"), ("tree", "leaf"), ("owl", "hoot"), ("mouse", "tail")),
)
RELATIONS = {"fox": FOX, "owl": OWL}


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama", initializer_range=0.3).eval()


@pytest.fixture(scope="module")
def lenses(llama) -> dict:
    """Two readouts, the tuned one first (so it is the default) and named unlike its kind."""
    return {"mine": random_tuned_lens(llama, seed=1, std=0.3), "logit": LogitLens(llama)}


@pytest.fixture()
def readouts(llama, tiny_tokenizer, lenses, monkeypatch) -> Readouts:
    """Readouts on the tiny model, offering only the relations ``fox`` and ``owl``."""
    monkeypatch.setattr(web_readouts, "BUILTIN_RELATIONS", RELATIONS)
    monkeypatch.setattr(web_readouts, "load_relation", RELATIONS.__getitem__)
    return Readouts(llama, tiny_tokenizer, lenses, max_tokens=16)


def _page(model, tokenizer, lenses: dict, **options) -> tuple[gr.Blocks, Readouts]:
    with gr.Blocks() as demo:
        readouts = readout_tabs(model, tokenizer, lenses, **options)
    return demo, readouts


def _by_id(demo: gr.Blocks) -> dict[str, object]:
    return {block.elem_id: block for block in demo.blocks.values() if getattr(block, "elem_id", None)}


def _props(block: object) -> dict[str, object]:
    """The user-visible settings of a component (those it has)."""
    names = ("label", "value", "minimum", "maximum", "step", "precision", "variant", "scale", "allow_custom_value")
    props: dict[str, object] = {"type": type(block).__name__}
    props.update({name: getattr(block, name) for name in names if getattr(block, name, None) is not None})
    if hasattr(block, "choices"):
        props["choices"] = [value for _, value in block.choices]
    return props


def _endpoints(demo: gr.Blocks) -> dict[str, object]:
    fns = demo.fns.values() if isinstance(demo.fns, dict) else demo.fns
    return {fn.api_name: fn for fn in fns}


def _tokens(text: str, tokenizer) -> torch.Tensor:
    return tokenizer(text, return_tensors="pt").input_ids


@pytest.fixture(scope="module")
def five_layers():
    return tiny_model("llama", num_hidden_layers=5)


@pytest.fixture()
def page(five_layers, tiny_tokenizer):
    """The three tabs on a 5-layer model (so ``num_layers // 2`` = 2 differs from ``/ 2``, ``// 3``)
    with lenses ``mine`` then ``logit``; built anew for each test, so that each test builds it."""
    lenses = {"mine": LogitLens(five_layers), "logit": LogitLens(five_layers)}
    return _page(five_layers, tiny_tokenizer, lenses)


PAGE = {
    "attr-relation": {"type": "Dropdown", "label": "relation", "value": "country-capital",
                      "allow_custom_value": False, "choices": list(BUILTIN_RELATIONS)},
    "attr-train": {"type": "Slider", "label": "training subjects", "value": 2, "minimum": 1, "maximum": MAX_TRAIN,
                   "step": 1},
    "attr-beta": {"type": "Slider", "label": "β (scale on W h)", "value": 1.0, "minimum": 0.0, "maximum": 5.0,
                  "step": 0.5},
    "attr-text": {"type": "Textbox", "label": "text to read with the attribute lens", "value": "The capital of Japan is"},
    "attr-run": {"type": "Button", "value": "Estimate", "variant": "primary"},
    "attr-message": {"type": "Markdown"},
    "attr-curve": {"type": "Plot", "label": "faithfulness per layer"},
    "attr-heatmap": {"type": "Plot", "label": "attribute-lens trajectory"},
    "dla-text": {"type": "Textbox", "label": "text", "value": "The Eiffel Tower is in the city of", "scale": 3},
    "dla-position": {"type": "Number", "label": "position", "value": -1, "precision": 0},
    "dla-target": {"type": "Textbox", "label": "target token (default: the model's top-1)"},
    "dla-contrast": {"type": "Textbox", "label": "minus this token (optional)"},
    "dla-run": {"type": "Button", "value": "Attribute", "variant": "primary"},
    "dla-message": {"type": "Markdown"},
    "dla-grid": {"type": "Plot", "label": "layer × head"},
    "dla-bars": {"type": "Plot", "label": "per layer"},
    "dla-table": {"type": "Dataframe", "label": "largest terms"},
    "ps-text": {"type": "Textbox", "label": "source prompt", "value": "Fair is foul, and foul is fair", "scale": 3},
    "ps-layer": {"type": "Slider", "label": "source layer", "value": 2, "minimum": 0, "maximum": 5, "step": 1},
    "ps-position": {"type": "Number", "label": "source position", "value": -1, "precision": 0},
    "ps-target": {"type": "Dropdown", "label": "target prompt (identity, description, or your own)",
                  "value": "identity", "allow_custom_value": True, "choices": ["identity", "description"]},
    "ps-lens": {"type": "Dropdown", "label": "lens", "value": "mine", "allow_custom_value": False,
                "choices": ["mine", "logit"]},
    "ps-generate": {"type": "Slider", "label": "tokens to generate", "value": 0, "minimum": 0, "maximum": 20,
                    "step": 1},
    "ps-run": {"type": "Button", "value": "Patch", "variant": "primary"},
    "ps-message": {"type": "Markdown"},
    "ps-heatmap": {"type": "Plot", "label": "patched run"},
}
"""Every control and output of the three tabs, by ``elem_id``: what the page shows."""


def test_each_control_shows_its_label_default_and_range(page):
    """The page as documented: labels, defaults, slider ranges; the source-layer slider spans
    ``0 … L`` (L = 5) starting half-way (2); the lens dropdown offers the app's lenses in their
    order with the first as default."""
    demo, _ = page
    blocks = _by_id(demo)
    for elem_id, expected in PAGE.items():
        props = _props(blocks[elem_id])
        assert {key: props.get(key) for key in expected} == expected, elem_id


def test_the_tabs_show_their_titles_ids_and_introductions(page):
    """Tab titles and ``elem_id``s, and the one-paragraph introduction at the top of each tab."""
    demo, _ = page
    blocks = _by_id(demo)
    attribute = (
        "Estimate a relation's linear relational embedding from a few subjects, read every layer through it, "
        "and see how often it agrees with the model on held-out subjects."
    )
    dla = "Split one logit into the embeddings, every attention head and every MLP; the parts add up to the logit."
    patch = "Patch the state of a source token into a target prompt and read the patched run at every layer."
    intro = {
        "attribute-tab": ("Attribute lens", attribute),
        "dla-tab": ("Logit attribution", dla),
        "patchscope-tab": ("Patchscopes", patch),
    }
    for elem_id, (title, text) in intro.items():
        tab = blocks[elem_id]
        assert isinstance(tab, gr.Tab) and tab.label == title
        assert isinstance(tab.children[0], gr.Markdown) and tab.children[0].value == text


def test_the_buttons_call_their_endpoints_with_the_controls_in_order(page):
    """The API names and the controls each button reads and fills, in the handler's argument order."""
    demo, _ = page
    by_block = {id(block): block.elem_id for block in demo.blocks.values()}
    endpoints = _endpoints(demo)
    wiring = {
        "attribute": (["attr-relation", "attr-train", "attr-beta", "attr-text"],
                      ["attr-message", "attr-curve", "attr-heatmap"]),
        "dla": (["dla-text", "dla-position", "dla-target", "dla-contrast"],
                ["dla-message", "dla-grid", "dla-bars", "dla-table"]),
        "patchscope": (["ps-text", "ps-layer", "ps-position", "ps-target", "ps-lens", "ps-generate"],
                       ["ps-message", "ps-heatmap"]),
    }
    assert set(wiring) <= set(endpoints)
    for name, (inputs, outputs) in wiring.items():
        fn = endpoints[name]
        assert [by_block[id(block)] for block in fn.inputs] == inputs
        assert [by_block[id(block)] for block in fn.outputs] == outputs


def test_a_refused_request_fills_every_output_with_a_bold_message(page):
    """A refused request shows ``**message**`` in the message box and clears the other outputs
    (one ``None`` per output), from the handler of that tab."""
    demo, _ = page
    endpoints = _endpoints(demo)
    assert endpoints["attribute"].fn("no-such-relation", 2, 1.0, "x") == (
        f"**unknown relation 'no-such-relation': choose one of {', '.join(BUILTIN_RELATIONS)}**", None, None)
    assert endpoints["dla"].fn("   ", -1, "", "") == ("**the text is empty: type a prompt**", None, None, None)
    assert endpoints["patchscope"].fn(TEXT, 1, 2, "identity", "other", 0) == (
        "**unknown lens 'other': this app offers 'mine', 'logit'**", None)


def test_the_page_reads_at_most_64_tokens_unless_told(llama, tiny_tokenizer, lenses):
    """" a" repeated n times is n tokens; the default limit is 64 (both for the tabs and for
    :class:`Readouts`), and ``max_tokens`` reaches the tabs' handlers."""
    assert _tokens(" a" * 65, tiny_tokenizer).shape[1] == 65
    _, default = _page(llama, tiny_tokenizer, lenses)
    _, eight = _page(llama, tiny_tokenizer, lenses, max_tokens=8)
    direct = Readouts(llama, tiny_tokenizer, lenses)
    for readouts, limit in ((default, 64), (direct, 64), (eight, 8)):
        assert readouts.ids(" a" * limit).shape[1] == limit
        message = f"The text is too long: {limit + 1} tokens, and this app reads at most {limit} tokens."
        with pytest.raises(AppError) as error:
            readouts.ids(" a" * (limit + 1))
        assert str(error.value) == message


@pytest.mark.parametrize("text", ["", "   ", "\n\t "])
def test_an_empty_or_blank_text_is_refused_with_a_hint(readouts, text):
    with pytest.raises(AppError) as error:
        readouts.ids(text)
    assert str(error.value) == "the text is empty: type a prompt"


def test_an_unknown_relation_names_the_offered_ones(readouts):
    with pytest.raises(AppError) as error:
        readouts.attribute("cat", 2, 1.0, "The fox of fair is")
    assert str(error.value) == "unknown relation 'cat': choose one of fox, owl"


def test_each_relation_and_training_size_gets_its_own_lens(readouts, llama, tiny_tokenizer):
    """Fitted lenses are kept per (relation, subjects, seed 0): requests for (fox, 1), (fox, 2) and
    (owl, 2) each show the faithfulness of the lens fitted on their own split, computed here
    separately; asking for 0 subjects uses 1 (the least that can be fitted)."""
    shown = {}
    for name, n_train in (("fox", 1), ("fox", 2), ("owl", 2), ("fox", 0)):
        message, curve, _ = readouts.attribute(name, n_train, 1.0, "The fox of fair is")
        used = max(n_train, 1)
        assert message.startswith(f"{name}: LRE from {used} subjects, β = 1.")
        shown[name, n_train] = (list(curve.data[0].y), list(curve.data[1].y))
    assert set(readouts.fitted) == {("fox", 1, 0), ("fox", 2, 0), ("owl", 2, 0)}
    for (name, n_train), (agreement, lens_correct) in shown.items():
        relation = RELATIONS[name]
        train, held = relation.split(max(n_train, 1))
        lens = fit_attribute_lens(llama, tiny_tokenizer, relation, train)
        expected = faithfulness(lens, llama, tiny_tokenizer, relation, held)
        assert (agreement, lens_correct) == (expected.agreement, expected.lens_correct)


def test_the_attribute_message_and_curves_report_the_score(readouts, monkeypatch):
    """With a stub score whose agreement peaks first at layer 1 (75 %, tied with layer 3), the
    message names layer 1, 4 held-out subjects and the model's 50 %; the curves plot both series
    over the layers, labelled."""
    score = Faithfulness("fox", [0, 1, 2, 3], [0.25, 0.75, 0.5, 0.75], [0.0, 0.5, 0.25, 1.0], 0.5,
                         ["quick", "lazy", "fair", "fog"])
    monkeypatch.setattr(web_readouts, "faithfulness", lambda *args: score)
    message, curve, _ = readouts.attribute("fox", 2, 1.5, "The fox of fair is")
    assert message == ("fox: LRE from 2 subjects, β = 1.5. Faithfulness (top-1 agreement with the model on 4 "
                       "held-out subjects) peaks at 75% at layer 1; the model itself is right on 50%.")
    assert [trace.name for trace in curve.data] == ["faithfulness (agrees with the model)", "lens top-1 is the object"]
    assert [list(trace.x) for trace in curve.data] == [[0, 1, 2, 3]] * 2
    assert [list(trace.y) for trace in curve.data] == [score.agreement, score.lens_correct]
    assert curve.layout.yaxis.title.text == "fraction of held-out subjects"


def test_the_attribute_heatmap_is_the_lens_trajectory_of_the_text(readouts, llama, tiny_tokenizer):
    """The heatmap is the probability picture of the β-scaled lens read over the text, with token
    labels and the name "attribute · fox"."""
    text, beta = "The fox of fair is", 2.5
    _, _, heatmap = readouts.attribute("fox", 2, beta, text)
    lens = fit_attribute_lens(llama, tiny_tokenizer, FOX, FOX.split(2)[0]).with_beta(beta)
    trajectory = Trajectory.from_ids(llama, lens, _tokens(text, tiny_tokenizer), tokenizer=tiny_tokenizer,
                                     lens_name="attribute · fox")
    assert heatmap.to_json() == heatmap_figure(trajectory, "prob").to_json()
    assert "attribute · fox" in heatmap.to_json()


def _stub_attribution() -> LogitAttribution:
    """25 terms with values ±1 … ±25 (sign alternating), three notes."""
    terms = [Term(f"T{i}", "head", i % 3, i % 4, float(i if i % 2 else -i)) for i in range(1, 26)]
    return LogitAttribution(terms, 1.23456, "' foul' − ' fair'", 4, 3, 4, notes=["first.", "second.", "third."])


def test_the_dla_tab_passes_its_controls_and_reports_the_terms(readouts, tiny_tokenizer, monkeypatch):
    """With a stub attribution: the tab asks for the position (as an int), the target and contrast
    (empty → ``None``) with the app's tokenizer; the message gives target, position, logit, the
    number of terms and their sum (−13: 13 odd positive minus 12 even negative terms of 1…25),
    and the first two notes; the table holds the 20 largest terms by size, largest first."""
    calls = []

    def stub(model, ids, **kwargs):
        calls.append(kwargs)
        return _stub_attribution()

    monkeypatch.setattr(web_readouts, "logit_attribution", stub)
    message, _, _, table = readouts.dla(TEXT, 4.0, " foul", " fair")
    _, _, _, _ = readouts.dla(TEXT, -1, "", "")
    assert calls == [
        {"tokenizer": tiny_tokenizer, "position": 4, "target": " foul", "contrast": " fair"},
        {"tokenizer": tiny_tokenizer, "position": -1, "target": None, "contrast": None},
    ]
    assert isinstance(calls[0]["position"], int)
    assert message == "' foul' − ' fair' at position 4: logit 1.2346 nats = sum of 25 terms 13.0000. first. second."
    assert list(table["name"]) == [f"T{i}" for i in range(25, 5, -1)]
    assert list(table["value"]) == [float(i if i % 2 else -i) for i in range(25, 5, -1)]


def test_the_dla_message_gives_the_models_logit_difference(readouts, llama, tiny_tokenizer):
    """Target ' foul' minus contrast ' is' at position 3: the message's logit is the difference of
    the two logits in the model's own output there."""
    ids = _tokens(TEXT, tiny_tokenizer)
    with torch.no_grad():
        logits = llama(ids).logits[0, 3].double()
    foul, is_ = int(ids[0, 2]), int(ids[0, 1])
    message, _, _, table = readouts.dla(TEXT, 3, " foul", " is")
    assert message.startswith(f"' foul' − ' is' at position 3: logit {float(logits[foul] - logits[is_]):.4f} nats")
    assert isinstance(table, pd.DataFrame) and len(table) > 0


def test_an_unknown_lens_names_the_offered_ones(readouts):
    with pytest.raises(AppError) as error:
        readouts.patch(TEXT, 1, 2, "identity", "tuned", 0)
    assert str(error.value) == "unknown lens 'tuned': this app offers 'mine', 'logit'"


def _expected_patch(llama, tokenizer, lens, target_ids: torch.Tensor, layer: int, position: int, name: str):
    source = _tokens(TEXT, tokenizer)
    result = patchscope(llama, source, target_ids, Patch(layer, position))
    ids, probs = result.top(5)
    top = ", ".join(f"{tokenizer.decode([i])!r} ({p:.2f})" for i, p in zip(ids, probs, strict=True))
    word = tokenizer.decode([int(source[0, position])])
    message = f"state of {word!r} at layer {layer} patched into the target; next token: {top}"
    return message, heatmap_figure(result.trajectory(lens, tokenizer, name=name), "prob")


@pytest.mark.parametrize("target", ["identity", "description", "The fox of"])
def test_the_patchscope_tab_reads_the_patched_target(readouts, llama, tiny_tokenizer, lenses, target):
    """Layer 1, position 2 (' foul') patched into the built-in target prompt (its text, not its
    name) or into a text typed in: the message names the source token and the five likeliest next
    tokens, and the heatmap is the chosen lens ("mine") over the patched run, named after it."""
    message, heatmap = readouts.patch(TEXT, 1, 2, target, "mine", 0)
    target_ids = _tokens(TARGET_PROMPTS.get(target, target), tiny_tokenizer)
    expected, figure = _expected_patch(llama, tiny_tokenizer, lenses["mine"], target_ids, 1, 2, "patchscope · mine")
    assert message == expected
    assert message.startswith("state of ' foul' at layer 1 patched into the target; next token: ")
    assert message.count(" (0.") + message.count(" (1.") == 5
    assert heatmap.to_json() == figure.to_json()


def test_the_patchscope_tab_generates_the_asked_number_of_tokens(readouts, llama, tiny_tokenizer, lenses):
    """With 3 tokens to generate the message ends with the patched generation of exactly 3 tokens
    (not the library's default 20), after the next-token list."""
    target_ids = _tokens(TARGET_PROMPTS["identity"], tiny_tokenizer)
    message, _ = readouts.patch(TEXT, 2, 0, "identity", "logit", 3)
    generation = patchscope_generate(llama, _tokens(TEXT, tiny_tokenizer), target_ids, Patch(2, 0), max_new_tokens=3)
    assert generation.tokens.shape == (1, 3)
    expected, _ = _expected_patch(llama, tiny_tokenizer, lenses["logit"], target_ids, 2, 0, "")
    assert message == f"{expected}. Generated: {generation.texts(tiny_tokenizer)[0]!r}"
    without, _ = readouts.patch(TEXT, 2, 0, "identity", "logit", 0)
    assert without == expected
