"""Direct logit attribution: the parts add up to the model's (pre-soft-cap) logit on many families."""

import numpy as np
import pytest
import torch
from tiny_models import tiny_model

from depthlens import find_parts
from depthlens.analysis.dla import logit_attribution
from depthlens.analysis.dla_model import freeze_norm
from depthlens.errors import AttributionError
from depthlens.stats.grid import Grid
from depthlens.viz.readout_charts import dla_bars

IDS = torch.tensor([[5, 17, 42, 8, 99, 3, 61, 7]])
FAMILIES = [
    "llama",
    "gpt2",
    "gemma2",
    "opt",
    "gpt_neox",
    "mixtral",
    "phi",
    "bloom",
    "olmo2",
    "gptj",
    "qwen2",
    "falcon",
    "gpt_neo",
    "gemma3_text",
    "qwen3_moe",
    "mpt",
    "cohere",
]


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


@pytest.mark.parametrize("family", FAMILIES)
def test_the_parts_add_up_to_the_logit(family):
    model = tiny_model(family)
    parts = find_parts(model)
    attribution = logit_attribution(model, IDS, position=-2, neurons=[0], top_neurons=3)
    assert abs(attribution.total - attribution.logit) < 1e-4
    difference = logit_attribution(model, IDS, target=3, contrast=9)
    assert abs(difference.total - difference.logit) < 1e-4
    with torch.no_grad():
        logits = model(IDS).logits[0, -1].double()
    if parts.logit_softcap is None:
        assert abs(difference.logit - float(logits[3] - logits[9])) < 1e-4
    else:
        c = parts.logit_softcap
        assert any("soft-caps" in note for note in difference.notes) and difference.softcap == c
        assert abs(attribution.capped_logit - float(c * np.tanh(attribution.logit / c))) < 1e-4


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma2", "opt", "gpt_neox", "bloom", "olmo2", "phi"])
def test_attention_is_split_into_heads(family):
    model = tiny_model(family)
    attribution = logit_attribution(model, IDS)
    heads = [t for t in attribution.terms if t.kind == "head"]
    assert len(heads) == 3 * attribution.num_heads == 12
    assert not any("attention attributed as a whole" in note for note in attribution.notes)


def test_a_mixture_of_experts_mlp_is_one_term():
    attribution = logit_attribution(tiny_model("mixtral"), IDS, neurons=[1])
    assert [t.kind for t in attribution.terms if t.layer == 1 and t.kind.startswith("mlp")] == ["mlp"]
    assert attribution.notes == ["layer 1: the MLP could not be split into neurons (a mixture of experts?)"]


def test_neurons_and_the_rest_make_up_the_mlp(llama):
    whole = logit_attribution(llama, IDS)
    split = logit_attribution(llama, IDS, neurons=[1], top_neurons=4)
    mlp = next(t.value for t in whole.terms if t.name == "L1.mlp")
    parts = [t for t in split.terms if t.layer == 1 and t.kind in ("neuron", "mlp_rest")]
    assert len(parts) == 5 and abs(sum(t.value for t in parts) - mlp) < 1e-6
    neurons = [abs(t.value) for t in parts if t.kind == "neuron"]
    assert neurons == sorted(neurons, reverse=True)


def test_biases_are_terms_of_their_own():
    model = tiny_model("phi")
    attribution = logit_attribution(model, IDS)
    names = {t.name for t in attribution.terms}
    assert {"final norm bias", "unembedding bias", "embeddings", "L0.attn bias"} <= names
    # Phi decodes W_U · LayerNorm(x) + b_U: the constants are b_U[t] and W_U[t] · β, whatever x is.
    parts, target = find_parts(model), int(model(IDS).logits[0, -1].argmax())
    value = {t.name: t.value for t in attribution.terms}
    unembedding, beta = parts.unembedding, parts.final_norm[0].bias.detach().double()
    assert value["unembedding bias"] == pytest.approx(float(unembedding.bias[target]), abs=1e-6)
    assert value["final norm bias"] == pytest.approx(float(unembedding.weight[target].double() @ beta), abs=1e-6)
    assert abs(value["final norm bias"]) > 1e-3 and abs(value["unembedding bias"]) > 1e-3


def test_the_final_norm_is_linearised_exactly():
    torch.manual_seed(0)
    x = torch.randn(32)
    for norm in (torch.nn.LayerNorm(32), find_parts(tiny_model("gemma2")).final_norm[0]):
        with torch.no_grad():
            if isinstance(norm, torch.nn.LayerNorm):
                norm.weight.normal_()
                norm.bias.normal_()
            frozen = freeze_norm(norm, x)
            torch.testing.assert_close(
                frozen.linear(x.double()) + frozen.beta, norm(x[None])[0].double(), atol=1e-5, rtol=1e-5
            )


def test_a_final_norm_without_a_gain_is_decoded(llama):
    """``LayerNorm(elementwise_affine=False)`` keeps ``weight = None``: the attribution's decoder
    covector still reproduces the decoded logit, ``u · x + constants = W_U[t] · LN(x)``."""
    from dataclasses import replace

    from depthlens.analysis.dla import _decoder_covector

    parts = replace(find_parts(llama), final_norm=(torch.nn.LayerNorm(32, elementwise_affine=False),))
    x = torch.randn(32, generator=torch.Generator().manual_seed(5))
    weights = torch.zeros(parts.vocab_size, dtype=torch.float64)
    weights[9] = 1.0
    u, constants = _decoder_covector(parts, x, weights)
    with torch.no_grad():
        decoded = float(parts.decode(x[None])[0, 9])
    total = float(u @ x.double()) + sum(term.value for term in constants)
    # float32 decoding of 32 products of size ≤ max |W_U| · max |LN(x)|
    assert abs(total - decoded) <= 64 * 1.2e-7 * float(u.abs() @ x.double().abs() + 1)

def test_pictures(llama):
    attribution = logit_attribution(llama, IDS, target=3)
    grid = attribution.grid()
    assert isinstance(grid, Grid) and grid.shape == (3, 4 + 2)
    assert (
        abs(
            np.nansum(grid.values)
            + sum(attribution.layer_totals()["embeddings"] + attribution.layer_totals()["other"])
            - attribution.total
        )
        < 1e-6
    )
    assert len(dla_bars(attribution).data) == 3
    assert dla_bars(attribution, "matplotlib").axes


def test_bad_input_gives_one_clear_error(llama, tiny_tokenizer):
    with pytest.raises(AttributionError, match="outside the text"):
        logit_attribution(llama, IDS, position=8)
    with pytest.raises(AttributionError, match="not one"):
        logit_attribution(llama, IDS, tokenizer=tiny_tokenizer, target="thunderous lightning")
    with pytest.raises(AttributionError, match="outside the vocabulary"):
        logit_attribution(llama, IDS, target=10_000)
    with pytest.raises(AttributionError, match="do not exist"):
        logit_attribution(llama, IDS, neurons=[3])


def test_a_token_given_as_text(llama, tiny_tokenizer):
    token = tiny_tokenizer(" the", add_special_tokens=False).input_ids
    assert len(token) == 1
    by_text = logit_attribution(llama, IDS, tokenizer=tiny_tokenizer, target=" the")
    by_id = logit_attribution(llama, IDS, target=f"#{token[0]}")
    assert by_text.logit == by_id.logit and "' the'" in by_text.target


def test_the_command_writes_json_csv_and_pictures(tiny_model_dir, tmp_path, capsys):
    import json

    from depthlens.apps.cli import main

    assert (
        main(
            [
                "dla",
                "Fair is foul, and foul is",
                "--model",
                str(tiny_model_dir),
                "--target",
                " is",
                "--neurons",
                "1",
                "--top-neurons",
                "2",
                "--out",
                str(tmp_path),
            ]
        )
        == 0
    )
    document = json.loads((tmp_path / "dla.json").read_text())
    assert abs(document["logit"] - document["sum_of_terms"]) < 1e-4
    from depthlens.model.load import load_model

    # The terms are checked in test_dla_oracle.py; here, that the command writes the library's for its inputs.
    model, tokenizer = load_model(str(tiny_model_dir))
    ids = tokenizer("Fair is foul, and foul is", return_tensors="pt").input_ids
    expected = logit_attribution(model, ids, tokenizer=tokenizer, target=" is", neurons=[1], top_neurons=2)
    assert document["terms"] == expected.to_rows() and document["logit"] == expected.logit
    assert len([t for t in expected.terms if t.kind == "neuron"]) == 2
    assert {"dla-heads.png", "dla-heads.html", "dla-layers.png", "dla-layers.html", "dla-terms.csv"} <= {
        p.name for p in tmp_path.iterdir()
    }
    assert main(["dla", "Fair", "--model", str(tiny_model_dir), "--target", "thunderous lightning"]) == 2
    assert "not one" in capsys.readouterr().err
