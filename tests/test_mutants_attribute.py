"""The attribute lens against known answers: the fitted LRE as the mean of per-prompt Jacobians of
literal prompts, Jacobians at every subject position against autograd on the full prompt, the
batching of output rows, the lens file's fields and refusals, and the exact error messages."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from tiny_models import tiny_model

from depthlens import find_parts
from depthlens._version import __version__
from depthlens.errors import LensFileError, RelationError
from depthlens.lenses.attribute import (
    AttributeLens,
    Faithfulness,
    SubjectJacobians,
    fit_attribute_lens,
    subject_jacobians,
)
from depthlens.lenses.lens_file import fingerprint, write_lens_dir
from depthlens.model.hooks import hooked, replace
from depthlens.text.relations import Relation

RELATION = Relation(
    "fox",
    ("The fox of {} is",),
    (("quick", "brown"), ("lazy", "dog"), ("fair", "foul"), ("thunder", "rain"), ("question", "be")),
)
D = 32
LAYERS = 3
IDS = torch.tensor([[5, 17, 33, 80, 120, 7]])
"""Six arbitrary token ids of the 320-token vocabulary."""


@pytest.fixture(scope="module")
def llama() -> torch.nn.Module:
    return tiny_model("llama")


def _reference(model: torch.nn.Module, ids: torch.Tensor, at: int, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``∂z/∂h_layer`` and ``z`` by autograd through one uncached pass over the whole prompt, with
    the state at ``(layer, at)`` replaced by a variable."""
    parts = find_parts(model)

    def final_state(h: torch.Tensor) -> torch.Tensor:
        with hooked(parts, read=[f"resid.{LAYERS}"], edits=[replace(f"resid.{layer}", h[None, None], positions=[at])]) as v:
            model(input_ids=ids, use_cache=False)
        return v[f"resid.{LAYERS}"][0, -1]

    with hooked(parts, read=[f"resid.{layer}"]) as v:
        model(input_ids=ids, use_cache=False)
    h = v[f"resid.{layer}"][0, at].detach()
    return torch.autograd.functional.jacobian(final_state, h), final_state(h).detach()


def _assert_matches_reference(model: torch.nn.Module, found: SubjectJacobians, at: int) -> None:
    for layer in (0, 2):
        jacobian, z = _reference(model, IDS, at, layer)
        scale = float(jacobian.abs().max())  # float32 products over d = 32 terms: ~1e-6 of the largest entry
        torch.testing.assert_close(found.jacobian[layer], jacobian, atol=1e-5 * scale, rtol=0)
        torch.testing.assert_close(found.z, z, atol=1e-5 * float(z.abs().max()), rtol=0)


@pytest.mark.parametrize("at", [0, 1, 3])
def test_jacobians_at_every_subject_position_match_autograd_on_the_full_prompt(llama, at):
    """Subject at the first token (no cached prefix), the second (a one-token prefix), and mid-prompt
    with a three-token suffix, so z is read at the suffix's last position and not at its second;
    ``parts`` is left for the function to find."""
    found = subject_jacobians(llama, IDS, at, rows_per_pass=13)
    _assert_matches_reference(llama, found, at)


def test_a_model_whose_config_turns_the_cache_off_still_gets_the_prefix(tiny_tokenizer):
    """With ``use_cache=False`` in the config the prefix pass must still ask for its cache, or the
    suffix would run without the prompt's start and give another Jacobian."""
    model = tiny_model("llama", use_cache=False)
    found = subject_jacobians(model, IDS, 3)
    _assert_matches_reference(model, found, 3)


def test_the_jacobian_of_the_last_state_with_respect_to_itself_is_the_identity(llama):
    """With the subject at the last token, ``z = h_L`` there, so ``∂z/∂h_L = I`` exactly."""
    found = subject_jacobians(llama, IDS, IDS.shape[1] - 1)
    torch.testing.assert_close(found.jacobian[LAYERS], torch.eye(D), atol=0, rtol=0)
    torch.testing.assert_close(found.states[LAYERS], found.z, atol=0, rtol=0)


@pytest.mark.parametrize("at", [-1, 6])
def test_a_subject_outside_the_prompt_is_refused(llama, at):
    """Positions run 0 … 5 for six tokens; -1 and 6 are outside, and the message names both numbers."""
    with pytest.raises(RelationError, match=rf"^the subject position {at} is outside the prompt of 6 tokens$"):
        subject_jacobians(llama, IDS, at)


@pytest.mark.parametrize(
    ("rows_per_pass", "batches"),
    [(13, [13, 13, 6]), (31, [31, 1]), (32, [32]), (1, [1] * D)],
)
def test_output_rows_are_batched_rows_per_pass_at_a_time(llama, rows_per_pass, batches):
    """After one prefix pass of three tokens, the three-token suffix runs once per block of
    ``rows_per_pass`` output coordinates (32 = 13 + 13 + 6 …), and the blocks give the same Jacobian.
    The states agree to float32 rounding, not bit for bit: a CPU may pick another product kernel for
    another batch size (on an AMD Zen 4, 31 rows against 32 moved states by 3e-8 of ~0.1)."""
    shapes: list[tuple[int, int]] = []
    handle = llama.register_forward_pre_hook(
        lambda module, args, kwargs: shapes.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True
    )
    try:
        found = subject_jacobians(llama, IDS, 3, rows_per_pass=rows_per_pass)
    finally:
        handle.remove()
    assert shapes == [(1, 3)] + [(n, 3) for n in batches]
    whole = subject_jacobians(llama, IDS, 3, rows_per_pass=D)
    scale = float(whole.jacobian.abs().max())
    torch.testing.assert_close(found.jacobian, whole.jacobian, atol=1e-5 * scale, rtol=0)
    torch.testing.assert_close(found.states, whole.states, atol=1e-5 * float(whole.states.abs().max()), rtol=0)
    torch.testing.assert_close(found.z, whole.z, atol=1e-5 * float(whole.z.abs().max()), rtol=0)


# Each subject's prompt: the other training pairs, up to three (the default n_context), then the subject.
PROMPTS = {
    "quick": "The fox of lazy is dog\nThe fox of fair is foul\nThe fox of thunder is rain\nThe fox of quick is",
    "lazy": "The fox of quick is brown\nThe fox of fair is foul\nThe fox of thunder is rain\nThe fox of lazy is",
    "fair": "The fox of quick is brown\nThe fox of lazy is dog\nThe fox of thunder is rain\nThe fox of fair is",
    "thunder": "The fox of quick is brown\nThe fox of lazy is dog\nThe fox of fair is foul\nThe fox of thunder is",
    "question": "The fox of quick is brown\nThe fox of lazy is dog\nThe fox of fair is foul\nThe fox of question is",
}


def test_the_lre_is_the_mean_over_subjects_of_their_jacobians_and_offsets(llama, tiny_tokenizer):
    """``W = mean_s J_s`` and ``b = mean_s (z_s − J_s h_s)`` over the five prompts written out above
    (the subject is the second-to-last token of each); progress is reported as 1/5 … 5/5."""
    calls: list[tuple[int, int]] = []
    lens = fit_attribute_lens(llama, tiny_tokenizer, RELATION, RELATION.pairs, progress=lambda i, n: calls.append((i, n)))
    assert calls == [(1, 5), (2, 5), (3, 5), (4, 5), (5, 5)]
    assert lens.info == {"train": [list(p) for p in RELATION.pairs], "n_context": 3}
    found = []
    for text in PROMPTS.values():
        ids = tiny_tokenizer(text, return_tensors="pt").input_ids
        found.append(subject_jacobians(llama, ids, ids.shape[1] - 2))
    weight = torch.stack([f.jacobian for f in found]).mean(0)
    offsets = [f.z - (f.jacobian @ f.states[..., None])[..., 0] for f in found]
    bias = torch.stack(offsets).mean(0)
    torch.testing.assert_close(lens.weight, weight, atol=1e-5 * float(weight.abs().max()), rtol=0)
    torch.testing.assert_close(lens.bias, bias, atol=1e-5 * float(bias.abs().max()), rtol=0)


def test_fitting_with_a_rank_cuts_the_lre(llama, tiny_tokenizer):
    """``rank=1`` gives the full fit's ``low_rank(1)``: each ``W_l`` of rank one (``W_L`` is zero: the
    last layer's state at the subject cannot reach the last position), the rank recorded."""
    train = [("lazy", "dog")]
    full = fit_attribute_lens(llama, tiny_tokenizer, RELATION, train)
    cut = fit_attribute_lens(llama, tiny_tokenizer, RELATION, train, rank=1)
    assert cut.info["rank"] == 1
    torch.testing.assert_close(cut.weight, full.low_rank(1).weight, atol=0, rtol=0)
    assert [int(torch.linalg.matrix_rank(w)) for w in cut.weight] == [1, 1, 1, 0]
    assert int(torch.linalg.matrix_rank(full.weight[0])) > 1


def test_fitting_refuses_too_few_pairs_with_its_reason(llama, tiny_tokenizer):
    """One pair cannot give both a subject and an in-context example; no training pair cannot fit at all."""
    small = Relation("one", ("{} is",), (("quick", "brown"),))
    with pytest.raises(RelationError, match=re.escape("but 2 are needed (one to estimate with and one in context)")):
        fit_attribute_lens(llama, tiny_tokenizer, small, small.pairs)
    message = "relation 'fox': give at least one training pair to estimate the LRE from"
    with pytest.raises(RelationError, match=f"^{re.escape(message)}$"):
        fit_attribute_lens(llama, tiny_tokenizer, RELATION, [])


def _random_lre(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(LAYERS + 1, D, D, generator=generator), torch.randn(LAYERS + 1, D, generator=generator)


def test_a_lens_built_with_defaults_is_w_h_plus_b(llama):
    """Without ``beta`` the scale is 1 and the relation unnamed: ``W_l h + b_l`` in float64 by hand."""
    weight, bias = _random_lre(0)
    lens = AttributeLens(llama, weight, bias)
    assert lens.beta == 1.0 and lens.relation == "" and lens.info == {}
    h = torch.randn(3, D, generator=torch.Generator().manual_seed(1))
    expected = h.double() @ weight[2].double().T + bias[2].double()
    torch.testing.assert_close(lens.transform(h, 2).double(), expected, atol=1e-5 * float(expected.abs().max()), rtol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_transform_reads_any_float_dtype_and_returns_float32(llama, dtype):
    """A float64 or bfloat16 state is read as the float32 number it equals (bfloat16 → float32 is
    exact; float64 → float32 rounds the same way both times), so the result is that of the float32 state."""
    weight, bias = _random_lre(0)
    lens = AttributeLens(llama, weight, bias, beta=1.5)
    h = torch.randn(2, D, generator=torch.Generator().manual_seed(2)).to(dtype)
    out = lens.transform(h, 1)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, lens.transform(h.float(), 1), atol=0, rtol=0)


@pytest.mark.parametrize(
    ("weight_shape", "bias_shape"),
    [((4, 32, 31), (4, 32)), ((4, 32, 32), (3, 32)), ((3, 32, 32), (4, 31))],
)
def test_a_wrong_shape_is_refused_with_both_shapes(llama, weight_shape, bias_shape):
    """Either tensor of the wrong shape alone is refused; the message names what the model needs
    (``L + 1 = 4`` layers of width 32) and what was given."""
    message = f"an attribute lens for this model needs weight (4, 32, 32) and bias (4, 32), got {weight_shape} and {bias_shape}"
    with pytest.raises(LensFileError, match=f"^{re.escape(message)}$"):
        AttributeLens(llama, torch.zeros(weight_shape), torch.zeros(bias_shape))


def test_beta_and_rank_variants_keep_the_relation_and_info(llama):
    """``with_beta`` and ``low_rank`` change only β or W; the relation's name and info carry over,
    and ``low_rank`` adds the rank to the info."""
    weight, bias = _random_lre(0)
    lens = AttributeLens(llama, weight, bias, beta=2.0, relation="fox", info={"n_context": 3})
    other = lens.with_beta(0.5)
    assert (other.beta, other.relation, other.info) == (0.5, "fox", {"n_context": 3})
    low = lens.low_rank(3)
    assert (low.beta, low.relation, low.info) == (2.0, "fox", {"n_context": 3, "rank": 3})


def test_low_rank_accepts_ranks_one_to_d_and_keeps_the_largest_singular_values(llama):
    """For a diagonal ``W_l`` with distinct entries its SVD is known: rank 1 keeps the largest
    entry alone and rank 32 keeps all; 0 and 33 are refused with the allowed range."""
    values = torch.arange(D, 0, -1, dtype=torch.float32)  # 32, 31, …, 1 down the diagonal
    lens = AttributeLens(llama, torch.diag(values).expand(LAYERS + 1, D, D), torch.zeros(LAYERS + 1, D))
    one = torch.zeros(D, D)
    one[0, 0] = 32.0
    for layer in range(LAYERS + 1):
        torch.testing.assert_close(lens.low_rank(1).weight[layer], one, atol=1e-4, rtol=0)
        torch.testing.assert_close(lens.low_rank(D).weight[layer], torch.diag(values), atol=1e-4, rtol=0)
    for rank in (0, D + 1):
        with pytest.raises(RelationError, match=rf"^the rank must be between 1 and 32, got {rank}$"):
            lens.low_rank(rank)


def test_the_saved_config_names_the_kind_version_model_and_info(llama, tmp_path):
    """``config.json`` holds the kind under both keys the registry reads, the library version,
    β, the relation, its info and the model's name; loading gives back β, relation and info."""
    weight, bias = _random_lre(0)
    info = {"train": [["quick", "brown"]], "n_context": 1}
    lens = AttributeLens(llama, weight, bias, beta=1.5, relation="fox", info=info)
    lens.save_pretrained(tmp_path / "lens")
    config = json.loads((tmp_path / "lens" / "config.json").read_text())
    assert (config["kind"], config["lens_type"], config["library_version"]) == ("attribute", "attribute", __version__)
    assert (config["beta"], config["relation"], config["info"]) == (1.5, "fox", info)
    assert config["model"] == {"name_or_path": "LlamaForCausalLM", "fingerprint": fingerprint(find_parts(llama))}
    again = AttributeLens.from_pretrained(tmp_path / "lens", llama)
    assert (again.beta, again.relation, again.info) == (1.5, "fox", info)
    torch.testing.assert_close(again.bias, bias, atol=0, rtol=0)


def _write(directory: Path, config: dict[str, object], tensors: dict[str, torch.Tensor]) -> Path:
    return write_lens_dir(directory, config, tensors)


def test_a_config_with_either_kind_key_alone_loads_with_default_fields(llama, tmp_path):
    """Older files may hold only ``kind`` or only ``lens_type``; a file without β, relation or info
    loads with β = 1, no relation name and empty info."""
    weight, bias = _random_lre(0)
    model = {"name_or_path": "x", "fingerprint": fingerprint(find_parts(llama))}
    for key in ("kind", "lens_type"):
        path = _write(tmp_path / key, {key: "attribute", "model": model}, {"weight": weight, "bias": bias})
        lens = AttributeLens.from_pretrained(path, llama)
        assert (lens.beta, lens.relation, lens.info) == (1.0, "", {})
        torch.testing.assert_close(lens.weight, weight, atol=0, rtol=0)


def test_a_file_of_another_kind_or_missing_a_tensor_is_refused(llama, tmp_path):
    """A tuned lens's kind with both tensors, or an attribute lens missing its bias or its weight,
    is not an attribute lens, even with the right model fingerprint."""
    weight, bias = _random_lre(0)
    model = {"name_or_path": "x", "fingerprint": fingerprint(find_parts(llama))}
    cases = {
        "tuned": ({"kind": "tuned", "lens_type": "tuned"}, {"weight": weight, "bias": bias}),
        "no-bias": ({"kind": "attribute"}, {"weight": weight}),
        "no-weight": ({"kind": "attribute"}, {"bias": bias}),
    }
    for name, (kind, tensors) in cases.items():
        path = _write(tmp_path / name, {**kind, "model": model}, tensors)
        with pytest.raises(LensFileError, match=f"^{re.escape(str(path))} does not hold an attribute lens$"):
            AttributeLens.from_pretrained(path, llama)


def test_a_lens_for_another_model_names_that_model_and_the_fix(llama, tmp_path):
    """The message quotes the saved model's name (``None`` when the file names no model) and says
    to estimate the lens again."""
    weight, bias = _random_lre(0)
    for name, config in (
        ("other", {"kind": "attribute", "model": {"name_or_path": "other-model", "fingerprint": "0" * 64}}),
        ("nameless", {"kind": "attribute"}),
    ):
        path = _write(tmp_path / name, config, {"weight": weight, "bias": bias})
        shown = "'other-model'" if name == "other" else "None"
        message = f"the attribute lens in {path} was made for {shown}, not this model; estimate it again with depthlens attribute"
        with pytest.raises(LensFileError, match=f"^{re.escape(message)}$"):
            AttributeLens.from_pretrained(path, llama)


def test_faithfulness_rows_name_every_field_and_need_one_value_per_layer():
    """One row per layer with the relation, layer, both scores, the model's score and the number of
    subjects; a score list of another length than the layers is an error, not a shorter table."""
    score = Faithfulness("fox", [0, 1], [1.0, 0.5], [0.5, 0.0], 0.25, ["a", "b", "c", "d"])
    common = {"relation": "fox", "model_correct": 0.25, "subjects": 4}
    assert score.to_rows() == [
        {**common, "layer": 0, "faithfulness": 1.0, "lens_correct": 0.5},
        {**common, "layer": 1, "faithfulness": 0.5, "lens_correct": 0.0},
    ]
    with pytest.raises(ValueError, match="zip"):
        Faithfulness("fox", [0, 1], [1.0, 0.5, 0.0], [0.5, 0.0], 0.25, ["a"]).to_rows()
