"""The web app's tabs for the neighbouring readouts: the attribute lens, direct logit attribution
and Patchscopes. :func:`readout_tabs` adds them inside a ``gr.Blocks`` (``depthlens app`` builds
one in :func:`depthlens.apps.web.build_app`).

Every request runs under the app's model lock (hooks on the model must not interleave), refuses
texts longer than ``max_tokens`` tokens with a message, and shows a one-line message for any
:class:`~depthlens.errors.DepthlensError` instead of a picture. Fitted attribute lenses are kept per
(relation, number of training subjects, seed), so a second request with the same relation is fast.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager

import gradio as gr
import pandas as pd
import plotly.graph_objects as go
from torch import nn
from transformers import PreTrainedTokenizerBase

from depthlens.analysis.dla import logit_attribution
from depthlens.analysis.patchscope import TARGET_PROMPTS, Patch, patchscope, patchscope_generate
from depthlens.analysis.trajectory import Trajectory
from depthlens.errors import AppError, DepthlensError
from depthlens.lenses.attribute import AttributeLens, faithfulness, fit_attribute_lens
from depthlens.lenses.readout import Readout
from depthlens.text.relations import BUILTIN_RELATIONS, load_relation
from depthlens.viz.pictures import heatmap_figure
from depthlens.viz.readout_charts import curves, dla_bars

MAX_TRAIN = 8
"""Most training subjects the attribute tab estimates an LRE from (each costs a backward pass)."""
HELD_OUT = 24
"""Held-out subjects the attribute tab scores faithfulness on."""


class Readouts:
    """What the tabs compute, without the page; every model call holds ``lock``."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        lenses: Mapping[str, Readout],
        *,
        max_tokens: int = 64,
        lock: AbstractContextManager | None = None,
    ) -> None:
        self.model, self.tokenizer, self.lenses = model, tokenizer, dict(lenses)
        self.max_tokens = max_tokens
        self.lock = lock or threading.Lock()
        self.fitted: dict[tuple[str, int, int], AttributeLens] = {}
        self.num_layers = next(iter(self.lenses.values())).num_layers

    def ids(self, text: str):
        if not text or not text.strip():
            raise AppError("the text is empty: type a prompt")
        ids = self.tokenizer(text, return_tensors="pt").input_ids
        if ids.shape[1] > self.max_tokens:
            raise AppError(
                f"The text is too long: {ids.shape[1]} tokens, and this app reads at most {self.max_tokens} tokens."
            )
        return ids

    def attribute(self, relation_name: str, n_train: int, beta: float, text: str) -> tuple[str, go.Figure, go.Figure]:
        """Estimate (or reuse) the relation's attribute lens; its faithfulness curve and its
        trajectory on ``text``."""
        if relation_name not in BUILTIN_RELATIONS:
            raise AppError(f"unknown relation {relation_name!r}: choose one of {', '.join(BUILTIN_RELATIONS)}")
        relation = load_relation(relation_name)
        n_train = max(1, min(int(n_train), MAX_TRAIN))
        ids = self.ids(text)
        train, held = relation.split(n_train)
        with self.lock:
            key = (relation.name, n_train, 0)
            if key not in self.fitted:
                self.fitted[key] = fit_attribute_lens(self.model, self.tokenizer, relation, train)
            lens = self.fitted[key].with_beta(beta)
            score = faithfulness(lens, self.model, self.tokenizer, relation, held[:HELD_OUT])
            trajectory = Trajectory.from_ids(
                self.model, lens, ids, tokenizer=self.tokenizer, lens_name=f"attribute · {relation.name}"
            )
        best = max(range(len(score.layers)), key=lambda i: score.agreement[i])
        message = (
            f"{relation.name}: LRE from {n_train} subjects, β = {beta:g}. Faithfulness (top-1 agreement "
            f"with the model on {len(score.subjects)} held-out subjects) peaks at {score.agreement[best]:.0%} "
            f"at layer {score.layers[best]}; "
            f"the model itself is right on {score.model_correct:.0%}."
        )
        return (
            message,
            curves(
                score.layers,
                {
                    "faithfulness (agrees with the model)": score.agreement,
                    "lens top-1 is the object": score.lens_correct,
                },
                ylabel="fraction of held-out subjects",
            ),
            heatmap_figure(trajectory, "prob"),
        )

    def dla(
        self, text: str, position: int, target: str, contrast: str
    ) -> tuple[str, go.Figure, go.Figure, pd.DataFrame]:
        """The direct logit attribution: message, layer × head grid, per-layer bars, top terms."""
        ids = self.ids(text)
        with self.lock:
            attribution = logit_attribution(
                self.model,
                ids,
                tokenizer=self.tokenizer,
                position=int(position),
                target=target or None,
                contrast=contrast or None,
            )
        message = (
            f"{attribution.target} at position {attribution.position}: logit {attribution.logit:.4f} nats = sum of "
            f"{len(attribution.terms)} terms {attribution.total:.4f}. " + " ".join(attribution.notes[:2])
        )
        table = pd.DataFrame(sorted(attribution.to_rows(), key=lambda r: -abs(r["value"]))[:20])
        return message, heatmap_figure(attribution.grid()), dla_bars(attribution), table

    def patch(
        self, text: str, layer: int, position: int, target: str, lens_name: str, generate: int
    ) -> tuple[str, go.Figure]:
        """A Patchscope from ``(layer, position)`` of ``text`` into the target prompt, read by the lens."""
        if lens_name not in self.lenses:
            raise AppError(f"unknown lens {lens_name!r}: this app offers {', '.join(map(repr, self.lenses))}")
        source = self.ids(text)
        target_ids = (
            self.tokenizer(TARGET_PROMPTS[target], return_tensors="pt").input_ids
            if target in TARGET_PROMPTS
            else self.ids(target)
        )
        patch = Patch(int(layer), int(position))
        with self.lock:
            result = patchscope(self.model, source, target_ids, patch)
            trajectory = result.trajectory(self.lenses[lens_name], self.tokenizer, name=f"patchscope · {lens_name}")
            generated = (
                patchscope_generate(self.model, source, target_ids, patch, max_new_tokens=int(generate)).texts(
                    self.tokenizer
                )[0]
                if generate
                else ""
            )
        ids, probs = result.top(5)
        word = self.tokenizer.decode([int(source[0, int(position)])])
        message = f"state of {word!r} at layer {int(layer)} patched into the target; next token: " + ", ".join(
            f"{self.tokenizer.decode([i])!r} ({p:.2f})" for i, p in zip(ids, probs, strict=True)
        )
        if generated:
            message += f". Generated: {generated!r}"
        return message, heatmap_figure(trajectory, "prob")


def _guard(function: Callable[..., tuple], empty: tuple) -> Callable[..., tuple]:
    """``function``, with a :class:`DepthlensError` shown as a bold message and empty outputs."""

    def run(*args: object) -> tuple:
        try:
            return function(*args)
        except DepthlensError as error:
            return (f"**{error}**", *empty)

    return run


def readout_tabs(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    lenses: Mapping[str, Readout],
    *,
    max_tokens: int = 64,
    lock: AbstractContextManager | None = None,
) -> Readouts:
    """Add the tabs "Attribute lens", "Logit attribution" and "Patchscopes" to the ``gr.Blocks``
    being built; ``lock`` must be the one the rest of the app holds while it runs the model."""
    readouts = Readouts(model, tokenizer, lenses, max_tokens=max_tokens, lock=lock)
    with gr.Tab("Attribute lens", elem_id="attribute-tab"):
        _attribute_tab(readouts)
    with gr.Tab("Logit attribution", elem_id="dla-tab"):
        _dla_tab(readouts)
    with gr.Tab("Patchscopes", elem_id="patchscope-tab"):
        _patchscope_tab(readouts)
    return readouts


def _attribute_tab(readouts: Readouts) -> None:
    gr.Markdown(
        "Estimate a relation's linear relational embedding from a few subjects, read every layer through it, "
        "and see how often it agrees with the model on held-out subjects."
    )
    with gr.Row():
        relation = gr.Dropdown(
            list(BUILTIN_RELATIONS), value="country-capital", label="relation", elem_id="attr-relation"
        )
        n_train = gr.Slider(1, MAX_TRAIN, value=2, step=1, label="training subjects", elem_id="attr-train")
        beta = gr.Slider(0.0, 5.0, value=1.0, step=0.5, label="β (scale on W h)", elem_id="attr-beta")
    text = gr.Textbox(
        value="The capital of Japan is", label="text to read with the attribute lens", elem_id="attr-text"
    )
    button = gr.Button("Estimate", variant="primary", elem_id="attr-run")
    outputs = [
        gr.Markdown(elem_id="attr-message"),
        gr.Plot(label="faithfulness per layer", elem_id="attr-curve"),
        gr.Plot(label="attribute-lens trajectory", elem_id="attr-heatmap"),
    ]
    button.click(
        _guard(readouts.attribute, (None, None)), [relation, n_train, beta, text], outputs, api_name="attribute"
    )


def _dla_tab(readouts: Readouts) -> None:
    gr.Markdown(
        "Split one logit into the embeddings, every attention head and every MLP; the parts add up to the logit."
    )
    with gr.Row():
        text = gr.Textbox(value="The Eiffel Tower is in the city of", label="text", elem_id="dla-text", scale=3)
        position = gr.Number(value=-1, precision=0, label="position", elem_id="dla-position")
        target = gr.Textbox(label="target token (default: the model's top-1)", elem_id="dla-target")
        contrast = gr.Textbox(label="minus this token (optional)", elem_id="dla-contrast")
    button = gr.Button("Attribute", variant="primary", elem_id="dla-run")
    outputs = [
        gr.Markdown(elem_id="dla-message"),
        gr.Plot(label="layer × head", elem_id="dla-grid"),
        gr.Plot(label="per layer", elem_id="dla-bars"),
        gr.Dataframe(label="largest terms", elem_id="dla-table"),
    ]
    button.click(_guard(readouts.dla, (None, None, None)), [text, position, target, contrast], outputs, api_name="dla")


def _patchscope_tab(readouts: Readouts) -> None:
    gr.Markdown("Patch the state of a source token into a target prompt and read the patched run at every layer.")
    with gr.Row():
        text = gr.Textbox(value="Fair is foul, and foul is fair", label="source prompt", elem_id="ps-text", scale=3)
        layer = gr.Slider(
            0, readouts.num_layers, value=readouts.num_layers // 2, step=1, label="source layer", elem_id="ps-layer"
        )
        position = gr.Number(value=-1, precision=0, label="source position", elem_id="ps-position")
    with gr.Row():
        target = gr.Dropdown(
            list(TARGET_PROMPTS),
            value="identity",
            allow_custom_value=True,
            label="target prompt (identity, description, or your own)",
            elem_id="ps-target",
        )
        lens = gr.Dropdown(list(readouts.lenses), value=next(iter(readouts.lenses)), label="lens", elem_id="ps-lens")
        generate = gr.Slider(0, 20, value=0, step=1, label="tokens to generate", elem_id="ps-generate")
    button = gr.Button("Patch", variant="primary", elem_id="ps-run")
    outputs = [gr.Markdown(elem_id="ps-message"), gr.Plot(label="patched run", elem_id="ps-heatmap")]
    button.click(
        _guard(readouts.patch, (None,)), [text, layer, position, target, lens, generate], outputs, api_name="patchscope"
    )


__all__ = ["HELD_OUT", "MAX_TRAIN", "Readouts", "readout_tabs"]
