"""The hook layer: reading and writing residual states and branch outputs, and erasure."""

import pytest
import torch
from tiny_models import tiny_model

from depthlens import capture, find_parts
from depthlens.errors import EditError
from depthlens.model.edits import derangement, erase
from depthlens.model.hooks import Edit, ablate, add, hooked, points, replace, run_with_hooks

IDS = torch.tensor([[5, 17, 42, 8, 99, 3, 61, 7]])


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


def _hooks(model: torch.nn.Module) -> set:
    """Every forward hook on the model (transformers installs persistent ones of its own)."""
    return {(name, kind, key) for name, m in model.named_modules()
            for kind, table in (("post", m._forward_hooks), ("pre", m._forward_pre_hooks)) for key in table}


def test_reads_match_the_models_own_hidden_states(llama):
    reference = llama(IDS, output_hidden_states=True).hidden_states
    before = _hooks(llama)
    run = run_with_hooks(llama, IDS, read=["resid.0", "resid.1", "resid.2"])
    for layer in range(3):
        torch.testing.assert_close(run.values[f"resid.{layer}"], reference[layer])
    assert _hooks(llama) == before


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma2", "olmo2", "bloom", "gpt_neox", "phi", "mixtral", "gptj", "falcon", "mpt"])
def test_branches_add_up_to_the_next_residual_state(family):
    """resid.{i+1} = resid.{i} + attn.{i} + mlp.{i}: the branch values are exactly what each
    block adds (sandwich norms included, BLOOM's and MPT's built-in residual subtracted, Falcon's in-place
    sum not leaking into what was read)."""
    model = tiny_model(family)
    parts = find_parts(model)
    run = run_with_hooks(model, IDS, read=points(parts))
    for i in range(parts.num_layers):
        total = run.values[f"resid.{i}"] + run.values[f"attn.{i}"] + run.values[f"mlp.{i}"]
        torch.testing.assert_close(total, run.values[f"resid.{i + 1}"], atol=1e-5, rtol=1e-5)


def test_a_family_without_an_mlp_module_says_so():
    parts = find_parts(tiny_model("opt"))
    assert "mlp.0" not in points(parts) and "attn.0" in points(parts)
    with pytest.raises(EditError, match="exposes no mlp module"), hooked(parts, read=["mlp.0"]):
        pass


def test_capture_keeps_only_the_layers_asked_for(llama):
    states = capture(llama, IDS, layers=[1])
    assert states.states[0] is None and states.states[2] is None
    torch.testing.assert_close(states[1], capture(llama, IDS)[1])
    with pytest.raises(EditError, match="not captured"):
        states[0]


def test_replacing_a_state_with_itself_changes_nothing(llama):
    clean = capture(llama, IDS)
    run = run_with_hooks(llama, IDS, edits=[replace("resid.2", clean[2])])
    torch.testing.assert_close(run.logits, clean.logits)


def test_an_edit_at_one_position_changes_only_that_position_and_later(llama):
    clean = capture(llama, IDS)
    run = run_with_hooks(llama, IDS, edits=[add("resid.1", torch.ones(32) * 3.0, positions=[4])])
    torch.testing.assert_close(run.logits[:, :4], clean.logits[:, :4])
    assert (run.logits[:, 4:] - clean.logits[:, 4:]).abs().amax(-1).min() > 1e-4


def test_negative_positions_count_from_the_end(llama):
    a = run_with_hooks(llama, IDS, edits=[add("resid.1", torch.ones(32), positions=[-1])])
    b = run_with_hooks(llama, IDS, edits=[add("resid.1", torch.ones(32), positions=[7])])
    torch.testing.assert_close(a.logits, b.logits)


def test_an_edit_of_the_last_state_is_decoded_by_the_model(llama):
    parts = find_parts(llama)
    clean = capture(llama, IDS)
    delta = torch.randn(32)
    run = run_with_hooks(llama, IDS, edits=[add("resid.3", delta)])
    torch.testing.assert_close(run.logits, parts.decode(clean[3] + delta), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", ["zero", "mean", "resample"])
def test_ablation_in_the_model_matches_the_erasure_formula(llama, mode):
    parts = find_parts(llama)
    clean = capture(llama, IDS)
    basis = torch.linalg.qr(torch.randn(32, 3)).Q.T
    mean = clean[3][0].mean(0)
    run = run_with_hooks(llama, IDS, edits=[ablate("resid.3", basis, mode, mean=mean, generator=torch.Generator().manual_seed(1))])
    permutation = derangement(IDS.shape[1], torch.Generator().manual_seed(1))
    h = clean[3]
    reference = {"zero": torch.zeros(32), "mean": mean, "resample": None}[mode]
    other = h[:, permutation] if mode == "resample" else reference
    expected = h - ((h - other) @ basis.T) @ basis
    torch.testing.assert_close(run.logits, parts.decode(expected), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(erase(h, basis, mode, mean=mean, permutation=permutation), expected)


def test_erasure_removes_the_component_and_keeps_the_complement():
    h = torch.randn(2, 10, 16)
    basis = torch.linalg.qr(torch.randn(16, 4)).Q.T
    erased = erase(h, basis, "zero")
    assert (erased @ basis.T).abs().max() < 1e-5
    complement = torch.eye(16) - basis.T @ basis
    torch.testing.assert_close(erased @ complement, h @ complement, atol=1e-5, rtol=1e-5)
    mean = torch.randn(16)
    torch.testing.assert_close(erase(h, basis, "mean", mean=mean) @ basis.T, (mean @ basis.T).expand(2, 10, 4), atol=1e-5, rtol=1e-5)


def test_derangements_move_every_position():
    for seed in range(20):
        permutation = derangement(7, torch.Generator().manual_seed(seed))
        assert sorted(permutation.tolist()) == list(range(7))
        assert bool((permutation != torch.arange(7)).all())
    with pytest.raises(EditError, match="at least 2"):
        derangement(1)


def test_hooks_are_removed_when_the_forward_pass_raises(llama):
    def boom(h: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("planted failure")

    before = _hooks(llama)
    with pytest.raises(RuntimeError, match="planted failure"):
        run_with_hooks(llama, IDS, read=["resid.1", "attn.0"], edits=[Edit("resid.2", boom)])
    assert _hooks(llama) == before


def test_a_once_edit_applies_to_the_first_forward_only(llama):
    clean = capture(llama, IDS)
    with hooked(llama, edits=[add("resid.1", torch.ones(32) * 5, once=True)]):
        first = llama(IDS).logits
        second = llama(IDS).logits
    assert not torch.allclose(first, clean.logits)
    torch.testing.assert_close(second, clean.logits)


@pytest.mark.parametrize(
    ("point", "message"),
    [("resid.4", "out of range"), ("mlp.3", "out of range"), ("resid.-1", "out of range"),
     ("block.1", "unknown hook point"), ("resid", "unknown hook point")],
)
def test_bad_points_are_refused_before_any_hook(llama, point, message):
    before = _hooks(llama)
    with pytest.raises(EditError, match=message), hooked(llama, read=["resid.1", point]):
        pass
    assert _hooks(llama) == before


def test_bad_edits_give_one_clear_error(llama):
    before = _hooks(llama)
    with pytest.raises(EditError, match="out of range for a sequence"):
        run_with_hooks(llama, IDS, edits=[add("resid.1", torch.ones(32), positions=[8])])
    with pytest.raises(EditError, match="returned shape"):
        run_with_hooks(llama, IDS, edits=[Edit("resid.1", lambda h: h[:, :1])])
    with pytest.raises(EditError, match="needs the data mean"):
        ablate("resid.1", torch.eye(32)[:2], "mean")
    with pytest.raises(EditError, match="unknown erasure"):
        ablate("resid.1", torch.eye(32)[:2], "gaussian")
    with pytest.raises(EditError, match=r"\[k, 32\]"):
        run_with_hooks(llama, IDS, edits=[ablate("resid.1", torch.eye(16)[:2], "zero")])
    assert _hooks(llama) == before
