"""Direct logit attribution: the term tables and grids, token look-up, error messages, the frozen
norms, and the paths the family tests do not reach (a projection after the final norm, heads that
cannot be split, a logit divisor, a strong soft cap, an MLP bias before a sandwich norm).

Expected values are built by hand (sums of powers of two, which float64 adds exactly), read off
the model's own forward pass, or computed from a direct formula: a norm with its scale frozen at
``s`` maps ``v`` to ``N(s) ⊙ v / s`` for an RMSNorm, ``γ ⊙ (v − mean v) / σ(s) + β`` for a LayerNorm.

Tolerance: a logit is a float32 sum of products, so it carries a rounding error of a few float32
epsilons (ε = 1.2e-7) of the magnitudes it adds up; we allow 64 ε times ``1 + Σ |term|``.
"""

from __future__ import annotations

import math
import re
from dataclasses import replace
from types import SimpleNamespace
from typing import ClassVar

import numpy as np
import pytest
import torch
from tiny_models import tiny_model
from torch import nn
from transformers.models.olmo.modeling_olmo import OlmoLayerNorm

from depthlens import find_parts
from depthlens.analysis.dla import LogitAttribution, Term, _decoder_covector, _split, logit_attribution, resolve_token
from depthlens.analysis.dla_model import LinearNorm, freeze_norm
from depthlens.errors import AttributionError
from depthlens.model import architecture

IDS = torch.tensor([[5, 17, 42, 8, 99, 3, 61, 7]])
EPS32 = torch.finfo(torch.float32).eps


def tolerance(values: list[float]) -> float:
    """64 float32 epsilons of ``1 + Σ |value|``."""
    return 64 * EPS32 * (1 + sum(abs(v) for v in values))


def model_logit(model: nn.Module, position: int, target: int) -> float:
    with torch.no_grad():
        return float(model(IDS).logits[0, position, target])


@pytest.fixture(scope="module")
def llama() -> nn.Module:
    return tiny_model("llama")


# --- the term table, built by hand ---------------------------------------------------------------

HAND_TERMS = [
    Term("embeddings", "embed", None, None, 0.5),
    Term("L0.H0", "head", 0, 0, 1.0),
    Term("L0.H1", "head", 0, 1, 2.0),
    Term("L0.attn bias", "attn_bias", 0, None, 0.25),
    Term("L0.mlp", "mlp", 0, None, 4.0),
    Term("L1.attn", "attn", 1, None, 8.0),
    Term("L1.N3", "neuron", 1, 3, 16.0),
    Term("L1.N5", "neuron", 1, 5, 32.0),
    Term("L1.mlp rest", "mlp_rest", 1, None, 64.0),
    Term("unembedding bias", "bias", None, None, 128.0),
    Term("final norm bias", "bias", None, None, 256.0),
]


def hand_attribution(num_heads: int = 2, softcap: float | None = None) -> LogitAttribution:
    return LogitAttribution(
        list(HAND_TERMS),
        511.75,
        "' x'",
        3,
        2,
        num_heads,
        softcap=softcap,
        capped_logit=9.5,
        model_name="tiny-net",
        notes=["a note"],
    )


def test_layer_totals_put_every_kind_in_its_place():
    """Heads, a whole attention branch and the attention bias add up per layer; whole MLPs,
    neurons and the rest too; the embeddings (all of them) and the constants on their own
    (powers of two: exact)."""
    totals = hand_attribution().layer_totals()
    assert totals == {"attn": [3.25, 8.0], "mlp": [4.0, 112.0], "embeddings": [0.5], "other": [384.0]}
    two = LogitAttribution(
        [Term("tokens", "embed", None, None, 0.5), Term("positions", "embed", None, None, 2.0)], 2.5, "#1", 0, 1, 1
    )
    assert two.layer_totals()["embeddings"] == [2.5]


def test_the_grid_has_a_cell_per_head_the_bias_and_the_mlp():
    """Layer 0 has two heads, a bias and an MLP; layer 1's whole attention goes in the first
    column and its neurons and rest add up in the MLP column (16 + 32 + 64); other cells are empty."""
    grid = hand_attribution().grid()
    expected = np.array([[1.0, 2.0, 0.25, 4.0], [8.0, np.nan, np.nan, 112.0]])
    np.testing.assert_array_equal(grid.values, expected)
    assert list(grid.row_labels) == ["0", "1"] and list(grid.col_labels) == ["H0", "H1", "bias", "MLP"]
    assert (grid.title, grid.name, grid.source) == ("direct logit attribution of ' x' at position 3", "DLA", "tiny-net")
    assert (grid.quantity, grid.unit, grid.scale) == ("direct effect on the logit", "logit", "diverging")
    assert (grid.row_title, grid.col_title, grid.value_format) == ("layer", "head", ".3f")


def test_a_grid_without_a_head_count_has_one_head_column():
    """With no head count the attention branch still has its column: H0, then the bias and the MLP."""
    terms = [Term("L0.attn", "attn", 0, None, 1.5), Term("L0.mlp", "mlp", 0, None, 2.5)]
    grid = LogitAttribution(terms, 4.0, "#1", 0, 1, 0).grid()
    assert list(grid.col_labels) == ["H0", "bias", "MLP"]
    np.testing.assert_array_equal(grid.values, [[1.5, np.nan, 2.5]])


def test_rows_and_summary_are_the_fields_by_name():
    """One row per term with its five fields; the summary carries the sum of the terms (511.75)."""
    attribution = hand_attribution(softcap=30.0)
    assert attribution.to_rows()[:2] == [
        {"name": "embeddings", "kind": "embed", "layer": None, "index": None, "value": 0.5},
        {"name": "L0.H0", "kind": "head", "layer": 0, "index": 0, "value": 1.0},
    ]
    assert len(attribution.to_rows()) == len(HAND_TERMS)
    assert attribution.summary() == {
        "target": "' x'",
        "position": 3,
        "logit": 511.75,
        "sum_of_terms": 511.75,
        "pre_softcap": True,
        "softcap": 30.0,
        "capped_logit": 9.5,
        "model": "tiny-net",
        "notes": ["a note"],
    }
    uncapped = hand_attribution().summary()
    assert uncapped["pre_softcap"] is False and uncapped["softcap"] is None


# --- tokens ---------------------------------------------------------------------------------------


class WordTokenizer:
    """Words with their leading space as tokens; ``<bos>`` (id 1) first with special tokens."""

    pieces: ClassVar[dict[int, str]] = {1: "<bos>", 7: " Paris", 8: " is"}

    def __call__(self, text: str, add_special_tokens: bool = True) -> SimpleNamespace:
        ids = {piece: i for i, piece in self.pieces.items()}
        words = [ids[word] for word in re.findall(r" ?[^ ]+", text)]
        return SimpleNamespace(input_ids=([1] if add_special_tokens else []) + words)

    def decode(self, ids: list[int]) -> str:
        return "".join(self.pieces[i] for i in ids)


def test_token_ids_are_checked_against_the_vocabulary():
    """0 and V − 1 are tokens, V is not; ``#ID`` is an id, even a one-digit one."""
    assert resolve_token(None, 0, 320) == 0 and resolve_token(None, 319, 320) == 319
    assert resolve_token(None, "#5", 320) == 5 and resolve_token(None, "#319", 320) == 319
    with pytest.raises(AttributionError, match=re.escape("token id 320 is outside the vocabulary 0 … 319")):
        resolve_token(None, 320, 320)
    with pytest.raises(AttributionError, match=re.escape("token id -1 is outside the vocabulary 0 … 319")):
        resolve_token(None, -1, 320)


def test_a_text_token_needs_a_tokenizer_and_must_be_one_token():
    """A text is encoded without special tokens (no ``<bos>``); two words are refused, naming the pieces."""
    with pytest.raises(
        AttributionError, match=re.escape("cannot look up the token 'Paris' without a tokenizer: pass its id")
    ):
        resolve_token(None, "Paris", 320)
    assert resolve_token(WordTokenizer(), " Paris", 320) == 7
    message = (
        "the target ' Paris is' is 2 tokens [' Paris', ' is'], not one: pick a single token "
        "(often with its leading space, e.g. ' Paris') or pass its id as #ID"
    )
    with pytest.raises(AttributionError, match=f"^{re.escape(message)}$"):
        resolve_token(WordTokenizer(), " Paris is", 320)


# --- logit_attribution on whole models ------------------------------------------------------------


def test_positions_and_layers_outside_the_model_name_the_valid_range(llama):
    """The first and last positions are accepted (and stored as 0 … seq−1); one past either end is
    refused with the valid range; MLP layers outside 0 … 2 are refused with that range."""
    assert logit_attribution(llama, IDS, position=-8).position == 0
    assert logit_attribution(llama, IDS, position=7).position == 7
    message = "position -9 is outside the text of 8 tokens (batch 1): pick a position between -8 and 7 of a single text"
    with pytest.raises(AttributionError, match=f"^{re.escape(message)}$"):
        logit_attribution(llama, IDS, position=-9)
    with pytest.raises(AttributionError, match=re.escape("(batch 2)")):
        logit_attribution(llama, IDS.expand(2, -1))
    message = "MLP layers [3, -1] do not exist: this model has MLPs 0 … 2"
    with pytest.raises(AttributionError, match=f"^{re.escape(message)}$"):
        logit_attribution(llama, IDS, neurons=[1, 3, -1])


def test_one_text_may_be_given_without_its_batch_axis(llama):
    """``[seq]`` ids are the text ``[1, seq]``: the same logit and terms."""
    flat, batched = logit_attribution(llama, IDS[0], target=9), logit_attribution(llama, IDS, target=9)
    assert flat.logit == batched.logit and flat.terms == batched.terms


def test_the_terms_are_named_in_order_with_their_layer_and_index():
    """Phi: the embeddings, per layer four heads, the attention bias and the MLP (layer 1 split
    into its top 2 neurons and the rest), then the unembedding bias and the final norm's bias."""
    model = tiny_model("phi")
    attribution = logit_attribution(model, IDS, position=-3, neurons=[1], top_neurons=2)
    neurons = [t.index for t in attribution.terms if t.kind == "neuron"]
    expected = [("embeddings", "embed", None, None)]
    for i in range(3):
        expected += [(f"L{i}.H{h}", "head", i, h) for h in range(4)] + [(f"L{i}.attn bias", "attn_bias", i, None)]
        if i == 1:
            expected += [(f"L1.N{n}", "neuron", 1, n) for n in neurons] + [("L1.mlp rest", "mlp_rest", 1, None)]
        else:
            expected += [(f"L{i}.mlp", "mlp", i, None)]
    expected += [("unembedding bias", "bias", None, None), ("final norm bias", "bias", None, None)]
    assert [(t.name, t.kind, t.layer, t.index) for t in attribution.terms] == expected
    assert len(set(neurons)) == 2 and all(0 <= n < 64 for n in neurons)
    assert attribution.position == 5 and attribution.model_name == "PhiForCausalLM"
    assert attribution.grid().source == "PhiForCausalLM"


def test_ten_neurons_by_default(llama):
    """``top_neurons`` defaults to 10: ten neuron terms and the rest in the chosen layer."""
    attribution = logit_attribution(llama, IDS, neurons=[0])
    assert [t.kind for t in attribution.terms if t.layer == 0].count("neuron") == 10


@pytest.mark.parametrize(("family", "name"), [("granite", "GraniteForCausalLM"), ("olmo", "OlmoForCausalLM")])
def test_the_terms_add_up_to_the_models_own_logit(family, name):
    """Granite divides its logits by ``logits_scaling`` (2.5); OLMo's final LayerNorm has no
    parameters at all. Either way the terms add up to the logit the model outputs."""
    model = tiny_model(family)
    attribution = logit_attribution(model, IDS, position=4, target=11)
    expected = model_logit(model, 4, 11)
    assert abs(attribution.logit - expected) <= tolerance([expected])
    assert abs(attribution.total - expected) <= tolerance([t.value for t in attribution.terms])
    assert attribution.model_name == name


def test_a_soft_capped_logit_is_attributed_before_the_cap():
    """Gemma 2 with a cap of 0.02 (its logits are near 0.1): the logit is the one the model outputs with the cap switched off,
    the capped logit the one it outputs with it, and the terms add up to the former."""
    model = tiny_model("gemma2", final_logit_softcapping=0.02)
    attribution = logit_attribution(model, IDS, target=11, contrast=12)
    with torch.no_grad():
        capped = model(IDS).logits[0, -1]
        model.config.final_logit_softcapping = None
        uncapped = model(IDS).logits[0, -1]
    expected = float(uncapped[11] - uncapped[12])
    assert abs(expected - float(capped[11] - capped[12])) > 1e-2
    assert abs(attribution.logit - expected) <= tolerance([float(uncapped[11]), float(uncapped[12])])
    assert abs(attribution.total - expected) <= tolerance([t.value for t in attribution.terms])
    assert attribution.capped_logit == pytest.approx(float(capped[11] - capped[12]), abs=1e-6)
    assert attribution.summary()["pre_softcap"] is True


def test_a_projection_after_the_final_norm_has_its_bias_as_a_term():
    """OPT with ``word_embed_proj_dim`` 16 decodes ``W_U (P · LN(x) + b)``: the bias ``b`` of the
    projection ``P`` is the term ``final bias 1`` worth ``W_U[t] · b``, and the terms add up."""
    model = tiny_model("opt", word_embed_proj_dim=16)
    project_out = model.model.decoder.project_out
    torch.manual_seed(1)
    project_out.bias = nn.Parameter(0.5 * torch.randn(16))
    attribution = logit_attribution(model, IDS, target=11)
    bias = next(t for t in attribution.terms if t.name == "final bias 1")
    expected = float(model.lm_head.weight[11].detach().double() @ project_out.bias.detach().double())
    assert (bias.kind, bias.layer, bias.index) == ("bias", None, None) and abs(expected) > 1e-2
    assert abs(bias.value - expected) <= tolerance([expected])
    assert [t.name for t in attribution.terms[-2:]] == ["final bias 1", "final norm bias"]
    logit = model_logit(model, -1, 11)
    assert abs(attribution.total - logit) <= tolerance([t.value for t in attribution.terms])


class WeightOnlyHead(nn.Module):
    """An unembedding with a weight and no ``bias`` attribute at all."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.detach().clone())

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden @ self.weight.T


def test_a_norm_after_a_projection_is_frozen_where_the_projection_puts_it(llama):
    """Decoding ``x ↦ W_U LN(W x + b) / 2.5`` with a parameterless LayerNorm: ``u · x`` plus the
    constants is the decoded logit difference, and the bias term is ``w · (b − mean b) / σ(W x + b) / 2.5``."""
    torch.manual_seed(2)
    linear = nn.Linear(32, 32)
    with torch.no_grad():
        linear.bias.normal_()
    unembedding = WeightOnlyHead(llama.lm_head.weight)
    parts = replace(
        find_parts(llama), final_norm=(linear, OlmoLayerNorm(32)), unembedding=unembedding, logit_divisor=2.5
    )
    x = torch.randn(32)
    weights = torch.zeros(320, dtype=torch.float64)
    weights[7], weights[11] = 1.0, -1.0
    u, constants = _decoder_covector(parts, x, weights)
    with torch.no_grad():
        decoded = parts.decode(x[None])[0].double() @ weights
        s = linear(x).double()
    w = weights @ unembedding.weight.detach().double()
    sigma = math.sqrt(float(s.var(unbiased=False)) + 1e-5)
    bias = linear.bias.detach().double()
    expected_bias = float(w @ (bias - bias.mean())) / sigma / 2.5
    assert [(t.name, t.kind) for t in constants] == [("final norm bias", "bias"), ("final bias 0", "bias")]
    assert constants[0].value == 0.0
    assert abs(constants[1].value - expected_bias) <= tolerance([expected_bias])
    total = float(u @ x.double()) + sum(t.value for t in constants)
    assert abs(total - float(decoded)) <= tolerance([float(u.abs() @ x.double().abs()), expected_bias])


def _rule(monkeypatch: pytest.MonkeyPatch, family: str, **fields: object) -> None:
    monkeypatch.setitem(architecture.FAMILY_RULES, family, architecture.FamilyRule(**fields))


def test_attention_without_an_output_projection_is_one_term_per_layer(llama, monkeypatch):
    """With no output projection to split, each layer's attention is one term ``L{i}.attn``,
    worth what its heads and bias add up to when they are split, and a note says so."""
    split = logit_attribution(llama, IDS, target=9)
    _rule(monkeypatch, "llama", heads="")
    whole = logit_attribution(llama, IDS, target=9)
    attention = [t for t in whole.terms if t.kind == "attn"]
    assert [(t.name, t.layer, t.index) for t in attention] == [(f"L{i}.attn", i, None) for i in range(3)]
    for i, term in enumerate(attention):
        parts = [t.value for t in split.terms if t.layer == i and t.kind in ("head", "attn_bias")]
        assert abs(term.value - sum(parts)) <= tolerance(parts)
    assert whole.notes == [
        f"layer {i}: attention attributed as a whole (its heads could not be split)" for i in range(3)
    ]


@pytest.mark.parametrize("heads", [0, 3])
def test_a_head_count_that_does_not_divide_the_projection_leaves_attention_whole(llama, monkeypatch, heads):
    """No head count (0), or 3 heads for a 32-wide projection input: attention is not split."""
    monkeypatch.setattr(llama.config, "probe_heads", heads, raising=False)
    _rule(monkeypatch, "llama", num_heads="probe_heads")
    attribution = logit_attribution(llama, IDS, target=9)
    assert attribution.num_heads == heads
    assert [t.name for t in attribution.terms if t.kind in ("head", "attn", "attn_bias")] == [
        "L0.attn",
        "L1.attn",
        "L2.attn",
    ]
    assert len(attribution.notes) == 3


def test_an_mlp_whose_projection_is_only_part_of_it_is_not_split(monkeypatch):
    """Qwen2-MoE's shared expert is only part of its MLP: its neurons do not add up to the branch,
    so the MLP stays one term (worth the same as without neurons) and a note says so."""
    model = tiny_model("qwen2_moe", shared_expert_intermediate_size=16)
    plain = logit_attribution(model, IDS, target=9)
    _rule(monkeypatch, "qwen2_moe", neurons="mlp.shared_expert.down_proj")
    attribution = logit_attribution(model, IDS, target=9, neurons=[1], top_neurons=2)
    assert [(t.name, t.kind) for t in attribution.terms if t.layer == 1][-1] == ("L1.mlp", "mlp")
    assert not any(t.kind in ("neuron", "mlp_rest") for t in attribution.terms)
    assert attribution.notes == ["layer 1: the MLP could not be split into neurons (a mixture of experts?)"]
    assert next(t.value for t in attribution.terms if t.name == "L1.mlp") == next(
        t.value for t in plain.terms if t.name == "L1.mlp"
    )


def test_the_moe_fallback_term_is_named_for_its_layer():
    """Mixtral's MLPs cannot be split: the chosen layer keeps its one term ``L1.mlp``."""
    attribution = logit_attribution(tiny_model("mixtral"), IDS, neurons=[1])
    assert [t.name for t in attribution.terms if t.kind == "mlp"] == ["L0.mlp", "L1.mlp", "L2.mlp"]


def _inputs_at_5(model: nn.Module, watched: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """The inputs ``[d]`` of the ``watched`` modules at position 5 in one clean forward pass."""
    inputs: dict[str, torch.Tensor] = {}
    handles = [
        module.register_forward_pre_hook(lambda _m, args, key=key: inputs.__setitem__(key, args[0][0, 5].detach()))
        for key, module in watched.items()
    ]
    with torch.no_grad():
        model(IDS)
    for handle in handles:
        handle.remove()
    return inputs


def test_neurons_before_a_sandwich_norm_see_its_scale_at_the_branch_with_its_bias():
    """Gemma 2 with a bias ``b = W a / 2`` on layer 1's down projection (at position 5 the branch
    is ``s = 3/2 · W a``): neuron ``n`` is worth ``Σ_d w_d r_d q_d W[d, n] a_n``, where ``r = N_f(x) / x``
    and ``q = N_post(s) / s`` are the final and sandwich norms frozen at their clean inputs.

    Each factor carries a float32 relative error of a few ε, so we allow 64 ε of the sum of the
    absolute products."""
    model = tiny_model("gemma2")
    layer = model.model.layers[1]
    down = layer.mlp.down_proj
    a = _inputs_at_5(model, {"down": down})["down"]
    with torch.no_grad():
        down.bias = nn.Parameter(down(a) / 2)
    inputs = _inputs_at_5(model, {"final": model.model.norm, "post": layer.post_feedforward_layernorm})
    attribution = logit_attribution(model, IDS, position=5, target=11, neurons=[1], top_neurons=3)
    with torch.no_grad():
        x, s = inputs["final"], inputs["post"]
        r = (model.model.norm(x[None])[0] / x).double()
        q = (layer.post_feedforward_layernorm(s[None])[0] / s).double()
        covector = model.lm_head.weight[11].double() * r * q
        scores = (down.weight.double().T @ covector) * a.double()
        sizes = (down.weight.double().abs().T @ covector.abs()) * a.double().abs()
    neurons = [t for t in attribution.terms if t.kind == "neuron"]
    assert len(neurons) == 3
    for term in neurons:
        expected = float(scores[term.index])
        assert abs(term.value - expected) <= 64 * EPS32 * float(sizes[term.index]), (term.name, term.value, expected)


# --- frozen norms ---------------------------------------------------------------------------------


class ProbeRMSNorm(nn.Module):
    """``x ↦ g ⊙ x / √(mean x² + ε)`` in float64, with ε stored under ``attribute`` (or nowhere)."""

    def __init__(self, gain: torch.Tensor, eps: float, attribute: str | None) -> None:
        super().__init__()
        self.weight = nn.Parameter(gain.double())
        self.hidden_eps = eps
        if attribute is not None:
            setattr(self, attribute, eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.hidden_eps)


GAIN = torch.tensor([0.5, -0.25, 0.75, 0.4, -0.6, 0.3])
X = torch.tensor([1.0, -2.0, 0.5, 3.0, -1.5, 2.5], dtype=torch.float64)


@pytest.mark.parametrize("attribute", ["eps", "variance_epsilon", "epsilon", None])
def test_a_frozen_rmsnorm_has_its_own_gain_and_scale(attribute):
    """With ε = 0.5 under any of its usual names the frozen norm's γ is the module's gain (hidden,
    ε is taken as 0 and γ is the gain over √(1 + ε)); ``γ · scale`` is ``g / √(mean x² + ε)``
    either way, and gains below 1 do not make it centre."""
    frozen = freeze_norm(ProbeRMSNorm(GAIN, 0.5, attribute), X)
    gamma = GAIN.double() if attribute else GAIN.double() / math.sqrt(1.5)
    torch.testing.assert_close(frozen.gamma, gamma, rtol=1e-12, atol=1e-12)
    rms = math.sqrt(float(X.pow(2).mean()) + 0.5)
    torch.testing.assert_close(frozen.gamma * frozen.scale, GAIN.double() / rms, rtol=1e-12, atol=1e-12)
    assert frozen.centre is False and float(frozen.beta.abs().max()) == 0.0


def test_a_layernorm_of_float32_is_frozen_at_a_float64_state():
    """A float32 LayerNorm frozen at a float64 ``x``: γ and β are its weight and bias, it centres,
    and its scale is ``1 / √(var x + ε)``."""
    norm = nn.LayerNorm(6, eps=0.25)
    with torch.no_grad():
        norm.weight.copy_(GAIN)
        norm.bias.copy_(torch.arange(6.0) / 8)
    frozen = freeze_norm(norm, X)
    torch.testing.assert_close(frozen.gamma, GAIN.double(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(frozen.beta, torch.arange(6.0, dtype=torch.float64) / 8, rtol=0, atol=1e-6)
    assert frozen.centre is True
    assert float(frozen.scale) == pytest.approx(1 / math.sqrt(float(X.var(unbiased=False)) + 0.25), rel=1e-5)


def test_a_parameterless_layernorm_is_frozen():
    """OLMo's LayerNorm has neither parameters nor an ε attribute (its ε is 1e-5): γ is
    ``1/√(1 + 1e-5)`` per unit, and ``γ · scale = 1 / √(var x + 1e-5)``."""
    frozen = freeze_norm(OlmoLayerNorm(6), X)
    torch.testing.assert_close(
        frozen.gamma, torch.full((6,), (1 + 1e-5) ** -0.5, dtype=torch.float64), rtol=1e-6, atol=0
    )
    product = float(frozen.gamma[0] * frozen.scale)
    assert product == pytest.approx(1 / math.sqrt(float(X.var(unbiased=False)) + 1e-5), rel=1e-6)


def test_the_frozen_linear_part_centres_each_row():
    """``[n, d]`` pieces are centred row by row: ``γ ⊙ (c − mean c) · s`` for each row."""
    frozen = LinearNorm(torch.tensor([1.0, 2.0, 1.0, 2.0]), torch.zeros(4), True, torch.tensor(0.5))
    c = torch.tensor([[1.0, 2.0, 3.0, 6.0], [0.0, 0.0, 0.0, 4.0], [2.0, 2.0, 2.0, 2.0]])
    expected = torch.tensor([[-1.0, -1.0, 0.0, 3.0], [-0.5, -1.0, -0.5, 3.0], [0.0, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(frozen.linear(c), expected, rtol=0, atol=0)


def test_an_odd_width_is_refused_by_name():
    """The alternating ±1 probe needs an even width: a 5-wide RMSNorm is refused, naming its class."""
    message = (
        "ProbeRMSNorm is not a LayerNorm or RMSNorm that can be linearised with a frozen scale, "
        "so its logit cannot be attributed"
    )
    with pytest.raises(AttributionError, match=f"^{re.escape(message)}$"):
        freeze_norm(ProbeRMSNorm(GAIN[:5], 0.0, "eps"), X[:5])


class DefectAtX(nn.Module):
    """The identity, except that at ``x`` it adds ``defect`` to unit 1 (where ``x`` is 0)."""

    def __init__(self, x: torch.Tensor, defect: float) -> None:
        super().__init__()
        self.x, self.defect = x, defect

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        out = v.clone()
        if torch.equal(v[0], self.x):
            out[0, 1] += self.defect
        return out


def test_a_norm_is_accepted_up_to_a_misfit_of_1e_4_of_its_largest_output():
    """At ``x = (2, 0, 1, −1)`` the fit is exact but for unit 1, so the misfit is the defect and the
    largest output is 2: a defect of exactly ``1e-4 · (1 + 2)`` is accepted, one of 3.5e-4 refused."""
    x = torch.tensor([2.0, 0.0, 1.0, -1.0], dtype=torch.float64)
    limit = 1e-4 * (1 + 2.0)
    frozen = freeze_norm(DefectAtX(x, limit), x)
    assert float(frozen.scale) == 1.0 and frozen.centre is False
    with pytest.raises(AttributionError, match="DefectAtX is not a LayerNorm or RMSNorm"):
        freeze_norm(DefectAtX(x, 3.5e-4), x)


def test_pieces_are_kept_when_they_add_up_to_the_branch_within_1e_4():
    """Pieces plus bias off the branch by exactly ``1e-4 · (1 + 2)`` (its largest value is 2) are
    kept; off by 3.5e-4 they are not."""
    whole, pieces = torch.tensor([0.0, 2.0], dtype=torch.float64), torch.tensor([[0.0, 2.0]], dtype=torch.float64)
    kept = _split(pieces, torch.tensor([1e-4 * (1 + 2.0), 0.0], dtype=torch.float64), None, whole)
    assert kept is not None and torch.equal(kept[0], pieces)
    assert _split(pieces, torch.tensor([3.5e-4, 0.0], dtype=torch.float64), None, whole) is None


def test_pieces_through_a_layernorm_carry_its_bias_in_the_bias_term():
    """Through a LayerNorm frozen at ``s = Σ pieces + b`` each piece becomes ``γ ⊙ (p − mean p) / σ(s)``
    and the bias ``γ ⊙ (b − mean b) / σ(s) + β``: together the norm's output."""
    torch.manual_seed(4)
    norm = nn.LayerNorm(6)
    with torch.no_grad():
        norm.weight.copy_(GAIN)
        norm.bias.copy_(torch.tensor([0.5, -1.0, 0.25, 2.0, -0.75, 1.0]))
    pieces, bias = torch.randn(3, 6, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    s = pieces.sum(0) + bias
    with torch.no_grad():
        whole = norm(s.float()[None])[0].double()
    split = _split(pieces, bias, norm, whole)
    assert split is not None
    sigma = math.sqrt(float(s.var(unbiased=False)) + norm.eps)
    gamma, beta = GAIN.double(), norm.bias.detach().double()
    torch.testing.assert_close(split[0], gamma * (pieces - pieces.mean(-1, keepdim=True)) / sigma, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(split[1], gamma * (bias - bias.mean()) / sigma + beta, rtol=1e-5, atol=1e-6)
