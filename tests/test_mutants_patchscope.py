"""Patchscopes: exact answers for the edges that the main tests leave open (positions at the limits,
error messages, the ridge of the fitted map, the generation's patch and sampling settings)."""

from __future__ import annotations

import re

import pytest
import torch
from tiny_models import tiny_model
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from depthlens import capture, find_parts
from depthlens.analysis.generate import GenerationError, generate_from_layer
from depthlens.analysis.patchscope import (
    IDENTITY_PROMPT,
    AffineMap,
    IdentityCurve,
    Patch,
    fit_affine_map,
    mapped,
    patchscope,
    patchscope_generate,
    token_identity_curve,
)
from depthlens.errors import PatchscopeError
from depthlens.lenses.logit import LogitLens
from depthlens.model.hooks import replace

SOURCE = "When shall we three meet again in thunder"


@pytest.fixture(scope="module")
def llama() -> PreTrainedModel:
    return tiny_model("llama")


@pytest.fixture(scope="module")
def wide() -> PreTrainedModel:
    return tiny_model("llama", seed=1, hidden_size=48)


def _ids(tokenizer: PreTrainedTokenizerBase, text: str) -> torch.Tensor:
    return tokenizer(text, return_tensors="pt").input_ids


class _StripsTrailingSpaces:
    """A tokenizer that drops trailing whitespace (as some SentencePiece ones do): a continuation
    of spaces then adds no token at all."""

    def __init__(self, inner: PreTrainedTokenizerBase) -> None:
        self.inner = inner

    def __call__(self, text: str, return_tensors: str = "pt") -> object:
        return self.inner(text.rstrip(), return_tensors=return_tensors)


# --- positions: the range is exactly -seq … seq-1 -------------------------------------------------


def test_the_first_and_last_target_positions_are_accepted_and_one_past_is_refused(llama, tiny_tokenizer):
    """``-seq`` is the first token (it is stored as 0); ``seq`` is one past the end and refused with
    the allowed range ``-seq … seq-1`` spelled out."""
    source, target = _ids(tiny_tokenizer, SOURCE), _ids(tiny_tokenizer, IDENTITY_PROMPT)
    seq = target.shape[1]
    first = patchscope(llama, source, target, Patch(1, 2, target_position=-seq))
    zero = patchscope(llama, source, target, Patch(1, 2, target_position=0))
    assert first.patch.target_position == 0
    torch.testing.assert_close(first.states.logits, zero.states.logits, rtol=0, atol=0)
    last = patchscope(llama, source, target, Patch(1, 2, target_position=seq - 1))
    assert last.patch.target_position == seq - 1
    message = f"the target position {seq} is outside its prompt of {seq} tokens: pick one between {-seq} and {seq - 1}"
    with pytest.raises(PatchscopeError, match=f"^{re.escape(message)}$"):
        patchscope(llama, source, target, Patch(1, 2, target_position=seq))
    with pytest.raises(PatchscopeError, match=re.escape(f"the target position {-seq - 1} is outside")):
        patchscope(llama, source, target, Patch(1, 2, target_position=-seq - 1))


def test_generation_names_the_target_position_that_is_out_of_range(llama, tiny_tokenizer):
    """The generating Patchscope checks the target position too, and says it is the target's."""
    source, target = _ids(tiny_tokenizer, SOURCE), _ids(tiny_tokenizer, IDENTITY_PROMPT)
    seq = target.shape[1]
    message = (
        f"the target position {seq + 3} is outside its prompt of {seq} tokens: pick one between {-seq} and {seq - 1}"
    )
    with pytest.raises(PatchscopeError, match=f"^{re.escape(message)}$"):
        patchscope_generate(llama, source, target, Patch(1, 2, target_position=seq + 3), max_new_tokens=2)


# --- widths: the message names the fix that applies ------------------------------------------------


def test_a_width_mismatch_without_a_map_asks_for_one(llama, wide, tiny_tokenizer):
    """No map between a 32-wide source and a 48-wide target: the fix is to fit one."""
    source, target = _ids(tiny_tokenizer, SOURCE), _ids(tiny_tokenizer, IDENTITY_PROMPT)
    message = (
        "the source state has width 32 but the target model's is 48: pass a map between the widths (fit_affine_map)"
    )
    with pytest.raises(PatchscopeError, match=f"^{re.escape(message)}$"):
        patchscope(llama, source, target, Patch(2), target_model=wide)


def test_a_map_of_the_wrong_width_is_blamed(llama, wide, tiny_tokenizer):
    """A map was given but it yields width 40, not the target's 48: the map is at fault."""
    source, target = _ids(tiny_tokenizer, SOURCE), _ids(tiny_tokenizer, IDENTITY_PROMPT)
    to_40 = AffineMap(torch.zeros(40, 32), torch.zeros(40))
    message = "the source state has width 40 but the target model's is 48: the map gives the wrong width"
    with pytest.raises(PatchscopeError, match=f"^{re.escape(message)}$"):
        patchscope(llama, source, target, Patch(2), target_model=wide, mapping=to_40)


def test_mapped_reads_the_width_from_the_last_axis_whatever_the_leading_ones(llama, wide):
    """A map works on ``[..., d]``: a ``[1, 1, 32]`` state fits a 32-wide target unchanged, and
    against a 48-wide one the message reports width 32 (the last axis, not the second)."""
    state = torch.arange(32.0).reshape(1, 1, 32)
    assert torch.equal(mapped(state, None, find_parts(llama)), state)
    one_d = torch.arange(32.0)
    assert torch.equal(mapped(one_d, lambda h: 2 * h, find_parts(llama)), 2 * one_d)
    with pytest.raises(PatchscopeError, match="has width 32 but the target model's is 48"):
        mapped(state, None, find_parts(wide))


# --- the fitted map ----------------------------------------------------------------------------------


def test_the_default_ridge_is_one_thousandth_per_sample():
    """x = (0, 2), y = 3x + 1: centred, Σxc² = 2 and Σxc·yc = 6, and the ridge adds
    1e-3 · n = 0.002, so w = 6 / 2.002 and b = ȳ − w·x̄ = 4 − w."""
    x = torch.tensor([[0.0], [2.0]])
    fitted = fit_affine_map(x, 3 * x + 1)
    w = 6 / 2.002
    torch.testing.assert_close(fitted.weight, torch.tensor([[w]]), rtol=1e-6, atol=0)
    torch.testing.assert_close(fitted.bias, torch.tensor([4 - w]), rtol=1e-6, atol=0)


def test_an_explicit_ridge_scales_with_the_number_of_samples():
    """Same data with ridge 0.5 and the rows repeated twice (n = 4): Σxc² = 4, Σxc·yc = 12 and the
    ridge adds 0.5 · 4 = 2, so w = 12 / 6 = 2 and b = 4 − 2 = 2."""
    x = torch.tensor([[0.0], [2.0], [0.0], [2.0]])
    fitted = fit_affine_map(x, 3 * x + 1, ridge=0.5)
    torch.testing.assert_close(fitted.weight, torch.tensor([[2.0]]), rtol=1e-6, atol=0)
    torch.testing.assert_close(fitted.bias, torch.tensor([2.0]), rtol=1e-6, atol=0)


@pytest.mark.parametrize(
    ("source_shape", "target_shape"),
    [((5, 3, 1), (5, 2)), ((5, 3), (5, 2, 1)), ((5,), (5, 2))],
)
def test_fitting_refuses_states_that_are_not_matrices(source_shape, target_shape):
    """Either side not ``[n, d]`` is refused by name, with both shapes shown."""
    message = f"fit the map on paired states [n, d_source] and [n, d_target], got {source_shape} and {target_shape}"
    with pytest.raises(PatchscopeError, match=f"^{re.escape(message)}$"):
        fit_affine_map(torch.randn(source_shape), torch.randn(target_shape))


def test_the_affine_map_computes_in_float32_whatever_the_input_dtype():
    """``f(h) = h Wᵀ + b`` on a float64 and a bfloat16 state (small integers, exact in every dtype)
    gives the float32 answer: W = [[1, 2], [3, 4], [0, -1]], b = (1, 0, 2), h = (1, 2) → (6, 11, 0)."""
    affine = AffineMap(
        torch.tensor([[1.0, 2.0], [3.0, 4.0], [0.0, -1.0]], dtype=torch.float64), torch.tensor([1, 0, 2])
    )
    expected = torch.tensor([[6.0, 11.0, 0.0]])
    for dtype in (torch.float64, torch.bfloat16):
        out = affine(torch.tensor([[1.0, 2.0]], dtype=dtype))
        assert out.dtype == torch.float32 and torch.equal(out, expected)


def test_the_affine_map_moves_its_input_to_the_device_of_its_weights():
    """A map kept on another device (``meta`` stands in for an accelerator on a CPU-only machine)
    takes a CPU state there: the result lives on that device, ``[1, d_target]``."""
    affine = AffineMap(torch.ones(3, 2), torch.zeros(3)).to("meta")
    out = affine(torch.ones(1, 2, dtype=torch.float64))
    assert out.device.type == "meta" and out.shape == (1, 3) and out.dtype == torch.float32


# --- the patched run's readouts -----------------------------------------------------------------------


def test_the_patched_run_reads_with_five_tokens_and_its_own_name_by_default(llama, tiny_tokenizer):
    """Defaults: 5 top tokens, labels from the tokenizer (``at`` of ``cat``, ``·`` for the space) and
    the name ``patchscope · logit``; a given name wins."""
    source, target = _ids(tiny_tokenizer, SOURCE), _ids(tiny_tokenizer, IDENTITY_PROMPT)
    result = patchscope(llama, source, target, Patch(1, 3))
    trajectory = result.trajectory(tokenizer=tiny_tokenizer)
    assert trajectory.k == 5
    assert trajectory.lens_name == "patchscope · logit"
    at, space = tiny_tokenizer.convert_tokens_to_ids(["at", "Ġ"])
    assert trajectory.labels[at] == "at" and trajectory.labels[space] == "·"
    named = result.trajectory(k=2, name="mine")
    assert named.k == 2 and named.lens_name == "mine"
    ids, probs = result.top()
    expected = result.states.logits[0, -1].softmax(-1).topk(5)
    assert ids == expected.indices.tolist()
    torch.testing.assert_close(torch.tensor(probs), expected.values)


# --- generation -----------------------------------------------------------------------------------------


def test_generation_writes_the_mapped_state_at_the_target_layer_and_position(llama, tiny_tokenizer):
    """Source (layer 2, position 3), rotated by the map (a roll of its coordinates, which a norm
    cannot undo), written once over the last target token at layer 1: the same tokens and
    log-probabilities as that patch written out by hand and generated without a cache, and
    different ones from the unpatched run."""
    source, target = _ids(tiny_tokenizer, SOURCE), _ids(tiny_tokenizer, IDENTITY_PROMPT)
    patch = Patch(source_layer=2, source_position=3, target_layer=1)
    patched = patchscope_generate(llama, source, target, patch, mapping=lambda h: h.roll(1, -1), max_new_tokens=4)
    state = capture(llama, source, layers=[2])[2][:, 3].roll(1, -1)
    edit = replace("resid.1", state[:, None], positions=[target.shape[1] - 1], once=True)
    lens = LogitLens(llama)
    slow = generate_from_layer(llama, lens, target, layer=3, max_new_tokens=4, edits=[edit], use_cache=False)
    assert torch.equal(patched.tokens, slow.tokens)
    torch.testing.assert_close(patched.log_probs, slow.log_probs, rtol=0, atol=1e-5)
    plain = generate_from_layer(llama, lens, target, layer=3, max_new_tokens=4)
    assert (patched.log_probs - plain.log_probs).abs().max() > 1e-3


def test_generation_makes_twenty_tokens_by_default(llama, tiny_tokenizer):
    """The documented default length is 20 new tokens."""
    source, target = _ids(tiny_tokenizer, SOURCE), _ids(tiny_tokenizer, IDENTITY_PROMPT)
    assert patchscope_generate(llama, source, target, Patch(1)).tokens.shape == (1, 20)


def test_sampling_settings_reach_the_generator(llama, tiny_tokenizer):
    """A negative temperature is refused by the generator, so it must have been passed on."""
    source, target = _ids(tiny_tokenizer, SOURCE), _ids(tiny_tokenizer, IDENTITY_PROMPT)
    with pytest.raises(GenerationError, match="the temperature must be 0 \\(greedy\\) or more, got -1.0"):
        patchscope_generate(llama, source, target, Patch(1), max_new_tokens=2, temperature=-1.0)


# --- the identity curve --------------------------------------------------------------------------------


def test_curve_rows_carry_every_field_and_refuse_ragged_lists():
    """One row per layer with both precisions, their interval bounds and the position and text
    counts; lists of different lengths are an error rather than silently cut."""
    curve = IdentityCurve([0, 2], [0.5, 0.25], [1.0, 0.75], 8, 3, ([0.25, 0.0], [0.75, 0.5]), None)
    common = {"positions": 8, "texts": 3, "interval_level": 0.95, "bootstrap_unit": "text"}
    assert curve.to_rows() == [
        {"source_layer": 0, "precision_at_1_identity": 0.5, "precision_at_1_identity_low": 0.25,
         "precision_at_1_identity_high": 0.75, "precision_at_1_next_token": 1.0, "precision_at_1_next_token_low": None,
         "precision_at_1_next_token_high": None, **common},
        {"source_layer": 2, "precision_at_1_identity": 0.25, "precision_at_1_identity_low": 0.0,
         "precision_at_1_identity_high": 0.5, "precision_at_1_next_token": 0.75, "precision_at_1_next_token_low": None,
         "precision_at_1_next_token_high": None, **common},
    ]
    with pytest.raises(ValueError, match="zip"):
        IdentityCurve([0, 1, 2], [0.5, 0.25], [1.0, 0.75], 8, 3, None, None).to_rows()


def test_a_continuation_that_merges_with_the_placeholder_is_refused(llama, tiny_tokenizer):
    """``t`` + ``he ->`` tokenizes as `` the ->``: more tokens, but the placeholder ``t`` is gone."""
    base = _ids(tiny_tokenizer, "hello -> t")
    full = _ids(tiny_tokenizer, "hello -> the ->")
    assert full.shape[1] > base.shape[1] and not torch.equal(full[:, : base.shape[1]], base)
    message = "the continuation 'he ->' merges with the target prompt's last token: pick another"
    with pytest.raises(PatchscopeError, match=f"^{re.escape(message)}$"):
        token_identity_curve(
            llama, tiny_tokenizer, ["Fair is foul"], layers=[1], target_prompt="hello -> t", continuation="he ->"
        )


def test_a_continuation_that_adds_no_token_is_refused(llama, tiny_tokenizer):
    """A tokenizer that drops trailing spaces reads ``prompt + "  "`` as the prompt alone: there is
    no token after the placeholder to score, so the continuation is refused."""
    tokenizer = _StripsTrailingSpaces(tiny_tokenizer)
    with pytest.raises(PatchscopeError, match=re.escape("the continuation '  ' merges")):
        token_identity_curve(llama, tokenizer, ["Fair is foul"], layers=[1], continuation="  ")
