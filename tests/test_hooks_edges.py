"""Edges of the hook layer: the structures modules return, dtypes, positions, and once-edits of
every kind (each test here kills mutants that tests/test_hooks.py let through)."""

from types import SimpleNamespace

import pytest
import torch
from tiny_models import tiny_model

from depthlens import capture
from depthlens.errors import EditError
from depthlens.model.hooks import _first_tensor, _with_first, ablate, add, hooked, replace, run_with_hooks

IDS = torch.tensor([[5, 17, 42, 8, 99, 3, 61, 7]])


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


def test_the_hidden_state_is_found_and_swapped_in_every_output_structure():
    h, other, new = torch.ones(2), torch.zeros(3), torch.full((2,), 5.0)
    assert _first_tensor(h) is h and _with_first(h, new) is new
    for value in ((h, other), [h, other]):
        assert _first_tensor(value) is h
        swapped = _with_first(value, new)
        assert type(swapped) is type(value) and swapped[0] is new and swapped[1] is other
    for field in ("hidden_states", "last_hidden_state"):
        output = SimpleNamespace(hidden_states=None, last_hidden_state=None)
        setattr(output, field, h)
        assert _first_tensor(output) is h
        assert getattr(_with_first(output, new), field) is new
        assert getattr(output, "last_hidden_state" if field == "hidden_states" else "hidden_states") is None
    for bad in ((), ("text",), SimpleNamespace(hidden_states=None, last_hidden_state=None), 3):
        with pytest.raises(EditError, match="holds no hidden-state tensor"):
            _first_tensor(bad)


def test_replace_changes_only_the_positions_given(llama):
    clean = capture(llama, IDS)
    run = run_with_hooks(llama, IDS, read=["resid.2"], edits=[replace("resid.2", torch.zeros(32), positions=[2, 5])])
    state = run.values["resid.2"][0]
    assert state[[2, 5]].abs().max() == 0
    keep = [0, 1, 3, 4, 6, 7]
    assert not torch.equal(state[keep], torch.zeros(6, 32))
    torch.testing.assert_close(state[[0, 1]], clean[2][0, [0, 1]])


@pytest.mark.parametrize("make", [
    lambda: replace("resid.2", torch.ones(32, dtype=torch.float64)),
    lambda: add("resid.2", torch.ones(32, dtype=torch.float64)),
])
def test_values_of_another_dtype_are_cast_to_the_models(llama, make):
    run = run_with_hooks(llama, IDS, read=["resid.2"], edits=[make()])
    assert run.values["resid.2"].dtype == torch.float32 and run.logits.dtype == torch.float32


@pytest.mark.parametrize("make", [
    lambda: replace("resid.1", torch.zeros(32), once=True),
    lambda: add("resid.1", torch.ones(32) * 4, once=True),
])
def test_once_is_kept_by_every_edit_maker(llama, make):
    edit = make()
    assert edit.once
    clean = capture(llama, IDS)
    with hooked(llama, edits=[edit]):
        first, second = llama(IDS).logits, llama(IDS).logits
    assert not torch.allclose(first, clean.logits)
    torch.testing.assert_close(second, clean.logits)


@pytest.mark.parametrize("mode", ["zero", "mean"])
def test_zero_and_mean_ablation_work_on_a_single_position(llama, mode):
    """Only resample needs another position to swap with."""
    basis = torch.eye(32)[:2]
    run = run_with_hooks(llama, IDS[:, :1], read=["resid.1"], edits=[ablate("resid.1", basis, mode, mean=torch.ones(32))])
    component = run.values["resid.1"][0, 0, :2]
    torch.testing.assert_close(component, torch.zeros(2) if mode == "zero" else torch.ones(2))
    with pytest.raises(EditError, match="at least 2"):
        run_with_hooks(llama, IDS[:, :1], edits=[ablate("resid.1", basis, "resample")])


def test_ablation_positions_are_honoured(llama):
    basis = torch.eye(32)[:1]
    run = run_with_hooks(llama, IDS, read=["resid.1"], edits=[ablate("resid.1", basis, "zero", positions=[3])])
    clean = capture(llama, IDS)
    assert run.values["resid.1"][0, 3, 0] == 0
    torch.testing.assert_close(run.values["resid.1"][0, :3], clean[1][0, :3])


def test_the_first_and_last_positions_can_be_named_from_either_end(llama):
    a = run_with_hooks(llama, IDS, edits=[add("resid.1", torch.ones(32), positions=[-8])])
    b = run_with_hooks(llama, IDS, edits=[add("resid.1", torch.ones(32), positions=[0])])
    torch.testing.assert_close(a.logits, b.logits)
    with pytest.raises(EditError, match="out of range"):
        run_with_hooks(llama, IDS, edits=[add("resid.1", torch.ones(32), positions=[-9])])


def test_writes_at_branch_points_reach_the_output(llama):
    clean = capture(llama, IDS)
    for point in ("attn.1", "mlp.1"):
        run = run_with_hooks(llama, IDS, read=[point], edits=[add(point, torch.ones(32))])
        assert not torch.allclose(run.logits, clean.logits)


def test_a_missing_branch_message_names_the_family_table():
    from depthlens import find_parts

    parts = find_parts(tiny_model("opt"))
    message = r"opt family exposes no mlp module \(record its path in FamilyRule.attention"
    with pytest.raises(EditError, match=message), hooked(parts, read=["mlp.0"]):
        pass


def test_erasure_defaults_to_the_mean_and_casts_basis_and_mean_to_the_states_dtype():
    from depthlens.model.edits import erase

    h = torch.randn(1, 6, 8)
    basis, mean = torch.eye(8, dtype=torch.float64)[:2], torch.ones(8, dtype=torch.float64)
    out = erase(h, basis, mean=mean)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out[..., :2], torch.ones(1, 6, 2))
    torch.testing.assert_close(out[..., 2:], h[..., 2:])


def test_a_single_direction_may_be_given_as_a_vector():
    from depthlens.model.edits import check_basis, erase

    v = torch.zeros(8)
    v[3] = 1.0
    assert check_basis(v, 8).shape == (1, 8)
    h = torch.randn(1, 4, 8)
    torch.testing.assert_close(erase(h, v, "zero"), erase(h, v[None], "zero"))
    assert erase(h, v, "zero")[..., 3].abs().max() == 0
    with pytest.raises(EditError, match=r"\[k, 8\]"):
        check_basis(torch.zeros(2, 3, 8), 8)


def test_erasure_errors_name_what_is_missing():
    from depthlens.model.edits import erase

    h, basis = torch.randn(1, 4, 8), torch.eye(8)[:1]
    with pytest.raises(EditError, match="needs a permutation of the positions"):
        erase(h, basis, "resample")
    with pytest.raises(EditError, match=r"mean ablation needs the data mean of the states \(mean=\[d\]\)"):
        erase(h, basis, "mean")
    with pytest.raises(EditError, match="choose one of zero, mean, resample"):
        erase(h, basis, "noise")


def test_derangements_of_two_swap_and_a_seed_repeats():
    from depthlens.model.edits import derangement

    assert derangement(2).tolist() == [1, 0]
    assert {tuple(derangement(3, torch.Generator().manual_seed(s)).tolist()) for s in range(30)} == {(1, 2, 0), (2, 0, 1)}
    for seed in range(10):
        a = derangement(9, torch.Generator().manual_seed(seed))
        assert torch.equal(a, derangement(9, torch.Generator().manual_seed(seed)))


def test_run_with_hooks_honours_the_attention_mask(llama):
    ids = IDS.clone()
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    left_padded = run_with_hooks(llama, ids, mask).logits
    assert not torch.allclose(left_padded[0, -1], run_with_hooks(llama, ids).logits[0, -1])
    torch.testing.assert_close(left_padded[0, -1], llama(ids, attention_mask=mask).logits[0, -1])


def test_an_edit_of_the_first_state_works_when_the_block_gets_it_by_keyword(llama):
    from depthlens import find_parts

    parts = find_parts(llama)
    block = parts.blocks[0]
    h = capture(llama, IDS)[0]
    position_embeddings = llama.model.rotary_emb(h, torch.arange(8)[None])
    with hooked(parts, read=["resid.0"], edits=[add("resid.0", torch.ones(32))]) as values:
        by_keyword = block(hidden_states=h, position_embeddings=position_embeddings)
    with hooked(parts, edits=[add("resid.0", torch.ones(32))]):
        by_position = block(h, position_embeddings=position_embeddings)
    torch.testing.assert_close(values["resid.0"], h + 1)
    torch.testing.assert_close(_first_tensor(by_keyword), _first_tensor(by_position))
