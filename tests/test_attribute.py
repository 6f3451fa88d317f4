"""The attribute lens: exact Jacobians, an LRE that reproduces its own subject, relation data."""

import json

import pytest
import torch
from tiny_models import tiny_model

from depthlens import Readout, find_parts
from depthlens.analysis.trajectory import Trajectory
from depthlens.errors import LayerError, LensFileError, RelationError
from depthlens.lenses.attribute import AttributeLens, faithfulness, fit_attribute_lens, subject_jacobians
from depthlens.model.hooks import hooked, replace
from depthlens.text.relations import (
    BUILTIN_RELATIONS,
    Relation,
    load_relation,
    object_token,
    relation_from_json,
    subject_position,
)

RELATION = Relation(
    "fox",
    ("The fox of {} is",),
    (("quick", "brown"), ("lazy", "dog"), ("fair", "foul"), ("thunder", "rain"), ("question", "be")),
)


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma2", "bloom", "opt", "gpt_neox"])
def test_the_jacobian_matches_autograd_on_the_full_prompt(family, tiny_tokenizer):
    model = tiny_model(family)
    parts = find_parts(model)
    text = RELATION.prompt("lazy", [("quick", "brown")])
    ids = tiny_tokenizer(text, return_tensors="pt").input_ids
    at = subject_position(tiny_tokenizer, text, "lazy")
    found = subject_jacobians(model, ids, at, parts=parts, rows_per_pass=13)
    last = parts.num_layers
    for layer in (0, 2):

        def final_state(h: torch.Tensor, layer: int = layer) -> torch.Tensor:
            with hooked(
                parts, read=[f"resid.{last}"], edits=[replace(f"resid.{layer}", h[None, None], positions=[at])]
            ) as v:
                model(input_ids=ids, use_cache=False)
            return v[f"resid.{last}"][0, -1]

        expected = torch.autograd.functional.jacobian(final_state, found.states[layer])
        torch.testing.assert_close(found.jacobian[layer], expected, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(final_state(found.states[layer]).detach(), found.z, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt2"])
def test_an_lre_from_one_subject_reproduces_it_at_every_layer(family, tiny_tokenizer):
    model = tiny_model(family)
    lens = fit_attribute_lens(model, tiny_tokenizer, RELATION, [("lazy", "dog")])
    assert isinstance(lens, Readout) and lens.kind == "attribute"
    score = faithfulness(lens, model, tiny_tokenizer, RELATION, [("lazy", "dog")])
    assert score.agreement == [1.0] * (lens.num_layers + 1)
    assert len(score.to_rows()) == lens.num_layers + 1
    # ... and it reads the state: a move δ of the input moves the output by β W δ (a lens that is
    # only its bias would agree above, since its bias is the subject's final state minus W h_s).
    delta = torch.randn(32, generator=torch.Generator().manual_seed(0))
    moved = lens.transform(delta, 0) - lens.transform(torch.zeros(32), 0)
    torch.testing.assert_close(moved, lens.weight[0] @ delta, atol=1e-4, rtol=1e-4)
    assert float((lens.weight[0] @ delta).abs().max()) > 1e-2


def test_the_lens_is_a_readout_with_beta_and_low_rank(llama, tiny_tokenizer):
    train = [("quick", "brown"), ("lazy", "dog")]
    lens = fit_attribute_lens(llama, tiny_tokenizer, RELATION, train, beta=2.0)
    h = torch.randn(2, 5, 32)
    expected = 2.0 * h @ lens.weight[1].T + lens.bias[1]
    torch.testing.assert_close(lens.transform(h, 1), expected)
    torch.testing.assert_close(lens.with_beta(0.0).transform(h, 1), lens.bias[1].expand(2, 5, 32))
    low = lens.low_rank(3)
    assert int(torch.linalg.matrix_rank(low.weight[0])) <= 3
    for layer in range(4):  # Eckart–Young: the best rank-3 approximation leaves exactly the other singular values
        sigma = torch.linalg.svdvals(lens.weight[layer].double())
        residual = (lens.weight[layer] - low.weight[layer]).double()
        assert float(residual.square().sum()) == pytest.approx(float(sigma[3:].square().sum()), rel=1e-4)
        assert float((residual * low.weight[layer].double()).sum()) == pytest.approx(0, abs=1e-4 * float(sigma[0]) ** 2)
    torch.testing.assert_close(low.transform(h, 1), 2.0 * h @ low.weight[1].T + lens.bias[1])
    trajectory = Trajectory.from_text(llama, tiny_tokenizer, lens, "The fox of fair is")
    assert trajectory.lens_kind == "attribute" and trajectory.layers == (0, 1, 2, 3)
    held = faithfulness(lens, llama, tiny_tokenizer, RELATION, [("fair", "foul"), ("thunder", "rain")])
    assert held.subjects == ["fair", "thunder"]  # (its values: test_oracle_attribute.py, by hand)
    with pytest.raises(LayerError):
        lens.transform(h, 4)


def test_save_and_load(llama, tiny_tokenizer, tmp_path):
    lens = fit_attribute_lens(llama, tiny_tokenizer, RELATION, [("quick", "brown")], beta=1.5)
    lens.save_pretrained(tmp_path / "lens")
    again = AttributeLens.from_pretrained(tmp_path / "lens", llama)
    assert again.beta == 1.5 and again.relation == "fox"
    torch.testing.assert_close(again.weight, lens.weight)
    with pytest.raises(LensFileError, match="made for"):
        AttributeLens.from_pretrained(tmp_path / "lens", tiny_model("llama", seed=5))


def test_relation_files(tmp_path):
    path = tmp_path / "r.json"
    path.write_text(json.dumps(RELATION.to_json()))
    assert load_relation(path) == RELATION
    bad = {"templates": ["no placeholder"], "pairs": [["a", "b"]]}
    for document, message in (
        (bad, "exactly one"),
        ({"templates": ["{} is"], "pairs": [["a"]]}, "pairs"),
        ([1, 2], "JSON object"),
        ({"templates": ["{} is"], "pairs": []}, "no subject"),
    ):
        with pytest.raises(RelationError, match=message):
            relation_from_json(document)
    path.write_text("{not json")
    with pytest.raises(RelationError, match="cannot read"):
        load_relation(path)
    with pytest.raises(RelationError, match="neither a built-in"):
        load_relation(tmp_path / "missing.json")


def test_too_few_examples_and_a_missing_subject(llama, tiny_tokenizer):
    small = Relation("one", ("{} is",), (("quick", "brown"),))
    with pytest.raises(RelationError, match="1 subject–object pairs but 2 are needed"):
        fit_attribute_lens(llama, tiny_tokenizer, small, small.pairs)
    with pytest.raises(RelationError, match="are needed"):
        RELATION.split(5)
    with pytest.raises(RelationError, match="does not occur in the prompt"):
        subject_position(tiny_tokenizer, "The fox of lazy is", "quick")


def test_subject_positions_and_object_tokens(tiny_tokenizer):
    text = "The fox of thunder is"
    at = subject_position(tiny_tokenizer, text, "thunder")
    ids = tiny_tokenizer(text).input_ids
    assert tiny_tokenizer.decode(ids[: at + 1]).endswith("thunder")
    assert object_token(tiny_tokenizer, "rain") == tiny_tokenizer(" rain", add_special_tokens=False).input_ids[0]


@pytest.mark.parametrize("name", list(BUILTIN_RELATIONS))
def test_builtin_relations(name):
    pytest.importorskip("countryinfo")
    pytest.importorskip("country_capitals")
    relation = load_relation(name)
    assert len(relation.pairs) >= 150
    assert relation.prompt("France").count("France") == 1
    train, held = relation.split(8)
    assert len(train) == 8 and len(held) == len(relation.pairs) - 8
    if name == "country-capital":
        assert ("France", "Paris") in relation.pairs and len(relation.pairs) == 193


def test_the_command_scores_faithfulness_and_saves_the_lens(tiny_model_dir, tmp_path, capsys):
    from depthlens.apps.cli import main

    relation = tmp_path / "fox.json"
    relation.write_text(json.dumps(RELATION.to_json()))
    out = tmp_path / "out"
    assert (
        main(
            [
                "attribute",
                "--model",
                str(tiny_model_dir),
                "--relation",
                str(relation),
                "--train",
                "2",
                "--context",
                "1",
                "--score-beta",
                "1",
                "--score-beta",
                "2",
                "--save-lens",
                "--text",
                "The fox of lazy is",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    rows = json.loads((out / "faithfulness.json").read_text())
    assert {r["beta"] for r in rows} == {1.0, 2.0} and len(rows) == 2 * 4
    from depthlens.model.load import load_model

    model, tokenizer = load_model(str(tiny_model_dir))
    saved = AttributeLens.from_pretrained(out / "lens-fox", model)
    held = RELATION.split(2)[1]
    for beta in (1.0, 2.0):
        expected = faithfulness(saved.with_beta(beta), model, tokenizer, RELATION, held).agreement
        assert [r["faithfulness"] for r in rows if r["beta"] == beta] == expected
    assert (out / "faithfulness.png").exists() and (out / "lens-fox" / "config.json").exists()
    assert (out / "trajectory-fox.html").exists()
    assert main(["attribute", "--model", str(tiny_model_dir), "--relation", str(relation), "--train", "5"]) == 2
    assert "are needed" in capsys.readouterr().err
